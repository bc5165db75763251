# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# (adapters)=
# # 13-04 Adapter methods compared: IA3, one harness, merging and stacking
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`lora`, {ref}`prompt-tuning`. **Reading time:** ~15 min; the tiny
# profile runs in about 4½ minutes on 2 CPU cores.
# **You will build** `ftbook.adapters`: IA3 from scratch (matched to PEFT and mergeable), one
# harness that trains and measures every method of this module on the same task and budget, a
# decision table computed from those measurements, an adapter bank that switches tasks on one
# base, and the two ways to merge LoRA adapters (PEFT's `linear` and `cat`).
# ```
#
# Chapters 13-01 to 13-05 each built one way to adapt a pretrained model. This chapter adds the
# last one, IA3, and then puts all of them through the same harness: same encoder, data, steps
# and batch, several seeds, and the same six measurements. The choice between methods then
# becomes a lookup in a table of numbers measured on this machine, not a matter of folklore.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_04_adapters"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## IA3: learned rescaling
#
# IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations", Liu et al. 2022,
# arXiv:2205.05638, §3.3) learns three vectors per transformer block and multiplies them
# element-wise into the keys, the values and the FFN's inner activation:
#
# $$
# K = \ell_k \odot (X W_K + b_K), \qquad V = \ell_v \odot (X W_V + b_V), \qquad
# \operatorname{FFN}(x) = \big(\ell_{ff} \odot \gamma(W_1 x + b_1)\big) W_2 + b_2 ,
# \tag{4.1}
# $$
#
# with $\ell_k, \ell_v \in \mathbb{R}^{d_{kv}}$, $\ell_{ff} \in \mathbb{R}^{d_{ff}}$, all
# initialised to ones (so the model starts unchanged, like LoRA with $B = 0$), and $\gamma$ the
# FFN nonlinearity. A block trains $2 d_{kv} + d_{ff}$ numbers: 2,304 for MiniLM's
# $d = 384, d_{ff} = 1536$, against $2 r (d + d) = 12{,}288$ for LoRA with $r = 8$ on $W_Q, W_V$.
#
# In code, the first two scale the *output* of the key and value projections; the third scales
# the *input* of the FFN's down-projection $W_2$ (a "feed-forward" target in PEFT's terms). Both
# fold into the weights, because a diagonal scaling is a matrix product:
#
# $$
# \ell \odot (W x + b) = (\operatorname{diag}(\ell) W)\, x + \ell \odot b, \qquad
# W_2 (\ell_{ff} \odot h) = (W_2 \operatorname{diag}(\ell_{ff}))\, h .
# \tag{4.2}
# $$
#
# The merged model is a plain model: no extra work at inference. As an update,
# $\Delta W = (\operatorname{diag}(\ell) - I) W$ can have full rank but lives in a
# $d$-dimensional family per matrix, where LoRA's lives in $r(d_\text{in} + d_\text{out})$.

# %%
import torch

from ftbook.workbench import rounding_bound

torch.manual_seed(0)
W, b, x = torch.randn(6, 4), torch.randn(6), torch.randn(4)
ell_out, ell_in = torch.rand(6) + 0.5, torch.rand(4) + 0.5
out_scaled = ell_out * (W @ x + b)
# Each side evaluates the same sum of products with at most 7 roundings along any path (a
# 4-term dot product, the bias, the scalings): by the bound of Appendix A each is within
# gamma_7 of the sum of absolute terms, so the two are within twice that.
folded = (torch.diag(ell_out) @ W) @ x + ell_out * b
abs_terms = ell_out * (W.abs() @ x.abs() + b.abs())
assert ((out_scaled - folded).abs() <= 2 * rounding_bound(8, abs_terms)).all()
W2, h = torch.randn(3, 4), torch.randn(4)
folded_in = (W2 @ torch.diag(ell_in)) @ h
abs_terms_in = W2.abs() @ (ell_in * h.abs())
assert ((W2 @ (ell_in * h) - folded_in).abs() <= 2 * rounding_bound(6, abs_terms_in)).all()
print("eq. (4.2): output scaling folds into rows and bias, input scaling into columns")

# %%
#| export
"""IA3 from scratch, one harness for every adaptation method, and merging LoRA adapters.

Chapter 13-04. Liu et al. 2022 (IA3, arXiv:2205.05638, §3.3); the other methods come from
chapters 13-01 (full fine-tuning, feature extraction), 13-02 (LoRA), 13-03 (QLoRA) and 13-05
(prompt and prefix tuning).
"""
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftbook.lora import linear_layer_names, matches_target  # target matching as in 13-02 (and PEFT)


class IA3Linear(nn.Module):
    """A frozen `nn.Linear` with a learned rescaling vector `ia3_l`, eq. (4.1).

    `feedforward=False` scales the output features (keys, values): y = l * (W x + b).
    `feedforward=True` scales the input features (the FFN's inner activation): y = W (l * x) + b.
    `ia3_l` starts at ones, so the layer starts equal to `base`.
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps nn.Linear, got {type(base).__name__}")
        self.base = base.requires_grad_(False)
        self.feedforward = feedforward
        size = base.in_features if feedforward else base.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base.weight.device,
                                             dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.feedforward:
            return self.base(x * self.ia3_l.to(x.dtype))  # (..., in) scaled before W
        return self.base(x) * self.ia3_l.to(x.dtype)  # (..., out) scaled after W

    def merged(self) -> nn.Linear:
        """The plain `nn.Linear` of eq. (4.2)."""
        base = self.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            if self.feedforward:
                merged.weight.copy_(base.weight * self.ia3_l.unsqueeze(0))  # columns
                if base.bias is not None:
                    merged.bias.copy_(base.bias)
            else:
                merged.weight.copy_(base.weight * self.ia3_l.unsqueeze(1))  # rows
                if base.bias is not None:
                    merged.bias.copy_(base.bias * self.ia3_l)
        return merged

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, size={self.ia3_l.numel()}"


def apply_ia3(model: nn.Module, target_modules: Sequence[str],
              feedforward_modules: Sequence[str], modules_to_save: Sequence[str] = ()
              ) -> nn.Module:
    """Wrap the targeted `nn.Linear` layers of `model` (name suffixes, as in PEFT) in `IA3Linear`,
    in place; `feedforward_modules` (a subset of the targets) get input scaling. Everything else
    is frozen except modules named in `modules_to_save`. Returns `model`."""
    linear_names = linear_layer_names(model)
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one linear layer")
    for target in target_modules:
        if not any(matches_target(n, target) for n in linear_names):
            raise ValueError(f"IA3 target {target!r} matches no nn.Linear in "
                             f"{type(model).__name__}; linear layers are named like "
                             f"{sorted({n.split('.')[-1] for n in linear_names})}")
    stray = [f for f in feedforward_modules if f not in target_modules]
    if stray:
        raise ValueError(f"feedforward_modules {stray} are not in target_modules: a feed-forward "
                         "module must also be a target")
    model.requires_grad_(False)
    for name in linear_names:
        if any(matches_target(name, t) for t in target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            feedforward = any(matches_target(name, f) for f in feedforward_modules)
            setattr(parent, child, IA3Linear(getattr(parent, child), feedforward))
    for name, module in model.named_modules():
        if name and any(matches_target(name, m) for m in modules_to_save):
            module.requires_grad_(True)
    return model


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """The `IA3Linear` modules of `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Linear)}


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into its weight, eq. (4.2), restoring plain `nn.Linear`s, in place."""
    for name, layer in ia3_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.merged())
    return model


def encoder_ia3_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(targets, feed-forward targets) of IA3 on a BERT/RoBERTa encoder: keys, values and each
    layer's FFN down-projection `layer.<i>.output.dense` (not the attention's `output.dense`)."""
    ffn = [f"layer.{i}.output.dense" for i in range(model.config.num_hidden_layers)]
    return ["key", "value", *ffn], ffn


def copy_ia3_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Copy our IA3 vectors (and a trained head) into a PEFT IA3 model of the same base."""
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in ia3_layers(ours).items():
            target = peft_params[f"base_model.model.{name}.ia3_l.default"]  # (out, 1) or (1, in)
            target.copy_(layer.ia3_l.view_as(target))
        for name, p in ours.named_parameters():
            if p.requires_grad and "ia3_l" not in name:  # a head, in PEFT's modules_to_save copy
                module, _, leaf = name.rpartition(".")
                peft_params[f"base_model.model.{module}.modules_to_save.default.{leaf}"].copy_(p)


# %% [markdown]
# Quick checks on a random two-layer BERT: IA3 starts as the identity, trains only its vectors
# and the head, and merging gives a plain model with the same outputs.

# %%
import copy

from transformers import BertConfig, BertForSequenceClassification

from ftbook.lora import PARITY_TOLERANCE  # float64 comparisons of two computations of a model

torch.manual_seed(0)
toy = BertForSequenceClassification(BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0)).eval()
toy_batch = {"input_ids": torch.randint(1, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long)}
toy_batch["attention_mask"][1, 6:] = 0

targets, feedforward = encoder_ia3_targets(toy)
ia3 = apply_ia3(copy.deepcopy(toy), targets, feedforward, modules_to_save=["classifier"])
with torch.no_grad():
    assert torch.equal(ia3(**toy_batch).logits, toy(**toy_batch).logits)  # l = 1
trainable = {n: p.numel() for n, p in ia3.named_parameters() if p.requires_grad}
per_block = 2 * 32 + 64  # 2 d_kv + d_ff
print(f"IA3 vectors: {sum(v for n, v in trainable.items() if 'ia3_l' in n)} "
      f"(= {toy.config.num_hidden_layers} blocks x {per_block}); head: "
      f"{sum(v for n, v in trainable.items() if 'ia3_l' not in n)}")
assert sum(v for n, v in trainable.items() if "ia3_l" in n) == toy.config.num_hidden_layers * per_block
for layer in ia3_layers(ia3).values():
    layer.ia3_l.data.uniform_(0.5, 1.5)
# Merged and unmerged are compared in float64, where their rounding difference is ~1e-16 of
# the logits: far below 13-02's parity tolerance, and far below what a wrong fold would change.
ia3 = ia3.double()
with torch.no_grad():
    unmerged = ia3(**toy_batch).logits
    merged_toy = merge_ia3(copy.deepcopy(ia3))
    merge_gap = (merged_toy(**toy_batch).logits - unmerged).abs().max().item()
print(f"max |merged - unmerged| (float64) = {merge_gap:.2e}; IA3 layers left after merging: "
      f"{len(ia3_layers(merged_toy))}")
assert merge_gap < PARITY_TOLERANCE and not ia3_layers(merged_toy)

# %% [markdown]
# ### Parity with PEFT
#
# PEFT's `IA3Config` with the same targets and feed-forward modules, our vectors copied in: same
# logits, same trainable parameters, same gradients, and PEFT's own merge equals ours. As in
# 13-02 both run in float64, so "same" means within the parity tolerance derived there.

# %%
import warnings

import pandas as pd
from peft import IA3Config, get_peft_model

from ftbook.workbench import show_table

with warnings.catch_warnings():  # float64, like our copy above
    warnings.simplefilter("ignore")
    peft_ia3 = get_peft_model(copy.deepcopy(toy).double(), IA3Config(
        target_modules=targets, feedforward_modules=feedforward, modules_to_save=["classifier"]))
copy_ia3_into_peft(ia3, peft_ia3)
peft_trainable = peft_ia3.get_nb_trainable_parameters()[0]  # before merge_and_unload below
labels = torch.tensor([0, 1, 1, 0])
ours_out = ia3(**toy_batch, labels=labels)
peft_out = peft_ia3(**toy_batch, labels=labels)
ours_out.loss.backward()
peft_out.loss.backward()
peft_grads = {n: p.grad for n, p in peft_ia3.named_parameters() if p.requires_grad}
grad_gap = max((layer.ia3_l.grad - peft_grads[f"base_model.model.{n}.ia3_l.default"].flatten())
               .abs().max().item() for n, layer in ia3_layers(ia3).items())
with torch.no_grad():
    peft_merged = peft_ia3.merge_and_unload()
    merged_vs_peft = (peft_merged(**toy_batch).logits - merged_toy(**toy_batch).logits).abs().max()
ia3_parity = pd.Series({
    "max |logits ours - PEFT|": (ours_out.logits - peft_out.logits).abs().max().item(),
    "trainable (ours)": sum(trainable.values()),
    "trainable (PEFT)": peft_trainable,
    "max |grad ours - PEFT|": grad_gap,
    "max |merged ours - merged PEFT|": merged_vs_peft.item(),
}, name="value").to_frame()
show_table(ia3_parity, "ia3_peft_parity", CHAPTER, floatfmt="{:.3g}")
assert ia3_parity.loc["max |logits ours - PEFT|", "value"] < PARITY_TOLERANCE
assert ia3_parity.loc["trainable (ours)", "value"] == ia3_parity.loc["trainable (PEFT)", "value"]
assert grad_gap < PARITY_TOLERANCE and merged_vs_peft < PARITY_TOLERANCE

# %% [markdown]
# ## One harness for every method
#
# `prepare_method` turns a freshly loaded encoder classifier into each method's trainable model;
# `train_classifier` of 13-01 trains it (same loop, data, steps, batch and schedule for all; only
# the learning rate is per method, at the value each method is usually run with); then the
# harness measures six things:
#
# 1. dev accuracy, per seed;
# 2. trainable parameters and their fraction of the model's parameters;
# 3. median training step time, and 4. peak training memory (the loop's own meters);
# 5. inference latency on a fixed batch, after merging wherever the method allows it (round-robin
#    timing, `median_forward_seconds` of Appendix A);
# 6. the adapter's size on disk: the trained tensors written with safetensors (the whole model
#    for full fine-tuning; the head alone for feature extraction).
#
# Every method trains the same new head (pooler and classifier), so the comparison is about what
# each method adds to the head.

# %%
#| export
from safetensors.torch import save_file

from ftbook.base_models import load_encoder_classifier
from ftbook.full_finetuning import evaluate_accuracy, freeze_backbone, train_classifier
from ftbook.lora import apply_lora, encoder_target_modules, merge_lora
from ftbook.prompt_tuning import PrefixTuning, PromptTuning
from ftbook.qlora import NF4Linear, merge_lora_nf4, quantize_model
from ftbook.workbench import count_parameters

METHODS = ("feature extraction", "full fine-tuning", "LoRA", "QLoRA", "IA3", "prompt tuning",
           "prefix tuning")
MERGEABLE = {"feature extraction": True, "full fine-tuning": True, "LoRA": True, "QLoRA": True,
             "IA3": True, "prompt tuning": False, "prefix tuning": False}


@dataclass(frozen=True)
class AdapterConfig:
    """Budget of chapter 13-04 (one per profile); the encoder and data are 13-01's."""

    n_train: int | None
    n_dev: int | None
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    lrs: tuple[tuple[str, float], ...]  # (method, learning rate)
    lora_rank: int
    lora_alpha: float
    num_virtual_tokens: int
    prefix_projection: int
    latency_repeats: int
    bank_steps: int  # steps of each task adapter in the merging experiments


def _lrs(full: float, head: float, lora: float, ia3: float, prompt: float, prefix: float
         ) -> tuple[tuple[str, float], ...]:
    return (("feature extraction", head), ("full fine-tuning", full), ("LoRA", lora),
            ("QLoRA", lora), ("IA3", ia3), ("prompt tuning", prompt), ("prefix tuning", prefix))


ADAPTER_CONFIGS = {
    "smoke": AdapterConfig(n_train=64, n_dev=32, steps=3, batch_size=8, seeds=(0, 1),
                           lrs=_lrs(5e-5, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3), lora_rank=4,
                           lora_alpha=8, num_virtual_tokens=4, prefix_projection=16,
                           latency_repeats=3, bank_steps=3),
    "tiny": AdapterConfig(n_train=4000, n_dev=400, steps=35, batch_size=16, seeds=(0, 1),
                          lrs=_lrs(1e-4, 3e-3, 3e-3, 1e-2, 1e-2, 1e-3), lora_rank=8,
                          lora_alpha=16, num_virtual_tokens=8, prefix_projection=256,
                          latency_repeats=20, bank_steps=30),
    "full": AdapterConfig(n_train=None, n_dev=None, steps=400, batch_size=32, seeds=(0, 1),
                          lrs=_lrs(2e-5, 1e-3, 5e-4, 3e-3, 3e-2, 5e-4), lora_rank=8,
                          lora_alpha=16, num_virtual_tokens=20, prefix_projection=512,
                          latency_repeats=40, bank_steps=300),
}


def prepare_method(method: str, model: nn.Module, cfg: AdapterConfig,
                   head_modules: Sequence[str] = ("classifier", "score", "pooler")) -> nn.Module:
    """The trainable model of `method` built on a freshly loaded encoder classifier."""
    if method == "feature extraction":
        return freeze_backbone(model, tuple(head_modules))
    if method == "full fine-tuning":
        return model.requires_grad_(True)
    if method in ("LoRA", "QLoRA"):
        if method == "QLoRA":
            quantize_model(model, skip=tuple(head_modules))
        return apply_lora(model, encoder_target_modules(model, "attention q,v"), cfg.lora_rank,
                          cfg.lora_alpha, modules_to_save=list(head_modules))
    if method == "IA3":
        targets, feedforward = encoder_ia3_targets(model)
        return apply_ia3(model, targets, feedforward, modules_to_save=head_modules)
    if method == "prompt tuning":
        return PromptTuning(model, cfg.num_virtual_tokens, init="vocab",
                            modules_to_save=head_modules)
    if method == "prefix tuning":
        return PrefixTuning(model, cfg.num_virtual_tokens, projection_dim=cfg.prefix_projection,
                            modules_to_save=head_modules)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def for_inference(method: str, model: nn.Module) -> nn.Module:
    """The deployable form: merged where the method allows (LoRA, QLoRA into a float base, IA3),
    the folded prefix table for prefix tuning, the model itself otherwise."""
    if method == "LoRA":
        return merge_lora(model)
    if method == "QLoRA":  # merge into the dequantized base, then dequantize the other layers
        return dequantize_model(merge_lora_nf4(model))
    if method == "IA3":
        return merge_ia3(model)
    if method == "prefix tuning" and model.transform is not None:
        return model.fold()
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every remaining `NF4Linear` (13-03) by a plain `nn.Linear` holding its
    dequantized weight, in place: the float model a QLoRA adapter is deployed on."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            plain = nn.Linear(module.in_features, module.out_features,
                              bias=module.bias is not None, dtype=dtype,
                              device=module.quantized.packed.device)
            with torch.no_grad():
                plain.weight.copy_(module.dequantized(torch.float32))
                if module.bias is not None:
                    plain.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, plain)
    return model


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that training changed (those that require grad), detached on the CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def bytes_on_disk(state: dict[str, torch.Tensor]) -> int:
    """Size of `state` written as a safetensors file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter.safetensors"
        save_file(state, str(path))
        return path.stat().st_size


def run_method(method: str, profile: str, cfg: AdapterConfig, train: Any, dev: Any, seed: int,
               device: torch.device, max_len: int = 64, bf16: bool = True
               ) -> tuple[dict[str, Any], nn.Module]:
    """Train one method with one seed; return its measurements and its deployable model."""
    lrs = dict(cfg.lrs)
    if method not in lrs:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    model, tokenizer = load_encoder_classifier(profile, seed=seed)
    total = count_parameters(model)
    model = prepare_method(method, model, cfg).to(device)
    start = time.perf_counter()
    log = train_classifier(model, tokenizer, train, steps=cfg.steps, lr=lrs[method],
                           batch_size=cfg.batch_size, max_len=max_len, seed=seed,
                           weight_decay=0.0, bf16=bf16, desc=f"{method}, seed {seed}")
    train_seconds = time.perf_counter() - start
    if method == "prefix tuning":
        model.fold()  # the adapter is the table of eq. (5.3); the MLP is discarded
    state = trained_state(model)  # before merging folds the adapter away
    deployable = for_inference(method, model)
    result = {"method": method, "seed": seed,
              "dev accuracy": evaluate_accuracy(deployable, tokenizer, dev, max_len, bf16=bf16),
              "trainable params": log.trainable_parameters,
              "trainable %": 100 * log.trainable_parameters / total,
              "s / step": log.median_step_seconds,
              "peak memory MiB": log.peak_memory_bytes / 2**20,
              "adapter MiB": bytes_on_disk(state) / 2**20,
              "train s": train_seconds}
    return result, deployable.eval()


# %% [markdown]
# ### Running the harness
#
# Every method, every seed of the profile. The deployable model of the first seed is kept for
# the latency measurement, which runs afterwards round-robin over all methods and the untouched
# base model, so that they see the same machine state.

# %%
import matplotlib.pyplot as plt
import numpy as np

from ftbook.data import load_sst2, subset
from ftbook.full_finetuning import FT_CONFIGS, collate
from ftbook.workbench import median_forward_seconds, show_figure

cfg = pick(PROFILE, ADAPTER_CONFIGS)
ft_cfg = pick(PROFILE, FT_CONFIGS)
train_ds = subset(load_sst2("train"), cfg.n_train, seed=SEED, stratify_by="label")
dev_ds = subset(load_sst2("validation"), cfg.n_dev, seed=SEED, stratify_by="label")

results, deployables = [], {}
for method in METHODS:
    for seed in cfg.seeds:
        result, model = run_method(method, PROFILE, cfg, train_ds, dev_ds, seed, DEVICE,
                                   max_len=ft_cfg.max_len, bf16=ft_cfg.bf16)
        results.append(result)
        if seed == cfg.seeds[0]:
            deployables[method] = model
        else:
            del model
runs = pd.DataFrame(results)

base_model, tokenizer = load_encoder_classifier(PROFILE, seed=SEED)
latency_batch = collate(tokenizer, dev_ds[:32]["sentence"], dev_ds[:32]["label"], ft_cfg.max_len)
latency_batch = {k: v.to(DEVICE) for k, v in latency_batch.items() if k != "labels"}
latency = median_forward_seconds({"base model": base_model.to(DEVICE), **deployables},
                                 latency_batch, cfg.latency_repeats)

# %%
summary = runs.groupby("method", sort=False).agg(
    accuracy=("dev accuracy", "mean"), accuracy_std=("dev accuracy", "std"),
    trainable=("trainable params", "first"), trainable_pct=("trainable %", "first"),
    step=("s / step", "median"), memory=("peak memory MiB", "median"),
    adapter=("adapter MiB", "first"))
summary["latency"] = [latency[m] / latency["base model"] for m in summary.index]
summary["mergeable"] = [MERGEABLE[m] for m in summary.index]
summary.columns = [f"dev accuracy (mean of {len(cfg.seeds)})", "std over seeds",
                   "trainable params", "trainable %", "s / step", "peak memory MiB",
                   "adapter MiB", "latency vs base", "mergeable"]
show_table(summary, "comparison", CHAPTER, floatfmt="{:.4g}")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
acc = summary.iloc[:, 0]
for method, row in summary.iterrows():
    axes[0].errorbar(row["trainable params"], row.iloc[0], yerr=row["std over seeds"],
                     marker="o", capsize=3)
    axes[0].annotate(method, (row["trainable params"], row.iloc[0]), fontsize=7,
                     textcoords="offset points", xytext=(4, 4))
    axes[1].scatter(row["s / step"], row.iloc[0])
    axes[1].annotate(method, (row["s / step"], row.iloc[0]), fontsize=7,
                     textcoords="offset points", xytext=(4, 4))
axes[0].set(xscale="log", xlabel="trainable parameters (log)", ylabel="SST-2 dev accuracy",
            title=f"Accuracy vs parameters ({cfg.steps} steps, mean ± std over seeds)")
axes[1].set(xlabel="median seconds per training step", ylabel="SST-2 dev accuracy",
            title="Accuracy vs training cost")
show_figure(fig, "comparison", CHAPTER)

# %%
best = acc.idxmax()
ratio_full = summary.loc["full fine-tuning", "trainable params"] / summary.loc["IA3", "trainable params"]
print(f"best mean accuracy: {best} {acc[best]:.3f} ± {summary.loc[best, 'std over seeds']:.3f}; "
      f"worst: {acc.idxmin()} {acc.min():.3f}")
print(f"IA3 trains {summary.loc['IA3', 'trainable params']:,} parameters, "
      f"{ratio_full:,.0f}x fewer than full fine-tuning, and reaches {acc['IA3']:.3f}")
print(f"adapter files: from {summary['adapter MiB'].min():.3f} MiB "
      f"({summary['adapter MiB'].idxmin()}) to {summary['adapter MiB'].max():.1f} MiB "
      f"({summary['adapter MiB'].idxmax()})")

STEP_MARGIN, LATENCY_MARGIN = 1.2, 1.1  # timing ratios closer to 1 than these are noise here


def timing_verdict(ratio: float, margin: float) -> str:
    """How a timing ratio reads against a noise margin: beyond it either way, or within it."""
    if ratio > margin:
        return "slower"
    if ratio < 1 / margin:
        return "faster"
    return "within noise"


lora_step = summary.loc["LoRA", "s / step"]
step_ratio = summary["s / step"] / lora_step
print(f"training step time vs LoRA's {lora_step:.3f} s (beyond {STEP_MARGIN}x either way counts "
      "as a difference): " + ", ".join(
          f"{m} {step_ratio[m]:.2f}x ({timing_verdict(step_ratio[m], STEP_MARGIN)})"
          for m in summary.index if m != "LoRA"))
print(f"inference latency vs base (beyond {LATENCY_MARGIN}x either way counts as a difference): "
      + ", ".join(f"{m} {summary.loc[m, 'latency vs base']:.2f}x "
                  f"({timing_verdict(summary.loc[m, 'latency vs base'], LATENCY_MARGIN)})"
                  for m in summary.index))
merged_adapters = ["LoRA", "QLoRA", "IA3"]
off_base = [m for m in merged_adapters
            if timing_verdict(summary.loc[m, "latency vs base"], LATENCY_MARGIN) != "within noise"]
print(f"merged adapters ({', '.join(merged_adapters)}): " + (
    f"latency within {LATENCY_MARGIN}x of the base's" if not off_base
    else f"latency beyond {LATENCY_MARGIN}x of the base's: {', '.join(off_base)}"))

# %% [markdown]
# ### The decision table
#
# The rules below are fixed in code; the choices come out of this run's table. "Within noise of
# the best" means a mean accuracy no more than two standard deviations (the median over methods
# of the seed-to-seed standard deviation, at least half a point) below the best mean. Memory,
# time and size picks name the runners-up within 5%, which a rerun on a busy machine can swap.

# %%
mean_acc, std = summary.iloc[:, 0], summary["std over seeds"]
noise = max(0.005, float(std.median())) if len(cfg.seeds) > 1 else 0.01
tied = summary[mean_acc >= mean_acc.max() - 2 * noise]


def pick_row(frame, column, need, reason):
    """The method with the smallest `column` in `frame`, naming any within 5% of it (a margin
    that this machine's timing and memory noise can cross)."""
    choice = frame[column].idxmin()
    row = summary.loc[choice]
    close = [m for m in frame.index if m != choice and frame.loc[m, column] <= 1.05 * row[column]]
    also = f" (within 5%: {', '.join(close)})" if close else ""
    return {"if you need": need, "choose": choice + also,
            "measured": f"{reason(row)}; accuracy {row.iloc[0]:.3f}"}


decisions = [
    {"if you need": "the highest accuracy, whatever the cost", "choose": mean_acc.idxmax(),
     "measured": f"best mean accuracy {mean_acc.max():.3f} ± {std[mean_acc.idxmax()]:.3f}"},
    pick_row(tied, "adapter MiB", "near-best accuracy and the smallest file per task",
             lambda r: f"{r['adapter MiB']:.3f} MiB on disk"),
    pick_row(tied, "peak memory MiB", "near-best accuracy in the least training memory",
             lambda r: f"peak {r['peak memory MiB']:.0f} MiB"),
    pick_row(tied, "s / step", "near-best accuracy in the least training time",
             lambda r: f"{r['s / step']:.3f} s per step"),
]
head_params = summary.loc["feature extraction", "trainable params"]  # every method trains it
adapters_only = summary.drop(index=["feature extraction", "full fine-tuning"])
fewest = (adapters_only["trainable params"] - head_params).idxmin()
decisions.append({"if you need": "the fewest parameters beyond the new head", "choose": fewest,
                  "measured": f"{summary.loc[fewest, 'trainable params'] - head_params:,.0f} "
                              f"adapter parameters; accuracy {mean_acc[fewest]:.3f}"})
mergeable = adapters_only[adapters_only["mergeable"]]
best_mergeable = mergeable.iloc[:, 0].idxmax()
decisions.append({"if you need": "an adapter that merges away (no inference overhead)",
                  "choose": best_mergeable,
                  "measured": f"merged latency {summary.loc[best_mergeable, 'latency vs base']:.2f}x "
                              f"the base; accuracy {mean_acc[best_mergeable]:.3f}"})
shared = summary.loc[["prompt tuning", "prefix tuning"]]
best_shared = shared.iloc[:, 0].idxmax()
decisions.append({"if you need": "many tasks in one batch on one frozen base (per-row adapters)",
                  "choose": best_shared,
                  "measured": f"base weights untouched, {summary.loc[best_shared, 'adapter MiB']:.3f} MiB "
                              f"per task; accuracy {mean_acc[best_shared]:.3f}, latency "
                              f"{summary.loc[best_shared, 'latency vs base']:.2f}x"})
decision_table = pd.DataFrame(decisions).set_index("if you need")
show_table(decision_table, "decision_table", CHAPTER)
print(f"noise band: 2 x {noise:.3f}; within it of the best: {', '.join(tied.index)}")

# %% [markdown]
# ## Many adapters on one base: switching, merging, stacking
#
# A deployed base model usually serves several tasks. We need a second task on the same encoder:
# *is this sentence from a movie review?* Positives are SST-2 training sentences, negatives are
# sentences of the Wikipedia and C4 excerpts, lower-cased and split around punctuation like
# SST-2's, so that casing and spacing do not give the answer away. The excerpts' documents are
# split between training and dev (four to one) so that no non-review sentence is in both, and
# the task is as large as SST-2's split or as the non-review sentences allow, whichever is
# smaller (the full SST-2 training split has more sentences than the excerpts).

# %%
#| export
import random
import re

from datasets import Dataset


def _sst2_style(sentence: str) -> str:
    sentence = re.sub(r"([.,!?;:()\"])", r" \1 ", sentence.lower())
    sentence = re.sub(r"'(s|re|ve|ll|d|t|m)\b", r" '\1", sentence)
    return " ".join(sentence.split())


def non_review_sentences(split: str) -> list[str]:
    """The distinct sentences of the Wikipedia and C4 excerpts, normalised like SST-2 and of 5 to
    40 words, for one `split`: the documents alternate, four to "train" and the fifth to
    "validation", and a validation sentence that also occurs in a training document is dropped,
    so the two splits share no sentence."""
    from ftbook.data import load_text_corpus  # lazy: ftbook.data imports `datasets`

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    pools: dict[str, dict[str, None]] = {"train": {}, "validation": {}}  # ordered sets
    for index, document in enumerate(load_text_corpus("wiki") + load_text_corpus("c4")):
        part = "validation" if index % 5 == 4 else "train"
        for sentence in re.split(r"(?<=[.!?])\s+", document):
            if 5 <= len(sentence.split()) <= 40:
                pools[part][_sst2_style(sentence)] = None
    if split == "train":
        return list(pools["train"])
    return [s for s in pools["validation"] if s not in pools["train"]]


def review_detection_task(n: int, seed: int, split: str = "train") -> Any:
    """A balanced binary task of `n` rows (`sentence`, `label`) from one `split`: 1 for an SST-2
    sentence of that split, 0 for a sentence of `non_review_sentences(split)`, normalised like
    SST-2 (lower case, punctuation split off)."""
    from ftbook.data import load_sst2  # lazy: ftbook.data imports `datasets`

    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    rng = random.Random(seed)
    reviews = list(load_sst2(split)["sentence"])
    pool = non_review_sentences(split)
    if len(pool) < n - n // 2 or len(reviews) < n // 2:
        raise ValueError(f"review_detection_task({n}, split={split!r}) needs {n - n // 2} "
                         f"non-review and {n // 2} review sentences; the corpora have "
                         f"{len(pool)} and {len(reviews)}: ask for at most "
                         f"{2 * min(len(pool), len(reviews))} rows")
    positives = rng.sample(reviews, n // 2)
    negatives = rng.sample(pool, n - n // 2)
    rows = [(s, 1) for s in positives] + [(s, 0) for s in negatives]
    rng.shuffle(rows)
    return Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [y for _, y in rows]})


# %%
task_b_sizes = {}
for split, wanted in (("train", len(train_ds)), ("validation", len(dev_ds))):
    available = len(non_review_sentences(split))  # the task is balanced: half are non-reviews
    task_b_sizes[split] = min(wanted, 2 * available)
task_b_train = review_detection_task(task_b_sizes["train"], seed=SEED, split="train")
task_b_dev = review_detection_task(task_b_sizes["validation"], seed=SEED + 1, split="validation")
assert not set(task_b_train["sentence"]) & set(task_b_dev["sentence"]), "train and dev overlap"
print(f"review detection: {len(task_b_train):,} training and {len(task_b_dev):,} dev rows; "
      f"examples: {task_b_dev[0]['sentence'][:60]!r} ({task_b_dev[0]['label']}), "
      f"{task_b_dev[1]['sentence'][:60]!r} ({task_b_dev[1]['label']})")

# %% [markdown]
# ### An adapter bank: switching tasks without reloading the base
#
# One copy of the base carries LoRA layers; the bank keeps each task's trained tensors (LoRA
# factors and head) and *activates* a task by copying its tensors into place. Switching costs a
# copy of one adapter's tensors (the cell prints their size beside the whole model's); loading a
# fresh model costs the whole checkpoint.

# %%
#| export
class AdapterBank:
    """Several trained adapters (their trained tensors) over one model; `activate(name)` copies
    one of them into the model's parameters in place."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapters: dict[str, dict[str, torch.Tensor]] = {}
        self.active: str | None = None

    def add(self, name: str, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = sorted(set(state) - set(params))
        if missing:
            raise KeyError(f"adapter {name!r} has tensors the model lacks: {missing[:3]}")
        self.adapters[name] = {k: v.detach().cpu().clone() for k, v in state.items()}

    @torch.no_grad()
    def activate(self, name: str) -> nn.Module:
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; the bank holds {sorted(self.adapters)}")
        params = dict(self.model.named_parameters())
        for key, value in self.adapters[name].items():
            params[key].copy_(value)
        self.active = name
        return self.model


# %%
from ftbook.workbench import Timer

LORA_HEAD = ["pooler", "classifier"]


def lora_model(rank=cfg.lora_rank, alpha=cfg.lora_alpha):
    model, tok = load_encoder_classifier(PROFILE, seed=SEED)
    apply_lora(model, encoder_target_modules(model, "attention q,v"), rank, alpha,
               modules_to_save=LORA_HEAD)
    return model.to(DEVICE), tok


def train_task(model, data, label):
    train_classifier(model, tokenizer, data, steps=cfg.bank_steps, lr=dict(cfg.lrs)["LoRA"],
                     batch_size=cfg.batch_size, max_len=ft_cfg.max_len, seed=SEED,
                     weight_decay=0.0, bf16=ft_cfg.bf16, desc=label)
    return trained_state(model)


def accuracy(model, data):
    return evaluate_accuracy(model, tokenizer, data, ft_cfg.max_len, bf16=ft_cfg.bf16)


model_a, _ = lora_model()
state_a = train_task(model_a, train_ds, "task A: sentiment")
acc_a = accuracy(model_a, dev_ds)
model_b, _ = lora_model()
state_b = train_task(model_b, task_b_train, "task B: review detection")
acc_b = accuracy(model_b, task_b_dev)

bank = AdapterBank(lora_model()[0])
bank.add("sentiment", state_a)
bank.add("review detection", state_b)
switch_times = []
for name in ["sentiment", "review detection"] * 5:
    with Timer() as timer:
        bank.activate(name)
    switch_times.append(timer.seconds)
with Timer() as reload_timer:  # the alternative: load the base again, then the adapter
    fresh_bank = AdapterBank(lora_model()[0])
    fresh_bank.add("sentiment", state_a)
    fresh_bank.activate("sentiment")
del fresh_bank
bank_a = accuracy(bank.activate("sentiment"), dev_ds)
bank_b = accuracy(bank.activate("review detection"), task_b_dev)
# exact: the same weights through the same computation, in one process
assert bank_a == acc_a and bank_b == acc_b, "activating an adapter must reproduce its model"
adapter_kib = bytes_on_disk(state_a) / 2**10
whole_mib = summary.loc["full fine-tuning", "adapter MiB"]  # the whole model's safetensors file
print(f"sentiment {acc_a:.3f}, review detection {acc_b:.3f}, the same through the bank; a switch "
      f"takes {1e3 * float(np.median(switch_times)):.2f} ms (adapter {adapter_kib:.0f} KiB, the "
      f"whole model {whole_mib:.1f} MiB) against {reload_timer.seconds:.2f} s to load a fresh "
      f"base with its LoRA layers")

# %% [markdown]
# ### Merging two LoRA adapters
#
# Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089) adds weighted updates:
# $\Delta W = \sum_i w_i \Delta W_i = \sum_i w_i s_i B_i A_i$ with $s_i = \alpha_i / r_i$. As a
# LoRA adapter, the exact sum needs rank $\sum_i r_i$: stack the factors,
#
# \begin{equation}
# A = \begin{bmatrix} w_1 s_1 A_1 \\ w_2 s_2 A_2 \end{bmatrix}, \quad
# B = \begin{bmatrix} B_1 & B_2 \end{bmatrix}, \quad
# B A = w_1 s_1 B_1 A_1 + w_2 s_2 B_2 A_2 ,
# \tag{4.3}
# \end{equation}
#
# which is PEFT's `add_weighted_adapter(..., combination_type="cat")`. Its `"linear"` type keeps
# the rank $r$ by adding the factors separately, $A = \sum_i \sqrt{w_i s_i} A_i$ and
# $B = \sum_i \sqrt{w_i s_i} B_i$, and so
#
# $$
# B A = \sum_i w_i s_i B_i A_i + \sum_{i \ne j} \sqrt{w_i s_i w_j s_j}\, B_i A_j ,
# \tag{4.4}
# $$
#
# the wanted sum plus cross terms $B_i A_j$ that neither adapter ever trained. (Both new adapters
# have $\alpha = r$, scaling 1.) We implement both, check them against PEFT on the two trained
# adapters, and measure what each costs in accuracy.

# %%
#| export
import math


def combine_lora(states: Sequence[dict[str, torch.Tensor]], scalings: Sequence[float],
                 weights: Sequence[float], how: str = "cat") -> dict[str, torch.Tensor]:
    """Merge LoRA adapters (their `lora_A`/`lora_B` tensors) into one adapter of scaling 1:
    eq. (4.3) for `how="cat"` (exact, rank sum r_i), eq. (4.4) for `how="linear"` (rank r,
    with cross terms), as PEFT's `add_weighted_adapter`. Other tensors (heads) are dropped."""
    if how not in ("cat", "linear"):
        raise ValueError(f"how must be 'cat' or 'linear', got {how!r}")
    if not len(states) == len(scalings) == len(weights) >= 1:
        raise ValueError("states, scalings and weights must have the same, non-zero length")
    keys_a = [k for k in states[0] if k.endswith("lora_A")]
    merged: dict[str, torch.Tensor] = {}
    for key_a in keys_a:
        key_b = key_a[: -len("lora_A")] + "lora_B"
        factors_a = [s[key_a].float() for s in states]  # each (r_i, in)
        factors_b = [s[key_b].float() for s in states]  # each (out, r_i)
        if how == "cat":
            merged[key_a] = torch.cat([w * c * a for a, c, w in zip(factors_a, scalings, weights,
                                                                    strict=True)])
            merged[key_b] = torch.cat(factors_b, dim=1)
        else:
            if len({a.shape[0] for a in factors_a}) != 1:
                raise ValueError("how='linear' needs adapters of equal rank; use 'cat'")
            roots = [math.sqrt(abs(w * c)) for c, w in zip(scalings, weights, strict=True)]
            signs = [1.0 if w * c >= 0 else -1.0 for c, w in zip(scalings, weights, strict=True)]
            merged[key_a] = sum(s * r * a for s, r, a in zip(signs, roots, factors_a, strict=True))
            merged[key_b] = sum(r * b for r, b in zip(roots, factors_b, strict=True))
    return merged


# %%
from peft import LoraConfig

scaling = cfg.lora_alpha / cfg.lora_rank
peft_base = load_encoder_classifier(PROFILE, seed=SEED)[0]
peft_targets = encoder_target_modules(peft_base, "attention q,v")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    peft_bank = get_peft_model(peft_base, LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=peft_targets), "sentiment")
    peft_bank.add_adapter("review detection", LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=peft_targets))
peft_params = dict(peft_bank.named_parameters())
with torch.no_grad():
    for adapter, state in (("sentiment", state_a), ("review detection", state_b)):
        for key, value in state.items():
            if key.endswith(("lora_A", "lora_B")):
                peft_params[f"base_model.model.{key}.{adapter}.weight"].copy_(value)

merge_rows, merge_gaps, merge_bounds = [], {}, {}
largest_factor = max(v.abs().max().item() for state in (state_a, state_b)
                     for k, v in state.items() if k.endswith(("lora_A", "lora_B")))
for how, weights in (("cat", (1.0, 1.0)), ("cat", (0.5, 0.5)), ("linear", (1.0, 1.0))):
    name = f"{how} {weights[0]:g}/{weights[1]:g}"
    peft_name = f"{how}_{weights[0]:g}_{weights[1]:g}".replace(".", "p")  # no dots in PEFT names
    merged_state = combine_lora([state_a, state_b], [scaling, scaling], weights, how)
    peft_bank.add_weighted_adapter(["sentiment", "review detection"], list(weights), peft_name,
                                   combination_type=how)
    peft_params = dict(peft_bank.named_parameters())
    merge_gaps[name] = max(
        (peft_params[f"base_model.model.{k}.{peft_name}.weight"] - v).abs().max().item()
        for k, v in merged_state.items())
    # an entry of either merge is a sum of at most two products c_i X_i, each coefficient made
    # of w_i, s_i and perhaps a square root (three roundings): by the bound of Appendix A each
    # implementation is within gamma_5 of sum_i |c_i| max|X|, the two within twice that
    coefficients = sum(max(w * scaling, (w * scaling) ** 0.5, 1.0) for w in weights)
    merge_bounds[name] = 2 * rounding_bound(6, coefficients * largest_factor)
    rank = merged_state[next(iter(merged_state))].shape[0]
    merged_model, _ = lora_model(rank=rank, alpha=rank)  # scaling 1
    with torch.no_grad():
        params = dict(merged_model.named_parameters())
        for key, value in merged_state.items():
            params[key].copy_(value)
        for key, value in state_a.items():  # task A's head
            if not key.endswith(("lora_A", "lora_B")):
                params[key].copy_(value)
        acc_merged_a = accuracy(merged_model, dev_ds)
        for key, value in state_b.items():  # task B's head
            if not key.endswith(("lora_A", "lora_B")):
                params[key].copy_(value)
        acc_merged_b = accuracy(merged_model, task_b_dev)
    merge_rows.append({"merge": name, "rank": rank, "sentiment accuracy": acc_merged_a,
                       "review-detection accuracy": acc_merged_b,
                       "max |A, B ours - PEFT|": merge_gaps[name]})
merging = pd.DataFrame([{"merge": "separate adapters (bank)", "rank": cfg.lora_rank,
                         "sentiment accuracy": acc_a, "review-detection accuracy": acc_b,
                         "max |A, B ours - PEFT|": float("nan")}, *merge_rows]).set_index("merge")
show_table(merging, "lora_merging", CHAPTER, floatfmt="{:.4g}")
assert all(merge_gaps[k] <= merge_bounds[k] for k in merge_gaps), \
    "our merge must equal PEFT's add_weighted_adapter"

# %% [markdown]
# The merges equal PEFT's tensors to float rounding (last column). The accuracy columns are what
# the merge costs on each task against the separate adapters in the first row:

# %%
for name, row in merging.iloc[1:].iterrows():
    print(f"{name:>12}: sentiment {100 * (row['sentiment accuracy'] - acc_a):+.1f} points, "
          f"review detection {100 * (row['review-detection accuracy'] - acc_b):+.1f} points")

# %% [markdown]
# ### Stacking: a task adapter over another adapter
#
# Stacking trains a new adapter on top of a base that already carries one: fold the first adapter
# into the weights ($W_0 + \Delta W_B$), then train a second LoRA for the next task over it, so
# that serving both needs $W_0 + \Delta W_B + \Delta W_{A'}$. For LoRA the order does not matter
# at inference (the updates add), but it does in training: $\Delta W_{A'}$ is learned in the
# presence of $\Delta W_B$. We stack the sentiment adapter over the review-detection one and
# measure both tasks: does the stacked sentiment adapter learn as well as on the clean base, and
# does the stack still detect reviews (with task B's head)?

# %%
stacked, _ = lora_model()
bank_b = AdapterBank(stacked)
bank_b.add("review detection", state_b)
bank_b.activate("review detection")
merge_lora(stacked)  # W0 + ΔW_B, plain linear layers again
apply_lora(stacked, encoder_target_modules(stacked, "attention q,v"), cfg.lora_rank,
           cfg.lora_alpha, modules_to_save=LORA_HEAD)
stacked.to(DEVICE)
state_a_stacked = train_task(stacked, train_ds, "task A over task B")
stack_a = accuracy(stacked, dev_ds)
with torch.no_grad():
    params = dict(stacked.named_parameters())
    for key, value in state_b.items():  # task B's head on the stacked model
        if not key.endswith(("lora_A", "lora_B")):
            params[key].copy_(value)
stack_b = accuracy(stacked, task_b_dev)
stacking = pd.DataFrame({
    "sentiment accuracy": {"A on the clean base": acc_a, "A' stacked over B": stack_a},
    "review-detection accuracy": {"A on the clean base": float("nan"), "A' stacked over B": stack_b},
})
stacking.loc["B alone", "review-detection accuracy"] = acc_b
show_table(stacking, "stacking", CHAPTER, floatfmt="{:.3f}")
print(f"stacked sentiment adapter: {stack_a:.3f} vs {acc_a:.3f} on the clean base; review "
      f"detection with both adapters active: {stack_b:.3f} vs {acc_b:.3f} with B alone "
      f"({100 * (stack_b - acc_b):+.1f} points)")

# %% [markdown]
# ## Discussion
#
# **Accuracy.** The comparison table is the answer at this budget, on this encoder: read the
# first two columns together, since a difference smaller than the seed-to-seed spread is not a
# difference. The printed noise band lists the methods that cannot be told apart from the best.
# Two caveats shape the numbers. Every method got the same number of steps, which favours the
# methods that learn fastest per step (full fine-tuning and LoRA with their larger capacity),
# not those that would win at convergence; and each used one learning rate "as usually run",
# untuned here. Prompt tuning in particular is known to need long training and to be weak on
# small models: Lester et al. (2021, Fig. 1) show it closing the gap to full fine-tuning only
# as T5 reaches billions of parameters. A 22M-parameter encoder is the worst case for it.
#
# **Cost.** Parameters, memory and time per step do not move together. IA3 and prompt tuning train
# the fewest numbers, but a training step still runs the full backward pass through the frozen
# network (the gradient must reach the first layer for a prompt, every block for IA3): fewer
# trainable numbers save the optimizer's work, not the backward pass. Prompt and prefix tuning
# also make every layer process $P$ extra positions, feature extraction skips the backward pass
# through the backbone, and QLoRA dequantizes every weight in every step (13-03). The step-time
# line printed under the comparison table says which differences this run resolves: each
# method's median step time as a ratio to LoRA's, called faster or slower only beyond 1.2x either
# way. The methods were trained one after another on a shared machine, so each median also
# carries the load of its own minutes and the costs every method shares at this model size; the
# line can therefore disagree with the mechanisms above, and where it does, this run does not
# show that mechanism's cost (a quiet machine or the `full` profile is the test). Training
# memory follows the activations plus the optimizer state, and the latter is what
# parameter-efficient methods remove. Adapter files are dominated by the new head in this
# experiment (the head is $d^2 + 3d$ numbers for the pooler and classifier, more than any of the
# adapters): a deployment that shares one head across tasks would see the adapters' own sizes.
#
# **Inference.** Merged methods (LoRA, QLoRA merged into a float base, IA3) are plain models at
# inference, with the base's architecture and arithmetic. The latency lines compare each model
# with the base, timed round-robin in the same minutes, and call a ratio a difference only beyond
# 1.1x; the last of them says whether the merged adapters stay within that margin. Prompt and
# prefix tuning cannot merge: they lengthen every attention computation by $P$ positions. In
# exchange the base weights stay untouched, so one batch can mix tasks, each row with its own
# prompt, which no weight-space method can do without a separate forward pass per adapter.
#
# **Merging.** `cat` merging is exact task arithmetic, and with weights $1/1$ it is the same
# model as stacking the two updates; halving the weights halves each update. `linear` merging adds
# cross terms that no adapter was trained for, eq. (4.4). The merging table measures what each
# costs on both tasks. Stacking measures interference from the other side: the second adapter is
# trained with the first one in place, and the review-detection task is then evaluated with both
# active.
#
# ## Pitfalls
#
# - **Comparing at different budgets.** A method that "wins" with more steps, a tuned learning
#   rate or a larger batch has not won. Fix the budget, vary seeds, report the spread.
# - **Forgetting the head.** Every method here trains a new head; an adapter saved without it
#   reloads with a random classifier (13-02 saves it; so does `trained_state`).
# - **IA3 on the wrong module.** The FFN vector scales the *input* of the down-projection. In
#   BERT, a bare `output.dense` also matches the attention output; PEFT's default BERT targets
#   include both. `encoder_ia3_targets` names the FFN layers explicitly.
# - **Merging a quantized base in place.** Folding LoRA into 4-bit weights changes outputs
#   (13-03); deploy QLoRA on the dequantized base, as `for_inference` does, or keep it unmerged.
# - **`linear` is not task arithmetic.** PEFT's `combination_type="linear"` adds factors, not
#   updates; use `cat` (or `svd` to compress it back to rank $r$) for the exact sum.
# - **Timing on a shared CPU.** Ratios near 1 are noise here: the chapter calls a latency
#   different only beyond 1.1x and a step time only beyond 1.2x; we time latency round-robin so
#   that no model is favoured by the machine's state.
#
# ## Summary
#
# - IA3 rescales keys, values and the FFN activation with three vectors per block, eq. (4.1);
#   it starts as the identity, merges into the weights, eq. (4.2), and matches PEFT exactly.
# - One harness trained seven methods with the same data, steps and seeds and measured accuracy,
#   parameters, step time, memory, latency and adapter size; the decision table is computed from
#   that run.
# - Several adapters share one base: switching copies one adapter's tensors (their size is
#   printed beside the whole model's), where reloading the base copies the whole checkpoint.
#   Merging two LoRA adapters exactly needs the concatenated rank, eq. (4.3); PEFT's `linear`
#   merge adds cross terms, eq. (4.4).
#
# ## Exercises
#
# 1. Tune the learning rate of each method on a held-out slice of the training set (three values
#    each) and rerun the harness. Which decisions in the table change?
# 2. Double the number of steps. Which methods gain most? Plot accuracy against steps for each.
# 3. Implement PEFT's `svd` combination (truncate the `cat` merge back to rank $r$ by SVD) and add
#    it to the merging table. How much of the `cat` merge's accuracy survives at rank $r$?
# 4. Serve a mixed batch with prompt tuning: rows of both tasks in one forward pass, each with its
#    own soft prompt. What does the batch cost against two separate batches?
#
# ## References
#
# - Liu, Tam, Muqeeth, Mohta, Huang, Bansal & Raffel (2022), *Few-Shot Parameter-Efficient
#   Fine-Tuning is Better and Cheaper than In-Context Learning*, arXiv:2205.05638, §3.3 (IA3).
# - Lester, Al-Rfou & Constant (2021), *The Power of Scale for Parameter-Efficient Prompt Tuning*,
#   arXiv:2104.08691, Fig. 1.
# - Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi & Farhadi (2023), *Editing Models
#   with Task Arithmetic*, arXiv:2212.04089.
# - Hu et al. (2021), *LoRA*, arXiv:2106.09685; Dettmers et al. (2023), *QLoRA*,
#   arXiv:2305.14314; Li & Liang (2021), *Prefix-Tuning*, arXiv:2101.00190.
# - PEFT documentation: `IA3Config`, `LoraModel.add_weighted_adapter`.

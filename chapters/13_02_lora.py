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
# (lora)=
# # 13-02 LoRA from scratch
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`full-finetuning`, 1-06 (matrix factorisation and the SVD).
# **Reading time:** ~10 min; the tiny profile runs in about 4 minutes on 2 CPU cores.
# **You will build** `ftbook.lora`: `LoRALinear`, `apply_lora`, `merge_lora`, and PEFT-format
# `save_adapter`/`load_adapter`; checked against PEFT to float64 precision, and measured against
# full fine-tuning and feature extraction from 13-01.
# ```
#
# {ref}`full-finetuning` ended with a dilemma: full fine-tuning gets the accuracy, feature
# extraction gets the low cost and zero forgetting. Low-Rank Adaptation (LoRA; Hu et al. 2021,
# arXiv:2106.09685) takes most of both. It freezes the pretrained weights and learns the weight
# *update* of a chosen set of matrices as a product of two thin matrices.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_02_lora"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## The low-rank update
#
# Take a frozen linear map $h = W_0 x$ with $W_0 \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$.
# LoRA adds a trainable update of rank at most $r$:
#
# $$
# h = W_0 x + \Delta W x = W_0 x + \frac{\alpha}{r} B A x, \qquad
# B \in \mathbb{R}^{d_\text{out} \times r},\; A \in \mathbb{R}^{r \times d_\text{in}},\;
# r \ll \min(d_\text{in}, d_\text{out}).
# \tag{2.1}
# $$
#
# **Initialisation.** $A$ is random (Kaiming-uniform, as in PEFT) and $B = 0$, so $\Delta W = 0$
# and the adapted model starts *exactly* at the pretrained one: fine-tuning begins from the
# model's behaviour, not from a perturbation of it.
#
# **Gradients.** With $g = \partial \mathcal{L} / \partial h$ for one input,
#
# $$
# \frac{\partial \mathcal{L}}{\partial B} = \frac{\alpha}{r}\, g\, (A x)^\top, \qquad
# \frac{\partial \mathcal{L}}{\partial A} = \frac{\alpha}{r}\, B^\top g\, x^\top .
# \tag{2.2}
# $$
#
# At initialisation $B = 0$, so $A$ receives no gradient on the first step and only $B$ moves;
# from then on both do. Only $r (d_\text{in} + d_\text{out})$ numbers per matrix are trained,
# and only they need gradients and optimizer state.
#
# **The scaling $\alpha / r$.** Hu et al. (§4.1) fix $\alpha$ and vary $r$; dividing by $r$ keeps
# the size of the initial update steps roughly independent of $r$ under Adam, so a learning rate
# tuned at one rank carries over to others. $\alpha$ then acts as a learning-rate multiplier for
# the adapter, which we measure below.
#
# **Merging.** After training, $W = W_0 + \frac{\alpha}{r} B A$ is an ordinary matrix of the
# original shape, so a merged model has no extra inference cost at all.
#
# We check (2.1) and (2.2) on a random layer before building anything: the rank of $\Delta W$, the
# zero update at initialisation, and the two gradients against autograd.

# %%
import torch

torch.manual_seed(0)
d_in, d_out, r, alpha = 12, 10, 3, 6.0
W0, x = torch.randn(d_out, d_in), torch.randn(d_in)
A = torch.randn(r, d_in, requires_grad=True)
B = (0.1 * torch.randn(d_out, r)).requires_grad_()  # non-zero so that both gradients are non-trivial
h = W0 @ x + (alpha / r) * B @ (A @ x)  # eq. (2.1)
g = torch.randn(d_out)
(g @ h).backward()  # L = g . h, so dL/dh = g
grad_B = (alpha / r) * torch.outer(g, A.detach() @ x)  # eq. (2.2)
grad_A = (alpha / r) * torch.outer(B.detach().T @ g, x)
print("rank of (alpha/r) B A:", torch.linalg.matrix_rank((alpha / r) * B.detach() @ A.detach()).item())
print("max |dL/dB - (2.2)|:", (B.grad - grad_B).abs().max().item(),
      " max |dL/dA - (2.2)|:", (A.grad - grad_A).abs().max().item())
# Autograd and (2.2) evaluate the same sums in float32, perhaps in other orders. An entry of
# dL/dB is a d_in-term dot product times two factors, one of dL/dA a d_out-term one: by the
# bound of Appendix A each evaluation is within gamma_{n+2} of the entry's sum of absolute
# terms (the same formula on absolute values), so the two differ by at most twice that.
from ftbook.workbench import rounding_bound  # noqa: E402

abs_B = (alpha / r) * torch.outer(g.abs(), A.detach().abs() @ x.abs())
abs_A = (alpha / r) * torch.outer(B.detach().abs().T @ g.abs(), x.abs())
assert ((B.grad - grad_B).abs() <= 2 * rounding_bound(d_in + 3, abs_B)).all()
assert ((A.grad - grad_A).abs() <= 2 * rounding_bound(d_out + 3, abs_A)).all()

# %% [markdown]
# ## Why a low rank suffices
#
# Aghajanyan et al. (2020, arXiv:2012.13255) showed that fine-tuning a pretrained model can be
# done in a random subspace of a few hundred to a few thousand dimensions (the task's *intrinsic
# dimension*) with most of the full-fine-tuning accuracy; Hu et al. conjectured that the weight
# update itself has a low *intrinsic rank*. We can look directly. Chapter 13-01 kept the update
# $\Delta W = W_\text{ft} - W_0$ of its full fine-tune: `encoder_runs` returns it with 13-01's
# two runs, read from 13-01's cache (or made first, when 13-01 has not run in this profile). By
# the Eckart–Young theorem, the best rank-$r$ approximation of $\Delta W$ in the Frobenius norm is
# its truncated SVD, and it keeps the fraction
#
# $$
# E(r) = \frac{\sum_{i \le r} \sigma_i^2}{\sum_i \sigma_i^2}
# \tag{2.3}
# $$
#
# of the update's energy ($\sigma_i$ the singular values in decreasing order). A random matrix of
# the same shape spreads its energy nearly evenly, so we plot both.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ftbook.full_finetuning import encoder_runs
from ftbook.workbench import show_figure, show_table

ft_runs = encoder_runs(PROFILE, DEVICE, SEED)  # 13-01's runs, from its cache (or made now)
delta_w = ft_runs.delta_w
print(f"{len(delta_w)} weight updates from 13-01, e.g. {next(iter(delta_w))}: "
      f"{tuple(next(iter(delta_w.values())).shape)}")

# %%
ranks_shown = [1, 2, 4, 8, 16, 32, 64]
energy_rows = {}
spectra = {}
for kind in ("query", "value", "intermediate.dense"):
    names = [n for n in delta_w if n.endswith(kind)]
    energies = []
    for name in names:
        sigma = torch.linalg.svdvals(delta_w[name])
        energies.append(torch.cumsum(sigma**2, 0) / (sigma**2).sum())
        spectra.setdefault(kind, sigma / sigma[0])
    mean_energy = torch.stack(energies).mean(0)
    energy_rows[kind] = {f"r={k}": float(mean_energy[min(k, len(mean_energy)) - 1])
                         for k in ranks_shown}
random_sigma = torch.linalg.svdvals(torch.randn_like(delta_w[names[0]]))
random_energy = torch.cumsum(random_sigma**2, 0) / (random_sigma**2).sum()
energy_rows["random matrix"] = {f"r={k}": float(random_energy[min(k, len(random_energy)) - 1])
                                for k in ranks_shown}
energy = pd.DataFrame(energy_rows).T
show_table(energy, "delta_w_energy", CHAPTER)

# the Eckart-Young check: the error of the rank-r truncation is the tail of the spectrum. In
# float64 the SVD is backward stable (LAPACK: error a modest multiple of max(m, n) u ||ΔW||,
# about 1e-13 ||ΔW|| here), so 1e-9 ||ΔW|| leaves a margin of 10^4 and more.
example = delta_w[next(n for n in delta_w if n.endswith("query"))].double()
U, S, Vh = torch.linalg.svd(example, full_matrices=False)
k = min(8, len(S))
truncation_error = torch.linalg.norm(example - U[:, :k] @ torch.diag(S[:k]) @ Vh[:k])
assert abs(truncation_error - S[k:].pow(2).sum().sqrt()) <= 1e-9 * torch.linalg.norm(example)

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for kind, sigma in spectra.items():
    ax.semilogy(sigma.numpy(), label=f"ΔW {kind} (layer 0)")
ax.semilogy((random_sigma / random_sigma[0]).numpy(), ls=":", c="gray", label="random matrix")
ax.set(xlabel="index i", ylabel="σ_i / σ_1", title="Singular values of the full fine-tune's update")
ax.legend(fontsize=8)
show_figure(fig, "delta_w_spectrum", CHAPTER)

# %% [markdown]
# The update of a real fine-tune is far from a random matrix: a few directions carry most of its
# energy, and the spectrum falls off quickly after them. The table quantifies how much a rank-$r$
# LoRA could represent *of this particular update*. It is a suggestive rather than a complete
# argument: LoRA does not have to reproduce full fine-tuning's $\Delta W$, only to find *some*
# low-rank update that solves the task, which the experiments below test directly.
#
# ## Implementation
#
# `LoRALinear` wraps an existing `nn.Linear`, freezes it, and adds `lora_A` and `lora_B` as in
# (2.1). The forward pass computes the low-rank path as `(x @ A^T) @ B^T` (two thin matmuls,
# $r(d_\text{in} + d_\text{out})$ multiply-adds per token) rather than forming $BA$ ($d_\text{in}
# d_\text{out}$). The order of operations is PEFT's, so the two agree to the last bit on the same
# weights.

# %%
#| export
"""LoRA from scratch: `LoRALinear`, `apply_lora`, `merge_lora`, and PEFT-format adapter files.

Defined in chapter 13-02 (`chapters/13_02_lora.py`). Hu et al. 2021, *LoRA: Low-Rank Adaptation of
Large Language Models*, arXiv:2106.09685, eq. (3) and §4.1. The file format is PEFT's
(`adapter_config.json` + `adapter_model.safetensors`), so adapters move between the two.
"""
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = base(x) + (alpha/r) B A x.

    Parameters `lora_A` (rank, in_features), Kaiming-uniform, and `lora_B` (out_features, rank),
    zero, so the module starts equal to `base` (eq. 2.1). `dropout` applies to the input of the
    low-rank path only.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        limit = min(base.in_features, base.out_features)
        if not 1 <= rank <= limit:
            raise ValueError(f"rank must be between 1 and min(in_features, out_features) = "
                             f"{limit} for a {base.in_features}->{base.out_features} layer; "
                             f"got rank={rank}")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha / r) B A, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        low_rank = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A),
                                        self.lora_B)  # (..., rank) -> (..., out)
        return self.base(x) + low_rank * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


# %% [markdown]
# `apply_lora` walks the model, replaces every `nn.Linear` whose qualified name ends with one of
# `target_modules` (PEFT's matching rule: the whole name, or a suffix starting at a dot), and
# freezes everything else except the modules named in `modules_to_save` (a classification head
# that is trained from scratch must be trained and saved with the adapter). A target that matches
# nothing is an error that lists the linear layers the model has, since a typo would otherwise
# train a model with no adapter at all.

# %%
#| export
def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for `target_modules`: `target` is the whole qualified `name` or a suffix of it
    that starts at a dot."""
    return name == target or name.endswith("." + target)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Qualified names of every `nn.Linear` in `model` (candidates for `target_modules`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def apply_lora(model: nn.Module, target_modules: list[str] | tuple[str, ...], rank: int,
               alpha: float, dropout: float = 0.0,
               modules_to_save: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """Replace the targeted `nn.Linear` layers of `model` by `LoRALinear`, in place.

    Every other parameter is frozen, except those of modules named in `modules_to_save` (matched
    like targets), which stay trainable. Raises ValueError for a target that matches no linear
    layer (listing the available ones) and for an invalid rank. Returns `model`.
    """
    if not target_modules:
        raise ValueError("target_modules is empty: name at least one linear layer")
    linear_names = linear_layer_names(model)
    for target in target_modules:
        if not any(matches_target(n, target) for n in linear_names):
            suffixes = sorted({n.split(".")[-1] for n in linear_names})
            raise ValueError(f"target module {target!r} matches no nn.Linear in "
                             f"{type(model).__name__}; linear layers are named like {suffixes} "
                             f"(e.g. {linear_names[:3]})")
    model.requires_grad_(False)
    for name in linear_names:
        if any(matches_target(name, t) for t in target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    for name, module in model.named_modules():
        if name and any(matches_target(name, m) for m in modules_to_save):
            module.requires_grad_(True)
    model.lora_config = {"target_modules": list(target_modules), "rank": rank, "alpha": alpha,
                         "dropout": dropout, "modules_to_save": list(modules_to_save)}
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The `LoRALinear` modules of `model` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold (alpha/r) B A into each base weight and put the plain `nn.Linear` back, in place.

    Only plain `nn.Linear` bases are merged; a quantized base (13-03) raises TypeError, since
    adding ΔW to a 4-bit weight needs a dequantize-merge-requantize that changes outputs.
    """
    for name, layer in lora_layers(model).items():
        if type(layer.base) is not nn.Linear:
            raise TypeError(f"{name}: cannot merge into a {type(layer.base).__name__} base; "
                            "for a 4-bit base use ftbook.qlora.merge_lora_nf4")
        with torch.no_grad():
            layer.base.weight += layer.delta_weight().to(layer.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base)
    return model


# %% [markdown]
# ### PEFT-format adapter files
#
# An adapter is small; the base is large and shared. PEFT stores an adapter as two files:
# `adapter_config.json` (the method, the rank, $\alpha$, the targets, the modules to save, the base
# model's name) and `adapter_model.safetensors` with keys
# `base_model.model.<module path>.lora_A.weight`, `...lora_B.weight`, and the saved modules under
# their own paths (`base_model.model.classifier.weight`). Writing exactly that makes our adapters
# loadable by `peft.PeftModel.from_pretrained` and PEFT's adapters loadable by us. Forgetting the
# head is a classic bug: the adapter reloads, the freshly initialised head does not match, and
# accuracy drops to chance.

# %%
#| export
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."
SEQ_CLS_HEADS = ("classifier", "score")  # the head names PEFT's SEQ_CLS task saves


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA factors and saved modules of `model`, with PEFT's key names."""
    config = model.lora_config
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    for name, module in model.named_modules():
        if name and any(matches_target(name, m) for m in config["modules_to_save"]):
            for key, tensor in module.state_dict().items():
                state[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach()
    return {k: v.contiguous().cpu() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: str,
                 task_type: str | None = "SEQ_CLS") -> Path:
    """Write `model`'s adapter in PEFT's format (config + safetensors) into folder `path`."""
    config = model.lora_config
    if task_type == "SEQ_CLS":
        heads = [n for n, _ in model.named_modules() if n.split(".")[-1] in SEQ_CLS_HEADS]
        saved = config["modules_to_save"]
        if heads and not any(matches_target(h, m) for h in heads for m in saved):
            raise ValueError(
                f"a SEQ_CLS adapter must carry the classification head {heads[0]!r}: PEFT's "
                "PeftModelForSequenceClassification adds the head to modules_to_save and then "
                f"needs its weights in the file. Pass modules_to_save=[{heads[0]!r}] to "
                "apply_lora (and train the head), or save with task_type=None")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_config = {
        "peft_type": "LORA", "task_type": task_type, "r": config["rank"],
        "lora_alpha": config["alpha"], "lora_dropout": config["dropout"],
        "target_modules": sorted(config["target_modules"]),
        "modules_to_save": config["modules_to_save"] or None,
        "base_model_name_or_path": str(base_model_name_or_path), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    save_file(adapter_state_dict(model), str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Apply the PEFT-format LoRA adapter in folder `path` to `model` (in place) and load its
    weights. Every tensor in the file must find its place, and every LoRA factor must be filled."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern",
                               "alpha_pattern", "layers_to_transform") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{path}: unsupported LoRA options {unsupported} (this loader handles "
                         "one rank and alpha for all targets, no bias, no DoRA/rsLoRA)")
    targets = config["target_modules"]
    if isinstance(targets, str):
        raise ValueError(f"{path}: regex target_modules {targets!r} are not supported")
    apply_lora(model, targets, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
               modules_to_save=config.get("modules_to_save") or ())
    stored = load_file(str(path / "adapter_model.safetensors"))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in stored.items()}
    own = {n: p for n, p in model.named_parameters()} | dict(model.named_buffers())
    renamed = {}
    for key, tensor in state.items():
        local = key.replace(".lora_A.weight", ".lora_A").replace(".lora_B.weight", ".lora_B")
        if local not in own:
            raise KeyError(f"{path}: tensor {key!r} has no place in {type(model).__name__}")
        renamed[local] = tensor
    missing = [n for n in own if (n.endswith((".lora_A", ".lora_B"))) and n not in renamed]
    if missing:
        raise KeyError(f"{path}: no weights for {missing[:3]}{'...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for name, tensor in renamed.items():
            own[name].copy_(tensor)
    return model


# %% [markdown]
# Quick checks on a tiny random layer: the wrapped layer starts equal to the base, merging gives the
# same outputs, and bad configurations fail with messages that say what to do.

# %%
base = torch.nn.Linear(16, 8)
lora = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8)
lora.base.load_state_dict(base.state_dict())
x = torch.randn(5, 16)  # (batch, in_features)
assert torch.equal(lora(x), base(x)), "B = 0: the adapted layer starts at the base"
torch.nn.init.normal_(lora.lora_B)
merged_weight = base.weight + lora.delta_weight()
# Both sides evaluate x W0^T + b + (alpha/r) (x A^T) B^T with at most 16 + 4 + 4 roundings along
# any path (a 16-term dot product, the rank-4 sum, the scale, the bias, the merge or the final
# add): each is within gamma_24 of the sum of absolute terms, the two within twice that.
with torch.no_grad():
    abs_terms = (x.abs() @ base.weight.abs().T + base.bias.abs()
                 + lora.scaling * (x.abs() @ lora.lora_A.abs().T) @ lora.lora_B.abs().T)
    merge_gap = (lora(x) - torch.nn.functional.linear(x, merged_weight, base.bias)).abs()
assert (merge_gap <= 2 * rounding_bound(25, abs_terms)).all()
for bad in ({"rank": 0}, {"rank": 9}):
    try:
        LoRALinear(base, alpha=8, **bad)
    except ValueError as err:
        print(f"rank={bad['rank']}: {err}")
try:
    apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["query"], rank=2, alpha=4)
except ValueError as err:
    print(err)

# %% [markdown]
# ## Parity with PEFT
#
# The reference is PEFT's `get_peft_model` with a `LoraConfig` of the same rank, $\alpha$, targets
# and saved head. We load the same encoder twice, apply PEFT to one copy and `apply_lora` to the
# other, copy our $A$ and a *non-zero* random $B$ into PEFT's layers (with $B = 0$ every LoRA
# implementation agrees trivially), and compare in float64, dropout off. Two implementations of
# the same network differ only by rounding; in float64 ($u = 2^{-53}$) the bound of Appendix A,
# summed along a few dozen matmuls of a few thousand terms on logits of size 10, stays below
# $10^{-10}$, so a tolerance of $10^{-9}$ holds on every machine and is still five orders of
# magnitude below what a wrong scaling, a missing bias or a misplaced adapter changes ($B$ of
# size 0.02 moves logits by more than $10^{-4}$). In float32 the same comparison would need a
# tolerance a few thousand times $2^{-24}$, with no margin to spare on a bigger model.
#
# 1. logits on a batch of real sentences (max abs difference, tolerance $10^{-9}$);
# 2. the number of trainable parameters;
# 3. the gradients of every LoRA factor and of the head after one backward pass, and the logits
#    after one AdamW step on both;
# 4. our `save_adapter` files loaded by `PeftModel.from_pretrained` into a fresh base.

# %%
#| export
PARITY_TOLERANCE = 1e-9  # max |ours - PEFT| in float64: rounding below 1e-10 (see the text)


def peft_parameter_name(name: str, modules_to_save: Sequence[str] = ()) -> str:
    """Our parameter name -> the name of the same tensor in a PEFT model (adapter "default").
    PEFT wraps each saved module whole (`ModulesToSaveWrapper`): a parameter inside
    `modules_to_save` moves below the *saved module's* path, e.g. RoBERTa's
    `classifier.dense.weight` -> `classifier.modules_to_save.default.dense.weight`."""
    if name.endswith((".lora_A", ".lora_B")):
        return f"{PEFT_PREFIX}{name}.default.weight"
    parts = name.split(".")
    for end in range(1, len(parts)):  # the shortest enclosing module that is saved
        module = ".".join(parts[:end])
        if any(matches_target(module, m) for m in modules_to_save):
            return f"{PEFT_PREFIX}{module}.modules_to_save.default.{'.'.join(parts[end:])}"
    raise KeyError(f"{name} is neither a LoRA factor nor inside modules_to_save "
                   f"{list(modules_to_save)}")


def copy_lora_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    """Copy every trainable tensor of `ours` (LoRA factors, saved modules) into `peft_model`."""
    peft_params = dict(peft_model.named_parameters())
    saved = ours.lora_config["modules_to_save"]
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if param.requires_grad:
                target = peft_parameter_name(name, saved)
                if target not in peft_params:
                    raise KeyError(f"the PEFT model has no parameter {target} (for {name})")
                peft_params[target].copy_(param)


# %%
import copy

import peft

from ftbook.base_models import encoder_name, load_encoder_classifier
from ftbook.data import load_sst2, subset
from ftbook.workbench import count_parameters

dev_ds = subset(load_sst2("validation"), None, seed=SEED, stratify_by="label")
parity_targets = ["query", "value"]
base_model, tokenizer = load_encoder_classifier(PROFILE, seed=SEED)
base_model.eval()
ours = apply_lora(copy.deepcopy(base_model), parity_targets, rank=8, alpha=16,
                  modules_to_save=["classifier"])
for layer in lora_layers(ours).values():
    torch.nn.init.normal_(layer.lora_B, std=0.02)
reference = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(
    r=8, lora_alpha=16, lora_dropout=0.0, target_modules=parity_targets,
    modules_to_save=["classifier"]))
ours.eval()
batch = tokenizer(dev_ds["sentence"][:16], padding=True, return_tensors="pt")
labels = torch.tensor(dev_ds["label"][:16])
# the comparison runs on float64 copies: `ours` (float32) is timed below
ours64 = copy.deepcopy(ours).double()
reference = reference.double()
copy_lora_into_peft(ours64, reference)
reference.eval()
with torch.no_grad():
    diff_logits = (ours64(**batch).logits - reference(**batch).logits).abs().max().item()
n_ours = count_parameters(ours64, trainable_only=True)
n_peft = sum(p.numel() for p in reference.parameters() if p.requires_grad)

# one backward pass and one AdamW step on both
losses = {}
for name, model in (("ours", ours64), ("peft", reference)):
    model.eval()  # gradients flow in eval mode too; dropout off so both see the same network
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()
    losses[name] = loss.item()
grads_ours = {k: p.grad for k, p in ours64.named_parameters() if p.requires_grad}
grads_peft = {k: p.grad for k, p in reference.named_parameters() if p.requires_grad}
diff_grads = max((grads_ours[k] - grads_peft[peft_parameter_name(k, ['classifier'])]).abs().max().item()
                 for k in grads_ours)
for model in (ours64, reference):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer.step()
    model.eval()
with torch.no_grad():
    diff_after_step = (ours64(**batch).logits - reference(**batch).logits).abs().max().item()
parity = pd.DataFrame({"value": [diff_logits, n_ours, n_peft, diff_grads, diff_after_step]},
                      index=["max |logits ours - PEFT|", "trainable params (ours)",
                             "trainable params (PEFT)", "max |grad ours - PEFT|",
                             "max |logits| diff after one AdamW step"])
show_table(parity, "peft_parity", CHAPTER, floatfmt="{:.3g}")
assert diff_logits < PARITY_TOLERANCE and diff_after_step < PARITY_TOLERANCE
assert n_ours == n_peft and diff_grads < PARITY_TOLERANCE

# %% [markdown]
# Our adapter file, read by PEFT: we save `ours` with `save_adapter`, load it with
# `PeftModel.from_pretrained` into a fresh copy of the base, and compare outputs; then the reverse,
# PEFT's own `save_pretrained` files read by our `load_adapter`.

# %%
import tempfile

with tempfile.TemporaryDirectory() as tmp:  # float64, as above
    save_adapter(ours64, f"{tmp}/ours", encoder_name(PROFILE))
    from_ours = peft.PeftModel.from_pretrained(copy.deepcopy(base_model).double(),
                                               f"{tmp}/ours").eval()
    reference.save_pretrained(f"{tmp}/peft")
    from_peft = load_adapter(copy.deepcopy(base_model).double(), f"{tmp}/peft").eval()
    with torch.no_grad():
        expected = ours64(**batch).logits
        diff_peft_loads_ours = (from_ours(**batch).logits - expected).abs().max().item()
        diff_we_load_peft = (from_peft(**batch).logits - reference(**batch).logits).abs().max().item()
print(f"PEFT loads our adapter: max |diff| {diff_peft_loads_ours:.2e}; "
      f"we load PEFT's: max |diff| {diff_we_load_peft:.2e}")
assert diff_peft_loads_ours < PARITY_TOLERANCE and diff_we_load_peft < PARITY_TOLERANCE

# %% [markdown]
# ### Merged equals unmerged, and runs as fast as the base
#
# Merging folds (2.1) into the weights. The merged model must give the same logits (checked on
# the float64 copies, to the parity tolerance) and run as fast as the base model, up to this machine's timing
# noise of a few percent, since it *is* a base model with different numbers in it. The unmerged model adds two thin matmuls per adapted layer,
# $r(d_\text{in} + d_\text{out})$ multiply-adds per token against $d_\text{in} d_\text{out}$;
# the cell prints what that is for the whole model, to compare with the timing noise.

# %%
from ftbook.workbench import Timer, linear_weight_count, median_forward_seconds

merged = merge_lora(copy.deepcopy(ours)).eval()
assert not lora_layers(merged), "merge_lora leaves plain nn.Linear layers"
with torch.no_grad():  # the check in float64, where rounding is far below PARITY_TOLERANCE
    diff_merged = (merge_lora(copy.deepcopy(ours64)).eval()(**batch).logits
                   - ours64(**batch).logits).abs().max().item()
print(f"max |merged - unmerged| logits (float64): {diff_merged:.2e}")
assert diff_merged < PARITY_TOLERANCE


extra = sum(layer.rank * (layer.in_features + layer.out_features)
            for layer in lora_layers(ours).values())
print(f"unmerged LoRA adds {extra:,} multiply-adds per token to the encoder's "
      f"{linear_weight_count(base_model):,} ({100 * extra / linear_weight_count(base_model):.2f}%)")
repeats = pick(PROFILE, {"smoke": 3, "tiny": 40, "full": 60})
latency = pd.DataFrame({"median forward s": median_forward_seconds(
    {"base model": base_model, "LoRA merged": merged, "LoRA unmerged": ours}, batch, repeats)})
latency["vs base"] = latency["median forward s"] / latency.loc["base model", "median forward s"]
show_table(latency, "merged_latency", CHAPTER)
del reference, from_ours, from_peft, merged, ours64

# %% [markdown]
# ## Experiments
#
# All runs use 13-01's training loop (`train_classifier`), data, batch size and number of steps
# on the profile's encoder; only the trainable parameters change. The head (pooler and
# classifier, as in 13-01's feature extraction) is trained alongside the adapter and saved with it.
# LoRA takes a larger learning rate than full fine-tuning, since the adapter starts at zero; with
# our short CPU budget we use the top of the usual $10^{-4}$ to $10^{-3}$ range or above (the
# configuration says which).

# %%
#| export
ENCODER_TARGETS = {
    "attention q,v": ("query", "value"),
    "all attention": ("query", "key", "value", "attention.output.dense"),
    "FFN": ("intermediate.dense", "FFN_OUTPUT"),
    "all linear": ("query", "key", "value", "attention.output.dense", "intermediate.dense",
                   "FFN_OUTPUT"),
}


def encoder_target_modules(model: nn.Module, placement: str) -> list[str]:
    """Target suffixes of `ENCODER_TARGETS[placement]` for a BERT/RoBERTa encoder; "FFN_OUTPUT"
    expands to each layer's `layer.<i>.output.dense` (the FFN's down-projection), which a bare
    `output.dense` would confuse with the attention output."""
    if placement not in ENCODER_TARGETS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {list(ENCODER_TARGETS)}")
    targets = []
    for target in ENCODER_TARGETS[placement]:
        if target == "FFN_OUTPUT":
            targets += [f"layer.{i}.output.dense" for i in range(model.config.num_hidden_layers)]
        else:
            targets.append(target)
    return targets


@dataclass(frozen=True)
class LoRAExperimentConfig:
    """Budget of the LoRA experiments (one per profile); data and batch come from 13-01."""

    rank: int  # the default adapter: attention q,v at this rank
    alpha: float
    lr: float
    sweep_steps: int  # steps of each sweep run (the headline run uses 13-01's steps)
    ranks: tuple[int, ...]
    alphas: tuple[float, ...]
    placements: tuple[str, ...]
    seeds: tuple[int, ...]
    speed_steps: int


LORA_CONFIGS = {
    "smoke": LoRAExperimentConfig(rank=4, alpha=8, lr=1e-3, sweep_steps=3, ranks=(1, 8),
                                  alphas=(2, 32), placements=("attention q,v", "all linear"),
                                  seeds=(0,), speed_steps=2),
    "tiny": LoRAExperimentConfig(rank=8, alpha=16, lr=3e-3, sweep_steps=40, ranks=(1, 8, 32),
                                 alphas=(4, 16, 64), placements=tuple(ENCODER_TARGETS),
                                 seeds=(0,), speed_steps=12),
    "full": LoRAExperimentConfig(rank=8, alpha=8, lr=5e-4, sweep_steps=300,
                                 ranks=(1, 2, 4, 8, 16, 64), alphas=(2, 8, 32),
                                 placements=tuple(ENCODER_TARGETS), seeds=(0, 1),
                                 speed_steps=30),
}


# %%
from ftbook.full_finetuning import FT_CONFIGS, evaluate_accuracy, train_classifier

LORA_HEAD = ["pooler", "classifier"]  # the same head as 13-01's feature extraction

cfg = pick(PROFILE, LORA_CONFIGS)
ft_cfg = pick(PROFILE, FT_CONFIGS)
train_ds, dev_ds = ft_runs.train, ft_runs.dev  # the SST-2 rows of 13-01's runs


def lora_run(placement: str, rank: int, alpha: float, steps: int, seed: int) -> dict:
    """Train a LoRA adapter (and the head) on the encoder; return accuracy and costs."""
    model, tok = load_encoder_classifier(PROFILE, seed=seed)
    apply_lora(model, encoder_target_modules(model, placement), rank, alpha,
               modules_to_save=LORA_HEAD)
    model.to(DEVICE)
    log = train_classifier(model, tok, train_ds, steps=steps, lr=cfg.lr,
                           batch_size=ft_cfg.batch_size, max_len=ft_cfg.max_len, seed=seed,
                           warmup_ratio=ft_cfg.warmup_ratio, weight_decay=0.0, bf16=ft_cfg.bf16,
                           desc=f"LoRA {placement} r={rank} a={alpha:g} seed {seed}")
    return {"placement": placement, "rank": rank, "alpha": alpha, "seed": seed, "steps": steps,
            "dev accuracy": evaluate_accuracy(model, tok, dev_ds, ft_cfg.max_len, bf16=ft_cfg.bf16),
            "trainable params": log.trainable_parameters,
            "lora params": sum(layer.lora_A.numel() + layer.lora_B.numel()
                               for layer in lora_layers(model).values()),
            "s / step (median)": log.median_step_seconds,
            "peak memory MiB": log.peak_memory_bytes / 2**20}


# %% [markdown]
# ### Where to apply LoRA
#
# Four placements at the default rank: the paper's choice (query and value projections), all four
# attention matrices, the feed-forward block, and every linear layer. More targets means more
# trainable parameters at the same rank, so the table also lists the count.

# %%
runs = []
for placement in cfg.placements:
    for seed in cfg.seeds:
        runs.append(lora_run(placement, cfg.rank, cfg.alpha, cfg.sweep_steps, seed))
placement_table = (pd.DataFrame(runs).groupby("placement", sort=False)
                   .agg({"dev accuracy": ["mean", "std"], "lora params": "first",
                         "s / step (median)": "mean"}))
placement_table.columns = ["dev accuracy", "std over seeds", "LoRA params", "s / step"]
if len(cfg.seeds) == 1:  # one seed in this profile: no spread to report
    placement_table = placement_table.drop(columns="std over seeds")
show_table(placement_table, "placement", CHAPTER)

# %% [markdown]
# ### Rank and trainable parameters
#
# The rank sweep uses the q,v placement with $\alpha$ fixed, as the paper does (§4.1): the
# scaling $\alpha / r$ then keeps the update size comparable across ranks.

# %%
rank_runs = [r for r in runs if r["placement"] == "attention q,v" and r["rank"] == cfg.rank]
for rank in cfg.ranks:
    if rank == cfg.rank:
        continue
    for seed in cfg.seeds:
        rank_runs.append(lora_run("attention q,v", rank, cfg.alpha, cfg.sweep_steps, seed))
rank_table = (pd.DataFrame(rank_runs).groupby("rank")
              .agg({"dev accuracy": ["mean", "std"], "lora params": "first"}))
rank_table.columns = ["dev accuracy", "std over seeds", "LoRA params"]
rank_table["std over seeds"] = rank_table["std over seeds"].fillna(0.0)
show_table(rank_table.drop(columns="std over seeds") if len(cfg.seeds) == 1 else rank_table,
           "rank_sweep", CHAPTER)

fig, ax = plt.subplots(figsize=(6.5, 3.5))
ax.errorbar(rank_table["LoRA params"], rank_table["dev accuracy"],
            yerr=rank_table["std over seeds"], marker="o", capsize=3, label="LoRA q,v")
for rank, row in rank_table.iterrows():
    ax.annotate(f"r={rank}", (row["LoRA params"], row["dev accuracy"]), textcoords="offset points",
                xytext=(4, -10), fontsize=8)
ax.set(xscale="log", xlabel="trainable LoRA parameters", ylabel="SST-2 dev accuracy",
       title=f"Rank sweep ({cfg.sweep_steps} steps)")
show_figure(fig, "rank_sweep", CHAPTER)

# %% [markdown]
# ### The scaling $\alpha$
#
# At a fixed rank and learning rate, $\alpha$ multiplies the adapter's contribution, and with
# Adam (whose steps are invariant to gradient scale) it effectively multiplies the learning rate of
# $\Delta W$: too small and the adapter barely moves in the step budget, too large and training
# becomes unstable.

# %%
alpha_runs = [r for r in rank_runs if r["rank"] == cfg.rank and r["alpha"] == cfg.alpha]
for alpha in cfg.alphas:
    if alpha == cfg.alpha:
        continue
    for seed in cfg.seeds:
        alpha_runs.append(lora_run("attention q,v", cfg.rank, alpha, cfg.sweep_steps, seed))
alpha_table = pd.DataFrame(alpha_runs).groupby("alpha").agg({"dev accuracy": ["mean", "std"]})
alpha_table.columns = ["dev accuracy", "std over seeds"]
alpha_table["alpha / r"] = alpha_table.index / cfg.rank
if len(cfg.seeds) == 1:
    alpha_table = alpha_table.drop(columns="std over seeds")
show_table(alpha_table, "alpha_sweep", CHAPTER)

# %% [markdown]
# ### LoRA against full fine-tuning and feature extraction
#
# The headline comparison uses 13-01's budget exactly (same steps, batch, data, warmup) for the
# default adapter, next to 13-01's two rows, from the same `encoder_runs` result.

# %%
headline = lora_run("attention q,v", cfg.rank, cfg.alpha, ft_cfg.steps, SEED)
ft_results = ft_runs.table()
total = ft_results.loc["full fine-tuning", "trainable params"]
comparison = pd.concat([ft_results[["dev accuracy", "trainable params", "s / step (median)",
                                    "peak memory MiB"]],
                        pd.DataFrame([{k: headline[k] for k in ("dev accuracy", "trainable params",
                                                                "s / step (median)",
                                                                "peak memory MiB")}],
                                     index=[f"LoRA q,v r={cfg.rank}"])])
comparison["trainable %"] = 100 * comparison["trainable params"] / total
show_table(comparison, "lora_vs_full", CHAPTER)

# %% [markdown]
# ## Speed: `apply_lora` against PEFT
#
# The same encoder, the same adapter (q,v at the default rank), the same batch; one full training
# step (forward, backward, AdamW) each, alternating between the two implementations so that both
# see the same machine state, median over several steps.

# %%
def timed_steps(model, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(steps + 1):
        with Timer(DEVICE) as t:
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=ft_cfg.bf16):
                logits = model(**speed_batch).logits
            torch.nn.functional.cross_entropy(logits.float(), speed_labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(t.seconds)
    return times[1:]  # the first step allocates optimizer state


speed_rows = train_ds[: ft_cfg.batch_size]
speed_batch = {k: v.to(DEVICE) for k, v in tokenizer(
    speed_rows["sentence"], padding=True, truncation=True, max_length=ft_cfg.max_len,
    return_tensors="pt").items()}
speed_labels = torch.tensor(speed_rows["label"], device=DEVICE)
ours_model = apply_lora(copy.deepcopy(base_model), parity_targets, cfg.rank, cfg.alpha,
                        modules_to_save=["classifier"]).to(DEVICE)
peft_model = peft.get_peft_model(copy.deepcopy(base_model), peft.LoraConfig(
    r=cfg.rank, lora_alpha=cfg.alpha, target_modules=parity_targets,
    modules_to_save=["classifier"])).to(DEVICE)
times = {"ours": [], "PEFT": []}
for _ in range(cfg.speed_steps):
    times["ours"] += timed_steps(ours_model, 1)
    times["PEFT"] += timed_steps(peft_model, 1)
speed = pd.DataFrame({"median s / step": {k: float(np.median(v)) for k, v in times.items()}})
speed_ratio = speed.loc["PEFT", "median s / step"] / speed.loc["ours", "median s / step"]
show_table(speed, "speed_vs_peft", CHAPTER)
print(f"PEFT step time / ours: {speed_ratio:.3f} (above 1: ours is faster)")

# %% [markdown]
# ## Discussion
#
# The numbers above come from this run; here is how to read them.
#
# - **Placement.** Adapting more matrices raises the trainable-parameter count at a fixed rank;
#   whether it pays depends on the task. On a short sentiment task the q,v placement is already
#   competitive, consistent with the paper's finding that adapting $W_q$ and $W_v$ at a small rank
#   beats adapting one matrix at a larger rank (Hu et al., Table 5). QLoRA (13-03) reports that
#   *all* linear layers are needed to match 16-bit full fine-tuning on instruction tuning, a harder,
#   generative task.
# - **Rank.** Accuracy saturates at a small rank: beyond it, more parameters buy little, as the
#   spectrum of $\Delta W$ suggested (most of the update's energy sits in a handful of directions).
# - **Alpha.** $\alpha$ behaves like a learning-rate knob for the adapter: in a short budget a
#   small $\alpha / r$ leaves the adapter too little movement, and a larger one moves it further
#   (until, at some point, training turns unstable). The paper's advice to fix $\alpha$ and tune
#   the learning rate instead follows from (2.1) and Adam's scale invariance.
# - **Against 13-01.** LoRA trains a fraction of a percent of the parameters and, since the
#   backbone is frozen, forgets nothing once the adapter is removed; its step is cheaper than full
#   fine-tuning's (no weight gradients for the frozen matrices, no optimizer state for them) but not
#   as cheap as feature extraction's, because the backward pass still runs through the whole network
#   to reach the adapters in the lower layers.
#
# For reference, the paper reports SST-2 dev accuracy 95.1 ± 0.2 with LoRA (0.3M parameters)
# against 94.8 with full fine-tuning (125M) on RoBERTa-base (Hu et al. 2021, Table 2), trained for
# 60 epochs; the `full` profile of this chapter runs that setting at a smaller budget.
#
# ## Pitfalls
#
# - **Unknown target modules.** Module names differ between architectures (`query` in BERT,
#   `q_proj` in Llama, `c_attn` in GPT-2). `apply_lora` refuses a target that matches nothing and
#   lists what exists; a silent no-op would train only the head.
# - **Suffix collisions.** In BERT, `output.dense` matches both the attention output and the FFN
#   down-projection; name the layer index (`layer.3.output.dense`) or use the attention prefix.
# - **The head is part of the adapter.** A classification head trained from scratch must be saved
#   with the adapter (`modules_to_save`); PEFT's `SEQ_CLS` task type adds it for you, ours asks you
#   to say so.
# - **Merging changes the dtype question.** Merging into a bfloat16 or 4-bit base rounds
#   $W_0 + \Delta W$ to the base's precision; for 4-bit bases see 13-03.
#
# ## Summary
#
# - LoRA learns $\Delta W = \frac{\alpha}{r} B A$ with $B = 0$ at the start, training
#   $r(d_\text{in} + d_\text{out})$ parameters per adapted matrix; gradients (2.2) and the merge are
#   checked numerically.
# - A full fine-tune's update has a fast-decaying spectrum, one reason a low rank suffices.
# - `LoRALinear`/`apply_lora`/`merge_lora` match PEFT to float64 precision (logits, gradients,
#   after an optimizer step), read and write PEFT's adapter files, and train at the speed ratio
#   measured above.
#
# ## Exercises
#
# 1. Initialise $B$ randomly and $A = 0$ instead. Does (2.2) still give a non-zero first update?
#    Which factor moves first?
# 2. Replace $\alpha / r$ by $\alpha / \sqrt{r}$ (rsLoRA, Kalajdzievski 2023, arXiv:2312.03732)
#    and repeat the rank sweep with a fixed learning rate. Which scaling keeps the accuracy stable
#    as $r$ grows?
# 3. Project 13-01's $\Delta W$ onto its top-$r$ singular directions, add it to $W_0$, and measure
#    dev accuracy. How does it compare with a LoRA adapter of the same rank trained from scratch?
#
# ## References
#
# - Hu et al. (2021), *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685,
#   eq. (3), §4.1, §7 (rank analysis), Tables 2 and 5.
# - Aghajanyan, Zettlemoyer & Gupta (2020), *Intrinsic Dimensionality Explains the Effectiveness of
#   Language Model Fine-Tuning*, arXiv:2012.13255.
# - Eckart & Young (1936), *The approximation of one matrix by another of lower rank*.
# - PEFT documentation, LoRA (`LoraConfig`, `PeftModel.from_pretrained`).

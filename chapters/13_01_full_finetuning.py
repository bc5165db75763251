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
# (full-finetuning)=
# # 13-01 Full fine-tuning vs feature extraction
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** 6-04 (transfer learning), 10-04 (pretrained transformers); {ref}`workbench`,
# {ref}`data`, {ref}`base-models`. **Reading time:** ~10 min; the tiny profile runs in about
# 3 minutes on 2 CPU cores.
# **You will build** `ftbook.full_finetuning`: one training loop for sequence classifiers that
# trains either the head alone (feature extraction) or every parameter (full fine-tuning), with
# warmup schedules and layer-wise (discriminative) learning rates; a measurement of catastrophic
# forgetting; and the weight update $\Delta W$ of a full fine-tune, kept for {ref}`lora`.
# ```
#
# A pretrained model can be adapted to a task in two classical ways. **Feature extraction**
# freezes the network and trains a new head on its representations. **Full fine-tuning** trains
# every weight, head and backbone together. The first is cheap and cannot damage the backbone;
# the second can reshape the representations for the task, at the price of a backward pass
# through the whole network, an optimizer state for every weight, and the risk of forgetting
# what pretraining taught. This chapter measures all of that on SST-2 sentiment classification.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_01_full_finetuning"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Two ways to adapt a classifier
#
# Write the classifier as a head $h_\phi$ on a backbone $f_\theta$ with pretrained weights
# $\theta_0$: $p(y \mid x) = \operatorname{softmax}(h_\phi(f_\theta(x)))$. Both methods minimise
# the cross-entropy on the task data $\mathcal{D}$,
#
# $$
# \mathcal{L}(\theta, \phi) = -\frac{1}{|\mathcal{D}|} \sum_{(x, y) \in \mathcal{D}}
# \log p_{\theta,\phi}(y \mid x),
# \tag{1.1}
# $$
#
# and differ in what they update: feature extraction solves $\min_\phi \mathcal{L}(\theta_0, \phi)$,
# full fine-tuning $\min_{\theta,\phi} \mathcal{L}(\theta, \phi)$ starting from $\theta_0$.
#
# **Cost.** With $N$ backbone weights in matmuls and $T$ tokens per step, a training step costs
# about $6NT$ FLOPs when every weight is trained (Appendix A, eq. A.3) but only the forward
# $2NT$ when the backbone is frozen: no gradient flows into it, so neither the weight gradients
# nor the input gradients of its layers are computed. Memory follows the same split. AdamW keeps
# two moments per trained weight, so full fine-tuning holds weights, gradients and two moment
# tensors: $4 \times 4 = 16$ bytes per parameter in float32, against 4 for a frozen backbone.
#
# **Forgetting.** Full fine-tuning moves $\theta$ wherever the task gradient points. Nothing in
# (1.1) asks the backbone to keep doing what it was pretrained for, so capabilities the task does
# not exercise can degrade: *catastrophic forgetting* (McCloskey & Cohen 1989; Kirkpatrick et al.
# 2017, arXiv:1612.00796). It grows with how far the weights move, which the learning rate and the
# number of steps control. Feature extraction is the zero-forgetting reference, since $\theta$ never
# changes.
#
# **Learning-rate strategies.** Two tricks from ULMFiT (Howard & Ruder 2018, arXiv:1801.06146,
# §3.2) limit the damage. *Warmup* ramps the learning rate from near zero, so the first updates,
# driven by a randomly initialised head whose gradients are large and uninformative, cannot
# wreck the backbone. *Discriminative* (layer-wise) learning rates give layer $\ell$ of $L$
#
# $$
# \eta_\ell = \eta \, \xi^{\,L + 1 - \ell}, \qquad 0 < \xi \le 1,
# \tag{1.2}
# $$
#
# with the embeddings at $\ell = 0$ and the head at $\ell = L + 1$, so the general-purpose lower
# layers move least. We check all three effects below.

# %% [markdown]
# ## Configuration
#
# Two backbones serve two questions. The task numbers (accuracy, cost) use the profile's encoder,
# all-MiniLM-L6-v2 in the tiny profile. Forgetting needs a backbone whose *original objective* we
# can still evaluate after fine-tuning, so it uses the profile's causal LM as a classifier
# (`LlamaForSequenceClassification`: the same transformer, a linear head on the last token). Its
# language-model head is tied to the input embeddings, so after fine-tuning we can put the
# fine-tuned backbone back under the LM head and measure perplexity on general English.

# %%
#| export
"""Full fine-tuning vs feature extraction: one classifier training loop (head-only or all
parameters), warmup schedules, layer-wise learning rates, and catastrophic-forgetting measurement.

Defined in chapter 13-01 (`chapters/13_01_full_finetuning.py`). References: Howard & Ruder 2018
(ULMFiT, arXiv:1801.06146) for warmup and discriminative learning rates; Kirkpatrick et al. 2017
(arXiv:1612.00796) for catastrophic forgetting.
"""
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ftbook.workbench import PeakMemory, check_finite, progress, seed_everything


@dataclass(frozen=True)
class FineTuneConfig:
    """Budget and hyperparameters of chapter 13-01 (one per profile)."""

    n_train: int | None  # SST-2 training rows (stratified subset; None = all)
    n_dev: int | None  # SST-2 dev rows (None = all 872)
    max_len: int  # tokens per sentence (SST-2 sentences are short)
    batch_size: int
    steps: int  # encoder runs: head-only and full fine-tuning
    lr_full: float
    lr_head: float
    warmup_ratio: float
    weight_decay: float
    lm_steps: int  # causal-LM classifier runs (forgetting, LR strategies)
    lm_lrs: tuple[float, ...]  # learning-rate sweep for the forgetting curve
    lm_eval_every: int
    lm_eval_texts: int  # general-English texts for perplexity
    lm_n_dev: int | None  # SST-2 dev rows for the LM runs' evaluations (None = all)
    llrd_decay: float  # xi of eq. (1.2)
    bf16: bool = True
    seed: int = 0


FT_CONFIGS = {
    "smoke": FineTuneConfig(n_train=64, n_dev=32, max_len=32, batch_size=8, steps=4, lr_full=5e-5,
                            lr_head=1e-3, warmup_ratio=0.25, weight_decay=0.01, lm_steps=4,
                            lm_lrs=(1e-4, 1e-3), lm_eval_every=2, lm_eval_texts=4, lm_n_dev=32,
                            llrd_decay=0.5),
    "tiny": FineTuneConfig(n_train=4000, n_dev=None, max_len=64, batch_size=16, steps=100,
                           lr_full=1e-4, lr_head=3e-3, warmup_ratio=0.1, weight_decay=0.01,
                           lm_steps=60, lm_lrs=(3e-4, 1e-3, 3e-3), lm_eval_every=30,
                           lm_eval_texts=16, lm_n_dev=400, llrd_decay=0.5),
    "full": FineTuneConfig(n_train=None, n_dev=None, max_len=66, batch_size=32, steps=1000,
                           lr_full=2e-5, lr_head=1e-3, warmup_ratio=0.06, weight_decay=0.01,
                           lm_steps=400, lm_lrs=(1e-5, 5e-5, 2e-4), lm_eval_every=100,
                           lm_eval_texts=200, lm_n_dev=None, llrd_decay=0.8),
}


# %% [markdown]
# ## Implementation
#
# ### Batches and evaluation
#
# Sentences are tokenized per batch and padded to the longest one in the batch (dynamic padding):
# SST-2 sentences average about 10 words, so padding to a fixed length would waste most of each
# step. Training draws batches with replacement from a seeded generator; evaluation walks the
# dev set once.

# %%
#| export
def collate(tokenizer: Any, sentences: list[str], labels: list[int], max_len: int) -> dict:
    """Tokenize a batch with dynamic padding: `input_ids`, `attention_mask` (batch, seq) and
    `labels` (batch,)."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
    batch["labels"] = torch.tensor(labels)
    return dict(batch)


def sample_batches(dataset: Any, tokenizer: Any, batch_size: int, max_len: int, steps: int,
                   seed: int) -> Iterator[dict]:
    """`steps` training batches drawn uniformly with replacement (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    sentences, labels = dataset["sentence"], dataset["label"]
    for _ in range(steps):
        index = torch.randint(0, len(sentences), (batch_size,), generator=generator).tolist()
        yield collate(tokenizer, [sentences[i] for i in index], [labels[i] for i in index],
                      max_len)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, tokenizer: Any, dataset: Any, max_len: int,
                      batch_size: int = 128, bf16: bool = False) -> float:
    """Accuracy of `model` on `dataset` (columns `sentence`, `label`)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(dataset), batch_size):
        rows = dataset[i:i + batch_size]
        batch = collate(tokenizer, rows["sentence"], rows["label"], max_len)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(**batch).logits  # (batch, num_labels)
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


# %% [markdown]
# ### What is trained: the head, or everything
#
# `freeze_backbone` keeps only the classification head trainable. Hugging Face classifiers
# name their head differently (`classifier` and `pooler` for BERT, `score` for Llama,
# `classifier` for RoBERTa), so the function takes the head's module names and refuses a name that
# matches nothing, rather than silently training the wrong set.

# %%
#| export
HEAD_MODULES = ("classifier", "score", "pooler")


def head_parameter_names(model: nn.Module, head_modules: tuple[str, ...] = HEAD_MODULES
                         ) -> list[str]:
    """Names of the parameters inside the classification head (modules named in `head_modules`)."""
    names = [n for n, _ in model.named_parameters()
             if any(part in head_modules for part in n.split("."))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no module named any of {head_modules}; "
                         "pass the head's module name explicitly")
    return names


def freeze_backbone(model: nn.Module, head_modules: tuple[str, ...] = HEAD_MODULES) -> nn.Module:
    """Feature extraction: every parameter frozen except the head's. Returns `model`."""
    head = set(head_parameter_names(model, head_modules))
    for name, p in model.named_parameters():
        p.requires_grad_(name in head)
    return model


# %% [markdown]
# ### Schedules and layer-wise learning rates
#
# A schedule is a multiplier $s(t) \in [0, 1]$ on the base learning rate, `schedule_factor`
# (defined in Appendix C, whose pretraining used it first). `linear` and `cosine` warm up linearly
# over the first `warmup_steps` and then decay to zero (or to `min_ratio`, as in pretraining and
# 13-06's SFT); `constant` keeps the rate fixed (no warmup). In this chapter each optimizer group
# gets its base rate times $s(t)$. `layerwise_param_groups` implements (1.2): it finds each
# parameter's depth from its name (`embeddings`/`embed_tokens` at 0, `layer.<i>`/`layers.<i>` at
# $i + 1$, everything else, the head and the final norm, at $L + 1$) and gives every depth its own
# optimizer group.

# %%
#| export
from ftbook.base_models import schedule_factor  # Appendix C


def layer_depth(name: str, num_layers: int) -> int:
    """Depth of a parameter for eq. (1.2): 0 embeddings, i + 1 transformer layer i, L + 1 rest."""
    parts = name.split(".")
    if any(p in ("embeddings", "embed_tokens", "wte", "wpe") for p in parts):
        return 0
    for key in ("layer", "layers", "h"):
        if key in parts:
            position = parts.index(key)
            if position + 1 < len(parts) and parts[position + 1].isdigit():
                return int(parts[position + 1]) + 1
    return num_layers + 1


def layerwise_param_groups(model: nn.Module, lr: float, decay: float, weight_decay: float
                           ) -> list[dict]:
    """Optimizer groups with lr * decay ** (L + 1 - depth), eq. (1.2); `decay=1` is one rate.

    Biases and norm weights (1-d tensors) get no weight decay.
    """
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (layer_depth(name, num_layers), p.ndim >= 2)
            groups.setdefault(key, []).append(p)
    return [{"params": params, "lr": lr * decay ** (num_layers + 1 - depth),
             "weight_decay": weight_decay if decayed else 0.0, "depth": depth}
            for (depth, decayed), params in sorted(groups.items())]


# %% [markdown]
# ### The training loop
#
# One loop serves every experiment in this chapter and in {ref}`lora`: whatever parameters have
# `requires_grad` are trained. It records the loss, the wall time of each step, the peak memory
# of the whole run, and optional evaluations every `eval_every` steps through a callback. Matmuls
# run in bfloat16 autocast (weights and optimizer state stay float32), which the workbench showed
# to be the fast path on this CPU.

# %%
#| export
@dataclass
class TrainLog:
    """What `train_classifier` measured."""

    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    peak_memory_bytes: int = 0
    trainable_parameters: int = 0

    @property
    def median_step_seconds(self) -> float:
        """Median wall time of a step (robust to the first, slower steps)."""
        ordered = sorted(self.step_seconds)
        return ordered[len(ordered) // 2] if ordered else float("nan")


def train_classifier(model: nn.Module, tokenizer: Any, train: Any, *, steps: int, lr: float,
                     batch_size: int, max_len: int, seed: int, schedule: str = "linear",
                     warmup_ratio: float = 0.1, weight_decay: float = 0.01,
                     layer_decay: float = 1.0, bf16: bool = True, max_grad_norm: float = 1.0,
                     eval_every: int = 0, eval_fn: Callable[[int], dict] | None = None,
                     desc: str = "training") -> TrainLog:
    """Train the parameters of `model` that require grad on `train` (SST-2 rows) with AdamW.

    `schedule` and `warmup_ratio` set the learning-rate schedule, `layer_decay` the
    discriminative rates of eq. (1.2). `eval_fn(step)` is called before training and every
    `eval_every` steps when given; its dicts are stored in `TrainLog.evals`.
    """
    device = next(model.parameters()).device
    seed_everything(seed)
    groups = layerwise_param_groups(model, lr, layer_decay, weight_decay)
    if not groups:
        raise ValueError("no parameter requires grad: nothing to train")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    warmup = round(warmup_ratio * steps)
    log = TrainLog(trainable_parameters=sum(p.numel() for g in groups for p in g["params"]))
    if eval_fn is not None:
        log.evals.append({"step": 0, **eval_fn(0)})
    batches = sample_batches(train, tokenizer, batch_size, max_len, steps, seed)
    with PeakMemory(device) as memory:
        for step, batch in enumerate(progress(batches, total=steps, desc=desc)):
            model.train()
            start = time.perf_counter()
            factor = schedule_factor(schedule, step, steps, warmup)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits  # (batch, num_labels)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]],
                                           max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            log.step_seconds.append(time.perf_counter() - start)
            log.losses.append(check_finite(loss, f"{desc} loss", step))
            if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
                log.evals.append({"step": step + 1, **eval_fn(step + 1)})
    log.peak_memory_bytes = memory.peak_bytes
    return log


# %% [markdown]
# ### Forgetting: the backbone under its original head
#
# For a causal LM fine-tuned as a classifier, `backbone_perplexity` copies the classifier's
# transformer (everything but the classification head) into a causal LM of the same
# architecture and measures perplexity with `ftbook.base_models.perplexity` ({ref}`base-models`). The LM head is
# tied to the input embeddings, so it carries whatever fine-tuning did to them.

# %%
#| export
from ftbook.base_models import perplexity


def backbone_perplexity(classifier: nn.Module, causal_lm: nn.Module, tokenizer: Any,
                        texts: list[str]) -> float:
    """Perplexity on `texts` of `classifier`'s backbone placed under `causal_lm`'s LM head.

    `causal_lm` is overwritten (its backbone weights replaced), so pass a scratch copy.
    """
    prefix = classifier.base_model_prefix
    getattr(causal_lm, prefix).load_state_dict(getattr(classifier, prefix).state_dict())
    return perplexity(causal_lm, tokenizer, texts)


def linear_weight_deltas(before: dict[str, torch.Tensor], after: nn.Module
                         ) -> dict[str, torch.Tensor]:
    """ΔW = W_after - W_before for every 2-d weight of an `nn.Linear` in `after` (float32, CPU),
    keyed by the module's qualified name: the update that 13-02 analyses."""
    deltas = {}
    for name, module in after.named_modules():
        if isinstance(module, nn.Linear) and f"{name}.weight" in before:
            deltas[name] = (module.weight.detach().float().cpu()
                            - before[f"{name}.weight"].float().cpu())
    return deltas


# %% [markdown]
# Quick checks of the pieces: the schedules have the right shape, layer depths are assigned as
# (1.2) says for both architectures, and `freeze_backbone` leaves only the head trainable.

# %%
import matplotlib.pyplot as plt
import torch

from ftbook.base_models import SCHEDULES, load_encoder_classifier
from ftbook.workbench import count_parameters, show_figure, show_table

cfg = pick(PROFILE, FT_CONFIGS)
factors = {k: [schedule_factor(k, s, 100, 10) for s in range(100)] for k in SCHEDULES}
# exact: (9 + 1) / 10 and 1 / 10 are correctly rounded divisions; the last cosine factor is
# (1 - cos(pi / 90)) / 2 = 3.0e-4, far below 1e-2 whatever the last bit of cos
assert factors["linear"][9] == factors["cosine"][9] == 1.0 and factors["constant"][0] == 1.0
assert factors["linear"][0] == 0.1 and abs(factors["cosine"][-1]) < 1e-2
assert [layer_depth(n, 6) for n in ("bert.embeddings.word_embeddings.weight",
                                    "bert.encoder.layer.0.attention.self.query.weight",
                                    "bert.encoder.layer.5.output.dense.bias",
                                    "classifier.weight")] == [0, 1, 6, 7]
assert [layer_depth(n, 6) for n in ("model.embed_tokens.weight", "model.layers.3.mlp.up_proj.weight",
                                    "model.norm.weight", "score.weight")] == [0, 4, 7, 7]
probe, _ = load_encoder_classifier(PROFILE, seed=SEED)
freeze_backbone(probe)
print(f"trainable after freeze_backbone: {count_parameters(probe, trainable_only=True):,} of "
      f"{count_parameters(probe):,}:", sorted({n.rsplit(".", 2)[0] for n, p in probe.named_parameters()
                                                 if p.requires_grad}))
del probe

# %% [markdown]
# ## Experiment 1: feature extraction against full fine-tuning
#
# Same encoder, same data, same number of steps and batch size. Feature extraction trains the head
# (the pooler and the classifier) at a high learning rate; full fine-tuning trains everything at
# the small rate usual for pretrained weights. Both warm up over the first 10% of steps and decay
# linearly. We record dev accuracy along the way, and FLOPs per step as counted by PyTorch's
# `FlopCounterMode` on one real training step. The count runs on the "eager" attention path (the
# same arithmetic as the default SDPA kernel, whose CPU flash-attention variant the counter does
# not see), so every matmul is visible.
#
# `encoder_runs` makes the two runs and keeps what the rest of the chapter and {ref}`lora` need:
# each run's training log, time, FLOP count and parameter count, and the full fine-tune's update
# $\Delta W = W_\text{ft} - W_0$ of every linear layer. It caches them under the configuration,
# the encoder, the seed and the SST-2 rows they used, and reads them back from there when they
# exist, so that 13-02 analyses *these* runs (13-01 and 13-02 can never disagree about them). It
# leaves the caller's random state as it found it, whether it trains or reads.

# %%
#| export
import dataclasses
import hashlib
import json
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file, save_file

from ftbook.base_models import build_once, encoder_name, load_encoder_classifier  # Appendix C
from ftbook.workbench import (
    Timer,
    cache_dir,
    count_parameters,
    get_device,
    measured_flops,
    pick,
)

ENCODER_METHODS = ("feature extraction", "full fine-tuning")
ENCODER_RUNS_FORMAT = 1  # bump to invalidate the cached encoder runs


def encoder_data(profile: str, seed: int = 0) -> tuple[Any, Any]:
    """(train, dev): the SST-2 rows of the encoder runs, stratified subsets of `n_train` and
    `n_dev` rows (`FT_CONFIGS`) drawn with `seed`."""
    from ftbook.data import load_sst2, subset  # lazy: ftbook.data imports `datasets`

    cfg = pick(profile, FT_CONFIGS)
    train = subset(load_sst2("train"), cfg.n_train, seed=seed, stratify_by="label")
    dev = subset(load_sst2("validation"), cfg.n_dev, seed=seed, stratify_by="label")
    return train, dev


def one_step_flops(model: nn.Module, tokenizer: Any, train: Any, cfg: FineTuneConfig,
                   seed: int) -> tuple[int, int]:
    """(FLOPs counted on one training step, tokens in that step's padded batch): one batch of
    `train` (seed `seed + 99`), counted by `FlopCounterMode` on the eager attention path."""
    device = next(model.parameters()).device
    batch = next(sample_batches(train, tokenizer, cfg.batch_size, cfg.max_len, 1, seed + 99))
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")

    def step():
        nn.functional.cross_entropy(model(**batch).logits, labels).backward()

    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")  # CPU flash attention is invisible to the counter
    flops = measured_flops(step)
    model.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    return flops, batch["input_ids"].size(1)


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and PyTorch's (CPU and every CUDA device's) random states on
    exit: what runs inside seeds itself and leaves the caller's draws unchanged."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@dataclass
class EncoderRun:
    """One run of Experiment 1: its training log, wall time (s), the FLOPs of one training step
    as counted, that step's padded length in tokens, and the model's parameter count."""

    log: TrainLog
    seconds: float
    flops: int
    padded_len: int
    total_parameters: int


@dataclass
class EncoderRuns:
    """Experiment 1 of chapter 13-01 for `profile`: one `EncoderRun` per method of
    `ENCODER_METHODS`, the full fine-tune's ΔW = W_ft - W_0 (`linear_weight_deltas`), the SST-2
    rows the runs used, and the cache folder they were read from."""

    profile: str
    runs: dict[str, EncoderRun]
    delta_w: dict[str, torch.Tensor]  # module name -> (out_features, in_features), float32
    train: Any
    dev: Any
    folder: Path

    def table(self) -> Any:
        """The cost/benefit table, one row per method: final dev accuracy, trainable parameters
        (count and % of the model), median s/step, GFLOP per step, peak memory, training time."""
        rows = []
        for method, run in self.runs.items():
            log = run.log
            rows.append({
                "method": method,
                "dev accuracy": log.evals[-1]["dev_accuracy"],
                "trainable params": log.trainable_parameters,
                "trainable %": 100 * log.trainable_parameters / run.total_parameters,
                "s / step (median)": log.median_step_seconds,
                "GFLOP / step": run.flops / 1e9,
                "peak memory MiB": log.peak_memory_bytes / 2**20,
                "train time s": run.seconds,
            })
        return pd.DataFrame(rows).set_index("method")


def encoder_runs_folder(profile: str, seed: int = 0, data: tuple[Any, Any] | None = None
                        ) -> Path:
    """The cache folder of the encoder runs of `profile`, keyed by `ENCODER_RUNS_FORMAT`, the
    chapter's configuration, the encoder, the seed and the SST-2 rows (`data`, else
    `encoder_data(profile, seed)`), by content."""
    train, dev = data if data is not None else encoder_data(profile, seed)
    rows = hashlib.sha256(json.dumps([train[:], dev[:]]).encode()).hexdigest()
    key = json.dumps({"format": ENCODER_RUNS_FORMAT, "config": repr(pick(profile, FT_CONFIGS)),
                      "encoder": encoder_name(profile), "seed": seed, "rows": rows},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir("13_01_full_finetuning") / f"encoder-runs-{profile}-{digest}"


def encoder_runs(profile: str, device: torch.device | None = None, seed: int = 0
                 ) -> EncoderRuns:
    """Both runs of chapter 13-01's Experiment 1 for `profile`, from the cache
    (`encoder_runs_folder`), or made and cached first: the profile's encoder
    (`load_encoder_classifier(profile, seed=seed)`) trained `steps` steps on `encoder_data`,
    the head alone at `lr_head` (feature extraction) and every weight at `lr_full` (full
    fine-tuning), evaluated on the dev rows at the start, halfway and at the end. The caller's
    random state is left as it was (`kept_random_state`)."""
    cfg = pick(profile, FT_CONFIGS)
    device = device if device is not None else get_device()

    def build(folder: Path) -> None:
        runs, delta_w = {}, {}
        for method in ENCODER_METHODS:
            model, tokenizer = load_encoder_classifier(profile, seed=seed)
            model.to(device)
            if method == "feature extraction":
                freeze_backbone(model)
            flops, padded_len = one_step_flops(model, tokenizer, train, cfg, seed)
            before = {k: v.detach().clone() for k, v in model.state_dict().items()}
            with Timer(device) as timer:
                log = train_classifier(
                    model, tokenizer, train, steps=cfg.steps,
                    lr=cfg.lr_head if method == "feature extraction" else cfg.lr_full,
                    batch_size=cfg.batch_size, max_len=cfg.max_len, seed=seed,
                    warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, bf16=cfg.bf16,
                    eval_every=max(1, cfg.steps // 2), desc=method,
                    eval_fn=lambda step, m=model, t=tokenizer: {
                        "dev_accuracy": evaluate_accuracy(m, t, dev, cfg.max_len, bf16=cfg.bf16)})
            runs[method] = {"log": dataclasses.asdict(log), "seconds": timer.seconds,
                            "flops": flops, "padded_len": padded_len,
                            "total_parameters": count_parameters(model)}
            if method == "full fine-tuning":
                delta_w = linear_weight_deltas(before, model)
            del model, before
        save_file({k: v.contiguous() for k, v in delta_w.items()},
                  str(folder / "delta_w.safetensors"))
        (folder / "runs.json").write_text(json.dumps({"profile": profile, "seed": seed,
                                                      "runs": runs}))

    with kept_random_state():
        train, dev = encoder_data(profile, seed)
        folder = build_once(encoder_runs_folder(profile, seed, (train, dev)), build)
    stored = json.loads((folder / "runs.json").read_text())
    runs = {method: EncoderRun(**{**run, "log": TrainLog(**run["log"])})
            for method, run in stored["runs"].items()}
    return EncoderRuns(profile, runs, load_file(str(folder / "delta_w.safetensors")), train, dev,
                       folder)


# %%
from ftbook.workbench import transformer_flops

encoder = encoder_runs(PROFILE, DEVICE, SEED)  # made now, or read from the cache
train_ds, dev_ds = encoder.train, encoder.dev  # the SST-2 rows both runs used
print(f"train rows {len(train_ds):,}, dev rows {len(dev_ds):,}")

# %% [markdown]
# The FLOP counter gives us a check of the cost argument of the theory section. For full
# fine-tuning the counted FLOPs should match eq. (A.3) on the padded batch; for feature extraction
# they should be about one third of that (the forward pass only).

# %%
fe, ft = encoder.runs["feature extraction"], encoder.runs["full fine-tuning"]
probe, _ = load_encoder_classifier(PROFILE, seed=SEED)
# The head (pooler and classifier) reads one token per sentence: its matmuls run on `batch` rows,
# not `batch * seq` as eq. (A.1) assumes for every linear layer.
head_weights = sum(m.weight.numel() for n, m in probe.named_modules()
                   if isinstance(m, nn.Linear) and set(n.split(".")) & set(HEAD_MODULES))
predicted = (transformer_flops(probe, cfg.batch_size, ft.padded_len, training=True)
             - 3 * 2 * cfg.batch_size * (ft.padded_len - 1) * head_weights)
print(f"full FT: counted {ft.flops / 1e9:.2f} GFLOP, eq. (A.3) {predicted / 1e9:.2f} GFLOP "
      f"on the same padded batch ({ft.padded_len} tokens)")
print(f"feature extraction / full fine-tuning FLOPs per step: {fe.flops / ft.flops:.3f} "
      "(theory: about 1/3)")
# FLOPs are counted from tensor shapes, not timed: integers, the same on every machine (the
# difference is 0 for BERT; the slack only covers terms (A.3) leaves out in other encoders)
assert abs(ft.flops / predicted - 1) < 1e-3
del probe

# %% [markdown]
# ## Experiment 2: forgetting
#
# Now the causal LM as a classifier. Each run fine-tunes all parameters at one learning rate and,
# every few steps, evaluates both dev accuracy and the perplexity of the backbone on held-out
# general English (the Wikipedia and C4 documents that Appendix C held out of pretraining).
# Feature extraction on the same backbone is the reference: its perplexity cannot change. To keep
# the budget, these runs evaluate on a stratified subset of the dev set (`lm_n_dev` rows of the
# configuration), and the evaluation at step 0, identical for every run, is computed once.
# At the end of each run we also score every held-out text on its own: two runs are then
# compared text by text, and the spread of those paired differences gives the comparison an
# interval (Appendix A, "Measurements and their uncertainty").

# %%
import math

from transformers import AutoModelForSequenceClassification

from ftbook.base_models import (
    BASE_LM_CONFIGS,
    attention_implementation,
    causal_lm_name,
    load_causal_lm,
)
from ftbook.data import load_text_corpus, subset
from ftbook.workbench import binomial_interval, mean_interval

lm_name = causal_lm_name(PROFILE)
scratch_lm, lm_tokenizer = load_causal_lm(PROFILE, device=DEVICE)
held = BASE_LM_CONFIGS.get(PROFILE, BASE_LM_CONFIGS["tiny"])
english = (load_text_corpus("wiki")[-held.heldout_wiki_articles:]
           + load_text_corpus("c4")[-held.heldout_c4_docs:])[: cfg.lm_eval_texts]


def lm_classifier():
    seed_everything(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        lm_name, num_labels=2, attn_implementation=attention_implementation(PROFILE))
    model.config.pad_token_id = lm_tokenizer.pad_token_id
    return model.to(DEVICE)


lm_dev = subset(dev_ds, cfg.lm_n_dev, seed=SEED, stratify_by="label")
start_eval = {}  # every run starts from the same backbone and seeded head: evaluate step 0 once


def lm_eval(model):
    def evaluate(step):
        if step == 0 and start_eval:
            return start_eval
        result = {"dev_accuracy": evaluate_accuracy(model, lm_tokenizer, lm_dev, cfg.max_len,
                                                    bf16=cfg.bf16),
                  "perplexity": backbone_perplexity(model, scratch_lm, lm_tokenizer, english)}
        if step == 0:
            start_eval.update(result)
        return result
    return evaluate


def per_text_log_perplexity(model) -> np.ndarray:
    """(texts,) log perplexity of each held-out English text under `model`'s backbone."""
    prefix = model.base_model_prefix
    getattr(scratch_lm, prefix).load_state_dict(getattr(model, prefix).state_dict())
    return np.array([math.log(perplexity(scratch_lm, lm_tokenizer, [text])) for text in english])


def paired(a: np.ndarray, b: np.ndarray) -> str:
    """Mean of the per-text differences a - b with its 95% Student-t half-width."""
    mean, half = mean_interval((a - b).tolist())
    return f"{mean:+.3g} ± {half:.2g}"


def lm_run(label, lr, schedule="linear", warmup_ratio=cfg.warmup_ratio, layer_decay=1.0,
           frozen=False):
    model = lm_classifier()
    backbone = getattr(model, model.base_model_prefix)
    if frozen:
        freeze_backbone(model)
        start = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    log = train_classifier(model, lm_tokenizer, train_ds, steps=cfg.lm_steps, lr=lr,
                           batch_size=cfg.batch_size, max_len=cfg.max_len, seed=SEED,
                           schedule=schedule, warmup_ratio=warmup_ratio,
                           weight_decay=cfg.weight_decay, layer_decay=layer_decay, bf16=cfg.bf16,
                           eval_every=cfg.lm_eval_every, eval_fn=lm_eval(model), desc=label)
    if frozen:  # no forgetting by construction: the backbone is the pretrained one, bit for bit
        assert all(torch.equal(v.cpu(), start[k]) for k, v in backbone.state_dict().items()), \
            "feature extraction must not change the backbone"
    return {"label": label, "lr": lr, "log": log, "evals": pd.DataFrame(log.evals),
            "per_text": per_text_log_perplexity(model)}


lm_runs = [lm_run("feature extraction", cfg.lr_head, frozen=True)]
lm_runs += [lm_run(f"full FT, lr {lr:g}", lr) for lr in cfg.lm_lrs]
base_ppl = lm_runs[0]["evals"]["perplexity"].iloc[0]
print(f"perplexity of the pretrained backbone on held-out English: {base_ppl:.2f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for run in lm_runs:
    ev = run["evals"]
    axes[0].plot(ev["step"], ev["perplexity"] / base_ppl, marker="o", label=run["label"])
    axes[1].plot(ev["dev_accuracy"], ev["perplexity"] / base_ppl, marker="o", label=run["label"])
axes[0].set(xlabel="step", ylabel="perplexity / pretrained perplexity",
            title="Forgetting during fine-tuning (held-out English)")
axes[1].set(xlabel="SST-2 dev accuracy", ylabel="perplexity / pretrained perplexity",
            title="Task accuracy vs forgetting")
axes[0].legend(fontsize=8)
show_figure(fig, "forgetting", CHAPTER)

# %%
forgetting = pd.DataFrame([{
    "run": r["label"],
    "dev accuracy": r["evals"]["dev_accuracy"].iloc[-1],
    "best dev accuracy": r["evals"]["dev_accuracy"].max(),
    "perplexity after": r["evals"]["perplexity"].iloc[-1],
    "perplexity x": r["evals"]["perplexity"].iloc[-1] / base_ppl,
} for r in lm_runs]).set_index("run")
show_table(forgetting, "forgetting", CHAPTER)
best = forgetting["dev accuracy"].idxmax()
low, high = binomial_interval(round(forgetting.loc[best, "dev accuracy"] * len(lm_dev)), len(lm_dev))
print(f"best dev accuracy: {forgetting.loc[best, 'dev accuracy']:.3f} (95% interval "
      f"[{low:.3f}, {high:.3f}] on {len(lm_dev)} rows; {best}), at "
      f"{forgetting.loc[best, 'perplexity x']:.2f}x the pretrained perplexity; the largest rate "
      f"reaches {forgetting['dev accuracy'].iloc[-1]:.3f} at {forgetting['perplexity x'].iloc[-1]:.2f}x")
pretrained = lm_runs[0]["per_text"]  # the feature-extraction backbone is the pretrained one
print(f"change in log perplexity per held-out text (mean ± 95% half-width, {len(english)} texts):")
for run in lm_runs[1:]:
    print(f"  {run['label']} vs pretrained: {paired(run['per_text'], pretrained)}")
for lower, higher in zip(lm_runs[1:], lm_runs[2:], strict=False):
    print(f"  {higher['label']} vs {lower['label']}: {paired(higher['per_text'], lower['per_text'])}")

# %% [markdown]
# The table and figure answer the question quantitatively. Feature extraction leaves the
# perplexity exactly where it was: the factor is 1 by construction, and the run checks that the
# backbone's weights are bit for bit the pretrained ones. Full fine-tuning raises it, and the
# lines under the table measure by how much: each run's change in log perplexity, text by text,
# against the pretrained backbone, and each rate against the next smaller one. A pair whose
# interval excludes zero differs beyond the choice of held-out texts; the interval does not
# cover the training seed, since each rate is one run. The smallest rate should move the weights
# little and leave the language model nearly intact, and larger rates should forget more; the
# lines say whether this run bears that out beyond its intervals. Accuracy need not follow the
# same order. The first line names the rate that gave the best accuracy, its Wilson interval on
# the dev rows, and what it cost; past some rate the backbone is damaged faster than the task is
# learned, and the extra forgetting buys nothing.
#
# A caveat on scale: the book's tiny LM is a weak sentence classifier. Its last-token state was
# never trained to summarise a sentence, and sixty steps of sixteen sentences is little data, so
# in the tiny profile its accuracies stay within a few points of chance (the table), far below
# the encoder's in Experiment 1; the accuracy axis of the figure is therefore mostly noise here,
# and the full profile (a 0.5B model, 400 steps) is where the trade-off curve takes shape. The
# forgetting is the point of this experiment; its per-text intervals say how clearly each
# profile resolves it.
#
# ## Experiment 3: learning-rate strategies
#
# At the middle learning rate of the sweep we now vary only the strategy: no warmup with a
# constant rate, the default (10% linear warmup, linear decay), and the default plus layer-wise
# rates with $\xi$ from the configuration, eq. (1.2).

# %%
mid_lr = cfg.lm_lrs[len(cfg.lm_lrs) // 2]
default = next(r for r in lm_runs if r["lr"] == mid_lr)
strategies = [
    lm_run("constant, no warmup", mid_lr, schedule="constant", warmup_ratio=0.0),
    {**default, "label": "linear warmup + decay"},
    lm_run(f"warmup + layer-wise (xi={cfg.llrd_decay:g})", mid_lr, layer_decay=cfg.llrd_decay),
]
strategy_table = pd.DataFrame([{
    "strategy": r["label"],
    "dev accuracy": r["evals"]["dev_accuracy"].iloc[-1],
    "perplexity x": r["evals"]["perplexity"].iloc[-1] / base_ppl,
    "loss, first 10 steps": sum(r["log"].losses[:10]) / len(r["log"].losses[:10]),
} for r in strategies]).set_index("strategy")
show_table(strategy_table, "lr_strategies", CHAPTER)

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for r in strategies:
    losses = pd.Series(r["log"].losses).rolling(5, min_periods=1).mean()
    ax.plot(losses, label=r["label"])
ax.set(xlabel="step", ylabel="training loss (5-step mean)", title=f"Strategies at lr {mid_lr:g}")
ax.legend(fontsize=8)
show_figure(fig, "lr_strategies", CHAPTER)

# %%
constant, plain, llrd = (strategy_table.iloc[i] for i in range(3))
print(f"layer-wise rates: perplexity x {llrd['perplexity x']:.2f} vs {plain['perplexity x']:.2f} "
      f"without, at dev accuracy {llrd['dev accuracy']:.3f} vs {plain['dev accuracy']:.3f}")
print(f"constant rate without warmup: perplexity x {constant['perplexity x']:.2f}, dev accuracy "
      f"{constant['dev accuracy']:.3f}")
low, high = binomial_interval(round(0.5 * len(lm_dev)), len(lm_dev))
print(f"a dev accuracy near 0.5 on {len(lm_dev)} rows has a 95% interval of ±{(high - low) / 2:.3f}")
print("change in log perplexity per held-out text (mean ± 95% half-width), one seed each:")
print(f"  layer-wise vs plain: {paired(strategies[2]['per_text'], strategies[1]['per_text'])}")
print(f"  constant vs plain:   {paired(strategies[0]['per_text'], strategies[1]['per_text'])}")

# %% [markdown]
# Layer-wise rates aim at what (1.2) promises: the embeddings and lower layers, where most of
# the general language knowledge sits, move with a fraction of the rate, so the backbone should
# forget less. The paired per-text difference above measures it in this run: a negative mean
# whose interval excludes zero confirms it on these texts, anything else does not. With
# $\xi = 0.5$ and six layers the embeddings train at $0.5^7 \approx 1\%$ of the head's rate: for
# a language model whose vocabulary lives in tied embeddings, that alone protects much of its
# next-token prediction. The constant rate without warmup should forget the most (the second
# paired line, positive if so). Two effects add up there: the first updates, driven by an
# untrained head, hit the backbone at the full rate, and without decay the weights keep moving
# at that rate to the end, so the total movement is larger. It may also reach a higher accuracy in this budget,
# for the same reason. Accuracy differences smaller than the printed interval of a dev accuracy
# are noise. The perplexity intervals are over held-out texts with the training seed fixed: a
# difference that clears them is a property of these runs, and how far it varies from seed to
# seed is a question this single-seed experiment leaves open.
#
# ## Results: when is full fine-tuning worth its compute?

# %%
cost_benefit = encoder.table()
show_table(cost_benefit, "cost_benefit", CHAPTER)
gain = cost_benefit["dev accuracy"].iloc[1] - cost_benefit["dev accuracy"].iloc[0]
ratio = cost_benefit["s / step (median)"].iloc[1] / cost_benefit["s / step (median)"].iloc[0]
print(f"full fine-tuning: {100 * gain:+.1f} accuracy points for {ratio:.1f}x the time per step "
      f"and {cost_benefit['GFLOP / step'].iloc[1] / cost_benefit['GFLOP / step'].iloc[0]:.1f}x "
      "the FLOPs")
for method, accuracy in cost_benefit["dev accuracy"].items():
    low, high = binomial_interval(round(accuracy * len(dev_ds)), len(dev_ds))
    print(f"{method}: dev accuracy {accuracy:.3f}, 95% interval [{low:.3f}, {high:.3f}] "
          f"({len(dev_ds)} rows, one seed)")

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for method, run in encoder.runs.items():
    ev = pd.DataFrame(run.log.evals)
    ax.plot(ev["step"], ev["dev_accuracy"], marker="o", label=method)
ax.set(xlabel="step", ylabel="SST-2 dev accuracy", title="Encoder: dev accuracy during training")
ax.legend()
show_figure(fig, "encoder_accuracy", CHAPTER)

# %% [markdown]
# Read the cost-benefit table row against row. Full fine-tuning trains every one of the encoder's
# parameters and pays for it in FLOPs per step (about three times feature extraction, as the counter
# confirmed), in wall time, and in memory for gradients and AdamW's two moments. What it buys is the
# accuracy gap in the first column, real where the two printed intervals do not overlap: the
# frozen sentence-embedding backbone was never trained to separate sentiment, and a linear probe
# on it can only use what is already linearly available.
#
# Full fine-tuning is worth its compute when (a) the task needs representations the backbone
# does not already provide, which the gap above measures, (b) the model will serve that one task,
# so forgetting does not matter, and (c) you can afford a copy of the weights per task. When
# several tasks share a backbone, or the general abilities must survive, the parameter-efficient
# methods of the next chapters keep most of the gain at a fraction of the cost.

# %%
print(f"kept {len(encoder.delta_w)} weight updates for 13-02: "
      f"{encoder.folder / 'delta_w.safetensors'}")

# %% [markdown]
# ## Pitfalls
#
# - **A head that is not where you think.** BERT's classifier reads the pooler, whose weights come
#   from pretraining's next-sentence task; Llama's `score` reads the last non-padding token, and
#   needs `config.pad_token_id` to find it. Check what `requires_grad` actually covers
#   (`freeze_backbone` prints it) before trusting a "feature extraction" number.
# - **Comparing at different learning rates.** The head alone tolerates, and needs, a rate
#   10-100 times larger than full fine-tuning. Comparing both at one rate compares one method at a
#   bad setting.
# - **Forgetting is invisible on the task metric.** Dev accuracy never shows it; you have to
#   evaluate what the model could do before (here, perplexity on general English).
# - **Padding-dependent timings.** Step time depends on the longest sentence in the batch; report
#   medians over many steps, as here.
#
# ## Summary
#
# - Feature extraction trains only the head: a forward-only backbone (about a third of the FLOPs),
#   no optimizer state for the backbone, and no forgetting at all.
# - Full fine-tuning trains everything: higher accuracy when the backbone's features are not
#   already linear in the task, at the full cost of (A.3) and 16 bytes per parameter of state.
# - Forgetting grows with the learning rate and the number of steps; warmup and layer-wise
#   learning rates (1.2) reduce it.
#
# ## Exercises
#
# 1. Cache the frozen encoder's features once and train the head on the cache. How much faster is
#    a step, and why is the accuracy identical to the un-cached run with dropout disabled?
# 2. Add a KL or L2 penalty towards $\theta_0$ to (1.1) (the idea behind EWC, Kirkpatrick et al.
#    2017) and plot its forgetting curve next to the learning-rate sweep.
# 3. Unfreeze only the top $k$ layers of the encoder for $k = 0, \dots, 6$ and plot accuracy and
#    step time against $k$.
#
# ## References
#
# - Howard & Ruder (2018), *Universal Language Model Fine-tuning for Text Classification*,
#   arXiv:1801.06146, §3.2.
# - Kirkpatrick et al. (2017), *Overcoming catastrophic forgetting in neural networks*,
#   arXiv:1612.00796.
# - McCloskey & Cohen (1989), *Catastrophic interference in connectionist networks*.
# - Raschka (2024), *Build a Large Language Model (From Scratch)*, ch. 6 (fine-tuning only the last
#   layers vs all layers).
# - Socher et al. (2013), SST; Wang et al. (2018), GLUE, arXiv:1804.07461.

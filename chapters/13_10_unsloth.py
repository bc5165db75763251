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
# (unsloth)=
# # 13-10 Efficient fine-tuning with Unsloth: pipeline, export, inference
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`lora`, {ref}`instruction-tuning` ({ref}`qlora` recommended).
# **Reading time:** ~12 min; the tiny profile runs in about 10 minutes on 2 CPU cores.
# **You will build** `ftbook.efficient_finetuning`: the same QLoRA supervised fine-tuning run of
# SmolLM2-135M-Instruct with Unsloth and with the standard transformers + PEFT + bitsandbytes +
# TRL stack, each in its own process and measured side by side; a merge of the adapter into
# 16-bit weights checked against $W + \frac{\alpha}{r} BA$; the book's own GGUF exporter (F16
# and Q8_0; Llama and Qwen2; SentencePiece and byte-level BPE tokenizers) written with the `gguf`
# package and checked against the GGUF file the model came from; and inference with the
# fine-tuned model three ways (transformers on the merged weights, transformers on the GGUF file,
# llama.cpp), compared token by token, with task accuracy before and after fine-tuning.
# ```
#
# Unsloth (Han & Han, 2023-) is a fine-tuning library that wraps the Hugging Face stack:
# `FastLanguageModel.from_pretrained` loads a model (4-bit by default), `get_peft_model` adds LoRA
# adapters, and TRL's `SFTTrainer` trains them. On NVIDIA GPUs it replaces the model's hot paths
# with hand-written Triton kernels (RoPE, RMSNorm, SwiGLU, a chunked cross-entropy, manual
# backward passes for the LoRA'd attention and MLP) and offloads checkpointed activations to host
# memory; that is where its published speed and memory claims come from. It also ships exporters:
# merged 16-bit weights and GGUF files for llama.cpp, Ollama and LM Studio. This chapter is about
# the tool: what it is, how it installs, what it does on the hardware you have, and how to get a
# fine-tuned model out of it and into a runtime, verified at every step. The algorithms are the
# ones of {ref}`lora`, {ref}`qlora` and {ref}`instruction-tuning`; we link back rather than
# re-teach them.

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_10_unsloth"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Installation
#
# `pip install unsloth` resolves a large dependency set (xformers, triton, torchao, torchvision,
# diffusers, cut-cross-entropy). On a CUDA machine that is what you want. On a CPU-only machine it
# is not: torchvision and xformers come as builds for a CUDA PyTorch and drag one in, replacing
# the CPU wheel (several GB), and PyPI's torchvision does not even load beside the CPU build of
# torch, which then breaks `import transformers`. Unsloth 2026.10 also pins its neighbours:
# transformers $\le$ 5.17, TRL $\le$ 1.15, datasets $<$ 5, torch $<$ 2.15.
#
# The book therefore installs it in two steps (`book/make.sh`): `requirements.txt` pins the stack
# inside Unsloth's ranges, then `requirements-nodeps.txt` adds `unsloth`, `unsloth_zoo` and
# `xllamacpp` (a prebuilt llama.cpp wheel) with `pip install --no-deps`. Unsloth's CPU backend
# needs none of the skipped dependencies: it is stock transformers + PEFT + TRL + bitsandbytes
# with a few CPU-specific choices, as we will see. `pip check` lists the skipped packages as
# missing; that is expected.
#
# Importing Unsloth has side effects: it patches `transformers.TrainingArguments` and TRL's
# `SFTTrainer` *globally* (and on a GPU, the model classes), which is why its documentation asks
# you to import it before transformers. A process that imports it is no longer a clean baseline,
# so everything that imports Unsloth in this chapter runs in a separate Python process. The
# check below is such a process: it imports Unsloth and prints its banner.

# %%
#| export efficient_finetuning
import importlib.util
import os
import subprocess
import sys


def unsloth_problem(timeout: float = 300) -> str | None:
    """None when `import unsloth` works here (checked in a separate process, since the import
    patches transformers and TRL), else the reason."""
    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (book/make.sh installs requirements-nodeps.txt)"
    env = {**os.environ, "UNSLOTH_AUTO_INSTALL": "0"}
    proc = subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return "import unsloth failed: " + (lines[-1] if lines else f"exit {proc.returncode}")
    return None


# %%
import importlib.metadata

for package in ("unsloth", "unsloth_zoo", "xllamacpp", "gguf", "bitsandbytes"):
    try:
        print(f"{package:13s} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{package:13s} not installed")
UNSLOTH_PROBLEM = unsloth_problem()
print("unsloth import:", "ok" if UNSLOTH_PROBLEM is None else UNSLOTH_PROBLEM)

# %% [markdown]
# ## Hardware requirements
#
# | | NVIDIA GPU (the published path) | CPU (what the tiny profile uses) |
# |---|---|---|
# | kernels | Triton: RoPE, RMSNorm, SwiGLU, fused LoRA MLP/QKV backward, chunked CE | none: stock PyTorch ops |
# | 4-bit base | bitsandbytes CUDA NF4 | bitsandbytes CPU NF4 (when its kernel runs) |
# | precision | bf16 on Ampere and newer, fp16 before | bf16 only with AMX / AVX512-BF16, else fp32 |
# | gradient checkpointing | "unsloth": activations offloaded to host RAM | plain recomputation |
# | cross-entropy | chunked, no full logits tensor | chunked (`unsloth_zoo.cpu`) |
# | GGUF export | llama.cpp (downloaded or cloned on first use) | the same |
#
# Unsloth 2026.10 selects its CPU backend when PyTorch sees no accelerator and prints
# "no GPU found, training on CPU". The published claims (about 2x faster training and 60-80% less
# memory than the Hugging Face stack with FlashAttention 2) are GPU claims; the `full` profile,
# run on a GPU, is where this chapter's benchmark speaks to them. On a CPU the two pipelines run
# the same PyTorch kernels, so expect similar speed; the differences come from the choices listed
# in the table.
#
# ## Three pieces of arithmetic
#
# **The QLoRA model and its merge.** Both pipelines train the model of {ref}`qlora`: a frozen NF4
# base and a LoRA adapter in 16 bits. For deployment the adapter is folded into the weights:
#
# $$
# h = \operatorname{dq}\!\left(W_0^{\text{NF4}}\right) x + \frac{\alpha}{r} B A x
# \quad\Longrightarrow\quad
# W_\text{merged} = W_0 + \frac{\alpha}{r} B A \;\; \text{(in 16 or 32 bits)} .
# \tag{10.1}
# $$
#
# Merging into the 4-bit tensor itself would requantize $W_0 + \Delta W$ and lose most of
# $\Delta W$ (measured in {ref}`qlora`). Unsloth on a CPU refuses it with `NotImplementedError`;
# its advice, which we follow, is to reload the adapter over a 16-bit base and merge there.
#
# **Why a chunked cross-entropy.** The language-model loss needs the logits of every position,
# a $B \times T \times V$ tensor, plus its gradient of the same size. In float32 that is
#
# $$
# M_\text{logits} = 2 \cdot 4 \, B T V \ \text{bytes},
# \tag{10.2}
# $$
#
# With SmolLM2's $V = 49\,152$ that is 393 kB per position, so about 1,400 positions already
# match the 135M-parameter model's own float32 weights (about 540 MB); the benchmark section
# prints the value for this run's $B$ and $T$. For $B = 8$, $T = 2048$ and Llama 3's
# $V = 128\,256$ it is 16.8 GB (printed below): more than the 8B model's LoRA training state.
# Computing the loss $c$ rows at a time (and the gradient inside the same chunk) needs only $c V$
# floats at once, and gives the same loss and gradient, since cross-entropy is a sum over
# positions. The check below verifies the equality on random data.

# %%
import torch
import torch.nn.functional as F

torch.manual_seed(SEED)
hidden = torch.randn(2 * 48, 32, dtype=torch.float64)  # (positions, hidden)
head = torch.randn(100, 32, dtype=torch.float64, requires_grad=True)  # (vocab, hidden)
labels = torch.randint(0, 100, (2 * 48,))
labels[::7] = -100  # ignored positions (prompt tokens, padding)

full = F.cross_entropy(hidden @ head.T, labels, ignore_index=-100, reduction="sum")
(full_grad,) = torch.autograd.grad(full, head)
chunked, chunked_grad = torch.zeros((), dtype=torch.float64), torch.zeros_like(head)
for rows in torch.arange(len(labels)).split(16):  # c = 16 positions at a time
    part = F.cross_entropy(hidden[rows] @ head.T, labels[rows], ignore_index=-100, reduction="sum")
    (grad,) = torch.autograd.grad(part, head)
    chunked, chunked_grad = chunked + part.detach(), chunked_grad + grad
print(f"loss: full {full.item():.10f}, chunked {chunked.item():.10f}; "
      f"max |grad difference| {(full_grad - chunked_grad).abs().max().item():.1e}")
# float64: allclose's default relative tolerance 1e-5 is ~1e10 times the rounding of these sums
assert torch.allclose(full, chunked) and torch.allclose(full_grad, chunked_grad)
B, T, V = 8, 2048, 128_256
print(f"eq. (10.2): B={B}, T={T}, V={V}: {2 * 4 * B * T * V / 1e9:.1f} GB of logits and gradient")

# %% [markdown]
# **Q8_0, the 8-bit GGUF format.** GGUF (llama.cpp's file format) stores a tensor as rows of
# blocks. A Q8_0 block holds 32 consecutive values of a row as one float16 scale and 32 int8
# codes:
#
# $$
# d = \frac{\max_i |x_i|}{127}, \qquad q_i = \operatorname{round}\!\left(\frac{x_i}{d}\right)
# \in [-127, 127], \qquad \hat x_i = \operatorname{fp16}(d) \, q_i ,
# \tag{10.3}
# $$
#
# with round-half-away-from-zero (C's `roundf`): $(16 + 32 \cdot 8) / 32 = 8.5$ bits per value.
# The codes are computed with the float32 $d$ and the stored scale is rounded to float16, so the
# error of one value is bounded by half a step plus the scale's rounding carried over at most 127
# steps:
#
# $$
# |x_i - \hat x_i| \le \frac{d}{2} + 127 \, |d - \operatorname{fp16}(d)|
# \le d \left(\tfrac12 + 127 \cdot 2^{-11}\right).
# \tag{10.4}
# $$
#
# A row whose length is not a multiple of 32 cannot be split into blocks; llama.cpp's converter
# then keeps that tensor in F16, and so do we. The book's own LM of Appendix C has such a case,
# its feed-forward width $688 = 21.5 \cdot 32$ (the tests use one); SmolLM2's 1536 and
# Qwen2.5-0.5B's 4864 split evenly. `quantize_q8_0` below implements (10.3) from scratch; the check
# compares it byte for byte with the `gguf` package's reference (which matches ggml's C code) and
# measures (10.4).

# %%
#| export efficient_finetuning
"""Efficient fine-tuning with Unsloth: the QLoRA SFT pipeline with Unsloth and with the standard
transformers + PEFT + bitsandbytes + TRL stack (each run in its own process), merging, the book's
GGUF exporter (F16, Q8_0), and inference with transformers and llama.cpp.

Defined in chapter 13-10 (`chapters/13_10_unsloth.py`). Unsloth: Han & Han (2023-), software,
github.com/unslothai/unsloth. LoRA: Hu et al. 2021, arXiv:2106.09685. QLoRA: Dettmers et al. 2023,
arXiv:2305.14314. GGUF and Q8_0: ggml/llama.cpp (Gerganov et al.), `docs/gguf.md` and
`ggml-quants.c`. Rotary embeddings: Su et al. 2021, arXiv:2104.09864.
"""
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# peft, trl, datasets, unsloth, xllamacpp: imported where used (slow or optional; unsloth first)
import gguf
import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from ftbook.base_models import (  # Appendix C
    GGUF_PRE_TOKENIZERS,
    end_of_turn_token,
    gguf_pre_tokenizer,
    pre_tokenizer_steps,
    set_chat_special_tokens,
    set_pre_tokenizer,
)

Q8_0_BLOCK = 32  # values per Q8_0 block (ggml's QK8_0)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's `roundf`: halves round away from zero. Written as floor(a) + floor(2 (a - floor(a))),
    exact in float32, where floor(a + 0.5) is not (0.49999997 + 0.5 rounds up to 1)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """Q8_0 of eq. (10.3): rows of `x` (length a multiple of 32) -> uint8 rows of 34-byte blocks,
    each a float16 scale d = max|x| / 127 followed by 32 int8 codes round(x / d)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows whose length is a multiple of {Q8_0_BLOCK}; "
                         f"got shape {x.shape}")
    blocks = x.reshape(-1, Q8_0_BLOCK)  # (n_blocks, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127  # (n_blocks, 1), float32
    inverse = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    codes = round_half_away(blocks * inverse).astype(np.int8)  # (n_blocks, 32)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), codes.view(np.uint8)], axis=1)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK * 34)


def dequantize_q8_0(packed: np.ndarray) -> np.ndarray:
    """The float32 values of Q8_0 rows: fp16(d) * q for every block (eq. 10.3)."""
    blocks = np.asarray(packed, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    codes = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return (d * codes).reshape(*packed.shape[:-1], packed.shape[-1] // 34 * Q8_0_BLOCK)


# %%
import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

rng = np.random.default_rng(SEED)
x = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 2, (64, 1))).astype(np.float32)
x[0, :32] = 0.0  # an all-zero block: d = 0 must not divide by zero
ours = quantize_q8_0(x)
reference = gguf_quants.quantize(x, GGMLQuantizationType.Q8_0)
x_hat = dequantize_q8_0(ours)
d = np.abs(x.reshape(-1, 32)).max(axis=1) / 127
error = np.abs(x - x_hat).reshape(-1, 32).max(axis=1)
bound = d * (0.5 + 127 * 2.0**-11)
# float32 roundings on top of (10.4): x / d can cross a rounding boundary of q by up to 2 * 127 u
# (u = 2^-24), and the product fp16(d) * q adds up to 128 u of d
float32_slack = d * 384 * 2.0**-24
print(f"bytes identical to gguf.quants: {np.array_equal(ours, reference)}; "
      f"{ours.nbytes * 8 / x.size:.2f} bits per value; "
      f"max error / d = {np.max(error / np.where(d > 0, d, 1)):.4f} "
      f"(eq. 10.4 bound {0.5 + 127 * 2**-11:.4f})")
assert np.array_equal(ours, reference)
assert np.allclose(x_hat, gguf_quants.dequantize(reference, GGMLQuantizationType.Q8_0))
assert ours.nbytes * 8 / x.size == 8.5 and np.all(error <= bound + float32_slack)

# %% [markdown]
# **Rotary embeddings in two layouts.** Hugging Face's Llama rotates the pair of query/key
# coordinates $(j, j + d_h/2)$ of each head ("rotate half"); llama.cpp rotates adjacent pairs
# $(2j, 2j + 1)$. The two are the same model up to a permutation $P$ of each head's rows of $W_Q$
# and $W_K$: llama.cpp's converter stores $P W_Q$ and $P W_K$, and transformers' GGUF loader
# applies $P^{-1}$ when it reads them back. Because $P$ is applied to queries and keys alike,
# attention scores are unchanged:
#
# $$
# \big(R^\text{adj}_m P W_Q x\big)^\top \big(R^\text{adj}_n P W_K y\big)
# = \big(P R^\text{half}_m W_Q x\big)^\top \big(P R^\text{half}_n W_K y\big)
# = \big(R^\text{half}_m W_Q x\big)^\top \big(R^\text{half}_n W_K y\big),
# \tag{10.5}
# $$
#
# using $R^\text{adj} P = P R^\text{half}$ and $P^\top P = I$. Forgetting $P$ gives a GGUF file
# that loads without error and produces garbage.

# %%
#| export efficient_finetuning
def permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """P of eq. (10.5): the rows of a Hugging Face Llama q or k projection (rotate-half pairs
    (j, j + d/2) in each head) reordered for GGUF / llama.cpp (adjacent pairs (2j, 2j + 1))."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rotate(x: torch.Tensor, position: int, layout: str, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of one head vector x (head_dim,) at `position`, in either layout."""
    half = x.shape[-1] // 2
    angles = position * base ** (-torch.arange(half, dtype=x.dtype) * 2 / x.shape[-1])
    cos, sin = angles.cos(), angles.sin()
    if layout == "half":  # Hugging Face: pairs (j, j + half)
        a, b = x[:half], x[half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos])
    a, b = x[0::2], x[1::2]  # llama.cpp: pairs (2j, 2j + 1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(-1)


# %%
n_heads, head_dim, width = 2, 8, 12
W_q = torch.randn(n_heads * head_dim, width, dtype=torch.float64)
W_k = torch.randn(n_heads * head_dim, width, dtype=torch.float64)
x, y = torch.randn(width, dtype=torch.float64), torch.randn(width, dtype=torch.float64)
P_q = torch.from_numpy(permute_for_gguf(W_q.numpy(), n_heads))
P_k = torch.from_numpy(permute_for_gguf(W_k.numpy(), n_heads))
scores = {}
for layout, (wq, wk) in {"half": (W_q, W_k), "adjacent": (P_q, P_k)}.items():
    q, k = (wq @ x).view(n_heads, head_dim), (wk @ y).view(n_heads, head_dim)
    scores[layout] = torch.stack([_rotate(q[h], 5, layout) @ _rotate(k[h], 2, layout)
                                  for h in range(n_heads)])
unpermuted = scores["half"]
wrong = torch.stack([_rotate((W_q @ x).view(n_heads, head_dim)[h], 5, "adjacent")
                     @ _rotate((W_k @ y).view(n_heads, head_dim)[h], 2, "adjacent")
                     for h in range(n_heads)])
print(f"scores, HF layout {unpermuted.numpy().round(6)}; llama.cpp layout with P "
      f"{scores['adjacent'].numpy().round(6)}; without P {wrong.numpy().round(6)}")
# float64: allclose's default relative tolerance 1e-5 is ~1e10 times the rounding of these dot
# products, and forgetting P changes the scores by O(1)
assert torch.allclose(scores["half"], scores["adjacent"])
assert not torch.allclose(scores["half"], wrong)

# %% [markdown]
# ## Implementation
#
# ### One configuration, two pipelines, one process each
#
# Both pipelines get the same model folder, the same (prompt, completion) pairs, the same LoRA
# (rank, $\alpha$, all seven projections, no dropout), the same seed (so the same initial $A$),
# and the same `SFTConfig` built by one function: batch size, steps, learning rate and schedule,
# fused AdamW, loss on completion tokens only, bf16 autocast where the hardware has it, gradient
# checkpointing. What differs is what each library adds:
#
# - **Unsloth**: `FastLanguageModel.from_pretrained(..., load_in_4bit=True)` and
#   `FastLanguageModel.get_peft_model`, trained by the `SFTTrainer` that importing Unsloth patched.
# - **Standard**: `AutoModelForCausalLM.from_pretrained` with a `BitsAndBytesConfig` (NF4, double
#   quantization, the compute dtype), PEFT's `prepare_model_for_kbit_training` and
#   `get_peft_model`, trained by TRL's `SFTTrainer`. One change is needed on a CPU: TRL 1.15
#   computes the SFT loss with a fused LM-head kernel written in Triton, which does not exist
#   without a GPU; `PlainLossSFTTrainer` falls back to transformers' own loss there
#   (`Trainer.compute_loss`: full logits, then cross-entropy), and is TRL's trainer unchanged on a
#   GPU.
#
# `run_isolated` runs either one in a fresh Python process, which keeps Unsloth's patches out of
# the baseline and makes the peak memory of each run its own.

# %%
#| export efficient_finetuning
from ftbook.instruction_tuning import conversation_to_prompt_and_output
from ftbook.workbench import PeakMemory, Timer, check_finite, count_parameters

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PIPELINES = ("standard", "unsloth")


@dataclass(frozen=True)
class EfficientConfig:
    """Sizes and hyperparameters of one profile's runs; both pipelines use the same values."""

    n_train: int  # training conversations (13-06's mixture)
    steps: int
    batch_size: int
    max_len: int  # tokens per example (longer ones are truncated)
    rank: int
    alpha: int
    lr: float
    warmup_steps: int
    load_in_4bit: bool
    gradient_checkpointing: bool
    n_eval: int  # held-out prompts of the three-runtime comparison (tasks interleaved)
    max_new_tokens: int
    n_probs: int  # top-k log-probabilities compared with llama.cpp
    n_accuracy: int  # held-out prompts per task for exact match before and after
    timeout_s: int  # limit for one isolated run


EFFICIENT_CONFIGS = {
    "smoke": EfficientConfig(n_train=48, steps=4, batch_size=4, max_len=128, rank=8, alpha=16,
                             lr=2e-3, warmup_steps=0, load_in_4bit=True,
                             gradient_checkpointing=True, n_eval=4, max_new_tokens=8, n_probs=5,
                             n_accuracy=4, timeout_s=300),
    "tiny": EfficientConfig(n_train=400, steps=10, batch_size=8, max_len=192, rank=16, alpha=32,
                            lr=1e-3, warmup_steps=2, load_in_4bit=True,
                            gradient_checkpointing=True, n_eval=16, max_new_tokens=32, n_probs=5,
                            n_accuracy=30, timeout_s=900),
    "full": EfficientConfig(n_train=3200, steps=200, batch_size=16, max_len=512, rank=16,
                            alpha=32, lr=2e-4, warmup_steps=20, load_in_4bit=True,
                            gradient_checkpointing=True, n_eval=16, max_new_tokens=64, n_probs=5,
                            n_accuracy=100, timeout_s=1800),  # the GPU time plan (book/setup.md)
}


def native_bf16() -> bool:
    """bfloat16 compute in hardware: a bf16-capable GPU, or a CPU with AMX / AVX512-BF16 (the
    rule Unsloth's CPU backend uses; without it bf16 is emulated and slower than float32)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def sft_pairs(tokenizer: Any, conversations: Sequence[Sequence[dict]]) -> list[dict]:
    """`{"prompt", "completion"}` strings for TRL: the chat template up to the assistant header
    and the reply followed by EOS (13-06's `conversation_to_prompt_and_output`)."""
    pairs = []
    for messages in conversations:
        prompt, completion = conversation_to_prompt_and_output(tokenizer, messages)
        pairs.append({"prompt": prompt, "completion": completion})
    return pairs


def sft_arguments(cfg: EfficientConfig, output_dir: str | Path, seed: int, bf16: bool) -> dict:
    """The `SFTConfig` arguments both pipelines share."""
    return dict(output_dir=str(output_dir), max_steps=cfg.steps,
                per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr,
                warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", weight_decay=0.0,
                optim="adamw_torch_fused", max_length=cfg.max_len, completion_only_loss=True,
                packing=False, gradient_checkpointing=cfg.gradient_checkpointing, bf16=bf16,
                seed=seed, data_seed=seed, logging_steps=1, save_strategy="no", report_to=[],
                disable_tqdm=True, include_num_input_tokens_seen="non_padding",
                use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)


class StepMeter(TrainerCallback):
    """Per optimizer step: wall time, non-padding input tokens, and the logged loss."""

    def __init__(self) -> None:
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.losses: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start, self._tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_seconds.append(time.perf_counter() - self._start)
        self.step_tokens.append(int(state.num_input_tokens_seen - self._tokens))

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(check_finite(float(logs["loss"]), "SFT loss", state.global_step))


def _plain_loss_trainer_class() -> type:
    """TRL's `SFTTrainer` with transformers' loss where TRL's fused LM head cannot run."""
    from transformers import Trainer
    from trl import SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """TRL 1.15 computes the SFT loss with a fused LM head whose kernel is Triton (CUDA/XPU
        only; `None` elsewhere, so training fails on a CPU). Off those devices this trainer
        computes the loss as transformers does: full logits, then mean cross-entropy over the
        labels that are not -100. On a GPU it is TRL's trainer unchanged."""

        def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if next(model.parameters()).device.type in ("cuda", "xpu"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = {**inputs, "use_cache": False}
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PlainLossSFTTrainer


def _fit(trainer: Any, meter: StepMeter, model: nn.Module, tokenizer: Any, output_dir: Path,
         pipeline: str, extra: dict) -> dict:
    """Train, save the adapter and tokenizer under `output_dir/adapter`, and measure."""
    import resource

    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the meter keeps the losses
    device = next(model.parameters()).device
    with PeakMemory(device, interval=0.01) as peak, Timer(device) as timer:
        trainer.train()
    model.save_pretrained(output_dir / "adapter")
    tokenizer.save_pretrained(output_dir / "adapter")
    if device.type == "cuda":
        process_peak = torch.cuda.max_memory_allocated(device)
    else:
        process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"pipeline": pipeline, "losses": meter.losses, "step_seconds": meter.step_seconds,
            "step_tokens": meter.step_tokens, "train_seconds": timer.seconds,
            "peak_train_bytes": peak.peak_bytes, "process_peak_bytes": process_peak,
            "trainable_params": count_parameters(model, trainable_only=True),
            "optim": str(getattr(trainer.args.optim, "value", trainer.args.optim)),
            "bf16": bool(trainer.args.bf16), "adapter": str(output_dir / "adapter"), **extra}


def _dataset(pairs: Sequence[dict]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p["prompt"] for p in pairs],
                              "completion": [p["completion"] for p in pairs]})


def train_standard(model_name: str, pairs: Sequence[dict], cfg: EfficientConfig,
                   output_dir: str | Path, seed: int = 0) -> dict:
    """QLoRA SFT with transformers + bitsandbytes + PEFT + TRL (eq. 10.1): NF4 base with double
    quantization, LoRA on `LORA_TARGETS`, loss on completions. Returns the measurements."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig

    output_dir = Path(output_dir)
    bf16 = native_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_name, quantization_config=quantization,
                                                 dtype=dtype, device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    set_chat_special_tokens(tokenizer, model)  # end of turn = EOS, as in `sft_pairs`
    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    torch.manual_seed(seed)  # the adapter's initial A, as Unsloth's random_state does
    model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                             target_modules=list(LORA_TARGETS), bias="none",
                                             task_type="CAUSAL_LM"))
    meter = StepMeter()
    trainer = _plain_loss_trainer_class()(
        model=model, processing_class=tokenizer, train_dataset=_dataset(pairs),
        args=SFTConfig(**sft_arguments(cfg, output_dir / "trainer", seed, bf16)),
        callbacks=[meter])
    return _fit(trainer, meter, model, tokenizer, output_dir, "standard", {})


def train_unsloth(model_name: str, pairs: Sequence[dict], cfg: EfficientConfig,
                  output_dir: str | Path, seed: int = 0) -> dict:
    """The same run with Unsloth: `FastLanguageModel` loads the model (4-bit) and adds LoRA;
    the `SFTTrainer` that importing Unsloth patched trains it. Imports Unsloth, which patches
    transformers and TRL for the rest of the process: call it through `run_isolated`. Also
    records what merging into the 4-bit model does (`merge_4bit_error`)."""
    import unsloth  # noqa: F401  (first: it patches transformers and TRL)
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    output_dir = Path(output_dir)
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name, max_seq_length=cfg.max_len, load_in_4bit=cfg.load_in_4bit, dtype=None)
    set_chat_special_tokens(tokenizer, model)  # end of turn = EOS, as in `sft_pairs`
    model = FastLanguageModel.get_peft_model(
        model, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
        target_modules=list(LORA_TARGETS), bias="none", random_state=seed,
        use_gradient_checkpointing="unsloth" if cfg.gradient_checkpointing else False)
    meter = StepMeter()
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=_dataset(pairs),
                         args=SFTConfig(**sft_arguments(cfg, output_dir / "trainer", seed,
                                                        native_bf16())),
                         callbacks=[meter])
    result = _fit(trainer, meter, model, tokenizer, output_dir, "unsloth", {})
    try:
        model.save_pretrained_merged(str(output_dir / "merged_4bit"), tokenizer,
                                     save_method="merged_16bit")
        result["merge_4bit_error"] = None
    except NotImplementedError as error:
        result["merge_4bit_error"] = str(error)
    return result


def export_with_unsloth(adapter_dir: str | Path, output_dir: str | Path, max_len: int,
                        quantization_method: str = "q8_0") -> dict:
    """Unsloth's exporters: reload the adapter over a 16-bit base (`load_in_4bit=False`), write
    merged 16-bit weights (`save_pretrained_merged`), then try `save_pretrained_gguf`, which runs
    llama.cpp's converter and needs a llama.cpp checkout: `UNSLOTH_LLAMA_CPP_PATH` pointing at one
    with a built `llama-quantize`, else Unsloth downloads or clones it, unless
    `UNSLOTH_AUTO_INSTALL=0`. Records the outcome instead of raising."""
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    output_dir = Path(output_dir)
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(adapter_dir), load_in_4bit=False, dtype=torch.float32, max_seq_length=max_len)
    merged = output_dir / "merged_16bit"
    model.save_pretrained_merged(str(merged), tokenizer, save_method="merged_16bit")
    result: dict[str, Any] = {"merged": str(merged), "gguf": [], "gguf_error": None,
                              "llama_cpp_path": os.environ.get("UNSLOTH_LLAMA_CPP_PATH")}
    try:
        files = model.save_pretrained_gguf(str(output_dir / "gguf"), tokenizer,
                                           quantization_method=quantization_method)
        result["gguf"] = [str(f) for f in files]
    except Exception as error:  # noqa: BLE001 - the outcome is what we report
        result["gguf_error"] = f"{type(error).__name__}: {error}"
    return result


JOBS = {"standard": train_standard, "unsloth": train_unsloth, "unsloth_export": export_with_unsloth}


def run_job(job_file: str) -> None:
    """Entry point of an isolated process: run the job described in `job_file` (JSON) and write
    `result.json` beside it."""
    spec = json.loads(Path(job_file).read_text())
    job, kwargs = spec.pop("job"), spec["kwargs"]
    if "cfg" in kwargs:
        kwargs["cfg"] = EfficientConfig(**kwargs["cfg"])
    result = JOBS[job](**kwargs)
    (Path(job_file).parent / "result.json").write_text(json.dumps(result, indent=1))


def run_isolated(job: str, output_dir: str | Path, timeout: float, **kwargs: Any) -> dict:
    """Run `JOBS[job](**kwargs)` in a fresh Python process (Unsloth's import-time patches and the
    peak memory stay in that process) and return its result. The log is `output_dir/log.txt`;
    lines starting with "Unsloth" are returned under `banner`."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if "cfg" in kwargs:
        kwargs["cfg"] = asdict(kwargs["cfg"])
    kwargs["output_dir"] = str(output_dir)
    job_file = output_dir / "job.json"
    job_file.write_text(json.dumps({"job": job, "kwargs": kwargs}))
    (output_dir / "result.json").unlink(missing_ok=True)
    env = {**os.environ, "FTBOOK_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("UNSLOTH_AUTO_INSTALL", "0")  # never download llama.cpp behind our back
    code = f"from ftbook.efficient_finetuning import run_job; run_job({str(job_file)!r})"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as error:
        raise RuntimeError(f"isolated job {job!r} ran past {timeout} s (EfficientConfig."
                           "timeout_s); lower steps or n_train") from error
    log = proc.stdout + proc.stderr
    (output_dir / "log.txt").write_text(log)
    if proc.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-25:])
        raise RuntimeError(f"isolated job {job!r} failed (exit {proc.returncode}); the end of "
                           f"{output_dir / 'log.txt'}:\n{tail}")
    result = json.loads((output_dir / "result.json").read_text())
    result["banner"] = [line.strip() for line in log.splitlines() if line.startswith("Unsloth")]
    return result


# %% [markdown]
# ### Merging, checked against (10.1)
#
# `merge_adapter` is the standard merge: the base in float32, PEFT's adapter on top,
# `merge_and_unload`, then a cast to the storage dtype (bfloat16 by default, as Unsloth's
# `merged_16bit`). `lora_merge_error` recomputes (10.1) by hand from the three safetensors files
# (base, adapter, merged) and reports the largest difference, in units of the storage dtype's
# rounding.

# %%
#| export efficient_finetuning
def merge_adapter(adapter_dir: str | Path, output_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """Merge a PEFT LoRA adapter into its base, eq. (10.1): the base in float32,
    `merge_and_unload`, then cast to `dtype` and saved with `save_pretrained` (and the tokenizer
    saved with the adapter)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_name = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    output_dir = Path(output_dir)
    merged.to(dtype).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(output_dir)
    return output_dir


def _safetensors(folder: str | Path, name: str = "*.safetensors") -> dict[str, torch.Tensor]:
    """The tensors of the files matching `name` in `folder` (a local folder or a cached hub id;
    sharded checkpoints are read whole)."""
    from safetensors.torch import load_file

    path = Path(folder)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(folder), allow_patterns=["*.safetensors"]))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob(name)):
        tensors.update(load_file(str(file)))
    if not tensors:
        raise FileNotFoundError(f"no {name} in {path}")
    return tensors


def lora_merge_error(adapter_dir: str | Path, merged_dir: str | Path) -> dict:
    """Eq. (10.1) by hand: for every adapted weight, W0 + (alpha / r) B A in float32, cast to the
    merged file's dtype, against the merged file. Returns the largest absolute difference, the
    largest |(alpha / r) B A| (the size of what was merged) and the number of weights."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    if config.get("use_rslora"):
        scaling = config["lora_alpha"] / config["r"] ** 0.5
    adapter = _safetensors(adapter_dir, "adapter_model.safetensors")
    base = _safetensors(config["base_model_name_or_path"])
    merged = _safetensors(merged_dir)
    worst, largest, count = 0.0, 0.0, 0
    for key, lora_a in adapter.items():
        if ".lora_A." not in key:
            continue
        lora_b = adapter[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        delta = (lora_b.float() @ lora_a.float()) * scaling  # (out, r) @ (r, in)
        expected = (base[name].float() + delta).to(merged[name].dtype)
        worst = max(worst, (merged[name].float() - expected.float()).abs().max().item())
        largest, count = max(largest, delta.abs().max().item()), count + 1
    if count == 0:
        raise ValueError(f"{adapter_dir}: no lora_A weights in adapter_model.safetensors")
    return {"max_abs_error": worst, "max_abs_delta": largest, "weights": count}


# %% [markdown]
# ### The book's GGUF exporter
#
# A GGUF file is a header of typed key-value metadata followed by named tensors. For llama.cpp
# and for transformers' GGUF loader to read a model, the metadata must describe the
# architecture (`<arch>.block_count`, `<arch>.embedding_length`, heads, RoPE base and dimension,
# RMSNorm epsilon, context length) and the tokenizer, and the tensors must carry GGUF's names
# (`token_embd`, `blk.N.attn_q`, ..., `output_norm`; `output` only when the LM head is not tied to
# the embeddings). The `gguf` package maps the names and writes the file; the choices are ours.
#
# **Architectures.** Two are covered: `llama` (SmolLM2 in `tiny`, the book's own LM) and `qwen2`
# (Qwen2.5 in `full`). They differ in two places. Qwen2 has biases on the q, k and v projections,
# written as `blk.N.attn_q.bias` (1-D, so F32). And llama.cpp runs Qwen2 with the "NeoX" rotary
# layout, which is Hugging Face's rotate-half, so its q and k rows are written as they are; only
# `llama` needs the permutation $P$ of (10.5).
#
# **Two kinds of tokenizer.** GGUF names the tokenizer algorithm in `tokenizer.ggml.model`:
#
# - `llama`: SentencePiece BPE with byte fallback (the book's own LM). llama.cpp merges the
#   adjacent pair whose result has the highest *score*; SentencePiece scores a piece by minus its
#   merge rank, so we write score $= -$rank from `tokenizer.json`'s merges. Token types: control
#   for the special tokens, byte for `<0x..>`, unknown for `<unk>`.
# - `gpt2`: byte-level BPE (SmolLM2, Qwen2.5). Every byte is a character of the vocabulary
#   ("Ġ" is the space), pairs merge by rank, so the merges are the whole algorithm and no scores
#   are written. Token types: control for the special tokens (`<|im_start|>`, `<|im_end|>`,
#   `<|endoftext|>`, ...), user-defined for other added tokens, normal for the rest.
#
# Byte-level BPE first cuts the text into words with a *pre-tokenizer*, and models differ here:
# GPT-2's regex keeps digit runs together (" 2024" is one word), SmolLM2 first splits every digit
# off, Qwen2 uses its own regex with single digits. llama.cpp does not read the regex from the
# file; it reads a name, `tokenizer.ggml.pre`, and applies the rules it has compiled in for that
# name. `gguf_pre_tokenizer` derives the name from the Hugging Face pre-tokenizer, step by step
# (`GGUF_PRE_TOKENIZERS` lists the three we export), and refuses one it does not recognise: a
# wrong name still loads, and then tokenizes numbers differently from the model's training data.
#
# **Special ids.** bos, eos, unk and pad as the tokenizer has them, and the end-of-turn id
# (`tokenizer.ggml.eot_token_id`, `<|im_end|>` for ChatML), which llama.cpp's chat mode stops on.
# The chat template goes in as text (`tokenizer.chat_template`). `add_bos_token` is false: the
# chat template writes every special token itself.
#
# **Space prefix.** A SentencePiece tokenizer puts "▁" before the first word of an input only;
# llama.cpp with `add_space_prefix` puts a space after *every* special token, which would change
# every chat prompt ("<|user|>\n" would become "<|user|>▁\n"). We write `add_space_prefix = false`:
# chat-formatted text then tokenizes identically, and only bare text loses its leading "▁".
#
# **Types.** Norm weights and biases stay F32 (1-D tensors always do); matrices are F16, or Q8_0
# where their rows split into blocks of 32, else F16.

# %%
#| export efficient_finetuning
GGUF_TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# Hugging Face architecture -> (GGUF architecture, q/k rows permuted by P of eq. 10.5)
GGUF_ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True),
                      "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}  # llama.cpp: NeoX = rotate-half
def gguf_tokenizer_fields(tokenizer: Any) -> dict:
    """The GGUF tokenizer metadata of a BPE tokenizer, read from its `tokenizer.json`: `model`
    ("gpt2" for byte-level BPE, "llama" for SentencePiece BPE with byte fallback), `pre`,
    tokens, scores (SentencePiece only: minus the merge rank that first produces the token),
    token types, merges, special ids (bos, eos, unk, pad, end of turn) and the chat template."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    byte_level = any(kind == "ByteLevel" for kind, _ in pre_tokenizer_steps(tokenizer))
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise NotImplementedError("write_gguf handles byte-level BPE and SentencePiece BPE with "
                                  f"byte fallback; this tokenizer is {model.get('type')}")
    vocab = model["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    for added in spec["added_tokens"]:  # ids past the BPE vocabulary
        tokens += [""] * (added["id"] + 1 - len(tokens))
        tokens[added["id"]] = added["content"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {t["id"] for t in spec["added_tokens"] if t["special"]}
    user_defined = {t["id"] for t in spec["added_tokens"] if not t["special"]}
    types, scores = [], None
    if byte_level:
        for index in range(len(tokens)):
            kind = (gguf.TokenType.CONTROL if index in special else gguf.TokenType.USER_DEFINED
                    if index in user_defined else gguf.TokenType.NORMAL)
            types.append(int(kind))
    else:
        rank: dict[str, int] = {}
        for position, merge in enumerate(merges):
            rank.setdefault(merge.replace(" ", ""), position)
        scores = []
        for index, token in enumerate(tokens):
            if index == tokenizer.unk_token_id:
                kind = gguf.TokenType.UNKNOWN
            elif index in special:
                kind = gguf.TokenType.CONTROL
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                kind = gguf.TokenType.BYTE
            else:
                kind = gguf.TokenType.NORMAL
            types.append(int(kind))
            scores.append(-float(rank[token]) if kind == gguf.TokenType.NORMAL and token in rank
                          else 0.0)
    eot = None
    if tokenizer.chat_template:
        eot = tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))
    return {"model": "gpt2" if byte_level else "llama",
            "pre": gguf_pre_tokenizer(tokenizer) if byte_level else "default",
            "tokens": tokens, "scores": scores, "types": types, "merges": merges,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id, "eot": eot,
            "chat_template": tokenizer.chat_template}


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type", "default") != "default":
        raise NotImplementedError(f"RoPE scaling {parameters['rope_type']!r} is not exported")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(model: nn.Module, tokenizer: Any, path: str | Path, qtype: str = "f16",
               name: str = "ftbook") -> dict:
    """Write a Llama or Qwen2 `model` and its tokenizer as a GGUF file: metadata, then tensors
    under GGUF's names (Llama's q/k rows permuted, eq. 10.5), 1-D tensors (norms, biases) in
    F32, matrices in `qtype` ("f16" or "q8_0", eq. 10.3; a matrix whose rows are not a multiple
    of 32 falls back to F16). Returns the tensor types, the fallbacks and the file size."""
    config = model.config
    if config.model_type not in GGUF_ARCHITECTURES:
        raise NotImplementedError(
            f"write_gguf covers the {' and '.join(GGUF_ARCHITECTURES)} architectures, not "
            f"{config.model_type!r}: use llama.cpp's convert_hf_to_gguf.py (for example through "
            "Unsloth's save_pretrained_gguf)")
    architecture, permute = GGUF_ARCHITECTURES[config.model_type]
    if permute and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise NotImplementedError("a Llama with biases is not exported (its q/k biases would need "
                                  "the permutation of eq. 10.5 too)")
    if qtype not in GGUF_TYPES:
        raise ValueError(f"qtype must be one of {sorted(GGUF_TYPES)}, got {qtype!r}")
    tensor_type, file_type = GGUF_TYPES[qtype]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[architecture])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(file_type))
    fields = gguf_tokenizer_fields(tokenizer)
    writer.add_tokenizer_model(fields["model"])
    writer.add_tokenizer_pre(fields["pre"])
    writer.add_token_list(fields["tokens"])
    if fields["scores"] is not None:
        writer.add_token_scores(fields["scores"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key in ("bos", "eos", "unk", "pad", "eot"):
        if fields[key] is not None:
            getattr(writer, f"add_{key}_token_id")(fields[key])
    writer.add_add_bos_token(False)  # the chat template writes the special tokens
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if fields["chat_template"]:
        writer.add_chat_template(fields["chat_template"])
    names = gguf.get_tensor_name_map(architecture, config.num_hidden_layers)
    types, fallback = {}, []
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when `output` is absent
        stem, suffix = key.rsplit(".", 1)
        gguf_name = names.get_name(stem)
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {key!r}")
        gguf_name = f"{gguf_name}.{suffix}"
        array = tensor.detach().float().cpu().numpy()
        if permute and key.endswith("q_proj.weight"):
            array = permute_for_gguf(array, config.num_attention_heads)
        elif permute and key.endswith("k_proj.weight"):
            array = permute_for_gguf(array, config.num_key_value_heads)
        if array.ndim == 1:
            writer.add_tensor(gguf_name, array.astype(np.float32))
            types[gguf_name] = "F32"
        elif tensor_type == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % Q8_0_BLOCK == 0:
            packed = quantize_q8_0(array)
            writer.add_tensor(gguf_name, packed, raw_shape=packed.shape, raw_dtype=tensor_type)
            types[gguf_name] = "Q8_0"
        else:
            if tensor_type != gguf.GGMLQuantizationType.F16:
                fallback.append(gguf_name)
            writer.add_tensor(gguf_name, array.astype(np.float16))
            types[gguf_name] = "F16"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": str(path), "bytes": Path(path).stat().st_size, "types": types,
            "fallback": fallback}


def gguf_metadata(path: str | Path, prefix: str = "") -> dict:
    """The metadata of a GGUF file whose keys start with `prefix`, as Python values."""
    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()
            if key.startswith(prefix)}


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True
              ) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a GGUF file with transformers (`gguf_file=`; quantized tensors are
    dequantized to `dtype`); the tokenizer is None unless `with_tokenizer` (building it is the
    slow part). transformers 5.17's GGUF tokenizer can take its EOS token from the BOS id, sets
    no pad token, and gives a Llama-architecture byte-level BPE GPT-2's pre-tokenizer whatever
    the file names: eos, pad and bos are restored from the model config, which reads them
    correctly, and the pre-tokenizer from `tokenizer.ggml.pre`. The tokenizer pads on the left,
    for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    if not with_tokenizer:
        return model.eval(), None
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for role in ("eos", "pad", "bos"):
        index = getattr(model.config, f"{role}_token_id", None)
        if index is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(index))
    pre = gguf_metadata(path, "tokenizer.ggml.pre").get("tokenizer.ggml.pre")
    if pre in GGUF_PRE_TOKENIZERS and gguf_pre_tokenizer(tokenizer) != pre:
        set_pre_tokenizer(tokenizer, pre)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


# %% [markdown]
# ### Greedy decoding, three ways
#
# To compare runtimes we feed all three the *same token ids* (the chat-formatted prompt,
# tokenized once) and decode greedily, recording the log-probabilities of each step: transformers
# gives the full distribution; llama.cpp, through the `xllamacpp` wheel's in-process server,
# gives the top $k$. Decoding stops at EOS (included) or after `max_new_tokens`.

# %%
#| export efficient_finetuning
@torch.no_grad()
def greedy_transformers(model: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int,
                        eos_token_id: int) -> dict:
    """Greedy continuation of one prompt: `ids` (EOS included when produced) and `logprobs`
    (steps, vocab), the log-softmax of each step's logits."""
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([list(prompt_ids)], device=device), do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=eos_token_id, output_logits=True,
                         return_dict_in_generate=True)
    ids = out.sequences[0, len(prompt_ids):].tolist()
    if eos_token_id in ids:
        ids = ids[:ids.index(eos_token_id) + 1]
    logits = torch.stack(out.logits)[: len(ids), 0].float()  # (steps, vocab)
    return {"ids": ids, "logprobs": logits.log_softmax(-1).cpu()}


def llama_cpp_problem() -> str | None:
    """None when the `xllamacpp` wheel (llama.cpp) is importable, else the reason."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError as error:
        return f"xllamacpp is not importable ({error}); pip install xllamacpp"
    return None


class LlamaCppModel:
    """A GGUF file run by llama.cpp in this process (`xllamacpp.Server`, no HTTP involved):
    greedy continuation of token ids with the top-k log-probabilities of every step."""

    def __init__(self, path: str | Path, n_ctx: int = 1024, threads: int = 1) -> None:
        import xllamacpp

        field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
        tokens = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(tokens)
                         if len(t) == 6 and t.startswith("<0x") and t.endswith(">")}
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx, params.n_parallel, params.warmup = n_ctx, 1, False
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
        params.sampling.temp, params.sampling.top_k = 0.0, 1
        params.verbosity = -1  # llama.cpp's log goes to stderr otherwise
        self.server = xllamacpp.Server(params)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int,
               n_probs: int = 5) -> dict:
        """`ids` (EOS included when produced) and `top_logprobs`: for each step,
        {token id: log-probability} of the `n_probs` most likely tokens, or None.

        The server reports text, not tokens: byte-fallback tokens that together form one UTF-8
        character come back as one entry (the last token's id and probabilities, all the
        bytes). We split such an entry back into its byte tokens (their probabilities are not
        reported: None), and decode 3 tokens further so that a character cut by
        `max_new_tokens` is completed, then cut the reply to `max_new_tokens`."""
        reply = self.server.handle_completions({
            "prompt": [int(i) for i in prompt_ids], "max_tokens": max_new_tokens + 3,
            "temperature": 0.0, "n_probs": n_probs, "cache_prompt": False})
        if "error" in reply:
            raise RuntimeError(f"llama.cpp: {reply['error']}")
        ids: list[int] = []
        tops: list[dict[int, float] | None] = []
        for step in (reply["choices"][0]["logprobs"] or {}).get("content", []):
            own = step["bytes"] if step["id"] in self.byte_ids.values() else None
            own_length = 1 if own is not None else len(step["token"].encode("utf-8"))
            for byte in step["bytes"][: max(len(step["bytes"]) - own_length, 0)]:
                ids.append(self.byte_ids[byte])  # a withheld byte token
                tops.append(None)
            ids.append(int(step["id"]))
            tops.append({t["id"]: t["logprob"] for t in step["top_logprobs"]})
        ids, tops = ids[:max_new_tokens], tops[:max_new_tokens]
        if eos_token_id in ids:
            cut = ids.index(eos_token_id) + 1
            ids, tops = ids[:cut], tops[:cut]
        return {"ids": ids, "top_logprobs": tops}

    def next_token(self, prompt: str | Sequence[int], n_probs: int = 5) -> dict:
        """llama.cpp's view of a prompt, given as text (llama.cpp tokenizes it, special tokens
        included) or as token ids: `prompt_tokens`, the number of tokens it evaluated, and
        `top_logprobs` of the next few tokens (greedy, end of turn ignored). Four tokens, since
        the server holds back a byte token until its UTF-8 character is complete."""
        reply = self.server.handle_completions({
            "prompt": prompt if isinstance(prompt, str) else [int(i) for i in prompt],
            "max_tokens": 4, "temperature": 0.0, "n_probs": n_probs, "cache_prompt": False,
            "ignore_eos": True})  # an end-of-turn token would end the reply unreported
        if "error" in reply:
            raise RuntimeError(f"llama.cpp: {reply['error']}")
        steps = (reply["choices"][0]["logprobs"] or {}).get("content") or []
        return {"prompt_tokens": reply["usage"]["prompt_tokens"],
                "top_logprobs": [{t["id"]: t["logprob"] for t in step["top_logprobs"]}
                                 for step in steps]}

    def tokenizes_like(self, text: str, ids: Sequence[int]) -> bool:
        """Whether llama.cpp tokenizes `text` to `ids`. The server reports no prompt ids, so the
        check is indirect: the same number of prompt tokens and bit-identical next-token
        log-probabilities from the text and from the ids (the same deterministic computation
        on the same input; any other input of that length changes them)."""
        return self.next_token(text) == self.next_token(ids)

    def close(self) -> None:
        del self.server


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first step where two token sequences differ (None if identical)."""
    for step, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return step
    return None if len(a) == len(b) else min(len(a), len(b))


# %% [markdown]
# ## The pipeline end to end
#
# ### Data and model
#
# The training data are 13-06's conversations (synthetic tasks with checkable answers and
# filtered Alpaca, temperature-mixed), rendered with the tokenizer's chat template into
# (prompt, completion) pairs, the completion ending with the end-of-turn token. The model is the
# profile's chat LM, the one 13-06 starts from: SmolLM2-135M-Instruct in `tiny` (Appendix C),
# base Qwen2.5-0.5B in `full`, a random 2-layer Llama with SmolLM2's tokenizer in `smoke`. It is
# a folder loaded with `from_pretrained`, which is what `FastLanguageModel.from_pretrained`
# needs. The tiny model already follows instructions, but it answers 13-06's tasks at length and
# in its own words, so their exact-match accuracy starts near zero (13-06): a fine-tune that
# works shows up as a jump, measured at the end of the chapter.

# %%
from transformers import AutoTokenizer

from ftbook.base_models import chat_lm_name, smollm2_gguf_path
from ftbook.instruction_tuning import SFT_RECIPES, build_sft_data, render_prompt, sft_mixture
from ftbook.workbench import cache_dir

cfg = pick(PROFILE, EFFICIENT_CONFIGS)
print(cfg)
MODEL = chat_lm_name(PROFILE)
# the GGUF file the tiny and smoke tokenizers were converted from (Appendix C); full: a hub model
SOURCE_GGUF = None if PROFILE == "full" else smollm2_gguf_path()
tokenizer = AutoTokenizer.from_pretrained(MODEL)
set_chat_special_tokens(tokenizer)  # end of turn = EOS, pad distinct (a no-op for tiny, smoke)
recipe = pick(PROFILE, SFT_RECIPES)
sft_data = build_sft_data(recipe, seed=SEED)
conversations = sft_mixture(sft_data, recipe, recipe.temperature, seed=SEED)[: cfg.n_train]
pairs = sft_pairs(tokenizer, conversations)
print(f"{len(pairs)} training pairs; the first:\n{pairs[0]['prompt'] + pairs[0]['completion']!r}")
assert all(p["completion"].endswith(tokenizer.eos_token) for p in pairs)
RUNS = cache_dir(CHAPTER, PROFILE)

# %% [markdown]
# ### Training, side by side
#
# The standard pipeline first, then Unsloth, each in its own process; the Unsloth process prints
# its banner (shown below), which states the backend it chose.

# %%
results = {"standard": run_isolated("standard", RUNS / "standard", cfg.timeout_s,
                                    model_name=MODEL, pairs=pairs, cfg=cfg, seed=SEED)}
if UNSLOTH_PROBLEM is None:
    results["unsloth"] = run_isolated("unsloth", RUNS / "unsloth", cfg.timeout_s,
                                      model_name=MODEL, pairs=pairs, cfg=cfg, seed=SEED)
    print("\n".join(results["unsloth"]["banner"]))
else:
    print(f"Unsloth skipped: {UNSLOTH_PROBLEM}")
for name, r in results.items():
    assert len(r["losses"]) == cfg.steps, f"{name}: {len(r['losses'])} losses logged"

# %% [markdown]
# ## Benchmarks
#
# Per pipeline: the median step time and tokens per second (non-padding tokens, the first step
# excluded as warm-up), the peak memory of training above the loaded model (GPU: allocated
# memory; CPU: resident set size, sampled), the peak of the whole process, and the final loss
# (mean of the last three steps). Both runs see the same batches in the same order.

# %%
import matplotlib.pyplot as plt
import pandas as pd

from ftbook.rlhf_ppo import forward_tolerance  # 13-08
from ftbook.workbench import show_figure, show_table


def summarize(r: dict) -> dict:
    seconds, tokens = r["step_seconds"][1:], r["step_tokens"][1:]
    return {"median s/step": float(np.median(seconds)),
            "tokens/s": sum(tokens) / max(sum(seconds), 1e-9),
            "training peak MiB": r["peak_train_bytes"] / 2**20,
            "process peak MiB": r["process_peak_bytes"] / 2**20,
            "final loss (last 3)": float(np.mean(r["losses"][-3:])),
            "first loss": r["losses"][0], "trainable params": r["trainable_params"],
            "optimizer": r["optim"], "bf16": r["bf16"]}


benchmark = pd.DataFrame({name: summarize(r) for name, r in results.items()}).T
show_table(benchmark, "benchmark", CHAPTER)
logits_mib = 2 * 4 * cfg.batch_size * cfg.max_len * len(tokenizer) / 2**20  # eq. (10.2)
print(f"eq. (10.2) for this run (B={cfg.batch_size}, T={cfg.max_len}, V={len(tokenizer)}): "
      f"{logits_mib:.0f} MiB of float32 logits and gradient")
if "unsloth" in results:
    ratio = {k: benchmark.loc["standard", k] / benchmark.loc["unsloth", k]
             for k in ("median s/step", "training peak MiB")}
    saved = benchmark.loc["standard", "training peak MiB"] - benchmark.loc["unsloth",
                                                                           "training peak MiB"]
    print(f"standard / Unsloth: step time {ratio['median s/step']:.2f}x, training peak "
          f"{ratio['training peak MiB']:.2f}x ({saved:.0f} MiB less with Unsloth); first losses "
          f"{results['standard']['losses'][0]:.4f} and {results['unsloth']['losses'][0]:.4f}")
    # the pipelines differ in bfloat16 against float32 frozen weights (relative rounding 2^-8
    # of each); 0.05 is a sanity bound at the format's precision relative to a first loss of a
    # few nats, not a derived worst case (the printed agreement is far tighter)
    assert abs(results["standard"]["losses"][0] - results["unsloth"]["losses"][0]) < 0.05, \
        "same model, adapter initialisation and batch: the first losses must agree"

fig, ax = plt.subplots(figsize=(6.5, 3.3))
for name, r in results.items():
    ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=name, marker=".")
ax.set(xlabel="step", ylabel="SFT loss (completion tokens)", title="QLoRA SFT, same batches")
ax.legend()
show_figure(fig, "loss_curves", CHAPTER)

# %% [markdown]
# **Reading the table.** The first losses agree (same model, adapter and batch; asserted); the
# curves then differ only by numerics, so the two pipelines train the same model. The clearest
# difference is memory. With SmolLM2's vocabulary of 49,152 tokens, the logits and their
# gradient (10.2) are the largest tensors of a step, printed above; Unsloth's chunked
# cross-entropy never materialises them, and its training peak is lower by an amount of that
# order. Chunking saves memory, not arithmetic: both losses multiply the same hidden states by
# the same output matrix, so the chunked loss alone gives no reason for a faster step, and both
# pipelines run the same PyTorch and bitsandbytes kernels for the transformer itself. The step
# time ratio is one run of each pipeline, with no interval: the median over steps discounts an
# occasional slow step, not a machine that was busier during one pipeline's run than during the
# other's.
#
# What the numbers cannot say. Unsloth's other CPU choices are bf16 frozen weights (where the
# standard recipe's `prepare_model_for_kbit_training` upcasts the non-quantized weights to
# float32) and its own handling of bitsandbytes' CPU weight layout. The published 2x speed and
# 60-80% memory claims rest on the GPU kernels and activation offloading, which the CPU backend
# does not have; they can only be checked by the `full` profile on a GPU.
#
# ## Export
#
# ### Merged 16-bit weights
#
# The adapters were trained over a 4-bit base, and Unsloth refused to merge them there (the
# message it raised in the training process is printed below). Both exporters therefore reload
# the adapter over a 16-bit base: Unsloth's `save_pretrained_merged(..., "merged_16bit")`, in an
# isolated process, and our `merge_adapter` (PEFT). We check (10.1) by hand on both and compare
# the two files.

# %%
import shutil

FINETUNED = "unsloth" if "unsloth" in results else "standard"
adapter_dir = Path(results[FINETUNED]["adapter"])
if "unsloth" in results:
    print("merging into the 4-bit model:", results["unsloth"]["merge_4bit_error"])
merged_dir = merge_adapter(adapter_dir, RUNS / "merged_ours")
merge_checks = {"ours (PEFT merge_and_unload)": lora_merge_error(adapter_dir, merged_dir)}
unsloth_export = None
if "unsloth" in results:
    unsloth_export = run_isolated("unsloth_export", RUNS / "unsloth_export", cfg.timeout_s,
                                  adapter_dir=str(adapter_dir), max_len=cfg.max_len)
    merge_checks["Unsloth save_pretrained_merged"] = lora_merge_error(adapter_dir,
                                                                      unsloth_export["merged"])
merge_table = pd.DataFrame(merge_checks).T
show_table(merge_table, "merge_check", CHAPTER, floatfmt="{:.3g}")
# exact: the same float32 arithmetic, (B A) s + W0 on the same CPU kernels, then one rounding
assert (merge_table["max_abs_error"] == 0).all(), "the merge must equal eq. (10.1) exactly"
if unsloth_export is not None:
    ours_sd = _safetensors(merged_dir)
    theirs_sd = _safetensors(unsloth_export["merged"])
    identical = all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)
    print(f"our merged file and Unsloth's: {len(ours_sd)} tensors, identical: {identical}")

# %% [markdown]
# Both merges reproduce (10.1) exactly: the hand computation, rounded to bfloat16 the same way,
# gives the same bits. (The adapted weights change by $\max |\Delta W|$ in the table; a bfloat16
# step near a weight of size 0.1 is $2^{-11} \approx 5 \cdot 10^{-4}$, so small updates partly
# round away when stored in 16 bits: keep a float32 copy if you plan to continue training.)
#
# ### GGUF: the book's exporter and Unsloth's
#
# We write the merged model as F16 and as Q8_0. Unsloth's `save_pretrained_gguf` runs llama.cpp's
# converter; without a llama.cpp checkout it tries to download or clone one, and with
# `UNSLOTH_AUTO_INSTALL=0` (which `run_isolated` sets unless you set it yourself) it stops with an
# error instead. Its outcome is printed; set `UNSLOTH_LLAMA_CPP_PATH` to a llama.cpp source tree
# with a built `llama-quantize` to make it write files.
#
# The tokenizer goes in with its pre-tokenizer's llama.cpp name. For SmolLM2 that is `smollm`,
# the name its own GGUF file carries; Appendix C's conversion installed that pre-tokenizer, where
# transformers' GGUF loader would have given GPT-2's (asserted below against the source file).

# %%
from transformers import AutoModelForCausalLM

merged_model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
set_chat_special_tokens(merged_tokenizer, merged_model)
merged_tokenizer.padding_side = "left"
source_meta = gguf_metadata(SOURCE_GGUF, "tokenizer.") if SOURCE_GGUF else {}
if source_meta:
    assert gguf_pre_tokenizer(merged_tokenizer) == source_meta["tokenizer.ggml.pre"]
print("pre-tokenizer of the export:", gguf_pre_tokenizer(merged_tokenizer),
      pre_tokenizer_steps(merged_tokenizer))
GGUF_DIR = RUNS / "gguf"
shutil.rmtree(GGUF_DIR, ignore_errors=True)
GGUF_DIR.mkdir(parents=True)
exports = {q: write_gguf(merged_model, merged_tokenizer, GGUF_DIR / f"model-{q}.gguf", q)
           for q in ("f16", "q8_0")}
safetensors_bytes = (merged_dir / "model.safetensors").stat().st_size
export_table = pd.DataFrame({
    q: {"MiB": e["bytes"] / 2**20,
        "bits/parameter": 8 * e["bytes"] / sum(p.numel() for p in merged_model.parameters()),
        "Q8_0 tensors": sum(t == "Q8_0" for t in e["types"].values()),
        "F16 tensors": sum(t == "F16" for t in e["types"].values()),
        "F32 tensors": sum(t == "F32" for t in e["types"].values())}
    for q, e in exports.items()}).T
export_table.loc["merged safetensors (bf16)", "MiB"] = safetensors_bytes / 2**20
show_table(export_table, "gguf_files", CHAPTER)
print("kept in F16 by the Q8_0 export (rows not a multiple of 32):",
      exports["q8_0"]["fallback"] or "none")
if unsloth_export is not None:
    print("Unsloth's GGUF exporter:", unsloth_export["gguf"] or unsloth_export["gguf_error"])

# %% [markdown]
# ### The tokenizer in the file
#
# Two checks of the tokenizer metadata. First, against the GGUF file the model came from
# (llama.cpp's own converter wrote it): every `tokenizer.*` key, compared value for value.
# Three differences are ours on purpose: the pad id (the book keeps pad distinct from the end of
# turn, {ref}`instruction-tuning`; llama.cpp never pads), the end-of-turn id (added), and
# `add_eos_token` (written as false; absent means false).

# %%
EXPECTED_DIFFERENCES = {"tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id",
                        "tokenizer.ggml.add_eos_token"}
ours_meta = gguf_metadata(GGUF_DIR / "model-f16.gguf", "tokenizer.")


def shown(value: Any) -> str:
    return f"list of {len(value)}" if isinstance(value, list) else repr(value)[:40]


if source_meta:
    meta_table = pd.DataFrame({key: {"source file": shown(source_meta.get(key, "absent")),
                                     "our export": shown(ours_meta.get(key, "absent")),
                                     "equal": source_meta.get(key) == ours_meta.get(key)}
                               for key in sorted(set(source_meta) | set(ours_meta))}).T
    show_table(meta_table, "tokenizer_metadata", CHAPTER)
    differing = set(meta_table.index[~meta_table["equal"].astype(bool)])
    assert differing <= EXPECTED_DIFFERENCES, f"unexpected differences: {differing}"
    print(f"{len(meta_table) - len(differing)} of {len(meta_table)} keys equal; the others: "
          f"{sorted(differing)}")
else:
    print("no source GGUF file for this profile's model (a hub model): nothing to compare")

# %% [markdown]
# Second, whether llama.cpp, reading our file, cuts text into the same token ids as the Hugging
# Face tokenizer. The `xllamacpp` server reports no prompt ids, so `LlamaCppModel.tokenizes_like`
# checks it indirectly: a prompt given as text and the same prompt given as our ids must give
# the same number of prompt tokens and bit-identical next-token log-probabilities. The texts: the
# chat-formatted evaluation prompts, Alpaca replies as bare text, and a few that stress the
# pre-tokenizer (numbers after runs of spaces, contractions, accents, emoji, code). We check the
# tokenizer of the export and, for comparison, the same tokenizer with GPT-2's pre-tokenizer,
# which is what transformers' GGUF loader builds from SmolLM2's file.

# %%
from ftbook.instruction_tuning import answer_is_correct
from ftbook.workbench import binomial_interval

STRESS_TEXTS = ["In  2024 we sold  12,500 units.", "don't   stop\n\n  42 times", "x=1234567;  y = 3.14",
                "café naïve ünïcödé 😀", "def f(a, b):\n    return a  +  b  # sum", "    7\t 8\n9"]
EXACT_TASKS = sorted({e["category"] for e in sft_data["synthetic_heldout"] if e["answer"]})
by_task = {}
for example in sft_data["synthetic_heldout"]:
    if example["category"] in EXACT_TASKS:
        by_task.setdefault(example["category"], []).append(example)
eval_examples = [by_task[t][i] for i in range(cfg.n_eval) for t in EXACT_TASKS
                 if i < len(by_task[t])][: cfg.n_eval]  # tasks interleaved
eval_prompts = [render_prompt(merged_tokenizer, e["messages"][0]["content"]) for e in eval_examples]
eval_ids = [merged_tokenizer(p, add_special_tokens=False).input_ids for p in eval_prompts]
tokenizer_texts = (STRESS_TEXTS + [c[-1]["content"] for c in sft_data["alpaca_heldout"][:4]]
                   + eval_prompts[:4])
loader_tokenizer = AutoTokenizer.from_pretrained(MODEL)
set_pre_tokenizer(loader_tokenizer, "gpt2")  # what transformers' GGUF loader gives SmolLM2
LLAMA_CPP_PROBLEM = llama_cpp_problem()
tokenizer_rows = {}
loader_differs = [merged_tokenizer(t, add_special_tokens=False).input_ids
                  != loader_tokenizer(t, add_special_tokens=False).input_ids
                  for t in tokenizer_texts]
if LLAMA_CPP_PROBLEM is None:
    runner = LlamaCppModel(GGUF_DIR / "model-q8_0.gguf", n_ctx=512, threads=2)
    same = [runner.tokenizes_like(t, merged_tokenizer(t, add_special_tokens=False).input_ids)
            for t in tokenizer_texts]
    same_loader = [s if not differs else runner.tokenizes_like(
        t, loader_tokenizer(t, add_special_tokens=False).input_ids)
        for t, s, differs in zip(tokenizer_texts, same, loader_differs, strict=True)]
    runner.close()
    tokenizer_rows["export's tokenizer"] = {"texts tokenized as llama.cpp does": sum(same)}
    tokenizer_rows["GPT-2's pre-tokenizer (the GGUF loader's)"] = {
        "texts tokenized as llama.cpp does": sum(same_loader)}
    for row in tokenizer_rows.values():
        row["texts"] = len(tokenizer_texts)
    show_table(pd.DataFrame(tokenizer_rows).T, "llama_cpp_tokenization", CHAPTER)
    assert all(same), [t for t, s in zip(tokenizer_texts, same, strict=True) if not s]
else:
    print(f"llama.cpp skipped: {LLAMA_CPP_PROBLEM}")
train_texts = [p["prompt"] + p["completion"] for p in pairs]
train_differs = sum(merged_tokenizer(t, add_special_tokens=False).input_ids
                    != loader_tokenizer(t, add_special_tokens=False).input_ids for t in train_texts)
print(f"texts the two tokenizers cut differently: {sum(loader_differs)} of "
      f"{len(tokenizer_texts)} above, {train_differs} of the {len(train_texts)} training texts")

# %% [markdown]
# llama.cpp reads our file as the Hugging Face tokenizer does, on every text (asserted). GPT-2's
# pre-tokenizer parts from both on texts with a run of spaces before a number: its regex makes
# " 12" one word, while SmolLM2's splitter cuts the digit off and leaves the run of spaces as one
# token. The printed count says how many of this chapter's training texts that touches: a few
# percent, enough that a model trained on the loader's tokenizer would see other ids than
# SmolLM2 saw in pretraining, and that an export naming the wrong pre-tokenizer would serve the
# model text cut differently from its training data.
#
# ### Parity: our GGUF read back by transformers
#
# transformers reads GGUF files itself (`from_pretrained(folder, gguf_file=...)`, dequantizing to
# float32): an independent reader of our metadata and tensors. We load both files and compare
# logits with the merged model on the evaluation prompts, and the reloaded tokenizer (built from
# the F16 file) with ours on the evaluation prompts and on bare text.

# %%
gguf_models = {q: load_gguf(GGUF_DIR / f"model-{q}.gguf", with_tokenizer=q == "f16")
               for q in exports}
gguf_tokenizer = gguf_models["f16"][1]
token_rows = {}
for name, tok in (("GGUF F16 (transformers)", gguf_tokenizer), ("original", merged_tokenizer)):
    token_rows[name] = {
        "prompts and texts with the same ids": sum(
            tok(t, add_special_tokens=False).input_ids
            == merged_tokenizer(t, add_special_tokens=False).input_ids
            for t in eval_prompts + STRESS_TEXTS) / len(eval_prompts + STRESS_TEXTS),
        "EOS / pad ids": (tok.eos_token_id, tok.pad_token_id),
        "bare text 'Hello world'": str(tok.tokenize("Hello world"))}
show_table(pd.DataFrame(token_rows).T, "tokenizer_round_trip", CHAPTER)
assert all(row["prompts and texts with the same ids"] == 1.0 for row in token_rows.values())
assert (gguf_tokenizer.eos_token_id, gguf_tokenizer.pad_token_id) == (
    merged_tokenizer.eos_token_id, merged_tokenizer.pad_token_id)

# F16 holds every bfloat16 value exactly, except those below 2^-17 in magnitude: they fall in
# float16's subnormal range (spacing 2^-24) and round by at most 2^-25; 1-D tensors are F32
merged_state = merged_model.state_dict()
f16_state = gguf_models["f16"][0].state_dict()
weight_gap = max((f16_state[k] - w).abs().max().item() for k, w in merged_state.items())
inexact = sum(int(((f16_state[k] != w) & (w.abs() >= 2.0**-17)).sum())
              for k, w in merged_state.items())
tiny_values = sum(int((w.abs() < 2.0**-17).sum()) for w in merged_state.values())
print(f"F16 file read by transformers: weights differ from the merged model's by at most "
      f"{weight_gap:.1e} (bound 2^-25 = {2.0**-25:.1e}, only among the {tiny_values:,} values "
      f"below 2^-17); other values changed: {inexact}")
assert set(f16_state) == set(merged_state) and weight_gap <= 2.0**-25 and inexact == 0
eps = gguf_models["f16"][0].config.rms_norm_eps
print(f"RMSNorm epsilon as the file stores it (float32): {eps!r}, merged model: "
      f"{merged_model.config.rms_norm_eps!r}")

logit_rows = {}
with torch.no_grad():
    for q, (gguf_model, _) in gguf_models.items():
        diffs = [(gguf_model(torch.tensor([ids])).logits - merged_model(torch.tensor([ids])).logits)
                 .abs().max().item() for ids in eval_ids[:8]]
        logit_rows[q] = {"max |logit difference|": max(diffs),
                         "mean over prompts": float(np.mean(diffs))}
show_table(pd.DataFrame(logit_rows).T, "gguf_logits_transformers", CHAPTER, floatfmt="{:.3g}")
# the same weights in two float32 forward passes: 13-08's bound, halved for logits (not log-probs)
logit_tol = max(forward_tolerance(merged_model, {"input_ids": torch.tensor([i])})["logp"] / 2
                for i in eval_ids[:8])
print(f"F16: max |logit difference| {logit_rows['f16']['max |logit difference|']:.1e}, bound "
      f"{logit_tol:.1e}")
assert logit_rows["f16"]["max |logit difference|"] <= logit_tol

# %% [markdown]
# The F16 file holds the merged model's weights exactly (asserted value by value): bfloat16
# values are float16 values, except those below $2^{-17}$, which float16 can only store as
# subnormals and moves by at most $2^{-25}$. Those few moved values and the order of
# floating-point operations are all that separates the F16 logits from the merged model's; the
# metadata the loader reads back (RMSNorm $\epsilon$, printed, RoPE base) is the model's own.
# Q8_0 adds the rounding of (10.3), by far the larger effect. The reloaded tokenizer, with the pre-tokenizer `load_gguf` restores from
# the file, gives the same ids as ours on every prompt and stress text.
#
# ### A Qwen2 model through the writer
#
# The `full` profile exports Qwen2.5, whose weights we cannot download here. Its architecture can
# still be checked: a random Qwen2 with a small configuration (grouped-query attention, tied
# embeddings, RoPE base $10^6$, and nonzero q, k, v biases), its weights rounded to bfloat16
# values as a merged checkpoint's are, with this chapter's tokenizer standing in for Qwen's
# (both are byte-level BPE with ChatML). It goes through `write_gguf` (F16) and back through
# transformers' loader, which reads `qwen2` files into `Qwen2ForCausalLM`. As a control, the same
# comparison with one layer's q bias dropped shows what the check would catch.

# %%
#| export efficient_finetuning
def random_qwen2(vocab_size: int, seed: int = 0) -> nn.Module:
    """A random `Qwen2ForCausalLM` with a small configuration (2 layers, width 64, grouped-query
    attention, tied embeddings, RoPE base 1e6) and q, k, v biases drawn from N(0, 0.5^2), its
    weights rounded to bfloat16 values as a merged checkpoint's are."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rope_theta=1e6)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


# %%
qwen = random_qwen2(len(merged_tokenizer), seed=SEED)
qwen_export = write_gguf(qwen, merged_tokenizer, GGUF_DIR / "qwen2-f16.gguf", "f16")
qwen_back, _ = load_gguf(qwen_export["path"], with_tokenizer=False)
with torch.no_grad():
    qwen_diff = max((qwen_back(torch.tensor([i])).logits - qwen(torch.tensor([i])).logits)
                    .abs().max().item() for i in eval_ids[:4])
    qwen_tol = max(forward_tolerance(qwen, {"input_ids": torch.tensor([i])})["logp"] / 2
                   for i in eval_ids[:4])
    qwen_back.model.layers[0].self_attn.q_proj.bias.zero_()
    no_bias_diff = max((qwen_back(torch.tensor([i])).logits - qwen(torch.tensor([i])).logits)
                       .abs().max().item() for i in eval_ids[:4])
biases = sorted(n for n, t in qwen_export["types"].items() if n.endswith(".bias"))
print(f"{type(qwen_back).__name__}: {len(biases)} bias tensors ({biases[0]}, ...); max |logit "
      f"difference| {qwen_diff:.1e} (bound {qwen_tol:.1e}); one q bias dropped: {no_bias_diff:.2f}")
assert qwen_diff <= qwen_tol < no_bias_diff

# %% [markdown]
# ## Inference three ways
#
# The fine-tuned model answers held-out prompts of 13-06's tasks with exact answers, greedily,
# from the same prompt ids: (1) transformers on the merged weights (the reference),
# (2) transformers on each GGUF file, (3) llama.cpp on each GGUF file. We count replies that
# agree token for token with the reference and, up to the first divergence, the largest
# difference of the log-probabilities llama.cpp reports (its top $k$ and the reference's token)
# from the reference's. Each runtime's replies are also scored for exact match.

# %%
eos = merged_tokenizer.eos_token_id
reference = [greedy_transformers(merged_model, ids, cfg.max_new_tokens, eos) for ids in eval_ids]
runtimes = {f"transformers GGUF {q}": (lambda ids, m=m: greedy_transformers(
    m, ids, cfg.max_new_tokens, eos)) for q, (m, _) in gguf_models.items()}
llama_models = {}
if LLAMA_CPP_PROBLEM is None:
    for q in exports:
        llama_models[q] = LlamaCppModel(GGUF_DIR / f"model-{q}.gguf", threads=2,
                                        n_ctx=max(len(i) for i in eval_ids) + cfg.max_new_tokens + 8)
        runtimes[f"llama.cpp {q}"] = (lambda ids, m=llama_models[q]: m.greedy(
            ids, cfg.max_new_tokens, eos, cfg.n_probs))
else:
    print(f"llama.cpp skipped: {LLAMA_CPP_PROBLEM}")


def exact_matches(replies: list[dict]) -> int:
    return sum(answer_is_correct(merged_tokenizer.decode(r["ids"], skip_special_tokens=True),
                                 e["answer"]) for r, e in zip(replies, eval_examples, strict=True))


agreement_rows = {"transformers merged (reference)": {
    "replies identical to reference": f"{len(eval_ids)}/{len(eval_ids)}",
    "exact match": exact_matches(reference) / len(eval_ids)}}
examples = []
for runtime, decode in runtimes.items():
    same, divergences, worst, tie_margin, replies = 0, [], 0.0, 0.0, []
    for k, (ids, ref) in enumerate(zip(eval_ids, reference, strict=True)):
        out = decode(ids)
        replies.append(out)
        step = first_divergence(out["ids"], ref["ids"])
        same += step is None
        divergences.append(step)
        if step is not None and step < min(len(out["ids"]), len(ref["ids"])):
            # how close the reference's two candidates were where the runtimes parted
            lp = ref["logprobs"][step]
            tie_margin = max(tie_margin, (lp[ref["ids"][step]] - lp[out["ids"][step]]).item())
        last = len(ref["ids"]) if step is None else step + 1
        for t in range(min(last, len(out["ids"]))):
            if "top_logprobs" in out:  # llama.cpp: the top k it reports (None: not reported)
                pairs_t = (out["top_logprobs"][t] or {}).items()
            else:  # transformers: the reference's token and its own choice
                pairs_t = [(i, out["logprobs"][t, i].item()) for i in {ref["ids"][t], out["ids"][t]}]
            worst = max([worst] + [abs(lp - ref["logprobs"][t, i].item()) for i, lp in pairs_t])
        if k < 4 and runtime == "llama.cpp q8_0":
            examples.append({"prompt": eval_examples[k]["messages"][0]["content"][:50],
                             "answer": eval_examples[k]["answer"][:40],
                             "llama.cpp reply": merged_tokenizer.decode(
                                 out["ids"], skip_special_tokens=True)[:60]})
    agreement_rows[runtime] = {
        "replies identical to reference": f"{same}/{len(eval_ids)}",
        "first divergence (step)": min((s for s in divergences if s is not None), default=None),
        "reference margin at divergences": tie_margin,
        "max |log-prob difference|": worst,
        "exact match": exact_matches(replies) / len(eval_ids)}
agreement = pd.DataFrame(agreement_rows).T
show_table(agreement, "inference_agreement", CHAPTER, floatfmt="{:.3g}")
for m in llama_models.values():
    m.close()
# how far each runtime's rounding can move a log-probability on prompt + reference reply
# (13-08's bound; llama.cpp's F16 path also rounds the activations to float16)
tolerances = {name: max(forward_tolerance(merged_model, {"input_ids": torch.tensor(
    [ids + ref["ids"]])}, activations=activations)["logp"]
    for ids, ref in zip(eval_ids, reference, strict=True))
    for name, activations in (("transformers", None), ("llama.cpp", torch.float16))}
for runtime in ("transformers GGUF f16", "llama.cpp f16"):
    # F16: identical, unless the reference's two candidates were closer than that
    if runtime in agreement_rows:
        assert agreement_rows[runtime]["reference margin at divergences"] <= tolerances[
            runtime.split()[0]], f"{runtime} must decode like transformers on the merged weights"
print("F16 replies identical to the reference:",
      {r: agreement_rows[r]["replies identical to reference"] for r in agreement_rows
       if r.endswith("f16")})
if LLAMA_CPP_PROBLEM is None:
    show_table(pd.DataFrame(examples), "llama_cpp_replies", CHAPTER)

# %% [markdown]
# With the F16 file, llama.cpp and transformers decode the same tokens (asserted, with one
# allowance: a divergence is accepted only where the reference's two candidates were closer than
# the runtime's rounding can move a log-probability, a tie that float rounding may break either
# way; `forward_tolerance` of 13-08 bounds that rounding, and the margin column shows it) and
# their log-probabilities differ slightly: ggml's CPU matrix product for F16
# weights rounds the activations to float16 as well, and sums in its own order. With Q8_0 the
# weights move by up to half a quantization step (10.4) and ggml also quantizes the activations
# to Q8_0 blocks before its dot products, so llama.cpp's log-probabilities move by more than
# transformers' (which dequantizes the weights and computes in float32). Greedy decoding only changes where two
# candidates were nearly tied; the table shows whether that happened on these prompts, and the
# exact-match column whether it changed any answer.
#
# ### Did the fine-tune work?
#
# The same question on more prompts: exact match per task before fine-tuning (the chat LM) and
# after (the merged model), greedy, with 95% Wilson intervals, on `n_accuracy` held-out prompts
# per task (13-06's `evaluate_tasks`, batched).

# %%
from ftbook.instruction_tuning import evaluate_tasks

accuracy_examples = [e for t in EXACT_TASKS for e in by_task[t][: cfg.n_accuracy]]
base_model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
accuracy_rows = {}
for name, model in (("chat LM (before)", base_model), ("fine-tuned (after)", merged_model)):
    scored = evaluate_tasks(model, merged_tokenizer, accuracy_examples,
                            max_new_tokens=cfg.max_new_tokens)
    row = {}
    for task in EXACT_TASKS + ["all"]:
        hits = [s["correct"] for s in scored if task in ("all", s["category"])]
        low, high = binomial_interval(sum(hits), len(hits))
        row[task] = f"{sum(hits) / len(hits):.2f} [{low:.2f}, {high:.2f}]"
    row["ended with end of turn"] = f"{np.mean([s['finished'] for s in scored]):.2f}"
    accuracy_rows[name] = row
accuracy_table = pd.DataFrame(accuracy_rows)
show_table(accuracy_table, "accuracy_before_after", CHAPTER)
print(f"exact match [95% Wilson interval] on {cfg.n_accuracy} held-out prompts per task, "
      f"{len(accuracy_examples)} in all")
bounds = {name: {t: [float(x) for x in row[t].split("[")[1].rstrip("]").split(",")]
                 for t in EXACT_TASKS} for name, row in accuracy_rows.items()}
before, after = bounds["chat LM (before)"], bounds["fine-tuned (after)"]
improved = [t for t in EXACT_TASKS if after[t][0] > before[t][1]]
worse = [t for t in EXACT_TASKS if after[t][1] < before[t][0]]
print(f"intervals apart, better after fine-tuning: {improved or 'none'}; worse: {worse or 'none'}")
del base_model

# %% [markdown]
# Read the intervals, not the point estimates: a task whose intervals before and after do not
# overlap changed beyond sampling noise, on held-out prompts the fine-tune never saw; the cell
# names those tasks. The chat LM answers in sentences of its own, which exact match never
# accepts. A few QLoRA steps on 13-06's data teach the answer format, and exact match can follow
# only where the model already has the skill behind the answer: repeating a sentence or naming a
# review's polarity asks less of it than sums and upper-casing, which need the skill itself,
# letter by letter or digit by digit (13-06's longer SFT run gets only a little further on them;
# 13-09 trains arithmetic with a reward). A task missing from the printed list did not change
# beyond the intervals in this run, which says nothing about what a longer run would teach. The
# end-of-turn row shows the other half of the format: how often each model stops after its
# answer. The three runtimes of the previous table serve this model as it was trained: their
# exact-match column matches the reference wherever their replies do.
#
# ## Troubleshooting
#
# What went wrong while this chapter was written, and what fixed it.
#
# - **`pip install unsloth` replaces the CPU PyTorch.** Its dependencies include torchvision and
#   xformers, which pull a CUDA build of torch (and PyPI's torchvision does not load beside the
#   CPU wheel, after which `import transformers` fails). Fix: pin the stack inside Unsloth's
#   ranges and install `unsloth`, `unsloth_zoo` with `--no-deps` (`requirements-nodeps.txt`).
#   Check with `pip freeze` before and after: torch, transformers, peft, trl, datasets and
#   bitsandbytes must not move.
# - **Version pins.** Unsloth 2026.10 requires transformers $\le$ 5.17, TRL $\le$ 1.15,
#   datasets $<$ 5, torch $<$ 2.15; a newer stack makes pip downgrade or refuse.
# - **Importing Unsloth changes other code.** It patches `TrainingArguments` and TRL's
#   `SFTTrainer` for the whole process (on a CPU: fused AdamW instead of `adamw_torch`,
#   `packing=False`, a chunked loss). A baseline measured in the same process is no longer the
#   baseline; run each pipeline in its own process (`run_isolated`), and keep the import out of
#   test processes that other tests share.
# - **TRL's `SFTTrainer` does not train on a CPU.** TRL 1.15 computes the loss with a fused LM
#   head implemented in Triton; without a GPU the kernel is `None` and the first step fails.
#   Unsloth's CPU backend reroutes it; for the standard pipeline `PlainLossSFTTrainer` uses
#   transformers' loss.
# - **Merging a 4-bit model.** `save_pretrained_merged` on the QLoRA model raises
#   `NotImplementedError` on a CPU ("merging LoRA into a 4-bit model is not supported on CPU
#   yet"). Reload the adapter folder with `FastLanguageModel.from_pretrained(adapter_dir,
#   load_in_4bit=False)` (it finds the base from `adapter_config.json`) and merge there, or
#   merge with PEFT over a float32 base (`merge_adapter`). Merging into NF4 and requantizing is
#   wrong anyway ({ref}`qlora`).
# - **GGUF export needs llama.cpp.** `save_pretrained_gguf` shells out to llama.cpp's
#   `convert_hf_to_gguf.py` and `llama-quantize`, downloading or cloning llama.cpp on first use;
#   offline that fails. `UNSLOTH_AUTO_INSTALL=0` makes it stop early with a clear message;
#   `UNSLOTH_LLAMA_CPP_PATH` pointing at a llama.cpp source tree with a built `llama-quantize`
#   makes it work. The book's `write_gguf` needs only the `gguf` package.
# - **A GGUF file that loads but talks nonsense.** Without the q/k row permutation of (10.5) the
#   file loads everywhere and every attention score is wrong. Compare logits with the source
#   model after every export (done above).
# - **Chat prompts tokenized differently by llama.cpp.** With `add_space_prefix = true`,
#   llama.cpp's SentencePiece tokenizer puts a space after every special token, so
#   `<|user|>\n` becomes `<|user|>▁\n`. Write `add_space_prefix = false` for tokenizers that
#   prepend "▁" only at the start of the input, and compare token ids, not strings.
# - **The GGUF tokenizer's EOS is wrong in transformers.** transformers 5.17 builds the tokenizer
#   of a Llama GGUF file with EOS = the BOS token and no pad token; generation that relies on the
#   tokenizer's EOS never stops. `load_gguf` restores both from the model config.
# - **Q8_0 refuses a tensor.** Rows must be a multiple of 32 values; the book's own LM's
#   feed-forward width 688 is not, so its `ffn_down` stays F16 (as llama.cpp's converter does).
# - **A GGUF tokenizer read back loses its pre-tokenizer.** transformers 5.17 builds every
#   Llama-architecture byte-level BPE from a GGUF file with GPT-2's regex, whatever
#   `tokenizer.ggml.pre` says; for SmolLM2 that keeps digit runs together after spaces.
#   `load_gguf` and Appendix C's conversion restore the pre-tokenizer the file names
#   (`set_pre_tokenizer`); without it the tokenizer differs from SmolLM2's own on text with
#   several spaces before a number (counted above).
# - **No prompt ids from llama.cpp's server.** `xllamacpp` exposes the completion endpoints,
#   not `/tokenize`. Compare a prompt sent as text with the same prompt sent as ids: equal prompt
#   token counts and bit-identical next-token log-probabilities (`tokenizes_like`).
# - **bitsandbytes on a CPU after an evaluation pass.** bitsandbytes 0.50 repacks a `Linear4bit`
#   weight for its AVX512-BF16 kernel on the first forward pass without gradients and does not
#   unpack it, after which QLoRA's backward pass is wrong. Unsloth's CPU loader disables the
#   repacking; in the standard pipeline, do not run `generate` or an evaluation before training
#   a 4-bit model on a CPU.
# - **llama-cpp-python builds from source** (about 7 minutes on 2 cores, needs a compiler and
#   CMake); the `xllamacpp` wheel is prebuilt and installs in seconds.
#
# ## Pitfalls
#
# - **Benchmarking across processes that imported different libraries** measures the imports as
#   much as the training: report training memory above the loaded model as well as the process
#   peak, and time steps after a warm-up.
# - **Comparing a GPU claim on a CPU.** Unsloth's CPU backend exists so that code runs
#   everywhere; its speed is the speed of stock PyTorch.
# - **pad = EOS** makes the model never stop ({ref}`instruction-tuning`); the book's tokenizers
#   keep them distinct, and so must the GGUF metadata (`tokenizer.ggml.padding_token_id`).
# - **Trusting an export without a round trip.** Every format change (4-bit to 16-bit, merge,
#   GGUF, Q8_0) gets a numerical check against the previous step, as above.
#
# ## Summary
#
# - Unsloth wraps transformers + PEFT + TRL. On a GPU it adds Triton kernels and activation
#   offloading; on a CPU it selects a backend of stock kernels with a chunked cross-entropy and
#   CPU-safe defaults. It installs beside a CPU PyTorch only with `--no-deps`.
# - The same QLoRA SFT run with both stacks, in separate processes, starts from the same loss and
#   is measured for step time, tokens per second, peak memory and final loss.
# - Merging (10.1) happens over a 16-bit base; both merges equal the hand computation exactly.
# - `write_gguf` writes F16 and Q8_0 (10.3-10.4) GGUF files of Llama (with the RoPE permutation
#   10.5) and Qwen2 models, with SentencePiece or byte-level BPE tokenizers; its tokenizer metadata
#   reproduces the source file's except where the book differs on purpose, llama.cpp tokenizes
#   like the Hugging Face tokenizer, and greedy decoding from F16 agrees token for token across
#   transformers (safetensors and GGUF) and llama.cpp, up to near ties.
# - The fine-tuned model answers 13-06's held-out tasks in all three runtimes; its exact-match
#   accuracy before and after fine-tuning is measured with intervals.
#
# ## Exercises
#
# 1. Run the benchmark with `gradient_checkpointing=False` for both pipelines. How do step time
#    and training peak memory change, and does the gap between the pipelines change?
# 2. Set `UNSLOTH_CPU_CHUNKED_CE=0` for the Unsloth process and measure the training peak again.
#    Compare the change with eq. (10.2) for the tiny profile.
# 3. Add Q4_0 to `write_gguf` (blocks of 32, one float16 scale $d = \max|x| / -8$ with the sign
#    of the extreme value, 4-bit codes). Check it against `gguf.quants` and report the logit
#    differences in llama.cpp.
# 4. Add Llama 3's pre-tokenizer (`llama-bpe` in llama.cpp) to `GGUF_PRE_TOKENIZERS`: find the
#    Hugging Face steps that define it, export a model with a Llama 3 tokenizer and check it with
#    `tokenizes_like` on numbers of one to five digits.
#
# ## References
#
# - Han, D. & Han, M. (2023-), *Unsloth*, software, github.com/unslothai/unsloth (documentation:
#   docs.unsloth.ai; CPU backend in `unsloth_zoo.cpu`).
# - Hu et al. (2021), *LoRA: Low-Rank Adaptation of Large Language Models*, arXiv:2106.09685, §4.
# - Dettmers et al. (2023), *QLoRA: Efficient Finetuning of Quantized LLMs*, arXiv:2305.14314, §3.
# - Su et al. (2021), *RoFormer: Enhanced Transformer with Rotary Position Embedding*,
#   arXiv:2104.09864, §3.4.
# - Wijmans et al. (2024), *Cut Your Losses in Large-Vocabulary Language Models*,
#   arXiv:2411.09009 (the memory of the cross-entropy, eq. 10.2).
# - Gerganov et al., *llama.cpp* and *ggml*: `docs/gguf.md` (the GGUF format), `ggml-quants.c`
#   (Q8_0), `convert_hf_to_gguf.py` (the converter and its q/k permutation).

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
# (qlora)=
# # 13-03 QLoRA: 4-bit NormalFloat, double quantization, paged optimizers
#
# ```{admonition} At a glance
# :class: tip
# **Prerequisites:** {ref}`lora`; 17-06 (quantization) is recommended. **Reading time:** ~10 min;
# the tiny profile runs in about 3 minutes on 2 CPU cores.
# **You will build** `ftbook.qlora`: the NF4 code from the normal quantiles, blockwise 4-bit
# quantization with double-quantized constants, a 4-bit linear layer that dequantizes on the fly
# (and under LoRA), a paged AdamW, a measured memory breakdown, and a correct merge of LoRA into a
# 4-bit base; all checked against bitsandbytes.
# ```
#
# LoRA removes the gradients and optimizer state of the frozen weights, but the weights themselves
# still sit in memory at 16 or 32 bits. QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores the
# frozen base in 4 bits and trains LoRA adapters on top, in three steps: a 4-bit data type matched to
# the distribution of pretrained weights (NF4), quantization of the quantization constants (double
# quantization), and paged optimizer state that survives memory spikes. The paper fine-tunes a 65B
# model on one 48 GB GPU, where 16-bit fine-tuning needs more than 780 GB (§1).

# %%
from ftbook.workbench import device_cell, get_device, get_profile, pick, seed_everything

CHAPTER = "13_03_qlora"
PROFILE = get_profile()
SEED = 0
seed_everything(SEED)
DEVICE = get_device()
RUN_INFO = device_cell(PROFILE, SEED, DEVICE)

# %% [markdown]
# ## Blockwise absmax quantization
#
# A $k$-bit code is a sorted list of $2^k$ levels $q_0 < \dots < q_{2^k - 1}$ in $[-1, 1]$. To
# quantize a tensor, split it into blocks of $B$ consecutive values, scale each block by its
# absolute maximum $c = \max_i |w_i|$ (the *quantization constant*) and store, for each value, the
# index of the nearest level:
#
# $$
# \operatorname{idx}(w_i) = \arg\min_j \left| q_j - w_i / c \right|, \qquad
# \hat w_i = c \, q_{\operatorname{idx}(w_i)} .
# \tag{3.1}
# $$
#
# Blocks keep an outlier from ruining the precision of the whole tensor: only its own block gets a
# large $c$. The price is one constant per block: with $B = 64$ and float32 constants, $32/64 = 0.5$
# extra bits per parameter.
#
# ## NormalFloat: levels at the quantiles of the weights
#
# Which levels? Pretrained weights are close to zero-mean normal, and after absmax scaling a block
# is a normal sample divided by its maximum. Information-theoretically the best $k$-bit code puts
# the same probability mass in every bin: each of the $2^k$ codes is then used equally often and
# carries the full $k$ bits. For a standard normal that means levels at the quantiles
# $\Phi^{-1}(i / 2^k)$. Two details make it usable (Dettmers et al. §3): the extreme quantiles
# $\Phi^{-1}(0)$ and $\Phi^{-1}(1)$ are infinite, so the probabilities are taken from
# $[1 - \delta, \delta]$ with $\delta = 1 - \tfrac12\big(\tfrac{1}{30} + \tfrac{1}{32}\big)
# = 0.9677083$; and zero must be exactly representable (padding,
# ReLU outputs, and sparse weights map to it), which a symmetric 16-level code cannot do. NF4
# therefore builds 8 positive levels and 7 negative ones separately and adds an exact 0:
#
# $$
# q^{+}_i = \Phi^{-1}\!\big(p^{+}_i\big),\; p^{+} = \operatorname{linspace}(\delta, \tfrac12, 9)_{0..7};
# \qquad
# q^{-}_i = -\Phi^{-1}\!\big(p^{-}_i\big),\; p^{-} = \operatorname{linspace}(\delta, \tfrac12, 8)_{0..6};
# \tag{3.2}
# $$
#
# and the 16 levels $\{q^-\} \cup \{0\} \cup \{q^+\}$, sorted and divided by their maximum, lie in
# $[-1, 1]$ with both ends at $\pm 1$.

# %%
#| export
"""QLoRA: NF4 quantization, double quantization, a 4-bit linear layer, a paged AdamW, memory
accounting, and merging LoRA into a 4-bit base.

Defined in chapter 13-03 (`chapters/13_03_qlora.py`). Dettmers et al. 2023, *QLoRA: Efficient
Finetuning of Quantized LLMs*, arXiv:2305.14314, §3 (NF4, double quantization, paged optimizers);
Dettmers et al. 2022, *8-bit Optimizers via Block-wise Quantization*, arXiv:2110.02861.
The bit layout (two codes per byte, high nibble first) and rounding follow bitsandbytes.
"""
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

NF4_OFFSET = 0.9677083  # delta of eq. (3.2): 1 - (1/30 + 1/32) / 2


def normal_float_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels of eq. (3.2), float32, sorted, in [-1, 1] with an exact 0."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 levels
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 levels
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = tuple(float(v) for v in normal_float_levels())


def bnb_table_tolerance(offset: float = NF4_OFFSET) -> torch.Tensor:
    """(16,) float64 bound on |NF4_LEVELS - bitsandbytes' NF4 table|, level by level.

    bitsandbytes makes its quantile points with a float32 `torch.linspace`: each point p < 1 is
    off by at most 3u (u = 2^-24: the offset's rounding, the step, one multiply-add). A quantile
    q = Phi^-1(p) then moves by 3u / phi(q), the level q / q_max by that over q_max plus |level|
    times the same for q_max, and each table's own float32 rounding adds u |level|. The levels
    -1, 0 and 1 are exact in both."""
    u = torch.finfo(torch.float32).eps / 2
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    q_max = normal.icdf(torch.tensor(offset, dtype=torch.float64))
    density = normal.log_prob(levels * q_max).exp()  # phi(q) at each level
    bound = (3 * u * (1 / density + levels.abs() / normal.log_prob(q_max).exp()) / q_max
             + 2 * u * levels.abs())
    return torch.where((levels == 0) | (levels.abs() == 1), 0.0, bound)


# %% [markdown]
# **Check of (3.2).** Our levels against the table that bitsandbytes ships, and against the
# normal quantiles themselves; then the information argument: on normal data, scaled blockwise as
# in (3.1), every code should be used about equally often, so the empirical entropy of the codes
# is close to 4 bits. A uniform 4-bit grid (the levels of int4, evenly spaced) gives the sparse
# tails as many levels as the dense centre, so its codes are used less evenly. An entropy of $H$
# bits is worth $2^H$ equally used codes; the line prints that effective number beside each
# entropy (16 at the maximum).

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ftbook.workbench import show_figure, show_table

levels = torch.tensor(NF4_LEVELS)
from bitsandbytes.functional import get_4bit_type  # noqa: E402

bnb_levels = get_4bit_type("nf4", device="cpu").float()
print("NF4 levels:", [round(v, 4) for v in NF4_LEVELS])
print(f"max |ours - bitsandbytes table|: {(levels - bnb_levels).abs().max().item():.2e}")
# bitsandbytes computes its table from float32 quantile points (see `bnb_table_tolerance`), so
# the tables differ by a few float32 steps: bounded level by level, not equal
level_bound = bnb_table_tolerance()
assert ((levels.double() - bnb_levels.double()).abs() <= level_bound).all()
assert levels[7] == 0 and levels[0] == -1 and levels[-1] == 1


def code_entropy_bits(codes: torch.Tensor) -> float:
    """Empirical entropy (bits) of a tensor of code indices in 0..15."""
    p = torch.bincount(codes.flatten().long(), minlength=16).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def nearest_codes(w: torch.Tensor, table: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Codes of (3.1) by brute force: argmin over the levels, per absmax-scaled block."""
    blocks = w.reshape(-1, blocksize)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True)
    return (scaled.unsqueeze(-1) - table).abs().argmin(-1)


gaussian = torch.randn(64 * 4096)
uniform_grid = torch.linspace(-1, 1, 16)
gaussian_entropy = {"NF4": code_entropy_bits(nearest_codes(gaussian, levels)),
                    "uniform grid": code_entropy_bits(nearest_codes(gaussian, uniform_grid))}
print("entropy of the codes on N(0,1) data: " + ", ".join(
    f"{grid} {bits:.3f} bits ({2**bits:.1f} effective codes)"
    for grid, bits in gaussian_entropy.items()) + " (max 4 bits, 16 codes)")

# %% [markdown]
# The same measurement on real weights: every linear layer of the profile's encoder and causal LM.
# If pretrained weights were exactly normal, NF4 would reach the same entropy on them.

# %%
from ftbook.base_models import load_causal_lm, load_encoder_classifier

encoder, encoder_tokenizer = load_encoder_classifier(PROFILE, seed=SEED)
causal_lm, lm_tokenizer = load_causal_lm(PROFILE)
rows = []
usage = {}


def weight_code_statistics(model: torch.nn.Module, table: torch.Tensor,
                           chunk: int = 1 << 22) -> dict:
    """Code counts (16,) of every linear weight of `model` under `table`, tensor by tensor in
    chunks of `chunk` values (whole blocks of 64, the last partial block of a tensor dropped),
    and the first four moments of the weights in float64: memory stays O(chunk) for any model."""
    counts = torch.zeros(16, dtype=torch.float64)
    moments = torch.zeros(5, dtype=torch.float64)  # n, sum w, sum w^2, sum w^3, sum w^4
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach().flatten()
        w = w[: w.numel() // 64 * 64]
        for part in w.split(chunk):
            counts += torch.bincount(nearest_codes(part.float(), table).flatten(),
                                     minlength=16).double()
            x = part.double()
            moments += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64),
                                    x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()])
    n, s1, s2, s3, s4 = moments.tolist()
    mean = s1 / n
    central4 = s4 / n - 4 * mean * s3 / n + 6 * mean**2 * s2 / n - 3 * mean**4
    variance = (s2 - n * mean**2) / (n - 1)  # unbiased, as torch.var
    return {"counts": counts, "n": int(n), "excess kurtosis": central4 / variance**2 - 3}


def entropy_from_counts(counts: torch.Tensor) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


for name, model in (("encoder", encoder), ("causal LM", causal_lm)):
    nf4 = weight_code_statistics(model, levels)
    grid = weight_code_statistics(model, uniform_grid)
    usage[name] = nf4["counts"] / nf4["n"]
    rows.append({"model": name, "linear weights": nf4["n"],
                 "NF4 code entropy (bits)": entropy_from_counts(nf4["counts"]),
                 "uniform-grid entropy (bits)": entropy_from_counts(grid["counts"]),
                 "excess kurtosis": nf4["excess kurtosis"]})
usage["N(0,1) sample"] = torch.bincount(nearest_codes(gaussian, levels).flatten(), minlength=16).double() / gaussian.numel()
show_table(pd.DataFrame(rows).set_index("model"), "code_entropy", CHAPTER)
entropies = {row["model"]: (row["NF4 code entropy (bits)"], row["uniform-grid entropy (bits)"])
             for row in rows}
entropies["N(0,1) sample"] = (gaussian_entropy["NF4"], gaussian_entropy["uniform grid"])
print("effective codes of 16 (2^entropy), NF4 / uniform grid: " + "; ".join(
    f"{name} {2**nf4_bits:.1f} / {2**grid_bits:.1f}"
    for name, (nf4_bits, grid_bits) in entropies.items()))
print("bits below the 4-bit maximum, NF4 / uniform grid: " + "; ".join(
    f"{name} {4 - nf4_bits:.2f} / {4 - grid_bits:.2f}"
    for name, (nf4_bits, grid_bits) in entropies.items()))
closer = [name for name, (nf4_bits, grid_bits) in entropies.items() if nf4_bits > grid_bits]
print("NF4 uses its codes more evenly than the uniform grid on: "
      + ("all three" if len(closer) == len(entropies) else ", ".join(closer) or "none"))

fig, ax = plt.subplots(figsize=(7, 3.3))
width = 0.28
for i, (name, frequency) in enumerate(usage.items()):
    ax.bar(np.arange(16) + (i - 1) * width, frequency.numpy(), width, label=name)
ax.axhline(1 / 16, ls=":", c="gray", label="equal use (1/16)")
ax.set(xlabel="NF4 code index", ylabel="fraction of weights", title="How often each NF4 level is used")
ax.legend(fontsize=8)
show_figure(fig, "nf4_code_usage", CHAPTER)

# %% [markdown]
# The three lines under the table read it. The effective number of codes says how many of the 16
# levels each grid is worth on these weights; the bits below the maximum are what each grid
# wastes per weight; the last line names the data on which NF4 comes the closer to equal use.
# NF4's own gap from 4 bits has a simple cause visible in the figure: NF4's levels are the
# quantiles of a normal scaled so that its $\delta$-quantile lands at 1, but a block of 64 values
# is divided by its *maximum*, which is typically further out than that quantile, so the scaled
# values are less spread than the levels assume and the central codes are used more often than
# the outer ones. Real weights behave like the normal sample, even the heavy-tailed encoder (see
# the excess kurtosis column; 0 for a normal): blockwise scaling confines each outlier to its own
# block.
#
# ## Quantize, pack, dequantize
#
# The implementation follows (3.1) with one rounding rule made explicit: a value exactly halfway
# between two levels goes to the lower one (we bucketize against the midpoints, as bitsandbytes
# does). Two 4-bit codes share a byte, the first in the
# high nibble. A tensor whose size is not a multiple of the block size gets a last, shorter block.
#
# **Double quantization** (Dettmers et al. §3, "Double Quantization"). The float32 constants cost
# $32 / 64 = 0.5$ bits per parameter. QLoRA quantizes them too: subtract their mean (they are all
# positive, so centring makes the 8-bit code symmetric), then quantize blocks of 256 constants to
# 8 bits with one float32 scale per block. The overhead becomes
#
# $$
# \frac{8}{64} + \frac{32}{64 \cdot 256} = 0.127 \ \text{bits per parameter},
# \tag{3.3}
# $$
#
# a saving of $0.373$ bits per parameter, about 3 GB for a 65B model. Which 8-bit code? The
# constants of a heavy-tailed weight matrix span orders of magnitude, so, like bitsandbytes, we use
# the 8-bit *dynamic* code (Dettmers 2015), whose levels are dense near zero and sparse near the
# ends, rather than an even int8 grid, which would spend its levels on the few huge constants.

# %%
#| export
def _pack(codes: torch.Tensor, pad_code: int) -> torch.Tensor:
    """(n,) codes in 0..15 -> (ceil(n/2),) uint8, first code of each pair in the high nibble;
    an odd count is padded with `pad_code` (NF4: 7, the exact zero, as bitsandbytes does)."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad_code)])
    codes = codes.to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 -> (n,) int64 codes."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:n].long()


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absolute maximum of each block of `blocksize` values (a shorter last block allowed)."""
    n_full = flat.numel() // blocksize * blocksize
    absmax = flat[:n_full].view(-1, blocksize).abs().amax(dim=1)
    if n_full < flat.numel():
        absmax = torch.cat([absmax, flat[n_full:].abs().amax().view(1)])
    return absmax


def _expand(per_block: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Repeat one value per block over the block's positions: (blocks,) -> (n,)."""
    return per_block.repeat_interleave(blocksize)[:n]


def dynamic_map_8bit() -> torch.Tensor:
    """The signed 8-bit "dynamic tree" code (Dettmers 2015, arXiv:1511.04561; used by
    bitsandbytes for 8-bit optimizer states and QLoRA's double quantization): for exponents
    e = 0..6, 2^e fraction values (midpoints of an even grid on [0.1, 1]) times 10^(e - 6), with
    both signs, plus 0 and 1. 256 sorted float32 values in [-1, 1]; dense near zero."""
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        fractions = (grid[:-1] + grid[1:]) / 2
        values += (10.0 ** (e - 6) * fractions).tolist() + (-(10.0 ** (e - 6)) * fractions).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each element of `scaled`."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


@dataclass
class NF4Tensor:
    """A tensor in NF4: packed codes plus the block constants, plain or double-quantized."""

    packed: torch.Tensor  # (ceil(n / 2),) uint8
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor | None = None  # (blocks,) float32, without double quantization
    absmax_codes: torch.Tensor | None = None  # (blocks,) uint8 indices into the 8-bit code
    absmax_scales: torch.Tensor | None = None  # (ceil(blocks / 256),) float32
    absmax_offset: float = 0.0
    dq_blocksize: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def constants(self) -> torch.Tensor:
        """The float32 block constants (dequantized first, with double quantization)."""
        if not self.double_quant:
            return self.absmax
        n_blocks = self.absmax_codes.numel()
        scales = _expand(self.absmax_scales, n_blocks, self.dq_blocksize)
        code = dynamic_map_8bit().to(scales.device)
        return code[self.absmax_codes.long()] * scales + self.absmax_offset

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, constants (and their scales and offset)."""
        stored = [self.packed]
        stored += ([self.absmax_codes, self.absmax_scales] if self.double_quant else [self.absmax])
        offset = 4 if self.double_quant else 0
        return sum(t.numel() * t.element_size() for t in stored) + offset

    @property
    def bits_per_param(self) -> float:
        """Stored bits per original parameter (4 plus the constants' overhead, eq. 3.3)."""
        return 8 * self.nbytes / self.numel


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 dq_blocksize: int = 256) -> NF4Tensor:
    """Blockwise NF4 quantization of `weight`, eq. (3.1)-(3.2); double quantization of the
    block constants (eq. 3.3) to the 8-bit dynamic code in blocks of `dq_blocksize`, after
    subtracting their mean."""
    if blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize must be an even number >= 2, got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    absmax = _block_absmax(flat, blocksize)  # (blocks,)
    scaled = (flat / _expand(absmax.clamp(min=1e-38), flat.numel(), blocksize)).clamp(-1, 1)
    levels = torch.tensor(NF4_LEVELS, device=flat.device)
    codes = _nearest_code(scaled, levels)  # ties go to the lower level
    q = NF4Tensor(packed=_pack(codes, pad_code=NF4_LEVELS.index(0.0)), shape=weight.shape,
                  dtype=weight.dtype,
                  blocksize=blocksize, dq_blocksize=dq_blocksize)
    if not double_quant:
        q.absmax = absmax
        return q
    offset = absmax.mean()
    centred = absmax - offset
    scales = _block_absmax(centred, dq_blocksize).clamp(min=1e-38)  # (ceil(blocks / 256),)
    code = dynamic_map_8bit().to(flat.device)
    q.absmax_codes = _nearest_code(centred / _expand(scales, centred.numel(), dq_blocksize),
                                   code).to(torch.uint8)
    q.absmax_scales, q.absmax_offset = scales, float(offset)
    return q


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor that `q` represents: level[code] * block constant, reshaped, in `dtype`
    (default: the original dtype)."""
    levels = torch.tensor(NF4_LEVELS, device=q.packed.device)
    values = levels[_unpack(q.packed, q.numel)] * _expand(q.constants(), q.numel, q.blocksize)
    return values.view(q.shape).to(dtype or q.dtype)


# %% [markdown]
# ## Parity with bitsandbytes
#
# bitsandbytes runs on CPU, so we can compare closely: on random weights and on linear layers
# of both base models, without double quantization, the packed bytes and the constants must be
# identical and the dequantized tensors equal to float32 precision. With
# double quantization we compare what matters, the relative reconstruction error
# $\lVert W - \hat W \rVert_F / \lVert W \rVert_F$: ours must be within 1% of bitsandbytes'.
# One exception is allowed, and it is arithmetic, not a difference of method: our NF4 levels are
# the exact quantiles rounded to float32, bitsandbytes' table differs in the last bit for some
# levels, and the two divide $w$ by its block's absmax in their own way, so a scaled weight
# within a few float32 steps of the midpoint between two levels (a *tie*) may get the adjacent
# code. The first two columns count the codes that differ and check that every one of them is
# such a tie; whether any occur depends on the weights (a model pretrained on another CPU has
# other last bits), and the checks hold either way.
#
# bitsandbytes has two CPU dequantization paths: a compiled kernel (used when the row length is
# even) and a pure-PyTorch reference (used otherwise). We compare with both, because they do not
# always agree: the table shows where.

# %%
import bitsandbytes.functional as bnbf

try:  # bnb's pure-PyTorch reference is private API (bitsandbytes 0.50), so the import is guarded
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    # without the torch.compile wrapper bnb puts around it
    bnb_dequantize_reference = getattr(_dequantize_4bit_compute, "__wrapped__",
                                       _dequantize_4bit_compute)
except ImportError as error:
    bnb_dequantize_reference = None
    print(f"bitsandbytes' reference dequantization is not importable ({error}): its public "
          "dequantize_4bit stands in, and the kernel-against-reference column compares it "
          "with itself")
assert torch.equal(dynamic_map_8bit(), bnbf.create_dynamic_map(signed=True).float()), \
    "our 8-bit dynamic code must equal bitsandbytes'"


def bnb_reference_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' pure-PyTorch NF4 dequantization (double-quantized constants included)."""
    if bnb_dequantize_reference is None:
        return bnbf.dequantize_4bit(packed, state)
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return bnb_dequantize_reference(packed.reshape(-1), absmax.float(), state.code.float(),
                                    state.blocksize, state.shape, state.dtype)


parity_rows, dequant_bounds = [], {}
tensors = {"random 768x768": torch.randn(768, 768),
           "random 1000x37 (ragged last block)": torch.randn(1000, 37),
           "random 64x32 (rows shorter than a block)": torch.randn(64, 32)}
for model_name, model in (("encoder", encoder), ("causal LM", causal_lm)):
    layer_zero = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and (".0." in n or "layer.0" in n)]
    tensors.update({f"{model_name} {n}": m.weight.detach() for n, m in layer_zero})
levels = torch.tensor(NF4_LEVELS)
# a tie: the two codes are adjacent levels and the scaled weight lies within float32 reach of
# their midpoint (the tables' difference, plus the rounding of w / absmax and of the midpoint)
tie_tolerance = level_bound.max().item() + 4 * 2.0**-24
for name, w in tensors.items():
    ours = quantize_nf4(w, double_quant=False)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours_deq = dequantize_nf4(ours)
    ours_dq = quantize_nf4(w, double_quant=True)
    packed2, state2 = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                         compress_statistics=True)
    err_ours = float((dequantize_nf4(ours_dq) - w).norm() / w.norm())
    err_bnb = float((bnb_reference_dequantize(packed2, state2) - w).norm() / w.norm())
    codes_ours = _unpack(ours.packed, w.numel()).long()  # (n,)
    codes_bnb = _unpack(packed.reshape(-1), w.numel()).long()  # (n,)
    differ = codes_ours != codes_bnb
    scaled = w.reshape(-1) / _expand(ours.absmax, w.numel(), 64)  # (n,) in [-1, 1]
    midpoint = (levels[codes_ours[differ]] + levels[codes_bnb[differ]]) / 2
    ties = ((codes_ours[differ] - codes_bnb[differ]).abs() == 1) & \
        ((scaled[differ] - midpoint).abs() <= tie_tolerance)
    gap = (ours_deq - bnb_reference_dequantize(packed, state)).abs().reshape(-1)  # (n,)
    parity_rows.append({
        "tensor": name, "shape": "x".join(map(str, w.shape)),
        "codes differ": int(differ.sum()), "all of them ties": bool(ties.all()),
        "same constants": torch.equal(ours.absmax, state.absmax),
        "max |ours - bnb reference|": gap[~differ].max().item(),
        "max |bnb CPU kernel - bnb reference|": (bnbf.dequantize_4bit(packed, state)
                                                 - bnb_reference_dequantize(packed, state)).abs().max().item(),
        "DQ error ours / bnb": err_ours / err_bnb})
    # same codes and constants: the values differ by the two tables' levels (`level_bound`)
    # times a constant <= max |w|, plus one float32 rounding of each product
    dequant_bounds[name] = (level_bound.max().item() + 2 * 2.0**-24) * w.abs().max().item()
    # at a tie the two values are the two adjacent levels times the block's constant
    tie_gaps = (levels[codes_ours[differ]] - levels[codes_bnb[differ]]).abs() \
        * _expand(ours.absmax, w.numel(), 64)[differ]
    assert (gap[differ] <= tie_gaps + dequant_bounds[name]).all()
parity = pd.DataFrame(parity_rows).set_index("tensor")
show_table(parity, "bnb_parity", CHAPTER, floatfmt="{:.3g}")
# the kernel is off where it differs from bnb's own reference (same codes, table and constants:
# one float32 product each) by more than the bound above
kernel_off = parity[parity["max |bnb CPU kernel - bnb reference|"] > pd.Series(dequant_bounds)]
print(f"{len(parity)} tensors: constants identical in all: {bool(parity['same constants'].all())}; "
      f"codes that differ: {parity['codes differ'].sum()} of {sum(w.numel() for w in tensors.values()):,}, "
      f"all of them ties: {bool(parity['all of them ties'].all())}; "
      f"max |ours - bnb reference| {parity['max |ours - bnb reference|'].max():.2e}; "
      f"DQ error ratio in [{parity['DQ error ours / bnb'].min():.4f}, "
      f"{parity['DQ error ours / bnb'].max():.4f}]")
print("bnb's CPU kernel disagrees with bnb's own reference on shapes:",
      sorted(set(kernel_off["shape"])) or "none")
assert parity["all of them ties"].all() and parity["same constants"].all()
assert (parity["max |ours - bnb reference|"] <= pd.Series(dequant_bounds)).all()
# Not an identity: bitsandbytes' second-level constants differ from ours in a few 8-bit codes
# (the 4-bit codes are the same), so this compares accuracy. The printed range of the ratio is
# what to read; the 1% only guards against a different method (another block size, no offset).
assert ((parity["DQ error ours / bnb"] - 1).abs() < 0.01).all()
assert all(int(shape.split("x")[-1]) % 64 for shape in kernel_off["shape"]), \
    "the CPU kernel should only disagree when rows are not a multiple of the block size"

# %% [markdown]
# Our quantizer reproduces bitsandbytes: identical constants, identical codes except at exact
# ties (the count is printed above), and dequantization equal to bitsandbytes' reference up to
# the few float32 steps by which the two level tables differ (bounded above, level by level).
# The column "max |bnb CPU kernel - bnb reference|" records a finding of this comparison: in
# the installed bitsandbytes, the compiled CPU dequantization kernel returns wrong values when
# the row length is even but not a multiple of the block size (a block then spans two rows), while its quantizer and its PyTorch reference are right. Our Llama's
# feed-forward down-projection has rows of 688 = 10.75 x 64 values, so this is not an academic
# case; check a library's CPU path on your shapes before trusting it.

# %% [markdown]
# ### Bits per parameter, from the tensors
#
# (3.3) predicts the overhead; here it is counted from the bytes our `NF4Tensor` actually holds,
# for one of the encoder's matrices and for a 4096 x 4096 matrix (the size of a 7B model's
# attention projection).

# %%
bits_rows = []
first_linear = next(m for m in encoder.modules() if isinstance(m, torch.nn.Linear))
for name, w in ((f"encoder {tuple(first_linear.weight.shape)}", first_linear.weight.detach()),
                ("4096x4096", torch.randn(4096, 4096))):
    plain, double = quantize_nf4(w, double_quant=False), quantize_nf4(w, double_quant=True)
    bits_rows.append({"tensor": name, "bits/param, fp32 constants": plain.bits_per_param,
                      "bits/param, double quant": double.bits_per_param,
                      "overhead saved (bits/param)": plain.bits_per_param - double.bits_per_param})
bits = pd.DataFrame(bits_rows).set_index("tensor")
show_table(bits, "bits_per_param", CHAPTER)
# exact: byte counts over 2^24 parameters are binary fractions (the last term is the offset)
assert bits.iloc[1]["bits/param, fp32 constants"] == 4.5
assert bits.iloc[1]["bits/param, double quant"] == 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2

# %% [markdown]
# ## A 4-bit linear layer
#
# `NF4Linear` stores only the `NF4Tensor` and the bias. Its forward pass dequantizes the weight to
# the compute dtype and multiplies; its backward pass needs $\partial \mathcal{L} / \partial x =
# g \hat W$ but no gradient for $\hat W$ (it is frozen), so instead of keeping the dequantized
# weight alive between the two passes, the custom autograd function below dequantizes it *again* in
# the backward pass. Only the 4-bit codes persist; the 16- or 32-bit copy exists for the duration
# of one matmul. This is the trade QLoRA makes: memory for compute.
#
# `NF4Linear` subclasses `nn.Linear`, so `apply_lora` from {ref}`lora` finds and wraps it
# unchanged; that is exactly the QLoRA architecture, a LoRA adapter in the compute dtype over a
# 4-bit base.

# %%
#| export
class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequantize(W)^T; the backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return x @ layer.dequantized(x.dtype).T  # (..., in) @ (in, out) -> (..., out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_out @ ctx.layer.dequantized(grad_out.dtype), None  # (..., out) @ (out, in)


class NF4Linear(nn.Linear):
    """A frozen linear layer stored in NF4 (eq. 3.1-3.3), dequantized on the fly.

    Build it with `NF4Linear.from_linear`. `weight` is a read-only dequantized float32 copy (for
    inspection and for wrappers such as `LoRALinear`); the stored state is `quantized`.
    """

    def __init__(self, quantized: NF4Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: no float weight is allocated
        self.out_features, self.in_features = quantized.shape
        self.quantized, self.compute_dtype = quantized, compute_dtype
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.bfloat16) -> "NF4Linear":
        """Quantize `linear.weight` to NF4 and keep its bias (frozen)."""
        q = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant)
        return cls(q, linear.bias, compute_dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as a (out_features, in_features) tensor in `dtype`."""
        return dequantize_nf4(self.quantized, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            out = out + self.bias.to(self.compute_dtype)
        return out.to(x.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> "NF4Linear":
        super()._apply(fn, recurse)  # moves the bias
        q = self.quantized
        for field in ("packed", "absmax", "absmax_codes", "absmax_scales"):
            tensor = getattr(q, field)
            if tensor is not None:
                moved = fn(tensor)
                setattr(q, field, moved if moved.dtype == tensor.dtype else tensor.to(moved.device))
        return self

    def extra_repr(self) -> str:
        q = self.quantized
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={q.blocksize}, "
                f"double_quant={q.double_quant}, compute_dtype={self.compute_dtype}")


DEFAULT_SKIP = ("classifier", "score", "pooler", "lm_head")


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16,
                   skip: tuple[str, ...] = DEFAULT_SKIP) -> nn.Module:
    """Replace every `nn.Linear` of `model` by `NF4Linear`, except those inside modules named in
    `skip` (heads stay in full precision, as in QLoRA). In place; returns `model`."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear
             and not set(n.split(".")) & set(skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, NF4Linear.from_linear(getattr(parent, child), blocksize,
                                                     double_quant, compute_dtype))
    return model


def nf4_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of `model` (codes and constants)."""
    return sum(m.quantized.nbytes for m in model.modules() if isinstance(m, NF4Linear))


# %% [markdown]
# **Checks.** The layer must compute $x \hat W^\top + b$ with $\hat W$ the dequantized weight, give
# the input gradient $g \hat W$ (autograd through our custom backward against autograd through a
# plain float layer holding $\hat W$), and match bitsandbytes' `Linear4bit` on the same weights.

# %%
import bitsandbytes as bnb

torch.manual_seed(0)
dense = torch.nn.Linear(192, 96)
nf4 = NF4Linear.from_linear(dense, double_quant=False, compute_dtype=torch.float32)
reference_layer = torch.nn.Linear(192, 96)
reference_layer.weight.data = dequantize_nf4(nf4.quantized, torch.float32)
reference_layer.bias.data = dense.bias.data.clone()
x = torch.randn(4, 7, 192, requires_grad=True)  # (batch, seq, in)
x_ref = x.detach().clone().requires_grad_()
nf4(x).square().sum().backward()
reference_layer(x_ref).square().sum().backward()
print(f"forward max |diff| {(nf4(x) - reference_layer(x_ref)).abs().max().item():.2e}, "
      f"input-gradient max |diff| {(x.grad - x_ref.grad).abs().max().item():.2e}")
# Same W_hat, same sums, perhaps in other orders. By the bound of Appendix A, y = x W_hat^T + b
# is within gamma_193 of its sum of absolute terms |x| |W_hat|^T + |b|, and the gradient 2 y W_hat
# within gamma_97 of 2 |y| |W_hat| plus the propagated error of y; the two within twice that.
from ftbook.workbench import rounding_bound  # noqa: E402

with torch.no_grad():
    W_abs = reference_layer.weight.abs()
    y_bound = rounding_bound(194, x.abs() @ W_abs.T + reference_layer.bias.abs())
    y_ref = reference_layer(x_ref)
    grad_bound = 2 * (2 * y_bound @ W_abs + rounding_bound(98, 2 * (y_ref.abs() + y_bound) @ W_abs))
assert ((x.grad - x_ref.grad).abs() <= grad_bound).all()

bnb_layer = bnb.nn.Linear4bit(192, 96, bias=True, compute_dtype=torch.float32,
                              compress_statistics=False, quant_type="nf4")
bnb_layer.load_state_dict(dense.state_dict())
bnb_layer = bnb_layer.to("cpu")  # quantizes on the move, as .cuda() does on a GPU
with torch.no_grad():
    x_eval = torch.randn(4, 7, 192)
    gap_bnb = (nf4(x_eval) - bnb_layer(x_eval)).abs()
    diff_bnb = gap_bnb.max().item()
    # bitsandbytes dequantizes with its own level table: each weight differs by at most
    # (level_bound + 2u) max|W|; then each matmul within gamma_193 of |x| |W_hat|^T + |b|
    weight_gap = (level_bound.max().item() + 2 * 2.0**-24) * dense.weight.abs().max().item()
    bnb_bound = (weight_gap * x_eval.abs().sum(-1, keepdim=True)
                 + 2 * rounding_bound(194, x_eval.abs() @ nf4.weight.abs().T + dense.bias.abs()))
print(f"NF4Linear vs bitsandbytes Linear4bit (float32 compute): max |diff| {diff_bnb:.2e}")
assert (gap_bnb <= bnb_bound).all()

# %% [markdown]
# ## Paged optimizers
#
# The remaining memory spike in QLoRA training is transient: a long sequence produces a burst of
# activations, and if the optimizer state sits on the GPU at that moment, the step runs out of
# memory. Paged optimizers (Dettmers et al. §3) allocate the optimizer state in CUDA *unified
# memory*, which the driver pages between GPU and host on demand, like an operating system pages
# RAM to disk: when the GPU fills up, state pages move out, and they come back when the optimizer
# touches them.
#
# We build the explicit version of the same idea: `PagedAdamW` keeps the AdamW moments in host
# memory (pinned, when a GPU is present, so the copies are asynchronous), and during `step()`
# brings the state of one parameter group at a time to the parameter's device, updates, and writes
# it back. Between steps the device holds no optimizer state at all; during a step it holds one
# group's. The update itself is AdamW's (Loshchilov & Hutter 2019), written in the same order of
# operations as `torch.optim.AdamW`, so the two agree to the last bit.

# %%
#| export
class PagedAdamW(torch.optim.Optimizer):
    """AdamW with its state in host memory, paged to the device one parameter group at a time.

    Equal step for step to `torch.optim.AdamW(..., foreach=False)`. On a CPU-only machine the
    "device" is the host and paging is a no-op, which the tests use to check the arithmetic.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        betas_ok = 0 <= betas[0] < 1 and 0 <= betas[1] < 1
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not betas_ok:
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.pin = torch.cuda.is_available()
        self.pages_in = 0  # host-to-device transfers of state tensors (for inspection)

    def _host_zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=p.dtype, device="cpu", pin_memory=self.pin)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = self._host_zeros(p), self._host_zeros(p)
                # page in: host -> device (a no-op when the device is the host)
                exp_avg = state["exp_avg"].to(p.device, non_blocking=True)
                exp_avg_sq = state["exp_avg_sq"].to(p.device, non_blocking=True)
                self.pages_in += 2 * (p.device.type != "cpu")
                state["step"] += 1
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay
                exp_avg.lerp_(p.grad, 1 - beta1)  # m <- b1 m + (1 - b1) g
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                # page out: device -> host
                if exp_avg.data_ptr() != state["exp_avg"].data_ptr():
                    state["exp_avg"].copy_(exp_avg, non_blocking=True)
                    state["exp_avg_sq"].copy_(exp_avg_sq, non_blocking=True)
        return loss


# %% [markdown]
# **Check.** Ten steps of `PagedAdamW` and of `torch.optim.AdamW` from the same start, on the same
# gradients, with weight decay and two parameter groups: the parameters must be identical.

# %%
torch.manual_seed(0)
params_a = [torch.nn.Parameter(torch.randn(33, 17)), torch.nn.Parameter(torch.randn(17))]
params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
paged = PagedAdamW([{"params": params_a[:1]}, {"params": params_a[1:], "weight_decay": 0.0}],
                   lr=3e-3, weight_decay=0.1)
torch_adamw = torch.optim.AdamW([{"params": params_b[:1]},
                                 {"params": params_b[1:], "weight_decay": 0.0}],
                                lr=3e-3, weight_decay=0.1, foreach=False)
for _ in range(10):
    grads = [torch.randn_like(p) for p in params_a]
    for p, g in zip(params_a, grads, strict=True):
        p.grad = g.clone()
    for p, g in zip(params_b, grads, strict=True):
        p.grad = g.clone()
    paged.step()
    torch_adamw.step()
max_diff = max((a - b).abs().max().item() for a, b in zip(params_a, params_b, strict=True))
print(f"after 10 steps: max |PagedAdamW - torch AdamW| = {max_diff:.1e}")
# exact on any machine: elementwise operations only (no sums), the same ones in the same order
# with the same scalars, each correctly rounded element by element
assert max_diff == 0.0

# %% [markdown]
# On a GPU, `bnb.optim.PagedAdamW` is the reference (its state lives in unified memory); the test
# suite compares the two there (`gpu` marker). On a CPU, bitsandbytes' paged optimizers fall back
# to ordinary, non-paged state: there is no separate device memory to page from.
#
# ## Where the memory goes, measured
#
# For full fine-tuning, LoRA and QLoRA on the same encoder and batch we measure, rather than
# estimate, four kinds of memory. **Weights**: bytes of every parameter and buffer (and the 4-bit
# codes and constants of NF4 layers). **Gradients**: bytes of every `.grad` after the backward pass.
# **Optimizer state**: bytes of every tensor in the optimizer's state after one step.
# **Activations**: bytes of every tensor that autograd saved for the backward pass, captured with
# `torch.autograd.graph.saved_tensors_hooks` and de-duplicated by storage (weights excluded).

# %%
#| export
def _tensor_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Any
                     ) -> dict[str, int]:
    """Measured bytes of weights, gradients, optimizer state and saved activations for one
    training step `loss_fn() -> loss` of `model` with `optimizer`."""
    weights = _tensor_bytes(list(model.parameters()) + list(model.buffers())) + nf4_bytes(model)
    weight_storages = {t.untyped_storage().data_ptr() for t in model.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weight_storages:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    activations = _tensor_bytes(saved)
    loss.backward()
    gradients = _tensor_bytes(p.grad for p in model.parameters())
    optimizer.step()
    state = _tensor_bytes(t for s in optimizer.state.values() for t in s.values())
    optimizer.zero_grad(set_to_none=True)
    return {"weights": weights, "gradients": gradients, "optimizer state": state,
            "activations": activations}


# %%
#| export
@dataclass(frozen=True)
class QLoRAConfig:
    """Budget of chapter 13-03 (one per profile); data sizes and batch come from 13-01."""

    rank: int
    alpha: float
    lr: float
    steps: int
    blocksize: int = 64
    double_quant: bool = True
    timing_repeats: int = 5
    seed: int = 0


QLORA_CONFIGS = {
    "smoke": QLoRAConfig(rank=4, alpha=8, lr=1e-3, steps=3, timing_repeats=2),
    "tiny": QLoRAConfig(rank=8, alpha=16, lr=3e-3, steps=100, timing_repeats=5),
    "full": QLoRAConfig(rank=16, alpha=32, lr=2e-4, steps=1000, timing_repeats=20),
}

# %%
import copy

from ftbook.data import load_sst2, subset
from ftbook.full_finetuning import FT_CONFIGS, evaluate_accuracy, sample_batches, train_classifier
from ftbook.lora import (
    PARITY_TOLERANCE,
    apply_lora,
    encoder_target_modules,
    merge_lora,
)
from ftbook.workbench import Timer, binomial_interval, count_parameters

cfg = pick(PROFILE, QLORA_CONFIGS)
ft_cfg = pick(PROFILE, FT_CONFIGS)
train_ds = subset(load_sst2("train"), ft_cfg.n_train, seed=SEED, stratify_by="label")
dev_ds = subset(load_sst2("validation"), ft_cfg.n_dev, seed=SEED, stratify_by="label")
HEAD = ["pooler", "classifier"]  # trained and kept in full precision, as in 13-01 and 13-02


def build(method: str):
    """The encoder set up for one method: "full", "LoRA" or "QLoRA" (LoRA on all linear layers)."""
    model, tokenizer = load_encoder_classifier(PROFILE, seed=SEED)
    if method == "QLoRA":
        quantize_model(model, cfg.blocksize, cfg.double_quant, torch.bfloat16)
    if method in ("LoRA", "QLoRA"):
        apply_lora(model, encoder_target_modules(model, "all linear"), cfg.rank, cfg.alpha,
                   modules_to_save=HEAD)
    return model.to(DEVICE), tokenizer


memory_rows = {}
batch = next(sample_batches(train_ds, encoder_tokenizer, ft_cfg.batch_size, ft_cfg.max_len, 1,
                            SEED))
for method in ("full", "LoRA", "QLoRA"):
    model, _ = build(method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = {k: v.to(DEVICE) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(DEVICE)

    def loss_fn(model=model, inputs=inputs, labels=labels):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(**inputs).logits
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    memory_rows[method] = memory_breakdown(model, optimizer, loss_fn)
    memory_rows[method]["trainable params"] = count_parameters(model, trainable_only=True)
memory = pd.DataFrame(memory_rows).T
memory_mib = memory.drop(columns="trainable params") / 2**20
memory_mib["total"] = memory_mib.sum(axis=1)
show_table(memory_mib.assign(**{"trainable params": memory["trainable params"]}),
           "memory_breakdown_mib", CHAPTER)

fig, ax = plt.subplots(figsize=(6.5, 3.6))
bottom = np.zeros(len(memory_mib))
for column in ("weights", "gradients", "optimizer state", "activations"):
    ax.bar(memory_mib.index, memory_mib[column], bottom=bottom, label=column)
    bottom += memory_mib[column].to_numpy()
ax.set(ylabel="MiB (measured)", title=f"Memory of one training step (batch {ft_cfg.batch_size})")
ax.legend()
show_figure(fig, "memory_breakdown", CHAPTER)


def relative_size(ratio: float, margin: float = 0.05) -> str:
    """A ratio of two measured byte counts in words, with `margin` counted as the same."""
    if abs(ratio - 1) <= margin:
        return f"about the same (within {margin:.0%})"
    return f"{abs(ratio - 1):.0%} {'less' if ratio < 1 else 'more'}"


print("saved activations against full fine-tuning: " + "; ".join(
    f"{m} {relative_size(memory_mib.loc[m, 'activations'] / memory_mib.loc['full', 'activations'])}"
    for m in ("LoRA", "QLoRA")))

# %% [markdown]
# The measurement splits the way the theory says. Full fine-tuning pays for every parameter three
# more times (a float32 gradient and AdamW's two moments). LoRA removes almost all of that: only the
# adapters and the head have gradients and state. QLoRA then shrinks the largest remaining item, the
# frozen weights: each quantized matrix by about 8x relative to float32 (4.127 bits against 32). The
# embeddings (about half of MiniLM's parameters, since its vocabulary is large for its width), the
# norms and the head stay in full precision, so the weights column shrinks by less.
#
# The line under the figure compares the saved activations. Part of what the hook counts there
# in the float32 runs is not an activation of the network: under autocast, a frozen float32
# layer casts its weight to bfloat16 and saves that copy for the backward pass, whereas
# `NF4Linear`'s backward dequantizes again and saves nothing, so QLoRA's column can come out
# lower by such copies. The activations proper scale with batch and sequence length, not with
# how the weights are stored; at larger batch and sequence sizes they dominate, which is where
# gradient checkpointing, not quantization, is the lever.
#
# The same arithmetic for the paper's models (per parameter: 16-bit weights and gradients and
# 32-bit Adam moments for full fine-tuning, 12 bytes; 16-bit frozen weights for LoRA; 4.127 bits
# for QLoRA; adapters, activations and the paged spikes not included):

# %%
def gigabytes(n_params: float, bytes_per_param: float) -> float:
    return n_params * bytes_per_param / 1e9


paper = pd.DataFrame({size: {
    "full fine-tuning (16-bit + Adam), GB": gigabytes(n, 2 + 2 + 8),
    "LoRA, 16-bit frozen base, GB": gigabytes(n, 2),
    "QLoRA, NF4 + double quant, GB": gigabytes(n, (4 + 8 / 64 + 32 / (64 * 256)) / 8),
} for size, n in (("7B", 7e9), ("65B", 65e9))}).T
show_table(paper, "paper_arithmetic", CHAPTER, floatfmt="{:.1f}")

# %% [markdown]
# For 65B parameters this reproduces the paper's figures: 780 GB for full fine-tuning, and a 4-bit
# base of about 33.5 GB, which with adapters and activations fits the "less than 48 GB" of the
# abstract.
#
# ## QLoRA against LoRA: quality, speed, memory
#
# Same encoder, data, steps and adapter (rank and $\alpha$ from the configuration, on *all* linear
# layers: Dettmers et al. §4 find this necessary to match 16-bit quality), trained with 13-01's loop;
# the only difference is the base: float32 or NF4 with double quantization.

# %%
results = {}
for method in ("LoRA", "QLoRA"):
    model, tokenizer = build(method)
    log = train_classifier(model, tokenizer, train_ds, steps=cfg.steps, lr=cfg.lr,
                           batch_size=ft_cfg.batch_size, max_len=ft_cfg.max_len, seed=SEED,
                           warmup_ratio=ft_cfg.warmup_ratio, weight_decay=0.0, bf16=ft_cfg.bf16,
                           desc=method)
    results[method] = {"model": model, "log": log,
                       "dev accuracy": evaluate_accuracy(model, tokenizer, dev_ds, ft_cfg.max_len,
                                                         bf16=ft_cfg.bf16)}
comparison = pd.DataFrame({m: {
    "dev accuracy": r["dev accuracy"],
    "final loss (10-step mean)": float(np.mean(r["log"].losses[-10:])),
    "s / step (median)": r["log"].median_step_seconds,
    "peak memory MiB (RSS)": r["log"].peak_memory_bytes / 2**20,
    "base weights MiB": memory.loc[m, "weights"] / 2**20,
} for m, r in results.items()}).T
show_table(comparison, "lora_vs_qlora", CHAPTER)

# %% [markdown]
# ### The cost of dequantization
#
# QLoRA buys memory with compute: every forward pass dequantizes every weight, and every backward
# pass does it again. We time a forward pass of the LoRA and the QLoRA model on the same batch and,
# separately, the dequantization of all NF4 weights on its own.

# %%
def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        with Timer(DEVICE) as t:
            fn()
        times.append(t.seconds)
    return float(np.median(times))


qlora_model = results["QLoRA"]["model"].eval()
lora_model = results["LoRA"]["model"].eval()
nf4_layers = [m for m in qlora_model.modules() if isinstance(m, NF4Linear)]
with torch.no_grad():
    def forward(model):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            model(**inputs)

    timings = pd.DataFrame({"median s": {
        "forward, LoRA (float32 base)": median_seconds(lambda: forward(lora_model), cfg.timing_repeats),
        "forward, QLoRA (NF4 base)": median_seconds(lambda: forward(qlora_model), cfg.timing_repeats),
        "dequantize all NF4 weights": median_seconds(
            lambda: [m.dequantized(torch.bfloat16) for m in nf4_layers], cfg.timing_repeats),
    }})
timings["share of QLoRA forward"] = timings["median s"] / timings.loc["forward, QLoRA (NF4 base)", "median s"]
show_table(timings, "dequantization_cost", CHAPTER)

# %% [markdown]
# ## Merging LoRA into a 4-bit base
#
# After QLoRA training, the adapter is usually merged for deployment. With a 4-bit base there is no
# float weight to add $\Delta W$ to. The tempting shortcut, dequantize $W_0$, add $\Delta W$ and
# quantize the sum back to NF4, changes the model: the requantization rounds $\hat W_0 + \Delta W$
# to the nearest NF4 levels, and $\Delta W$ is typically *smaller* than the spacing of those
# levels, so much of it is rounded away (and the rest of $\hat W_0$ moves too, since each block's
# maximum can change). `merge_lora` from {ref}`lora` therefore refuses a quantized base. The correct
# merge keeps the merged weight in the compute precision:
#
# $$
# W_\text{merged} = \operatorname{dequantize}(W_0^\text{NF4}) + \tfrac{\alpha}{r} B A
# \quad \text{(16/32-bit)}, \qquad \text{optionally requantized afterwards, at a measured cost.}
# \tag{3.4}
# $$

# %%
#| export
from ftbook.lora import lora_layers


def merge_lora_nf4(model: nn.Module, requantize: bool = False,
                   dtype: torch.dtype = torch.float32) -> nn.Module:
    """Merge every LoRA adapter over an `NF4Linear` base, eq. (3.4), in place.

    The merged weight dequantize(W0) + (alpha/r) B A becomes a plain `nn.Linear` in `dtype`, or,
    with `requantize=True`, a new `NF4Linear` (which rounds it to NF4 and changes outputs).
    """
    for name, layer in lora_layers(model).items():
        base = layer.base
        if not isinstance(base, NF4Linear):
            raise TypeError(f"{name}: base is {type(base).__name__}; use ftbook.lora.merge_lora")
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.quantized.packed.device, dtype=dtype)
        with torch.no_grad():
            acc = torch.promote_types(dtype, torch.float32)  # the sum in float32, or float64
            merged.weight.copy_(base.dequantized(acc) + layer.delta_weight().to(acc))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        if requantize:
            merged = NF4Linear.from_linear(merged, base.quantized.blocksize,
                                           base.quantized.double_quant, base.compute_dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    return model


# %% [markdown]
# We merge the trained QLoRA model both ways and compare logits on the dev set with the unmerged
# model, in float32 compute so that the comparison sees only the merge. For scale: the typical
# size of $\Delta W$ against the NF4 step size (the gap between adjacent levels times the block
# constant) of the same weights.

# %%
try:
    merge_lora(copy.deepcopy(qlora_model))
except TypeError as err:
    print(f"merge_lora on a 4-bit base: {err}")

for module in qlora_model.modules():
    if isinstance(module, NF4Linear):
        module.compute_dtype = torch.float32
dev_batch = encoder_tokenizer(dev_ds["sentence"][:256], padding=True, truncation=True,
                              max_length=ft_cfg.max_len, return_tensors="pt")
dev_batch = {k: v.to(DEVICE) for k, v in dev_batch.items()}
with torch.no_grad():
    unmerged_logits = qlora_model(**dev_batch).logits
    merged_float = merge_lora_nf4(copy.deepcopy(qlora_model), requantize=False).eval()
    merged_nf4 = merge_lora_nf4(copy.deepcopy(qlora_model), requantize=True).eval()
    for module in merged_nf4.modules():
        if isinstance(module, NF4Linear):
            module.compute_dtype = torch.float32
    logits_float, logits_nf4 = merged_float(**dev_batch).logits, merged_nf4(**dev_batch).logits

one_layer = next(iter(lora_layers(qlora_model).values()))
delta = one_layer.delta_weight().detach().abs()
q = one_layer.base.quantized
gaps = torch.tensor(NF4_LEVELS).diff().mean() * q.constants().mean()
labels_dev = torch.tensor(dev_ds["label"][:256], device=DEVICE)
merge_table = pd.DataFrame({
    "max |logits - unmerged|": [0.0, (logits_float - unmerged_logits).abs().max().item(),
                                (logits_nf4 - unmerged_logits).abs().max().item()],
    "predictions changed": [0, int((logits_float.argmax(-1) != unmerged_logits.argmax(-1)).sum()),
                            int((logits_nf4.argmax(-1) != unmerged_logits.argmax(-1)).sum())],
    "accuracy (256 dev rows)": [float((x.argmax(-1) == labels_dev).float().mean())
                                for x in (unmerged_logits, logits_float, logits_nf4)],
}, index=["unmerged QLoRA", "merged, float32 (eq. 3.4)", "merged, requantized to NF4"])
show_table(merge_table, "merge_into_4bit", CHAPTER, floatfmt="{:.3g}")
print(f"one layer: mean |ΔW| = {delta.mean():.2e}, mean NF4 step = {gaps:.2e} "
      f"(ratio {delta.mean() / gaps:.2f})")
n_dev = len(labels_dev)
k_unmerged, k_nf4 = (int((x.argmax(-1) == labels_dev).sum()) for x in (unmerged_logits, logits_nf4))
(lo_unmerged, hi_unmerged), (lo_nf4, hi_nf4) = (binomial_interval(k, n_dev)
                                                for k in (k_unmerged, k_nf4))
accuracy_apart = lo_nf4 > hi_unmerged or hi_nf4 < lo_unmerged
flips = merge_table.loc["merged, requantized to NF4", "predictions changed"]
print(f"requantized merge: {flips} of {n_dev} predictions flip; accuracy "
      f"{k_nf4 / n_dev:.3f} [{lo_nf4:.3f}, {hi_nf4:.3f}] against unmerged {k_unmerged / n_dev:.3f} "
      f"[{lo_unmerged:.3f}, {hi_unmerged:.3f}]: "
      + ("the intervals are disjoint, the change is beyond them" if accuracy_apart
         else "the intervals overlap, the change is within them"))

# The check, on float64 copies: there the float merge and the unmerged model agree to float64
# rounding, far below 13-02's parity tolerance (the float32 row above shows float32 rounding).
check_model = copy.deepcopy(qlora_model).double()
for module in check_model.modules():
    if isinstance(module, NF4Linear):
        module.compute_dtype = torch.float64
with torch.no_grad():
    unmerged64 = check_model(**dev_batch).logits
    merged64 = merge_lora_nf4(check_model, dtype=torch.float64).eval()(**dev_batch).logits
merge_gap64 = (merged64 - unmerged64).abs().max().item()
print(f"float64 copies: max |merged - unmerged| logits = {merge_gap64:.2e}")
assert merge_gap64 < PARITY_TOLERANCE
del check_model

# %% [markdown]
# The float merge reproduces the unmerged model up to float rounding (asserted on float64
# copies). Requantizing is a different model: compare its row of logit changes with the float
# merge's, and the printed count of flipped predictions. A ratio below 1 on the ΔW line means
# $\Delta W$ is a fraction of one NF4 step, so the rounding error of a weight (up to half a
# step) can be as large as what training added to it, in a direction training did not choose.
# Whether that moves accuracy is a separate question, which the requantized-merge line answers
# with 95% intervals: an accuracy change within them is not resolved by the rows scored, in
# either direction, even while individual predictions flip. Keep the merged model in 16 bits, or
# keep the adapter separate; requantize only after measuring, on your task, what it costs.
#
# ## Discussion
#
# - **NF4 is the right 4-bit code for weights.** The entropy lines say, for normal data and for
#   the real weights of both base models, how many of its 16 levels NF4 is worth, how many bits a
#   uniform grid wastes, and on which of them NF4 uses its codes more evenly: this is the
#   information-theoretic argument of (3.2), measured.
# - **Our quantizer is bitsandbytes' quantizer.** Identical constants on every tested tensor,
#   identical codes except at exact ties (asserted; the parity line counts them), dequantization
#   equal to bitsandbytes' reference up to the bounded difference of the level tables, and the
#   double-quantized reconstruction error within 1% with the same 8-bit dynamic code for the
#   constants.
# - **Memory.** The measured breakdown shows where each method saves; the 65B arithmetic
#   reproduces the paper's 780 GB vs. a 33.5 GB 4-bit base.
# - **Quality and speed.** Compare the two rows of the LoRA/QLoRA table: with all linear layers
#   adapted, the 4-bit base reaches an accuracy close to the float32 base in this budget, and the
#   price is in time: every pass dequantizes every weight, as the timing table shows. On GPUs,
#   fused dequantize-matmul kernels make that cost small; on this CPU it is visible. (The
#   "peak memory (RSS)" column is the process's resident memory, which on a CPU also counts the
#   allocator's cached pages and the transient dequantized copies; the measured breakdown above is
#   the reliable comparison of what each method must hold.)
#
# ## Pitfalls
#
# - **Merging into the 4-bit base.** Requantizing $W_0 + \Delta W$ changes outputs (measured above);
#   merge to 16 bits or keep the adapter.
# - **Quantizing the head.** A randomly initialised classification head or the LM head is small and
#   sensitive; QLoRA keeps it in full precision (`quantize_model(skip=...)`).
# - **Targets.** Adapting only q and v over a 4-bit base loses quality that all-linear adapters
#   recover (Dettmers et al. §4): the adapters must also absorb quantization error.
# - **"Paged" on CPU means nothing.** bitsandbytes' paged optimizers page between GPU and host; on
#   a CPU there is nothing to page and they behave as ordinary optimizers.
#
# ## Summary
#
# - NF4 places 16 levels at normal quantiles with an exact zero (3.2); blockwise absmax scaling
#   (3.1) with 64-value blocks costs 0.5 bits per parameter, double quantization 0.127 (3.3).
# - `quantize_nf4`/`dequantize_nf4` reproduce bitsandbytes' codes and values; `NF4Linear` dequantizes on
#   the fly, recomputes the weight in the backward pass, and carries LoRA adapters unchanged.
# - `PagedAdamW` keeps optimizer state off the device and equals AdamW step for step; the memory
#   breakdown is measured, not estimated; merging into a 4-bit base is done in 16/32 bits (3.4).
#
# ## Exercises
#
# 1. Quantize with block sizes 32, 64, 128 and 256. Plot the relative reconstruction error and the
#    bits per parameter. Where does the trade-off bend?
# 2. Replace NF4's levels with FP4's (bitsandbytes' `get_4bit_type("fp4")`) and repeat the entropy
#    measurement and the QLoRA run. Which loses more accuracy?
# 3. Replace the 8-bit dynamic code of the double quantization by an even int8 grid. How much
#    does the reconstruction error grow on the encoder (heavy-tailed weights) and on the causal LM?
#
# ## References
#
# - Dettmers, Pagnoni, Holtzman & Zettlemoyer (2023), *QLoRA: Efficient Finetuning of Quantized
#   LLMs*, arXiv:2305.14314, §3 and §4.
# - Dettmers, Lewis, Shleifer & Zettlemoyer (2022), *8-bit Optimizers via Block-wise
#   Quantization*, arXiv:2110.02861.
# - Loshchilov & Hutter (2019), *Decoupled Weight Decay Regularization*, arXiv:1711.05101.
# - bitsandbytes documentation: `quantize_4bit`, `Linear4bit`, paged optimizers.

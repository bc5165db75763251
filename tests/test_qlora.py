"""Tests of ftbook.qlora (chapter 13-03): the NF4 code (3.2), blockwise quantization (3.1) and
double quantization (3.3) against bitsandbytes, `NF4Linear` (forward, input gradient, what autograd
keeps, dtype moves, bitsandbytes' `Linear4bit`), `quantize_model`, LoRA over NF4 and
`merge_lora_nf4` (3.4), `PagedAdamW` against torch's AdamW (and bitsandbytes' on a GPU) and
`memory_breakdown`.

Every model is a random tiny BERT built here, in float32; nothing is downloaded. Tolerances come
from the arithmetic: the bound of Appendix A on float32 sums, bitsandbytes' level table
(`qlora.bnb_table_tolerance`), bfloat16's unit roundoff, or a comparison in float64.
"""
import copy
import math

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch
import torch.nn.functional as F
from tiny_models import FFN, D, L, bert_batch, tiny_bert  # noqa: F401
from torch import nn

from ftbook import lora, qlora
from ftbook.workbench import rounding_bound, unit_roundoff

R, ALPHA = 4, 8.0  # LoRA rank and alpha
ENCODER_LINEARS = sorted(f"bert.encoder.layer.{i}.{name}" for i in range(L) for name in (
    "attention.self.query", "attention.self.key", "attention.self.value",
    "attention.output.dense", "intermediate.dense", "output.dense"))


LABELS = torch.tensor([0, 1, 1, 0])


def randn(*shape, seed: int = 0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Our own reading of the layout: byte i holds code 2i in its high nibble, 2i+1 in its low."""
    packed = packed.reshape(-1).long()
    return torch.stack([packed // 16, packed % 16], dim=1).reshape(-1)[:n]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def within(a: torch.Tensor, b: torch.Tensor, bound) -> bool:
    """|a - b| <= bound, elementwise (bound a tensor or a number)."""
    return bool(((a.double() - b.double()).abs() <= bound).all())


def matmul_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """Twice the bound of Appendix A on x w^T (+ b): what two float32 evaluations of the same
    in-term dot products (and the bias) may differ by, in any summation order."""
    abs_terms = x.detach().abs() @ w.detach().abs().T
    if b is not None:
        abs_terms = abs_terms + b.detach().abs()
    return 2 * rounding_bound(w.shape[1] + 2, abs_terms.double())


def table_gap(w: torch.Tensor) -> float:
    """Bound on |our dequantized value - bitsandbytes'| with the same codes and constants: the
    two level tables differ by `bnb_table_tolerance`, times a constant <= max |w|, plus one
    float32 rounding of each product."""
    return (qlora.bnb_table_tolerance().max().item() + 2 * unit_roundoff()) * w.abs().max().item()


def rel_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((w_hat.double() - w.double()).norm() / w.double().norm())


def bnb_quantize(w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False):
    return bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                              compress_statistics=compress_statistics)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit`, of the flattened tensor, eagerly.

    Flattened: bitsandbytes 0.50's CPU kernel mis-places blocks longer than a row (a (96, 64)
    tensor with blocksize 128 dequantizes wrongly, while its own quantization and its generic
    torch path agree with ours). Eagerly: its odd-size fallback is wrapped in torch.compile, which
    would take half a minute to compile here.
    """
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    with torch.compiler.set_stance("force_eager"):
        return bnbf.dequantize_4bit(packed, flat).view(state.shape)


def dq_bytes_by_hand(n: int, blocksize: int = 64, dq_blocksize: int = 256) -> int:
    """Codes, int8 constants, float32 scales per 256 constants, one float32 offset."""
    blocks = math.ceil(n / blocksize)
    return math.ceil(n / 2) + blocks * 1 + math.ceil(blocks / dq_blocksize) * 4 + 4


# --- the NF4 code, eq. (3.2) ---------------------------------------------------------------------

def test_nf4_levels_are_sorted_with_exact_zero_and_unit_ends():
    levels = qlora.NF4_LEVELS
    assert len(levels) == 16 and all(isinstance(v, float) for v in levels)
    assert all(a < b for a, b in zip(levels[:-1], levels[1:], strict=True))
    assert levels[7] == 0.0
    assert levels[0] == -1.0 and levels[15] == 1.0
    assert sum(v < 0 for v in levels) == 7 and sum(v > 0 for v in levels) == 8


def test_nf4_levels_equal_the_bitsandbytes_table():
    table = bnbf.get_4bit_type("nf4", device="cpu")
    assert table.shape == (16,) and table[7] == 0
    # bitsandbytes' table comes from float32 quantile points: a few float32 steps away from the
    # exact quantiles of eq. (3.2), ours are their float32 rounding (see bnb_table_tolerance)
    ours = torch.tensor(qlora.NF4_LEVELS, dtype=torch.float64)
    assert within(ours, table, qlora.bnb_table_tolerance())


@pytest.mark.xfail(strict=True, reason=(
    "documented difference: NF4_LEVELS are the exact quantiles rounded to float32, bitsandbytes' "
    "table differs in the last bit for 11 of 16 levels (up to 1.19e-7), so a value within ~1e-7 "
    "of a midpoint can get the neighbouring code; codes agree on all real and random tensors"))
def test_codes_equal_bitsandbytes_at_its_midpoints():
    table = bnbf.get_4bit_type("nf4", device="cpu")
    midpoints = (table[:-1] + table[1:]) / 2  # what bitsandbytes bucketizes against
    w = torch.cat([torch.ones(1), midpoints])  # absmax 1: the scaled values are the midpoints
    packed, _ = bnb_quantize(w)
    assert torch.equal(qlora.quantize_nf4(w, double_quant=False).packed, packed.reshape(-1))


def test_nf4_levels_are_the_normal_quantiles_of_eq_3_2():
    assert abs((1 - (1 / 30 + 1 / 32) / 2) - 0.9677083) < 0.5e-7  # delta of the text, 7 decimals
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64))
    p_pos = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float64)[:-1]
    p_neg = torch.linspace(0.9677083, 0.5, 8, dtype=torch.float64)[:-1]
    positive = normal.icdf(p_pos).flip(0)  # 8 levels, ascending
    negative = -normal.icdf(p_neg)  # 7 levels, already ascending (most negative first)
    expected = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    expected = expected / expected.max()
    assert torch.all(expected.diff() > 0) and expected[0] == -1 and expected[-1] == 1
    # ours are these float64 values rounded once to float32 (the slack covers a few float64
    # roundings of a differently ordered computation)
    bound = (unit_roundoff() + 8 * unit_roundoff(torch.float64)) * expected.abs()
    assert within(torch.tensor(qlora.NF4_LEVELS, dtype=torch.float64), expected, bound)
    # and not some other spacing: the positive gaps shrink towards zero, unlike a uniform grid
    gaps = expected[8:].diff()
    assert torch.all(gaps[:-1] < gaps[1:])


# --- blockwise quantization, eq. (3.1), and parity with bitsandbytes ---------------------------

# (numel): 6144 = 96 blocks of 64; 1500 and 600 end with a shorter block; 1073 and 63 are odd
# (63 is a single short block).
SHAPES = [(96, 64), (50, 30), (37, 29), (7, 9), (3, 5, 40)]


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_codes_and_constants_equal_bitsandbytes(shape, blocksize):
    w = randn(*shape, seed=sum(shape))
    n = w.numel()
    ours = qlora.quantize_nf4(w, blocksize=blocksize, double_quant=False)
    packed, state = bnb_quantize(w, blocksize)
    assert ours.packed.dtype == torch.uint8 and ours.packed.shape == (math.ceil(n / 2),)
    assert packed.numel() == ours.packed.numel()
    assert torch.equal(unpack(ours.packed, n), unpack(packed, n))  # every code identical
    if n % 2 == 0:
        assert torch.equal(ours.packed, packed.reshape(-1))  # byte for byte
    assert ours.absmax.dtype == torch.float32 and ours.absmax.shape == (math.ceil(n / blocksize),)
    assert torch.equal(ours.absmax, state.absmax)
    assert not ours.double_quant and ours.blocksize == blocksize
    assert ours.shape == w.shape and ours.dtype == w.dtype

    deq = qlora.dequantize_nf4(ours)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert within(deq, bnb_dequantize(packed, state), table_gap(w))
    assert qlora.dequantize_nf4(ours, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(37, 29), (7, 9)], ids=str)
def test_odd_numel_packed_bytes_equal_bitsandbytes(shape):
    w = randn(*shape, seed=sum(shape))
    packed, _ = bnb_quantize(w)
    assert torch.equal(qlora.quantize_nf4(w, double_quant=False).packed, packed.reshape(-1))


@pytest.mark.parametrize(("shape", "blocksize"), [((50, 30), 64), ((50, 30), 128),
                                                 ((96, 64), 128)])
def test_codes_are_the_nearest_level_by_brute_force(shape, blocksize):
    w = randn(*shape, seed=3)  # 1500 values: a shorter last block; (96, 64): blocks span rows
    flat, n = w.reshape(-1), w.numel()
    levels = torch.tensor(qlora.NF4_LEVELS)
    codes, constants, values = [], [], []
    for start in range(0, n, blocksize):
        block = flat[start:start + blocksize]
        c = block.abs().max()
        idx = ((block / c)[:, None] - levels[None, :]).abs().argmin(dim=1)  # eq. (3.1)
        codes.append(idx)
        constants.append(c)
        values.append(levels[idx] * c)
    q = qlora.quantize_nf4(w, blocksize=blocksize, double_quant=False)
    assert torch.equal(unpack(q.packed, n), torch.cat(codes))
    assert torch.equal(q.absmax, torch.stack(constants))
    # the same float32 products level * constant: equal to the last bit
    assert torch.equal(qlora.dequantize_nf4(q), torch.cat(values).view(shape))


def test_packing_puts_the_first_code_in_the_high_nibble():
    levels = qlora.NF4_LEVELS
    w = torch.tensor([1.0, -1.0, 0.0, levels[9], levels[3]])  # codes 15, 0, 7, 9, 3 (absmax 1)
    q = qlora.quantize_nf4(w, double_quant=False)
    assert q.packed.tolist() == [0xF0, 0x79, 0x37]  # odd count: padded with code 7 (zero), as bnb
    assert q.absmax.tolist() == [1.0]
    assert qlora.dequantize_nf4(q).tolist() == w.tolist()
    q4 = qlora.quantize_nf4(w[:4], blocksize=2, double_quant=False)  # two blocks of two
    assert q4.absmax.tolist() == [1.0, levels[9]]  # the second block is [0, 1] once scaled
    assert q4.packed.tolist() == [0xF0, 0x7F]
    assert qlora.dequantize_nf4(q4).tolist() == w[:4].tolist()


@pytest.mark.parametrize("double_quant", [False, True])
def test_zero_maps_exactly_to_zero(double_quant):
    w = randn(8, 64, seed=4)
    w[:, ::3] = 0.0  # scattered zeros in every block
    w[2] = 0.0  # and a block that is all zeros
    q = qlora.quantize_nf4(w, double_quant=double_quant)
    codes = unpack(q.packed, w.numel()).view(8, 64)
    assert torch.all(codes[w == 0] == 7)
    deq = qlora.dequantize_nf4(q)
    assert torch.all(deq[w == 0] == 0.0) and torch.isfinite(deq).all()
    assert torch.count_nonzero(deq[2]) == 0


def test_a_constant_block_round_trips_exactly():
    w = torch.cat([torch.full((64,), 0.37), torch.full((64,), -2.5), torch.full((40,), 1e-3)])
    q = qlora.quantize_nf4(w, double_quant=False)
    assert torch.equal(qlora.dequantize_nf4(q), w)


@pytest.mark.parametrize("blocksize", [0, 1, 3, 63, -2])
def test_invalid_blocksize_raises(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        qlora.quantize_nf4(torch.randn(4, 64), blocksize=blocksize)


# --- double quantization, eq. (3.3) --------------------------------------------------------------

def test_double_quant_error_is_within_one_percent_of_bitsandbytes():
    w = randn(256, 256, seed=5)  # 1024 blocks of 64: 4 blocks of 256 constants
    plain = qlora.quantize_nf4(w, double_quant=False)
    ours = qlora.quantize_nf4(w, double_quant=True)
    assert ours.double_quant and ours.absmax is None
    assert torch.equal(ours.packed, plain.packed)  # only the constants are re-quantized
    assert ours.absmax_codes.dtype == torch.uint8 and ours.absmax_codes.shape == (1024,)
    assert ours.absmax_scales.dtype == torch.float32 and ours.absmax_scales.shape == (4,)
    packed, state = bnb_quantize(w, compress_statistics=True)
    err_ours = rel_error(w, qlora.dequantize_nf4(ours))
    err_bnb = rel_error(w, bnb_dequantize(packed, state))
    # not an identity: bitsandbytes' second-level 8-bit codes differ from ours in a few places,
    # so this compares accuracy (equal to ~1e-5 here); 1% only catches a different method
    assert abs(err_ours / err_bnb - 1) < 0.01
    assert rel_error(w, qlora.dequantize_nf4(plain)) <= err_ours * 1.01


def test_the_8bit_dynamic_code_is_bitsandbytes():
    code = qlora.dynamic_map_8bit()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code.diff() > 0) and 0.0 in code.tolist() and code[-1] == 1.0
    assert torch.equal(code, bnbf.create_dynamic_map(signed=True).float())


def test_double_quant_constants_are_the_nearest_dynamic_code_value():
    w = randn(96, 400, seed=6)  # 600 blocks: dq blocks of 256, 256 and a short one of 88
    q = qlora.quantize_nf4(w, double_quant=True)
    code = bnbf.create_dynamic_map(signed=True).double()
    true = w.reshape(-1, 64).abs().amax(dim=1).double()
    centred = true - true.mean()
    scales = torch.stack([centred[i:i + 256].abs().max() for i in range(0, 600, 256)])
    # the offset is a float32 mean of 600 constants: a sum within gamma_599 of sum|c|, then a
    # division; a scale is a max of |c - offset|, off by the offset's error and one rounding
    offset_bound = rounding_bound(601, true.sum().item()) / 600
    assert abs(q.absmax_offset - true.mean().item()) <= offset_bound
    assert within(q.absmax_scales, scales, offset_bound + unit_roundoff() * scales)
    per_constant = scales.repeat_interleave(256)[:600]
    x = centred / per_constant  # the values the 8-bit code encodes
    distance = (x[:, None] - code[None, :]).abs()
    assert q.absmax_codes.dtype == torch.uint8 and q.absmax_codes.shape == (600,)
    # our codes are the nearest up to ties within the float32 error e of x (offset and scale)
    scale_error = (offset_bound + unit_roundoff() * per_constant) / per_constant  # relative
    e = ((offset_bound + unit_roundoff() * centred.abs()) / per_constant
         + x.abs() * (scale_error + unit_roundoff()))
    chosen = distance.gather(1, q.absmax_codes.long()[:, None]).squeeze(1)
    assert (chosen <= distance.min(dim=1).values + 2 * e).all()
    # a constant is code * scale + offset in float32: the scale's and offset's errors, and two
    # roundings of the result
    expected = code[q.absmax_codes.long()] * per_constant + true.mean()
    bound = (code[q.absmax_codes.long()].abs() * (offset_bound + unit_roundoff() * per_constant)
             + offset_bound + 2 * unit_roundoff() * expected.abs())
    assert within(q.constants(), expected, bound)


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (3, 5, 128)], ids=str)
def test_bits_per_param_with_fp32_constants_is_4_5(shape):
    q = qlora.quantize_nf4(randn(*shape), double_quant=False)
    n = math.prod(shape)
    assert q.nbytes == n // 2 + (n // 64) * 4
    assert q.bits_per_param == 4.5


@pytest.mark.parametrize("shape", [(64, 64), (96, 200), (300, 257), (7, 9)], ids=str)
def test_bits_per_param_with_double_quant_by_hand(shape):
    q = qlora.quantize_nf4(randn(*shape), double_quant=True)
    n = math.prod(shape)
    assert q.nbytes == dq_bytes_by_hand(n)
    assert q.bits_per_param == pytest.approx(8 * dq_bytes_by_hand(n) / n, rel=1e-12)


def test_double_quant_overhead_is_0_127_bits_for_a_large_matrix():
    n = 1024 * 1024
    plain = qlora.quantize_nf4(randn(1024, 1024), double_quant=False)
    double = qlora.quantize_nf4(randn(1024, 1024), double_quant=True)
    expected = 8 * (n // 2 + n // 64 + (n // 64 // 256) * 4 + 4) / n
    assert double.bits_per_param == pytest.approx(expected, rel=1e-12)
    assert expected == 540932 / 131072 == 4.126983642578125
    # eq. (3.3) leaves out the one float32 offset: 32 bits over n, exact in binary fractions
    assert double.bits_per_param - (4 + 8 / 64 + 32 / (64 * 256)) == 32 / n
    assert round(plain.bits_per_param - double.bits_per_param, 3) == 0.373


# --- NF4Linear -----------------------------------------------------------------------------------

def nf4_layer(in_features=48, out_features=40, double_quant=False, compute_dtype=torch.float32):
    torch.manual_seed(0)
    dense = nn.Linear(in_features, out_features)
    return dense, qlora.NF4Linear.from_linear(dense, double_quant=double_quant,
                                              compute_dtype=compute_dtype)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_forward_and_input_gradient(double_quant):
    dense, layer = nf4_layer(double_quant=double_quant)
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (48, 40)
    w_hat = qlora.dequantize_nf4(layer.quantized, torch.float32)
    assert torch.equal(w_hat, qlora.dequantize_nf4(
        qlora.quantize_nf4(dense.weight, double_quant=double_quant), torch.float32))
    assert torch.equal(layer.weight, w_hat)
    x = randn(3, 5, 48, seed=1).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out = layer(x)
    expected = F.linear(x_ref, w_hat, dense.bias.detach())
    assert within(out, expected, matmul_bound(x, w_hat, dense.bias))
    assert max_diff(out, dense(x)) > 1e-3  # the 4-bit weight is not the float one
    g = randn(3, 5, 40, seed=2)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert within(x.grad, x_ref.grad, matmul_bound(g, w_hat.T))
    assert within(x.grad, g @ w_hat, matmul_bound(g, w_hat.T))
    assert layer.bias.grad is None


def test_nf4_linear_has_no_trainable_parameters_and_no_float_weight():
    dense, layer = nf4_layer(double_quant=True)
    params = dict(layer.named_parameters())
    assert set(params) == {"bias"}
    assert not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(params["bias"], dense.bias)
    assert dense.bias.requires_grad  # from_linear did not freeze the source layer's bias
    assert "weight" not in layer.state_dict()


def test_nf4_matmul_does_not_keep_the_dequantized_weight():
    dense, layer = nf4_layer()
    weight_numel = 40 * 48
    x = randn(3, 5, 48, seed=1).requires_grad_()  # 720 values, unlike the 1920 of the weight

    def saved_numels(module):
        numels = []

        def pack(t):
            numels.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(x)
        return numels, out

    plain = nn.Linear(48, 40).requires_grad_(False)
    plain_numels, _ = saved_numels(plain)
    assert weight_numel in plain_numels  # the check sees a kept weight when there is one
    numels, out = saved_numels(layer)
    assert weight_numel not in numels
    # nor is it stashed on the autograd node itself
    nodes, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            nodes.append(node)
            stack.extend(n for n, _ in node.next_functions)
    nf4_nodes = [n for n in nodes if "NF4" in type(n).__name__]
    assert nf4_nodes
    for node in nf4_nodes:
        assert not node.saved_tensors
        assert not any(isinstance(v, torch.Tensor) and v.numel() == weight_numel
                       for v in vars(node).values())
    out.sum().backward()
    ones = torch.ones(3, 5, 40)
    assert within(x.grad, ones @ layer.weight, matmul_bound(ones, layer.weight.T))


def test_nf4_linear_bf16_compute_keeps_the_input_dtype():
    _, layer = nf4_layer(compute_dtype=torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16
    w_hat = qlora.dequantize_nf4(layer.quantized, torch.float32)
    x = randn(4, 48, seed=1)
    expected = F.linear(x, w_hat, layer.bias.float())
    # bfloat16 (u = 2^-8): x, W and b are rounded once each, the matmul accumulates in float32
    # (PyTorch's bfloat16 gemm, CPU and CUDA) and its result and the bias add are rounded to
    # bfloat16: within 5u of |x| |W|^T + |b| (second-order terms included), plus float32's bound
    abs_terms = x.abs() @ w_hat.abs().T + layer.bias.float().abs()
    bf16_bound = 5 * unit_roundoff(torch.bfloat16) * abs_terms + rounding_bound(50, abs_terms)
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype).detach().clone().requires_grad_()
        out = layer(xi)
        assert out.dtype == dtype
        assert within(out.float(), expected, bf16_bound)
        out.float().sum().backward()
        assert xi.grad.dtype == dtype
    out = layer(x)
    assert torch.equal(out.to(torch.bfloat16).float(), out)  # computed in bfloat16
    assert max_diff(out, expected) > 0


@pytest.mark.parametrize("move", [lambda m: m.to(torch.float64), lambda m: m.double(),
                                  lambda m: m.half(), lambda m: m.to(dtype=torch.bfloat16)],
                         ids=["to_float64", "double", "half", "to_bfloat16"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dtype_moves_leave_the_codes_and_constants_alone(move, double_quant):
    _, layer = nf4_layer(double_quant=double_quant)
    q = layer.quantized
    before = {k: getattr(q, k).clone() for k in ("packed", "absmax", "absmax_codes",
                                                 "absmax_scales") if getattr(q, k) is not None}
    weight = layer.weight.clone()
    assert move(layer) is layer
    assert q.packed.dtype == torch.uint8
    for name, tensor in before.items():
        assert getattr(layer.quantized, name).dtype == tensor.dtype, name
        assert torch.equal(getattr(layer.quantized, name), tensor), name
    assert torch.equal(layer.weight, weight)
    assert layer.bias.dtype != torch.float32 and not layer.bias.requires_grad
    x = randn(2, 48, seed=1).to(layer.bias.dtype)
    assert layer(x).dtype == layer.bias.dtype


def test_nf4_linear_matches_bitsandbytes_linear4bit():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    ours = qlora.NF4Linear.from_linear(dense, double_quant=False, compute_dtype=torch.float32)
    reference = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32,
                                  compress_statistics=False, quant_type="nf4")
    reference.load_state_dict(dense.state_dict())
    reference = reference.to("cpu")  # quantizes on the move
    x = randn(4, 7, 128, seed=1)
    with torch.no_grad():
        out_ours, out_ref = ours(x), reference(x)
    assert out_ref.shape == out_ours.shape == (4, 7, 64)
    # bitsandbytes dequantizes with its own level table (table_gap per weight), then both sum
    bound = table_gap(dense.weight) * x.abs().sum(-1, keepdim=True) + matmul_bound(
        x, ours.weight, dense.bias)
    assert within(out_ours, out_ref, bound)
    assert max_diff(out_ours, dense(x)) > 1e-3


# --- quantize_model ------------------------------------------------------------------------------

def test_quantize_model_replaces_the_encoder_linears_only():
    original = tiny_bert()
    model = tiny_bert()
    assert qlora.quantize_model(model) is model
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, qlora.NF4Linear)}
    assert sorted(nf4) == ENCODER_LINEARS
    assert type(model.classifier) is nn.Linear and type(model.bert.pooler.dense) is nn.Linear
    assert torch.equal(model.classifier.weight, original.classifier.weight)
    assert torch.equal(model.bert.pooler.dense.weight, original.bert.pooler.dense.weight)
    for name, layer in nf4.items():
        source = original.get_submodule(name)
        assert layer.quantized.double_quant and layer.compute_dtype == torch.bfloat16
        expected = qlora.quantize_nf4(source.weight, blocksize=64, double_quant=True)
        assert torch.equal(layer.quantized.packed, expected.packed), name
        assert torch.equal(layer.bias, source.bias), name
    # the model still runs, and stays close to the float one: over seeds 0-5 the gap was at
    # most 0.3% of the largest logit (a deterministic quantization error, not rounding), so 10%
    # has a margin of 30 and still fails for a broken layer (the logits are ~0.02)
    with torch.no_grad():
        logits, reference = model(**bert_batch()).logits, original(**bert_batch()).logits
    assert logits.dtype == torch.float32
    assert max_diff(logits, reference) < 0.1 * reference.abs().max().item()


def test_quantize_model_skip_is_configurable():
    model = qlora.quantize_model(tiny_bert(), skip=("classifier",))
    assert isinstance(model.bert.pooler.dense, qlora.NF4Linear)
    assert type(model.classifier) is nn.Linear


def test_nf4_bytes_is_the_sum_of_the_stored_tensors():
    model = qlora.quantize_model(tiny_bert())
    layers = [m for m in model.modules() if isinstance(m, qlora.NF4Linear)]
    stored = 0
    for m in layers:
        q = m.quantized
        stored += q.packed.numel() + q.absmax_codes.numel() + 4 * q.absmax_scales.numel() + 4
    by_hand = L * (4 * dq_bytes_by_hand(D * D) + 2 * dq_bytes_by_hand(D * FFN))
    assert by_hand == 8544
    assert qlora.nf4_bytes(model) == sum(m.quantized.nbytes for m in layers) == stored == by_hand
    plain = qlora.quantize_model(tiny_bert(), double_quant=False)
    assert qlora.nf4_bytes(plain) == L * (4 * (D * D // 2 + D * D // 64 * 4)
                                          + 2 * (D * FFN // 2 + D * FFN // 64 * 4))
    assert qlora.nf4_bytes(tiny_bert()) == 0


# --- LoRA over NF4 and merging, eq. (3.4) --------------------------------------------------------

def qlora_bert(seed: int = 0, compute_dtype=torch.float32):
    model = qlora.quantize_model(tiny_bert(seed), compute_dtype=compute_dtype)
    return lora.apply_lora(model, lora.encoder_target_modules(model, "all linear"), rank=R,
                           alpha=ALPHA, modules_to_save=["pooler", "classifier"])


def randomize_b(model: nn.Module, seed: int = 7, scale: float = 0.1) -> None:
    """Non-zero B in every LoRALinear (with B = 0 the adapter would be invisible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(scale * torch.randn(layer.lora_B.shape, generator=generator))


def test_apply_lora_wraps_nf4_layers_and_trains_only_adapters_and_head():
    model = qlora_bert()
    layers = lora.lora_layers(model)
    assert sorted(layers) == ENCODER_LINEARS
    assert all(isinstance(layer.base, qlora.NF4Linear) for layer in layers.values())
    for layer in layers.values():
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
        assert layer.lora_A.shape == (R, layer.base.in_features)
        assert layer.lora_B.shape == (layer.base.out_features, R)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in layers for f in "AB"} | {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
        "classifier.bias"}


def test_one_training_step_changes_only_adapters_and_head():
    model = qlora_bert().train()
    randomize_b(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantized = {n: copy.deepcopy(m.quantized) for n, m in model.named_modules()
                 if isinstance(m, qlora.NF4Linear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    F.cross_entropy(model(**bert_batch()).logits, LABELS).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not torch.equal(p, params[name]), name
        else:
            assert p.grad is None and torch.equal(p, params[name]), name
    for name, q in quantized.items():
        now = model.get_submodule(name).quantized
        for field in ("packed", "absmax_codes", "absmax_scales"):
            assert torch.equal(getattr(now, field), getattr(q, field)), (name, field)
        assert now.absmax_offset == q.absmax_offset


def test_merge_lora_refuses_an_nf4_base():
    model = qlora_bert()
    with pytest.raises(TypeError, match="merge_lora_nf4"):
        lora.merge_lora(model)
    assert sorted(lora.lora_layers(model)) == ENCODER_LINEARS


def test_merge_lora_nf4_in_float_equals_the_unmerged_model():
    model = qlora_bert().eval()
    randomize_b(model, scale=1.0)  # the tiny model's logits are ~0.01: a clearly visible adapter
    expected = {}
    for name, layer in lora.lora_layers(model).items():
        assert layer.base.compute_dtype == torch.float32
        w_hat = qlora.dequantize_nf4(layer.base.quantized, torch.float32)
        B, A = layer.lora_B.detach(), layer.lora_A.detach()
        # W_hat + s B A: a rank-R sum, the (exact) scale and the add, R + 1 roundings either way
        bound = 2 * rounding_bound(R + 2, w_hat.abs() + (ALPHA / R) * B.abs() @ A.abs())
        expected[name] = (w_hat + (ALPHA / R) * B @ A, bound, layer.base.bias.detach().clone())
    batch = bert_batch()
    with torch.no_grad():
        unmerged = model(**batch).logits
        no_adapter = copy.deepcopy(model)
        for layer in lora.lora_layers(no_adapter).values():
            layer.lora_B.zero_()
        assert max_diff(unmerged, no_adapter(**batch).logits) > 1e-3  # the adapter is visible
        # the logits compared in float64, where both agree to float64 rounding
        model64 = copy.deepcopy(model).double()
        for module in model64.modules():
            if isinstance(module, qlora.NF4Linear):
                module.compute_dtype = torch.float64
        unmerged64 = model64(**batch).logits
        merged64 = qlora.merge_lora_nf4(model64, dtype=torch.float64)(**batch).logits
        merged_model = qlora.merge_lora_nf4(model, requantize=False)
    assert merged_model is model and not lora.lora_layers(model)
    for name, (weight, bound, bias) in expected.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32, name
        assert within(layer.weight.detach(), weight, bound), name
        assert torch.equal(layer.bias.detach(), bias), name
    assert max_diff(merged64, unmerged64) < lora.PARITY_TOLERANCE


def test_merge_lora_nf4_requantize_gives_nf4_layers():
    model = qlora_bert().eval()
    randomize_b(model)
    expected = {name: qlora.quantize_nf4(
        qlora.dequantize_nf4(layer.base.quantized, torch.float32)
        + layer.delta_weight().detach(), double_quant=True)
        for name, layer in lora.lora_layers(model).items()}
    qlora.merge_lora_nf4(model, requantize=True)
    assert not lora.lora_layers(model)
    for name, q in expected.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, qlora.NF4Linear), name
        assert layer.compute_dtype == torch.float32 and layer.quantized.double_quant
        assert layer.quantized.blocksize == 64
        assert torch.equal(layer.quantized.packed, q.packed), name
    with torch.no_grad():
        assert torch.isfinite(model(**bert_batch()).logits).all()


def test_merge_lora_nf4_refuses_a_float_base():
    model = lora.apply_lora(tiny_bert(), ["query"], rank=R, alpha=ALPHA)
    with pytest.raises(TypeError, match="merge_lora"):
        qlora.merge_lora_nf4(model)


# --- PagedAdamW ----------------------------------------------------------------------------------

def test_paged_adamw_equals_torch_adamw_step_for_step():
    init = [randn(33, 17, seed=0), randn(17, seed=1), randn(5, 3, seed=2)]
    ours = [nn.Parameter(t.clone()) for t in init]
    theirs = [nn.Parameter(t.clone()) for t in init]

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0, "lr": 1e-2}]

    paged = qlora.PagedAdamW(groups(ours), lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                             weight_decay=0.1)
    reference = torch.optim.AdamW(groups(theirs), lr=3e-3, betas=(0.8, 0.99), eps=1e-6,
                                  weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(3)
    for step in range(5):
        grads = [torch.randn(t.shape, generator=generator) for t in init]
        if step in (1, 3):
            grads[2] = None  # the third parameter gets no gradient in these steps
        for ps in (ours, theirs):
            for p, g in zip(ps, grads, strict=True):
                p.grad = None if g is None else g.clone()
        paged.step()
        reference.step()
        # exact: the same elementwise operations in the same order, each correctly rounded
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), step
    assert all(not torch.equal(p, t) for p, t in zip(ours, init, strict=True))
    assert [paged.state[p]["step"] for p in ours] == [5, 5, 3]
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(paged.state[p]["exp_avg"], reference.state[q]["exp_avg"])
        assert torch.equal(paged.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"])


def test_paged_adamw_keeps_its_state_on_the_host():
    p = nn.Parameter(torch.randn(8, 4))
    optimizer = qlora.PagedAdamW([p], lr=1e-3)
    p.grad = torch.randn(8, 4)
    optimizer.step()
    state = optimizer.state[p]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].device.type == "cpu" and state[key].shape == p.shape
        assert state[key].dtype == p.dtype
    assert optimizer.pages_in == 0  # nothing to page on a CPU
    q = nn.Parameter(torch.randn(3))
    optimizer.add_param_group({"params": [q]})
    optimizer.step()  # q has no gradient: no state for it
    assert q not in optimizer.state


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": -1e-3}, {"eps": 0.0}, {"eps": -1e-8},
                                    {"betas": (1.0, 0.999)}, {"betas": (0.9, 1.0)},
                                    {"betas": (-0.1, 0.999)}, {"betas": (0.9, -0.5)}],
                         ids=str)
def test_paged_adamw_rejects_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        qlora.PagedAdamW([nn.Parameter(torch.zeros(2))], **kwargs)


def test_paged_adamw_rejects_negative_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        torch.optim.AdamW([nn.Parameter(torch.zeros(2))], weight_decay=-0.1)
    with pytest.raises(ValueError):
        qlora.PagedAdamW([nn.Parameter(torch.zeros(2))], weight_decay=-0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_paged_adamw_matches_bitsandbytes_on_gpu():
    init = [randn(64, 48, seed=0), randn(48, seed=1)]
    ours = [nn.Parameter(t.cuda()) for t in init]
    theirs = [nn.Parameter(t.cuda()) for t in init]
    paged = qlora.PagedAdamW(ours, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    reference = bnb.optim.PagedAdamW(theirs, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=0.1)
    generator = torch.Generator().manual_seed(3)
    for _ in range(4):
        grads = [torch.randn(t.shape, generator=generator).cuda() for t in init]
        for ps in (ours, theirs):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        paged.step()
        reference.step()
    torch.cuda.synchronize()
    # Elementwise updates, no sums, but not the same operations (bitsandbytes fuses them). Per
    # step each implementation rounds the decayed parameter and the sum (2u |p|) and the Adam
    # ratio, a few operations on a value of size <= (1 - b1) / sqrt(1 - b2) = 3.2 times lr
    # (Kingma & Ba 2015, §2.1): 10 u of that covers them. The parameters do not feed back into
    # the update, so the differences add over the 4 steps, for two implementations.
    u, lr = unit_roundoff(), 1e-3
    for a, b, t in zip(ours, theirs, init, strict=True):
        bound = 2 * 4 * (2 * u * (t.abs().max().item() + 4 * 3.2 * lr) + 10 * u * 3.2 * lr)
        assert max_diff(a, b) < bound
        assert max_diff(a.cpu(), t) > 1e-4  # the steps moved the parameters
    for p in ours:
        assert paged.state[p]["exp_avg"].device.type == "cpu"
        assert paged.state[p]["exp_avg"].is_pinned()
    assert paged.pages_in == 2 * len(ours) * 4


# --- memory_breakdown ----------------------------------------------------------------------------

def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def classifier_loss(model):
    batch = bert_batch()
    return lambda: F.cross_entropy(model(**batch).logits, LABELS)


def test_memory_breakdown_of_full_training():
    model = tiny_bert()
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    memory = qlora.memory_breakdown(model, optimizer, classifier_loss(model))
    assert set(memory) == {"weights", "gradients", "optimizer state", "activations"}
    weights = param_bytes(params)
    assert memory["weights"] == weights + param_bytes(model.buffers())
    assert memory["gradients"] == weights  # one float32 gradient per parameter
    assert len(optimizer.state) == len(params)
    steps = [s["step"] for s in optimizer.state.values()]
    step_bytes = sum(t.numel() * t.element_size() if torch.is_tensor(t) else 0 for t in steps)
    assert memory["optimizer state"] == 2 * weights + step_bytes
    assert memory["activations"] > 0
    assert all(p.grad is None for p in params)  # zeroed after the step


def test_memory_breakdown_of_a_frozen_model_with_a_trainable_head():
    model = tiny_bert().requires_grad_(False)
    head = list(model.classifier.requires_grad_(True).parameters())
    optimizer = torch.optim.AdamW(head, lr=1e-3)
    memory = qlora.memory_breakdown(model, optimizer, classifier_loss(model))
    head_bytes = param_bytes(head)
    assert head_bytes == (D * 2 + 2) * 4
    assert memory["gradients"] == head_bytes
    step_bytes = sum(s["step"].numel() * s["step"].element_size()
                     for s in optimizer.state.values() if torch.is_tensor(s["step"]))
    assert memory["optimizer state"] == 2 * head_bytes + step_bytes
    assert memory["weights"] == param_bytes(model.parameters()) + param_bytes(model.buffers())
    assert memory["activations"] > 0


def test_memory_breakdown_counts_nf4_weights_and_paged_state():
    model = qlora_bert()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = qlora.PagedAdamW(trainable, lr=1e-3)
    memory = qlora.memory_breakdown(model, optimizer, classifier_loss(model))
    assert memory["weights"] == (param_bytes(model.parameters()) + param_bytes(model.buffers())
                                 + qlora.nf4_bytes(model))
    assert qlora.nf4_bytes(model) == 8544
    assert memory["gradients"] == param_bytes(trainable)
    assert memory["optimizer state"] == 2 * param_bytes(trainable)  # integer steps: no tensors
    assert memory["activations"] > 0

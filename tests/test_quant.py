"""Weight formats and FP8 rounding: bit-exact on hand-built bytes, and against the independent
float64 reference (tests/reference.py) on random values."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp.quant import (
    E4M3,
    E8M0,
    WeightFormat,
    dequant_fp4,
    dequant_fp8_block,
    fp8_simulate,
    pow2_scale,
    quantize_fp4,
    quantize_fp8_block,
    scale_to_float,
    to_e4m3,
    unpack_fp4,
)


def e8m0(*exponent_bytes) -> torch.Tensor:
    return torch.tensor(exponent_bytes, dtype=torch.uint8).view(E8M0)


# ---- FP4 ---------------------------------------------------------------------------------------
def test_fp4_nibble_order_and_every_code():
    # byte = high << 4 | low; element 2k is the LOW nibble.
    codes = list(range(16))
    packed = torch.tensor([[codes[2 * k] | codes[2 * k + 1] << 4 for k in range(8)]],
                          dtype=torch.uint8).view(torch.int8)
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    got = unpack_fp4(packed)[0].tolist()
    assert got == expected
    assert [math.copysign(1, v) for v in got[8:9]] == [-1.0]  # code 8 is a negative zero


def test_fp4_scale_per_32_inputs():
    packed = torch.full((2, 32), 0x21, dtype=torch.uint8).view(torch.int8)  # pairs (0.5, 1.0)
    scale = torch.tensor([[127, 129], [126, 254]], dtype=torch.uint8).view(E8M0)  # [2, 64/32]
    w = dequant_fp4(packed, scale)
    assert w.shape == (2, 64)
    assert w[0, :32].tolist() == [0.5, 1.0] * 16  # 2^0
    assert w[0, 32:].tolist() == [2.0, 4.0] * 16  # 2^2
    assert w[1, :2].tolist() == [0.25, 0.5]  # 2^-1
    assert w[1, 32:34].tolist() == [2.0 ** 126, 2.0 ** 127]


def test_fp4_scale_shape_checked():
    with pytest.raises(ValueError, match=r"FP4 scale has shape \(2, 1\); expected \[.*2, 2\]"):
        dequant_fp4(torch.zeros(2, 32, dtype=torch.int8), e8m0(127, 127).view(2, 1))


# ---- E8M0 --------------------------------------------------------------------------------------
def test_e8m0_extremes_both_encodings():
    raw = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    for scale in (raw, raw.view(E8M0)):  # raw exponent bytes, or the torch dtype
        got = scale_to_float(scale)
        assert got.dtype == torch.float32
        assert got[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
        assert math.isnan(got[6])


# ---- FP8 block weights -------------------------------------------------------------------------
def test_fp8_block_edges_with_partial_blocks():
    rows, cols = 130, 257  # partial last block in both dims: scale [2, 3]
    q = torch.ones(rows, cols).to(E4M3)
    scale = torch.tensor([[120, 127, 130], [100, 200, 127]], dtype=torch.uint8).view(E8M0)
    w = dequant_fp8_block(q, scale)
    for r, c, exp in [(0, 0, -7), (127, 127, -7), (127, 128, 0), (0, 255, 0), (0, 256, 3),
                      (128, 0, -27), (129, 128, 73), (129, 256, 0)]:
        assert w[r, c].item() == 2.0 ** exp, (r, c)


def test_fp8_block_float32_scales():
    """-Base checkpoints: F32 scales multiply like the E8M0 ones (and need not be powers of 2)."""
    q = torch.tensor([[1.5, -2.0], [0.5, 448.0]]).to(E4M3)
    w = dequant_fp8_block(q, torch.tensor([[0.75]]))
    assert w.tolist() == [[1.125, -1.5], [0.375, 336.0]]


def test_fp8_scale_shape_checked():
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 2, 1\] for a weight of \[130, 5\]"):
        dequant_fp8_block(torch.zeros(130, 5).to(E4M3), torch.ones(1, 1))


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 300), cols=st.integers(1, 300))
def test_fp8_dequant_matches_reference_bytes(seed, rows, cols):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.uint8)
    q[q.bitwise_and(0x7F) == 0x7F] = 0  # drop the NaN encodings
    s = torch.randint(100, 150, (-(-rows // 128), -(-cols // 128)), generator=gen,
                      dtype=torch.uint8)
    ours = dequant_fp8_block(q.view(E4M3), s.view(E8M0)).double()
    assert torch.equal(ours, ref.dequant_fp8_block(q, s))  # exact: products of powers of two


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 40), groups=st.integers(1, 4))
def test_fp4_dequant_matches_reference_bytes(seed, rows, groups):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (rows, 16 * groups), generator=gen, dtype=torch.uint8)
    s = torch.randint(110, 140, (rows, groups), generator=gen, dtype=torch.uint8)
    ours = dequant_fp4(packed.view(torch.int8), s.view(E8M0)).double()
    assert torch.equal(ours, ref.dequant_fp4(packed.view(torch.int8), s))


# ---- quantisers (used to write checkpoints) ----------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 260), cols=st.integers(1, 260))
def test_quantize_fp8_block_round_trip(seed, rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q, s = quantize_fp8_block(w)
    assert s.dtype == E8M0 and s.shape == (-(-rows // 128), -(-cols // 128))
    back = dequant_fp8_block(q, s)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, plus the absolute
    # subnormal step 2^-9 * scale at the bottom of each block's range.
    step = scale_to_float(s).repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    assert bool(((back - w).abs() <= w.abs() * 2.0 ** -4 + step * 2.0 ** -9).all())
    # Re-quantising the dequantised values is exact (idempotent).
    q2, s2 = quantize_fp8_block(back)
    assert torch.equal(dequant_fp8_block(q2, s2), back)


@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 20), groups=st.integers(1, 4))
def test_quantize_fp4_round_trip(seed, rows, groups):
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed))
    packed, s = quantize_fp4(w)
    back = dequant_fp4(packed, s)
    # Nearest e2m1 value: error at most half the widest gap (2 between 4 and 6) times scale.
    step = scale_to_float(s).repeat_interleave(32, dim=1)
    assert bool(((back - w).abs() <= step + 1e-12).all())
    p2, s2 = quantize_fp4(back)
    assert torch.equal(dequant_fp4(p2, s2), back)


# ---- activation / KV FP8 simulation ------------------------------------------------------------
@given(seed=st.integers(0, 2**31 - 1), blocks=st.integers(1, 6), block=st.sampled_from([64, 128]),
       log_range=st.floats(-30, 30), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fp8_simulate_matches_reference(seed, blocks, block, log_range, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, blocks * block, generator=gen, dtype=torch.float64) * 2.0 ** log_range
    x[0, :block] = 0.0  # an all-zero block: amax is floored at 1e-4
    x = x.to(dtype)
    ours = fp8_simulate(x, block)
    assert ours.dtype == dtype
    assert torch.equal(ours.double(), ref.quant_dequant_blocks(x.double(), block))


def test_fp8_simulate_bfloat16_is_exact_in_bf16():
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ours = fp8_simulate(x, 128)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.double(), ref.quant_dequant_blocks(x.double(), 128))


def test_pow2_scale_reads_the_ceiling_off_the_bits():
    amax = torch.tensor([448.0, 448.0 * 1.0000001, 0.0, 1e-9, 1.0])
    assert pow2_scale(amax).tolist() == [1.0, 2.0, 2.0 ** -22, 2.0 ** -22, 2.0 ** -8]


def test_to_e4m3_from_float64_has_no_double_rounding():
    """torch rounds float64 -> float32 -> e4m3; just above a tie that lands ON the tie and
    then goes to even. Found in the end-to-end parity test: -4.25000006 must give -4.5."""
    ties = torch.tensor([4.25, -4.25, 1.0625, 0.6875, 13.0, 208.0], dtype=torch.float64)
    for nudge in (1e-9, -1e-9):
        y = ties * (1 + nudge)
        assert torch.equal(to_e4m3(y).double(), ref.fp8_e4m3_round(y))


def test_weight_format_rejects_unknown_storage():
    with pytest.raises(ValueError, match=r"WeightFormat.experts='int4'"):
        WeightFormat(experts="int4")

"""Parity of each Triton kernel (``kernels/``, installed as ``mtp_kernels``) with the pure-PyTorch
reference it replaces, on random inputs.

Needs a CUDA GPU (skipped otherwise, with the reason). ``TRITON_INTERPRET=1`` with Triton
installed runs the same tests on the CPU through Triton's interpreter (slow; used to develop).
Triton is imported lazily, so this file imports cleanly on a machine without it. Triton 3.6's
interpreter converts float32 to bfloat16 by truncation, not to nearest as the GPU does, so
there the bfloat16 outputs compared with the reference by ``BF16_TOL`` can exceed it (by up
to one ulp per element: 0.0042-0.0047 seen); bit-for-bit and float32 comparisons hold.

Tolerances. Where the math allows, comparisons are exact: the FP8 activation rounding, the KV FP8
simulation, E8M0/e2m1 decoding and the expert choice. Products are compared by the relative
Frobenius error ||out - ref|| / ||ref||: the kernels multiply exactly the reference's operand
values (e4m3 codes, e2m1 x 2^k and bf16 values are exact in bf16) and accumulate in fp32 in a
different order, so before the final rounding the error is ~1e-6; after rounding to bf16 it is
at most half a bf16 ulp per element (2^-9 relative), so 4e-3 for bf16 outputs and 1e-5 for
fp32 outputs. A kernel off by one block, nibble or head is off by O(1).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))
if torch.cuda.is_available():
    DEVICE = "cuda"
elif INTERPRET:
    DEVICE = "cpu"
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="needs a CUDA GPU: the Triton kernels run only there "
    "(TRITON_INTERPRET=1 runs them on the CPU through Triton's interpreter)")

BF16_TOL = 4e-3  # half a bf16 ulp (2^-9) per element, after exact products
F32_TOL = 1e-5  # fp32 accumulation-order differences only


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, generator=gen(seed), device=DEVICE) * std).to(dtype)


def fp8_weight(n, k, seed):
    from mtp.quant import quantize_fp8_block
    return quantize_fp8_block(randn(n, k, seed=seed, std=k ** -0.5))


def fp4_weight(e, n, k, seed):
    from mtp.quant import quantize_fp4
    qs, ss = zip(*(quantize_fp4(randn(n, k, seed=seed + i, std=k ** -0.5)) for i in range(e)))
    return torch.stack(qs), torch.stack(ss)


def experts_reference(u, idx, wts, w13, s13, w2, s2, limit=10.0):
    """``mtp.ops.routed_experts``' output per (row, expert) pair [T*K, D], activation rounding
    on: the clamped SwiGLU of w13 times the routing weight (rounded to u's dtype), then w2."""
    from mtp import ops
    from mtp.ops import matmul as linear
    from mtp.quant import dequant_fp4
    out = []
    for r in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            ex = int(idx[r, j])
            g, v = linear(u[r:r + 1], dequant_fp4(w13[ex], s13[ex]), True).chunk(2, dim=-1)
            a = (wts[r, j] * ops.swiglu(g, v, limit)).to(u.dtype)
            out.append(linear(a, dequant_fp4(w2[ex], s2[ex]), True)[0])
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 5, 40])
def test_fp8_linear_act_quant(dtype, m):
    from mtp_kernels.fp8_linear import fp8_linear, fp8_linear_reference
    w, s = fp8_weight(256, 512, seed=1)
    x = randn(m, 512, seed=2, dtype=dtype)
    y = fp8_linear(x, w, s, act_quant=True)
    ref = fp8_linear_reference(x, w, s, act_quant=True)
    assert y.dtype == dtype and y.shape == (m, 256)
    assert rel(y, ref) < (BF16_TOL if dtype == torch.bfloat16 else F32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_grouped_no_quant(dtype):
    from mtp_kernels.fp8_linear import fp8_linear, fp8_linear_reference
    w, s = fp8_weight(512, 256, seed=3)  # 2 groups of 256 outputs, each over 256 inputs
    x = randn(3, 512, seed=4, dtype=dtype)
    y = fp8_linear(x, w, s, act_quant=False, group_n=256)
    ref = fp8_linear_reference(x, w, s, act_quant=False, group_n=256)
    assert rel(y, ref) < (BF16_TOL if dtype == torch.bfloat16 else F32_TOL)


@pytest.mark.parametrize("m", [32, 33, 129, 300])
def test_fp8_linear_float32_without_rounding(m):
    """float32 activations, the FP8 rounding off (the exact-numerics mode): the ieee float32
    dot at every row-count tile, including the (64-row) tiles whose float32 operands need a
    smaller tile to fit in shared memory, and split-K; a plain and a SwiGLU-plus-add input."""
    from mtp_kernels.fp8_linear import fp8_linear, fp8_linear_reference
    w, s = fp8_weight(384, 512, seed=8)
    x = randn(m, 1024, seed=9, dtype=torch.float32, std=4.0)
    add = randn((m + 3) // 4, 384, seed=10)
    for xi, kw in [(x[:, :512].contiguous(), {}),
                   (x, dict(swiglu_limit=10.0, add=add, add_row_div=4))]:
        y = fp8_linear(xi, w, s, act_quant=False, **kw)
        assert y.dtype == torch.float32 and y.shape == (m, 384)
        assert rel(y, fp8_linear_reference(xi, w, s, act_quant=False, **kw)) < F32_TOL, kw


def test_fp8_linear_swiglu_and_add():
    from mtp_kernels.fp8_linear import fp8_linear, fp8_linear_reference
    w, s = fp8_weight(256, 128, seed=5)
    x = randn(8, 256, seed=6, dtype=torch.bfloat16, std=4.0)  # large enough to hit the clamp
    add = randn(2, 256, seed=7, dtype=torch.bfloat16)
    y = fp8_linear(x, w, s, act_quant=True, swiglu_limit=10.0, add=add, add_row_div=4)
    ref = fp8_linear_reference(x, w, s, act_quant=True, swiglu_limit=10.0, add=add,
                               add_row_div=4)
    assert rel(y, ref) < BF16_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_rounded_input(dtype, monkeypatch):
    """A pre-rounded input (``rounded``, act_quant off) gives exactly the act_quant result of
    the bf16 dot: power-of-two scales commute with every fp32 step of the dot."""
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels.fp8_linear import fp8_linear
    monkeypatch.setattr(fl, "FP8_DOT", False)  # both through the same (bf16) tensor-core dot

    from mtp.quant import fp8_simulate
    w, s = fp8_weight(256, 512, seed=63)
    x = randn(3, 512, seed=64, dtype=dtype)
    y = fp8_linear(fp8_simulate(x, 128), w, s, act_quant=False, rounded=True)
    assert torch.equal(y, fp8_linear(x, w, s, act_quant=True))


@pytest.mark.parametrize("m", [1, 40])
def test_fp8_linear_column_range_in_place(m):
    """A tensor-parallel rank's block-aligned column range of a weight, read in place (a view
    with the whole row's stride), into a float32 ``out`` (the rank's partial sum) equals the
    same product on a contiguous copy, bit for bit, and the reference within tolerance."""
    from mtp_kernels.fp8_linear import fp8_linear, fp8_linear_reference
    w, s = fp8_weight(256, 512, seed=65)
    x = randn(m, 256, seed=66, dtype=torch.bfloat16)
    view, sv = w[:, 128:384], s[:, 1:3]  # columns [128, 384): input blocks 1 and 2
    assert not view.is_contiguous()
    out = torch.empty(m, 256, dtype=torch.float32, device=x.device)
    y = fp8_linear(x, view, sv, act_quant=True, out=out)
    assert y is out
    assert torch.equal(y, fp8_linear(x, view.contiguous(), sv.contiguous(), act_quant=True,
                                     out=torch.empty_like(out)))
    ref = fp8_linear_reference(x, view.contiguous(), sv.contiguous(), act_quant=True)
    assert rel(y, ref) < BF16_TOL
    with pytest.raises(ValueError, match="weight's last dim"):
        fp8_linear(x, w.t(), s.t(), act_quant=True)


def launch_of(rows: int, dtype, act_quant: bool) -> dict:
    """The launch settings (``fp8_linear``'s ``tune``) a product of ``rows`` rows of dtype
    takes: the pair's add is computed with them (its split-K count, and so its float32
    summation order, are the product's; e_proj's own rows may take another entry)."""
    from mtp_kernels.fp8_linear import launch_settings
    dot_f32 = dtype == torch.float32 and not act_quant
    _, bn, warps, per_sm, stages = launch_settings(rows, dot_f32, {})
    return {"bn": bn, "warps": warps, "per_sm": per_sm, "stages": stages}


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_split_pass_mixes(t, dtype, pair):
    """h_proj's product with the attention hc_pre's mixes from its split-K pass (input_proj,
    few rows; with ``pair`` e_proj computed in the same launch): the output bit for bit as
    without them, and hc_pre_norm from those partials against the reference on that output
    (the tolerances of test_rmsnorm_and_hc: the mixes are float32 sums in another order).
    K = 1024 (8 blocks) takes a split-K pass at these rows; N = 640 leaves a partial column
    block."""
    from mtp_kernels import hc
    from mtp_kernels.fp8_linear import fp8_linear

    from mtp import ops
    m, n, k = 4, 640, 1024
    w, s = fp8_weight(n, k, seed=70)
    hn = randn(t * m, k, seed=71, dtype=dtype)
    en = randn(t, k, seed=72, dtype=dtype)
    w2, s2 = fp8_weight(n, k, seed=77)
    ep = fp8_linear(en, w2, s2, act_quant=True, tune=launch_of(t * m, dtype, True))
    fn = randn((2 + m) * m, m * n, seed=73, std=(m * n) ** -0.5)
    scale, base = 0.5 + torch.rand(3, device=DEVICE), randn((2 + m) * m, seed=74, std=0.5)
    nw = 1 + randn(n, seed=75, std=0.1)
    add = {"add_linear": (en, w2, s2)} if pair else {"add": ep}
    y, parts = fp8_linear(hn, w, s, act_quant=True, add_row_div=m, mix_fn=fn, **add)
    assert parts is not None and parts[2] == m * 3  # 3 column blocks of 256 per stream
    assert torch.equal(y, fp8_linear(hn, w, s, act_quant=True, add=ep, add_row_div=m))
    x = y.view(t, m, n)  # [T*M, N] -> [T, M, N]
    u, post, comb = hc.hc_pre_norm(x, fn, scale, base, nw, 20, 1e-6, 1e-6, partials=parts)
    y_r, post_r, comb_r = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    assert rel(post, post_r) < 1e-5 and rel(comb, comb_r) < 1e-5
    assert rel(u, ops.rms_norm(y_r, nw, 1e-6)) < tol
    # one K block: no split-K pass, so no partials (hc_pre_norm computes the mixes itself)
    w1, s1 = fp8_weight(n, 128, seed=76)
    y1, none = fp8_linear(hn[:, :128].contiguous(), w1, s1, act_quant=True, add=ep,
                          add_row_div=m, mix_fn=fn)
    assert none is None


@pytest.mark.parametrize("k", [128, 1024])
@pytest.mark.parametrize("t", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_add_linear_in_one_launch(t, k, dtype):
    """e_proj and h_proj in one launch (``add_linear``): bit for bit the two calls
    (``fp8_linear(en, e_proj)`` with h_proj's launch settings, as the add of
    ``fp8_linear(hn, h_proj)``), with the mixes too;
    at K = 128 (no split-K pass) and 40 rows per stream set (other tiles) the fallback, a call
    first, the same bits."""
    from mtp_kernels.fp8_linear import fp8_linear
    m, n = 4, 640
    w, s = fp8_weight(n, k, seed=80)
    w2, s2 = fp8_weight(n, k, seed=81)
    hn = randn(t * m, k, seed=82, dtype=dtype)
    en = randn(t, k, seed=83, dtype=dtype)
    fn = randn((2 + m) * m, m * n, seed=84, std=(m * n) ** -0.5)
    for aq in (True, False):
        ep = fp8_linear(en, w2, s2, act_quant=aq, tune=launch_of(t * m, dtype, aq))
        two = fp8_linear(hn, w, s, act_quant=aq, add=ep, add_row_div=m)
        one = fp8_linear(hn, w, s, act_quant=aq, add_linear=(en, w2, s2), add_row_div=m)
        assert torch.equal(one, two)
        y, parts = fp8_linear(hn, w, s, act_quant=aq, add_linear=(en, w2, s2),
                              add_row_div=m, mix_fn=fn)
        y2, parts2 = fp8_linear(hn, w, s, act_quant=aq, add=ep, add_row_div=m, mix_fn=fn)
        assert torch.equal(y, two) and (parts is None) == (parts2 is None)
        if parts is not None:  # the same stored values; their mixes are float32 sums over
            # 256 columns whose tree follows the register layout, which differs between the
            # two passes (measured: not bit-equal on an H200): float32 summation order only
            assert rel(parts[0], parts2[0]) < F32_TOL and rel(parts[1], parts2[1]) < F32_TOL
    with pytest.raises(ValueError, match="add or add_linear"):
        fp8_linear(hn, w, s, act_quant=True, add=ep, add_linear=(en, w2, s2), add_row_div=m)
    with pytest.raises(ValueError, match="add_linear takes"):
        fp8_linear(hn, w, s, act_quant=True, add_linear=(en, w2[:128], s2[:1]), add_row_div=m)


def test_act_quant_bit_exact():
    """The fused FP8 activation rounding equals ``fp8_simulate`` bit for bit: an identity weight
    block (scale 1) returns the rounded activations themselves."""
    from mtp_kernels.fp8_linear import fp8_linear

    from mtp.quant import fp8_simulate
    x = randn(7, 128, seed=8) * torch.logspace(-6, 3, 7, device=DEVICE)[:, None]
    eye = torch.eye(128, device=DEVICE).to(torch.float8_e4m3fn)
    one = torch.full((1, 1), 1.0, device=DEVICE).to(torch.float8_e8m0fnu)
    y = fp8_linear(x, eye, one, act_quant=True)
    assert torch.equal(y, fp8_simulate(x, 128))


@pytest.mark.skipif(DEVICE != "cuda", reason="a side stream: CUDA only (the interpreter "
                    "runs every launch in order on the CPU)")
@pytest.mark.parametrize("t", [1, 5, 300])
def test_hc_pre_norm_post_and_comb_on_a_side_stream(t):
    """``hc_pre_norm(..., side_stream=)`` (post and comb by ``hc_comb_kernel`` on that
    stream, the rest by hc_finish without them): every output bit for bit as one
    hc_finish makes them, once the current stream waits for the side stream, with the mixes
    computed here or given, with the FP8 roundings; the side stream's work ran after the
    partials (it reads them)."""
    from mtp_kernels import hc
    m, d = 4, 256
    x = randn(t, m, d, seed=30, dtype=torch.bfloat16)
    w = 1 + randn(d, seed=31, std=0.1)
    fn = randn((2 + m) * m, m * d, seed=32, std=(m * d) ** -0.5)
    scale, base = 0.5 + torch.rand(3, device=DEVICE), randn((2 + m) * m, seed=33, std=0.5)
    side = torch.cuda.Stream()
    for kw in ({}, {"act_quant": True}, {"act_quant": True, "quant_rows": True}):
        want = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6, **kw)
        torch.cuda.synchronize()
        got = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6, side_stream=side, **kw)
        torch.cuda.current_stream().wait_stream(side)
        assert len(got) == len(want)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), kw
    y, parts = hc.hc_post(randn(t, d, seed=34, dtype=torch.bfloat16), x, want[1], want[2],
                          mix_fn=fn)
    want = hc.hc_pre_norm(y, fn, scale, base, w, 20, 1e-6, 1e-6, partials=parts)
    got = hc.hc_pre_norm(y, fn, scale, base, w, 20, 1e-6, 1e-6, partials=parts,
                         side_stream=side)
    torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # only some rows' post and comb (a catch-up's last rows): theirs the same, the rest as is
    rows = torch.tensor(sorted({0, t // 2, t - 1}), device=DEVICE)
    u, post, comb = hc.hc_pre_norm(y, fn, scale, base, w, 20, 1e-6, 1e-6, partials=parts,
                                   side_stream=side, comb_rows=rows.int())
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(u, want[0])
    assert torch.equal(post[rows], want[1][rows]) and torch.equal(comb[rows], want[2][rows])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_and_hc(dtype):
    from mtp_kernels import hc

    from mtp import ops
    from mtp.quant import fp8_simulate
    t, m, d = 3, 4, 256
    x = randn(t, m, d, seed=9, dtype=dtype)
    w = 1 + randn(d, seed=10, std=0.1)
    fn = randn((2 + m) * m, m * d, seed=11, std=(m * d) ** -0.5)
    scale, base = 0.5 + torch.rand(3, device=DEVICE), randn((2 + m) * m, seed=12, std=0.5)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    assert rel(hc.rmsnorm(x[:, 0], w, 1e-6), ops.rms_norm(x[:, 0], w, 1e-6)) < tol
    u, post, comb = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6)
    y_r, post_r, comb_r = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    assert rel(post, post_r) < 1e-5 and rel(comb, comb_r) < 1e-5
    assert rel(u, ops.rms_norm(y_r, w, 1e-6)) < tol
    u2, post2, comb2, uq = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6,
                                          act_quant=True)
    assert torch.equal(u2, u) and torch.equal(post2, post) and torch.equal(comb2, comb)
    assert torch.equal(uq, fp8_simulate(u, 128))  # the rounded copy, bit for bit
    *same, xh, xs = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6, act_quant=True,
                                   quant_rows=True)
    assert all(torch.equal(a, b) for a, b in zip(same, (u, post, comb, uq)))
    if dtype == torch.bfloat16:  # quant_rows' layout, bit for bit, from the same kernel
        from mtp_kernels import moe
        xh_r, xs_r = moe.quant_rows(uq)
        assert torch.equal(xh, xh_r) and torch.equal(xs, xs_r)
    with pytest.raises(ValueError, match="quant_rows=True needs act_quant"):
        hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6, quant_rows=True)
    a = randn(t, d, seed=13, dtype=dtype)
    out, parts = hc.hc_post(a, x, post_r, comb_r)
    assert parts is None and rel(out, ops.hc_post(a, x, post_r, comb_r)) < tol
    fh = randn(m, m * d, seed=14, std=(m * d) ** -0.5)
    sh, bh = 0.5 + torch.rand(1, device=DEVICE), randn(m, seed=15, std=0.5)
    yh = hc.hc_head_norm(x, fh, sh, bh, w, 1e-6, 1e-6)
    assert rel(yh, ops.rms_norm(ops.hc_head(x, fh, sh, bh, 1e-6, 1e-6), w, 1e-6)) < tol
    # hc_post computing the next mixes itself: the same output, and the next hc_pre / hc_head
    # from its partials against the reference on that output (also with the MoE sum)
    xo, parts = hc.hc_post(a, x, post_r, comb_r, mix_fn=fn)
    assert torch.equal(xo, hc.hc_post(a, x, post_r, comb_r)[0])
    u5, post5, comb5 = hc.hc_pre_norm(xo, fn, scale, base, w, 20, 1e-6, 1e-6, partials=parts)
    y5, post5_r, comb5_r = ops.hc_pre(xo, fn, scale, base, 20, 1e-6, 1e-6)
    assert rel(post5, post5_r) < 1e-5 and rel(comb5, comb5_r) < 1e-5
    assert rel(u5, ops.rms_norm(y5, w, 1e-6)) < tol
    k = 3
    pair_out = randn(t * k, d, seed=16, dtype=dtype)
    idx = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(r))[:k]
                       for r in range(t)]).to(DEVICE)
    shared = randn(t, d, seed=17, dtype=dtype)
    moe_in = (pair_out, idx, shared)
    xm, parts_h = hc.hc_post(None, x, post_r, comb_r, moe=moe_in, mix_fn=fh)
    assert torch.equal(xm, hc.hc_post(None, x, post_r, comb_r, moe=moe_in)[0])
    yh2 = hc.hc_head_norm(xm, fh, sh, bh, w, 1e-6, 1e-6, partials=parts_h)
    assert rel(yh2, ops.rms_norm(ops.hc_head(xm, fh, sh, bh, 1e-6, 1e-6), w, 1e-6)) < tol


@pytest.mark.parametrize("d", [64, 384, 4096, 7168])
@pytest.mark.parametrize("t", [1, 2, 3, 8, 9])  # every entry of GATE_LAUNCH, then cuBLAS
def test_gate_logits(t, d):
    """The gate product against float64, within the float32 summation bound: each output is a
    sum of D products, each rounded once and then summed in D/BK sequential chunks per lane and
    a log2(BK) <= 9 level tree, so |err| <= (D/128 + 10) * 2^-24 * sum |u_d w_d| (128 <= BK <=
    512, every entry of moe.GATE_LAUNCH).
    Over GATE_T rows cuBLAS sums in its own order: the general bound D * 2^-24 * sum |.|."""
    from mtp_kernels import moe
    assert all(128 <= bk <= 512 for _, bk, _ in moe.GATE_LAUNCH.values())  # the bound's premise
    u = randn(t, d, seed=t * d, dtype=torch.bfloat16, std=2.0)
    w = randn(256, d, seed=7, std=d ** -0.5)
    got = moe.gate_logits(u, w)
    assert got.dtype == torch.float32 and got.shape == (t, 256)
    exact = u.double() @ w.double().t()
    levels = d / 128 + 10 if t <= moe.GATE_T else d
    bound = levels * 2.0 ** -24 * (u.double().abs() @ w.double().abs().t())
    assert ((got.double() - exact).abs() <= bound).all()
    u2 = randn(2 * t, d, seed=3, dtype=torch.bfloat16)[::2]  # strided rows
    assert torch.equal(moe.gate_logits(u2, w), moe.gate_logits(u2.contiguous(), w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("zero_pos0", [False, True])
def test_embed_norms(dtype, zero_pos0):
    """Embedding lookup (zeroed at position 0 when asked) and both input RMSNorms in one launch
    against F.embedding + masked_fill + ops.rms_norm: same tolerance as rmsnorm above."""
    import torch.nn.functional as F
    from mtp_kernels import hc

    from mtp import ops
    t, m, d, v = 5, 4, 384, 50
    emb = randn(v, d, seed=60, dtype=dtype)
    ids = torch.tensor([3, 0, 49, 3, 17], device=DEVICE)
    pos = torch.tensor([0, 4, 9, 0, 2], device=DEVICE)
    h = randn(t * m, d, seed=61, dtype=dtype)
    ew, hw = 1 + randn(d, seed=62, std=0.1), 1 + randn(d, seed=63, std=0.1)
    en, hn = hc.embed_norms(ids, pos, emb, h, ew, hw, 1e-6, zero_pos0=zero_pos0)
    e = F.embedding(ids, emb)
    if zero_pos0:
        e = e.masked_fill((pos == 0)[:, None], 0)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    assert rel(hn, ops.rms_norm(h, hw, 1e-6)) < tol
    keep = pos != 0 if zero_pos0 else torch.ones_like(pos, dtype=torch.bool)
    assert rel(en[keep], ops.rms_norm(e, ew, 1e-6)[keep]) < tol
    assert not zero_pos0 or torch.equal(en[~keep], torch.zeros_like(en[~keep]))


@given(t=st.integers(0, 13), m=st.sampled_from([1, 4]), kb=st.sampled_from([1, 3, 4]),
       which=st.sampled_from(["en", "hn", "both"]), zero_pos0=st.booleans(),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=20, deadline=None)
def test_embed_norms_rounded_for_cublas(t, m, kb, which, zero_pos0, seed):
    """``embed_norms(..., fp8=...)``: an output asked for in cuBLAS's form is exactly
    ``quant_fp8`` of the bf16 output (codes and outer-dim-major scales bit for bit, padded
    rows zero codes), the other output unchanged, and each weight's float32 scales torch's
    conversion of its E8M0 bytes, bit for bit (255: NaN both ways). (Runs in Triton 3.9's
    interpreter too: both sides see its bf16 rounding.)"""
    from mtp_kernels import hc
    from mtp_kernels.fp8_linear import quant_fp8
    from mtp_kernels.scaled_mm import FP8Rows, padded_rows
    d, v = 128 * kb, 40
    g = torch.Generator().manual_seed(seed)
    emb = (torch.randn(v, d, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, v, (t,), generator=g).to(DEVICE)
    pos = torch.randint(0, 3, (t,), generator=g).to(DEVICE)
    h = (torch.randn(t * m, d, generator=g) * torch.logspace(-4, 4, d)).to(torch.bfloat16)
    h = h.to(DEVICE)
    ew, hw = 1 + randn(d, seed=seed, std=0.1), 1 + randn(d, seed=seed + 1, std=0.1)
    b = torch.randint(0, 256, (2, 3, kb), generator=g, dtype=torch.uint8)
    b[0, 0, 0], b[1, 0, 0] = 255, 0
    ws = [x.to(DEVICE).view(torch.float8_e8m0fnu) for x in b]
    fp8 = (ws[0] if which != "hn" else None, ws[1] if which != "en" else None)
    args = (ids, pos, emb, h, ew, hw, 1e-6)
    want = hc.embed_norms(*args, zero_pos0=zero_pos0)
    got = hc.embed_norms(*args, zero_pos0=zero_pos0, fp8=fp8)
    for out, ref, scale in zip(got, want, fp8):
        if scale is None:
            assert torch.equal(out, ref)
            continue
        n = ref.shape[0]
        q, s = quant_fp8(ref, d, rows=padded_rows(n), scales_outer_major=True)
        assert isinstance(out, FP8Rows) and out.m == n
        assert torch.equal(out.codes.view(torch.uint8), q.view(torch.uint8))
        assert out.scales.stride() == s.stride() and torch.equal(out.scales, s)
        wf = out.weight_scale
        assert wf.dtype == torch.float32 and wf.shape == scale.shape
        nan = scale.view(torch.uint8) == 255
        assert torch.equal(wf.isnan(), nan)
        assert torch.equal(wf.view(torch.int32)[~nan], scale.float().view(torch.int32)[~nan])


def test_embed_norms_refuses_what_it_cannot_round():
    """float32 rows, float32 or mis-shaped weight scales: the error names them."""
    from mtp_kernels import hc
    d = 256
    ids = pos = torch.zeros(2, dtype=torch.long, device=DEVICE)
    emb, h = randn(4, d, dtype=torch.bfloat16), randn(8, d, dtype=torch.bfloat16)
    w = torch.ones(d, device=DEVICE)
    e8 = torch.ones(2, 2, device=DEVICE).to(torch.float8_e8m0fnu)
    for bad_emb, fp8 in ((emb.float(), (e8, e8)), (emb, (e8.float(), None)),
                         (emb, (None, e8[:, :1])), (emb, (e8, e8[:1]))):
        with pytest.raises(ValueError, match="embed_norms: fp8 outputs"):
            hc.embed_norms(ids, pos, bad_emb, h.to(bad_emb.dtype), w, w, 1e-6,
                           zero_pos0=False, fp8=fp8)


@pytest.mark.parametrize("kernel", ["auto", "triton", "cublas"])
@pytest.mark.parametrize("d", [256, 4096])
@pytest.mark.parametrize("t", [1, 2, 5, 16, 17, 33, 64, 65])
def test_head_logits(t, d, kernel):
    """The LM head's product against float64: bf16 x bf16 products are exact in float32, then
    float32 sums on the tensor cores in their own order (the kernel's; 65 rows: cuBLAS's), so
    the general bound |err| <= D * 2^-24 * sum |y_d w_d|. A vocabulary that is not a multiple
    of the row block (1003) checks the edge; strided rows take cuBLAS, within the same bound."""
    if DEVICE != "cuda":
        pytest.skip("bfloat16 tensor-core product: the interpreter's bf16 is not reliable")
    from mtp_kernels import head

    y = randn(t, d, seed=t + d, dtype=torch.bfloat16)
    w = randn(1003, d, seed=5, dtype=torch.bfloat16, std=d ** -0.5)
    got = head.head_logits(y, w, kernel=kernel)
    assert got.dtype == torch.float32 and got.shape == (t, 1003)
    exact = y.double() @ w.double().t()
    bound = d * 2.0 ** -24 * (y.double().abs() @ w.double().abs().t())
    assert ((got.double() - exact).abs() <= bound).all()
    y2 = randn(2 * t, d, seed=t + d, dtype=torch.bfloat16)[::2]
    assert ((head.head_logits(y2, w).double() - y2.double() @ w.double().t()).abs()
            <= d * 2.0 ** -24 * (y2.double().abs() @ w.double().abs().t())).all()
    with pytest.raises(ValueError, match="head_logits: y is"):
        head.head_logits(y[:, :128], w)
    with pytest.raises(ValueError, match="kernel must be one of"):
        head.head_logits(y, w, kernel="cutlass")


def test_head_auto_choice_is_kept():
    """``kernel="auto"`` times the kernel and cuBLAS at a shape's first call and keeps the
    choice: later calls, and calls inside a graph capture, compute exactly what the chosen one
    computes (bitwise: the same program on the same operands)."""
    if DEVICE != "cuda":
        pytest.skip("times the two on a GPU")
    from mtp_kernels import head

    y = randn(3, 512, seed=1, dtype=torch.bfloat16)
    w = randn(5000, 512, seed=2, dtype=torch.bfloat16, std=512 ** -0.5)
    key = (y.device.index, 5000, 512, 16)
    head._CHOSEN.pop(key, None)
    first = head.head_logits(y, w, kernel="auto")
    chosen = head._CHOSEN[key]
    assert chosen in ("triton", "cublas")
    assert torch.equal(first, head.head_logits(y, w, kernel=chosen))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = head.head_logits(y, w, kernel="auto")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first) and head._CHOSEN[key] == chosen


def test_route_exact_choice():
    from mtp_kernels import moe

    from mtp import ops
    for scoring in ("sqrtsoftplus", "sigmoid", "softmax"):
        u = randn(9, 64, seed=16)
        gw = randn(32, 64, seed=17, std=0.125)
        bias = randn(32, seed=18, std=0.1)
        logits = torch.mm(u, gw.t())
        idx, w = moe.route(logits, bias, 6, scoring, 1.5)
        idx_r, w_r = ops.route(u, gw, bias, 6, scoring, 1.5)
        assert torch.equal(idx, idx_r)
        assert rel(w, w_r) < 1e-6


@pytest.mark.parametrize("bm", [8, 16])
@pytest.mark.parametrize("t,e,k", [(16, 8, 2), (64, 256, 6), (100, 384, 6), (256, 256, 6)])
def test_align_tiles_kernel(t, e, k, bm):
    """The one-kernel tiling equals its torch specification exactly, for random and for skewed
    routings (hot experts spanning several tiles, most experts unused)."""
    from mtp_kernels import moe
    for seed in range(3):
        g = gen(70 + seed)
        if seed < 2:
            idx = torch.stack([torch.randperm(e, generator=g, device=DEVICE)[:k]
                               for _ in range(t)])
        else:  # every row on experts 0 .. k-1 of a few: long runs
            idx = (torch.arange(k, device=DEVICE) * 3 % e).expand(t, k).contiguous()
        got = moe.align_tiles(idx, e, bm)
        want = moe.align_tiles_reference(idx, e, bm)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), seed


ALL_DECODES = ["f32", "f16x2", "mx"]
HAND_DECODES = ["f32", "f16x2"]  # the kernels' own e2m1 decodes (mx: Triton's dot_scaled)


def _decodes(which=ALL_DECODES):
    return ["f32"] if INTERPRET else which


@pytest.mark.parametrize("seed", [0, 1])
def test_fp4_decode_bit_exact(seed):
    """Both hand e2m1 decodes of the expert kernels equal ``dequant_fp4`` bit for bit: every one of
    the 256 byte values in every column position, scales over a wide range of exponents."""
    from mtp_kernels import moe

    from mtp.quant import dequant_fp4
    n, k = 64, 512
    g = gen(30 + seed)
    w = torch.randint(-128, 128, (n, k // 2), generator=g, device=DEVICE, dtype=torch.int32)
    w[:2] = torch.arange(-128, 128, device=DEVICE, dtype=torch.int32)  # all 256 bytes
    w = w.to(torch.int8)
    s = torch.randint(127 - 60, 127 + 60, (n, k // 32), generator=g, device=DEVICE,
                      dtype=torch.int32).to(torch.uint8).view(torch.float8_e8m0fnu)
    ref = dequant_fp4(w, s)
    for decode in _decodes(HAND_DECODES):
        got = moe.fp4_decode(w, s, decode)
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), decode


@pytest.mark.parametrize("mode", ["in-kernel", "rounded"])
@pytest.mark.parametrize("decode", ALL_DECODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [1, 3, 20])
def test_fp4_experts(t, dtype, decode, mode):
    """Both expert products against the reference, every decode, the activation rounding done
    in each program ("in-kernel") or once ahead ("rounded": u by hc_pre_norm, the w2 input by
    round_rows, as the fast path does)."""
    from mtp_kernels import moe
    if decode not in _decodes():
        pytest.skip("the CPU interpreter runs only the f32 decode (no inline PTX, no "
                    "tl.dot_scaled)")

    from mtp.quant import fp8_simulate
    e, d, i, k = 8, 256, 128, 2
    w13, s13 = fp4_weight(e, 2 * i, d, seed=20)
    w2, s2 = fp4_weight(e, d, i, seed=40)
    u = randn(t, d, seed=21, dtype=dtype)
    idx = torch.stack([torch.randperm(e, generator=gen(22 + r), device=DEVICE)[:k]
                       for r in range(t)])
    wts = torch.rand(t, k, generator=gen(23), device=DEVICE)
    pairs, texp = moe.align_tiles(idx, e)
    if mode == "rounded":
        aq = dict(act_quant=False, rounded=True, decode=decode)
        act = moe.moe_w13(fp8_simulate(u, 128), w13, s13, pairs, texp, wts, limit=10.0, **aq)
        valid = pairs >= 0
        before = act.clone()  # rows of padding pairs hold whatever was in memory (even NaN)
        moe.round_rows(act, pairs)
        assert torch.equal(act[valid], fp8_simulate(before[valid], 128))
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # NaN == NaN as bits
        assert torch.equal(act[~valid].view(bits), before[~valid].view(bits))  # left alone
        out = moe.moe_w2(act, w2, s2, pairs, texp, t * k, **aq)
    else:
        act = moe.moe_w13(u, w13, s13, pairs, texp, wts, act_quant=True, limit=10.0,
                          decode=decode)
        out = moe.moe_w2(act, w2, s2, pairs, texp, t * k, act_quant=True, decode=decode)
    ref = experts_reference(u, idx, wts, w13, s13, w2, s2)
    for q in range(t * k):
        assert rel(out[q], ref[q]) < (BF16_TOL if dtype == torch.bfloat16 else F32_TOL)


def _cuda_experts():
    """mtp_kernels.moe_cuda, or skip with the reason it cannot run here."""
    if INTERPRET:
        pytest.skip("the CUDA expert kernels are compiled by NVRTC for a GPU; the interpreter "
                    "runs only Triton")
    from mtp_kernels import moe_cuda
    reason = moe_cuda.unavailable(torch.device(DEVICE))
    if reason:
        pytest.skip(f"CUDA expert kernels: {reason}")
    return moe_cuda


def _unpermute8(xh):
    """quant_rows' float16 order (each 8 inputs as 0 2 4 6 1 3 5 7) -> natural order."""
    r, d = xh.shape
    return xh.view(r, d // 8, 2, 4).transpose(2, 3).reshape(r, d)  # [R, D/8, 2, 4] -> [R, D]


@pytest.mark.parametrize("d", [128, 384, 7168])
def test_quant_rows_exact(d):
    """xh (un-permuted) * xs is the reference's fp8_simulate bit for bit; rows whose pair is
    -1 are left as they were."""
    from mtp_kernels import moe

    from mtp.quant import fp8_simulate
    x = randn(6, d, seed=50, dtype=torch.bfloat16, std=3.0)
    x[1, :128] = 0  # an all-zero block: the reference's 1e-4 floor on the scale
    x[2, 5] = 1e4  # one block whose scale is set by a single large value
    xh, xs = moe.quant_rows(x)
    got = _unpermute8(xh).float() * xs.repeat_interleave(128, dim=1)
    assert torch.equal(got, fp8_simulate(x, 128).float())
    assert torch.equal(xs, torch.exp2(torch.log2(xs).round()))  # powers of two
    pairs = torch.tensor([3, -1, 0, -1, 7, 1], dtype=torch.int32, device=DEVICE)
    xh2, xs2 = moe.quant_rows(x, pairs)
    keep = pairs >= 0
    assert torch.equal(xh2[keep], xh[keep]) and torch.equal(xs2[keep], xs[keep])


@pytest.mark.parametrize("bm", [8, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_cuda_experts_decode_exact(seed, bm):
    """moe_cuda.moe_w2 on one-hot activations returns the dequantised weight columns bit for
    bit: every byte value in every input position, scales over 2^-60 .. 2^60, tiles of 8 and
    16 slots (one and two token groups; 256 rows on one expert)."""
    moe_cuda = _cuda_experts()
    from mtp_kernels import moe

    from mtp.quant import dequant_fp4
    e, d, i = 3, 32, 256
    g = gen(60 + seed)
    w = torch.randint(-128, 128, (e, d, i // 2), generator=g, device=DEVICE,
                      dtype=torch.int32)
    w[1, :2] = torch.arange(-128, 128, device=DEVICE, dtype=torch.int32).view(2, 128)
    w = w.to(torch.int8)
    s = torch.randint(127 - 60, 127 + 60, (e, d, i // 32), generator=g, device=DEVICE,
                      dtype=torch.int32).to(torch.uint8).view(torch.float8_e8m0fnu)
    idx = torch.ones(i, 1, dtype=torch.int64, device=DEVICE)  # every row on expert 1
    pairs, texp = moe.align_tiles(idx, e, bm)
    act = torch.zeros(pairs.numel(), i, dtype=torch.bfloat16, device=DEVICE)
    rows = torch.nonzero(pairs >= 0).flatten()
    act[rows, pairs[rows].long()] = 1.0  # the row of pair p picks input p
    ah, as_ = moe.quant_rows(act, pairs)
    out = moe_cuda.moe_w2(ah, as_, w, s, pairs, texp, i)
    ref = dequant_fp4(w[1], s[1]).t().to(torch.bfloat16)  # [I, D]: row p = input p's column
    assert torch.equal(out, ref)


TUNES = [None, {"wn": 1, "stages": 2, "steps": 8}, {"wn": 8, "stages": 2, "steps": 2},
         {"skip": 0}]


@pytest.mark.parametrize("bm", [8, 16])
@pytest.mark.parametrize("tune", TUNES)
@pytest.mark.parametrize("t", [1, 3, 20, 40])
def test_cuda_experts(t, tune, bm):
    """The CUDA expert kernels against the reference (bf16, activation rounding on), fed as the
    fast path feeds them: quant_rows of u, of the w13 output. At 40 rows one expert takes every
    row (several full tiles); tiles of 8 or 16 slots (one or two token groups); the launch
    settings change only the summation order."""
    moe_cuda = _cuda_experts()
    from mtp_kernels import moe

    e, d, i, k = 8, 512, 256, 2
    w13, s13 = fp4_weight(e, 2 * i, d, seed=20)
    w2, s2 = fp4_weight(e, d, i, seed=40)
    u = randn(t, d, seed=21, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(e, generator=gen(22 + r), device=DEVICE)[:k]
                       for r in range(t)])
    if t == 40:
        idx[:, 0], idx[:, 1] = 5, torch.where(idx[:, 1] == 5, idx[:, 0], idx[:, 1])
    wts = torch.rand(t, k, generator=gen(23), device=DEVICE)
    pairs, texp = moe.align_tiles(idx, e, bm)
    xh, xs = moe.quant_rows(u)
    act = moe_cuda.moe_w13(xh, xs, w13, s13, pairs, texp, wts, limit=10.0, tune=tune)
    ah, as_ = moe.quant_rows(act, pairs)
    out = moe_cuda.moe_w2(ah, as_, w2, s2, pairs, texp, t * k, tune=tune)
    ref = experts_reference(u, idx, wts, w13, s13, w2, s2)
    for q in range(t * k):
        assert rel(out[q], ref[q]) < BF16_TOL, q


@pytest.mark.parametrize("skip", [0, 1])
def test_cuda_w2_padding_rows_unread(skip):
    """w2's input rows of slots without a pair are left unwritten (quant_rows with pairs): NaN
    there must reach no pair's output, whether the kernel skips those rows' loads (skip 1,
    the default) or reads them into columns whose outputs it does not store (skip 0)."""
    moe_cuda = _cuda_experts()
    from mtp_kernels import moe
    e, d, i, t, k = 4, 256, 256, 5, 2
    w2, s2 = fp4_weight(e, d, i, seed=41)
    idx = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 1], [3, 0]], device=DEVICE)
    pairs, texp = moe.align_tiles(idx, e, 8)  # 8 slots per tile, 2-3 pairs each: padding
    act = randn(pairs.numel(), i, seed=42, dtype=torch.bfloat16)
    pad = pairs < 0
    assert pad.any()
    ah, as_ = moe.quant_rows(act, pairs)
    ah[pad], as_[pad] = 0.0, 0.0
    clean = moe_cuda.moe_w2(ah, as_, w2, s2, pairs, texp, t * k, tune={"skip": skip})
    ah[pad], as_[pad] = float("nan"), float("nan")
    out = moe_cuda.moe_w2(ah, as_, w2, s2, pairs, texp, t * k, tune={"skip": skip})
    assert torch.isfinite(clean).all()
    assert torch.equal(out, clean)  # same sums in the same order: bit for bit


def test_cuda_experts_bad_input():
    moe_cuda = _cuda_experts()
    from mtp_kernels import moe
    w13, s13 = fp4_weight(2, 256, 256, seed=20)
    u = randn(2, 256, seed=21, dtype=torch.bfloat16)
    idx = torch.tensor([[0], [1]], device=DEVICE)
    pairs, texp = moe.align_tiles(idx, 2)
    xh, xs = moe.quant_rows(u)
    wts = torch.ones(2, 1, device=DEVICE)
    with pytest.raises(ValueError, match="quant_rows"):
        moe_cuda.moe_w13(u, xs, w13, s13, pairs, texp, wts, limit=0.0)
    with pytest.raises(ValueError, match=r"int8 \[E, N, 128\]"):
        moe_cuda.moe_w13(xh, xs, w13[:, :, :64], s13, pairs, texp, wts, limit=0.0)
    off = torch.empty(xh.numel() + 8, dtype=xh.dtype, device=DEVICE)[1:1 + xh.numel()]
    with pytest.raises(ValueError, match="16-byte aligned"):  # contiguous, 2 bytes off
        moe_cuda.moe_w13(off.view_as(xh), xs, w13, s13, pairs, texp, wts, limit=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_q_kv_prep(dtype):
    from mtp_kernels import attention as at

    from mtp import ops
    from mtp.quant import fp8_simulate
    t, h, dh, r = 4, 3, 128, 64
    pos = torch.tensor([0, 5, 77, 4000], device=DEVICE)
    i = torch.arange(0, r, 2, dtype=torch.float64, device=DEVICE)
    cos, sin = at.rope_table(pos, 10000.0 ** (-i / r))
    cos_r, sin_r = ops.rope_cos_sin(pos, r, 10000.0)
    assert rel(cos, cos_r) < 1e-7 and rel(sin, sin_r) < 1e-7
    q = randn(t, h, dh, seed=30, dtype=dtype)
    q_ref = ops.apply_rope(ops.rms_norm(q, None, 1e-6), cos_r, sin_r)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    assert rel(at.q_prep(q.clone(), cos, sin, 1e-6), q_ref) < tol
    kv = randn(t, dh, seed=31, dtype=dtype)
    w = 1 + randn(dh, seed=32, std=0.1)
    kv_r = ops.apply_rope(ops.rms_norm(kv, w, 1e-6), cos_r, sin_r)
    kv_r = torch.cat((fp8_simulate(kv_r[:, :-r], 64), kv_r[:, -r:]), dim=-1)
    assert rel(at.kv_prep(kv, w, cos, sin, 1e-6, True, dtype), kv_r) < tol
    # the three in one launch, from a fused [T, Q + Dh] row (Q = 96: a masked q block)
    fused = torch.cat((randn(t, 96, seed=33, dtype=dtype), kv), dim=1)
    qw = 1 + randn(96, seed=34, std=0.1)
    q_lat, kv2, cos2, sin2 = at.attn_prep(fused, 96, qw, w, pos, 10000.0 ** (-i / r), 1e-6,
                                          True, dtype)
    assert torch.equal(cos2, cos) and torch.equal(sin2, sin)
    assert rel(q_lat, ops.rms_norm(fused[:, :96], qw, 1e-6)) < tol
    assert rel(kv2, kv_r) < tol


@pytest.mark.parametrize("sms", [None, 1])
@pytest.mark.parametrize("dh, r", [(128, 64), (192, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sink_attention_and_cache(dtype, dh, r, sms, monkeypatch):
    """Decode and indexed attention against the reference. The P @ V output blocks are spread
    over programs or (``sms`` = 1: one multiprocessor's worth of programs) looped in one; a
    head_dim of 192 is no power of two (the cache write masks its last block)."""
    from mtp_kernels import attention as at

    from mtp import ops
    from mtp.cache import window_index
    if sms is not None:
        monkeypatch.setattr(at, "sm_count", lambda device: sms)
    t, h, win, cap, seqs = 5, 20, 8, 11, 4
    pos = torch.tensor([3, 9, 30, 0, 12], device=DEVICE)
    slots = torch.tensor([0, 1, 2, -1, 3], device=DEVICE)  # one row per sequence; -1 padding
    cache_kv = randn(seqs * cap, dh, seed=33, dtype=dtype)
    cache_pos = torch.randint(0, 40, (seqs, cap), generator=gen(34), device=DEVICE)
    for s_ in range(seqs):  # a mix of held, stale and empty entries
        for p_ in range(40):
            if torch.rand(1, generator=gen(35 + p_ + 40 * s_), device=DEVICE) < 0.7:
                cache_pos[s_, p_ % cap] = p_
    cache_pos[0, 1] = -1
    new_kv = randn(t, dh, seed=36, dtype=dtype)
    q = randn(t, h, dh, seed=37, dtype=dtype)
    sink = randn(h, seed=38)
    i = torch.arange(0, r, 2, dtype=torch.float64, device=DEVICE)
    cos, sin = at.rope_table(pos, 10000.0 ** (-i / r))
    real = slots >= 0
    win_idx = window_index(pos[real], slots[real], win, cache_pos, cap)
    pool = torch.cat((cache_kv, new_kv[real]))
    o_ref = ops.sink_attention(q[real], pool[win_idx.keys_index], win_idx.keys_valid, sink,
                               dh ** -0.5).to(dtype)
    o_ref = ops.apply_rope(o_ref, cos[real], sin[real], inverse=True)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    o_dec = at.sink_attention(q, new_kv, sink, cos, sin, win, cache_kv=cache_kv, positions=pos,
                              seq_slots=slots, cache_pos=cache_pos)
    assert rel(o_dec[real], o_ref) < tol
    o_idx = at.sink_attention(q[real], new_kv[real], sink, cos[real], sin[real], win,
                              cache_kv=cache_kv, keys_index=win_idx.keys_index,
                              keys_valid=win_idx.keys_valid)
    assert rel(o_idx, o_ref) < tol
    kv2, pos2 = cache_kv.clone(), cache_pos.clone()
    at.cache_write(new_kv, pos, kv2, pos2, seq_slots=slots)
    kv3, pos3 = cache_kv.clone(), cache_pos.clone()
    kv3.index_copy_(0, win_idx.write_slots, new_kv[real][win_idx.write_rows])
    pos3.view(-1).index_copy_(0, win_idx.write_slots, pos[real][win_idx.write_rows])
    assert torch.equal(kv2, kv3) and torch.equal(pos2, pos3)


# ---- catch-up: the many-row paths, on both sides of each row threshold ----------------------
@pytest.fixture
def many_rows(monkeypatch):
    """The many-row paths turned on (the default; set here so that these tests keep testing
    them if the default changes)."""
    from mtp_kernels import _common
    monkeypatch.setattr(_common, "MANY_ROWS", True)


@pytest.mark.usefixtures("many_rows")
@pytest.mark.parametrize("m", [127, 128, 129, 301])
def test_fp8_linear_many_rows(m, monkeypatch):
    """From ``PREQ_ROWS`` rows the input is FP8-rounded once ahead (``quant_fp8``) instead of in
    every output block: the same codes and scales reach the same FP8 dot with the same tiles,
    so both paths agree bit for bit, for a strided input, the fused SwiGLU, the broadcast add
    and a pre-rounded input; and each against the reference (BF16_TOL: exact products, the
    bf16 rounding of the output). A pre-rounded input (``rounded``) below PREQ_ROWS takes the
    bf16 dot instead: within BF16_TOL of the FP8 dot there, bit for bit from PREQ_ROWS."""
    from mtp_kernels import fp8_linear as fl

    from mtp.quant import fp8_simulate
    if INTERPRET:
        pytest.skip("FP8 tensor-core dots: the interpreter has no float8 dot")
    calls = []
    orig = fl.quant_fp8
    monkeypatch.setattr(fl, "quant_fp8", lambda *a, **k: calls.append(1) or orig(*a, **k))
    w, s = fp8_weight(384, 512, seed=70)
    x = randn(m, 1024, seed=71, dtype=torch.bfloat16, std=4.0)
    add = randn((m + 3) // 4, 384, seed=72, dtype=torch.bfloat16)
    old = {"preq_rows": 10 ** 9}  # the in-kernel rounding
    cases = [
        (x[:, :512], dict(act_quant=True)),  # a strided view: row stride 1024
        (x, dict(act_quant=True, swiglu_limit=10.0)),
        (x[:, 512:].contiguous(), dict(act_quant=True, add=add, add_row_div=4)),
    ]
    for xi, kw in cases:
        y = fl.fp8_linear(xi, w, s, **kw)
        assert torch.equal(y, fl.fp8_linear(xi, w, s, tune=old, **kw)), kw
        assert rel(y, fl.fp8_linear_reference(xi, w, s, **kw)) < BF16_TOL, kw
    xr = fp8_simulate(x[:, :512], 128)
    y = fl.fp8_linear(xr, w, s, act_quant=False, rounded=True)
    want = fl.fp8_linear(xr, w, s, act_quant=True, tune=old)
    if m >= fl.PREQ_ROWS:  # both: quant_fp8's codes (or the kernel's same rounding), FP8 dot
        assert torch.equal(y, want)
    else:  # a rounded input below PREQ_ROWS takes the bf16 dot: exact products, other order
        assert rel(y, want) < BF16_TOL
    assert len(calls) == (4 if m >= fl.PREQ_ROWS else 0)


@pytest.mark.usefixtures("many_rows")
@pytest.mark.parametrize("tune", [{"bm": 128}, {"bm": 128, "stages": 4}, {"bm": 128, "warps": 4},
                                  {"stages": 4}, {"warps": 4}])
def test_fp8_linear_many_rows_tiles(tune):
    """The many-row entry's launch settings (``ab_drafter``'s "many-*" variants): 128-row
    tiles, more stages, fewer warps compute the same function. Bit for bit the default's here:
    each output's 128-blocks are summed in the same order by any tile (at this shape both
    tilings take two split-K parts: 3 x 8 or 3 x 4 programs, far under the SMs' count), and
    within BF16_TOL of the reference (exact products, the output's bf16 rounding)."""
    from mtp_kernels import fp8_linear as fl
    if INTERPRET:
        pytest.skip("FP8 tensor-core dots: the interpreter has no float8 dot")
    w, s = fp8_weight(384, 512, seed=73)
    x = randn(512, 512, seed=74, dtype=torch.bfloat16, std=4.0)
    add = randn(128, 384, seed=75, dtype=torch.bfloat16)
    for kw in (dict(act_quant=True), dict(act_quant=True, add=add, add_row_div=4)):
        y = fl.fp8_linear(x, w, s, tune=tune, **kw)
        assert torch.equal(y, fl.fp8_linear(x, w, s, **kw)), kw
        assert rel(y, fl.fp8_linear_reference(x, w, s, **kw)) < BF16_TOL, kw


@pytest.mark.parametrize("launch", [(32, 4), (64, 4), (16, 4), (64, 8)])
@pytest.mark.parametrize("m", [1, 33, 129])
def test_quant_fp8_exact(m, launch, monkeypatch):
    """codes x scales equal ``fp8_simulate`` bit for bit (of x, and of the clamped SwiGLU of
    its halves rounded to bf16), rows spanning 16 orders of magnitude; with the default
    launch and ab_drafter's "quant-*" ones (``QUANT_LAUNCH``: rows per program, warps)."""
    from mtp_kernels import fp8_linear
    from mtp_kernels.fp8_linear import quant_fp8
    monkeypatch.setattr(fp8_linear, "QUANT_LAUNCH", launch)

    from mtp import ops
    from mtp.quant import fp8_simulate
    if INTERPRET:
        pytest.skip("float8 stores: the interpreter has no float8 type")
    x = (randn(m, 512, seed=73) * torch.logspace(-8, 8, m, device=DEVICE)[:, None]).to(
        torch.bfloat16)
    q, s = quant_fp8(x, 512)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, 4)
    got = (q.float().view(m, 4, 128) * s[:, :, None]).view(m, 512)
    assert torch.equal(got.to(torch.bfloat16), fp8_simulate(x, 128))
    q, s = quant_fp8(x, 256, swiglu_limit=10.0)
    want = fp8_simulate(ops.swiglu(x[:, :256], x[:, 256:], 10.0).to(torch.bfloat16), 128)
    got = (q.float().view(m, 2, 128) * s[:, :, None]).view(m, 256)
    assert torch.equal(got.to(torch.bfloat16), want)


@pytest.mark.parametrize("m", [1, 33, 129])
def test_quant_fp8_padded_rows_and_outer_major_scales(m):
    """``quant_fp8(..., rows=R, scales_outer_major=True)`` (cuBLAS's layout, ``scaled_mm``):
    the first M rows' codes and scales equal the default call's bit for bit, the padding rows
    have zero codes, and the scales' rows are adjacent in memory (stride (1, R)). (Runs in
    Triton 3.9's interpreter too, which stores float8.)"""
    from mtp_kernels.fp8_linear import quant_fp8
    x = (randn(m, 1024, seed=74) * torch.logspace(-6, 6, m, device=DEVICE)[:, None]).to(
        torch.bfloat16)
    for k, limit in ((512, None), (512, 10.0)):
        xi = x if limit else x[:, :k]  # a strided view: row stride 1024
        q0, s0 = quant_fp8(xi, k, limit)
        rows = m + 3
        q, s = quant_fp8(xi, k, limit, rows=rows, scales_outer_major=True)
        assert q.shape == (rows, k) and s.shape == (rows, k // 128) and s.stride() == (1, rows)
        assert torch.equal(q[:m].view(torch.uint8), q0.view(torch.uint8))
        assert torch.equal(s[:m], s0)
        assert not q[m:].view(torch.uint8).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@given(m=st.integers(1, 70), n=st.integers(1, 700), d=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=25, deadline=None)
def test_add_rows_in_place(dtype, m, n, d, seed):
    """``scaled_mm.add_rows_`` (the broadcast add after cuBLAS's product) equals torch's add
    of the repeated rows bit for bit (one rounding of each float32 sum), in y's own memory;
    the add's rows strided (a column range of a wider tensor)."""
    from mtp_kernels.scaled_mm import add_rows_
    if INTERPRET and dtype == torch.bfloat16:
        pytest.skip("bfloat16 rounding: the interpreter truncates")
    y = randn(m, n, seed=seed, dtype=dtype)
    a = randn(-(-m // d), n + 3, seed=seed + 1, dtype=dtype)[:, 3:]
    want = y + a.repeat_interleave(d, dim=0)[:m]
    got = add_rows_(y, a, d)
    assert got.data_ptr() == y.data_ptr() and torch.equal(got, want)


@given(st.lists(st.integers(1, 254), min_size=1, max_size=64))
@settings(max_examples=30, deadline=None)
def test_cublas_weight_scales_are_the_e8m0_values(codes):
    """The float32 scales cuBLAS takes are exactly 2^(b - 127) for every E8M0 byte b of a
    real scale (1..254), the value the Triton kernels decode from the same byte."""
    from mtp_kernels.scaled_mm import _f32_scales
    b = torch.tensor(codes, dtype=torch.uint8, device=DEVICE)
    got = _f32_scales(b.view(torch.float8_e8m0fnu).view(1, -1))
    want = torch.tensor([2.0 ** (c - 127) for c in codes], dtype=torch.float64)
    assert got.dtype == torch.float32 and torch.equal(got.double().cpu().view(-1), want)


def test_cublas_weight_scales_follow_every_write():
    """cuBLAS's float32 weight scales (``scaled_mm._f32_scales``) are the E8M0 scales as they
    are at the call, whatever wrote them: ``copy_`` (bumps the version counter),
    ``.data.copy_`` (bumps none: the write an engine's weight loader makes), a replaced
    ``.data`` (``module.to()``); float32 contiguous scales are taken as they are."""
    from mtp_kernels.scaled_mm import _f32_scales
    e8m0 = torch.float8_e8m0fnu

    def full(v):
        return torch.full((3, 4), v, device=DEVICE)

    s = torch.nn.Parameter(full(2.0).to(e8m0), requires_grad=False)
    assert torch.equal(_f32_scales(s), full(2.0))
    s.copy_(full(4.0).to(e8m0))
    assert torch.equal(_f32_scales(s), full(4.0))
    version = s._version
    s.data.copy_(full(0.5).to(e8m0))
    assert s._version == version  # (the premise: this write is invisible to the counter)
    assert torch.equal(_f32_scales(s), full(0.5))
    s.data = full(8.0).to(e8m0)
    assert torch.equal(_f32_scales(s), full(8.0))
    f = torch.rand(3, 4, device=DEVICE)
    assert _f32_scales(f) is f


@pytest.mark.usefixtures("many_rows")
@pytest.mark.parametrize("add_kernel", [False, True])
@pytest.mark.parametrize("m", [128, 301, 512])
def test_fp8_linear_by_cublas(m, add_kernel, monkeypatch):
    """With ``fp8_linear.CUBLAS_ROWS`` the products of many rows go to cuBLAS's block-scaled
    FP8 GEMM (``scaled_mm``): the same codes and scales (``quant_fp8``), each 128-block's
    products summed on the FP8 tensor cores, then float32 across blocks, in cuBLAS's order; so
    against the reference BF16_TOL (exact products, the output's bf16 rounding) for a strided
    input, the fused SwiGLU, the broadcast add (rows not a multiple of 4: padded), a
    pre-rounded input and ``add_linear`` (e_proj beside h_proj), and each by cuBLAS; the
    weight's float32 scales following every write of the scales; the broadcast add by torch
    or by ``add_rows_`` (``scaled_mm.ADD_KERNEL``)."""
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels import scaled_mm
    monkeypatch.setattr(scaled_mm, "ADD_KERNEL", add_kernel)

    from mtp.quant import fp8_simulate
    if INTERPRET:
        pytest.skip("cuBLAS: the interpreter runs no cuBLAS")
    w, s = fp8_weight(384, 512, seed=75)
    w2, s2 = fp8_weight(384, 512, seed=76)
    x = randn(m, 1024, seed=77, dtype=torch.bfloat16, std=4.0)
    if not scaled_mm.ready(x.device):  # (its probe before the count below)
        pytest.skip(f"cuBLAS's block-scaled FP8 GEMM: {scaled_mm.unavailable(x.device)}")
    calls = []
    orig = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(fl, "CUBLAS_ROWS", 128)
    add = randn((m + 3) // 4, 384, seed=78, dtype=torch.bfloat16)
    xr = fp8_simulate(x[:, :512], 128)
    cases = [
        (x[:, :512], dict(act_quant=True)),  # a strided view: row stride 1024
        (x, dict(act_quant=True, swiglu_limit=10.0)),
        (xr, dict(act_quant=False, rounded=True)),
    ]
    if m % 4 == 0:
        cases.append((x[:, 512:].contiguous(), dict(act_quant=True, add=add, add_row_div=4)))
    for xi, kw in cases:
        y = fl.fp8_linear(xi, w, s, **kw)
        assert y.shape == (m, 384) and y.dtype == torch.bfloat16
        ref_kw = dict(kw, act_quant=True)
        ref_kw.pop("rounded", None)
        assert rel(y, fl.fp8_linear_reference(xi, w, s, **ref_kw)) < BF16_TOL, kw
    assert len(calls) == len(cases)
    if m % 4 == 0:  # e_proj's m/4 rows: by cuBLAS from 128 of them, else the kernel
        x2 = randn(m // 4, 512, seed=79, dtype=torch.bfloat16)
        y = fl.fp8_linear(x[:, :512], w, s, act_quant=True, add_row_div=4,
                          add_linear=(x2, w2, s2))
        e = fl.fp8_linear_reference(x2, w2, s2, act_quant=True)
        want = fl.fp8_linear_reference(x[:, :512], w, s, act_quant=True, add=e, add_row_div=4)
        assert rel(y, want) < BF16_TOL
        assert len(calls) == len(cases) + (2 if m // 4 >= 128 else 1)
    y0 = fl.fp8_linear(x[:, :512], w, s, act_quant=True)
    s.copy_(s.float().mul(2).to(s.dtype))  # in place, as a reload: the next call reads it
    assert torch.equal(fl.fp8_linear(x[:, :512], w, s, act_quant=True), y0 * 2)
    # captured in a graph, the product reads the scales at every replay (as the Triton
    # kernel reads every weight): written after capture by a write that bumps no version
    # counter, the replay sees them (doubling every scale doubles the bf16 output exactly)
    xs = x[:, :512].contiguous()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fl.fp8_linear(xs, w, s, act_quant=True)  # (Triton's compile, outside the capture)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = fl.fp8_linear(xs, w, s, act_quant=True)
    graph.replay()
    y1 = y_graph.clone()  # (the same graph both times: cuBLAS's same algorithm)
    s.data.copy_(s.float().mul(2).to(s.dtype))
    graph.replay()
    assert torch.equal(y_graph, y1 * 2)


@given(t=st.integers(1, 11), kb=st.sampled_from([1, 2, 4]), n_blocks=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16))
@settings(max_examples=15, deadline=None)
def test_hc_pre_norm_rounded_for_cublas(t, kb, n_blocks, seed):
    """``hc_pre_norm(..., fp8=scales)``: u, post and comb as without it, bit for bit, and the
    fourth result u rounded as cuBLAS reads it, ``quant_fp8(u, rows=padded,
    scales_outer_major=True)`` bit for bit (padded rows zero codes), with the weight's E8M0
    scales as float32 (torch's conversion; 255: NaN). (Runs in Triton 3.9's interpreter too:
    both sides read the same stored u.)"""
    from mtp_kernels import hc
    from mtp_kernels.fp8_linear import quant_fp8
    from mtp_kernels.scaled_mm import FP8Rows, padded_rows
    m, d = 4, 128 * kb
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, m, d, generator=g) * 4).to(torch.bfloat16).to(DEVICE)
    w = 1 + randn(d, seed=seed, std=0.1)
    fn = randn((2 + m) * m, m * d, seed=seed + 1, std=(m * d) ** -0.5)
    scale, base = 0.5 + torch.rand(3, device=DEVICE), randn((2 + m) * m, seed=seed + 2, std=0.5)
    b = torch.randint(0, 256, (n_blocks, kb), generator=g, dtype=torch.uint8)
    b[0, 0] = 255
    ws = b.to(DEVICE).view(torch.float8_e8m0fnu)
    args = (x, fn, scale, base, w, 20, 1e-6, 1e-6)
    u0, post0, comb0 = hc.hc_pre_norm(*args)
    u, post, comb, r = hc.hc_pre_norm(*args, fp8=ws)
    assert torch.equal(u, u0) and torch.equal(post, post0) and torch.equal(comb, comb0)
    q, s = quant_fp8(u, d, rows=padded_rows(t), scales_outer_major=True)
    assert isinstance(r, FP8Rows) and r.m == t
    assert torch.equal(r.codes.view(torch.uint8), q.view(torch.uint8))
    assert r.scales.stride() == s.stride() and torch.equal(r.scales, s)
    nan = b.to(DEVICE) == 255
    assert torch.equal(r.weight_scale.isnan(), nan)
    assert torch.equal(r.weight_scale.view(torch.int32)[~nan],
                       ws.float().view(torch.int32)[~nan])
    with pytest.raises(ValueError, match="hc_pre_norm: fp8 takes"):
        hc.hc_pre_norm(*args, act_quant=True, fp8=ws)


@pytest.mark.usefixtures("many_rows")
@pytest.mark.parametrize("mix_kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [64, 65, 129, 300])
def test_hc_pre_norm_many_rows(t, dtype, mix_kernel, monkeypatch):
    """Above ``MIX_MANY_T`` rows the mixes come from one cuBLAS product, or with
    ``hc.MIX_MANY_KERNEL`` for bfloat16 rows from ``hc_mix_many``: they sum in another order
    (fp32), so the same bounds as for few rows (test_rmsnorm_and_hc)."""
    from mtp_kernels import hc

    from mtp import ops
    if mix_kernel and not torch.cuda.is_available():
        pytest.skip("the many-row mixes are chosen for CUDA tensors only (the interpreter's "
                    "are on the CPU)")
    monkeypatch.setattr(hc, "MIX_MANY_KERNEL", mix_kernel)
    calls = []
    kernel = hc.hc_mix_many
    monkeypatch.setattr(hc, "hc_mix_many", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    m, d = 4, 256
    x = randn(t, m, d, seed=74, dtype=dtype)
    w = 1 + randn(d, seed=75, std=0.1)
    fn = randn((2 + m) * m, m * d, seed=76, std=(m * d) ** -0.5)
    scale, base = 0.5 + torch.rand(3, device=DEVICE), randn((2 + m) * m, seed=77, std=0.5)
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    u, post, comb = hc.hc_pre_norm(x, fn, scale, base, w, 20, 1e-6, 1e-6)
    y_r, post_r, comb_r = ops.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    assert rel(post, post_r) < 1e-5 and rel(comb, comb_r) < 1e-5
    assert rel(u, ops.rms_norm(y_r, w, 1e-6)) < tol
    fh = randn(m, m * d, seed=78, std=(m * d) ** -0.5)
    sh, bh = 0.5 + torch.rand(1, device=DEVICE), randn(m, seed=79, std=0.5)
    yh = hc.hc_head_norm(x, fh, sh, bh, w, 1e-6, 1e-6)
    assert rel(yh, ops.rms_norm(ops.hc_head(x, fh, sh, bh, 1e-6, 1e-6), w, 1e-6)) < tol
    # hc_pre and hc_head each took their mixes from the kernel where it applies
    assert len(calls) == (2 if mix_kernel and dtype == torch.bfloat16 and t > 64 else 0)


def _mix_error(got, z, fn):
    """Each mix's error against the float64 product, over its terms' magnitude sum (the
    scale of an accumulation error): [T, F]."""
    want = z.double() @ fn.double().t()
    return (got.double() - want).abs() / (z.double().abs() @ fn.double().abs().t())


@settings(max_examples=12, deadline=None)
@given(t=st.integers(1, 140), kb=st.integers(1, 6), f=st.sampled_from([4, 24]),
       split=st.sampled_from([None, 1, 3]), seed=st.integers(0, 2**16))
def test_hc_mix_many_against_float64(t, kb, f, split, seed):
    """The many-row mixes (``hc_mix_many``: three bfloat16 tensor-core dots over fn's three
    parts, split-K partials) against float64. The products are exact, so the error is the
    sums': at most one float32 ulp (2^-23, the tensor cores' accumulation truncates) of the
    terms' magnitude sum per accumulation (3 dots x KT/16 steps, then S partials), a bound
    from the arithmetic, not from the kernel (an H100 measured 2^-22.8 at KT = 128, ~10x
    torch's float32 product there). The sums of squares: exact squares, float32 sums (a
    128-wide tree per step, KT/128 steps, S partials, half an ulp each). Over rows that
    fill part of a block, F of 4 (the head) and 24 (hc_pre)."""
    from mtp_kernels import hc
    if INTERPRET:
        pytest.skip("the interpreter's bfloat16 dot is wrong (Triton 3.9 on the CPU: a dot of "
                    "two loaded bfloat16 tiles off by ~1e10): a GPU test")
    kt = 128 * kb
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # z: bfloat16 across six orders of magnitude; fn: float32 using all 24 mantissa bits
    z = (torch.randn(t, kt, generator=g, device=DEVICE)
         * 10.0 ** torch.randint(-3, 3, (t, 1), generator=g, device=DEVICE)).to(torch.bfloat16)
    fn = torch.randn(f, kt, generator=g, device=DEVICE) * kt ** -0.5
    fp = max(16, 1 << (f - 1).bit_length())
    part, sq, n = hc.hc_mix_many(z, fn, fp, split=split)
    assert part.shape == (n, t, fp) and sq.shape == (n, t)
    if split is not None:
        assert n == -(-kb // -(-kb // split))  # the chunks that are not empty
    mix = part.sum(0)
    assert torch.equal(mix[:, f:], torch.zeros_like(mix[:, f:]))  # the padding columns
    err = _mix_error(mix[:, :f], z, fn)
    assert (err <= (3 * kt // 16 + n) * 2.0 ** -23).all(), err.max().item()
    sq_want = z.double().square().sum(1)
    sq_err = (sq.sum(0).double() - sq_want).abs() / sq_want.clamp_min(1e-300)
    assert (sq_err <= (7 + kb + n) * 2.0 ** -24).all(), sq_err.max().item()


@pytest.mark.parametrize("f", [4, 24])
def test_hc_mix_many_splits_fn_exactly(f):
    """One nonzero per row (z = 1 at column c_t): each mix is the single product fn[:, c_t],
    so the three bfloat16 parts must add back to fn's float32 value: within one float32 ulp
    (the accumulator's truncation; two parts only would leave ~2^-17 off, 64x more)."""
    from mtp_kernels import hc
    if INTERPRET:
        pytest.skip("the interpreter's bfloat16 dot is wrong (Triton 3.9 on the CPU): a GPU test")
    t, kt = 200, 384
    g = torch.Generator(device=DEVICE).manual_seed(90 + f)
    cols = torch.randint(0, kt, (t,), generator=g, device=DEVICE)
    z = torch.zeros(t, kt, dtype=torch.bfloat16, device=DEVICE)
    z[torch.arange(t, device=DEVICE), cols] = 1.0
    fn = torch.randn(f, kt, generator=g, device=DEVICE)
    part, _, _ = hc.hc_mix_many(z, fn, 32)
    want = fn.t()[cols].double()  # [T, F]
    assert ((part.sum(0)[:, :f].double() - want).abs() <= 2.0 ** -23 * want.abs()).all()


def test_hc_mix_many_refuses_what_it_cannot_read():
    from mtp_kernels import hc
    fn = torch.zeros(24, 256, device=DEVICE)
    for z, fp, what in [(torch.zeros(4, 256, device=DEVICE), 32, "torch.float32"),
                        (torch.zeros(4, 200, device=DEVICE, dtype=torch.bfloat16), 32, "200"),
                        (torch.zeros(256, 4, device=DEVICE, dtype=torch.bfloat16).t(), 32,
                         "contiguous"),
                        (torch.zeros(4, 256, device=DEVICE, dtype=torch.bfloat16), 16, "FP=16")]:
        with pytest.raises(ValueError, match=f"hc_mix_many: .*{what}"):
            hc.hc_mix_many(z, fn if z.shape[1] == 256 else fn[:, :200], fp)


@pytest.mark.usefixtures("many_rows")
@pytest.mark.parametrize("h", [20, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths", [(63,), (64,), (40, 25), (129, 2)])
def test_sink_attention_many_rows(lengths, dtype, h):
    """Indexed attention of runs of rows (a catch-up: each sequence's rows after its cached
    history) on both sides of ``ATTN_MANY_T``, where one program takes ``ATTN_MANY_BH``
    heads (20: a partial head block), against the reference (the tolerances of
    test_sink_attention_and_cache)."""
    from mtp_kernels import attention as at

    from mtp import ops
    from mtp.cache import window_index
    dh, r, win, cap = 128, 64, 16, 19
    seqs = len(lengths)
    slots = torch.cat([torch.full((n,), s_) for s_, n in enumerate(lengths)]).to(DEVICE)
    pos = torch.cat([torch.arange(n) + 7 * (s_ + 1) for s_, n in enumerate(lengths)]).to(DEVICE)
    t = len(pos)
    cache_kv = randn(seqs * cap, dh, seed=80, dtype=dtype)
    cache_pos = torch.full((seqs, cap), -1, dtype=torch.int64, device=DEVICE)
    for s_ in range(seqs):  # the history before each run's first position
        first = 7 * (s_ + 1)
        held = torch.arange(max(0, first - cap), first, device=DEVICE)
        cache_pos[s_, held % cap] = held
    new_kv = randn(t, dh, seed=81, dtype=dtype)
    q = randn(t, h, dh, seed=82, dtype=dtype)
    sink = randn(h, seed=83)
    i = torch.arange(0, r, 2, dtype=torch.float64, device=DEVICE)
    cos, sin = at.rope_table(pos, 10000.0 ** (-i / r))
    idx = window_index(pos, slots, win, cache_pos, cap)
    pool = torch.cat((cache_kv, new_kv))
    o_ref = ops.sink_attention(q, pool[idx.keys_index], idx.keys_valid, sink,
                               dh ** -0.5).to(dtype)
    o_ref = ops.apply_rope(o_ref, cos, sin, inverse=True)
    o = at.sink_attention(q, new_kv, sink, cos, sin, win, cache_kv=cache_kv,
                          keys_index=idx.keys_index, keys_valid=idx.keys_valid)
    assert rel(o, o_ref) < (BF16_TOL if dtype == torch.bfloat16 else F32_TOL)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), s=st.integers(1, 5), r=st.integers(1, 9),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       int_dtypes=st.sampled_from([(torch.int64, torch.int64), (torch.int32, torch.int64),
                                   (torch.int64, torch.int32), (torch.int32, torch.int32)]),
       strided=st.booleans())
def test_propose_prepare_matches_the_reference(data, s, r, dtype, int_dtypes, strided):
    """``TritonOps.propose_prepare`` (two kernels reading the caller's rows by address) against
    ``mtp.propose_program.prepare`` of ``gather_rows`` (torch operations, the definition) on
    random staged calls: sequences padding or not, row counts 0..R + 2 (more than R: a
    catch-up's last R rows staged), rows taken from anywhere in the caller's tensors (int64 or
    int32 ids and positions, strided views or not), ids / positions / hidden values right or
    wrong (out-of-vocabulary ids, shifted positions, NaN, inf, values just over and just under
    the bound), any cache positions, an error word from the unstaged rows' checks or none.
    Integer logic and copies: every output and the rolled-back position table bit-identical."""
    from mtp_kernels.prepare import propose_prepare

    from mtp.propose_program import (
        ERR_HIDDEN,
        ERR_IDS,
        ERR_POSITIONS,
        gather_rows,
        prepare,
        rows_at,
    )

    vocab, n, max_seqs, cap = 50, data.draw(st.sampled_from([16, 48, 3000])), 6, 7
    seed = data.draw(st.integers(0, 2**16))
    g = gen(seed)
    slots = data.draw(st.permutations(range(max_seqs)))[:s]
    slots = [x if data.draw(st.booleans()) or i == 0 else -1 for i, x in enumerate(slots)]
    counts = data.draw(st.lists(st.integers(0, r + 2), min_size=s, max_size=s))
    starts = data.draw(st.lists(st.integers(0, 40), min_size=s, max_size=s))
    meta = torch.tensor([slots, starts, counts], device=DEVICE)
    # the caller's T rows; bucket row b is the caller's row src[b] (distinct rows)
    t = s * r + data.draw(st.integers(0, 3))
    src = torch.randperm(t, generator=gen(seed + 1), device=DEVICE)[:s * r]
    ids_dtype, pos_dtype = int_dtypes
    wide = 2 if strided else 1  # strided: every other element / a row of a wider tensor
    ids = torch.randint(0, vocab, (t, wide), generator=g, device=DEVICE).to(ids_dtype)[:, 0]
    # positions mostly where expected: the checks must see both cases
    j = torch.arange(r, device=DEVICE)
    cnt = torch.tensor(counts, device=DEVICE)
    want = (torch.tensor(starts, device=DEVICE)[:, None] + j[None, :] - (r - cnt)[:, None])
    pos = torch.zeros(t, wide, dtype=pos_dtype, device=DEVICE)[:, 0]
    pos[src] = want.flatten().to(pos_dtype)
    if data.draw(st.booleans()):
        ids[data.draw(st.integers(0, t - 1))] = data.draw(st.sampled_from([-1, vocab]))
    if data.draw(st.booleans()):
        pos[data.draw(st.integers(0, t - 1))] += 1
    hidden = torch.randn(t, n + 5 * strided, generator=g, device=DEVICE).to(dtype)[:, :n]
    for _ in range(data.draw(st.integers(0, 3))):
        value = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), 2e6,
                                           999_424.0, -1e6, 1.01e6]))
        hidden[data.draw(st.integers(0, t - 1)), data.draw(st.integers(0, n - 1))] = value
    cache_pos = torch.randint(-1, 60, (2, max_seqs, cap), generator=g, device=DEVICE)
    want_pos, got_pos = cache_pos.clone(), cache_pos.clone()
    pre = data.draw(st.sampled_from([None, 0, ERR_IDS, ERR_POSITIONS | ERR_HIDDEN]))
    pre = None if pre is None else torch.tensor(pre, dtype=torch.int32, device=DEVICE)
    expected = prepare(meta, *gather_rows(src, ids, pos, hidden, dtype), r, 1e6, vocab,
                       want_pos, pre_error=pre)
    at = torch.tensor(rows_at(hidden, ids, pos), device=DEVICE)
    word = None if pre is None else pre.clone()  # the call's word so far, OR-ed in place
    got = propose_prepare(meta, src, at, r, n, dtype, 1e6, vocab, got_pos, error=word)
    assert word is None or got[-1] is word
    for name, a, b in zip(("ids_in", "pos_in", "x_in", "row_slots", "draft_slots", "error"),
                          expected, got):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(want_pos, got_pos)


def test_propose_prepare_reads_no_padding_row():
    """A bucket of padding only (what a graph's capture and warm-up run on) with every
    address 0: the kernels read no caller's row (a read there would fault), write zeros and
    slots -1, and leave the cache positions alone."""
    from mtp_kernels.prepare import propose_prepare

    meta = torch.tensor([[-1, -1], [0, 0], [0, 0]], device=DEVICE)
    src = torch.zeros(6, dtype=torch.int64, device=DEVICE)
    at = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    cache_pos = torch.arange(2 * 3 * 4, device=DEVICE).view(2, 3, 4)
    before = cache_pos.clone()
    ids_in, pos_in, x_in, row_slots, draft_slots, error = propose_prepare(
        meta, src, at, 3, 16, torch.bfloat16, 1e6, 50, cache_pos)
    assert not ids_in.any() and not pos_in.any() and not x_in.any() and int(error) == 0
    assert (row_slots == -1).all() and (draft_slots == -1).all()
    assert torch.equal(cache_pos, before)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 20_000), seed=st.integers(0, 2**16))
def test_copy_out_copies_to_the_staged_address(n, seed):
    """``copy_out``: the bytes of ``packed`` land, bit for bit, in the buffer whose address is
    staged (4-byte lanes when the size allows, else bytes), nothing past its end is written;
    address 0 (a capture's warm-up) writes nothing."""
    from mtp_kernels.prepare import copy_out

    packed = torch.randint(0, 256, (n,), generator=gen(seed), device=DEVICE).to(torch.uint8)
    dest = torch.full((n + 64,), 7, dtype=torch.uint8, device=DEVICE)
    copy_out(packed, torch.tensor([dest.data_ptr()], device=DEVICE))
    assert torch.equal(dest[:n], packed) and (dest[n:] == 7).all()
    before = packed.clone()
    copy_out(packed, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    assert torch.equal(packed, before)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), k=st.integers(1, 5), s=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.float64]), word=st.integers(0, 31),
       bit=st.sampled_from([8, 64]))
def test_copy_out_sets_the_bit_where_a_probe_is_nan(data, k, s, dtype, word, bit):
    """``copy_out`` with an error word and the call's probes [k, S] (more than one block of
    them at S * k > 128): the word gains ``bit`` exactly when some probe is NaN (inf, -inf,
    -0.0 and huge values are not), its other bits as they were; the bytes are copied as
    without; to address 0 too (the word is the call's, whatever the buffer)."""
    from mtp_kernels.prepare import copy_out

    probes = torch.tensor(data.draw(st.lists(st.sampled_from(
        [0.0, -0.0, 1.5, 3e38, float("inf"), float("-inf")]), min_size=k * s,
        max_size=k * s)), dtype=dtype)
    nan_at = data.draw(st.lists(st.integers(0, k * s - 1), max_size=3))
    probes[nan_at] = float("nan")
    probes = probes.view(k, s).to(DEVICE)
    packed = torch.randint(0, 256, (4 * s + 4,), generator=gen(word), device=DEVICE).to(torch.uint8)
    dest = torch.zeros(4 * s + 4, dtype=torch.uint8, device=DEVICE)
    for at in (dest.data_ptr(), 0):
        error = torch.tensor(word, dtype=torch.int32, device=DEVICE)
        got = copy_out(packed, torch.tensor([at], device=DEVICE), error=error, probes=probes,
                       bit=bit)
        assert got is error and int(error) == (word | bit if nan_at else word)
    assert torch.equal(dest, packed)


def host_tensor(*shape, dtype):
    """A host tensor a kernel reaches by address, and that address: page-locked and mapped on
    a GPU (``mapped_address``), any CPU tensor under the interpreter (one address space)."""
    from mtp_kernels.prepare import mapped_address

    t = torch.zeros(*shape, dtype=dtype, pin_memory=DEVICE == "cuda")
    at = mapped_address(t) if DEVICE == "cuda" else t.data_ptr()
    assert at, "a page-locked tensor the driver did not map"
    return t, at


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**16), pre=st.integers(0, 31))
def test_stage_in_copies_the_host_record_and_begins_the_word(n, seed, pre):
    """``stage_in``: the int64 record (several blocks at n > 1024) lands bit for bit, from
    the host buffer where it is mapped, nothing past its end is written; the word takes
    ``pre_error``'s bits, ``pre_error`` is unchanged."""
    from mtp_kernels.prepare import stage_in

    host, at = host_tensor(n, dtype=torch.int64)
    host.copy_(torch.randint(-2**62, 2**62, (n,), generator=torch.Generator().manual_seed(seed)))
    staged = torch.full((n + 3,), 7, dtype=torch.int64, device=DEVICE)
    pre_error = torch.tensor(pre, dtype=torch.int32, device=DEVICE)
    error = torch.tensor(-1, dtype=torch.int32, device=DEVICE)
    stage_in(staged[:n], at, pre_error, error)
    assert torch.equal(staged[:n].cpu(), host) and (staged[n:] == 7).all()
    assert int(error) == pre and int(pre_error) == pre
    with pytest.raises(ValueError, match="mapped host address"):
        stage_in(staged[:n], 0, pre_error, error)


@pytest.mark.parametrize("nan", [False, True])
def test_copy_out_stores_the_word_at_the_host_address(nan):
    """``copy_out(..., word_at=)``: the finished word (the NaN bit OR-ed in where a probe is
    NaN) reaches the host's copy, without probes too (the word as it is)."""
    from mtp_kernels.prepare import copy_out

    host, at = host_tensor((), dtype=torch.int32)
    packed = torch.arange(12, dtype=torch.uint8, device=DEVICE)
    out_at = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    probes = torch.tensor([[0.0, float("nan") if nan else 1.0]], device=DEVICE)
    error = torch.tensor(2, dtype=torch.int32, device=DEVICE)
    copy_out(packed, out_at, error=error, probes=probes, bit=8, word_at=at)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert int(host) == int(error) == (10 if nan else 2)
    error.fill_(5)
    copy_out(packed, out_at, error=error, word_at=at)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert int(host) == int(error) == 5


def test_mapped_address_only_for_page_locked_host_tensors():
    """None for a device tensor and a pageable one; on a GPU a page-locked tensor's address
    (with unified addressing, the host address itself)."""
    from mtp_kernels.prepare import mapped_address

    assert mapped_address(torch.zeros(2, device=DEVICE)) is None
    assert mapped_address(torch.zeros(2)) is None
    if DEVICE == "cuda":
        t = torch.zeros(2, pin_memory=True)
        assert mapped_address(t) == t.data_ptr()


def test_copy_out_refuses_probes_or_a_host_address_without_a_word():
    from mtp_kernels.prepare import copy_out

    packed = torch.zeros(8, dtype=torch.uint8, device=DEVICE)
    at = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    word = torch.zeros((), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="need an int32"):
        copy_out(packed, at, probes=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="need an int32"):
        copy_out(packed, at, word_at=1234)
    with pytest.raises(ValueError, match="need an int32"):
        copy_out(packed, at, error=word.long(), probes=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="need an int32"):
        copy_out(packed, at, error=word, probes=torch.zeros(2, 2, device=DEVICE).t())
    assert int(word) == 0


# ---- the greedy pick: each row's first maximum ------------------------------------------------
def first_max_reference(row: list[float]) -> int:
    """The index torch.max(dim) picks, from its definition: the first NaN if the row holds
    one, else the first occurrence of the largest value (-0.0 and 0.0 are equal)."""
    for i, x in enumerate(row):
        if math.isnan(x):
            return i
    best = 0
    for i, x in enumerate(row):
        if x > row[best]:
            best = i
    return best


# values from a small set, so ties, signed zeros, infinities and NaNs are common
_PICK_VALUES = [0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), float("-inf"), float("nan")]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), s=st.integers(1, 4), v=st.integers(1, 200),
       block=st.sampled_from([16, 32]), programs=st.sampled_from([1, 3, 8]))
def test_argmax_rows_is_torch_max(data, s, v, block, programs):
    """``argmax_rows`` picks each row's first maximum, NaN first (the reference above), and
    returns that element's bits as the value: what ``torch.max(dim=-1)`` returns, over rows
    split into several programs' chunks (small blocks: many chunks, a short last one)."""
    from mtp_kernels.argmax import argmax_rows
    rows = data.draw(st.lists(st.lists(st.sampled_from(_PICK_VALUES), min_size=v, max_size=v),
                              min_size=s, max_size=s))
    x = torch.tensor(rows, dtype=torch.float32, device=DEVICE)
    into = data.draw(st.booleans())  # the values into a row of a [2, S] buffer, or fresh
    buf = torch.full((2, s), 5.0, device=DEVICE)
    top, token = argmax_rows(x, block=block, programs=programs, top=buf[1] if into else None)
    assert token.dtype == torch.int64 and top.dtype == torch.float32
    assert (top.data_ptr() == buf[1].data_ptr()) == into and (buf[0] == 5.0).all()
    for r, row in enumerate(rows):
        i = first_max_reference(row)
        assert int(token[r]) == i, (row, int(token[r]), i)
        assert torch.equal(top[r].view(torch.int32), x[r, i].view(torch.int32))  # NaN, -0.0


def test_argmax_rows_vocabulary_sized():
    """At V-4-Flash's vocabulary (129,280 columns, 127 programs a row with the default
    launch), random logits and a few planted duplicates of the row's maximum: torch.max's
    values and indices, for a row slice of a wider tensor too."""
    from mtp_kernels.argmax import argmax_rows
    x = randn(3, 129_280 + 64, seed=90)
    x[1, [500, 70_000]] = 9.0  # the first of two equal maxima
    x[2, 129_279] = 9.5  # the last column
    x = x[:, :129_280]  # rows of contiguous columns, row stride 129,344
    top, token = argmax_rows(x)
    want_top, want_token = x.max(dim=-1)
    assert torch.equal(token, want_token) and torch.equal(top, want_top)
    assert token.tolist()[1:] == [500, 129_279]


# dtypes of a catch-up's per-row tensors (and odd ones): any element size, bytes copied as is
_TAKE_DTYPES = [torch.bfloat16, torch.float32, torch.int64, torch.int32, torch.float8_e4m3fn,
                torch.uint8, torch.float64]


@settings(max_examples=40, deadline=None)
@given(data=st.data(), t=st.integers(1, 9), n=st.integers(1, 6),
       bw=st.sampled_from([16, 64, 2048]), wide=st.booleans())
def test_take_rows_copies_the_rows(data, t, n, bw, wide):
    """``take_rows`` (``kernels/rows.py``) gives each tensor's rows ``rows`` [S] (repeats,
    any order, none), bit for bit (random bytes: NaN payloads, signed zeros), over tensors of
    any element size and row width, 1-D ones included, and rows int32 or int64. The expected
    rows are copied one by one in Python. Small ``bw``: a row in many chunks, a short last."""
    from mtp_kernels.rows import take_rows
    s = data.draw(st.integers(0, 6))
    rows = data.draw(st.lists(st.integers(0, t - 1), min_size=s, max_size=s))
    tensors = []
    for j in range(n):
        dtype = data.draw(st.sampled_from(_TAKE_DTYPES))
        tail = data.draw(st.lists(st.integers(1, 40 if wide else 3), max_size=2))
        shape = (t, *tail)
        size = torch.empty(shape, dtype=dtype).element_size()
        bytes_ = torch.randint(0, 256, (math.prod(shape) * size,), dtype=torch.uint8,
                               generator=gen(j), device=DEVICE)
        tensors.append(bytes_.view(dtype).view(shape))
    idx = torch.tensor(rows, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])),
                       device=DEVICE)
    outs = take_rows(idx, tensors, bw=bw)
    assert len(outs) == n
    for src, out in zip(tensors, outs):
        assert out.dtype == src.dtype and out.shape == (s, *src.shape[1:])
        want = [src[r].reshape(-1).view(torch.uint8) for r in rows]
        for i in range(s):
            assert torch.equal(out[i].reshape(-1).view(torch.uint8), want[i]), (i, src.dtype)


def test_take_rows_refuses_other_layouts():
    """A tensor that is not contiguous [T, ...] with the others' T, or rows not int32 / int64
    [S], is refused with the argument named, before anything is allocated or launched."""
    from mtp_kernels.rows import take_rows
    x, rows = randn(4, 8), torch.tensor([1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        take_rows(rows, (x, randn(8, 4).t()))
    with pytest.raises(ValueError, match="one T"):
        take_rows(rows, (x, randn(5, 8)))
    with pytest.raises(ValueError, match="one T"):
        take_rows(rows, (x, randn(())))
    with pytest.raises(ValueError, match="rows must be int32 or int64"):
        take_rows(rows.float(), (x,))
    with pytest.raises(ValueError, match="rows must be int32 or int64"):
        take_rows(rows[None], (x,))


def test_argmax_rows_refuses_other_layouts():
    from mtp_kernels.argmax import argmax_rows
    with pytest.raises(ValueError, match="float32"):
        argmax_rows(randn(2, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous rows"):
        argmax_rows(randn(8, 2).t())
    with pytest.raises(ValueError, match="at least one row"):
        argmax_rows(randn(0, 8))
    with pytest.raises(ValueError, match="top must be a contiguous float32"):
        argmax_rows(randn(2, 8), top=torch.zeros(4, 2, device=DEVICE)[:, 0])
    with pytest.raises(ValueError, match="top must be a contiguous float32"):
        argmax_rows(randn(2, 8), top=torch.zeros(2, dtype=torch.float64, device=DEVICE))

"""Sanity tests of tests/reference.py itself; they do not touch the library."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

try:
    from tests import reference as ref
except ImportError:  # run as a plain pytest file with tests/ on sys.path
    import reference as ref

F64 = torch.float64
HSET = settings(derandomize=True, max_examples=40, deadline=None)


def _torch_e4m3(x):
    """Torch's own float8 e4m3fn rounding, used as an independent cross-check."""
    return x.to(torch.float8_e4m3fn).to(F64)


# ----------------------------------------------------------------------------------------------
# FP8 e4m3 rounding
# ----------------------------------------------------------------------------------------------


def test_e4m3_grid_shape():
    grid = ref.e4m3_grid()
    assert grid.numel() == 127
    assert grid[0].item() == 0.0
    assert grid[1].item() == 2.0 ** -9  # smallest subnormal
    assert grid[-1].item() == 448.0
    assert torch.all(grid[1:] > grid[:-1])


def test_every_representable_value_round_trips():
    grid = ref.e4m3_grid()
    vals = torch.cat([grid, -grid])
    assert torch.equal(ref.fp8_e4m3_round(vals), vals)
    assert torch.equal(_torch_e4m3(vals), vals)


def test_fp8_round_ties_and_edges_match_torch():
    grid = ref.e4m3_grid()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    quarter = grid[:-1] + (grid[1:] - grid[:-1]) / 4
    three_q = grid[:-1] + 3 * (grid[1:] - grid[:-1]) / 4
    edge = torch.tensor([0.0, -0.0, 448.0, -448.0, 2.0 ** -10, 2.0 ** -11, 3 * 2.0 ** -10,
                         440.0, 432.0, 1e-30], dtype=F64)
    vals = torch.cat([mids, quarter, three_q, edge])
    vals = torch.cat([vals, -vals])
    mine = ref.fp8_e4m3_round(vals)
    theirs = _torch_e4m3(vals)
    assert torch.equal(mine, theirs)
    assert torch.equal(torch.signbit(mine), torch.signbit(theirs))
    # ties go to the even mantissa: 2^-10 (half the smallest subnormal) -> 0; 17 -> 16, 19 -> 20
    assert ref.fp8_e4m3_round(torch.tensor([2.0 ** -10, 17.0, 19.0], dtype=F64)).tolist() == [
        0.0, 16.0, 20.0]


def test_fp8_round_random_matches_torch():
    g = torch.Generator().manual_seed(0)
    mags = torch.exp(torch.empty(3000, dtype=F64).uniform_(math.log(1e-4), math.log(448.0),
                                                            generator=g))
    signs = torch.where(torch.rand(3000, generator=g) < 0.5, -1.0, 1.0).to(F64)
    vals = (mags * signs).to(torch.float32).to(F64).clamp(-448, 448)
    assert torch.equal(ref.fp8_e4m3_round(vals), _torch_e4m3(vals))


@HSET
@given(st.floats(min_value=-448.0, max_value=448.0, allow_nan=False, width=32))
def test_fp8_round_hypothesis_matches_torch(v):
    x = torch.tensor([v], dtype=F64)
    assert torch.equal(ref.fp8_e4m3_round(x), _torch_e4m3(x))


# ----------------------------------------------------------------------------------------------
# power-of-two scales and block quantisation
# ----------------------------------------------------------------------------------------------


def test_pow2_scale_exact_values():
    cases = {448.0: 1.0, 449.0: 2.0, 224.0: 0.5, 1.0: 2.0 ** -8, 0.0: 2.0 ** -22,
             1e-5: 2.0 ** -22, 896.0: 2.0, 897.0: 4.0}
    for amax, want in cases.items():
        assert ref.pow2_scale(torch.tensor(amax, dtype=F64)).item() == want, amax


@HSET
@given(st.floats(min_value=0.0, max_value=1e6, allow_nan=False, width=32))
def test_pow2_scale_properties(amax):
    s = ref.pow2_scale(torch.tensor([amax], dtype=F64)).item()
    mant, _ = math.frexp(s)
    assert mant == 0.5  # an exact power of two
    a = max(amax, 1e-4)
    assert a / s <= 448.0
    assert a / s > 224.0 * (1 - 1e-6)  # the smallest such power of two


@HSET
@given(st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32),
                min_size=1, max_size=300), st.sampled_from([64, 128]))
def test_quant_dequant_blocks(values, block):
    x = torch.tensor(values, dtype=F64)
    q = ref.quant_dequant_blocks(x, block)
    assert torch.equal(ref.quant_dequant_blocks(q, block), q)  # idempotent
    for start in range(0, x.numel(), block):
        blk, qb = x[start:start + block], q[start:start + block]
        s = ref.pow2_scale(blk.abs().max()).item()
        # same result as torch's float8 on the scaled block
        assert torch.equal(qb, _torch_e4m3((blk / s).clamp(-448, 448)) * s)
        err = (qb - blk).abs()
        assert torch.all(err <= torch.maximum(blk.abs() / 16, torch.full_like(blk, s * 2 ** -10)))


# ----------------------------------------------------------------------------------------------
# byte decoding
# ----------------------------------------------------------------------------------------------


def test_dequant_e4m3_all_bytes_match_torch():
    b = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    mine = ref.dequant_e4m3_bytes(b)
    theirs = b.view(torch.float8_e4m3fn).to(F64)
    nan = torch.isnan(mine)
    assert nan.nonzero().flatten().tolist() == [0x7F, 0xFF]
    assert torch.equal(torch.isnan(theirs), nan)
    assert torch.equal(mine[~nan], theirs[~nan])
    assert torch.equal(ref.fp8_e4m3_round(mine[~nan]), mine[~nan])
    # int8 input is the same bytes
    assert torch.equal(ref.dequant_e4m3_bytes(b.view(torch.int8))[~nan], mine[~nan])


def test_e8m0_to_float():
    b = torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8)
    f = ref.e8m0_to_float(b)
    assert f[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127]
    assert math.isnan(f[6].item())
    if hasattr(torch, "float8_e8m0fnu"):
        b = torch.arange(255, dtype=torch.int64).to(torch.uint8)
        assert torch.equal(ref.e8m0_to_float(b), b.view(torch.float8_e8m0fnu).to(F64))


def test_dequant_fp8_block_matches_torch():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (200, 300), generator=g).to(torch.uint8)
    q[q == 0x7F] = 0x7E
    q[q == 0xFF] = 0xFE
    s_bytes = torch.randint(120, 135, (2, 3), generator=g).to(torch.uint8)
    s_float = ref.e8m0_to_float(s_bytes)
    want = q.view(torch.float8_e4m3fn).to(F64) * s_float.repeat_interleave(128, 0)[:200].\
        repeat_interleave(128, 1)[:, :300]
    assert torch.equal(ref.dequant_fp8_block(q, s_bytes), want)
    assert torch.equal(ref.dequant_fp8_block(q, s_float), want)
    assert torch.equal(ref.dequant_fp8_block(q.view(torch.int8), s_float.to(torch.float32)), want)


def test_dequant_fp4_hand_built():
    # row 0: byte 0x21 -> [0.5, 1.0]; byte 0x8F -> [-6, -0]; rest zeros; second 32-block 0xF7
    packed = torch.zeros((2, 32), dtype=torch.uint8)
    packed[0, 0] = 0x21
    packed[0, 1] = 0x8F
    packed[0, 16] = 0xF7  # element 32 -> 6, element 33 -> -6
    packed[1, :] = 0x5A  # low 0xA -> -1, high 5 -> 3
    scale = torch.tensor([[127, 129], [0, 254]], dtype=torch.uint8)
    w = ref.dequant_fp4(packed.view(torch.int8), scale)
    assert w.shape == (2, 64)
    assert w[0, :4].tolist() == [0.5, 1.0, -6.0, 0.0]
    assert torch.signbit(w[0, 3])  # code 8 is -0
    assert w[0, 32:34].tolist() == [24.0, -24.0]
    assert torch.all(w[0, 4:32] == 0) and torch.all(w[0, 34:] == 0)
    assert w[1, :2].tolist() == [-(2.0 ** -127), 3 * 2.0 ** -127]
    assert w[1, 32:34].tolist() == [-(2.0 ** 127), 3 * 2.0 ** 127]
    # all 16 codes in order
    codes = torch.tensor([[lo | (hi << 4) for lo, hi in ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                                                          (10, 11), (12, 13), (14, 15))]
                          + [0] * 8], dtype=torch.uint8)
    w = ref.dequant_fp4(codes, torch.tensor([[127]], dtype=torch.uint8))
    assert w[0, :16].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6]


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


@HSET
@given(st.integers(min_value=0, max_value=100000), st.sampled_from([2, 8, 16]),
       st.integers(min_value=0, max_value=2 ** 16))
def test_rope_rotation_and_inverse(p, R, seed):
    x = torch.randn(3, 24, dtype=F64, generator=torch.Generator().manual_seed(seed))
    y = ref.rope_last(x, p, R, 10000.0)
    assert torch.equal(y[..., :24 - R], x[..., :24 - R])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.allclose(ref.rope_last(y, p, R, 10000.0, inverse=True), x, rtol=0, atol=1e-12)
    # same as complex multiplication of interleaved pairs
    zc = torch.view_as_complex(x[..., 24 - R:].reshape(3, R // 2, 2).contiguous())
    theta = 10000.0 ** (-2.0 * torch.arange(R // 2, dtype=F64) / R)
    rot = zc * torch.polar(torch.ones_like(theta), p * theta)
    assert torch.allclose(torch.view_as_real(rot).reshape(3, R), y[..., 24 - R:], atol=1e-12)


def test_rope_position_zero_and_relative():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(16, dtype=F64, generator=g), torch.randn(16, dtype=F64, generator=g)
    assert torch.equal(ref.rope_last(q, 0, 8, 10000.0), q)
    d1 = torch.dot(ref.rope_last(q, 7, 8, 10000.0), ref.rope_last(k, 3, 8, 10000.0))
    d2 = torch.dot(ref.rope_last(q, 107, 8, 10000.0), ref.rope_last(k, 103, 8, 10000.0))
    assert abs(d1 - d2) < 1e-11


# ----------------------------------------------------------------------------------------------
# hyper-connections
# ----------------------------------------------------------------------------------------------


def _hc_pre_vectorised(x, fn, scale, base, M, iters, hc_eps, eps):
    """The spec's pseudo-code transcribed with tensor ops, to cross-check the loops."""
    z = x.reshape(-1)
    mixes = (z @ fn.T) * torch.rsqrt((z * z).mean() + eps)
    pre = torch.sigmoid(mixes[:M] * scale[0] + base[:M]) + hc_eps
    post = 2 * torch.sigmoid(mixes[M:2 * M] * scale[1] + base[M:2 * M])
    c = mixes[2 * M:].view(M, M) * scale[2] + base[2 * M:].view(M, M)
    c = torch.softmax(c, dim=-1) + hc_eps
    c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)
    for _ in range(iters - 1):
        c = c / (c.sum(dim=-1, keepdim=True) + hc_eps)
        c = c / (c.sum(dim=-2, keepdim=True) + hc_eps)
    return (pre[:, None] * x).sum(0), post, c


@HSET
@given(st.integers(min_value=0, max_value=2 ** 16), st.sampled_from([1, 2, 4]),
       st.sampled_from([1, 2, 20]), st.sampled_from([0.1, 1.0]))
@example(110, 4, 1, 1.0)  # a post mix's sigmoid saturated: 2 * sigmoid(x) is exactly 2.0
@example(2219, 2, 20, 0.1)  # rows near a permutation: Sinkhorn slow (rows off by 2e-3 at 20)
@example(113, 4, 1, 0.1)  # a softmax column of 0.05: one step leaves it 2e-5 short of 1
def test_hc_pre(seed, M, iters, amp):
    g = torch.Generator().manual_seed(seed)
    D = 16
    x = torch.randn(M, D, dtype=F64, generator=g)
    fn = amp * torch.randn((2 + M) * M, M * D, dtype=F64, generator=g)
    scale = torch.rand(3, dtype=F64, generator=g) * 2
    base = torch.randn((2 + M) * M, dtype=F64, generator=g)
    y, post, comb = ref.hc_pre(x, fn, scale, base, M, iters, 1e-6, 1e-6)
    y2, post2, comb2 = _hc_pre_vectorised(x, fn, scale, base, M, iters, 1e-6, 1e-6)
    assert torch.allclose(y, y2, atol=1e-12) and torch.allclose(post, post2, atol=1e-12)
    assert torch.allclose(comb, comb2, atol=1e-12)
    # post = 2 sigmoid(.) lies in (0, 2); in float64 sigmoid rounds to 1 past an argument of
    # ~37 (reached with amp 1), so 2 itself is a valid value
    assert torch.all(comb > 0) and torch.all((post > 0) & (post <= 2))
    # columns sum to S / (S + hc_eps) after the last column step, S their sums before it.
    # After one step S is a column of the softmax (+ hc_eps), which may be tiny; after a row
    # step S >= (the previous column step's sums, >= 1/2) / (row sums, <= M), so the columns
    # are within 2 M hc_eps of 1
    col = comb.sum(dim=0)
    assert torch.all(col <= 1)
    if iters > 1:
        assert torch.all(1 - col <= 2 * M * 1e-6)
    if iters == 20:
        # Sinkhorn's row error (L1) does not grow from one iteration to the next, and falls
        # where it is not yet ~0: how fast is the matrix's (20 iterations left 2e-3 in rows
        # near a permutation), so no fixed bound; hc_eps moves the sums by ~1e-6
        def row_error(n):
            c = comb if n == iters else ref.hc_pre(x, fn, scale, base, M, n, 1e-6, 1e-6)[2]
            return (c.sum(dim=1) - 1).abs().sum().item()
        e1, e2, e20 = row_error(1), row_error(2), row_error(20)
        assert e2 <= e1 + 1e-5 and e20 <= e2 + 1e-5
        assert e1 <= 1e-3 or e20 < e1


def test_hc_post_direction():
    residual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0]], dtype=F64)
    comb = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]], dtype=F64)
    post = torch.tensor([1.0, 0.0, 2.0], dtype=F64)
    a = torch.tensor([3.0, 4.0], dtype=F64)
    out = ref.hc_post(a, residual, post, comb)
    # out[k] = post[k] a + sum_j comb[j, k] residual[j]
    assert out.tolist() == [[3 + 5.0, 4 + 5.0], [1.0, 0.0], [6.0, 8.0]]


def test_hc_head():
    g = torch.Generator().manual_seed(5)
    M, D = 4, 8
    x = torch.randn(M, D, dtype=F64, generator=g)
    fn = torch.randn(M, M * D, dtype=F64, generator=g)
    scale, base = torch.tensor([0.7], dtype=F64), torch.randn(M, dtype=F64, generator=g)
    z = x.reshape(-1)
    pre = torch.sigmoid((fn @ z) * torch.rsqrt((z * z).mean() + 1e-6) * 0.7 + base) + 1e-6
    assert torch.allclose(ref.hc_head(x, fn, scale, base, 1e-6, 1e-6), pre @ x, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# whole layer on a tiny random config
# ----------------------------------------------------------------------------------------------

CFG = {"hidden_size": 64, "vocab_size": 32, "num_attention_heads": 4, "head_dim": 32,
       "qk_rope_head_dim": 8, "q_lora_rank": 16, "o_groups": 2, "o_lora_rank": 8,
       "sliding_window": 3, "n_routed_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 16, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
       "hc_mult": 2, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
       "rope_theta": 10000.0}


def _weights(cfg, seed=0, prefix="mtp.0."):
    g = torch.Generator().manual_seed(seed)
    D, V, H, Dh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"], \
        cfg["head_dim"]
    Q, G, O, E, Ii, M = cfg["q_lora_rank"], cfg["o_groups"], cfg["o_lora_rank"], \
        cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hc_mult"]

    def lin(o, i):
        return torch.randn(o, i, dtype=F64, generator=g) / math.sqrt(i)

    def nw(n):
        return 1 + 0.1 * torch.randn(n, dtype=F64, generator=g)

    W = {"embed.weight": torch.randn(V, D, dtype=F64, generator=g), "head.weight": lin(V, D)}
    p = prefix
    for k, n in (("enorm", D), ("hnorm", D), ("norm", D), ("attn_norm", D), ("ffn_norm", D),
                 ("attn.q_norm", Q), ("attn.kv_norm", Dh)):
        W[p + k + ".weight"] = nw(n)
    for k, (o, i) in {"e_proj": (D, D), "h_proj": (D, D), "attn.wq_a": (Q, D),
                      "attn.wq_b": (H * Dh, Q), "attn.wkv": (Dh, D),
                      "attn.wo_a": (G * O, H * Dh // G), "attn.wo_b": (D, G * O),
                      "ffn.gate": (E, D), "ffn.shared_experts.w1": (Ii, D),
                      "ffn.shared_experts.w3": (Ii, D), "ffn.shared_experts.w2": (D, Ii)}.items():
        W[p + k + ".weight"] = lin(o, i)
    for e in range(E):
        for k, (o, i) in (("w1", (Ii, D)), ("w3", (Ii, D)), ("w2", (D, Ii))):
            W[p + f"ffn.experts.{e}.{k}.weight"] = lin(o, i)
    W[p + "ffn.gate.bias"] = 0.1 * torch.randn(E, dtype=F64, generator=g)
    W[p + "attn.attn_sink"] = torch.randn(H, dtype=F64, generator=g)
    for k in ("attn", "ffn"):
        W[p + f"hc_{k}_fn"] = 0.1 * torch.randn((2 + M) * M, M * D, dtype=F64, generator=g)
        W[p + f"hc_{k}_base"] = 0.1 * torch.randn((2 + M) * M, dtype=F64, generator=g)
        W[p + f"hc_{k}_scale"] = torch.rand(3, dtype=F64, generator=g)
    W[p + "hc_head_fn"] = 0.1 * torch.randn(M, M * D, dtype=F64, generator=g)
    W[p + "hc_head_base"] = 0.1 * torch.randn(M, dtype=F64, generator=g)
    W[p + "hc_head_scale"] = torch.rand(1, dtype=F64, generator=g)
    return W


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(7)
    T, M, D = 5, CFG["hc_mult"], CFG["hidden_size"]
    hidden = torch.randn(T, M * D, dtype=F64, generator=g)
    tokens = torch.randint(0, CFG["vocab_size"], (T,), generator=g)
    return _weights(CFG), hidden, tokens


def test_layer_shapes_and_logits(tiny):
    W, hidden, tokens = tiny
    pos = torch.arange(5)
    out = ref.mtp_layer(hidden, tokens, pos, W, CFG)
    assert out.shape == hidden.shape and torch.all(torch.isfinite(out))
    logits = ref.mtp_logits(out, W, CFG)
    assert logits.shape == (5, CFG["vocab_size"]) and torch.all(torch.isfinite(logits))
    # the FP8 simulations matter: turning them off changes the result
    plain = ref.mtp_layer(hidden, tokens, pos, W, CFG, act_quant=False, kv_fp8=False)
    assert not torch.allclose(out, plain, atol=1e-6)


def test_layer_shift_invariant_and_causal_window(tiny):
    W, hidden, tokens = tiny
    pos = torch.arange(5)
    out = ref.mtp_layer(hidden, tokens, pos, W, CFG, act_quant=False, kv_fp8=False)
    shifted = ref.mtp_layer(hidden, tokens, pos + 1000, W, CFG, act_quant=False, kv_fp8=False)
    assert torch.allclose(out, shifted, rtol=0, atol=1e-9)  # only relative positions matter
    # window 3: the row at position 4 sees positions 2..4 only; rows 0..1 do not matter to it,
    # and no row sees later rows
    h2 = hidden.clone()
    h2[0] += 1.0
    h2[1] -= 1.0
    out2 = ref.mtp_layer(h2, tokens, pos, W, CFG, act_quant=False, kv_fp8=False)
    assert torch.equal(out2[4], out[4])
    assert not torch.allclose(out2[2], out[2])
    h3 = hidden.clone()
    h3[4] += 1.0
    out3 = ref.mtp_layer(h3, tokens, pos, W, CFG, act_quant=False, kv_fp8=False)
    assert torch.equal(out3[:4], out[:4])


def test_moe_routes_by_bias_but_weights_by_scores():
    cfg = dict(CFG, n_routed_experts=4, num_experts_per_tok=1, routed_scaling_factor=2.0)
    W = _weights(cfg, seed=11)
    W["mtp.0.ffn.gate.bias"] = torch.tensor([0.0, 0.0, 100.0, 0.0], dtype=F64)
    u = torch.randn(64, dtype=F64, generator=torch.Generator().manual_seed(2))
    got = ref.moe(u, W, cfg, act_quant=False)
    p = "mtp.0.ffn."

    def expert(pre, w):
        gg = (W[pre + "w1.weight"] @ u).clamp(max=10.0)
        v = (W[pre + "w3.weight"] @ u).clamp(-10.0, 10.0)
        return W[pre + "w2.weight"] @ (w * torch.nn.functional.silu(gg) * v)

    # K = 1: the weight is score / score * 2.0 = 2.0, whatever the score
    want = expert(p + "experts.2.", 2.0) + expert(p + "shared_experts.", 1.0)
    assert torch.allclose(got, want, atol=1e-12)


def test_activation_rounding_follows_each_weights_stored_format(tiny):
    """architecture.md, Weight formats: FP8/FP4 weights get their input rounded, bf16/fp32 ones
    do not, whatever the switch says; the KV's FP8 simulation is not a product's rounding."""
    W, hidden, tokens = tiny
    pos = torch.arange(5)
    products = [k for k in W if k.endswith(("proj.weight", "wq_a.weight", "wkv.weight",
                                            "wq_b.weight", "wo_a.weight", "wo_b.weight"))
                or (".experts." in k or ".shared_experts." in k)]
    bf16 = dict.fromkeys(products, "bf16")
    out = ref.mtp_layer(hidden, tokens, pos, W, CFG, formats=bf16)
    assert torch.equal(out, ref.mtp_layer(hidden, tokens, pos, W, CFG, act_quant=False))
    released = dict.fromkeys(products, "fp8")
    assert torch.equal(ref.mtp_layer(hidden, tokens, pos, W, CFG, formats=released),
                       ref.mtp_layer(hidden, tokens, pos, W, CFG))
    # one FP8 weight among bf16 ones: only its input is rounded, and that moves the output
    one = {**bf16, "mtp.0.e_proj.weight": "fp8"}
    assert not torch.equal(ref.mtp_layer(hidden, tokens, pos, W, CFG, formats=one), out)

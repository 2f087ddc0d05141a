"""Each piece of the MTP math against the independent float64 reference (tests/reference.py),
on tiny configs and inputs drawn by hypothesis. The module runs in float64 here (the same code
as in float32/bf16), so any disagreement beyond float64 rounding is a bug in the math, not
precision: tolerances are 1e-12 relative unless stated."""

from __future__ import annotations

import reference as ref
import torch
from conftest import rel_err, small_configs
from hypothesis import given
from hypothesis import strategies as st

from mtp import DeepSeekV4MTP, Numerics, ops
from mtp.model import StepContext
from mtp.quant import WeightFormat
from mtp.testing import init_random_

F64 = torch.float64
TIGHT = 1e-12  # float64 arithmetic in a different order: ~1e-15 observed; 1e-12 leaves margin.
seeds = st.integers(0, 2**31 - 1)


def randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


@given(seed=seeds, t=st.integers(1, 5), n=st.integers(1, 300), eps=st.sampled_from([1e-6, 1.0]))
def test_rms_norm(seed, t, n, eps):
    x, w = randn(t, n, seed=seed), randn(n, seed=seed + 1)
    expected = torch.stack([ref.rms_norm(x[i], w, eps) for i in range(t)])
    assert rel_err(ops.rms_norm(x, w, eps), expected) < TIGHT
    # float32 input: computed in float32 and returned as float32
    out32 = ops.rms_norm(x.float(), w.float(), eps)
    assert out32.dtype == torch.float32 and rel_err(out32, expected) < 1e-6


@given(seed=seeds, heads=st.integers(1, 3), nope=st.sampled_from([0, 64]),
       half_rope=st.integers(1, 32), start=st.integers(0, 100_000))
def test_rope_rotates_the_last_dims_interleaved(seed, heads, nope, half_rope, start):
    r = 2 * half_rope
    x = randn(4, heads, nope + r, seed=seed)
    pos = torch.arange(start, start + 4)
    cos, sin = ops.rope_cos_sin(pos, r, 10000.0, F64)
    out = ops.apply_rope(x, cos, sin)
    back = ops.apply_rope(out, cos, sin, inverse=True)
    # An angle p * theta_i carries float64 rounding of ~p * 2^-53 rad, whichever way it is formed.
    tol = TIGHT + (start + 4) * 2.0 ** -50
    for t in range(4):
        for h in range(heads):
            expected = ref.rope_last(x[t, h], start + t, r, 10000.0)
            assert rel_err(out[t, h], expected) < tol
    assert rel_err(back, x) < TIGHT
    assert torch.equal(out[..., :nope], x[..., :nope])  # the first Dh-R dims are untouched


def test_rope_float32_angles_agree_at_large_positions():
    """Angles are formed in float64 then rounded; float32 rotation stays within 1e-6."""
    x = randn(3, 1, 64, seed=0)
    pos = torch.tensor([0, 65_535, 1_000_000])
    cos, sin = ops.rope_cos_sin(pos, 64, 10000.0)
    out = ops.apply_rope(x.float(), cos, sin)
    for t in range(3):
        assert rel_err(out[t, 0], ref.rope_last(x[t, 0], int(pos[t]), 64, 10000.0)) < 1e-6


@given(seed=seeds, m=st.sampled_from([1, 2, 4]), d=st.integers(1, 40), iters=st.integers(1, 20),
       t=st.integers(1, 3))
def test_hc_pre_post_head(seed, m, d, iters, t):
    x = randn(t, m, d, seed=seed)
    fn = randn((2 + m) * m, m * d, seed=seed + 1, scale=(m * d) ** -0.5)
    base, scale = randn((2 + m) * m, seed=seed + 2), randn(3, seed=seed + 3).abs() + 0.5
    y, post, comb = ops.hc_pre(x, fn, scale, base, iters, 1e-6, 1e-6)
    a = randn(t, d, seed=seed + 4)
    out = ops.hc_post(a, x, post, comb)
    head_fn, head_base = randn(m, m * d, seed=seed + 5), randn(m, seed=seed + 6)
    head_scale = torch.tensor([0.7], dtype=F64)
    yh = ops.hc_head(x, head_fn, head_scale, head_base, 1e-6, 1e-6)
    for i in range(t):
        ry, rpost, rcomb = ref.hc_pre(x[i], fn, scale, base, m, iters, 1e-6, 1e-6)
        assert rel_err(y[i], ry) < TIGHT
        assert rel_err(post[i], rpost) < TIGHT
        assert rel_err(comb[i], rcomb) < TIGHT
        assert rel_err(out[i], ref.hc_post(a[i], x[i], rpost, rcomb)) < TIGHT
        assert rel_err(yh[i], ref.hc_head(x[i], head_fn, head_scale, head_base, 1e-6, 1e-6)) \
            < TIGHT


def test_hc_post_sums_over_the_first_index_of_comb():
    """comb^T @ residual, not comb @ residual: a non-symmetric comb tells them apart."""
    residual = torch.tensor([[1.0], [10.0]], dtype=F64)[None]  # [T=1, M=2, D=1]
    comb = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=F64)[None]  # only comb[0, 1] = 1
    out = ops.hc_post(torch.zeros(1, 1, dtype=F64), residual, torch.zeros(1, 2, dtype=F64), comb)
    assert out[0, :, 0].tolist() == [0.0, 1.0]  # out[k=1] = comb[0, 1] * residual[0]


def _model(cfg, seed, fmt=None, **numerics):
    return init_random_(DeepSeekV4MTP(cfg, dtype=F64, weight_format=fmt,
                                      numerics=Numerics(**numerics)), seed=seed)


def _context(model, positions):
    return StepContext.single_sequence(model.config, positions, model.numerics)


@given(cfg=small_configs(), seed=seeds, extra=st.integers(-3, 6), start=st.integers(0, 50),
       act_quant=st.booleans(), kv_fp8=st.booleans())
def test_attention_window_and_sink(cfg, seed, extra, start, act_quant, kv_fp8):
    """Sequence lengths below, at and above the window W."""
    from conftest import checkpoint_weights

    t = max(1, cfg.sliding_window + extra)
    model = _model(cfg, seed, act_quant=act_quant, kv_fp8=kv_fp8)
    attn = model.layer(0).mtp_block.attn
    u = randn(t, cfg.hidden_size, seed=seed)
    pos = torch.arange(start, start + t)
    out = attn(u, _context(model, pos))
    expected = ref.attention(u, pos, checkpoint_weights(model), cfg, act_quant, kv_fp8)
    assert rel_err(out, expected) < TIGHT


@given(cfg=small_configs(max_experts=8), seed=seeds, t=st.integers(1, 6), act_quant=st.booleans())
def test_moe_routing_and_experts(cfg, seed, t, act_quant):
    from conftest import checkpoint_weights

    model = _model(cfg, seed, act_quant=act_quant)
    ffn = model.layer(0).mtp_block.ffn
    u = randn(t, cfg.hidden_size, seed=seed)
    out = ffn(u, None, _context(model, torch.arange(t)))
    weights = checkpoint_weights(model)
    expected = torch.stack([ref.moe(u[i], weights, cfg, act_quant) for i in range(t)])
    assert rel_err(out, expected) < TIGHT


def test_route_bias_only_selects():
    """The bias changes WHICH experts are chosen, never their weights."""
    u = torch.ones(1, 2, dtype=F64)
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], dtype=F64)  # logits 1, 1, 1
    gate[0] *= 3  # expert 0 scores highest
    bias = torch.tensor([-10.0, 0.0, 0.0], dtype=F64)  # ...but the bias rules it out
    idx, w = ops.route(u, gate, bias, 2, "sqrtsoftplus", 2.0)
    assert sorted(idx[0].tolist()) == [1, 2]
    s = torch.nn.functional.softplus(torch.tensor([1.0, 1.0], dtype=F64)).sqrt()
    assert torch.allclose(w[0], s / s.sum() * 2.0, rtol=0, atol=1e-15)


def test_swiglu_clamps_gate_above_and_up_both_sides():
    g = torch.tensor([20.0, -20.0, 1.0])
    v = torch.tensor([20.0, -20.0, 1.0])
    out = ops.swiglu(g, v, 10.0)
    silu = torch.nn.functional.silu
    assert torch.allclose(out, torch.stack([silu(torch.tensor(10.0)) * 10.0,
                                            silu(torch.tensor(-20.0)) * -10.0, silu(g[2])]))


@given(seed=seeds, fmt=st.sampled_from(["released", "fp8-experts", "plain"]))
def test_formats_agree_after_dequantisation(seed, fmt):
    """Every storage format computes with the same dequantised values."""
    from conftest import tiny_config

    formats = {"released": WeightFormat.released(),
               "fp8-experts": WeightFormat(experts="fp8", expert_scale="f32", wo_a="plain"),
               "plain": WeightFormat.plain()}
    model = _model(tiny_config(), seed, formats[fmt])
    ffn = model.layer(0).mtp_block.ffn
    for e in range(2):
        w13, w2 = ffn.experts.expert_weights(e)
        assert w13.shape == (256, 256) and w2.shape == (256, 128)
        assert torch.isfinite(w13).all() and torch.isfinite(w2).all()


@given(seed=seeds, func=st.sampled_from(["sqrtsoftplus", "sigmoid", "softmax"]),
       experts=st.integers(2, 12), top_k=st.integers(1, 4), t=st.integers(1, 4))
def test_route_every_scoring_func(seed, func, experts, top_k, t):
    """The spec's routing for each scoring function, computed row by row in float64 here
    (tests/reference.py covers the released sqrtsoftplus only): bias picks, unbiased scores
    weigh, renormalised except for softmax, times routed_scaling_factor."""
    import math

    top_k = min(top_k, experts)
    u, gate = randn(t, 16, seed=seed), randn(experts, 16, seed=seed + 1)
    bias = randn(experts, seed=seed + 2, scale=0.3)
    idx, w = ops.route(u, gate, bias, top_k, func, 2.5)
    for i in range(t):
        logits = [float(u[i] @ gate[e]) for e in range(experts)]
        if func == "softmax":
            z = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / z for v in logits]
        elif func == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            scores = [math.sqrt(math.log1p(math.exp(v))) for v in logits]
        chosen = sorted(range(experts), key=lambda e: -(scores[e] + float(bias[e])))[:top_k]
        assert sorted(idx[i].tolist()) == sorted(chosen)
        picked = [scores[e] for e in idx[i].tolist()]
        total = 1.0 if func == "softmax" else sum(picked)
        expected = torch.tensor([s / total * 2.5 for s in picked], dtype=F64)
        assert rel_err(w[i], expected) < TIGHT

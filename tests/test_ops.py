"""Each piece of the MTP math against the independent float64 reference (tests/reference.py),
on tiny configs and inputs drawn by hypothesis. The module runs in float64 here (the same code
as in float32/bf16), so any disagreement beyond float64 rounding is a bug in the math, not
precision: tolerances are 1e-12 relative unless stated."""

from __future__ import annotations

import pytest
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


# ---- the module's ops, per backend -------------------------------------------------------------
BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="the triton backend runs on CUDA only")),
]
OPS_TOL = 1e-5  # float32 against float64, tiny shapes: accumulation order and precision only


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_ops_match_the_float64_reference(backend):
    """Each op the forward is written in, for each backend, in float32 with the rounding steps
    off (those are compared bit for bit per kernel in tests/test_kernels.py), against
    ``ReferenceOps`` in float64 on the same weights and the same inputs: the backend's units
    one by one, including the cross-op hints (hc_post's mix partials for the next hc_pre, the
    MoE's unreduced output summed by hc_post, the head's partials). 3 rows: few enough for the
    triton backend's partials path."""
    from conftest import tiny_config

    from mtp.cache import KVCache, window_index

    dev = "cuda" if backend == "triton" else "cpu"
    cfg = tiny_config()
    num = Numerics(act_quant=False, kv_fp8=False)
    src = init_random_(DeepSeekV4MTP(cfg, numerics=num), seed=3)
    m = DeepSeekV4MTP(cfg, numerics=num, device=dev, backend=backend)
    m64 = DeepSeekV4MTP(cfg, numerics=num, dtype=F64, backend="reference")
    m.load_state_dict(src.state_dict())
    m64.load_state_dict(src.state_dict())
    op, r = m.ops, ops.REFERENCE
    assert op.name == backend
    L, L64 = m.layer(0), m64.layer(0)
    B, B64 = L.mtp_block, L64.mtp_block
    A, A64 = B.attn, B64.attn
    t, mm, d, eps = 3, cfg.hc_mult, cfg.hidden_size, cfg.rms_norm_eps
    g = torch.Generator().manual_seed(0)

    def pair(*shape, scale=1.0):  # the same values, on the backend's device in fp32 and f64
        x = torch.randn(*shape, generator=g) * scale
        return x.to(dev), x.to(F64)

    def close(a, b, what):
        a = [a] if isinstance(a, torch.Tensor) else a
        b = [b] if isinstance(b, torch.Tensor) else b
        for x, y in zip(a, b):
            assert rel_err(x.cpu(), y) < OPS_TOL, what

    ids = torch.randint(0, cfg.vocab_size, (t,), generator=g)
    pos = torch.arange(20, 20 + t)
    h, h64 = pair(t, mm, d)
    emb = dict(dtype=torch.float32, zero_pos0=False)
    close(op.embed_norms(ids.to(dev), None, pos.to(dev), m.model.embed_tokens.weight, h,
                         L.enorm.weight, L.hnorm.weight, eps, **emb),
          r.embed_norms(ids, None, pos, m64.model.embed_tokens.weight, h64, L64.enorm.weight,
                        L64.hnorm.weight, eps, **{**emb, "dtype": F64}), "embed_norms")
    (en, en64), (hn, hn64) = pair(t, d), pair(t, mm, d)
    x_in, parts_in = op.input_proj(en, hn, L.e_proj, L.h_proj, False, mix_fn=B.hc_attn_fn)
    x_in64, none = r.input_proj(en64, hn64, L64.e_proj, L64.h_proj, False)
    assert none is None
    close(x_in, x_in64, "input_proj")
    hc = (cfg.hc_sinkhorn_iters, cfg.hc_eps, eps)
    close(op.hc_pre_norm(x_in, B.hc_attn_fn, B.hc_attn_scale, B.hc_attn_base,
                         B.attn_norm.weight, *hc, partials=parts_in)[:3],
          r.hc_pre_norm(x_in.cpu().to(F64), B64.hc_attn_fn, B64.hc_attn_scale, B64.hc_attn_base,
                        B64.attn_norm.weight, *hc)[:3], "hc_pre_norm with input_proj's partials")
    x, x64 = pair(t, mm, d)
    u, post, comb, _ = op.hc_pre_norm(x, B.hc_attn_fn, B.hc_attn_scale, B.hc_attn_base,
                                      B.attn_norm.weight, *hc)
    u64, post64, comb64, _ = r.hc_pre_norm(x64, B64.hc_attn_fn, B64.hc_attn_scale,
                                           B64.hc_attn_base, B64.attn_norm.weight, *hc)
    close([u, post, comb], [u64, post64, comb64], "hc_pre_norm")
    a, a64 = pair(t, d)
    y, parts = op.hc_post(a, x, post64.float().to(dev), comb64.float().to(dev),
                          mix_fn=B.hc_ffn_fn)
    y64, _ = r.hc_post(a64, x64, post64, comb64)
    close(y, y64, "hc_post")
    close(op.hc_pre_norm(y64.float().to(dev), B.hc_ffn_fn, B.hc_ffn_scale, B.hc_ffn_base,
                         B.ffn_norm.weight, *hc, partials=parts)[:3],
          r.hc_pre_norm(y64, B64.hc_ffn_fn, B64.hc_ffn_scale, B64.hc_ffn_base,
                        B64.ffn_norm.weight, *hc)[:3], "hc_pre_norm with hc_post's partials")
    # attention: prep, q, the window (stateless and a decode step over a cache), wo_a
    fused, fused64 = pair(t, cfg.q_lora_rank + cfg.head_dim)
    inv, inv64 = m._rope_inv_freq(torch.device(dev)), m64._rope_inv_freq(torch.device("cpu"))
    got = op.attn_prep(fused, A.q_norm.weight, A.kv_norm.weight, pos.to(dev), inv, eps,
                       kv_fp8=False, kv_dtype=torch.float32)
    want = r.attn_prep(fused64, A64.q_norm.weight, A64.kv_norm.weight, pos, inv64, eps,
                       kv_fp8=False, kv_dtype=F64)
    close(got, want, "attn_prep")
    cos, sin = got[2], got[3]
    cos64, sin64 = want[2], want[3]
    hh, dh = A.heads, cfg.head_dim
    q, q64 = pair(t, hh, dh)
    close(op.q_prep(q.clone(), cos, sin, eps), r.q_prep(q64, cos64, sin64, eps), "q_prep")
    kv, kv64 = pair(t, dh)
    win = window_index(pos, torch.zeros_like(pos), cfg.sliding_window, None, t)
    win_dev = type(win)(*(v.to(dev) for v in vars(win).values()))
    kw = dict(window=cfg.sliding_window, cache_layer=0, seq_slots=None)
    close(op.attend(q, kv, A.attn_sink, cos, sin, pos.to(dev), cache=None, index=win_dev, **kw),
          r.attend(q64, kv64, A64.attn_sink, cos64, sin64, pos, cache=None, index=win, **kw),
          "attend")
    cap = cfg.sliding_window + 3
    caches = [KVCache(1, 3, cap, dh, dtype=dt, device=dv) for dt, dv in
              ((torch.float32, dev), (F64, "cpu"))]
    ring, _ = pair(1, 3, cap, dh)
    for c, v in zip(caches, (ring, ring.to(F64).cpu())):
        c.kv.copy_(v.to(c.kv.dtype))
        held = torch.arange(20 - cap, 20)  # 2 sequences, their rings full up to position 19
        c.pos[0, :2, held % cap] = held.to(c.pos.device)
    slots = torch.tensor([1, 0, -1])  # one row per sequence, the last a padding row
    kw = dict(window=cfg.sliding_window, cache_layer=0, index=None)
    o = op.attend(q, kv, A.attn_sink, cos, sin, pos.to(dev), cache=caches[0],
                  seq_slots=slots.to(dev), **kw)
    o64 = r.attend(q64, kv64, A64.attn_sink, cos64, sin64, pos, cache=caches[1],
                   seq_slots=slots, **kw)
    close([o[:2], caches[0].kv, caches[0].pos.double()],
          [o64[:2], caches[1].kv, caches[1].pos.double()], "attend, decode step")
    close(op.grouped_linear(q, A.wo_a, A.groups), r.grouped_linear(q64, A64.wo_a, A64.groups),
          "grouped_linear (wo_a)")
    close(op.linear(fused[:, :cfg.q_lora_rank], A.wq_b, False),
          r.linear(fused64[:, :cfg.q_lora_rank], A64.wq_b, False), "linear (wq_b)")
    # the MoE, summed by hc_post (the triton backend hands it over unreduced)
    u, u64 = pair(t, d)
    f = op.moe(u, None, B.ffn, cfg, False)
    f64 = r.moe(u64, None, B64.ffn, cfg, False)
    pc, pc64 = post64.float().to(dev), post64
    close(op.hc_post(f, x, pc, comb64.float().to(dev))[0], r.hc_post(f64, x64, pc64, comb64)[0],
          "moe + hc_post")
    # the head, with and without the partials of the hc_post before it
    hd = (L.hc_head_fn, L.hc_head_scale, L.hc_head_base, L.shared_head.norm.weight,
          L.shared_head.head.weight, cfg.hc_eps, eps)
    hd64 = (L64.hc_head_fn, L64.hc_head_scale, L64.hc_head_base, L64.shared_head.norm.weight,
            L64.shared_head.head.weight, cfg.hc_eps, eps)
    close(op.head(x, *hd), r.head(x64, *hd64), "head")
    y, parts = op.hc_post(a, x, pc, comb64.float().to(dev), mix_fn=L.hc_head_fn)
    close(op.head(y, *hd, partials=parts), r.head(r.hc_post(a64, x64, pc64, comb64)[0], *hd64),
          "head with hc_post's partials")


@pytest.mark.parametrize("layout", ["decode", "window"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_write_keys_puts_each_row_in_its_ring_entry(backend, layout):
    """``write_keys`` (the keys of rows whose outputs nobody reads): each written row's KV and
    position land in entry ``slot * C + p % C`` of the layer, bit for bit, and nothing else
    changes. Decode layout: every row with a slot >= 0 (-1: padding, nothing); window layout:
    each run's last C rows (``window_index``'s ``write_rows``). The expectation is written
    out entry by entry here."""
    from conftest import tiny_config

    from mtp.cache import KVCache, window_index

    dev = "cuda" if backend == "triton" else "cpu"
    cfg = tiny_config()
    m = DeepSeekV4MTP(cfg, device=dev, backend=backend) if backend == "triton" else None
    op = m.ops if m is not None else ops.REFERENCE
    cap, dh = 5, cfg.head_dim
    if layout == "decode":  # two sequences of 2 and 1 rows and a padding row
        slots, pos = torch.tensor([2, 2, 0, -1]), torch.tensor([8, 9, 3, 0])
        written = [0, 1, 2]
    else:  # runs of 7 rows (its last 5 are kept) and 2 rows
        slots = torch.tensor([1] * 7 + [0] * 2)
        pos = torch.cat((torch.arange(10, 17), torch.arange(30, 32)))
        written = [2, 3, 4, 5, 6, 7, 8]
    t = len(pos)
    kv = torch.randn(t, dh, generator=torch.Generator().manual_seed(1))
    cache = KVCache(2, 3, cap, dh, device=dev)
    cache.kv.normal_(generator=torch.Generator(device=dev).manual_seed(2))
    cache.pos[:, :, 1] = 77  # entries already held: kept unless a row lands there
    want_kv, want_pos = cache.kv.clone().cpu(), cache.pos.clone().cpu()
    for row in written:
        s, p = int(slots[row]), int(pos[row])
        want_kv[1, s, p % cap] = kv[row]
        want_pos[1, s, p % cap] = p
    index = (window_index(pos, slots, cfg.sliding_window, cache.pos[1].cpu(), cap)
             if layout == "window" else None)
    if index is not None:
        index = type(index)(*(v.to(dev) for v in vars(index).values()))
    op.write_keys(kv.to(dev), pos.to(dev), cache=cache, cache_layer=1, index=index,
                  seq_slots=slots.to(dev))
    assert torch.equal(cache.kv.cpu(), want_kv) and torch.equal(cache.pos.cpu(), want_pos)

"""The whole MTP layer (forward + logits) against the independent float64 reference, plus the
module's contract: formats, dtypes, layer selection, options and input checks."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from conftest import checkpoint_formats, checkpoint_weights, rel_err, small_configs, tiny_config
from hypothesis import given
from hypothesis import strategies as st

from mtp import DeepSeekV4MTP, MTPConfig, Numerics, WeightFormat
from mtp.testing import dequantized_copy, init_random_

seeds = st.integers(0, 2**31 - 1)
FORMATS = {
    "released": WeightFormat.released(),
    "base": WeightFormat(experts="fp8", expert_scale="f32"),  # -Base: FP8 experts, F32 scales
    "converter": WeightFormat(wo_a="plain"),  # reference convert.py: wo_a dequantised to bf16
    "plain": WeightFormat.plain(),
}


def make(cfg, seed=0, dtype=torch.float32, fmt="released", **numerics):
    model = DeepSeekV4MTP(cfg, dtype=dtype, weight_format=FORMATS[fmt],
                          numerics=Numerics(**numerics))
    return init_random_(model, seed=seed)


def rows(cfg, t, seed, start=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(t, cfg.hc_dim, generator=gen)
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=gen)
    return ids, torch.arange(start, start + t), h


@given(cfg=small_configs(), seed=seeds, t=st.integers(1, 14), start=st.integers(0, 3000),
       fmt=st.sampled_from(sorted(FORMATS)), act_quant=st.booleans(), kv_fp8=st.booleans())
def test_float64_mode_matches_the_spec_reference(cfg, seed, t, start, fmt, act_quant, kv_fp8):
    """The module's own code in float64, every rounding step on or off: equal to the float64
    reference up to float64 rounding (the FP8 steps see identical inputs, so they round
    identically). 1e-11: ~1e-15 observed, the Sinkhorn loop and RoPE angles at p ~ 3000 add
    a little."""
    model = make(cfg, seed, torch.float64, fmt, act_quant=act_quant, kv_fp8=kv_fp8)
    ids, pos, h = rows(cfg, t, seed, start)
    x = model(ids, pos, h)
    weights = checkpoint_weights(model)
    expected = ref.mtp_layer(h.double(), ids, pos, weights, cfg, act_quant, kv_fp8,
                             formats=checkpoint_formats(model))
    assert rel_err(x, expected) < 1e-11
    assert rel_err(model.compute_logits(x), ref.mtp_logits(expected, weights, cfg)) < 1e-11


@given(cfg=small_configs(), seed=seeds, t=st.integers(1, 12), start=st.integers(0, 3000))
def test_float32_matches_the_spec_reference(cfg, seed, t, start):
    """float32 compute without the FP8 rounding steps (they would amplify float32 rounding by
    flipping single e4m3 steps, which float64 mode above covers). Observed ~5e-7; 1e-5 bounds
    float32 eps (1.2e-7) amplified by a dozen chained products and 20 Sinkhorn iterations."""
    model = make(cfg, seed, torch.float32, act_quant=False, kv_fp8=False)
    ids, pos, h = rows(cfg, t, seed, start)
    x = model(ids, pos, h)
    assert x.dtype == torch.float32
    weights = checkpoint_weights(model)
    expected = ref.mtp_layer(h.double(), ids, pos, weights, cfg, False, False)
    assert rel_err(x, expected) < 1e-5
    logits = model.compute_logits(x)
    assert logits.dtype == torch.float32
    assert rel_err(logits, ref.mtp_logits(expected, weights, cfg)) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_bfloat16_stays_close_to_the_reference(seed):
    """bf16 activations (8 mantissa bits) through the whole layer: a few 1e-3 relative."""
    cfg = tiny_config()
    model = make(cfg, seed, torch.bfloat16, act_quant=False, kv_fp8=False)
    ids, pos, h = rows(cfg, 12, seed)
    x = model(ids, pos, h)
    assert x.dtype == torch.bfloat16
    expected = ref.mtp_layer(h.double(), ids, pos, checkpoint_weights(model), cfg, False, False)
    assert rel_err(x, expected) < 2e-2


@pytest.mark.parametrize("kv_fp8", [False, True])
@pytest.mark.parametrize("fmt", ["released", "base", "converter"])
def test_quantized_equals_predequantized_bit_for_bit(fmt, kv_fp8):
    """float32: holding FP8/FP4 weights quantised or handing them in dequantised gives the same
    output to the last bit (dequantisation is exact and the products are the same) once the
    activation rounding is off. The dequantised copy is a plain checkpoint: it rounds no
    activations even with the switch on (the rounding follows each weight's stored format)."""
    cfg = tiny_config()
    model = make(cfg, 3, torch.float32, fmt, act_quant=False, kv_fp8=kv_fp8)
    plain = dequantized_copy(model)
    plain.numerics.act_quant = True
    ids, pos, h = rows(cfg, 10, 3)
    assert torch.equal(model(ids, pos, h), plain(ids, pos, h))
    x = model(ids, pos, h)
    assert torch.equal(model.compute_logits(x), plain.compute_logits(x))


def test_weights_stay_in_their_stored_format():
    model = DeepSeekV4MTP(MTPConfig.from_name("flash"), device="meta")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    blk = "model.layers.43.mtp_block."
    assert dtypes[blk + "attn.wq_b.weight"] == torch.float8_e4m3fn
    assert dtypes[blk + "attn.wq_b.weight_scale_inv"] == torch.float8_e8m0fnu
    assert dtypes[blk + "ffn.experts.w13_weight"] == torch.int8
    assert dtypes[blk + "ffn.experts.w13_weight_scale"] == torch.float8_e8m0fnu
    stored = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if "embed_tokens" not in n and "shared_head.head" not in n)
    # spec/checkpoint.md: the MTP payload is 3,593,787,756 bytes; our fp32 norm weights add
    # 2 bytes per element of the 7 bf16 norms (D*5 + Q + Dh).
    cfg = model.config
    norm_extra = 2 * (5 * cfg.hidden_size + cfg.q_lora_rank + cfg.head_dim)
    # The gate weight is held in float32 too (the reference computes it in float32).
    gate_extra = 2 * cfg.n_routed_experts * cfg.hidden_size
    assert stored == 3_593_787_756 + norm_extra + gate_extra


def test_spec_step_idx_picks_layer_modulo_n_mtp():
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_compress_ratios=(0, 0))
    model = make(cfg, 1, torch.float64)
    ids, pos, h = rows(cfg, 5, 1)
    outs = [model(ids, pos, h, spec_step_idx=s) for s in range(3)]
    assert torch.equal(outs[0], outs[2]) and not torch.allclose(outs[0], outs[1])
    expected = ref.mtp_layer(h.double(), ids, pos, checkpoint_weights(model, 1), cfg,
                             prefix="mtp.1.")
    assert rel_err(outs[1], expected) < 1e-11
    assert model.layer(1) is model.model.layers[str(cfg.num_hidden_layers + 1)]
    # one head tensor shared by every layer
    assert model.layer(0).shared_head.head.weight is model.layer(1).shared_head.head.weight


def test_zero_embed_at_position_zero_is_vllms_option():
    cfg = tiny_config()
    default = make(cfg, 2)
    masked = make(cfg, 2, zero_embed_at_pos0=True)
    ids, pos, h = rows(cfg, 4, 2)
    e = default.embed_input_ids(ids)
    e[0] = 0
    assert torch.equal(masked(ids, pos, h), default(None, pos, h, inputs_embeds=e))
    assert not torch.equal(masked(ids, pos, h), default(ids, pos, h))
    # away from position 0 the option changes nothing
    assert torch.equal(masked(ids, pos + 7, h), default(ids, pos + 7, h))


def test_shared_embedding_and_head_are_not_copied():
    cfg = tiny_config()
    embed = torch.randn(cfg.vocab_size, cfg.hidden_size)
    head = torch.randn(cfg.vocab_size, cfg.hidden_size)
    model = DeepSeekV4MTP(cfg, embed_tokens=embed, head=head)
    assert model.model.embed_tokens.weight.data_ptr() == embed.data_ptr()
    assert model.layer(0).shared_head.head.weight.data_ptr() == head.data_ptr()
    with pytest.raises(ValueError, match=r"head: expected shape \[vocab_size, hidden_size\] = "
                                         r"\[1024, 256\], got \[1024, 255\]"):
        DeepSeekV4MTP(cfg, head=head[:, :255])


@pytest.mark.parametrize("given", [("embed_tokens",), ("head",), ("embed_tokens", "head")])
def test_init_random_never_overwrites_a_callers_tensor(given):
    """Before: init_random_ drew random values into the caller's embedding/head (shared
    storage: the target's own tables)."""
    cfg = tiny_config()
    tables = {n: torch.randn(cfg.vocab_size, cfg.hidden_size) for n in given}
    before = {n: t.clone() for n, t in tables.items()}
    model = DeepSeekV4MTP(cfg, **tables)
    assert model.shared_with_caller == set(given)
    param = {"embed_tokens": "model.embed_tokens.weight",
             "head": "model.layers.2.shared_head.head.weight"}[given[0]]
    with torch.no_grad():
        model.layer(0).hnorm.weight.fill_(7.0)
    with pytest.raises(ValueError, match=rf"init_random_: {param} is the caller's tensor "
                                         rf"\(passed as {given[0]}=.*skip_shared=True"):
        init_random_(model, seed=0)
    assert (model.layer(0).hnorm.weight == 7.0).all()  # refused before any write
    init_random_(model, seed=0, skip_shared=True)
    assert not (model.layer(0).hnorm.weight == 7.0).any()  # its own parameters filled
    for n, t in tables.items():
        assert torch.equal(t, before[n]), n  # the caller's values, untouched
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())


@pytest.mark.parametrize("call,error,match", [
    (lambda m, ids, pos, h: m(ids, pos, h[:, :256]), ValueError,
     r"hidden_states: expected \[6, hc_mult\*hidden_size\] = \[6, 1024\], got shape \[6, 256\]"),
    (lambda m, ids, pos, h: m(ids[:5], pos, h), ValueError,
     r"input_ids has 5 rows but positions has 6"),
    (lambda m, ids, pos, h: m(ids, pos, h[:5]), ValueError,
     r"hidden_states: expected \[6, hc_mult\*hidden_size\]"),
    (lambda m, ids, pos, h: m(ids + 1024, pos, h), ValueError,
     r"input_ids: token id \d{4} is outside the vocabulary \[0, 1024\)"),
    (lambda m, ids, pos, h: m(ids, pos, h, spec_step_idx=-1), ValueError,
     r"spec_step_idx: expected a non-negative int, got -1"),
    (lambda m, ids, pos, h: m(ids, pos, h.long()), TypeError,
     r"hidden_states: expected a floating-point tensor, got torch.int64"),
    (lambda m, ids, pos, h: m(ids.float(), pos, h), TypeError,
     r"input_ids: expected int64 or int32 token ids, got torch.float32"),
    (lambda m, ids, pos, h: m(ids, pos.flip(0), h), ValueError,
     r"positions: without a kv_cache the rows form one sequence and need consecutive"),
    (lambda m, ids, pos, h: m(ids, pos - 3, h), ValueError, r"positions: must be >= 0"),
    (lambda m, ids, pos, h: m.compute_logits(h[:, :100]), ValueError,
     r"hidden_states: expected \[T, hc_mult\*hidden_size\] = \[T, 1024\]"),
    (lambda m, ids, pos, h: m(ids, pos, h, inputs_embeds=torch.zeros(6, 3)), ValueError,
     r"inputs_embeds: expected \[6, 256\], got shape \[6, 3\]"),
])
def test_bad_input_is_refused_with_a_clear_error(call, error, match):
    cfg = tiny_config()
    model = make(cfg)
    ids, pos, h = rows(cfg, 6, 0)
    with pytest.raises(error, match=match):
        call(model, ids, pos, h)


def test_bad_dtype_is_refused():
    with pytest.raises(TypeError, match=r"dtype: expected one of"):
        DeepSeekV4MTP(tiny_config(), dtype=torch.float16)


def test_two_shared_experts_widen_the_shared_expert():
    """n_shared_experts = N: one shared expert of width N * moe_intermediate_size (the V3/V4
    convention; both V4 releases have N = 1)."""
    cfg = tiny_config(n_shared_experts=2)
    model = make(cfg, 4, torch.float64)
    assert model.layer(0).mtp_block.ffn.shared_experts.down_proj.weight.shape == (256, 256)
    ids, pos, h = rows(cfg, 6, 4)
    expected = ref.mtp_layer(h.double(), ids, pos, checkpoint_weights(model), cfg)
    assert rel_err(model(ids, pos, h), expected) < 1e-11


@pytest.mark.parametrize("layout", ["release", "mp"])
def test_bf16_checkpoint_rounds_no_activations_but_the_kv(tmp_path, layout):
    """A checkpoint stored in bf16 (converted, fine-tuned or re-exported drafters), written by
    mtp.export and read by the real loader: the reference rounds a product's input to FP8 only
    where the weight is FP8/FP4, so nothing here is rounded but the cached KV (unconditional).
    float64 compute with the default numerics, against the float64 reference told that every
    weight is bf16: 1e-11 as in the hypothesis test above (~1e-15 observed); the old behaviour
    (rounding every product) was ~1e-1 off."""
    from mtp.export import write_checkpoint
    from mtp.loader import load_model

    cfg = tiny_config()
    bf16 = make(cfg, 5, torch.bfloat16, "plain")
    write_checkpoint(bf16, tmp_path, **({"layout": "mp", "mp": 2} if layout == "mp" else {}))
    model, report = load_model(tmp_path, dtype=torch.float64)
    assert report.weight_format == WeightFormat.plain()
    assert model.numerics == Numerics()  # act_quant and kv_fp8 on: the defaults
    formats = dict.fromkeys(checkpoint_formats(bf16), "bf16")
    assert set(checkpoint_formats(bf16).values()) == {"bf16"}
    ids, pos, h = rows(cfg, 9, 5)
    x = model(ids, pos, h)
    weights = checkpoint_weights(model)
    expected = ref.mtp_layer(h.double(), ids, pos, weights, cfg, formats=formats)
    assert rel_err(x, expected) < 1e-11
    assert rel_err(model.compute_logits(x), ref.mtp_logits(expected, weights, cfg)) < 1e-11
    # the KV's FP8 simulation still applies to a bf16 checkpoint (it moves the output)
    no_kv = ref.mtp_layer(h.double(), ids, pos, weights, cfg, kv_fp8=False, formats=formats)
    assert rel_err(x, no_kv) > 1e-4

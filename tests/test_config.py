"""MTPConfig: presets carry the spec's values, config.json reads, validation names the key."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtp import MTPConfig
from mtp.config import KEY_RANGES

# Values from spec/architecture.md, "Notation" (V4-Flash / V4-Pro config.json).
SPEC = {
    "hidden_size": (4096, 7168), "vocab_size": (129280, 129280), "num_hidden_layers": (43, 61),
    "num_nextn_predict_layers": (1, 1), "num_attention_heads": (64, 128), "head_dim": (512, 512),
    "qk_rope_head_dim": (64, 64), "q_lora_rank": (1024, 1536), "o_groups": (8, 16),
    "o_lora_rank": (1024, 1024), "sliding_window": (128, 128), "n_routed_experts": (256, 384),
    "num_experts_per_tok": (6, 6), "moe_intermediate_size": (2048, 3072),
    "n_shared_experts": (1, 1), "scoring_func": ("sqrtsoftplus", "sqrtsoftplus"),
    "routed_scaling_factor": (1.5, 2.5), "swiglu_limit": (10.0, 10.0), "hc_mult": (4, 4),
    "hc_sinkhorn_iters": (20, 20), "hc_eps": (1e-6, 1e-6), "rms_norm_eps": (1e-6, 1e-6),
    "rope_theta": (10000, 10000),
}


@pytest.mark.parametrize("name,column", [("flash", 0), ("pro", 1)])
def test_presets_match_spec(name, column):
    cfg = MTPConfig.from_name(name)
    for key, values in SPEC.items():
        assert getattr(cfg, key) == values[column], key
    assert cfg.mtp_compress_ratios == (0,)
    assert cfg.mtp_layer_ids == (SPEC["num_hidden_layers"][column],)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown preset 'flsh'.*\['flash', 'pro', 'tiny'\]"):
        MTPConfig.from_name("flsh")


def _flash_json(**changes):
    raw = {k: v[0] for k, v in SPEC.items()}
    raw["compress_ratios"] = [0, 0] + [4, 128] * 20 + [4, 0]  # 43 main layers + 1 MTP entry
    raw.update(changes)
    return raw


def test_from_pretrained_reads_hf_config(tmp_path):
    raw = _flash_json(architectures=["DeepseekV4ForCausalLM"], tie_word_embeddings=False)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert MTPConfig.from_pretrained(tmp_path) == MTPConfig.from_name("flash")
    assert MTPConfig.from_pretrained(tmp_path / "config.json") == MTPConfig.from_name("flash")


def test_reference_keys_translate():
    raw = {"dim": 7168, "vocab_size": 129280, "n_layers": 61, "n_mtp_layers": 1, "n_heads": 128,
           "head_dim": 512, "rope_head_dim": 64, "q_lora_rank": 1536, "o_groups": 16,
           "o_lora_rank": 1024, "window_size": 128, "n_routed_experts": 384,
           "n_activated_experts": 6, "moe_inter_dim": 3072, "score_func": "sqrtsoftplus",
           "route_scale": 2.5, "norm_eps": 1e-6}
    assert MTPConfig.from_dict(raw) == MTPConfig.from_name("pro")


def test_to_dict_round_trips():
    cfg = MTPConfig.from_name("tiny")
    assert MTPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("change,match", [
    ({"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 4]},
     r"compress_ratios: MTP layer 0 \(entry 43\) asks for compress ratio 4"),
    ({"compress_ratios": [0] * 10}, r"compress_ratios has 10 entries; expected .* 44"),
    ({"hidden_size": 4000}, r"hidden_size: 4000 is not a multiple of 128"),
    ({"q_lora_rank": 1000}, r"q_lora_rank: 1000 is not a multiple of 128"),
    ({"moe_intermediate_size": 2000}, r"moe_intermediate_size: 2000 is not a multiple of 128"),
    ({"qk_rope_head_dim": 96}, r"head_dim - qk_rope_head_dim = 416 is not a multiple of 64"),
    ({"qk_rope_head_dim": 63}, r"qk_rope_head_dim: must be even"),
    ({"o_groups": 7}, r"o_groups: 7 does not divide num_attention_heads=64"),
    ({"num_experts_per_tok": 300}, r"num_experts_per_tok: 300 > n_routed_experts=256"),
    ({"scoring_func": "relu"}, r"scoring_func: 'relu' is not one of"),
    ({"num_nextn_predict_layers": 0}, r"has no MTP layer"),
    ({"dspark_num_blocks": 3}, r"DSpark drafter"),
    ({"num_attention_heads": 0},
     r"num_attention_heads: 0 is out of range; expected an integer in \[1, 4096\]"),
])
def test_validation_names_the_key(change, match):
    with pytest.raises(ValueError, match=match):
        MTPConfig.from_dict(_flash_json(**change))


def test_missing_required_key():
    raw = _flash_json()
    del raw["head_dim"]
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['head_dim'\]"):
        MTPConfig.from_dict(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MTPConfig.from_pretrained(tmp_path)


@given(d=st.integers(1, 8), heads=st.sampled_from([1, 2, 4, 8]), nope_blocks=st.integers(1, 8),
       half_rope=st.integers(1, 64), groups=st.sampled_from([1, 2, 4]),
       experts=st.integers(1, 16), window=st.integers(1, 256))
def test_any_format_consistent_dims_are_valid(d, heads, nope_blocks, half_rope, groups, experts,
                                              window):
    """Not only the released shapes: any dims that respect the 128/64 blocks build."""
    head_dim = 64 * nope_blocks + 2 * half_rope  # non-RoPE part: whole 64-blocks for the KV FP8
    groups = groups if heads % groups == 0 else 1
    cfg = MTPConfig(hidden_size=128 * d, num_attention_heads=heads, head_dim=head_dim,
                    qk_rope_head_dim=2 * half_rope, q_lora_rank=128, o_groups=groups,
                    o_lora_rank=128, n_routed_experts=experts,
                    num_experts_per_tok=min(6, experts), moe_intermediate_size=128,
                    sliding_window=window)
    assert cfg.hc_dim == 4 * 128 * d
    assert cfg.o_group_in * groups == heads * head_dim
    assert cfg.nope_head_dim == 64 * nope_blocks


# ---- types and ranges, per key, before anything is sized from them ------------------------
@pytest.mark.parametrize("key,value,match", [
    ("sliding_window", 1e12, r"sliding_window: 1000000000000.0 has type float; expected an "
                             r"integer in \[1, 1.04858e\+06\]"),
    ("sliding_window", 10**12, r"sliding_window: 1000000000000 is out of range"),
    ("hc_sinkhorn_iters", 1e9, r"hc_sinkhorn_iters: 1000000000.0 has type float"),
    ("hc_sinkhorn_iters", 10**9, r"hc_sinkhorn_iters: 1000000000 is out of range; expected an "
                                 r"integer in \[1, 1000\]"),
    ("vocab_size", 2**70, r"vocab_size: 1180591620717411303424 is out of range"),
    ("hc_mult", 10**6, r"hc_mult: 1000000 is out of range; expected an integer in \[1, 64\]"),
    ("hidden_size", 4096.0, r"hidden_size: 4096.0 has type float; expected an integer"),
    ("num_attention_heads", None, r"num_attention_heads: None has type NoneType"),
    ("o_groups", True, r"o_groups: True has type bool"),
    ("rope_theta", "1e4", r"rope_theta: '1e4' has type str; expected a number in \(0, 1e\+12\] "
                          r"\(write it without quotes\)"),
    ("rope_theta", 0, r"rope_theta: 0 is out of range; expected a number in \(0, 1e\+12\]"),
    ("rope_theta", -1e4, r"rope_theta: -10000.0 is out of range"),
    ("rms_norm_eps", -1e-6, r"rms_norm_eps: -1e-06 is out of range; expected a number in "
                            r"\(0, 0.5\]"),
    ("hc_eps", float("nan"), r"hc_eps: nan is not finite"),
    ("routed_scaling_factor", float("inf"), r"routed_scaling_factor: inf is not finite"),
    ("num_nextn_predict_layers", 1.0, r"num_nextn_predict_layers: 1.0 has type float"),
    ("num_hidden_layers", "43", r"num_hidden_layers: '43' has type str"),
    ("compress_ratios", "0", r"compress_ratios: expected a list, got str"),
])
def test_types_and_ranges_name_key_value_and_range(key, value, match):
    with pytest.raises(ValueError, match=match):
        MTPConfig.from_dict(_flash_json(**{key: value}))


BAD_VALUES = st.one_of(st.none(), st.booleans(), st.text(max_size=4),
                       st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-2**80, 2**80), st.lists(st.integers(), max_size=2))


@given(key=st.sampled_from(sorted(KEY_RANGES)), value=BAD_VALUES)
def test_any_value_is_either_accepted_or_refused_naming_the_key(key, value):
    """Never a raw TypeError / OverflowError from deeper code: a ValueError naming the key (or a
    relation between keys), or a valid config."""
    try:
        cfg = MTPConfig.from_dict(_flash_json(**{key: value}))
    except ValueError as e:
        assert "MTPConfig." in str(e) or "config" in str(e), e
    else:
        assert getattr(cfg, key) == value

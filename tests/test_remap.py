"""The remap table: one case per rule, the seed's known failure, the full Flash and Pro name
lists on the meta device, hypothesis properties, and the generated docs."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mtp import DeepSeekV4MTP, MTPConfig, WeightFormat, remap
from mtp.remap import RULES, Target, UnknownTensorError, explain, match, resolve
from mtp.surgery import overlaps, region_numel

DATA = Path(__file__).resolve().parent / "data"  # the release name lists: data/README.md
DOCS = Path(__file__).resolve().parent.parent / "docs" / "remap-rules.md"
FLASH2 = MTPConfig(**{**MTPConfig.from_name("flash").__dict__, "num_nextn_predict_layers": 2,
                      "mtp_compress_ratios": (0, 0)})  # N = 43: MTP layers 43 and 44
BASE = WeightFormat(experts="fp8", expert_scale="f32")
B43 = "model.layers.43.mtp_block."
DROP, REFUSE = "drop", "refuse"

# (checkpoint name, weight format, expected (param, shard, expert) / DROP / REFUSE, rule)
CASES = [
    ("embed.weight", None, ("model.embed_tokens.weight", None, None), "embed"),
    ("model.embed.weight", None, ("model.embed_tokens.weight", None, None), "embed"),
    ("head.weight", None, ("model.layers.43.shared_head.head.weight", None, None), "head"),
    ("mtp.0.emb.tok_emb.weight", None, ("model.embed_tokens.weight", None, None), "mtp.emb"),
    ("mtp.1.emb.tok_emb.weight", None, DROP, "mtp.emb.copy"),
    ("mtp.0.head.weight", None, ("model.layers.43.shared_head.head.weight", None, None),
     "mtp.head"),
    ("mtp.1.head.weight", None, DROP, "mtp.head.copy"),
    ("mtp.1.norm.weight", None, ("model.layers.44.shared_head.norm.weight", None, None), "norm"),
    ("mtp.0.enorm.weight", None, ("model.layers.43.enorm.weight", None, None), "enorm.hnorm"),
    ("mtp.1.hnorm.weight", None, ("model.layers.44.hnorm.weight", None, None), "enorm.hnorm"),
    ("mtp.0.e_proj.weight", None, ("model.layers.43.e_proj.weight", None, None), "proj"),
    ("mtp.0.h_proj.scale", None, ("model.layers.43.h_proj.weight_scale_inv", None, None),
     "proj.scale"),
    ("mtp.0.e_proj.weight_scale_inv", None,
     ("model.layers.43.e_proj.weight_scale_inv", None, None), "proj.scale"),
    ("mtp.0.e_proj.weight_scale", None,  # AMD Quark's spelling
     ("model.layers.43.e_proj.weight_scale_inv", None, None), "proj.scale"),
    ("mtp.0.hc_head_fn", None, ("model.layers.43.hc_head_fn", None, None), "hc_head"),
    ("mtp.1.hc_head_scale", None, ("model.layers.44.hc_head_scale", None, None), "hc_head"),
    ("mtp.0.attn_norm.weight", None, (B43 + "attn_norm.weight", None, None), "block.norms"),
    ("mtp.0.hc_ffn_base", None, (B43 + "hc_ffn_base", None, None), "block.hc"),
    ("mtp.0.attn.wq_a.weight", None, (B43 + "attn.fused_wqa_wkv.weight", 0, None), "attn.wq_a"),
    ("mtp.0.attn.wq_a.scale", None, (B43 + "attn.fused_wqa_wkv.weight_scale_inv", 0, None),
     "attn.wq_a.scale"),
    ("mtp.0.attn.wkv.weight", None, (B43 + "attn.fused_wqa_wkv.weight", 1, None), "attn.wkv"),
    ("model.mtp.0.attn.wkv.scale", None,
     (B43 + "attn.fused_wqa_wkv.weight_scale_inv", 1, None), "attn.wkv.scale"),
    ("mtp.0.attn.wq_b.weight", None, (B43 + "attn.wq_b.weight", None, None), "attn.proj"),
    ("mtp.0.attn.wo_a.weight", None, (B43 + "attn.wo_a.weight", None, None), "attn.proj"),
    ("mtp.0.attn.wo_b.scale", None, (B43 + "attn.wo_b.weight_scale_inv", None, None),
     "attn.proj.scale"),
    ("mtp.0.attn.kv_norm.weight", None, (B43 + "attn.kv_norm.weight", None, None),
     "attn.norms"),
    ("mtp.0.attn.attn_sink", None, (B43 + "attn.attn_sink", None, None), "attn.attn_sink"),
    ("mtp.0.ffn.gate.weight", None, (B43 + "ffn.gate.weight", None, None), "ffn.gate"),
    ("mtp.0.ffn.gate.bias", None, (B43 + "ffn.gate.e_score_correction_bias", None, None),
     "ffn.gate.bias"),
    ("mtp.0.ffn.shared_experts.w1.weight", None,
     (B43 + "ffn.shared_experts.gate_up_proj.weight", 0, None), "shared.w1"),
    ("mtp.0.ffn.shared_experts.w1.scale", None,
     (B43 + "ffn.shared_experts.gate_up_proj.weight_scale_inv", 0, None), "shared.w1.scale"),
    ("mtp.0.ffn.shared_experts.w3.weight", None,
     (B43 + "ffn.shared_experts.gate_up_proj.weight", 1, None), "shared.w3"),
    ("mtp.0.ffn.shared_experts.w3.scale", None,
     (B43 + "ffn.shared_experts.gate_up_proj.weight_scale_inv", 1, None), "shared.w3.scale"),
    ("mtp.0.ffn.shared_experts.w2.weight", None,
     (B43 + "ffn.shared_experts.down_proj.weight", None, None), "shared.w2"),
    ("mtp.0.ffn.shared_experts.w2.scale", None,
     (B43 + "ffn.shared_experts.down_proj.weight_scale_inv", None, None), "shared.w2.scale"),
    ("mtp.0.ffn.experts.255.w1.weight", None, (B43 + "ffn.experts.w13_weight", 0, 255),
     "experts.w1"),
    ("mtp.1.ffn.experts.0.w3.weight", None,
     ("model.layers.44.mtp_block.ffn.experts.w13_weight", 1, 0), "experts.w3"),
    ("mtp.0.ffn.experts.17.w2.weight", None, (B43 + "ffn.experts.w2_weight", None, 17),
     "experts.w2"),
    ("mtp.0.ffn.experts.3.w1.scale", None, (B43 + "ffn.experts.w13_weight_scale", 0, 3),
     "experts.w1.scale.fp4"),
    ("mtp.0.ffn.experts.3.w3.scale", None, (B43 + "ffn.experts.w13_weight_scale", 1, 3),
     "experts.w3.scale.fp4"),
    ("mtp.0.ffn.experts.3.w2.scale", None, (B43 + "ffn.experts.w2_weight_scale", None, 3),
     "experts.w2.scale.fp4"),
    ("mtp.0.ffn.experts.3.w1.scale", BASE, (B43 + "ffn.experts.w13_weight_scale_inv", 0, 3),
     "experts.w1.scale.fp8"),
    ("mtp.0.ffn.experts.3.w3.scale", BASE, (B43 + "ffn.experts.w13_weight_scale_inv", 1, 3),
     "experts.w3.scale.fp8"),
    ("mtp.0.ffn.experts.9.w2.weight_scale_inv", BASE,
     (B43 + "ffn.experts.w2_weight_scale_inv", None, 9), "experts.w2.scale.fp8"),
    ("model.embed_tokens.weight", None, ("model.embed_tokens.weight", None, None), "self.embed"),
    ("model.layers.43.mtp_block.attn.fused_wqa_wkv.weight", None,
     (B43 + "attn.fused_wqa_wkv.weight", None, None), "self.layer"),
    ("model.layers.44.shared_head.head.weight", None, DROP, "self.head.alias"),
    ("model.layers.43.mtp_block.attn.wq_a.weight", None, REFUSE, "self.unknown"),
    ("layers.0.attn.wq_a.weight", None, DROP, "main.layer"),
    ("model.layers.42.ffn.gate.weight", None, DROP, "main.layer"),
    ("layers.45.attn_norm.weight", None, REFUSE, "main.layer.other"),
    ("norm.weight", None, DROP, "main.norm"),
    ("model.norm.weight", None, DROP, "main.norm"),
    ("hc_head_base", None, DROP, "main.hc_head"),
    ("mtp.0.attn.wq_c.weight", None, REFUSE, "mtp.unknown"),
    ("mtp.2.attn.wq_a.weight", None, REFUSE, "mtp.unknown"),  # beyond the configured layers
    ("mtp.0.ffn.experts.256.w1.weight", None, REFUSE, "mtp.unknown"),  # beyond E
    ("mtp.0.ffn.experts.007.w1.weight", None, REFUSE, "mtp.unknown"),  # not a canonical int
    ("lm_head.weight", None, DROP, "other"),
]


@pytest.mark.parametrize("name,fmt,want,rule", CASES, ids=[c[0] + (" fp8" if c[1] else "")
                                                          for c in CASES])
def test_rule(name, fmt, want, rule):
    assert match(name, FLASH2, fmt).rule.name == rule
    if want == REFUSE:
        with pytest.raises(UnknownTensorError, match=re.escape(name)):
            resolve(name, FLASH2, fmt)
    elif want == DROP:
        assert resolve(name, FLASH2, fmt) is None
    else:
        t = resolve(name, FLASH2, fmt)
        assert (t.param, t.shard, t.expert) == want
        assert t.param in remap.param_names(FLASH2)


def test_every_rule_has_a_case():
    assert {r.name for r in RULES} == {c[3] for c in CASES}
    assert len({r.name for r in RULES}) == len(RULES)


def test_seed_regression_module_names_map_to_themselves():
    # The seed's substring rules turn this into ...shared_head.shared_head.head.weight.
    name = "model.layers.43.shared_head.head.weight"
    assert resolve(name, FLASH2) == Target(name, None, None, "self.layer")
    # ... and insert a second mtp_block. into block names.
    name = "model.layers.44.mtp_block.attn.attn_sink"
    assert resolve(name, FLASH2).param == name


def test_main_head_is_a_fallback_and_mtp_copies_win():
    assert resolve("head.weight", FLASH2).fallback
    assert resolve("embed.weight", FLASH2).fallback
    assert not resolve("mtp.0.head.weight", FLASH2).fallback


def test_refusal_names_the_closest_rule():
    with pytest.raises(UnknownTensorError, match=r"closest: rule 'attn.proj'"):
        resolve("mtp.0.attn.wq_c.weight", FLASH2)
    with pytest.raises(UnknownTensorError, match=r"'attn.wq_a'.*except that i=2"):
        resolve("mtp.2.attn.wq_a.weight", FLASH2)


def test_explain():
    text = explain("mtp.0.attn.wkv.scale", FLASH2)
    assert "rule 'attn.wkv.scale'" in text
    assert f"loads into {B43}attn.fused_wqa_wkv.weight_scale_inv, rows of shard 1" in text
    assert "dropped on purpose: shared weights are taken from the first MTP layer only" in \
        explain("mtp.1.head.weight", FLASH2)
    assert "refused" in explain("mtp.0.foo", FLASH2)
    assert "(unless an MTP copy fills it)" in explain("head.weight", FLASH2)


# ---- the full release name lists, on the meta device ----------------------------------------
_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1}


def release_tensor_list(release: str) -> dict:
    with gzip.open(DATA / f"tensors-{release}.json.gz", "rt") as f:
        return json.load(f)


@pytest.mark.parametrize("release", ["flash", "pro"])
def test_release_name_list_fills_the_module_exactly(release):
    data = release_tensor_list(release)
    tensors = data["tensors"]
    cfg = MTPConfig.from_name(release)
    mtp_names = [n for n in tensors if n.startswith("mtp.")]
    assert len(mtp_names) == data["mtp_tensor_count"] == 6 * cfg.n_routed_experts + 39
    assert sum(math.prod(tensors[n]["shape"]) * _BYTES[tensors[n]["dtype"]]
               for n in mtp_names) == data["mtp_bytes"]

    model = DeepSeekV4MTP(cfg, device="meta")  # the release format: FP8 + FP4 experts
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    regions = defaultdict(list)
    for name, info in tensors.items():
        t = resolve(name, cfg)
        assert t is not None, name
        region, piece = remap.region_of(t, shapes[t.param], cfg)
        assert piece == tuple(info["shape"]), (name, piece, info["shape"])
        regions[t.param].append(region)
    assert set(regions) == set(shapes)  # every parameter, nothing else
    for param, rs in regions.items():  # each element filled exactly once
        assert not overlaps(rs), param
        assert sum(region_numel(r) for r in rs) == math.prod(shapes[param]), param
    # and the loader's plan agrees, from names, dtypes and shapes alone (a pure function: no
    # file is read)
    from mtp.checkpoint import plan as planning
    from mtp.checkpoint.header import TensorInfo
    from mtp.checkpoint.source import Entry, Source

    headers, offset = defaultdict(dict), defaultdict(int)
    for name, info in tensors.items():
        n = math.prod(info["shape"]) * _BYTES[info["dtype"]]
        headers[info["shard"]][name] = TensorInfo(
            info["shard"], info["dtype"], tuple(info["shape"]), offset[info["shard"]],
            offset[info["shard"]] + n, name)
        offset[info["shard"]] += n
    src = Source(release, "", "index", cfg.to_dict(),
                 tuple(Entry(n, i["shard"]) for n, i in tensors.items()))
    lp = planning.build(src, cfg, dict(headers), [], torch.bfloat16)
    assert (lp.kind, lp.problems, lp.missing, lp.unexpected) == ("v4-mtp", (), (), [])
    assert lp.weight_format == WeightFormat.released()
    assert len(lp.needed()) == 3


def test_canonical_names_are_the_release_names():
    cfg = MTPConfig.from_name("flash")
    tensors = release_tensor_list("flash")["tensors"]
    assert set(dict(remap.canonical_names(cfg))) == set(tensors)


# ---- properties ------------------------------------------------------------------------------
@st.composite
def configs(draw):
    k = draw(st.integers(1, 3))
    return MTPConfig(**{**MTPConfig.from_name("tiny").__dict__,
                        "num_hidden_layers": draw(st.integers(0, 70)),
                        "num_nextn_predict_layers": k, "mtp_compress_ratios": (0,) * k,
                        "n_routed_experts": draw(st.integers(1, 300)),
                        "num_experts_per_tok": 1})


FORMATS = st.sampled_from([WeightFormat.released(), BASE, WeightFormat.plain(),
                           WeightFormat(wo_a="plain")])


@given(configs(), FORMATS)
def test_injective(cfg, fmt):
    """Distinct names of one layout never land on the same slot."""
    for layout in (dict(remap.canonical_names(cfg, fmt)),
                   {p: resolve(p, cfg, fmt) for p in remap.param_names(cfg)}):
        slots = [(t.param, t.shard, t.expert) for t in layout.values()]
        assert len(set(slots)) == len(slots)


@given(configs(), FORMATS)
def test_idempotent_on_target_names(cfg, fmt):
    names = remap.param_names(cfg)
    for p in names:
        assert resolve(p, cfg, fmt) == Target(p, None, None, resolve(p, cfg, fmt).rule)
    for name, t in remap.canonical_names(cfg, fmt):
        again = resolve(t.param, cfg, fmt)
        assert again.param == t.param and (again.shard, again.expert) == (None, None), name


@given(configs(), st.data())
def test_layer_and_expert_indices_round_trip(cfg, data):
    i = data.draw(st.integers(0, cfg.num_nextn_predict_layers - 1))
    e = data.draw(st.integers(0, cfg.n_routed_experts - 1))
    w = data.draw(st.sampled_from(["w1", "w2", "w3"]))
    suffix = data.draw(st.sampled_from(["weight", "scale", "weight_scale_inv"]))
    t = resolve(f"mtp.{i}.ffn.experts.{e}.{w}.{suffix}", cfg)
    layer = int(re.match(r"model\.layers\.(\d+)\.", t.param).group(1))
    assert (layer - cfg.num_hidden_layers, t.expert) == (i, e)
    assert t.shard == {"w1": 0, "w3": 1, "w2": None}[w]
    t2 = resolve(f"mtp.{i}.attn.wq_b.weight", cfg)
    assert int(t2.param.split(".")[2]) == cfg.num_hidden_layers + i


SEGMENTS = ["mtp", "model", "layers", "0", "1", "2", "43", "007", "-1", "²", "", "attn", "wq_a",
            "weight", "scale", "experts", "ffn", "w1", "head", "shared_head", "mtp_block",
            "embed", "embed_tokens", "hc_head_fn", "**", "{i}", "norm", "x"]


@given(st.one_of(st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=7).map(".".join),
                 st.text(max_size=40)), configs())
def test_junk_names_are_refused_or_ignored(name, cfg):
    try:
        t = resolve(name, cfg)
    except UnknownTensorError as e:
        assert e.name == name
    else:
        assert t is None or t.param in remap.param_names(cfg)
    assert name in explain(name, cfg)


# ---- docs ------------------------------------------------------------------------------------
def test_docs_are_current():
    assert DOCS.read_text() == remap.rules_markdown(), (
        "docs/remap-rules.md is stale: regenerate it with\n  python -c 'import mtp.remap as r; "
        "open(\"docs/remap-rules.md\", \"w\").write(r.rules_markdown())'")


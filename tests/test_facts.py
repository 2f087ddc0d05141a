"""The per-parameter facts (mtp/facts.py) agree with the parameters they describe.

The loader, the exporter, tensor-parallel slicing and random init all read these facts, so an
entry that disagrees with its parameter's shape or dtype would misplace bytes silently. Checked
on meta-device modules (nothing allocated) at the Flash and Pro dimensions in every weight
format, and at tiny with two MTP layers (the head shared by both). The expected dtypes and
block sizes are written here from the checkpoint format, not read from the module.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtp import DeepSeekV4MTP, MTPConfig, WeightFormat
from mtp.facts import ParamFacts, facts_of
from mtp.model import DeepSeekV4MultiTokenPredictor
from mtp.parallel import TensorParallel, valid_world_sizes

BLOCK = 128  # FP8 block scales: one per 128 x 128 block
FP4_GROUP = 32  # FP4 expert scales: one per 32 values of a row
FORMATS = {"released": WeightFormat.released(),
           "base": WeightFormat(experts="fp8", expert_scale="f32"),
           "plain": WeightFormat.plain()}
CONFIGS = {"flash": MTPConfig.from_name("flash"), "pro": MTPConfig.from_name("pro"),
           "tiny-2-layers": dataclasses.replace(MTPConfig.from_name("tiny"),
                                                num_nextn_predict_layers=2,
                                                mtp_compress_ratios=(0, 0))}
STORED = {"fp8": torch.float8_e4m3fn, "fp4": torch.int8}  # FP4: two codes per byte
SCALE = {"e8m0": torch.float8_e8m0fnu, "f32": torch.float32}
CASES = [(c, f) for c in CONFIGS for f in FORMATS]


def entries(model: torch.nn.Module) -> dict[int, list[tuple[str, ParamFacts]]]:
    """id(parameter) -> every (module path.leaf, facts) declared for it."""
    out: dict[int, list] = {}
    for path, module in model.named_modules():
        for leaf, facts in module.__dict__.get("param_facts", {}).items():
            param = module._parameters.get(leaf)
            assert param is not None, f"{path}.{leaf}: facts for a name that is no parameter"
            out.setdefault(id(param), []).append((f"{path}.{leaf}", facts))
    return out


@pytest.mark.parametrize("cfg_name,fmt_name", CASES)
def test_every_parameter_has_exactly_one_facts_entry(cfg_name, fmt_name):
    model = DeepSeekV4MTP(CONFIGS[cfg_name], weight_format=FORMATS[fmt_name], device="meta")
    found = entries(model)
    params = dict(model.named_parameters())
    assert {id(p) for p in params.values()} == set(found)  # none without, none stale
    for name, p in params.items():
        distinct = {f for _, f in found[id(p)]}
        assert len(distinct) == 1, f"{name}: declared with {len(distinct)} different facts"
    if cfg_name == "tiny-2-layers":  # the head is one tensor declared by both layers
        head = model.layer(0).shared_head.head.weight
        assert head is model.layer(1).shared_head.head.weight and len(found[id(head)]) == 2


@pytest.mark.parametrize("cfg_name,fmt_name", CASES)
def test_facts_agree_with_shapes_and_dtypes(cfg_name, fmt_name):
    cfg, fmt = CONFIGS[cfg_name], FORMATS[fmt_name]
    model = DeepSeekV4MTP(cfg, weight_format=fmt, dtype=torch.bfloat16, device="meta")
    params, facts = dict(model.named_parameters()), facts_of(model)
    for name, p in params.items():
        f = facts[name]
        shape = tuple(p.shape)
        storage = None if f.format is None else getattr(fmt, f.format)
        if f.scale_of is None and storage in STORED:
            assert p.dtype == STORED[storage], name
        elif f.scale_of is None and storage == "plain":
            assert p.dtype == torch.bfloat16, name  # held in the compute dtype
        elif f.scale_of is not None:
            assert p.dtype == SCALE[storage], name
            assert f.init.kind == "by_weight", name
        if f.stacked:
            assert shape[0] == cfg.n_routed_experts, name
        if f.shared is not None:
            assert shape == (cfg.vocab_size, cfg.hidden_size), name
        rows = shape[1 if f.stacked else 0]
        if f.fused and f.scale_of is None:  # the pieces' rows, stacked in order
            assert rows == sum(getattr(cfg, field) for field in f.fused), name
        if f.scale_of is not None:  # follows its weight: fused, stacked and split alike
            weight_name = name.rsplit(".", 1)[0] + "." + f.scale_of
            w, wf = params[weight_name], facts[weight_name]
            assert (wf.fused, wf.stacked) == (f.fused, f.stacked), name
            assert (wf.tp is None) == (f.tp is None), name
            assert wf.tp is None or wf.tp.dim == f.tp.dim, name
            w_rows = w.shape[1 if f.stacked else 0]
            w_cols = w.shape[-1] * (2 if getattr(fmt, wf.format) == "fp4" else 1)
            if getattr(fmt, wf.format) == "fp4":  # per 32 values of each row
                assert (rows, shape[-1]) == (w_rows, w_cols // FP4_GROUP), name
            else:  # 128 x 128 blocks; fused pieces must each be whole blocks
                assert (rows, shape[-1]) == (-(-w_rows // BLOCK), -(-w_cols // BLOCK)), name
                assert all(getattr(cfg, x) % BLOCK == 0 for x in f.fused), name


@pytest.mark.parametrize("cfg_name", ["flash", "pro"])
def test_split_facts_agree_with_a_ranks_shapes(cfg_name):
    """A rank's module (built with a TensorParallel of that world size) holds exactly the part
    each parameter's ``tp`` fact names: 1/w along ``dim`` in whole units, the rest whole."""
    cfg = CONFIGS[cfg_name]
    fmt = WeightFormat.released()
    full = DeepSeekV4MTP(cfg, weight_format=fmt, device="meta")
    shapes, facts = {n: tuple(p.shape) for n, p in full.named_parameters()}, facts_of(full)
    sizes = [w for w in valid_world_sizes(cfg) if w > 1]
    assert sizes, "no world size splits this config"
    for w in sizes:
        tp = TensorParallel()
        tp.rank, tp.world_size = w - 1, w  # the last rank: shapes only, no collective runs
        rank = DeepSeekV4MultiTokenPredictor(cfg, fmt, torch.bfloat16, "meta", tp=tp)
        for name, p in rank.named_parameters():
            name = "model." + name
            f, expected = facts[name], list(shapes[name])
            if f.tp is not None:
                unit = getattr(cfg, f.tp.unit) if f.tp.unit else 1
                assert expected[f.tp.dim] % (w * unit) == 0, (name, w)
                expected[f.tp.dim] //= w
            assert tuple(p.shape) == tuple(expected), (name, w)

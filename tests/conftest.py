"""Shared test helpers: tiny configs drawn by hypothesis, and the module's weights under the
checkpoint's names (for the independent float64 reference in ``reference.py``)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from any working directory
# `python -m pytest` puts the repo root on sys.path, and so do the benchmarks some tests import
# (to run from a checkout), where kernels/ (installed as mtp_kernels) would shadow the PyPI
# package `kernels` that transformers imports: keep the root off it, now and before each test
# module is imported (pytest_collectstart).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _root_off_path() -> None:
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]


_root_off_path()

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402

# Deterministic property tests: CI must not flake, and a failure must reproduce.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=20,
                          print_blob=True)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption(
        "--examples-scale", type=int, default=1, metavar="N",
        help="search deeper than CI: every property test draws N times its own max_examples, "
             "seeded at random (a failure prints the @reproduce_failure blob that replays it)")


def scale_examples(test, n: int) -> None:
    """Give a ``@given`` test ``n`` times its own ``max_examples``, randomly seeded.

    CI's seeds are fixed, so it meets the same few hundred cases every run; a bound that
    holds only for those passes for ever. A scaled run draws fresh ones. Hypothesis has no
    public way to scale a test's own ``@settings`` (a profile's ``max_examples`` loses to
    them), so this replaces the settings object ``@settings`` attached;
    ``test_examples_scale.py`` fails if hypothesis stops reading it.
    """
    own = getattr(test, "_hypothesis_internal_use_settings", settings.default)
    test._hypothesis_internal_use_settings = settings(
        own, max_examples=own.max_examples * n, derandomize=False)


def pytest_collection_modifyitems(config, items):
    n = config.getoption("--examples-scale")
    if n < 1:
        raise pytest.UsageError(f"--examples-scale must be 1 or more (got {n}): it multiplies "
                                "each property test's max_examples")
    if n == 1:
        return
    seen = set()  # a parametrized test's items share one function: scale it once
    for item in items:
        test = getattr(item, "obj", None)
        if getattr(test, "hypothesis", None) is not None and id(test) not in seen:
            seen.add(id(test))
            scale_examples(test, n)


def tiny_config(**overrides) -> MTPConfig:
    return MTPConfig(**{**MTPConfig.from_name("tiny").__dict__, **overrides})


def checkpoint_weights(model: DeepSeekV4MTP, i: int = 0) -> dict[str, torch.Tensor]:
    """Float64 weights of MTP layer i keyed by checkpoint names (``mtp.{i}.attn.wq_a.weight``),
    written independently of the remap table: fused tensors split by hand."""
    cfg = model.config
    layer = model.layer(i)
    blk = layer.mtp_block
    attn, ffn = blk.attn, blk.ffn
    q, inter = cfg.q_lora_rank, cfg.moe_intermediate_size
    f64 = torch.float64
    p = f"mtp.{i}."
    fused = attn.fused_wqa_wkv.dequantized().to(f64)
    gate_up = ffn.shared_experts.gate_up_proj.dequantized().to(f64)
    w = {
        "embed.weight": model.model.embed_tokens.weight.to(f64),
        "head.weight": layer.shared_head.head.weight.to(f64),
        p + "enorm.weight": layer.enorm.weight, p + "hnorm.weight": layer.hnorm.weight,
        p + "norm.weight": layer.shared_head.norm.weight,
        p + "e_proj.weight": layer.e_proj.dequantized(),
        p + "h_proj.weight": layer.h_proj.dequantized(),
        p + "hc_head_fn": layer.hc_head_fn, p + "hc_head_base": layer.hc_head_base,
        p + "hc_head_scale": layer.hc_head_scale,
        p + "attn_norm.weight": blk.attn_norm.weight, p + "ffn_norm.weight": blk.ffn_norm.weight,
        p + "attn.attn_sink": attn.attn_sink,
        p + "attn.q_norm.weight": attn.q_norm.weight,
        p + "attn.kv_norm.weight": attn.kv_norm.weight,
        p + "attn.wq_a.weight": fused[:q], p + "attn.wkv.weight": fused[q:],
        p + "attn.wq_b.weight": attn.wq_b.dequantized(),
        p + "attn.wo_a.weight": attn.wo_a.dequantized(),
        p + "attn.wo_b.weight": attn.wo_b.dequantized(),
        p + "ffn.gate.weight": ffn.gate.weight,
        p + "ffn.gate.bias": ffn.gate.e_score_correction_bias,
        p + "ffn.shared_experts.w1.weight": gate_up[:cfg.shared_intermediate_size],
        p + "ffn.shared_experts.w3.weight": gate_up[cfg.shared_intermediate_size:],
        p + "ffn.shared_experts.w2.weight": ffn.shared_experts.down_proj.dequantized(),
    }
    for site in ("attn", "ffn"):
        for part in ("fn", "base", "scale"):
            w[f"{p}hc_{site}_{part}"] = getattr(blk, f"hc_{site}_{part}")
    for e in range(cfg.n_routed_experts):
        w13, w2 = ffn.experts.expert_weights(e)
        w[f"{p}ffn.experts.{e}.w1.weight"] = w13[:inter]
        w[f"{p}ffn.experts.{e}.w3.weight"] = w13[inter:]
        w[f"{p}ffn.experts.{e}.w2.weight"] = w2
    return {k: v.detach().to(f64) for k, v in w.items()}


_STORED = {torch.float8_e4m3fn: "fp8", torch.int8: "fp4", torch.uint8: "fp4",
           torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32",
           torch.float64: "f64"}


def checkpoint_formats(model: DeepSeekV4MTP, i: int = 0) -> dict[str, str]:
    """The stored format ("fp8", "fp4", "bf16", "f32", ...) of every weight that
    ``checkpoint_weights`` returns, read off the dtype the module holds it in: the float64
    reference rounds a product's input only where its weight is FP8 or FP4."""
    cfg = model.config
    layer = model.layer(i)
    blk = layer.mtp_block
    attn, ffn = blk.attn, blk.ffn
    p = f"mtp.{i}."
    of = {p + "e_proj.weight": layer.e_proj.weight, p + "h_proj.weight": layer.h_proj.weight,
          p + "attn.wq_a.weight": attn.fused_wqa_wkv.weight,
          p + "attn.wkv.weight": attn.fused_wqa_wkv.weight,
          p + "attn.wq_b.weight": attn.wq_b.weight, p + "attn.wo_a.weight": attn.wo_a.weight,
          p + "attn.wo_b.weight": attn.wo_b.weight}
    for w in ("w1", "w3"):
        of[f"{p}ffn.shared_experts.{w}.weight"] = ffn.shared_experts.gate_up_proj.weight
    of[p + "ffn.shared_experts.w2.weight"] = ffn.shared_experts.down_proj.weight
    for e in range(cfg.n_routed_experts):
        for w in ("w1", "w3"):
            of[f"{p}ffn.experts.{e}.{w}.weight"] = ffn.experts.w13_weight
        of[f"{p}ffn.experts.{e}.w2.weight"] = ffn.experts.w2_weight
    return {name: _STORED[t.dtype] for name, t in of.items()}


def small_configs(max_experts: int = 6):
    """Hypothesis strategy: tiny MTPConfigs that respect every format block, with the dims the
    math cares about (heads, groups, RoPE width, window, experts, hc_mult, Sinkhorn iters) drawn."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw):
        heads = draw(st.sampled_from([1, 2, 4]))
        groups = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
        experts = draw(st.integers(1, max_experts))
        return MTPConfig(
            hidden_size=128 * draw(st.integers(1, 2)),
            vocab_size=draw(st.integers(16, 300)),
            num_hidden_layers=draw(st.integers(0, 3)),
            num_attention_heads=heads,
            head_dim=64 * draw(st.integers(1, 2)) + (rope := 2 * draw(st.integers(1, 32))),
            qk_rope_head_dim=rope,
            q_lora_rank=128,
            o_groups=groups,
            o_lora_rank=128 // groups * draw(st.integers(1, 2)),  # G*O: a multiple of 128
            sliding_window=draw(st.integers(1, 10)),
            n_routed_experts=experts,
            num_experts_per_tok=draw(st.integers(1, min(3, experts))),
            moe_intermediate_size=128,
            hc_mult=draw(st.sampled_from([1, 2, 4])),
            hc_sinkhorn_iters=draw(st.integers(1, 20)),
            routed_scaling_factor=draw(st.sampled_from([1.0, 1.5, 2.5])),
            swiglu_limit=draw(st.sampled_from([0.0, 0.5, 10.0])),
        )

    return build()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """The tiny release-layout checkpoint of ``test_loader.make()`` (do not damage it)."""
    from test_loader import LAYOUTS, make, write

    folder = tmp_path_factory.mktemp("pristine") / "ckpt"
    write(make(), folder, **LAYOUTS["release"])
    return str(folder)


@pytest.fixture
def folder(tmp_path, pristine) -> str:
    """A fresh copy of ``pristine``, free to damage."""
    return shutil.copytree(pristine, tmp_path / "ckpt")


def pytest_collectstart(collector):
    _root_off_path()

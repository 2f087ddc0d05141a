"""Tensor and expert parallelism on real gloo process groups on 127.0.0.1.

Each world size is ONE launch of real processes (``parallel_harness.launch``) that runs every
case (a checkpoint x compute dtype x rounding): load with ``process_group=``, one forward with
logits, then a drafting loop over three sequences with rollback, greedy and sampled. The same
code runs in this process with ``process_group=None`` as the reference. Every rank must return
the same bits as every other rank, and match the one-process result within:

- float64 with the reference rounding (FP8 activations, FP8 KV): 1e-12 of the tensor's max,
  everything (forward, logits, drafts, q, cache). Reassociated float64 sums differ by ~1e-16;
  a sharding that split one of the 128-element FP8 activation blocks (e.g. at wo_b's input or
  the shared expert's w2 input) would move outputs by ~1e-2.
- float32 without FP8 rounding: 5e-6 of the max, everything (measured <= 1.2e-6). The
  all-reduces sum float32 partials (wo_b's product, the routed experts, the shared expert's
  parts) in another order (~1e-7 relative each); the drafting loop feeds outputs back.
- float32 with the reference rounding (what an engine runs): 5e-3 of the max, one forward
  and its logits only. The same ~1e-7 reassociation can land on an FP8 rounding boundary and
  move one element by an FP8 step (2^-3 relative), seen as 9e-4 of the max at 4 ranks
  against one process on 2 threads (measured <= 8e-7 with 1 thread, as here); fed
  back through a drafting loop such a step could change a sampled draft, so the loop is
  compared where the rounding is off (float32) or exact (float64).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config
from hypothesis import given
from hypothesis import strategies as st
from parallel_cases import run_case
from parallel_harness import launch

from mtp import DeepSeekV4MTP, MTPConfig, WeightFormat, write_checkpoint
from mtp.parallel import (
    ParallelError,
    TensorParallel,
    check_world_size,
    combine_argmax,
    valid_world_sizes,
)
from mtp.testing import init_random_, write_release_like

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {("float64", "on"): 1e-12, ("float32", "off"): 5e-6, ("float32", "on"): 5e-3}
ONE_FORWARD = {("float32", "on")}  # compared with one process on the forward and logits only
# The checkpoint tensors (release names) and parameters split over ranks, written out by hand
# (the rest is whole on every rank).
SPLIT_STORED = ("embed.weight", "head.weight", ".attn.wq_b.", ".attn.wo_a.", ".attn.wo_b.",
                ".attn.attn_sink", ".ffn.experts.")
SPLIT = ("model.embed_tokens.weight", "shared_head.head.weight", "attn.wq_b.weight",
         "attn.wq_b.weight_scale_inv", "attn.wo_a.weight", "attn.wo_a.weight_scale_inv",
         "attn.wo_b.weight", "attn.wo_b.weight_scale_inv", "attn.attn_sink", "ffn.experts.")


def checkpoints(folder, cfg) -> dict[str, str]:
    """A bf16 checkpoint and one in the released FP8 + FP4 format, of random tiny models."""
    out = {}
    for name, fmt, dtype in (("bf16", WeightFormat.plain(), torch.bfloat16),
                             ("fp8", WeightFormat.released(), torch.float32)):
        model = init_random_(DeepSeekV4MTP(cfg, weight_format=fmt, dtype=dtype), seed=1)
        write_release_like(model, folder / name, num_shards=4, main_layers=2)
        out[name] = str(folder / name)
    return out


def cases(paths: dict[str, str], runs) -> list[dict]:
    return [dict(name=f"{ckpt}-{dtype}-{rounding}", path=paths[ckpt], dtype=dtype,
                 rounding=rounding) for ckpt, dtype, rounding in runs]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    paths = checkpoints(tmp, tiny_config())
    other = shutil.copytree(paths["fp8"], tmp / "other")  # the same tensors, another config
    text = (other / "config.json").read_text().replace('"rope_theta": 10000.0',
                                                       '"rope_theta": 20000.0')
    (other / "config.json").write_text(text)
    mp = init_random_(DeepSeekV4MTP(tiny_config()), seed=1)
    write_checkpoint(mp, tmp / "mp", layout="mp", mp=2)  # the converter's per-rank files
    paths["mp"] = str(tmp / "mp")
    # I = 256: each rank computes 128 of the shared expert's width (I = 128 cannot split)
    wide = init_random_(DeepSeekV4MTP(tiny_config(moe_intermediate_size=256)), seed=2)
    write_checkpoint(wide, tmp / "wide", num_shards=3)
    paths["wide"] = str(tmp / "wide")
    runs = cases(paths, [("bf16", "float32", "off"), ("bf16", "float32", "on"),
                         ("fp8", "float32", "off"), ("fp8", "float64", "on"),
                         ("mp", "float32", "off"), ("wide", "float64", "on")])
    errors = [dict(name="disagree", path=[paths["fp8"], str(other)], dtype="float32",
                   expect_error=True),
              dict(name="missing", path=[paths["fp8"], str(tmp / "nowhere")], dtype="float32",
                   expect_error=True),
              dict(name="settings", path=paths["fp8"], dtype=["float32", "float64"],
                   expect_error=True),
              dict(name="export", kind="export", path=paths["fp8"], dtype="float32",
                   expect_error=True),
              dict(name="nan", kind="nan", path=paths["fp8"], dtype="float32")]
    return paths, runs, launch(2, runs + errors, tmp).check()


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp4")
    # 4 heads, 4 groups, 8 experts; I = 512: 128 of the shared expert's width per rank
    paths = checkpoints(tmp, tiny_config(o_groups=4, moe_intermediate_size=512))
    paths["tiny"] = str(tmp / "tiny")  # the tiny preset: o_groups=2 cannot split over 4
    write_checkpoint(init_random_(DeepSeekV4MTP(tiny_config())), paths["tiny"], num_shards=3)
    runs = cases(paths, [("bf16", "float32", "off"), ("fp8", "float64", "on"),
                         ("fp8", "float32", "on")])
    errors = [dict(name="indivisible", path=paths["tiny"], dtype="float32", expect_error=True)]
    return paths, runs, launch(4, runs + errors, tmp).check()


@pytest.fixture(scope="module")
def references():
    """The one-process results, computed once per (path, dtype, rounding)."""
    cache = {}

    def get(case):
        key = (case["path"], case["dtype"], case["rounding"])
        if key not in cache:
            # One thread, as the ranks: at these sizes a second one only adds waiting, and on
            # a busy 2-core machine OpenMP's spinning made a 0.4 s case take 20 s.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                cache[key] = run_case(case["path"], None, DTYPES[case["dtype"]],
                                      case["rounding"])
            finally:
                torch.set_num_threads(threads)
        return cache[key]

    return get


def stored_bytes(folder: str) -> tuple[int, int]:
    """(bytes the drafter reads that are split over ranks, bytes read whole by every rank), from
    the safetensors headers: the MTP tensors, the embedding and the head."""
    split = whole = 0
    for f in Path(folder).glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name == "__metadata__" or not (name.startswith("mtp.") or name in (
                    "embed.weight", "head.weight")):
                continue
            n = info["data_offsets"][1] - info["data_offsets"][0]
            if any(s in name for s in SPLIT_STORED):
                split += n
            else:
                whole += n
    return split, whole


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_matches(ranks: list[dict], ref: dict, tol: float, one_forward: bool) -> None:
    assert set(ranks[0]) == set(ref)
    for key, want in ref.items():
        if key in ("bytes", "read", "shared_split"):
            continue
        for r, got in enumerate(ranks):
            assert torch.equal(got[key], ranks[0][key]), (key, r)  # every rank: same bits
        if one_forward and key not in ("block", "logits"):
            continue
        if want.is_floating_point():
            assert ranks[0][key].shape == want.shape, key
            err = max_rel(ranks[0][key], want)
            assert err <= tol, (key, err, tol)
        else:  # drafts
            assert torch.equal(ranks[0][key], want), key


def check_world(world_results, references, world: int, split_shared: set[str]) -> None:
    _, runs, results = world_results
    for case in runs:
        ranks = [results[r][case["name"]] for r in range(world)]
        ref = references(case)
        want_split = case["name"].split("-")[0] in split_shared  # I/w whole 128-blocks
        assert all(rk["shared_split"] == want_split for rk in ranks), case["name"]
        assert ranks[0]["block"].shape == (7, 4 * 256) and ranks[0]["logits"].shape == (7, 1024)
        how = case["dtype"], case["rounding"]
        assert_matches(ranks, ref, TOL[how], how in ONE_FORWARD)
        # Resident bytes: each rank holds 1/world of the split parameters, the rest whole.
        for r in range(world):
            for name, full in ref["bytes"].items():
                share = full // world if any(s in name for s in SPLIT) else full
                assert ranks[r]["bytes"][name] == share, (case["name"], r, name)
        # Bytes read: each rank its share of the split tensors, the rest whole.
        if not case["name"].startswith("mp"):  # per-rank files store some tensors differently
            split, whole = stored_bytes(case["path"])
            assert ref["read"] == split + whole
            assert all(rk["read"] == whole + split // world for rk in ranks), case["name"]
        total = sum(ref["bytes"].values())
        split = sum(v for n, v in ref["bytes"].items() if any(s in n for s in SPLIT))
        assert sum(ranks[0]["bytes"].values()) == total - split + split // world


def test_two_ranks_match_one_process(world2, references):
    check_world(world2, references, 2, {"wide"})


def test_four_ranks_match_one_process(world4, references):
    check_world(world4, references, 4, {"bf16", "fp8"})


def test_ranks_that_disagree_on_the_checkpoint_all_raise(world2):
    _, _, results = world2
    for r in range(2):
        assert "ranks of the process group disagree: rank(s) [1]" in results[r]["disagree"]
        assert "same checkpoint" in results[r]["disagree"]


def test_ranks_that_disagree_on_the_settings_all_raise(world2):
    _, _, results = world2
    for r in range(2):
        assert "disagree: rank(s) [1]" in results[r]["settings"]
        assert "same settings" in results[r]["settings"]


def test_nan_logits_on_one_ranks_slice_are_refused_on_every_rank(world2):
    """Regression: greedy tensor-parallel drafting took the argmax over the ranks' slices
    without looking for NaN, so NaN logits on one rank's slice drafted silently."""
    _, _, results = world2
    for r in range(2):
        out = results[r]["nan"]
        assert out["message"].startswith("logits: hold NaN"), (r, out["message"])
        assert out["unchanged"], r
    assert torch.equal(results[0]["nan"]["after"], results[1]["nan"]["after"])


def test_a_rank_that_fails_to_load_stops_every_rank(world2):
    _, _, results = world2
    assert "neither a folder nor a Hub repo id" in results[1]["missing"]
    assert "rank(s) [1] of the process group failed" in results[0]["missing"]


def test_a_ranks_module_is_not_written_as_a_checkpoint(world2):
    _, _, results = world2
    for r in range(2):
        assert "holds only its slices" in results[r]["export"]


def test_indivisible_world_size_is_refused_on_every_rank(world4):
    _, _, results = world4
    for r in range(4):
        msg = results[r]["indivisible"]
        assert msg.startswith("ParallelError") and "o_groups=2 is not divisible by " \
            "world_size=4" in msg and "[1, 2]" in msg, msg


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    run = launch(2, [dict(name="crash", path="unused", dtype="float32", crash_rank=1)],
                 tmp_path, timeout=120, grace=5, collective_timeout=30)
    assert run.returncodes[1] != 0 and "fails on purpose" in run.logs[1]
    assert run.returncodes[0] != 0  # raised (peer gone) or killed after the grace period
    assert run.seconds < 60, run.seconds


# ---- without processes -------------------------------------------------------------------------
def test_world_size_errors_name_every_dimension():
    cfg = MTPConfig.from_name("tiny")  # 4 heads, 2 groups, 8 experts, 1024 tokens
    with pytest.raises(ParallelError) as e:
        check_world_size(cfg, 3)
    for part in ("num_attention_heads=4", "o_groups=2", "n_routed_experts=8",
                 "vocab_size=1024", "[1, 2]"):
        assert part in str(e.value)
    # wo_b's columns per rank must be whole 128-blocks of the activation rounding
    narrow = tiny_config(o_groups=4, o_lora_rank=64)  # 4 x 64 = 256 columns
    assert valid_world_sizes(narrow) == [1, 2]
    with pytest.raises(ParallelError, match="64 columns of wo_b, not whole 128-wide"):
        check_world_size(narrow, 4)
    assert valid_world_sizes(MTPConfig.from_name("flash")) == [1, 2, 4, 8]
    assert valid_world_sizes(MTPConfig.from_name("pro")) == [1, 2, 4, 8, 16]


def test_uninitialised_group_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")  # not in our runs
    with pytest.raises(ParallelError, match="init_process_group"):
        TensorParallel(object())


@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.data())
def test_combined_argmax_is_the_argmax_of_the_whole_row(world, rows, width, data):
    # values from a small set: ties within and across ranks are common
    values = data.draw(st.lists(st.integers(-2, 2), min_size=rows * world * width,
                                max_size=rows * world * width))
    logits = torch.tensor(values, dtype=torch.float32).view(rows, world * width)
    parts = logits.view(rows, world, width).transpose(0, 1)  # [w, S, V/w]
    value, index = parts.max(dim=-1)
    ids = index + torch.arange(world)[:, None] * width
    both = torch.stack((value.double(), ids.double()), dim=-1)  # [w, S, 2]
    assert torch.equal(combine_argmax(both), logits.argmax(dim=-1))

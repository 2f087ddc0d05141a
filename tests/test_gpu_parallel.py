"""Tensor and expert parallelism on GPUs at the Flash and Pro shapes (full hidden size, every
expert; random weights in the released FP8 + FP4 format, made on each rank's GPU with the same
seed). Each rank computes the one-GPU result (``process_group=None``) and its share of the same
model over the group, with the model's default backend (the Triton kernels: checked), and runs
one forward with logits and a drafting loop over three sequences with rollback (greedy and
sampled rounds, ``tests/parallel_cases.py``): eagerly, and where the group is NCCL also with
the draft steps replayed from CUDA graphs that hold the collectives (``tp_graphs``).

Three groups:

- ``world2``: 2 processes, one GPU each, NCCL (needs 2 GPUs): eager and graphs.
- ``shared_gpu``: 2 processes on ONE GPU over gloo with CUDA tensors (NCCL refuses two ranks
  on one GPU): the per-rank kernels and the eager collectives, no graphs (gloo's collectives
  go through the host and cannot be captured).
- ``nccl_one``: ONE process, an NCCL group of one run through the split code path
  (``sharded_at_one``: every collective a real NCCL call over one rank): the capture of the
  collectives in the draft step's graphs, with a trivial reduction.

Every rank must return the same bits as the other, and match the one-GPU result within
(relative to the tensor's max):

- float32 without FP8 rounding: 2e-5, everything (forward, logits, draft residuals, q, cache),
  drafts (greedy and sampled) equal; q compared over the tokens both sides' top-p keep (one
  token per row may sit on the cutoff: ``same_support``). The all-reduces sum float32
  partials (wo_b's product over half the columns, each rank's experts, the shared expert's
  halves) in another order, and the kernels split their sums differently for the halved
  shapes: ~1e-7 relative per op over sums of 4096-7168 terms, fed back through the loop
  (measured on 2 H200s, eager reference ops: <= 8e-7; the tiny CPU case <= 1.2e-6).
- float32 with the reference FP8 rounding: 5e-3, one forward and its logits (measured
  <= 1.2e-6): a reassociated sum can land on the other side of an FP8 rounding boundary and
  move one element by an FP8 step (2^-3 relative), as on the CPU (tests/test_parallel.py).
- bfloat16 with the reference rounding (what an engine runs): 3e-2, one forward and its
  logits (measured <= 4.5e-3): the bfloat16 roundings of the block's intermediates fall
  differently once the sums are reassociated (2^-8 relative each), then the same FP8-step
  effect.

The measured errors are printed (``-s``) and written to ``$MTP_GPU_REPORT`` (a JSON file per
group: ``<path>.<group>``) when set.

``MTP_PARALLEL_ON_CPU=1`` runs ``world2`` with gloo on the CPU at the tiny preset (the dry run
of the harness where no GPUs are at hand). ``TRITON_INTERPRET=1`` (with Triton installed) runs
``interpreted``: the per-rank kernels on 2 gloo processes through Triton's CPU interpreter at
the tiny preset, the shared expert whole and split (about 7 minutes on 2 cores; measured
<= 6.9e-7, the tolerance of the float32 loop).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from parallel_harness import launch

ON_CPU = os.environ.get("MTP_PARALLEL_ON_CPU") == "1"
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.gpu

# MTP_PARALLEL_PRESETS=flash: fewer cases where device time is short
PRESETS = ("tiny",) if ON_CPU else tuple(
    os.environ.get("MTP_PARALLEL_PRESETS", "flash,pro").split(","))
# (compute dtype, FP8 rounding): tolerance, whether the drafting loop is compared
RUNS = {("float32", "off"): (2e-5, True), ("float32", "on"): (5e-3, False),
        ("bfloat16", "on"): (3e-2, False)}
# Which runs each group makes (MTP_PARALLEL_RUNS=float32-off,...: fewer where device time is
# short): 2 GPUs all of them; one GPU shared by the ranks the loop in float32 and an engine's
# bfloat16 forward.
_ASKED = os.environ.get("MTP_PARALLEL_RUNS")
RUNS_TWO_GPUS = tuple(tuple(r.split("-")) for r in _ASKED.split(",")) if _ASKED else tuple(RUNS)
RUNS_ONE_GPU = RUNS_TWO_GPUS if _ASKED else (("float32", "off"), ("bfloat16", "on"))
ONE_FORWARD_KEYS = ("block", "logits")


def full_cases(runs, graphs: bool) -> list[dict]:
    """One case per preset and run; the draft steps also replayed from CUDA graphs where the
    loop is compared and ``graphs``."""
    return [dict(name=f"{preset}-{dtype}-{rounding}", kind="full", preset=preset, path="",
                 dtype=dtype, rounding=rounding, graphs=graphs and RUNS[dtype, rounding][1])
            for preset in PRESETS for dtype, rounding in runs]


def run_group(tmp_path_factory, folder: str, world: int, runs, graphs: bool, **launch_kw):
    """The full cases of ``runs`` on a group of ``world`` processes -> (cases, their results)."""
    cases = full_cases(runs, graphs)
    return cases, launch(world, cases, tmp_path_factory.mktemp(folder), grace=20,
                         **launch_kw).check()


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    if not ON_CPU and GPUS < 2:
        pytest.skip("needs 2 CUDA GPUs (NCCL, one process per GPU); MTP_PARALLEL_ON_CPU=1 "
                    "runs it with gloo on the CPU at the tiny preset")
    return run_group(tmp_path_factory, "nccl", 2, RUNS_TWO_GPUS, not ON_CPU, timeout=240,
                     collective_timeout=120, backend="gloo" if ON_CPU else "nccl")


@pytest.fixture(scope="module")
def shared_gpu(tmp_path_factory):
    if ON_CPU or GPUS < 1:
        pytest.skip("needs a CUDA GPU (2 processes share it over gloo)")
    return run_group(tmp_path_factory, "gloo_cuda", 2, RUNS_ONE_GPU, False, timeout=300,
                     collective_timeout=200, backend="gloo", spec={"device": "cuda"})


@pytest.fixture(scope="module")
def nccl_one(tmp_path_factory):
    if ON_CPU or GPUS < 1:
        pytest.skip("needs a CUDA GPU (an NCCL group of one)")
    return run_group(tmp_path_factory, "nccl_one", 1, RUNS_ONE_GPU, True, timeout=300,
                     collective_timeout=200, backend="nccl", spec={"sharded_at_one": True})


INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The per-rank kernels without a GPU: Triton's CPU interpreter, 2 gloo processes, the tiny
    preset (its shared expert computed whole at world 2) and the same with an expert width of
    256 (the shared expert split: each rank's 128 columns), float32 without the rounding."""
    if not INTERPRET or importlib.util.find_spec("triton") is None:
        pytest.skip("a development check: TRITON_INTERPRET=1 with Triton installed runs the "
                    "kernels on the CPU through its interpreter (minutes)")
    cases = [dict(name=f"tiny-{width}-float32-off", kind="full", preset="tiny", path="",
                  dtype="float32", rounding="off", graphs=False, backend="triton",
                  config={"moe_intermediate_size": width}) for width in (128, 256)]
    run = launch(2, cases, tmp_path_factory.mktemp("interpret"), timeout=900, grace=20,
                 collective_timeout=600, backend="gloo")
    return cases, run.check()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def same_support(got: torch.Tensor, want: torch.Tensor, failures: list, what: str,
                 tie: float = 1e-3):
    """Top-p's q [..., V] renormalised over the tokens both sides keep. Top-p is
    discontinuous: where the two sides' logits differ by ~1e-6, a token whose cumulative
    probability sits at ``top_p`` is kept by one side and cut by the other, and two tokens of
    nearly equal probability at the cutoff can be sorted in the other order, each side keeping
    one of them; either rescales the whole row by the token's mass (measured at Pro: 1.6e-3 of
    the max, while logits agreed to 8e-7). So a token kept by one side only is allowed where it
    is among the least probable tokens that side keeps (within ``tie`` of its smallest q);
    the kept distribution must still agree within the tolerance."""
    a, b = got.double(), want.double()
    for side, other, name in ((a, b, "got"), (b, a, "want")):
        only = (side > 0) & (other == 0)
        least = torch.where(side > 0, side, torch.inf).amin(-1, keepdim=True)
        if (only & (side > least * (1 + tie))).any():
            failures.append(f"{what}: {name} keeps a token the other cuts that is not at the "
                            f"top-p cutoff (above its least probable kept token)")
    both = (a > 0) & (b > 0)
    a, b = a * both, b * both
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def test_same_support_allows_only_cutoff_differences():
    """Runs anywhere (no GPU): the comparison itself. A near-tie at the cutoff sorted the other
    way (each side keeps one of two nearly equal tokens) passes; a side keeping a token of
    larger probability that the other cuts fails."""
    want = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.6, 0.4, 0.0, 0.0]])
    tie = torch.tensor([[0.5, 0.3, 0.0, 0.2], [0.6, 0.4, 0.0, 0.0]])  # token 3 for token 2
    failures: list = []
    a, b = same_support(tie, want, failures, "tie")
    assert not failures and torch.allclose(a, b)
    same_support(torch.tensor([[0.5, 0.0, 0.2, 0.3]]), want[:1], failures, "not a tie")
    assert len(failures) == 2  # each side keeps a token above its smallest that the other cuts


def compare(cases, results, group: str) -> None:
    """Every rank against rank 0 (same bits) and against the one-GPU result (tolerance), for
    the eager run and the graphs' run; a report printed and written; one assertion."""
    world = len(results)
    report, failures = {}, []
    for case in cases:
        tol, loop = RUNS[case["dtype"], case["rounding"]]
        ranks = [results[r][case["name"]] for r in range(world)]
        one = ranks[0]["one"]
        if (not ON_CPU or case.get("backend") == "triton") and ranks[0]["ops"] != "triton":
            failures.append(f"{case['name']}: the rank ran the {ranks[0]['ops']!r} ops, not "
                            f"the kernels")
        entry = {"tolerance": tol}
        for variant in ("tp", "tp_graphs") if case["graphs"] else ("tp",):
            tp, errors = ranks[0][variant], {}
            for key, want in one.items():
                if any(not torch.equal(ranks[r][variant][key], tp[key])
                       for r in range(1, world)):
                    failures.append(f"{case['name']} {variant} {key}: the ranks' bits differ")
                if not loop and key not in ONE_FORWARD_KEYS:
                    continue
                if not want.is_floating_point():  # drafts
                    if not torch.equal(tp[key], want):
                        failures.append(f"{case['name']} {variant} {key}: drafts differ from "
                                        f"one GPU's")
                    continue
                got = tp[key]
                if key.endswith(".probs"):
                    got, want = same_support(got, want, failures,
                                             f"{case['name']} {variant} {key}")
                errors[key] = max_rel(got, want)
                if got.shape != want.shape or errors[key] > tol:
                    failures.append(f"{case['name']} {variant} {key}: {errors[key]:.2e} > "
                                    f"{tol:.0e}")
            entry[variant] = {"max_rel": max(errors.values()), "per_key": errors}
            print(group, case["name"], variant,
                  f"max rel {max(errors.values()):.2e} (tolerance {tol:.0e})")
        report[case["name"]] = entry
    if os.environ.get("MTP_GPU_REPORT"):
        with open(f"{os.environ['MTP_GPU_REPORT']}.{group}", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    assert not failures, failures


def test_two_gpus_match_one_gpu(world2):
    compare(*world2, "world2")


def test_two_ranks_sharing_a_gpu_match_one_gpu(shared_gpu):
    compare(*shared_gpu, "shared_gpu")


def test_collectives_captured_in_graphs_one_rank(nccl_one):
    compare(*nccl_one, "nccl_one")


def test_kernels_per_rank_interpreted(interpreted):
    compare(*interpreted, "interpreted")

"""A kernel-path switch A/B inside ``Drafter.propose``, in one process: one drafter per
variant on the same module, each with its whole-call graphs captured under that variant's
module settings, calls interleaved (the host's and the GPU clock's drift between processes
moves every variant alike). Each call's GPU time: the GPU is kept busy
(``torch.cuda._sleep``) while the host enqueues, so the events time the replay, not the host.

Variants (``--variants``, the first is the baseline): the input projections
(``mtp_kernels.backend.INPUT_PAIR`` / ``INPUT_MIX``): e_proj and h_proj in two launches or
one ("pair"), the attention hc_pre's mixes by hc_mix or from their split-K pass ("mix");
two launch settings of the hc kernels ("finish-8w", "post-mix-256"); the FP8 products'
settings for up to 4 rows ("gemv-*", each changing ``fp8_linear.BLOCKS``' first entry) and
for more than 128 rows ("many-*", its last entry), the CUDA expert kernels' ("experts-*"),
the greedy pick's kernel or torch.max ("argmax-kernel", "argmax-torch") and PDL for a
catch-up's buckets by its sequences or all its rows ("pdl-seqs", "pdl-rows"), a catch-up's
hc mixes by their kernel or cuBLAS ("mix-many-kernel", "mix-many-cublas"), quant_fp8's
launch ("quant-*"), a catch-up's last rows by one gather kernel or an index_select per tensor
("take-kernel", "take-torch"), the FP8 products of many rows by cuBLAS ("cublas-128",
"cublas-512", "cublas-off"), their broadcast add ("add-*"), their inputs' rounding
("round-*"), both ("prefix-glue", "prefix-glue-off"); the gate kernel's launch table before
v43 ("gate-v42"); the LM head by cuBLAS or other tiles ("head-*"); the call's NaN-logits bit
in its last launch or by torch ("finish-fused", "finish-torch"); its host buffers reached by
kernels where mapped, or by copy nodes ("mapped", "copies"); hc_pre's post and comb on the
side stream or in hc_finish ("comb-apart", "comb-inline"); more from a JSON file
(``--extra``);
"same", a second drafter with the defaults: the spread of a null A/B in the same run. Each
printed row also gives the call's floor (the bytes it must read over the copy bandwidth of the
same process) and each variant's ratio to it.

``--profile N`` then prints torch.profiler's table of the baseline's kernels over N calls;
``--timeline N`` its timeline over N calls (``timeline.py``: each call's span, the time some
kernel runs, the kernels' summed time and the largest idle gaps), the trace saved with
``--trace-dir``; with several calls traced, each against the first, kernel by kernel
(``timeline.compare``).

Usage (GPU):
    python benchmarks/ab_drafter.py --preset flash,pro --batches 1,64 --rows 1,4 --reps 60
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import (  # noqa: E402
    PROFILE_ONE_PRESET,
    ROT,
    _import_kernels,
    copy_bandwidth,
    fill_cache,
    init_random_gpu_,
    inputs,
    param_bytes,
    propose_floors,
)
from timeline import compare, load, summarize  # noqa: E402

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402

__all__ = ["interleaved_ms", "propose_call"]

# name -> {"module.ATTR": value} set before the variant's drafter captures its graphs
_IN = "mtp_kernels.backend.INPUT_"
_FP8 = "mtp_kernels.fp8_linear."
_MOE = "mtp_kernels.moe_cuda."
VARIANTS = {
    "two": {_IN + "PAIR": False, _IN + "MIX": False},
    "mix": {_IN + "PAIR": False, _IN + "MIX": True},
    "pair": {_IN + "PAIR": True, _IN + "MIX": False},
    "pair+mix": {_IN + "PAIR": True, _IN + "MIX": True},
    # launch settings: hc_finish's warps per row (4), hc_post's column block when it computes
    # the next mixes (128: D/128 programs per row)
    "finish-8w": {"mtp_kernels.hc.FINISH_WARPS": 8},
    "post-mix-256": {"mtp_kernels.hc._POST_MIX_BD": 256},
    # the FP8 products' launch settings for <= 4 rows (every product of a batch-1 step):
    # fp8_linear.BLOCKS' first entry (BM, BN, warps, per_sm, stages), (16, 128, 4, 4, 3) now:
    # more stages in flight, more split-K programs, the 64-wide tiles it had before, more warps
    "gemv-4stages": {_FP8 + "BLOCKS": lambda b: _first(b, stages=4)},
    "gemv-8persm": {_FP8 + "BLOCKS": lambda b: _first(b, per_sm=8)},
    "gemv-bn64": {_FP8 + "BLOCKS": lambda b: _first(b, bn=64)},
    "gemv-8w": {_FP8 + "BLOCKS": lambda b: _first(b, warps=8)},
    # the same for more than 128 rows (the catch-ups' products, h_proj from batch 33 on):
    # BLOCKS' last entry, (64, 128, 8, 2, 3) now: 128-row tiles (half the programs, each
    # weight tile read by twice the rows), with 4 stages or 4 warps; 4 stages or 4 warps alone
    "many-bm128": {_FP8 + "BLOCKS": lambda b: _last(b, bm=128)},
    "many-bm128-s4": {_FP8 + "BLOCKS": lambda b: _last(b, bm=128, stages=4)},
    "many-bm128-w4": {_FP8 + "BLOCKS": lambda b: _last(b, bm=128, warps=4)},
    "many-s4": {_FP8 + "BLOCKS": lambda b: _last(b, stages=4)},
    "many-w4": {_FP8 + "BLOCKS": lambda b: _last(b, warps=4)},
    # the CUDA expert kernels' launch settings, one changed from moe_cuda.DEFAULT_TUNE (wn 4
    # stages 2 steps 2 skip 1 now; at batch 1 six tiles of 64 blocks, under one wave): more
    # bytes in flight per warp, longer runs per row, smaller / larger blocks; w2 reading every
    # slot's row (before v49)
    "experts-4stages": {_MOE + "DEFAULT_TUNE": lambda t: {**t, "stages": 4}},
    "experts-steps4": {_MOE + "DEFAULT_TUNE": lambda t: {**t, "steps": 4}},
    "experts-2w": {_MOE + "DEFAULT_TUNE": lambda t: {**t, "wn": 2}},
    "experts-8w": {_MOE + "DEFAULT_TUNE": lambda t: {**t, "wn": 8}},
    "experts-noskip": {_MOE + "DEFAULT_TUNE": lambda t: {**t, "skip": 0}},
    # the greedy pick by kernels/argmax.py (on by default) or torch.max; buckets with PDL by
    # their sequences (a catch-up's S rows past its prefix; on by default) or by S * R rows;
    # both off: the defaults before they were measured
    "argmax-kernel": {"mtp_kernels.backend.ARGMAX_KERNEL": True},
    "argmax-torch": {"mtp_kernels.backend.ARGMAX_KERNEL": False},
    "pdl-seqs": {"mtp_kernels.propose_graph.PDL_BY_SEQS": True},
    "pdl-rows": {"mtp_kernels.propose_graph.PDL_BY_SEQS": False},
    "argmax-torch+pdl-rows": {"mtp_kernels.backend.ARGMAX_KERNEL": False,
                              "mtp_kernels.propose_graph.PDL_BY_SEQS": False},
    # the hc mixes of more than MIX_MANY_T bfloat16 rows (a catch-up's prefix) by
    # hc_mix_many (hc_mix_kernel with SPLIT3) or by the cuBLAS float32 product
    "mix-many-kernel": {"mtp_kernels.hc.MIX_MANY_KERNEL": True},
    "mix-many-cublas": {"mtp_kernels.hc.MIX_MANY_KERNEL": False},
    # quant_fp8's launch (rows per program, warps), (32, 4) now: the catch-ups' input rounding
    "quant-bm64": {_FP8 + "QUANT_LAUNCH": (64, 4)},
    "quant-bm16": {_FP8 + "QUANT_LAUNCH": (16, 4)},
    "quant-bm64-8w": {_FP8 + "QUANT_LAUNCH": (64, 8)},
    # a catch-up's last rows of its per-row tensors by one launch of kernels/rows.py or an
    # index_select each (eleven launches)
    "take-kernel": {"mtp_kernels.backend.TAKE_ROWS_KERNEL": True},
    "take-torch": {"mtp_kernels.backend.TAKE_ROWS_KERNEL": False},
    # the FP8 products of at least 128 / 512 rows by cuBLAS's block-scaled FP8 GEMM
    # (kernels/scaled_mm.py), or all by the Triton kernel
    "cublas-128": {_FP8 + "CUBLAS_ROWS": 128},
    "cublas-512": {_FP8 + "CUBLAS_ROWS": 512},
    "cublas-off": {_FP8 + "CUBLAS_ROWS": None},
    "take+cublas-512": {"mtp_kernels.backend.TAKE_ROWS_KERNEL": True, _FP8 + "CUBLAS_ROWS": 512},
    "take-torch+cublas-off": {"mtp_kernels.backend.TAKE_ROWS_KERNEL": False,
                              _FP8 + "CUBLAS_ROWS": None},
    # the broadcast add after cuBLAS's h_proj by a kernel or torch (NOTES v40); the prefix
    # products' inputs rounded for cuBLAS by the norms' kernels or by quant_fp8 (v42); both
    # together, the glue of a catch-up's prefix
    "add-kernel": {"mtp_kernels.scaled_mm.ADD_KERNEL": True},
    "add-torch": {"mtp_kernels.scaled_mm.ADD_KERNEL": False},
    "round-in-norms": {"mtp_kernels.backend.ROUND_IN_NORMS": True},
    "round-by-quant": {"mtp_kernels.backend.ROUND_IN_NORMS": False},
    "prefix-glue": {"mtp_kernels.scaled_mm.ADD_KERNEL": True,
                    "mtp_kernels.backend.ROUND_IN_NORMS": True},
    "prefix-glue-off": {"mtp_kernels.scaled_mm.ADD_KERNEL": False,
                        "mtp_kernels.backend.ROUND_IN_NORMS": False},
    # the gate kernel's launch table before v43 (two experts per program, chunks of 512 / rows
    # inputs, 4 warps) against the current one
    "gate-v42": {"mtp_kernels.moe.GATE_LAUNCH": {1: (2, 512, 4), 2: (2, 256, 4),
                                                 4: (2, 128, 4), 8: (2, 128, 4)}},
    # the LM head by cuBLAS at every row count, or the kernel with the few-row tiles before
    # v48 (64 columns, 4 warps: kernels/NOTES.md, "The head's few-row tiles")
    "head-cublas": {"mtp_kernels.head.HEAD_T": 0},
    "head-bn64-4w": {"mtp_kernels.head.TILES": {16: (64, 256, 4), 32: (128, 128, 8),
                                                64: (128, 128, 8)}},
    "head-4stages": {"mtp_kernels.head.STAGES": 4},
    # the call's NaN-logits bit in its last launch, or by torch after a cat of the probes
    "finish-fused": {"mtp_kernels.backend.FINISH_IN_COPY": True},
    "finish-torch": {"mtp_kernels.backend.FINISH_IN_COPY": False},
    # the call's staged record read from the mapped host buffer by a kernel and its error word
    # stored to the host's copy by its last kernel, or a copy node each
    "mapped": {"mtp_kernels.backend.MAPPED_HOST": True},
    "copies": {"mtp_kernels.backend.MAPPED_HOST": False},
    "copies+finish-torch": {"mtp_kernels.backend.MAPPED_HOST": False,
                            "mtp_kernels.backend.FINISH_IN_COPY": False},
    # hc_pre's post and comb (the Sinkhorn) on the step's side stream, or in hc_finish
    "comb-apart": {"mtp_kernels.backend.COMB_APART": True},
    "comb-inline": {"mtp_kernels.backend.COMB_APART": False},
    # a second drafter with the defaults: the spread of a null A/B in the same run
    "same": {},
}


def _changed(entry: tuple, change: dict) -> tuple:
    """One ``fp8_linear.BLOCKS`` entry (rows, settings) with settings changed by name."""
    rows, settings = entry
    names = ("bm", "bn", "warps", "per_sm", "stages")
    return rows, tuple(change.get(n, v) for n, v in zip(names, settings))


def _first(blocks: tuple, **change) -> tuple:
    """``fp8_linear.BLOCKS`` with its first entry's settings changed (by name)."""
    return (_changed(blocks[0], change),) + blocks[1:]


def _last(blocks: tuple, **change) -> tuple:
    """``fp8_linear.BLOCKS`` with its last entry's (the most rows') settings changed."""
    return blocks[:-1] + (_changed(blocks[-1], change),)


def _from_json(variants: dict) -> dict:
    """Variants read from JSON: lists back to tuples and dictionary keys that are integers
    back to integers (a launch table keyed by rows)."""
    def value(v):
        if isinstance(v, list):
            return tuple(value(x) for x in v)
        if isinstance(v, dict):
            return {int(k) if k.lstrip("-").isdigit() else k: value(x) for k, x in v.items()}
        return v
    return {name: {key: value(v) for key, v in s.items()} for name, s in variants.items()}


def apply(settings: dict) -> None:
    """Set each ``module.ATTR``; a callable value maps the attribute's current value."""
    for key, value in settings.items():
        module, attr = key.rsplit(".", 1)
        mod = importlib.import_module(module)
        setattr(mod, attr, value(getattr(mod, attr)) if callable(value) else value)


def propose_call(model, b: int, r: int, k: int, sets, g, pos0: int = 1000):
    """A drafter on ``model`` (whole-call graphs) holding b sequences at ``pos0`` with full
    windows, and its call: ``Drafter.propose(k)`` of r new rows per sequence from ``sets``
    (rotated), each call's rows after the last's. Four calls made (capture, warm-up)."""
    dev = next(model.parameters()).device
    d = Drafter(model, max_seqs=b, max_draft_tokens=k, cuda_graphs=True)
    for i in range(b):
        d.add_sequence(i, position=pos0)
    fill_cache(d.cache, b, pos0, g)
    state = {"pos": pos0, "j": 0}

    def call():
        nxt, h = sets[state["j"] % ROT]
        state["j"] += 1
        p = (state["pos"] + torch.arange(r, device=dev)).repeat(b)
        state["pos"] += r
        return d.propose(list(range(b)), h, nxt, p, [r] * b, k=k)

    for _ in range(4):
        call().check()
    call.drafter = d
    return call


def interleaved_ms(calls: dict, reps: int, gpu_only: bool) -> dict[str, list[float]]:
    """Each call timed alone by CUDA events, the calls alternating, ``reps`` rounds: with
    ``gpu_only`` the GPU is kept busy (``torch.cuda._sleep``) while the host enqueues, so the
    events time the replay; else the host's enqueue counts too (the GPU idles until the
    call's first work arrives)."""
    ms = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            torch.cuda.synchronize()
            if gpu_only:
                torch.cuda._sleep(400_000)  # ~0.2 ms: the host enqueues meanwhile
            a = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            e.record()
            e.synchronize()
            ms[name].append(a.elapsed_time(e))
    return ms


def _profiled(call, n: int, sleep: bool):
    """torch.profiler's record of the GPU work of n calls of ``call``; with ``sleep`` each
    after ``torch.cuda._sleep`` (the GPU busy while the host enqueues, its kernel the call's
    marker for ``timeline``)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            if sleep:
                torch.cuda._sleep(400_000)
            call()
        torch.cuda.synchronize()
    return p


def profile_call(call, n: int = 10, rows: int = 30) -> str:
    """torch.profiler's table of the GPU kernels of n calls of ``call`` (sorted by their
    total GPU time; divide by n for one call). A kernel launched early by programmatic
    dependent launch is timed with its wait for the one before: compare sums only between
    graphs captured alike (``--timeline`` shows the time some kernel runs)."""
    return _profiled(call, n, sleep=False).key_averages().table(
        sort_by="cuda_time_total", row_limit=rows, max_name_column_width=90)


def timeline_call(call, n: int, path: str) -> str:
    """n calls of ``call`` traced (``_profiled`` with the sleep markers), the trace written
    to ``path``: ``timeline.summarize``'s lines for them."""
    _profiled(call, n, sleep=True).export_chrome_trace(path)
    return summarize(load(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rows", default="1", help="new rows per sequence")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--extra", default=None,
                    help="more variants: a JSON file of {name: {module.ATTR: value}} (say "
                         "sweep_gate.py --best-out's)")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--profile", type=int, default=0,
                    help="then profile this many calls of the baseline (kernels by GPU time)")
    ap.add_argument("--timeline", type=int, default=0,
                    help="then trace this many calls of the baseline: span, busy, gaps")
    ap.add_argument("--trace-dir", default=None,
                    help="where --timeline writes its traces (default: a temporary folder)")
    args = ap.parse_args()
    if (args.profile or args.timeline) and "," in args.preset:
        ap.error(PROFILE_ONE_PRESET.format("--profile and --timeline", "A/Bs"))
    if args.extra:
        with open(args.extra) as f:
            VARIANTS.update(_from_json(json.load(f)))
    mk = _import_kernels()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    k = 3
    names = args.variants.split(",")
    defaults = {key: getattr(importlib.import_module(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])
                for n in names for key in VARIANTS[n]}
    bw = copy_bandwidth()  # the floor's bandwidth, this process's
    for preset in args.preset.split(","):
        cfg = MTPConfig.from_name(preset)
        model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
        model.backend = mk.TritonOps(model)
        pb = param_bytes(model)
        traced = {}  # (b, r) -> the baseline's traced kernels, for compare()
        baselines = []  # (b, r, the baseline's call): profiled after every A/B
        for b in map(int, args.batches.split(",")):
            for r in map(int, args.rows.split(",")):
                sets = inputs(cfg, b * r, ROT, dev, g, torch.bfloat16)
                calls = {}
                for name in names:  # each drafter's graphs captured under its settings
                    apply(VARIANTS[name])
                    calls[name] = propose_call(model, b, r, k, sets, g)
                    apply(defaults)
                ms = interleaved_ms(calls, args.reps, gpu_only=True)
                base = statistics.median(ms[names[0]])
                p = (1000 + torch.arange(r, device=dev)).repeat(b)
                floor_ms, _ = propose_floors(model, mk, pb, b, r, k, *sets[0], p,
                                             calls[names[0]].drafter.cache, bw)
                row = dict(preset=preset, batch=b, rows=r, card=torch.cuda.get_device_name(),
                           copy_TBps=round(bw / 1e12, 3), floor_ms=round(floor_ms, 4),
                           **{f"{n}_x_floor": round(statistics.median(t) / floor_ms, 4)
                              for n, t in ms.items()},
                           **{f"{n}_ms": round(statistics.median(t), 4) for n, t in ms.items()},
                           **{f"{n}_vs_{names[0]}": round(statistics.median(t) / base, 4)
                              for n, t in ms.items()})
                print(json.dumps(row), flush=True)
                baselines.append((b, r, calls[names[0]]))
        # the profiler after every A/B of the preset: once it has run, each later launch
        # costs the host several times more (graph_launch.py --after-profiler), which can
        # outlast the sleep that keeps the GPU busy while the host enqueues
        for b, r, call in baselines:
            if args.profile:
                print(f"--- {preset} {b} x {r} rows, {names[0]}: {args.profile} calls ---\n"
                      + profile_call(call, args.profile), flush=True)
            if args.timeline:
                path = os.path.join(args.trace_dir or tempfile.mkdtemp(),
                                    f"timeline_{preset}_{b}x{r}.json")
                print(f"--- {preset} {b} x {r} rows, {names[0]}: timeline of "
                      f"{args.timeline} calls ({path}) ---\n"
                      + timeline_call(call, args.timeline, path), flush=True)
                traced[(b, r)] = load(path)
        keys = list(traced)
        for key in keys[1:]:  # each traced call against the first, kernel by kernel
            (b0, r0), (b1, r1) = keys[0], key
            print(f"--- {preset}: {b1} x {r1} (b) against {b0} x {r0} (a), {names[0]}, per "
                  f"call ---\n" + compare(traced[keys[0]], traced[key]), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

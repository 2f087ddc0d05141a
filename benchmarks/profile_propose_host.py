"""Where does the host time of one graphed ``Drafter.propose`` go on a GPU machine? (GPU)

``bench_draft_step.py`` times the host side of a call (enqueue only, the GPU kept busy behind
a sleeping kernel); this script takes that call apart on the same machine: the host time with
the GPU busy and idle, with Python's garbage collector on and off, the call's parts timed one
by one (argument checks, staging, the replay, the proposal's copies, the error word and the
event), ``cProfile``'s table of the Python functions and C calls, and ``torch.profiler``'s CPU
table (each aten operation and CUDA runtime call with its host time); the graph launched by
``cuGraphLaunch`` directly, without ``CUDAGraph.replay``; then every case's whole call again,
the cases alternating (``--rounds``: the host's speed drifts within a process). Every host
time is taken before the first profiler of the process: after one, every launch costs more.

Usage:
    PYTHONPATH=.:benchmarks python benchmarks/profile_propose_host.py --preset flash \
        --batches 1,64 --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import (  # noqa: E402
    SLEEP,
    _import_kernels,
    fill_cache,
    host_enqueue_us,
    init_random_gpu_,
    inputs,
)

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402


def summary(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"median {statistics.median(xs):7.1f}  min {xs[0]:7.1f}  p10 {xs[len(xs) // 10]:7.1f}"
            f"  p90 {xs[len(xs) * 9 // 10]:7.1f}")


class Parts:
    """perf_counter around the call's parts, installed by wrapping them."""

    def __init__(self):
        self.t: dict[str, list[float]] = {}

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t.setdefault(label, []).append((time.perf_counter() - t0) * 1e6)
        setattr(obj, name, timed)
        return fn


def direct_launch(graph):
    """The graph's executable launched by the driver's ``cuGraphLaunch`` on the current
    stream, through ctypes: the launch without ``CUDAGraph.replay``'s own work."""
    cu = ctypes.CDLL("libcuda.so.1")
    cu.cuGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    exe, dev = graph.raw_cuda_graph_exec(), torch.cuda.current_device()
    stream = torch._C._cuda_getCurrentRawStream

    def launch():
        if cu.cuGraphLaunch(exe, stream(dev)):
            raise RuntimeError("cuGraphLaunch failed")
    return launch


def time_case(model, b: int, n: int, reps: int, name: str,
              rounds: int) -> tuple[dict, list[str], tuple]:
    """The host times of one case (no profiler: see :func:`main`) -> (results, lines, the
    case's state for :func:`profile_case` and ``rounds`` more rounds of ``reps`` calls)."""
    cfg = model.config
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    k, pos0 = 3, 1000
    d = Drafter(model, max_seqs=b, max_draft_tokens=k, cuda_graphs=True)
    ids = list(range(b))
    for i in ids:
        d.add_sequence(i, position=pos0)
    fill_cache(d.cache, b, pos0, g)
    sets = inputs(cfg, b * n, 4, dev, g, torch.bfloat16)
    total = 10 + (8 + rounds) * reps  # calls: warm-up, timed (3 + 1 + rounds), profiled (2)
    positions = [(torch.arange(n, device=dev) + pos0 + j * n).repeat(b) for j in range(total)]
    counter = iter(range(total))
    counts = [n] * b

    def call():
        j = next(counter)
        nxt, h = sets[j % 4]
        return d.propose(ids, h, nxt, positions[j], counts, k=k)

    for _ in range(5):
        call().check()
    res = dict(preset=name, batch=b, rows=n)
    lines = [f"=== {name} batch {b}, {n} row(s) per sequence ==="]
    for label, busy, gc_on in (("busy", True, True), ("idle", False, True),
                               ("busy, gc off", True, False)):
        if not gc_on:
            gc.disable()
        cpu: list[float] = []
        xs = host_enqueue_us(call, d.synchronize, reps, busy, cpu)
        gc.enable()
        res[label] = statistics.median(xs)
        lines.append(f"host us, GPU {label:13s}: {summary(xs)}")
        lines.append(f"  (thread CPU us)          : {summary(cpu)}")
    # the parts, timed one by one inside the call (GPU busy)
    runner = next(iter(d._proposer.made.values()))
    prog = runner.program
    parts = Parts()
    originals = [(d, "_plan", parts.wrap(d, "_plan", "argument checks (_plan)")),
                 (prog, "stage", parts.wrap(prog, "stage", "staging (stage)")),
                 (runner, "replay", parts.wrap(runner, "replay", "graph replay")),
                 (d, "_settle", parts.wrap(d, "_settle", "_settle (nothing pending)"))]
    host_enqueue_us(call, d.synchronize, reps, True)
    for obj, attr, _ in originals:  # the wrappers were instance attributes: drop them
        delattr(obj, attr)
    for label, xs in parts.t.items():
        lines.append(f"  part {label:28s}: {summary(xs)}")
    # the replay alone, and the rest of the call's torch operations alone
    xs = host_enqueue_us(runner.replay, torch.cuda.synchronize, reps, True)
    lines.append(f"  graph replay alone         : {summary(xs)}")
    launch = direct_launch(runner.graph)
    xs = host_enqueue_us(launch, torch.cuda.synchronize, reps, True)
    lines.append(f"  cuGraphLaunch alone        : {summary(xs)}")
    xs = host_enqueue_us(prog.new_out, torch.cuda.synchronize, reps, True)
    lines.append(f"  output buffer (allocation) : {summary(xs)}")
    xs = host_enqueue_us(prog.packed.clone, torch.cuda.synchronize, reps, True)
    lines.append(f"  a clone of the outputs     : {summary(xs)}")
    ev = torch.cuda.Event()

    def tail():
        prog.error_host.copy_(runner.error, non_blocking=True)
        ev.record()
    xs = host_enqueue_us(tail, torch.cuda.synchronize, reps, True)
    lines.append(f"  error copy + event alone   : {summary(xs)}")
    return res, lines, (d, call, runner)


def profile_case(state, reps: int, res: dict, lines: list[str]) -> None:
    """The profilers' view of one case (after every case's host times: see :func:`main`)."""
    d, call, runner = state
    # the replay's nodes: kernels, copies and memsets of one replay
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        runner.replay()
        torch.cuda.synchronize()
    kinds: dict[str, int] = {}
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kind = "copy" if "Memcpy" in e.name else "memset" if "Memset" in e.name else "kernel"
            kinds[kind] = kinds.get(kind, 0) + 1
    res["replay_nodes"] = kinds
    lines.append(f"  one replay runs            : {kinds}")
    # cProfile of the calls (GPU busy; under the profiler's hooks, so read its shares only)
    pr = cProfile.Profile(time.perf_counter)
    for _ in range(reps):
        d.synchronize()
        torch.cuda._sleep(SLEEP)
        pr.enable()
        call()
        pr.disable()
    d.synchronize()
    sio = io.StringIO()
    pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(30)
    lines.append(f"--- cProfile, {reps} calls, by own time ---\n{sio.getvalue()}")
    # torch.profiler, CPU activities (GPU busy)
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(reps):
            d.synchronize()
            torch.cuda._sleep(SLEEP)
            call()
        d.synchronize()
    table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                   max_name_column_width=60)
    lines.append(f"--- torch.profiler CPU, {reps} calls (and the loop's sync/sleep) ---\n{table}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3, help="then every case's whole call again, "
                    "the cases alternating, this many rounds (compared at the same moments of the "
                    "process)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    mk = _import_kernels()
    os.makedirs(args.out, exist_ok=True)
    print(json.dumps(dict(card=torch.cuda.get_device_name(), torch=torch.__version__,
                          commit=os.environ.get("MTP_COMMIT", "?"),
                          command=" ".join(sys.argv))), flush=True)
    # Every host time first, every profiler after: once torch.profiler has run, each later
    # launch of the process costs the host several times more (benchmarks/graph_launch.py
    # --after-profiler), so a case timed after another's profiling would time the profiler.
    cases = []  # each holds its drafter, which holds its model
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16,
                                               device=torch.device("cuda")), seed=0)
        model.backend = mk.TritonOps(model)
        for b in (int(x) for x in args.batches.split(",")):
            for n in (int(x) for x in args.rows.split(",")):
                res, lines, state = time_case(model, b, n, args.reps, name, args.rounds)
                print("\n".join(lines), flush=True)
                cases.append((res, lines, state))
    for r in range(args.rounds):  # the host's speed drifts: compare cases within a round
        print(f"--- round {r}: the cases' whole calls, alternating (host us, GPU busy)",
              flush=True)
        for res, lines, (d, call, _) in cases:
            xs = host_enqueue_us(call, d.synchronize, args.reps, True)
            label = f"{res['preset']} batch {res['batch']}, {res['rows']} row(s)"
            lines.append(f"round {r}: {label:26s}: {summary(xs)}")
            print(lines[-1], flush=True)
    for res, lines, state in cases:
        timed = len(lines)
        profile_case(state, args.reps, res, lines)
        print(f"=== {res['preset']} batch {res['batch']}, {res['rows']} row(s): profilers ===\n"
              + "\n".join(lines[timed:]), flush=True)
        with open(os.path.join(args.out, f"host_profile_{res['preset']}_b{res['batch']}_"
                               f"n{res['rows']}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print(json.dumps([res for res, _, _ in cases]), flush=True)


if __name__ == "__main__":
    main()

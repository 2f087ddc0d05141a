"""What does one CUDA graph launch cost the host, by the graph's size and node kinds? (GPU)

A graphed ``Drafter.propose`` is one ``cudaGraphLaunch`` of ~110 nodes; its host time on the
H200 machine moved between 11 and 140 us per launch. This times the launch alone (host
``perf_counter`` around ``graph.replay()``, the GPU kept busy behind a sleeping kernel, and
with the GPU idle) for graphs of N tiny kernels (N = 1 .. 400), with and without a
device-to-host copy into pinned memory and an external event record at the end, and for a
chain across two streams (fork / join, as the shared expert's side stream). Prints the median
and 10th-90th percentile of each, wall time and the thread's CPU time; with
``--after-profiler``, the same again after one ``torch.profiler`` session in the process.

Usage:
    python benchmarks/graph_launch.py --reps 200 [--nodes 1,110 --after-profiler]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SLEEP = 2_000_000  # cycles (~1 ms): longer than any launch timed here


def build(n: int, tail: bool, fork: bool):
    x = torch.zeros(64, device="cuda")
    err = torch.zeros((), dtype=torch.int32, device="cuda")
    host = torch.zeros((), dtype=torch.int32, pin_memory=True)
    done = torch.cuda.Event(external=True)
    side = torch.cuda.Stream()

    def run():
        for i in range(n):
            if fork and i == n // 2:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    x.add_(1)
                torch.cuda.current_stream().wait_stream(side)
            x.add_(1)
        if tail:
            host.copy_(err, non_blocking=True)
            done.record()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g, (x, err, host, done, side)


def time_launch(g, reps: int, busy: bool) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        if busy:
            torch.cuda._sleep(SLEEP)
        t0, c0 = time.perf_counter(), time.thread_time()
        g.replay()
        wall.append((time.perf_counter() - t0) * 1e6)
        cpu.append((time.thread_time() - c0) * 1e6)
    torch.cuda.synchronize()
    return wall, cpu


def stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{statistics.median(xs):7.1f} ({xs[len(xs) // 10]:.1f}-{xs[len(xs) * 9 // 10]:.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="1,10,50,150,400")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--after-profiler", action="store_true",
                    help="then time every graph again after one torch.profiler session")
    args = ap.parse_args()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), torch=torch.__version__)))
    graphs = []
    for n in (int(x) for x in args.nodes.split(",")):
        for tail, fork in ((False, False), (True, False), (True, True)):
            g, keep = build(n, tail, fork)
            for _ in range(5):
                g.replay()
            graphs.append((n, tail, fork, g, keep))
    table(graphs, args.reps, "")
    if args.after_profiler:
        # The profiler's tracing (CUPTI) seems to stay attached after the session: every
        # later launch of the process pays for it, so a host time measured after a profiler
        # in the same process is not the launch's alone (docs/performance.md, "A profiler
        # slows every later launch")
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]):
            graphs[0][3].replay()
            torch.cuda.synchronize()
        table(graphs, args.reps, " after one torch.profiler session")


def table(graphs, reps: int, when: str) -> None:
    print(f"\n| kernels | tail (D2H copy + event) | fork | busy{when}: wall us (p10-p90) | "
          "busy: cpu us | idle: wall us | idle: cpu us |")
    print("|---|---|---|---|---|---|---|")
    for n, tail, fork, g, _ in graphs:
        bw, bc = time_launch(g, reps, True)
        iw, ic = time_launch(g, reps, False)
        print(f"| {n} | {tail} | {fork} | {stats(bw)} | {stats(bc)} | {stats(iw)} | "
              f"{stats(ic)} |", flush=True)


if __name__ == "__main__":
    main()

"""What does one CUDA graph launch cost the host, by the graph's size and node kinds? (GPU)

A graphed ``Drafter.propose`` is one ``cudaGraphLaunch`` of ~150 nodes; its host time on the
H200 machine moved between 11 and 140 us per launch. This times the launch alone (host
``perf_counter`` around ``graph.replay()``, the GPU kept busy behind a sleeping kernel, and
with the GPU idle) for graphs of N tiny kernels (N = 1 .. 400), with and without a
device-to-host copy into pinned memory and an external event record at the end, and for a
chain across two streams (fork / join, as the shared expert's side stream). Prints the median
and 10th-90th percentile of each, wall time and the thread's CPU time.

Usage:
    python benchmarks/graph_launch.py --reps 200
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
    args = ap.parse_args()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), torch=torch.__version__)))
    print("| kernels | tail (D2H copy + event) | fork | busy: wall us (p10-p90) | busy: cpu us | "
          "idle: wall us | idle: cpu us |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.nodes.split(",")):
        for tail, fork in ((False, False), (True, False), (True, True)):
            g, keep = build(n, tail, fork)
            for _ in range(5):
                g.replay()
            bw, bc = time_launch(g, args.reps, True)
            iw, ic = time_launch(g, args.reps, False)
            print(f"| {n} | {tail} | {fork} | {stats(bw)} | {stats(bc)} | {stats(iw)} | "
                  f"{stats(ic)} |", flush=True)
            del g, keep


if __name__ == "__main__":
    main()

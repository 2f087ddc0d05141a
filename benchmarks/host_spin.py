"""Host time of one graphed ``Drafter.propose`` after an idle host or a busy one, in one
process, interleaved: is the GPU machine's host slow, or only slow to wake up?

Each timed call is enqueue only (the GPU kept busy behind a sleeping kernel, as
``bench_draft_step.host_enqueue_us``). Before it the host either waits (``synchronize``, then
the sleeping kernel's launch: what the benchmark's host figure does) or, in addition, spins
in Python for ``--spin-us`` (a decode loop's host is busy between its calls). Reported: median
and p10-p90 of each, and the thread's CPU time per call.

Usage (GPU):
    python benchmarks/host_spin.py --preset flash --reps 80 --spin-us 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import ROT, SLEEP, fill_cache, init_random_gpu_, inputs  # noqa: E402

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402


def spin(us: float) -> None:
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--reps", type=int, default=80)
    ap.add_argument("--spin-us", type=float, default=2000.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    cfg = MTPConfig.from_name(args.preset)
    model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
    k, pos0 = 3, 1000
    d = Drafter(model, max_seqs=1, max_draft_tokens=k, cuda_graphs=True)
    d.add_sequence(0, position=pos0)
    fill_cache(d.cache, 1, pos0, g)
    sets = inputs(cfg, 1, ROT, dev, g, torch.bfloat16)
    state = {"pos": pos0, "j": 0}
    positions = [torch.tensor([pos0 + j], device=dev) for j in range(4 + 2 * args.reps + 8)]

    def call():
        nxt, h = sets[state["j"] % ROT]
        p = positions[state["j"]]
        state["j"] += 1
        return d.propose([0], h, nxt, p, [1], k=k)

    for _ in range(4):
        call().check()
    wall = {"idle": [], "spun": []}
    cpu = {"idle": [], "spun": []}
    for _ in range(args.reps):
        for mode in ("idle", "spun"):
            d.synchronize()
            torch.cuda._sleep(SLEEP)
            if mode == "spun":
                spin(args.spin_us)
            t0, c0 = time.perf_counter(), time.thread_time()
            call()
            wall[mode].append((time.perf_counter() - t0) * 1e6)
            cpu[mode].append((time.thread_time() - c0) * 1e6)
    d.synchronize()
    out = dict(preset=args.preset, card=torch.cuda.get_device_name(), spin_us=args.spin_us)
    for mode, t in wall.items():
        t = sorted(t)
        out[mode] = dict(median_us=statistics.median(t), p10_us=t[len(t) // 10],
                         p90_us=t[len(t) * 9 // 10], cpu_median_us=statistics.median(cpu[mode]))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

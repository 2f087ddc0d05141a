"""Wall-clock speedup of speculative over plain decoding with the shipped pair on CPU.

    python examples/tiny_pair/speedup.py --threads 1 --repeats 3

Batch 1 (one held-out prompt at a time) and a batch of 16, greedy, k = 1..4; each figure is
the median of ``--repeats`` runs after a warm-up. Outputs are checked identical. Wall-clock and
this process's CPU time are both recorded: with one thread on an idle machine they agree, and
on a shared machine the CPU time is the steadier estimate of the idle wall-clock.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from mtp.demo import load_tiny_pair
from mtp.demo.prompts import heldout_prompts
from mtp.speculative import generate


def timed(repeats: int, *args, **kwargs) -> tuple[float, float, object]:
    """Median wall and CPU seconds of ``generate(*args, **kwargs)``, and its last result."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(*args, **kwargs)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, drafter = load_tiny_pair(max_seqs=16)
    prompts = heldout_prompts()
    generate(target, drafter, prompts[0][:8], 4)  # warm-up
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        p = prompts[25] if batch == 1 else prompts[:batch]
        plain_s, plain_cpu, plain = timed(args.repeats, target, None, p, args.new_tokens)
        for k in (1, 2, 3, 4):
            spec_s, spec_cpu, (spec, stats) = timed(args.repeats, target, drafter, p,
                                                    args.new_tokens, k=k)
            assert spec == plain[0]
            rows.append({"batch": batch, "k": k, "plain_s": round(plain_s, 3),
                         "spec_s": round(spec_s, 3), "speedup": round(plain_s / spec_s, 2),
                         "plain_cpu_s": round(plain_cpu, 3), "spec_cpu_s": round(spec_cpu, 3),
                         "cpu_speedup": round(plain_cpu / spec_cpu, 2),
                         "mean_accepted_length": round(stats.mean_accepted_length, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu": platform.processor() or platform.machine(),
                      "threads": args.threads, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    main()

"""Wall-clock speedup of speculative over plain decoding with the shipped pair on CPU.

    python examples/tiny_pair/speedup.py --threads 1 --repeats 3

Batch 1 (one held-out prompt at a time) and a batch of 16, greedy, k = 1..4; each figure is
the median of ``--repeats`` runs after a warm-up. Outputs are checked identical.
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


def timed(repeats: int, *args, **kwargs) -> tuple[float, object]:
    """Median seconds of ``generate(*args, **kwargs)`` and its last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, drafter = load_tiny_pair(max_seqs=16)
    prompts = heldout_prompts()
    generate(target, drafter, prompts[0][:8], 4)  # warm-up
    rows = []
    for batch in (1, 16):
        p = prompts[25] if batch == 1 else prompts[:batch]
        plain_s, plain = timed(args.repeats, target, None, p, args.new_tokens)
        for k in (1, 2, 3, 4):
            spec_s, (spec, stats) = timed(args.repeats, target, drafter, p, args.new_tokens, k=k)
            assert spec == plain[0]
            rows.append({"batch": batch, "k": k, "plain_s": round(plain_s, 3),
                         "spec_s": round(spec_s, 3), "speedup": round(plain_s / spec_s, 2),
                         "mean_accepted_length": round(stats.mean_accepted_length, 2)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"cpu": platform.processor() or platform.machine(),
                      "threads": args.threads, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    main()

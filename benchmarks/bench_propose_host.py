"""The host side of one ``Drafter.propose`` on the whole-call graph path, on the CPU.

Everything a graphed call does except the replay itself: the argument checks, the bucket
lookup, staging the inputs into the program's buffers, the proposal's copies, the error word's
copy, the bookkeeping. The bucket's program runs once (its outputs are real tensors), then its
replay is a no-op, as a captured graph's replay is one launch for the host. Reported per case:
microseconds per call (min / 25th percentile / median of ``--reps`` calls, enqueue only: the
call does not wait for anything), the median time of reading the proposal's ``drafts``
afterwards (made on first read), and the aten operations one call dispatches (counted with a
``TorchDispatchMode``; on CUDA each is a launch, a copy or an allocation, ~5-15 us of host
time there, and the same ones run: the code does not branch on the device before them).

Cases: S sequences held, s of them in the call, n new rows each (a call with s = S and n
the bucket's rows fills its bucket: plain copies; otherwise the rows are gathered), greedy, and
two sampled (temperature 0.7, top-p 0.9, one generator: the settings and fresh uniforms staged
too).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_propose_host.py [--preset tiny] [--reps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402
from mtp.sampling import GREEDY, Sampling  # noqa: E402
from mtp.testing import CountOps, host_only, init_random_  # noqa: E402


def case(model, held: int, s: int, n: int, k: int, reps: int, sampled: bool = False,
         streams: bool = False) -> dict:
    cfg = model.config
    d = host_only(Drafter(model, max_seqs=held, max_draft_tokens=k))
    ids = list(range(s))
    for i in range(held):
        d.add_sequence(i, position=1000)
    t = s * n
    h = torch.randn(t, cfg.hc_dim).to(model.dtype)
    if streams:  # [T, M, D]: transformers' residual layout
        h = h.view(t, cfg.hc_mult, cfg.hidden_size)
    nxt = torch.randint(0, cfg.vocab_size, (t,))
    counts = [n] * s
    sampling = Sampling(temperature=0.7, top_p=0.9, generator=torch.Generator()) if sampled \
        else GREEDY
    # positions made ahead: each call's rows start where the previous call's ended
    pos = [(torch.arange(n) + 1000 + j * n).repeat(s) for j in range(reps + 3)]
    for j in range(2):  # the first makes the bucket's program
        d.propose(ids, h, nxt, pos[j], counts, k=k, sampling=sampling)
    times, reads = [], []
    for j in range(2, reps + 2):
        t0 = time.perf_counter()
        p = d.propose(ids, h, nxt, pos[j], counts, k=k, sampling=sampling)
        t1 = time.perf_counter()
        p.drafts  # noqa: B018 - what a caller reads next: its tensor is made on first read
        reads.append((time.perf_counter() - t1) * 1e6)
        times.append((t1 - t0) * 1e6)
    with CountOps() as c:
        d.propose(ids, h, nxt, pos[reps + 2], counts, k=k, sampling=sampling)
    times.sort()
    reads.sort()
    return dict(held=held, seqs=s, rows=n, k=k, sampled=sampled, hidden=list(h.shape[1:]),
                us_min=round(times[0], 1),
                us_p25=round(times[len(times) // 4], 1),
                us_median=round(times[len(times) // 2], 1),
                read_drafts_us_median=round(reads[len(reads) // 2], 1),
                ops=sum(c.ops.values()), by_op=dict(c.ops))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = init_random_(DeepSeekV4MTP(MTPConfig.from_name(args.preset), dtype=torch.bfloat16))
    # (held, in the call, rows each): batch 1 and 64 filling their bucket with 1 and k + 1 rows;
    # partial buckets (3 of 4 bucket, 48 of 64, 2 rows of a 4-row bucket)
    for held, s, n in ((1, 1, 1), (1, 1, 4), (64, 64, 1), (64, 64, 4), (4, 3, 2),
                       (64, 48, 3)):
        print(json.dumps(case(model, held, s, n, 3, args.reps)), flush=True)
    for held, s, n in ((1, 1, 1), (64, 64, 1)):
        print(json.dumps(case(model, held, s, n, 3, args.reps, sampled=True)), flush=True)
    print(json.dumps(case(model, 1, 1, 1, 3, args.reps, streams=True)), flush=True)


if __name__ == "__main__":
    main()

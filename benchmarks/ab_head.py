"""The LM head's two implementations inside ``Drafter.propose``, in one process, calls
interleaved: the whole-call graphs of one drafter captured with the Triton head kernel, of a
second with cuBLAS (``TritonOps(head=...)``), on the same module and inputs. Each call timed
alone (host included, as ``bench_draft_step``'s ``Drafter.propose`` rows), A and B alternating,
so that the host's speed, which moves between processes on the GPU machines, moves both alike.

Usage (GPU):
    python benchmarks/ab_head.py --preset flash --batches 1,64 --reps 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import (  # noqa: E402
    ROT,
    _import_kernels,
    fill_cache,
    init_random_gpu_,
    inputs,
)

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402
from mtp.drafter import Drafter  # noqa: E402

HEADS = ("triton", "cublas")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    mk = _import_kernels()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    k, pos0 = 3, 1000
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
        for b in map(int, args.batches.split(",")):
            sets = inputs(cfg, b, ROT, dev, g, torch.bfloat16)
            calls = {}
            for head in HEADS:  # each drafter's graphs captured with its own head
                model.backend = mk.TritonOps(model, head=head)
                d = Drafter(model, max_seqs=b, max_draft_tokens=k, cuda_graphs=True)
                for i in range(b):
                    d.add_sequence(i, position=pos0)
                fill_cache(d.cache, b, pos0, g)
                state = {"pos": pos0, "j": 0}

                def call(d=d, state=state, sets=sets, b=b):
                    nxt, h = sets[state["j"] % ROT]
                    state["j"] += 1
                    p = torch.full((b,), state["pos"], device=dev)
                    state["pos"] += 1
                    return d.propose(list(range(b)), h, nxt, p, [1] * b, k=k)

                for _ in range(4):  # capture, warm-up
                    call().check()
                calls[head] = call
            times = {head: [] for head in HEADS}
            for _ in range(args.reps):
                for head in HEADS:
                    torch.cuda.synchronize()
                    a = torch.cuda.Event(enable_timing=True)
                    e = torch.cuda.Event(enable_timing=True)
                    a.record()
                    calls[head]()
                    e.record()
                    e.synchronize()
                    times[head].append(a.elapsed_time(e))
            row = dict(preset=name, batch=b, card=torch.cuda.get_device_name(),
                       **{f"{h}_ms": statistics.median(t) for h, t in times.items()},
                       **{f"{h}_p10_p90": sorted(t)[len(t) // 10:: len(t) * 8 // 10][:2]
                          for h, t in times.items()})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

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

from ab_drafter import interleaved_ms, propose_call  # noqa: E402
from bench_draft_step import ROT, _import_kernels, init_random_gpu_, inputs  # noqa: E402

from mtp import DeepSeekV4MTP, MTPConfig  # noqa: E402

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
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
        for b in map(int, args.batches.split(",")):
            sets = inputs(cfg, b, ROT, dev, g, torch.bfloat16)
            calls = {}
            for head in HEADS:  # each drafter's graphs captured with its own head
                model.backend = mk.TritonOps(model, head=head)
                calls[head] = propose_call(model, b, 1, 3, sets, g)
            times = interleaved_ms(calls, args.reps, gpu_only=False)
            row = dict(preset=name, batch=b, card=torch.cuda.get_device_name(),
                       **{f"{h}_ms": statistics.median(t) for h, t in times.items()},
                       **{f"{h}_p10_p90": sorted(t)[len(t) // 10:: len(t) * 8 // 10][:2]
                          for h, t in times.items()})
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Which tiles make the LM head kernel fastest on this GPU? (GPU; repo root)

``mtp_kernels.head.TILES`` was swept on an H100 (kernels/NOTES.md, round 6). This times
``head_logits`` for each (BN, BK, warps, stages) at the given rows, against cuBLAS and the
floor (the head's bytes over the copy bandwidth measured in the same process). The head is
~1 GB (bigger than L2), so consecutive calls find nothing cached.

Usage:
    PYTHONPATH=.:benchmarks python benchmarks/sweep_head.py --preset flash,pro --rows 1,4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth, time_it  # noqa: E402

from mtp import MTPConfig  # noqa: E402


def us(reps: int, fn, *a, **k) -> float:
    """Median microseconds of one call of fn(*a, **k), each timed alone."""
    return statistics.median(time_it(lambda i: fn(*a, **k), reps)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash,pro")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--bk", default="128,256")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="3,4")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    _import_kernels()
    from mtp_kernels import head as hd
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    bw = copy_bandwidth()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), copy_TBps=bw / 1e12,
                          default_tiles=hd.TILES, command=" ".join(sys.argv))), flush=True)
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        w = torch.randn(cfg.vocab_size, cfg.hidden_size, device="cuda").to(torch.bfloat16)
        floor_us = w.numel() * 2 / bw * 1e6
        for t in ints(args.rows):
            y = torch.randn(t, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)

            base = us(args.reps, hd.head_logits, y, w)
            cublas = us(args.reps, torch.mm, y, w.t(), out_dtype=torch.float32)
            print(f"{name} rows {t}: floor {floor_us:.1f} us, default {base:.1f}, cuBLAS "
                  f"{cublas:.1f}", flush=True)
            best = (base, "default")
            for bn, bk, warps, stages in itertools.product(ints(args.bn), ints(args.bk),
                                                           ints(args.warps), ints(args.stages)):
                tune = dict(bn=bn, bk=bk, warps=warps, stages=stages)
                try:
                    x = us(args.reps, hd.head_logits, y, w, tune=tune)
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit: say so
                    print(f"  {tune}: failed ({type(exc).__name__})", flush=True)
                    continue
                print(f"  {tune}: {x:.1f} us ({floor_us / x:.2f} of the floor's speed)",
                      flush=True)
                best = min(best, (x, json.dumps(tune)))
            print(f"{name} rows {t}: best {best[1]} {best[0]:.1f} us; floor {floor_us:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()

"""The routed-expert products alone: Triton kernels (``mtp_kernels.moe``) against the CUDA ones
(``mtp_kernels.moe_cuda``) at V4 shapes, same inputs and run (GPU; repo root).

For each row count: 4 random routings of the same size, cycled inside one CUDA-graph replay so
no call finds its experts in L2 (as in the real draft step); time per call (median of replays),
the bytes of the experts touched and the bandwidth, beside the device copy bandwidth. Also the
agreement of the two (relative difference of the w2 outputs on the same rounded input), the
``quant_rows`` cost, and a few launch settings of the CUDA kernels (``--tunes``).

Usage:
    PYTHONPATH=. python benchmarks/bench_experts.py --preset flash --rows 1,64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth  # noqa: E402
from bench_kernels import random_experts  # noqa: E402
from sweep_kernels import bench_cycle, cuda_routes  # noqa: E402

from mtp import MTPConfig  # noqa: E402
from mtp.quant import fp8_simulate  # noqa: E402

TUNES = '{};{"skip": 0};{"stages": 4};{"wn": 2, "steps": 4};{"wn": 8}'  # {}: the defaults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tunes", default=TUNES, help="CUDA launch settings, ';'-separated JSON")
    ap.add_argument("--tiles", default="8,16", help="pair slots per tile for the CUDA kernels")
    args = ap.parse_args()
    _import_kernels()
    from mtp_kernels import moe, moe_cuda
    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s", flush=True)
    dev = "cuda"
    tunes = [json.loads(x) for x in args.tunes.split(";") if x]
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
        w13, s13, w2, s2 = random_experts(cfg, dev)
        for t in [int(x) for x in args.rows.split(",")]:
            u = fp8_simulate(torch.randn(t, d, device=dev, dtype=torch.bfloat16), 128)
            routes, idxs = [], []
            for _ in range(4):
                idx = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)])
                pairs, texp = moe.align_tiles(idx, e)
                routes.append((pairs, texp, torch.rand(t, k, device=dev),
                               idx.unique().numel()))
                idxs.append(idx)
            used = statistics.mean(r[3] for r in routes)
            b13 = used * (w13[0].numel() + s13[0].numel())
            b2 = used * (w2[0].numel() + s2[0].numel())

            def line(what, m13, m2, b13=b13, b2=b2):
                print(f"  {what:40s} w13 {m13 * 1e3:7.1f} us {b13 / m13 / 1e9:5.2f} TB/s | "
                      f"w2 {m2 * 1e3:7.1f} us {b2 / m2 / 1e9:5.2f} TB/s", flush=True)

            print(f"\n{name}, {t} rows ({used:.0f} experts, floor w13 "
                  f"{b13 / bw * 1e6:.1f} us, w2 {b2 / bw * 1e6:.1f} us)", flush=True)
            tri = dict(act_quant=False, rounded=True)
            acts = [moe.moe_w13(u, w13, s13, p, te, wt, limit=10.0, **tri)
                    for p, te, wt, _ in routes]
            for a, (p, *_) in zip(acts, routes):
                moe.round_rows(a, p)
            line("triton (moe, default decode)",
                 bench_cycle(args.reps, [functools.partial(
                     moe.moe_w13, u, w13, s13, p, te, wt, limit=10.0, **tri)
                     for p, te, wt, _ in routes]),
                 bench_cycle(args.reps, [functools.partial(
                     moe.moe_w2, a, w2, s2, p, te, t * k, **tri)
                     for a, (p, te, *_) in zip(acts, routes)]))
            xh, xs = moe.quant_rows(u)
            for bm in [int(x) for x in args.tiles.split(",")]:
                # the same routings, tiled for the CUDA kernels (bm pair slots per tile)
                croutes, q2 = cuda_routes(moe, moe_cuda, idxs, [r[2] for r in routes], e, bm,
                                          xh, xs, w13, s13)
                for tune in tunes:
                    line(f"cuda tiles {bm} {json.dumps(tune)}",
                         bench_cycle(args.reps, [functools.partial(
                             moe_cuda.moe_w13, xh, xs, w13, s13, p, te, wt, limit=10.0,
                             tune=tune) for p, te, wt in croutes]),
                         bench_cycle(args.reps, [functools.partial(
                             moe_cuda.moe_w2, a, sa, w2, s2, p, te, t * k, tune=tune)
                             for (a, sa), (p, te, _) in zip(q2, croutes)]))
            # agreement: w2 of both paths on the same rounded input (the Triton tiling)
            p, te, *_ = routes[0]
            ah, as_ = moe.quant_rows(acts[0], p)
            o_c = moe_cuda.moe_w2(ah, as_, w2, s2, p, te, t * k).double()
            o_t = moe.moe_w2(acts[0], w2, s2, p, te, t * k, **tri).double()
            q_ms = bench_cycle(args.reps, [functools.partial(moe.quant_rows, a, p)
                                           for a, (p, *_) in zip(acts, routes)])
            print(f"  w2 cuda vs triton, same input: rel. difference "
                  f"{((o_c - o_t).norm() / o_t.norm()).item():.1e}; quant_rows of the w2 input "
                  f"{q_ms * 1e3:.1f} us", flush=True)
        del w13, s13, w2, s2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

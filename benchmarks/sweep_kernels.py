"""Which launch settings are fastest for each kernel and shape? (GPU; repo root)

Times the FP8 products (``fp8_linear``: tile width, warps, pipeline stages, split-K programs per
multiprocessor) and the FP4 expert products (``moe_w13`` / ``moe_w2``: e2m1 decode, tile width,
warps, stages; ``moe_cuda``: warps, stages, steps per stage) at V4-Flash shapes, for 1 and 64
rows, with every other setting as the library's default. Each timing is the median of CUDA-graph
replays; a replay cycles through enough copies of the weights (>= 256 MB) that no call finds its
weights in L2, as in the real draft step.
Prints the default's time, the best setting and its time per kernel and shape; the full table
goes to ``$OUT/sweep_kernels.json``.

Usage:
    PYTHONPATH=. python benchmarks/sweep_kernels.py --rows 1,64
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth, time_it  # noqa: E402
from bench_kernels import random_experts  # noqa: E402

from mtp import MTPConfig  # noqa: E402
from mtp.quant import fp8_simulate  # noqa: E402

L2_DEFEAT = 256e6  # bytes of distinct weights per replay


def bench_cycle(reps, calls) -> float:
    """Median ms of one call, from graph replays of the whole list of calls."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return statistics.median(time_it(lambda j: g.replay(), reps)) / len(calls)


def copies(nbytes: int) -> int:
    return max(2, int(-(-L2_DEFEAT // nbytes)))


def expert_calls(moe, kern, u, acts, routes, weights, n_pairs, kw):
    w13, s13, w2, s2 = weights
    if kern == "w13":
        return [functools.partial(moe.moe_w13, u, w13, s13, p, te, wt, limit=10.0, **kw)
                for p, te, wt in routes]
    return [functools.partial(moe.moe_w2, a, w2, s2, p, te, n_pairs, **kw)
            for a, (p, te, _) in zip(acts, routes)]


def cuda_routes(moe, moe_cuda, idxs, wts, n_experts, bm, xh, xs, w13, s13):
    """The routings tiled for the CUDA expert kernels (bm slots per tile) as [(pairs,
    tile_expert, weights)], and per routing the w2 input those kernels take, (xh, xs) of the
    w13 output."""
    croutes = [moe.align_tiles(i, n_experts, bm) + (wt,) for i, wt in zip(idxs, wts)]
    acts = [moe_cuda.moe_w13(xh, xs, w13, s13, p, te, wt, limit=10.0) for p, te, wt in croutes]
    return croutes, [moe.quant_rows(a, p) for a, (p, _, _) in zip(acts, croutes)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    _import_kernels()
    from mtp_kernels import moe
    from mtp_kernels.fp8_linear import fp8_linear
    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s", flush=True)
    cfg = MTPConfig.from_name("flash")
    dev = "cuda"
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    shapes = {"wq_b": (cfg.num_attention_heads * cfg.head_dim, cfg.q_lora_rank),
              "wqa_wkv": (cfg.q_lora_rank + cfg.head_dim, d), "wo_b": (d, 8192),
              "h_proj": (d, d), "shared_down": (d, cfg.moe_intermediate_size)}
    rows_out = []
    for t in [int(x) for x in args.rows.split(",")]:
        print(f"\n{t} rows", flush=True)
        for name, (n, kk) in shapes.items():
            nbytes = n * kk
            ws = [torch.randn(n, kk, device=dev).to(torch.float8_e4m3fn)
                  for _ in range(copies(nbytes))]
            sc = torch.full((-(-n // 128), kk // 128), 120, dtype=torch.uint8,
                            device=dev).view(torch.float8_e8m0fnu)
            x = torch.randn(t, kk, device=dev, dtype=torch.bfloat16)
            results = {}
            for bn, warps, stages, per_sm in itertools.product((64, 128), (4, 8), (3, 4),
                                                               (2, 4, 8)):
                tune = dict(bn=bn, warps=warps, stages=stages, per_sm=per_sm)
                calls = [functools.partial(fp8_linear, x, w, sc, act_quant=True, tune=tune)
                         for w in ws]
                results[json.dumps(tune)] = bench_cycle(args.reps, calls)
            default = bench_cycle(args.reps, [functools.partial(fp8_linear, x, w, sc,
                                                                act_quant=True) for w in ws])
            best = min(results, key=results.get)
            print(f"  fp8_linear {name:11s} [{n}x{kk}] default {default * 1e3:7.1f} us "
                  f"({nbytes / default / 1e9:.2f} TB/s) | best {results[best] * 1e3:7.1f} us "
                  f"{best}", flush=True)
            rows_out.append(dict(kernel="fp8_linear", shape=name, rows=t, default_ms=default,
                                 sweep=results))
            del ws
        w13, s13, w2, s2 = random_experts(cfg, dev)
        u = fp8_simulate(torch.randn(t, d, device=dev, dtype=torch.bfloat16), 128)
        # 4 routings of the same size, cycled, so no call finds its experts in L2
        routes, idxs = [], []
        for _ in range(4):
            idx = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)])
            wts = torch.rand(t, k, device=dev)
            pairs, texp = moe.align_tiles(idx, e)
            routes.append((pairs, texp, wts))
            idxs.append(idx)
        base = dict(act_quant=False, rounded=True)
        acts = [moe.moe_w13(u, w13, s13, p, te, wt, limit=10.0, **base)
                for p, te, wt in routes]
        for kern in ("w13", "w2"):
            results = {}
            for dec, bn, warps, stages in itertools.product(("f16x2", "mx"), (32, 64, 128),
                                                            (4, 8), (2, 3, 4)):
                if bn == 128 and warps == 4:
                    continue  # spills
                kw = dict(base, decode=dec, block_n=bn, tune=dict(warps=warps, stages=stages))
                calls = expert_calls(moe, kern, u, acts, routes, (w13, s13, w2, s2), t * k, kw)
                key = json.dumps(dict(decode=dec, bn=bn, warps=warps, stages=stages))
                results[key] = bench_cycle(args.reps, calls)
            calls = expert_calls(moe, kern, u, acts, routes, (w13, s13, w2, s2), t * k, base)
            default = bench_cycle(args.reps, calls)
            best = min(results, key=results.get)
            print(f"  moe_{kern} default {default * 1e3:8.1f} us | best "
                  f"{results[best] * 1e3:8.1f} us {best}", flush=True)
            rows_out.append(dict(kernel=f"moe_{kern}", rows=t, default_ms=default,
                                 sweep=results))
        # the CUDA expert kernels (moe_cuda): warps per block, stages, steps per stage
        from mtp_kernels import moe_cuda
        xh, xs = moe.quant_rows(u)
        croutes, q2 = cuda_routes(moe, moe_cuda, idxs, [wt for _, _, wt in routes], e,
                                  moe_cuda.TILE, xh, xs, w13, s13)
        for kern in ("w13", "w2"):
            results = {}
            for wn, stages, steps in itertools.product((1, 2, 4, 8), (2, 4, 8), (2, 4, 8)):
                tune = dict(wn=wn, stages=stages, steps=steps)
                if moe_cuda._smem(wn, stages, steps) > 48 * 1024:
                    continue
                if kern == "w13":
                    calls = [functools.partial(moe_cuda.moe_w13, xh, xs, w13, s13, p, te, wt,
                                               limit=10.0, tune=tune) for p, te, wt in croutes]
                else:
                    calls = [functools.partial(moe_cuda.moe_w2, a, sa, w2, s2, p, te, t * k,
                                               tune=tune)
                             for (a, sa), (p, te, _) in zip(q2, croutes)]
                results[json.dumps(tune)] = bench_cycle(args.reps, calls)
            default = results[json.dumps(moe_cuda.DEFAULT_TUNE)]
            best = min(results, key=results.get)
            print(f"  moe_cuda {kern} default {default * 1e3:8.1f} us | best "
                  f"{results[best] * 1e3:8.1f} us {best}", flush=True)
            rows_out.append(dict(kernel=f"moe_cuda_{kern}", rows=t, default_ms=default,
                                 sweep=results))
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_kernels.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), copy_TBps=bw / 1e12, rows=rows_out),
                  f, indent=1)


if __name__ == "__main__":
    main()

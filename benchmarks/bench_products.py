"""A catch-up's FP8 products of many rows, alone: the Triton kernel against cuBLAS's
block-scaled FP8 GEMM (``fp8_linear.CUBLAS_ROWS``). (GPU; repo root)

For Flash and Pro, a catch-up of 128 rows per sequence at 1 and 4 sequences runs e_proj
(S*128 rows), h_proj (its 4 streams: S*512 rows, e_proj's output added) and the attention's
wq_a and wkv in one product (S*128 rows). Each is timed both ways, its input rounding
(``quant_fp8``) included, and that rounding alone, as the median of CUDA-graph replays that
cycle through enough copies of the weight (>= 256 MB) that none is found in L2. Printed per
product: rows, both times in us, both rates in TFLOPS, the floors (the weight's and
activations' bytes over the copy bandwidth measured here; the FLOPs at the card's dense FP8
rate, where the card is known), the rounding's time and floor, and the two results'
relative difference and share of bit-equal outputs.

Usage:
    PYTHONPATH=. python benchmarks/bench_products.py --preset flash,pro --seqs 1,4
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth  # noqa: E402
from sweep_kernels import bench_cycle, copies  # noqa: E402

from mtp import MTPConfig  # noqa: E402
from mtp.quant import quantize_fp8_block  # noqa: E402

# Dense FP8 tensor-core rate by the datasheets (TFLOPS; the SXM cards: 989 is bfloat16's)
FP8_DENSE_TFLOPS = {"H100": 1979.0, "H200": 1979.0}


def products(cfg: MTPConfig, seqs: int) -> list[tuple[str, int, int, int, int]]:
    """(name, rows, N, K, add_row_div) of a catch-up's many-row products."""
    d, t = cfg.hidden_size, 128 * seqs
    return [("e_proj", t, d, d, 1), ("h_proj", t * cfg.hc_mult, d, d, cfg.hc_mult),
            ("wq_a+wkv", t, cfg.q_lora_rank + cfg.head_dim, d, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash,pro")
    ap.add_argument("--seqs", default="1,4")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    mk = _import_kernels()
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels import scaled_mm
    dev = torch.device("cuda")
    why = scaled_mm.unavailable(dev)
    card = torch.cuda.get_device_name()
    peak = next((v for k, v in FP8_DENSE_TFLOPS.items() if k in card), None)
    bw = copy_bandwidth()
    print(json.dumps({"card": card, "copy_TBps": round(bw / 1e12, 3), "fp8_dense_TFLOPS": peak,
                      "cublas": why or "available", "triton_mtp_kernels": mk.__name__}))
    if why:
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    for preset in args.preset.split(","):
        cfg = MTPConfig.from_name(preset)
        for seqs in map(int, args.seqs.split(",")):
            for name, m, n, k, div in products(cfg, seqs):
                w, s = quantize_fp8_block(torch.randn(n, k, device=dev, generator=g) * k ** -0.5)
                ws = [(w.clone(), s.clone()) for _ in range(copies(w.numel()))]
                x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
                add = (torch.randn(m // div, n, device=dev, generator=g).to(torch.bfloat16)
                       if div > 1 else None)
                kw = dict(act_quant=True, add=add, add_row_div=div)
                out = {}
                for way, rows in (("triton", None), ("cublas", 1)):
                    fl.CUBLAS_ROWS = rows
                    calls = [functools.partial(fl.fp8_linear, x, wi, si, **kw) for wi, si in ws]
                    out[way] = (bench_cycle(args.reps, calls) * 1e3, fl.fp8_linear(x, w, s, **kw))
                fl.CUBLAS_ROWS = None
                xs = [x.clone() for _ in range(copies(x.numel() * 2))]
                quant_us = bench_cycle(args.reps, [functools.partial(fl.quant_fp8, xi, k)
                                                   for xi in xs]) * 1e3
                flops = 2.0 * m * n * k
                nbytes = n * k + m * k * 2 + m * n * 2 * (2 if add is not None else 1)
                a, b = out["triton"][1].double(), out["cublas"][1].double()
                (t_us, _), (c_us, _) = out["triton"], out["cublas"]
                print(json.dumps({
                    "preset": preset, "seqs": seqs, "product": name, "rows": m, "N": n, "K": k,
                    "triton_us": round(t_us, 1), "cublas_us": round(c_us, 1),
                    "triton_TFLOPS": round(flops / t_us / 1e6), "cublas_TFLOPS":
                    round(flops / c_us / 1e6),
                    "bytes_floor_us": round(nbytes / bw * 1e6, 1),
                    "quant_us": round(quant_us, 1),  # quant_fp8 alone (in both times above)
                    "quant_floor_us": round(m * k * 3 / bw * 1e6, 1),
                    "flops_floor_us": round(flops / (peak * 1e6), 1) if peak else None,
                    "rel_diff": float((a - b).norm() / a.norm()),
                    "bit_equal": round(float((a == b).double().mean()), 4)}), flush=True)


if __name__ == "__main__":
    main()

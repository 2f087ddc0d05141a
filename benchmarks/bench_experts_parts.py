"""What limits the CUDA expert kernels (``kernels/moe_fp4.cu``): the kernels timed with parts
of their work taken out, at V4 shapes (GPU; repo root).

Each variant is the kernel source with a few lines replaced (declared below, applied to the
text before NVRTC compiles it), timed as ``bench_experts.py`` times the kernels: 4 random
routings cycled in one CUDA-graph replay so no call finds its experts in L2. The variants
without the math or the activation loads compute nothing useful; they only measure. Also a
w2 of twice the input width (K = 2I, as w13's K: random weights) to see whether a longer
warp helps. Printed: time and bandwidth of w13, w2 and the wide w2 per variant, beside the
device copy bandwidth and the floors (the bytes of the experts touched). kernels/NOTES.md,
"What holds w2 back at 64 rows", is this script's first run.

Usage:
    PYTHONPATH=. python benchmarks/bench_experts_parts.py --preset flash --rows 64
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# 47 KB of static shared memory per block (48128 bytes with the default 4 warps x 2 stages):
# at most 4 blocks per multiprocessor whatever the registers, so the variants that free
# registers do not also gain occupancy
_FOUR_BLOCKS = ("__shared__ __align__(128) u8 smem[WN][S][St::BYTES];",
                "__shared__ __align__(128) u8 smem[WN][S][St::BYTES + 3584];")
# no e2m1 decode, no mma: the weights (from shared memory) and the activations still read,
# folded into one float so that the compiler keeps their loads
_NO_MATH = (("      e2m1x8_f16(wa, fa);\n",
             "#if 0\n      e2m1x8_f16(wa, fa);\n"),
            ("          part[h][3] += d[3] * scb;\n        }\n      }\n",
             "          part[h][3] += d[3] * scb;\n        }\n      }\n#else\n"
             "#pragma unroll\n"
             "      for (int h = 0; h < G; ++h)\n"
             "        part[h][0] += __uint_as_float(((cur.x[h][j].x ^ cur.x[h][j].w ^ wa ^ wb) "
             "& 0x007fffffu) | 0x3f800000u);\n"
             "#endif\n"))
# no activation loads: constants in their registers
_NO_ACTS = (("b.x[h][j] = bx[h] ? ldg128(xp[h] + st * 128 + j * 32) : uint4{0u, 0u, 0u, 0u};",
             "b.x[h][j] = uint4{(u32)st, (u32)j, (u32)lane, 0u};"),
            ("b.s[h][0] = bs[h][0] ? __ldg(sp[h][0] + st) : 0.0f;", "b.s[h][0] = 1.0f;"),
            ("b.s[h][1] = bs[h][1] ? __ldg(sp[h][1] + st) : 0.0f;", "b.s[h][1] = 1.0f;"))
# every tile's w2 activations from the same 8 rows (w13 reads token rows, shared by tiles)
_SHARED_ROWS = (("tile * TILE + h * 8 + g;", "h * 8 + g;"),
                ("tile * TILE + h * 8 + 2 * c + t;", "h * 8 + 2 * c + t;"))

# name -> (what it measures, [(the source's text, its replacement)])
VARIANTS = {
    "as-is": ("the kernels as they are", []),
    "four-blocks": ("4 blocks per SM (47 KB of shared memory each)", [_FOUR_BLOCKS]),
    "no-math": ("no decode, no mma; 4 blocks per SM", [*_NO_MATH, _FOUR_BLOCKS]),
    "no-math-no-acts": ("no decode, no mma, no activation loads; 4 blocks per SM",
                        [*_NO_MATH, *_NO_ACTS, _FOUR_BLOCKS]),
    "shared-rows": ("w2's activations from the same 8 rows for every tile", [*_SHARED_ROWS]),
}


def variant_source(source: str, name: str) -> str:
    """The kernel source of variant ``name``: each replaced text must occur exactly once (a
    kernel change that moves it makes the variant fail loudly, not measure something else)."""
    for old, new in VARIANTS[name][1]:
        if source.count(old) != 1:
            raise ValueError(f"variant {name!r}: {old.strip()[:60]!r} occurs "
                             f"{source.count(old)} times in the kernel source, not once")
        source = source.replace(old, new)
    return source


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", default=",".join([*VARIANTS, "as-is"]))
    args = ap.parse_args()

    import torch
    from bench_draft_step import _import_kernels, copy_bandwidth
    from bench_kernels import random_experts
    from sweep_kernels import bench_cycle, cuda_routes

    from mtp import MTPConfig
    from mtp.quant import fp8_simulate
    _import_kernels()
    from mtp_kernels import moe, moe_cuda

    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s", flush=True)
    cfg = MTPConfig.from_name(args.preset)
    d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    i, t, dev = cfg.moe_intermediate_size, args.rows, "cuda"
    w13, s13, w2, s2 = random_experts(cfg, dev)
    u = fp8_simulate(torch.randn(t, d, device=dev, dtype=torch.bfloat16), 128)
    xh, xs = moe.quant_rows(u)
    idxs = [torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)])
            for _ in range(4)]
    wts = [torch.rand(t, k, device=dev) for _ in range(4)]
    croutes, q2 = cuda_routes(moe, moe_cuda, idxs, wts, e, moe_cuda.TILE, xh, xs, w13, s13)
    used = statistics.mean(ix.unique().numel() for ix in idxs)
    # the wide w2: K = 2I inputs (random codes), its input the w2 input twice side by side
    w2w = torch.randint(-128, 128, (e, d, i), dtype=torch.int8, device=dev)
    s2w = torch.full((e, d, i // 16), 120, dtype=torch.uint8,
                     device=dev).view(torch.float8_e8m0fnu)
    q2w = [(torch.cat([a, a], 1).contiguous(), torch.cat([s, s], 1).contiguous())
           for a, s in q2]
    nbytes = [used * (w[0].numel() + s[0].numel()) for w, s in ((w13, s13), (w2, s2),
                                                                  (w2w, s2w))]
    print(f"{args.preset}, {t} rows, {used:.0f} experts; floors w13 {nbytes[0] / bw * 1e6:.1f} "
          f"us, w2 {nbytes[1] / bw * 1e6:.1f} us, wide w2 {nbytes[2] / bw * 1e6:.1f} us",
          flush=True)
    original = moe_cuda.SOURCE
    text = original.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in args.variants.split(","):
                path = Path(tmp, f"{name}.cu")
                path.write_text(variant_source(text, name))
                moe_cuda.SOURCE = path
                moe_cuda._kernel.cache_clear()
                calls = (
                    [functools.partial(moe_cuda.moe_w13, xh, xs, w13, s13, p, te, wt,
                                       limit=10.0) for p, te, wt in croutes],
                    [functools.partial(moe_cuda.moe_w2, a, sa, w2, s2, p, te, t * k)
                     for (a, sa), (p, te, _) in zip(q2, croutes)],
                    [functools.partial(moe_cuda.moe_w2, a, sa, w2w, s2w, p, te, t * k)
                     for (a, sa), (p, te, _) in zip(q2w, croutes)])
                ms = [bench_cycle(args.reps, c) for c in calls]
                print(f"  {name:16s} " + " | ".join(
                    f"{what} {m * 1e3:7.1f} us {b / m / 1e9:5.2f} TB/s"
                    for what, m, b in zip(("w13", "w2", "wide w2"), ms, nbytes))
                    + f"  ({VARIANTS[name][0]})", flush=True)
        finally:
            moe_cuda.SOURCE = original
            moe_cuda._kernel.cache_clear()


if __name__ == "__main__":
    main()

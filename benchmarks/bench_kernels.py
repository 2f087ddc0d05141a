"""Per-kernel time and achieved bandwidth at V4-Flash / V4-Pro shapes (GPU; repo root).

Each kernel of the fast path alone, on random inputs in the stored formats, timed with CUDA
events (median of repeats after warm-up), with the bytes it must move and the resulting
bandwidth next to the device-to-device copy bandwidth of the same run. Each kernel is timed from
CUDA-graph replays (no launch gaps); earlier variants' figures are kept in ``kernels/NOTES.md``.

Usage:
    PYTHONPATH=. python benchmarks/bench_kernels.py --preset flash --rows 1,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth, time_it  # noqa: E402

from mtp import MTPConfig  # noqa: E402
from mtp.quant import fp8_simulate  # noqa: E402


def random_experts(cfg: MTPConfig, dev):
    """All routed experts of a preset in the stored format, random codes, scale 2^-7:
    (w13 int8 [E, 2I, D/2], its E8M0 scales, w2 int8 [E, D, I/2], its scales)."""
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    w13 = torch.randint(-128, 128, (e, 2 * i, d // 2), dtype=torch.int8, device=dev)
    s13 = torch.full((e, 2 * i, d // 32), 120, dtype=torch.uint8,
                     device=dev).view(torch.float8_e8m0fnu)
    w2 = torch.randint(-128, 128, (e, d, i // 2), dtype=torch.int8, device=dev)
    s2 = torch.full((e, d, i // 32), 120, dtype=torch.uint8,
                    device=dev).view(torch.float8_e8m0fnu)
    return w13, s13, w2, s2


def bench(reps, fn, *a, **kw) -> float:
    """Median ms of one fn(*a, **kw), from CUDA-graph replays of 10 calls (no launch
    overhead, as in the captured draft step)."""
    fn(*a, **kw)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn(*a, **kw)
    return statistics.median(time_it(lambda j: g.replay(), reps)) / 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    mk = _import_kernels()
    from mtp_kernels import attention as at
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels import head as hd
    from mtp_kernels import moe
    from mtp_kernels.fp8_linear import fp8_linear
    bw = copy_bandwidth()
    print(f"card {torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s")
    dev = "cuda"
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        d, e, k = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
        w13, s13, w2, s2 = random_experts(cfg, dev)
        lin = {"wq_b": (cfg.num_attention_heads * cfg.head_dim, cfg.q_lora_rank),
               "wqa_wkv": (cfg.q_lora_rank + cfg.head_dim, d), "wo_b": (d, 8192),
               "h_proj": (d, d)}
        head_w = torch.randn(cfg.vocab_size, d, device=dev).to(torch.bfloat16)
        for t in [int(x) for x in args.rows.split(",")]:
            print(f"\n{name}, {t} rows")
            # the bf16 LM head: cuBLAS (the baseline), head_logits (cuBLAS too above
            # HEAD_T rows) and the floor: its bytes at the copy bandwidth
            y = torch.randn(t, d, device=dev, dtype=torch.bfloat16)
            hb = head_w.numel() * 2
            ms_cublas = bench(args.reps, torch.mm, y, head_w.t(), out_dtype=torch.float32)
            ms_head = bench(args.reps, hd.head_logits, y, head_w)
            print(f"  lm head [{cfg.vocab_size}x{d}] floor {hb / bw * 1e6:6.1f} us | cuBLAS "
                  f"{ms_cublas * 1e3:6.1f} us {hb / ms_cublas / 1e9:5.2f} TB/s | head_logits"
                  f"{'' if t <= hd.HEAD_T else ' (cuBLAS here)'} {ms_head * 1e3:6.1f} us "
                  f"{hb / ms_head / 1e9:5.2f} TB/s", flush=True)
            for lname, (n, kk) in lin.items():
                w = torch.randn(n, kk, device=dev).to(torch.float8_e4m3fn)
                sc = torch.full((-(-n // 128), kk // 128), 120, dtype=torch.uint8,
                                device=dev).view(torch.float8_e8m0fnu)
                x = torch.randn(t, kk, device=dev, dtype=torch.bfloat16)
                nbytes = n * kk + w.shape[0] * kk // 128
                for fp8_dot in (False, True):  # operands as bf16, or e4m3 to the FP8 cores
                    fl.FP8_DOT = fp8_dot
                    ms = bench(args.reps, fp8_linear, x, w, sc, act_quant=True)
                    tag = "fp8 dot" if fp8_dot else "bf16 dot"
                    print(f"  fp8_linear {lname:8s} [{n}x{kk}] {tag} {ms * 1e3:8.1f} us "
                          f"{nbytes / ms / 1e9:6.2f} TB/s", flush=True)
                fl.FP8_DOT = True
                # accuracy of the two dots: each bf16 output against the float64 function
                ref = fl.fp8_linear_reference(x.double(), w, sc, act_quant=True)
                errs = []
                for fp8_dot in (False, True):
                    fl.FP8_DOT = fp8_dot
                    y = fp8_linear(x, w, sc, act_quant=True).double()
                    errs.append(((y - ref).norm() / ref.norm()).item())
                fl.FP8_DOT = True
                print(f"  fp8_linear {lname:8s} rel. error vs float64: bf16 dot {errs[0]:.2e}, "
                      f"fp8 dot {errs[1]:.2e}", flush=True)
            u = torch.randn(t, d, device=dev, dtype=torch.bfloat16)
            idx = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(t)])
            wts = torch.rand(t, k, device=dev)
            pairs, texp = moe.align_tiles(idx, e)
            used = idx.unique().numel()
            b13 = used * (w13[0].numel() + s13[0].numel())
            b2 = used * (w2[0].numel() + s2[0].numel())
            uq = fp8_simulate(u, 128)
            # each decode, tile width and activation rounding (in every program, or once ahead:
            # "rounded"), same inputs and run
            for dec in moe.DECODES:
                for bn in (32, 64):
                    for rounded in (False, True):
                        kw = dict(act_quant=not rounded, rounded=rounded, decode=dec,
                                  block_n=bn)
                        x = uq if rounded else u
                        ms13 = bench(args.reps, moe.moe_w13, x, w13, s13, pairs, texp, wts,
                                     limit=10.0, **kw)
                        act = moe.moe_w13(x, w13, s13, pairs, texp, wts, limit=10.0, **kw)
                        ms2 = bench(args.reps, moe.moe_w2, act, w2, s2, pairs, texp, t * k,
                                    **kw)
                        tag = f"{dec:5s} BN {bn} {'rounded' if rounded else 'in-kernel'}"
                        print(f"  moe_w13 [{tag:23s}] ({used} experts) {ms13 * 1e3:8.1f} us "
                              f"{b13 / ms13 / 1e9:6.2f} TB/s | moe_w2 {ms2 * 1e3:8.1f} us "
                              f"{b2 / ms2 / 1e9:6.2f} TB/s", flush=True)
            act = moe.moe_w13(uq, w13, s13, pairs, texp, wts, limit=10.0, act_quant=False,
                              rounded=True)
            ms = bench(args.reps, moe.round_rows, act, pairs)
            print(f"  round_rows ({pairs.numel()} rows) {ms * 1e3:8.1f} us")
            h, dh, r, win = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, 128
            cap = win + 4
            q = torch.randn(t, h, dh, device=dev, dtype=torch.bfloat16)
            new = torch.randn(t, dh, device=dev, dtype=torch.bfloat16)
            ckv = torch.randn(t * cap, dh, device=dev, dtype=torch.bfloat16)
            held = torch.arange(1000 - cap, 1000, device=dev)
            cpos = torch.empty(t, cap, dtype=torch.int64, device=dev)
            cpos[:, held % cap] = held
            pos = torch.full((t,), 1000, device=dev)
            slots = torch.arange(t, device=dev)
            inv = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64, device=dev) / r)
            cos, sin = at.rope_table(pos, inv)
            sink = torch.randn(h, device=dev)
            ms = bench(args.reps, at.sink_attention, q, new, sink, cos, sin, win, cache_kv=ckv,
                       positions=pos, seq_slots=slots, cache_pos=cpos)
            nbytes = t * (win * dh * 2 + 2 * h * dh * 2)
            print(f"  sink_attention {ms * 1e3:8.1f} us {nbytes / ms / 1e9:6.2f} TB/s")
    del mk


if __name__ == "__main__":
    main()

"""Which launch makes the gate's product fastest for a few rows? (GPU; repo root)

``mtp_kernels.moe.gate_logits`` (the gate's float32 product for up to ``GATE_T`` rows, one
kernel) for each (experts per program, inputs per chunk, warps), against the default launch,
cuBLAS (a float32 copy of u and ``torch.mm``, as for more rows) and the floor (the gate
weight's bytes over the copy bandwidth measured in the same process). The weight is cycled
over enough copies that no call finds it in L2, as in a draft step, where the experts' weights
pass through L2 between two gates.

Usage:
    PYTHONPATH=.:benchmarks python benchmarks/sweep_gate.py --preset flash,pro --rows 1,4
    python benchmarks/ab_drafter.py --extra best.json ...  (after ``--best-out best.json``)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import _import_kernels, copy_bandwidth  # noqa: E402
from sweep_kernels import bench_cycle, copies  # noqa: E402

from mtp import MTPConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="flash,pro")
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--be", default="1,2,4", help="experts per program")
    ap.add_argument("--bk", default="128,256,512", help="inputs per chunk (at these rows)")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--best-out", default=None,
                    help="write each preset's best launches (by rows) as an ab_drafter "
                         "variant, gate-best-<preset> (JSON, for ab_drafter.py --extra)")
    args = ap.parse_args()
    _import_kernels()
    from mtp_kernels import moe
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    bw = copy_bandwidth()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), copy_TBps=round(bw / 1e12, 3),
                          default=moe.GATE_LAUNCH, command=" ".join(sys.argv))), flush=True)
    found = {}  # preset -> {rows' power of two: the best launch}
    for name in args.preset.split(","):
        cfg = MTPConfig.from_name(name)
        e, d = cfg.n_routed_experts, cfg.hidden_size
        nbytes = e * d * 4
        ws = [torch.randn(e, d, device="cuda") / d ** 0.5 for _ in range(copies(nbytes))]
        floor_us = nbytes / bw * 1e6
        for t in ints(args.rows):
            u = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
            ref = torch.mm(u.double(), ws[0].double().t())

            def us(fn, u=u, ws=ws):
                return bench_cycle(args.reps, [functools.partial(fn, u, w) for w in ws]) * 1e3

            base = us(moe.gate_logits)
            cublas = us(lambda u, w: torch.mm(u.float(), w.t()))
            print(f"{name} rows {t}: floor {floor_us:.2f} us, default {base:.2f}, cuBLAS "
                  f"{cublas:.2f}", flush=True)
            best = (base, "default")
            for tune in itertools.product(ints(args.be), ints(args.bk), ints(args.warps)):
                err = (moe.gate_logits(u, ws[0], tune=tune).double() - ref).abs().max().item()
                x = us(functools.partial(moe.gate_logits, tune=tune))
                print(f"  (be, bk, warps) {tune}: {x:.2f} us (max |error| {err:.1e})",
                      flush=True)
                if x < best[0]:
                    best = (x, tune)
            print(f"{name} rows {t}: best {best[1]} {best[0]:.2f} us; default {base:.2f}; "
                  f"floor {floor_us:.2f}", flush=True)
            if best[1] != "default":
                found.setdefault(name, {})[1 << (t - 1).bit_length()] = best[1]
        del ws
        torch.cuda.empty_cache()
    if args.best_out:
        key = "mtp_kernels.moe.GATE_LAUNCH"
        out = {f"gate-best-{p}": {key: {**moe.GATE_LAUNCH, **b}} for p, b in found.items()}
        with open(args.best_out, "w") as f:
            json.dump(out, f)
        print(f"variants written to {args.best_out}: {json.dumps(out)}", flush=True)


if __name__ == "__main__":
    main()

"""Time one training step of the tiny pair (joint phase: target + MTP layer, bf16 autocast,
AdamW) with the inference ops (``mtp.ops.REFERENCE``) and with the training ops
(``mtp.demo.training_ops.TrainingOps``, at two batch sizes).

    python examples/tiny_pair/bench_step.py --out bench.json      # on a GPU, about a minute

Prints one JSON line per variant: seconds per step (after warm-up, synchronised) and tokens
per second (batch x sequence length / seconds per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402

from mtp import ops  # noqa: E402


def time_steps(device, batch: int, seq: int, steps: int, warm: int, **kw) -> float:
    target = train.new_target(0, device)
    m = train.new_mtp(target, 1)
    params = train.trainable(target, m)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq + 2), generator=gen, device=device)
    for i in range(warm + steps):
        if i == warm:
            train._sync(device)
            t0 = time.perf_counter()
        ntp, mt, _, _ = train.losses(target, m, tokens, True, autocast=device.type == "cuda",
                                     **kw)
        opt.zero_grad(set_to_none=True)
        (ntp + train.MTP_LAMBDA * mt).backward()
        opt.step()
    train._sync(device)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument("--reference-steps", type=int, default=1,
                    help="timed steps of the (slow) inference-ops variant")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    variants = [("reference ops", batches[0], {"ops_": ops.REFERENCE}, args.reference_steps)]
    variants += [("training ops", b, {}, args.steps) for b in batches]
    rows = []
    for name, batch, kw, steps in variants:
        if name == "reference ops":
            ops.ATTN_CHUNK, before = 8192, ops.ATTN_CHUNK  # gathered keys in few chunks
        sec = time_steps(device, batch, args.seq, steps, 2 if steps > 2 else 1, **kw)
        if name == "reference ops":
            ops.ATTN_CHUNK = before
        row = {"variant": name, "batch": batch, "seq": args.seq, "seconds_per_step":
               round(sec, 4), "tokens_per_second": round(batch * args.seq / sec),
               "device": card, "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A kernel-path switch A/B inside ``Drafter.propose``, in one process: one drafter per
variant on the same module, each with its whole-call graphs captured under that variant's
module settings, calls interleaved (the host's and the GPU clock's drift between processes
moves every variant alike). Each call's GPU time: the GPU is kept busy
(``torch.cuda._sleep``) while the host enqueues, so the events time the replay, not the host.

Variants (``--variants``, the first is the baseline): the input projections
(``mtp_kernels.backend.INPUT_PAIR`` / ``INPUT_MIX``): e_proj and h_proj in two launches or
one ("pair"), the attention hc_pre's mixes by hc_mix or from their split-K pass ("mix").

Usage (GPU):
    python benchmarks/ab_drafter.py --preset flash,pro --batches 1,64 --rows 1,4 --reps 60
"""

from __future__ import annotations

import argparse
import importlib
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

__all__ = ["interleaved_ms", "propose_call"]

# name -> {"module.ATTR": value} set before the variant's drafter captures its graphs
_IN = "mtp_kernels.backend.INPUT_"
VARIANTS = {
    "two": {_IN + "PAIR": False, _IN + "MIX": False},
    "mix": {_IN + "PAIR": False, _IN + "MIX": True},
    "pair": {_IN + "PAIR": True, _IN + "MIX": False},
    "pair+mix": {_IN + "PAIR": True, _IN + "MIX": True},
}


def apply(settings: dict) -> None:
    for key, value in settings.items():
        module, attr = key.rsplit(".", 1)
        setattr(importlib.import_module(module), attr, value)


def propose_call(model, b: int, r: int, k: int, sets, g, pos0: int = 1000):
    """A drafter on ``model`` (whole-call graphs) holding b sequences at ``pos0`` with full
    windows, and its call: ``Drafter.propose(k)`` of r new rows per sequence from ``sets``
    (rotated), each call's rows after the last's. Four calls made (capture, warm-up)."""
    dev = next(model.parameters()).device
    d = Drafter(model, max_seqs=b, max_draft_tokens=k, cuda_graphs=True)
    for i in range(b):
        d.add_sequence(i, position=pos0)
    fill_cache(d.cache, b, pos0, g)
    state = {"pos": pos0, "j": 0}

    def call():
        nxt, h = sets[state["j"] % ROT]
        state["j"] += 1
        p = (state["pos"] + torch.arange(r, device=dev)).repeat(b)
        state["pos"] += r
        return d.propose(list(range(b)), h, nxt, p, [r] * b, k=k)

    for _ in range(4):
        call().check()
    return call


def interleaved_ms(calls: dict, reps: int, gpu_only: bool) -> dict[str, list[float]]:
    """Each call timed alone by CUDA events, the calls alternating, ``reps`` rounds: with
    ``gpu_only`` the GPU is kept busy (``torch.cuda._sleep``) while the host enqueues, so the
    events time the replay; else the host's enqueue counts too (the GPU idles until the
    call's first work arrives)."""
    ms = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            torch.cuda.synchronize()
            if gpu_only:
                torch.cuda._sleep(400_000)  # ~0.2 ms: the host enqueues meanwhile
            a = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            a.record()
            call()
            e.record()
            e.synchronize()
            ms[name].append(a.elapsed_time(e))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rows", default="1", help="new rows per sequence")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=60)
    args = ap.parse_args()
    mk = _import_kernels()
    dev = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    k = 3
    names = args.variants.split(",")
    defaults = {key: getattr(importlib.import_module(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])
                for n in names for key in VARIANTS[n]}
    for preset in args.preset.split(","):
        cfg = MTPConfig.from_name(preset)
        model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
        model.backend = mk.TritonOps(model)
        for b in map(int, args.batches.split(",")):
            for r in map(int, args.rows.split(",")):
                sets = inputs(cfg, b * r, ROT, dev, g, torch.bfloat16)
                calls = {}
                for name in names:  # each drafter's graphs captured under its settings
                    apply(VARIANTS[name])
                    calls[name] = propose_call(model, b, r, k, sets, g)
                    apply(defaults)
                ms = interleaved_ms(calls, args.reps, gpu_only=True)
                base = statistics.median(ms[names[0]])
                row = dict(preset=preset, batch=b, rows=r, card=torch.cuda.get_device_name(),
                           **{f"{n}_ms": round(statistics.median(t), 4) for n, t in ms.items()},
                           **{f"{n}_vs_{names[0]}": round(statistics.median(t) / base, 4)
                              for n, t in ms.items()})
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

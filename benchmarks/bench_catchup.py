"""Catch-up (many rows per call) on the GPU: each many-row path of the kernels switched off and
on in one process, against the floor (GPU; run from the repo root).

A catch-up is ``forward(..., last_only=True)`` of 128 rows per sequence over a KV cache whose
windows are full (every row's key, the rest of the layer for each sequence's last row), then
the logits of each sequence's last row (as ``bench_draft_step.py``'s catch-up). Two floors:
``floor_ms`` (what the call reads now: the experts of the last rows) and ``floor_full_ms``
(the full forward's, every row's output: all experts). Per preset and
sequence count: the call timed alone (CUDA events around it, host included; median of 10,
configurations interleaved, two passes) with every many-row path off ("before": the decode-tuned
kernels), all on ("after") and, for Flash, each one off alone; the GPU time of the call (sum of
its kernels, torch.profiler, after every call timed alone) with its largest kernels; and for
Flash the peak memory of long catch-ups of one sequence (chunked by ``mtp.model.CHUNK_ROWS``).

Usage:
    PYTHONPATH=.:benchmarks python benchmarks/bench_catchup.py --preset flash,pro
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_draft_step import (  # noqa: E402
    _import_kernels,
    catchup_call,
    catchup_case,
    catchup_floors,
    copy_bandwidth,
    fill_cache,
    init_random_gpu_,
    inputs,
    param_bytes,
    time_it,
)

from mtp import DeepSeekV4MTP, KVCache, MTPConfig  # noqa: E402
from mtp import model as model_mod  # noqa: E402

OFF = 10 ** 9  # a row threshold no call reaches


def switches(mk) -> dict:
    """The many-row paths: name -> (module, its row threshold constant)."""
    return {"preq": (mk.fp8_linear, "PREQ_ROWS"), "mix": (mk.hc, "MIX_MANY_T"),
            "attn": (mk.attention, "ATTN_MANY_T")}


def gpu_ms(fn, n=3):
    """Kernel time per call (sum over the call's kernels) and the largest kernels."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for i in range(n):
            fn(i)
        torch.cuda.synchronize()
    ka = [e for e in p.key_averages() if str(e.device_type).endswith("CUDA")]
    top = sorted(ka, key=lambda e: -e.self_device_time_total)[:9]
    return (sum(e.self_device_time_total for e in ka) / n / 1e3,
            {e.key[:40]: round(e.self_device_time_total / n) for e in top})


def bench_preset(name, mk, sw, configure, bw, args) -> list:
    """Every timed call of one preset -> the profiled measures, deferred (see :func:`main`):
    functions that print their rows."""
    dev = torch.device("cuda")
    cfg = MTPConfig.from_name(name)
    model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
    model.backend = mk.TritonOps(model)
    pb = param_bytes(model)
    cache = KVCache(1, 16, cfg.sliding_window + 4, cfg.head_dim, dtype=torch.bfloat16,
                    device=dev)
    g = torch.Generator(device="cuda").manual_seed(1)
    fill_cache(cache, 16, 1000, g)
    later = []
    for n_seq in [int(x) for x in args.seqs.split(",") if x]:
        case = catchup_case(cfg, n_seq, 1000, dev, g)
        call = catchup_call(model, cache, case)
        floors = catchup_floors(model, pb, mk, case, cache, bw)
        configs = [("before", set(sw)), ("after", set())]
        if name == "flash":
            configs += [(f"after without {k}", {k}) for k in sw]
        alone = {}
        for label, off in configs * 2:
            configure(off)
            alone.setdefault(label, []).append(statistics.median(time_it(call, 10)))
        configure(set())
        for label, _ in configs[2:]:
            print(json.dumps(dict(preset=name, seqs=n_seq, config=label,
                                  alone_ms=alone[label])), flush=True)

        def profiled(n_seq=n_seq, call=call, floors=floors, configs=configs, alone=alone):
            for label, off in configs[:2]:
                configure(off)
                g_ms, top = gpu_ms(call)
                print(json.dumps(dict(preset=name, seqs=n_seq, config=label, **floors,
                                      alone_ms=alone[label], gpu_ms=g_ms,
                                      alone_x_floor=min(alone[label]) / floors["floor_ms"],
                                      gpu_x_floor=g_ms / floors["floor_ms"], top_us=top)),
                      flush=True)
            configure(set())
        later.append(profiled)
    if name == "flash":
        for rows in [int(x) for x in args.long.split(",") if x]:
            slots = torch.zeros(rows, dtype=torch.int64, device=dev)
            pos = torch.arange(rows, device=dev) + 2000
            ids, h = inputs(cfg, rows, 1, dev, g, torch.bfloat16)[0]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots, last_only=True)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            args_ = (ids, pos, h)
            ms = statistics.median(time_it(
                lambda i, a=args_, s=slots: model.forward(*a, kv_cache=cache, seq_slots=s,
                                                          last_only=True), 3, 1))
            print(json.dumps(dict(preset=name, long_rows=rows, chunk=model_mod.CHUNK_ROWS,
                                  peak_extra_GB=peak / 1e9, ms=ms)), flush=True)
    return later


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash,pro")
    ap.add_argument("--seqs", default="1,4", help="sequences of 128 rows")
    ap.add_argument("--long", default="512,1024,4096", help="Flash: rows of one long catch-up")
    args = ap.parse_args()
    mk = _import_kernels()
    mk._common.MANY_ROWS = True  # the default; each path is then switched by its threshold
    sw = switches(mk)
    default = {k: getattr(m, n) for k, (m, n) in sw.items()}

    def configure(off):
        for k, (m, n) in sw.items():
            setattr(m, n, OFF if k in off else default[k])

    bw = copy_bandwidth()
    print(json.dumps(dict(card=torch.cuda.get_device_name(), copy_TBps=bw / 1e12,
                          commit=os.environ.get("MTP_COMMIT", "?"))), flush=True)
    # Every call timed alone first, the profiler after: once torch.profiler has run, each
    # later launch of the process costs the host several times more
    # (benchmarks/graph_launch.py --after-profiler), and a catch-up's eager launches are in
    # its alone time.
    later = []
    for name in args.preset.split(","):
        later += bench_preset(name, mk, sw, configure, bw, args)
    for profiled in later:
        profiled()


if __name__ == "__main__":
    main()

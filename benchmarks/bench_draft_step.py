"""How close is a draft step to the memory-bandwidth floor? (GPU; run from the repo root)

For V4-Flash / V4-Pro shapes with random weights in the released formats (FP8 + E8M0, FP4
experts), bfloat16 compute, and a KV cache whose window is full, times per batch size:

- the draft step (forward + logits, one row per sequence): the naive path (the module's
  reference backend: pure PyTorch, dequantising per call), the triton backend eager
  (``DeepSeekV4MTP.decode_step``) and CUDA-graph replay (``DraftStepGraphs``), each call
  timed alone (the host's launch latency included: the GPU idles until the step's first copy
  arrives) and back to back (20
  steps enqueued without synchronisation, as a decode loop runs: GPU time per step);
- a catch-up of 128 rows per sequence (the module's forward + logits of each last row);
- a k = 3 greedy proposal (three graph replays with the argmax between);
- ``Drafter.propose(k=3)`` as built by default on CUDA (a greedy call: one whole-call graph
  replay) with 1 and k + 1 new rows per sequence, against its floor and the bare graph
  proposal; the host time of one call (enqueue only; median, 10th-90th percentile, and the
  bucket's graph replayed alone) and the first call's capture (--drafter);

against the floor: the bytes that must be read (every dense weight, the experts actually routed
to in that very call, the embedding rows, the KV window) and written, over the device-to-device
copy bandwidth measured in the same run (for the Drafter's calls a third floor adds what their
real rows' FP8 products take at the FP8 rate measured in the same run, where that outlasts
their bytes: the roofline of a many-row call). CUDA events, warm-up, median of repeats, inputs
rotated among 4 sets. Also: resident weight bytes against the checkpoint's stored bytes, peak
memory, and (``--profile``) a per-kernel breakdown of the graph replay from torch.profiler and
the timeline of one replay (each kernel's start, duration and idle time on its stream).

Usage:
    PYTHONPATH=.:benchmarks python benchmarks/bench_draft_step.py --preset flash \
        --batches 1,4,16,64,256 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtp import DeepSeekV4MTP, KVCache, MTPConfig, ops  # noqa: E402
from mtp.facts import facts_of  # noqa: E402
from mtp.testing import draw  # noqa: E402

ROT = 4  # input sets rotated through, so no repeat reads the same inputs from cache


def _import_kernels():
    try:
        import mtp_kernels
    except ImportError:  # not installed: the repo's kernels/ folder under its package name
        import importlib.util
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(
            "mtp_kernels", os.path.join(root, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "kernels")])
        mtp_kernels = importlib.util.module_from_spec(spec)
        sys.modules["mtp_kernels"] = mtp_kernels
        spec.loader.exec_module(mtp_kernels)
    return mtp_kernels


# ---- random weights in the stored formats, made on the GPU ----------------------------------
@torch.no_grad()
def init_random_gpu_(model: DeepSeekV4MTP, seed: int = 0) -> DeepSeekV4MTP:
    """Like ``mtp.testing.init_random_`` (the same scales, read from each parameter's
    ``ParamFacts.init``), generated on the model's device; quantised weights get random codes
    under one power-of-two scale instead of a float draw quantised (much faster at full size)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g, device="cuda") * std

    def rand(shape):
        return torch.rand(shape, generator=g, device="cuda")

    facts, params, fmt = facts_of(model), dict(model.named_parameters()), model.weight_format
    for name, p in params.items():
        f = facts[name]
        weight = params.get(name.rsplit(".", 1)[0] + "." + f.scale_of) if f.scale_of else None
        storage = getattr(fmt, f.format) if f.format is not None and weight is None else None
        if weight is not None:
            in_f = weight.shape[-1] * (2 if fmt.experts == "fp4" and f.stacked else 1)
            if p.dtype == torch.float32:
                raise AssertionError("benchmark: E8M0 scales (the released format) only")
            # one power-of-two scale so that W ~ N(0, 1/in): e4m3 codes ~ N(0, 64^2), uniform
            # e2m1 codes have rms 2.93
            code_rms = 2.93 if fmt.experts == "fp4" and f.stacked else 64.0
            p.view(torch.uint8).fill_(127 + round(math.log2(in_f ** -0.5 / code_rms)))
        elif storage == "fp8":
            p.copy_(randn(p.shape, 64.0).clamp(-448, 448))
        elif storage == "fp4":
            p.copy_(torch.randint(-128, 128, p.shape, generator=g, device="cuda",
                                  dtype=torch.int8))
        else:
            p.copy_(draw(f.init, tuple(p.shape), randn, rand))
    return model


# ---- byte counts ----------------------------------------------------------------------------
def param_bytes(model) -> dict[str, int]:
    """Resident bytes by family (each tensor once), and the checkpoint's stored bytes (norm and
    gate weights are BF16 there, float32 in the module)."""
    seen, out = set(), {"experts": 0, "embed": 0, "head": 0, "dense": 0, "stored": 0}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        fam = ("experts" if ".experts." in name else "embed" if "embed_tokens" in name
               else "head" if "shared_head.head" in name else "dense")
        out[fam] += nbytes
        bf16_on_disk = name.endswith("norm.weight") or name.endswith("gate.weight")
        out["stored"] += p.numel() * 2 if bf16_on_disk and p.dtype == torch.float32 else nbytes
    out["resident"] = out["experts"] + out["embed"] + out["head"] + out["dense"]
    return out


def floor_bytes(model, pb, t_rows, n_seqs, n_experts_used, logits_rows, cache_dtype_size,
                out_rows=None):
    """Bytes a call must move at least: every dense weight and the head once, the experts its
    rows route to, each sequence's window of KV, the rows' inputs (hidden, embedding), their
    outputs (``out_rows`` of them, default every row: a keys-only catch-up writes only each
    sequence's last) and the logits."""
    cfg = model.config
    per_expert = pb["experts"] / cfg.n_routed_experts
    kv = n_seqs * cfg.sliding_window * (cfg.head_dim * cache_dtype_size + 8)  # window + pos
    out_rows = t_rows if out_rows is None else out_rows
    io = t_rows * (cfg.hc_dim * 2 + cfg.hidden_size * 2) + out_rows * cfg.hc_dim * 2
    return (pb["dense"] + pb["head"] + n_experts_used * per_expert + kv + io
            + logits_rows * cfg.vocab_size * 4)


def rows_compute_ms(model, t_rows: int, bw: float, rate: float) -> float:
    """What the FP8 products every row of a call needs for its key (e_proj, h_proj over the M
    streams, wkv; wq_a is for the last rows only) take at ``rate`` (FLOP/s) beyond what their
    weights and rows take at the copy bandwidth, in ms (0 for few rows: there the bytes bound
    them). Added to a bytes-only floor it gives the call's roofline floor: the
    rows' products are one phase that must end before the last rows' attention, so its
    compute cannot hide behind the later steps' reads."""
    if not rate > 0:  # not measured (fp8_rate's product refused)
        return math.nan
    cfg, layer = model.config, model.layer(0)
    d, m = cfg.hidden_size, cfg.hc_mult
    prods = (layer.e_proj, layer.h_proj, layer.mtp_block.attn.fused_wqa_wkv)
    flops = 2 * t_rows * d * (d + m * d + cfg.head_dim)
    moved = sum(p.weight.numel() * p.weight.element_size() for p in prods)
    moved += t_rows * (cfg.hc_dim * 2 + cfg.hidden_size * 2)  # the rows' inputs, bf16
    return max(0.0, flops / rate - moved / bw) * 1e3


def catchup_floors(model, pb, mk, case, cache, bw) -> dict[str, float]:
    """A catch-up's two floors in ms: ``floor_ms``, what the call reads now (the keys of every
    row, the rest for each sequence's last row: the experts those rows route to, counted in
    one call) and ``floor_full_ms``, the full forward's (every row's output; 128 rows per
    sequence route to nearly every expert, taken as all of them)."""
    cfg = model.config
    slots, _, _, last = case
    t_rows, n_seq = slots.numel(), last.numel()
    used = experts_routed_in(mk, lambda: catchup_call(model, cache, case)(0))
    keys = floor_bytes(model, pb, t_rows, n_seq, used, n_seq, 2, out_rows=n_seq)
    full = floor_bytes(model, pb, t_rows, n_seq, cfg.n_routed_experts, n_seq, 2)
    return {"floor_ms": keys / bw * 1e3, "floor_full_ms": full / bw * 1e3,
            "experts_read": used}


# ---- timing ----------------------------------------------------------------------------------
def time_it(fn, reps: int, warmup: int = 2) -> list[float]:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def time_back_to_back(fn, steps: int, reps: int) -> list[float]:
    """ms per call of ``steps`` calls enqueued back to back (no synchronisation between them,
    as a decode loop runs: the host prepares call i+1 while the GPU runs call i), per rep."""
    fn(0)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(steps):
            fn(i)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return times


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of 20)."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def run(i):
        dst.copy_(src)

    ms = statistics.median(time_it(run, 20, 3))
    return 2 * n / (ms * 1e-3)


def fp8_rate() -> float:
    """FLOP/s of a large FP8 product on the tensor cores: 8192^3, e4m3 by
    ``torch._scaled_mm`` with one scale per tensor, bfloat16 out (median of 20): the compute
    counterpart of :func:`copy_bandwidth`, what the card's fastest FP8 GEMM reaches here."""
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as cuBLAS
    one = torch.ones((), device="cuda")

    def run(i):
        torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)

    try:
        ms = statistics.median(time_it(run, 20, 3))
    except RuntimeError as err:  # a torch or card without it: no roofline floor, say why
        print(f"fp8_rate: torch._scaled_mm refused ({err}); the FP8 floor is not computed",
              flush=True)
        return math.nan
    return 2 * n ** 3 / (ms * 1e-3)


def routed_experts(fast, mk, *args) -> int:
    """Distinct experts the triton backend routes to in one ``fast.decode_step(*args)``."""
    return experts_routed_in(mk, lambda: fast.decode_step(*args))


def experts_routed_in(mk, fn) -> int:
    """Distinct experts the triton backend routes to in ``fn()`` (its first MoE)."""
    seen = []
    orig = mk.moe.route

    def spy(*a, **k):
        idx, w = orig(*a, **k)
        seen.append(idx)
        return idx, w

    mk.moe.route = spy
    mk.backend.moe_k.route = spy
    try:
        fn()
    finally:
        mk.moe.route = orig
        mk.backend.moe_k.route = orig
    return int(seen[0].unique().numel())


def inputs(cfg, n, rot, dev, g, dtype):
    return [(torch.randint(0, cfg.vocab_size, (n,), generator=g, device=dev),
             torch.randn(n, cfg.hc_dim, generator=g, device=dev).to(dtype)) for _ in range(rot)]


def fill_cache(cache, n_seqs, pos0, g):
    """Every sequence's window fully held: positions pos0 - W .. pos0 - 1, random KV."""
    cap = cache.capacity
    cache.kv.normal_(generator=g)
    p = torch.arange(pos0 - cap, pos0, device=cache.kv.device)
    cache.pos[:, :n_seqs] = -1
    cache.pos[:, :n_seqs, :].scatter_(2, (p % cap).expand(cache.pos.shape[0], n_seqs, cap),
                                      p.expand(cache.pos.shape[0], n_seqs, cap))


def bench_preset(name: str, batches, args, bw, out) -> list[dict]:
    mk = _import_kernels()
    cfg = MTPConfig.from_name(name)
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    model = init_random_gpu_(DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device=dev), seed=0)
    pb = param_bytes(model)
    resident_alloc = torch.cuda.memory_allocated() - base_mem
    # the triton backend with the chosen kernels; the naive timings run the reference backend
    model.backend = mk.TritonOps(model, experts=args.experts, head=args.head)
    fast = model
    max_b = max(batches)
    cap = cfg.sliding_window + 4
    cache = KVCache(1, max(max_b, 16), cap, cfg.head_dim, dtype=torch.bfloat16, device=dev)
    g = torch.Generator(device="cuda").manual_seed(1)
    pos0 = 1000
    fill_cache(cache, cache.max_seqs, pos0, g)
    t0 = time.time()
    pdl = {} if args.pdl_rows is None else {"pdl_rows": args.pdl_rows}
    graphs = mk.DraftStepGraphs(model, cache, buckets=tuple(batches),
                                overlap=bool(args.overlap), **pdl)
    capture_s = time.time() - t0
    rows = []
    for b in batches:
        slots = torch.arange(b, device=dev)
        pos = torch.full((b,), pos0, device=dev)
        sets = inputs(cfg, b, ROT, dev, g, torch.bfloat16)
        used = routed_experts(fast, mk, sets[0][0], pos, sets[0][1], slots, cache)
        fb = floor_bytes(model, pb, b, b, used, b, 2)
        floor_ms = fb / bw * 1e3

        def naive(i, sets=sets, pos=pos, slots=slots):
            ids, h = sets[i % ROT]
            with model.using(ops.REFERENCE):
                x = model(ids, pos, h, kv_cache=cache, seq_slots=slots)
                model.compute_logits(x)

        def eager(i, sets=sets, pos=pos, slots=slots):
            ids, h = sets[i % ROT]
            fast.decode_step(ids, pos, h, slots, cache)

        def graph(i, sets=sets, pos=pos, slots=slots):
            ids, h = sets[i % ROT]
            graphs.step(ids, pos, h, slots, check=False)

        naive_reps = args.naive_reps if b <= 16 else max(3, args.naive_reps // 3)
        t_naive = statistics.median(time_it(naive, naive_reps, 1)) if args.naive_reps \
            else float("nan")
        t_eager = statistics.median(time_it(eager, args.reps))
        t_graph_all = time_it(graph, args.reps * 4)
        t_graph = statistics.median(t_graph_all)
        t_graph2 = statistics.median(time_it(graph, args.reps * 4))
        t_b2b = statistics.median(time_back_to_back(graph, 20, args.reps))
        row = dict(preset=name, what="draft step", batch=b, experts_used=used,
                   floor_GB=fb / 1e9, floor_ms=floor_ms, naive_ms=t_naive, eager_ms=t_eager,
                   graph_ms=t_graph, graph_ms_rerun=t_graph2, x_floor=t_graph / floor_ms,
                   b2b_ms=t_b2b, b2b_x_floor=t_b2b / floor_ms, pdl=graphs.buckets[b].pdl,
                   speedup_vs_naive=t_naive / t_graph)
        rows.append(row)
        print(json.dumps(row), flush=True)
    # k = 3 greedy proposal (graph replays)
    for b in [x for x in batches if x in (1, 16, 64) or x in args.drafter]:
        slots = torch.arange(b, device=dev)
        pos = torch.full((b,), pos0, device=dev)
        sets = inputs(cfg, b, ROT, dev, g, torch.bfloat16)
        used = routed_experts(fast, mk, sets[0][0], pos, sets[0][1], slots, cache)
        fb = 3 * floor_bytes(model, pb, b, b, used, b, 2)

        def prop(i, sets=sets, pos=pos, slots=slots):
            ids, h = sets[i % ROT]
            graphs.propose(ids, pos, h, slots, 3, check=False)

        t = statistics.median(time_it(prop, args.reps))
        row = dict(preset=name, what="k=3 proposal", batch=b, floor_ms=fb / bw * 1e3,
                   graph_ms=t, x_floor=t / (fb / bw * 1e3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    bare = {r["batch"]: r["graph_ms"] for r in rows if r["what"] == "k=3 proposal"}
    shapes = [(b, n) for b in args.drafter for n in args.drafter_rows]
    shapes += [(b, 128) for b in args.catchup_drafter]
    rows += bench_drafter(model, fast, mk, name, shapes, args.reps, dev, g, pb, bw, bare,
                          args.fp8_rate)
    # catch-up: 128 rows per sequence through forward(last_only=True) (the drafter's call: the
    # keys of every row, the rest for each sequence's last row), then those rows' logits
    for n_seq in args.catchup:
        case = catchup_case(cfg, n_seq, pos0, dev, g)
        t_rows = case[0].numel()
        catch_fast = catchup_call(fast, cache, case)
        catch_naive = catchup_call(model, cache, case, reference=True)
        floors = catchup_floors(fast, pb, mk, case, cache, bw)
        t_f = statistics.median(time_it(catch_fast, max(5, args.reps // 4)))
        t_n = statistics.median(time_it(catch_naive, 3, 1)) if args.naive_reps \
            else float("nan")
        row = dict(preset=name, what="catch-up 128 rows/seq", batch=n_seq, rows=t_rows,
                   **floors, naive_ms=t_n, eager_ms=t_f,
                   x_floor=t_f / floors["floor_ms"],
                   x_full_floor=t_f / floors["floor_full_ms"], speedup_vs_naive=t_n / t_f)
        rows.append(row)
        print(json.dumps(row), flush=True)
    mem = dict(preset=name, what="memory", resident_GB=pb["resident"] / 1e9,
               stored_GB=pb["stored"] / 1e9, resident_over_stored=pb["resident"] / pb["stored"],
               allocated_for_model_GB=resident_alloc / 1e9,
               peak_GB=torch.cuda.max_memory_allocated() / 1e9,
               kv_cache_GB=(cache.kv.numel() * 2 + cache.pos.numel() * 8) / 1e9,
               graph_capture_s=capture_s)
    rows.append(mem)
    print(json.dumps(mem), flush=True)
    from mtp_kernels import head as hd
    chosen = dict(preset=name, what="head kernel chosen", chosen={
        f"V={v} D={d} rows<={bt}": k for (_, v, d, bt), k in hd._CHOSEN.items()})
    rows.append(chosen)
    print(json.dumps(chosen), flush=True)
    if args.profile:
        profile(graphs, cfg, args.profile, name, out, g)
    return rows


def catchup_case(cfg, n_seq: int, pos0: int, dev, g):
    """A catch-up of 128 rows for each of n_seq sequences (cache slots 0..n_seq-1) from
    position pos0: (slots [T], positions [T], two input sets, each sequence's last row [S])."""
    slots = torch.arange(n_seq, device=dev).repeat_interleave(128)
    pos = (torch.arange(128, device=dev) + pos0).repeat(n_seq)
    sets = inputs(cfg, 128 * n_seq, 2, dev, g, torch.bfloat16)
    return slots, pos, sets, torch.arange(n_seq, device=dev) * 128 + 127


def catchup_call(model, cache, case, reference: bool = False):
    """call(i): the catch-up ``case`` through ``model.forward(..., last_only=True)`` (the
    drafter's call), then the logits of each sequence's last row; with ``reference`` the naive
    baseline: the reference ops over every row's full forward (as before keys-only rows)."""
    slots, pos, sets, last = case

    def call(i):
        ids, h = sets[i % 2]
        if reference:
            with model.using(ops.REFERENCE):
                x = model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots)
                model.compute_logits(x[last])
        else:
            x = model.forward(ids, pos, h, kv_cache=cache, seq_slots=slots, last_only=True)
            model.compute_logits(x)
    return call


# Why a profiling run takes one preset (this script's --profile, ab_drafter.py's): the
# profiler runs after the preset's measurements, and the next preset's would be taken after it
PROFILE_ONE_PRESET = ("{}: one preset per run (--preset); it runs after the preset's {}, and "
                      "once torch.profiler has run, each later launch of the process costs the "
                      "host several times more (benchmarks/graph_launch.py --after-profiler), "
                      "so the next preset's times would include the profiler's")

SLEEP = 20_000_000  # cycles of the sleeping kernel that keeps the GPU busy (~10 ms)


def host_enqueue_us(fn, sync, n: int = 40, busy: bool = True,
                    cpu: list | None = None) -> list[float]:
    """Host microseconds of each of n calls of ``fn``, ``sync`` before each: with ``busy``
    the GPU kept busy behind a sleeping kernel, so that only the enqueueing is timed, else
    idle. ``cpu``: gets the thread's CPU time of each call (without the time the thread was
    not running)."""
    out = []
    for _ in range(n):
        sync()
        if busy:
            torch.cuda._sleep(SLEEP)
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
        if cpu is not None:
            cpu.append((time.thread_time() - c0) * 1e6)
    sync()
    return out


def propose_floors(model, mk, pb, b: int, n: int, k: int, ids, hidden, positions, cache,
                   bw: float) -> tuple[float, float]:
    """The two floors (ms) of ``propose(k)`` with n new rows for each of b sequences (ids,
    hidden, positions: the call's b * n rows, sequence by sequence): ``floor_ms``, what the
    call must read (every row's key, the rest of the layer for each sequence's last row: the
    experts those route to, then k - 1 draft steps of b rows) and ``floor_full_ms``, with the
    real rows' step a full forward of every row (the experts all rows route to)."""
    dev = ids.device
    t = b * n
    sl = torch.full((t,), -1, device=dev)  # no sequence: routing only, nothing written
    last = torch.arange(b, device=dev) * n + n - 1  # each sequence's last row

    def used(rows):
        return routed_experts(model, mk, ids[rows], positions[rows], hidden[rows],
                              sl[:rows.numel()], cache)

    every = torch.arange(t, device=dev)
    drafts = (k - 1) * floor_bytes(model, pb, b, b, used(every[:b]), b, 2)
    floor = floor_bytes(model, pb, t, b, used(last), b, 2, out_rows=b) + drafts
    full = floor_bytes(model, pb, t, b, used(every), b, 2) + drafts
    return floor / bw * 1e3, full / bw * 1e3


def bench_drafter(model, fast, mk, name, shapes, reps, dev, g, pb, bw, bare,
                  rate: float) -> list[dict]:
    """``Drafter.propose(k=3)`` as an engine calls it, with whole-call graphs
    (the default on CUDA; ``cuda_graphs=True`` here so that the benchmark cannot time the
    eager path unawares: greedy, one graph replay per call), for each (sequences, new real
    rows per sequence) of ``shapes`` (1 row: a decode step's; k + 1 = 4: every draft
    accepted; 128: a catch-up), host work included, each call timed alone (the GPU idles
    until the call's first copy arrives); the host time of one call (enqueue only: measured
    with the GPU busy behind a sleeping kernel); the first call's capture time. The window is
    full (as in the floor). Two floors: ``floor_ms``, what the call must read (every row's
    key, the rest for each sequence's last row: the experts those route to) and
    ``floor_full_ms``, the full forward of every row's (the experts all rows route to); and
    ``floor_fp8_ms``, ``floor_ms`` with the real rows' FP8 products at ``rate`` (the measured
    FP8 FLOP/s) where their compute outlasts their bytes (the roofline: many rows only).
    ``bare``: {batch: ms} of the bare graph proposal, same run."""
    from mtp.drafter import Drafter
    rows = []
    cfg = model.config
    k, pos0 = 3, 1000
    for b, n in shapes:
        d = Drafter(model, max_seqs=b, max_draft_tokens=k, cuda_graphs=True)
        ids = list(range(b))
        for i in ids:
            d.add_sequence(i, position=pos0)
        fill_cache(d.cache, b, pos0, g)
        t = b * n
        sets = inputs(cfg, t, ROT, dev, g, torch.bfloat16)
        total = 4 + reps + 40  # calls: capture, warm-up, timed, host-timed
        positions = [(torch.arange(n, device=dev) + pos0 + j * n).repeat(b)
                     for j in range(total)]
        calls = iter(range(total))

        def call(_, d=d, ids=ids, sets=sets, counts=[n] * b, positions=positions,
                 calls=calls):
            j = next(calls)
            nxt, h = sets[j % ROT]
            return d.propose(ids, h, nxt, positions[j], counts, k=k)

        t0 = time.perf_counter()
        call(0).check()
        capture_s = time.perf_counter() - t0
        ms = statistics.median(time_it(call, reps, warmup=3))
        host = sorted(host_enqueue_us(lambda: call(0), d.synchronize))
        # the bucket's graph replayed alone (the last call's inputs again: the same rows and
        # drafts rewritten): the part of the host time that is the graph launch itself
        runner = next(iter(d._proposer.made.values()))
        replay = host_enqueue_us(runner.replay, torch.cuda.synchronize)
        feed_ms = float("nan")
        if n > k + 1:  # a catch-up: the same rows through feed (its one-step bucket)
            more = range(total, total + reps + 4)
            positions += [(torch.arange(n, device=dev) + pos0 + j * n).repeat(b) for j in more]
            feeds = iter(more)

            def feed(_, d=d, ids=ids, sets=sets, counts=[n] * b, positions=positions,
                     feeds=feeds):
                j = next(feeds)
                nxt, h = sets[j % ROT]
                return d.feed(ids, h, nxt, positions[j], counts)

            feed(0)  # captures its bucket
            d.synchronize()
            feed_ms = statistics.median(time_it(feed, reps, warmup=3))
        floor_ms, floor_full_ms = propose_floors(model, mk, pb, b, n, k, sets[0][0],
                                                 sets[0][1], positions[0], d.cache, bw)
        floor_fp8_ms = floor_ms + rows_compute_ms(model, t, bw, rate)
        row = dict(preset=name, what=f"Drafter.propose k=3, {n} row(s)/seq", batch=b,
                   floor_ms=floor_ms, floor_full_ms=floor_full_ms, floor_fp8_ms=floor_fp8_ms,
                   graph_ms=ms, x_floor=ms / floor_ms, x_full_floor=ms / floor_full_ms,
                   x_fp8_floor=ms / floor_fp8_ms,
                   x_bare=ms / bare[b] if b in bare else float("nan"),
                   host_us=statistics.median(host), host_us_p10=host[len(host) // 10],
                   host_us_p90=host[len(host) * 9 // 10],
                   replay_host_us=statistics.median(replay), capture_s=capture_s,
                   feed_ms=feed_ms, buckets=sorted(d._proposer.made))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def profile(graphs, cfg, batches, name, out, g):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    dev = torch.device("cuda")
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b,), generator=g, device=dev)
        h = torch.randn(b, cfg.hc_dim, generator=g, device=dev).to(torch.bfloat16)
        slots, pos = torch.arange(b, device=dev), torch.full((b,), 1000, device=dev)
        for _ in range(3):
            graphs.step(ids, pos, h, slots, check=False)
        torch.cuda.synchronize()
        n = 20
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(n):
                graphs.step(ids, pos, h, slots, check=False)
            torch.cuda.synchronize()
        table = p.key_averages().table(sort_by="cuda_time_total", row_limit=30,
                                       max_name_column_width=110)
        path = os.path.join(out, f"profile_{name}_b{b}.txt")
        with open(path, "w") as f:
            f.write(f"{name} batch {b}: {n} graph replays\n{table}\n")
        print(f"--- profile {name} batch {b} ({n} replays) ---\n{table}", flush=True)
        trace = os.path.join(out, f"trace_{name}_b{b}.json")
        p.export_chrome_trace(trace)
        lines = timeline(trace, n)
        os.remove(trace)  # large; the timeline below is what is read
        with open(os.path.join(out, f"timeline_{name}_b{b}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"--- timeline {name} batch {b} (last replay) ---\n" + "\n".join(lines), flush=True)


def timeline(trace_path: str, n: int) -> list[str]:
    """The kernels of the last of n graph replays in order: start (us, from the replay's first
    kernel), duration, the idle time on its stream since that stream's previous kernel, and
    the stream. The gaps are what launch latency and dependencies cost."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    ks = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                key=lambda e: e["ts"])
    # every step starts with the copies into the graph's static inputs: take the last run
    copy = [e.get("cat") == "gpu_memcpy" for e in ks]
    starts = [i for i in range(len(ks)) if copy[i] and (i == 0 or not copy[i - 1])]
    last = ks[starts[-1]:] if len(starts) == n else ks[-(len(ks) // n):]
    t0, prev_end, rows = last[0]["ts"], {}, []
    busy = 0.0
    for e in last:
        s = e["args"].get("stream", 0)
        gap = e["ts"] - prev_end[s] if s in prev_end else 0.0
        prev_end[s] = e["ts"] + e["dur"]
        busy += e["dur"]
        rows.append(f"{e['ts'] - t0:9.1f} {e['dur']:8.1f} {gap:7.1f}  s{s:<3} {e['name'][:90]}")
    end = max(e["ts"] + e["dur"] for e in last) - t0
    return [f"{'start us':>9} {'dur':>8} {'gap':>7}  stream kernel", *rows,
            f"span {end:.1f} us, {len(last)} kernels, kernel time {busy:.1f} us"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash,pro")
    ap.add_argument("--batches", default="1,4,16,64,256")
    ap.add_argument("--catchup", default="1,4", help="sequences of 128 rows")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--naive-reps", type=int, default=10, help="0: skip the naive path")
    ap.add_argument("--drafter", default="1,64", help="batches of the Drafter.propose rows")
    ap.add_argument("--drafter-rows", default="1,4", help="new rows per sequence of those")
    ap.add_argument("--catchup-drafter", default="1,4", help="sequences of a 128-row catch-up "
                    "through Drafter.propose (whole-call graphs)")
    ap.add_argument("--fp4-decode", default=None, help="e2m1 decode of the expert kernels "
                    "(mtp_kernels.moe.DECODES; default: its DEFAULT_DECODE)")
    ap.add_argument("--fp8-dot", type=int, default=1, help="fp8_linear on the FP8 tensor cores")
    ap.add_argument("--overlap", type=int, default=1, help="shared expert on a side stream")
    ap.add_argument("--pdl-rows", type=int, default=None, help="graph buckets of at most this "
                    "many rows use programmatic dependent launch (default: the library's "
                    "mtp_kernels.graph.PDL_ROWS; 0: none); eager calls never do")
    ap.add_argument("--experts", default="auto", help="routed experts' kernels: auto, cuda "
                    "(mtp_kernels.moe_cuda), triton (mtp_kernels.moe)")
    ap.add_argument("--head", default="triton", help="LM head for <= 64 rows: triton (the "
                    "default), cublas or auto (mtp_kernels.head)")
    ap.add_argument("--hc-warps", type=int, default=0, help="hc_finish warps (0: default)")
    ap.add_argument("--profile", default="", help="batch sizes to profile, e.g. 1,64")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    args.catchup = [int(x) for x in args.catchup.split(",") if x]
    args.profile = [int(x) for x in args.profile.split(",") if x]
    if args.profile and "," in args.preset:
        ap.error(PROFILE_ONE_PRESET.format("--profile", "measurements"))
    args.drafter = [int(x) for x in args.drafter.split(",") if x]
    args.drafter_rows = [int(x) for x in args.drafter_rows.split(",") if x]
    args.catchup_drafter = [int(x) for x in args.catchup_drafter.split(",") if x]
    _import_kernels()
    from mtp_kernels import fp8_linear as fl
    from mtp_kernels import moe
    if args.fp4_decode:
        moe.DEFAULT_DECODE = {"w13": args.fp4_decode, "w2": args.fp4_decode}
    fl.FP8_DOT = bool(args.fp8_dot)
    if args.hc_warps:
        from mtp_kernels import hc
        hc.FINISH_WARPS = args.hc_warps
    batches = [int(x) for x in args.batches.split(",")]
    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("MTP_COMMIT")  # the device copy of the tree may have no .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip() or "?"
        except OSError:
            commit = "?"
    bw = copy_bandwidth()
    args.fp8_rate = fp8_rate()
    head = dict(card=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                commit=commit, date=time.strftime("%Y-%m-%d"), copy_TBps=bw / 1e12,
                fp8_TFLOPS=args.fp8_rate / 1e12,
                experts=args.experts, head=args.head, pdl_rows=args.pdl_rows,
                fp4_decode=moe.DEFAULT_DECODE,
                fp8_dot=args.fp8_dot,
                overlap=args.overlap,
                hc_warps=args.hc_warps,
                command=" ".join(sys.argv))
    print(json.dumps(head), flush=True)
    rows = [head]
    for name in args.preset.split(","):
        rows += bench_preset(name, batches, args, bw, args.out)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench_draft_step.json"), "w") as f:
        json.dump(rows, f, indent=1)
    nan = float("nan")
    print("\n| preset | what | batch | floor ms | naive ms | eager ms | graph ms | x floor | "
          "back-to-back ms | x floor | vs naive |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        if r["what"] in ("memory", "head kernel chosen") or r["what"].startswith("Drafter"):
            continue
        print(f"| {r['preset']} | {r['what']} | {r['batch']} | {r['floor_ms']:.3f} | "
              f"{r.get('naive_ms', nan):.2f} | {r.get('eager_ms', nan):.3f} | "
              f"{r.get('graph_ms', nan):.3f} | {r['x_floor']:.2f} | "
              f"{r.get('b2b_ms', nan):.3f} | {r.get('b2b_x_floor', nan):.2f} | "
              f"{r.get('speedup_vs_naive', nan):.0f} |")
    print("\n| preset | what | batch | floor ms | ms | x floor | x full forward's floor | "
          "x bytes + FP8 FLOPs floor | x bare graphs | host us/call | host p10-p90 | "
          "replay alone host us | capture s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        if r["what"] == "k=3 proposal":
            print(f"| {r['preset']} | bare graph proposal (k=3) | {r['batch']} | "
                  f"{r['floor_ms']:.3f} | {r['graph_ms']:.3f} | {r['x_floor']:.2f} | | | 1 | "
                  "| | | |")
        if r["what"].startswith("Drafter"):
            print(f"| {r['preset']} | {r['what']} | {r['batch']} | {r['floor_ms']:.3f} | "
                  f"{r['graph_ms']:.3f} | {r['x_floor']:.2f} | {r['x_full_floor']:.2f} | "
                  f"{r['x_fp8_floor']:.2f} | {r['x_bare']:.2f} | "
                  f"{r['host_us']:.0f} | {r['host_us_p10']:.0f}-{r['host_us_p90']:.0f} | "
                  f"{r['replay_host_us']:.0f} | {r['capture_s']:.2f} |")
    for r in rows[1:]:
        if r["what"] in ("memory", "head kernel chosen"):
            print(json.dumps(r))


if __name__ == "__main__":
    main()

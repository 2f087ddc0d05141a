"""The draft step and the k = 3 proposal on one GPU and on two (tensor + expert parallel over
NCCL), eager and from CUDA graphs, against each rank's floor. Run from the repo root on a
machine with 2 GPUs:

    pip install --no-deps --no-build-isolation .   # mtp and mtp_kernels
    python benchmarks/bench_parallel.py --preset flash,pro --batches 1,4,16,64

(``--gpus 1``: the one-GPU rows only; ``--cpu``: gloo on the CPU at the tiny preset, eager, a
dry run of the script.)

A draft step is one row per sequence against a full sliding window of KV, then the logits and
the greedy tokens (``TensorParallel.argmax``: one all-gather of [S, 2] when sharded), bfloat16
compute, random weights in the released FP8 + FP4 format, the model's default backend (the
Triton kernels on CUDA). Eager: the module's forward, ``compute_logits`` and the argmax.
Graphs: ``mtp_kernels.DraftStepGraphs`` (the step's kernels and its collectives captured in one
graph per rank) and the argmax; the proposal is ``DraftStepGraphs.propose(k=3)``: three such
steps, each one fed the previous one's tokens and residuals. Per batch size: the time on one
GPU (rank 0 alone, the other waiting), on each of 2 ranks, and the rank's floor: the bytes it
reads in the step (dense weights, its head slice, the experts of its range routed to in that
very step, the KV window, the hidden rows) over the device-to-device copy bandwidth measured in
the same run, plus the measured time of the step's collectives (the 3 all-reduces of [S, D] and
the argmax's all-gather, captured in a graph and replayed); the proposal's floor is three
times the step's. CUDA events, warm-up, median of repeats, inputs rotated among 4 sets.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtp import DeepSeekV4MTP, KVCache, MTPConfig, WeightFormat  # noqa: E402
from mtp.model import MoE  # noqa: E402
from mtp.ops import route  # noqa: E402
from mtp.parallel import TensorParallel  # noqa: E402
from mtp.testing import init_random_  # noqa: E402

ROT = 4  # input sets rotated through
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}


def timed(fn, reps: int, dev: torch.device, warmup: int = 2) -> float:
    """Median ms of ``fn(i)`` over ``reps`` calls, each timed alone (CUDA events on a GPU)."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            a.record()
            fn(i)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(i)
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes read + written per second of a device-to-device copy (1 GiB; 64 MiB on a CPU)."""
    n = 1 << (30 if dev.type == "cuda" else 26)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * n / (timed(lambda i: dst.copy_(src), 10, dev) * 1e-3)


def step_bytes(model: DeepSeekV4MTP, rows: int, experts_used: int) -> int:
    """What a draft step of ``rows`` sequences reads on this rank: every parameter once
    (embedding: only its rows; routed experts: only those used), the KV window, the hidden
    rows in and out."""
    cfg, total, seen = model.config, 0, set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        if "embed_tokens" in name:
            nbytes = rows * p.shape[1] * p.element_size()
        elif ".experts." in name:
            nbytes = nbytes // p.shape[0] * experts_used
        total += nbytes
    kv = rows * cfg.sliding_window * cfg.head_dim * model.dtype.itemsize
    return total + kv + rows * 2 * cfg.hc_dim * model.dtype.itemsize


def bench_model(model: DeepSeekV4MTP, batches, reps: int, dev, seed: int) -> dict[int, dict]:
    """Per batch: median ms of the eager draft step and (CUDA) of the captured step and the
    k = 3 proposal, and the experts of this rank's range that the step routes to."""
    cfg, tp = model.config, model.tp
    used: list[int] = []
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    experts = moe.experts
    graphs_on = dev.type == "cuda"

    def count(_mod, args):  # the step's routing, from the MoE's input u [T, D]
        idx, _ = route(args[0], moe.gate.weight, moe.gate.e_score_correction_bias,
                       cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor)
        mine = (idx >= experts.first) & (idx < experts.first + experts.w13_weight.shape[0])
        used.append(int(idx[mine].unique().numel()))

    out = {}
    for b in batches:
        g = torch.Generator(device=dev).manual_seed(seed + b)  # the same inputs on every rank
        cache = KVCache(1, b, cfg.sliding_window + 4, cfg.head_dim, dtype=model.dtype,
                        device=dev)
        cache.kv.normal_(generator=g)
        pos0 = 1000
        p = torch.arange(pos0 - cache.capacity, pos0, device=dev)  # every window full
        cache.pos[:, :b, :].scatter_(2, (p % cache.capacity).expand(1, b, -1),
                                     p.expand(1, b, -1))
        sets = [(torch.randint(0, cfg.vocab_size, (b,), generator=g, device=dev),
                 torch.randn(b, cfg.hc_dim, generator=g, device=dev).to(model.dtype))
                for _ in range(ROT)]
        pos, slots = torch.full((b,), pos0, device=dev), torch.arange(b, device=dev)

        def step(i, sets=sets, pos=pos, slots=slots, cache=cache):
            ids, h = sets[i % ROT]
            x = model(ids, pos, h, kv_cache=cache, seq_slots=slots)
            return tp.argmax(model.compute_logits(x, gather=False))

        hook = moe.register_forward_pre_hook(count)
        step(0)
        hook.remove()
        out[b] = {"ms": timed(step, reps, dev), "experts": used[-1],
                  "bytes": step_bytes(model, b, used[-1])}
        if graphs_on:
            from mtp_kernels import DraftStepGraphs

            graphs = DraftStepGraphs(model, cache, buckets=(b,))

            def gstep(i, sets=sets, pos=pos, slots=slots, graphs=graphs):
                ids, h = sets[i % ROT]
                return tp.argmax(graphs.step(ids, pos, h, slots, check=False)[1])

            def gpropose(i, sets=sets, pos=pos, slots=slots, graphs=graphs):
                ids, h = sets[i % ROT]
                return graphs.propose(ids, pos, h, slots, 3, check=False)

            out[b]["graph_ms"] = timed(gstep, reps, dev)
            out[b]["propose_ms"] = timed(gpropose, reps, dev)
            del graphs
    return out


def collectives_ms(tp: TensorParallel, cfg: MTPConfig, b: int, dtype, reps, dev) -> float:
    """A step's collectives at batch ``b``: the embedding's all-reduce of [b, D] in ``dtype``,
    wo_b's and the experts' of [b, D] float32, the argmax's all-gather of [1, b, 2] float64;
    captured in one CUDA graph and replayed on NCCL (as in the step's graph), else eager."""
    x = torch.randn(b, cfg.hidden_size, device=dev).to(dtype)
    y, z = (torch.randn(b, cfg.hidden_size, device=dev) for _ in range(2))
    w = torch.randn(1, b, 2, dtype=torch.float64, device=dev)

    def run(i=0):
        tp.all_reduce_(x)
        tp.all_reduce_(y)
        tp.all_reduce_(z)
        return tp.all_gather(w, dim=0)

    if dev.type != "cuda" or dist.get_backend(tp.group) != "nccl":
        return timed(run, reps, dev)
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return timed(lambda i: graph.replay(), reps, dev)


def build(cfg, group, dev, dtype):
    model = DeepSeekV4MTP(cfg, weight_format=WeightFormat.released(), dtype=dtype, device=dev,
                          process_group=group)
    return init_random_(model, seed=0)


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MULTICAST_OFF)
    dev = torch.device(f"cuda:{rank}" if not args.cpu else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("gloo" if args.cpu else "nccl", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=180))
    group = dist.new_group(list(range(world)))
    dtype = torch.bfloat16
    batches = [int(b) for b in args.batches.split(",")]
    bw = copy_bandwidth(dev)
    torch.set_grad_enabled(False)
    for preset in args.preset.split(","):
        cfg = MTPConfig.from_name(preset)
        one = None
        if rank == 0:  # one GPU: the whole model, the other rank waits
            model = build(cfg, None, dev, dtype)
            one = bench_model(model, batches, args.reps, dev, seed=1)
            one_bytes = {b: one[b]["bytes"] for b in batches}
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if world == 1:
            report(preset, batches, one, None, bw, one_bytes)
            continue
        dist.barrier(group)
        model = build(cfg, group, dev, dtype)
        two = bench_model(model, batches, args.reps, dev, seed=1)
        coll = {b: collectives_ms(model.tp, cfg, b, dtype, args.reps, dev) for b in batches}
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        gathered = [None] * world
        dist.all_gather_object(gathered, (two, coll), group=group)
        if rank == 0:
            report(preset, batches, one, gathered, bw, one_bytes)
    dist.destroy_process_group()


def report(preset, batches, one, ranks, bw, one_bytes) -> None:
    """One table per preset: per batch, the eager step, the captured step and the k = 3
    proposal on one GPU and on 2 ranks (the slower rank's time; both are listed for the
    captured step), each rank's floor, and one GPU's time over two's."""
    graphs = "graph_ms" in one[batches[0]]
    print(f"\n{preset}: bfloat16, ms (median); copy {bw / 1e12:.2f} TB/s; one GPU's floor "
          f"(bytes/copy) in brackets")
    if ranks is None:
        print("| batch | eager step | graph step | k=3 proposal (graphs) | floor step |")
        print("|---|---|---|---|---|")
        for b in batches:
            o = one[b]
            g = (f"{o['graph_ms']:.3f} | {o['propose_ms']:.3f}" if graphs else "- | -")
            print(f"| {b} | {o['ms']:.3f} | {g} | {one_bytes[b] / bw * 1e3:.3f} "
                  f"({one_bytes[b] / 2**20:.0f} MiB) |")
        return
    print("| batch | what | 1 GPU | 2 GPUs: rank 0 / rank 1 | rank floor: bytes/copy + "
          "collectives | 1 GPU / 2 GPUs | 2 GPUs / 1 GPU |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        floors = [r[0][b]["bytes"] / bw * 1e3 + r[1][b] for r in ranks]
        floor = (f"{floors[0]:.3f} ({ranks[0][0][b]['bytes'] / 2**20:.0f} MiB / "
                 f"{ranks[0][1][b]:.3f} ms) / {floors[1]:.3f}")
        rows = [("eager step", "ms", 1), ("graph step", "graph_ms", 1),
                ("k=3 proposal", "propose_ms", 3)] if graphs else [("eager step", "ms", 1)]
        for what, key, n in rows:
            t = [r[0][b][key] for r in ranks]
            fl = floor if n == 1 else " / ".join(f"{3 * f:.3f}" for f in floors)
            print(f"| {b} | {what} | {one[b][key]:.3f} [{n * one_bytes[b] / bw * 1e3:.3f}] | "
                  f"{t[0]:.3f} / {t[1]:.3f} | {fl} | {one[b][key] / max(t):.2f}x | "
                  f"{max(t) / one[b][key]:.2f} |")
        print(f"| {b} | experts used | {one[b]['experts']} | {ranks[0][0][b]['experts']} + "
              f"{ranks[1][0][b]['experts']} | | | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (a dry run)")
    ap.add_argument("--gpus", type=int, choices=(1, 2), default=2,
                    help="1: the one-GPU rows only")
    args = ap.parse_args()
    os.environ.update(MULTICAST_OFF)
    if not args.cpu:
        n = torch.cuda.device_count()
        if n < args.gpus:
            sys.exit(f"bench_parallel: needs {args.gpus} CUDA GPUs, found {n} (--gpus 1: the "
                     f"one-GPU rows; --cpu: a dry run on gloo)")
        print("card:", torch.cuda.get_device_name(0), f"x{args.gpus};", "torch",
              torch.__version__)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print("commit:", commit, "date:", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(args.gpus, port, args), nprocs=args.gpus, join=True)


if __name__ == "__main__":
    main()

"""The eager draft step on one GPU and on two (tensor + expert parallel over NCCL), against
each rank's floor. Run from the repo root on a machine with 2 GPUs:

    PYTHONPATH=. python benchmarks/bench_parallel.py --preset flash,pro --batches 1,4,16,64

(``--cpu``: gloo on the CPU at the tiny preset, a dry run of the script.)

A draft step is the module's eager forward of one row per sequence against a full sliding
window of KV (``model(ids, positions, h, kv_cache=, seq_slots=)``), then the logits and the
greedy tokens (``TensorParallel.argmax``: one all-gather of [S, 2] when sharded), bfloat16
compute, random weights in the released FP8 + FP4 format. Per batch size: the step's time on
one GPU (rank 0 alone, the other waiting), on each of 2 ranks, and the rank's floor: the bytes
it reads in the step (dense weights, its head slice, the experts of its range routed to in that
very step, the KV window, the hidden rows) over the device-to-device copy bandwidth measured in
the same run, plus the measured time of the step's collectives (3 all-reduces of [S, D] and the
argmax's all-gather, timed alone at those sizes). CUDA events, warm-up, median of repeats,
inputs rotated among 4 sets.
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
from mtp.model import Experts  # noqa: E402
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
    """Per batch: median ms of the eager draft step, and the experts of this rank's range that
    the step routes to."""
    cfg, tp = model.config, model.tp if hasattr(model, "tp") else TensorParallel()
    used: list[int] = []
    experts = next(m for m in model.modules() if isinstance(m, Experts))

    def count(_mod, args):
        idx = args[1]
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

        hook = experts.register_forward_pre_hook(count)
        step(0)
        hook.remove()
        with torch.no_grad():
            out[b] = {"ms": timed(step, reps, dev), "experts": used[-1],
                      "bytes": step_bytes(model, b, used[-1])}
    return out


def collectives_ms(tp: TensorParallel, cfg: MTPConfig, b: int, dtype, reps, dev) -> float:
    """3 all-reduces of [b, D] (embedding, wo_b, the experts) and the argmax's all-gather,
    each timed alone."""
    x = torch.randn(b, cfg.hidden_size, device=dev).to(dtype)
    y = torch.randn(b, cfg.hidden_size, device=dev)  # the experts' float32 partials
    z = torch.randn(1, b, 2, dtype=torch.float64, device=dev)
    return (2 * timed(lambda i: tp.all_reduce_(x), reps, dev)
            + timed(lambda i: tp.all_reduce_(y), reps, dev)
            + timed(lambda i: tp.all_gather(z, dim=0), reps, dev))


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
            del model
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier(group)
        model = build(cfg, group, dev, dtype)
        two = bench_model(model, batches, args.reps, dev, seed=1)
        coll = {b: collectives_ms(model.tp, cfg, b, dtype, args.reps, dev) for b in batches}
        del model
        gathered = [None] * world
        dist.all_gather_object(gathered, (two, coll), group=group)
        if rank == 0:
            report(preset, batches, one, gathered, bw, dev)
    dist.destroy_process_group()


def report(preset, batches, one, ranks, bw, dev) -> None:
    print(f"\n{preset}: eager draft step, bfloat16, ms (median); copy {bw / 1e12:.2f} TB/s")
    print("| batch | 1 GPU | 2 GPUs: rank 0 / rank 1 | rank floor: bytes/copy + collectives |"
          " experts used (per rank) | speedup |")
    print("|---|---|---|---|---|---|")
    for b in batches:
        t = [r[0][b]["ms"] for r in ranks]
        floors = [r[0][b]["bytes"] / bw * 1e3 + r[1][b] for r in ranks]
        print(f"| {b} | {one[b]['ms']:.2f} | {t[0]:.2f} / {t[1]:.2f} | "
              f"{floors[0]:.3f} ({ranks[0][0][b]['bytes'] / 2**20:.0f} MiB / "
              f"{ranks[0][1][b]:.3f} ms) / {floors[1]:.3f} | {one[b]['experts']} -> "
              f"{ranks[0][0][b]['experts']} + {ranks[1][0][b]['experts']} | "
              f"{one[b]['ms'] / max(t):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="flash")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (a dry run)")
    args = ap.parse_args()
    os.environ.update(MULTICAST_OFF)
    if not args.cpu:
        n = torch.cuda.device_count()
        if n < 2:
            sys.exit(f"bench_parallel: needs 2 CUDA GPUs, found {n} (--cpu: a dry run on gloo)")
        print("card:", torch.cuda.get_device_name(0), "x2;", "torch", torch.__version__)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print("commit:", commit, "date:", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)


if __name__ == "__main__":
    main()

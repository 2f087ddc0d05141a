"""Loading benchmark (not a test): a full-size DeepSeek-V4-Flash drafter checkpoint.

Writes the three shards a Flash drafter reads, with the release's names, shapes, dtypes and shard
files (``tests/data/tensors-flash.json.gz``: MTP layer, embedding, head; 5.4 GiB of random
bytes) plus an index that also names the 43 main-model shards (absent: the loader must not need
them), then times, each in a fresh subprocess so peak memory is its own:

- ``mtp``: ``mtp.loader.load_model(folder, dtype=torch.bfloat16)`` (plan, checks, module,
  bytes streamed into the parameters);
- ``st-pread``: plain ``safetensors.safe_open(..., backend="pread").get_tensor(name)`` of the
  same tensors, kept in a dict (the same bytes in memory, no checks, no module);
- ``st-mmap-copy``: the default (mmap) ``get_tensor`` copied into a tensor of its own, as a
  naive loader does (``safe_open().get_tensor`` alone maps the file and reads nothing).

Files are read from the page cache (just written, RAM permitting), so this measures the loaders'
own cost, not the disk. Reports GB/s (1e9 bytes) and peak resident memory (VmHWM).

    python benchmarks/bench_load.py [--dir /tmp/bench] [--repeat 3] [--keep] [--reuse]
        [--kinds mtp st-pread]

The random bytes are all below 0x7F, so every value is finite in every stored dtype (the loader
refuses NaN and infinity; bytes below 0x7F keep each BF16/F32 exponent and each FP8/E8M0 code
short of the all-ones patterns).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# the release's name list, vendored with the tests (tests/data/README.md)
SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "data",
                    "tensors-flash.json.gz")
LABELS = {
    "mtp": "`mtp.loader.load_model` (checks + module)",
    "st-pread": "safetensors `safe_open(backend=\"pread\").get_tensor`",
    "st-mmap-copy": "safetensors `safe_open().get_tensor` + `copy_` into own tensor",
}
_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1}


def _release_tensors() -> dict:
    with gzip.open(SPEC, "rt") as f:
        return json.load(f)


def write_checkpoint(folder: str) -> int:
    """Write the drafter's shards of V4-Flash with random bytes; returns the bytes written."""
    import torch

    from mtp import MTPConfig

    tensors = _release_tensors()["tensors"]
    by_shard: dict[str, list[str]] = {}
    for name, info in tensors.items():
        by_shard.setdefault(info["shard"], []).append(name)
    block = torch.randint(0, 0x7F, (64 << 20,), dtype=torch.uint8).numpy().tobytes()
    total = 0
    for shard, names in by_shard.items():
        header, offset = {}, 0
        for name in sorted(names):
            info = tensors[name]
            n = math.prod(info["shape"]) * _BYTES[info["dtype"]]
            header[name] = {"dtype": info["dtype"], "shape": info["shape"],
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            left = offset
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        total += offset
    weight_map = {name: info["shard"] for name, info in tensors.items()}
    for k in range(43):  # the main model's 43 layers live in the other shards (absent here)
        weight_map[f"layers.{k}.attn_norm.weight"] = f"model-{k + 1:05d}-of-00046.safetensors"
    weight_map["layers.42.ffn_norm.weight"] = "model-00044-of-00046.safetensors"
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(MTPConfig.from_name("flash").to_dict(), f)
    return total


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_one(kind: str, folder: str) -> dict:
    """Runs in the child process."""
    import torch

    if kind == "mtp":
        from mtp.loader import load_model

        t0 = time.perf_counter()
        c0 = sum(os.times()[:2])
        model, report = load_model(folder, dtype=torch.bfloat16, progress=False)
        cpu = sum(os.times()[:2]) - c0
        seconds, nbytes = time.perf_counter() - t0, report.bytes
        del model
    else:
        from safetensors import safe_open

        names = _release_tensors()["tensors"]
        backend = "pread" if kind == "st-pread" else "mmap"
        t0 = time.perf_counter()
        kept, nbytes = {}, 0
        for shard in sorted({i["shard"] for i in names.values()}):
            with safe_open(os.path.join(folder, shard), framework="pt", backend=backend) as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    if kind == "st-mmap-copy":  # a naive loader: copy into its own tensor
                        t = torch.empty_like(t).copy_(t)
                    kept[name] = t
                    nbytes += t.numel() * t.element_size()
        seconds = time.perf_counter() - t0
        cpu = None
    return {"kind": kind, "seconds": seconds, "bytes": nbytes, "peak_rss": _peak_rss(),
            "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="where to write the 5.4 GiB checkpoint (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--reuse", action="store_true",
                    help="use the checkpoint already in --dir (written by an earlier --keep)")
    ap.add_argument("--kinds", nargs="+", choices=list(LABELS), default=list(LABELS))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return
    folder = args.dir or tempfile.mkdtemp(prefix="bench_load_")
    os.makedirs(folder, exist_ok=True)
    try:
        if not (args.reuse and os.path.exists(os.path.join(folder, "config.json"))):
            t0 = time.perf_counter()
            total = write_checkpoint(folder)
            print(f"wrote {total / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s to "
                  f"{folder}", flush=True)
        results: dict[str, list[dict]] = {k: [] for k in args.kinds}
        for _ in range(args.repeat):
            for kind in results:  # alternate, so both see the same machine state
                out = subprocess.run([sys.executable, __file__, "--child", kind, folder],
                                     check=True, capture_output=True, text=True)
                results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[kind][-1]
                print(f"  {kind:<12} {r['seconds']:6.2f} s  "
                      f"{r['bytes'] / 1e9 / r['seconds']:5.2f} GB/s  "
                      f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB"
                      + (f"  CPU {r['cpu']:.2f} s" if r["cpu"] is not None else ""), flush=True)
        print("\n| loader | bytes read | time: best / median / worst | GB/s at median | "
              "peak RSS | RSS - data |")
        print("|---|---|---|---|---|---|")
        for kind, rs in results.items():
            secs = sorted(r["seconds"] for r in rs)
            sec = statistics.median(secs)
            nbytes, rss = rs[0]["bytes"], max(r["peak_rss"] for r in rs)
            print(f"| {LABELS[kind]} | {nbytes / 2**30:.2f} GiB | {secs[0]:.2f} / {sec:.2f} / "
                  f"{secs[-1]:.2f} s | {nbytes / 1e9 / sec:.2f} | {rss / 2**30:.2f} GiB | "
                  f"{(rss - nbytes) / 2**30:.2f} GiB |")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

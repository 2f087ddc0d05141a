"""One rank of a test process group (started by ``parallel_harness.launch``).

Usage: python parallel_worker.py RANK WORLD PORT SPEC.json OUTDIR

Joins a gloo group on 127.0.0.1:PORT, runs each case of the spec with its own process group
(``new_group``, as an engine would pass one) and saves {case name: result or error text} to
OUTDIR/rank{RANK}.pt. Cases marked ``expect_error`` record the error instead of failing.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from parallel_cases import run_case  # noqa: E402

from mtp import load_model, write_checkpoint  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def main(rank: int, world: int, port: int, spec_file: str, outdir: str) -> None:
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    # A bounded timeout: a rank stuck in a collective fails instead of hanging forever.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=spec.get("timeout", 60)))
    group = dist.new_group(list(range(world)))
    results = {}
    for case in spec["cases"]:
        if case.get("crash_rank") == rank:
            raise RuntimeError(f"rank {rank} fails on purpose")
        path = case["path"] if isinstance(case["path"], str) else case["path"][rank]
        dtype = case["dtype"] if isinstance(case["dtype"], str) else case["dtype"][rank]
        try:
            if case.get("kind") == "export":  # a rank's module cannot be written out
                model, _ = load_model(path, dtype=torch.float32, process_group=group)
                write_checkpoint(model, os.path.join(outdir, f"export{rank}"))
                results[case["name"]] = "written"
                continue
            results[case["name"]] = run_case(path, group, DTYPES[dtype],
                                             case.get("rounding", "on"))
        except Exception as e:
            if not case.get("expect_error"):
                raise
            results[case["name"]] = f"{type(e).__name__}: {e}"
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

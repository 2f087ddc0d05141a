"""One rank of a test process group (started by ``parallel_harness.launch``).

Usage: python parallel_worker.py RANK WORLD PORT SPEC.json OUTDIR

Joins a group (gloo, or NCCL with one GPU per rank: the spec's ``backend``) on
127.0.0.1:PORT, runs each case of the spec with its own process group (``new_group``, as an
engine would pass one) and saves {case name: result or error text} to OUTDIR/rank{RANK}.pt.
Cases marked ``expect_error`` record the error instead of failing.

Spec switches for a machine with one GPU: ``"device": "cuda"`` puts every rank of a gloo
group on cuda:0 (gloo moves CUDA tensors through the host: eager only, no graph capture;
NCCL refuses two ranks on one GPU); ``"sharded_at_one": true`` runs a group of ONE rank
through the tensor-parallel code path (its collectives real NCCL calls over one rank, so
that their capture in CUDA graphs runs; normally a group of one runs the unsplit path).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from full_size_cases import run_full_case  # noqa: E402
from parallel_cases import run_case, run_nan_case  # noqa: E402

from mtp import load_model, write_checkpoint  # noqa: E402
from mtp.parallel import TensorParallel  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def main(rank: int, world: int, port: int, spec_file: str, outdir: str) -> None:
    if os.environ.get("MTP_DUMP_AFTER"):  # every N s, the stacks into the rank's log
        faulthandler.dump_traceback_later(float(os.environ["MTP_DUMP_AFTER"]), repeat=True)
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    # A bounded timeout: a rank stuck in a collective fails instead of hanging forever.
    backend = spec.get("backend", "gloo")
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    elif spec.get("device") == "cuda":  # gloo, every rank on the one GPU
        device = "cuda:0"
    if spec.get("sharded_at_one"):  # the split code path at world size 1 (test only)
        TensorParallel.sharded = property(lambda self: self.group is not None)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
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
            if case.get("kind") == "nan":  # NaN logits on one rank's vocabulary slice
                results[case["name"]] = run_nan_case(path, group, rank)
                continue
            if case.get("kind") == "full":  # a full-size model made on the device
                results[case["name"]] = run_full_case(group, rank, world, device,
                                                      case["preset"], DTYPES[dtype],
                                                      case["rounding"],
                                                      graphs=case.get("graphs", False),
                                                      backend=case.get("backend", "auto"),
                                                      config=case.get("config"))
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

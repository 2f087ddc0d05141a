"""The full-size parallel case (``tests/test_gpu_parallel.py``), run in each rank of a group:
a random model of a preset's shapes in the released FP8/FP4 format, filled on the rank's device
(the same seed and device type give every rank the same values), its one-device results
(``process_group=None``), and the results of the rank's share of it, sliced from the whole
model in memory (no checkpoint written: a Pro checkpoint is ~20 GB).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from parallel_cases import ROUNDING, play

from mtp import DeepSeekV4MTP, Drafter, MTPConfig, WeightFormat
from mtp.testing import init_random_


def rank_share(whole: DeepSeekV4MTP, part: DeepSeekV4MTP, rank: int, world: int) -> None:
    """Copy this rank's slice of every parameter of ``whole`` into ``part``: each split
    dimension is cut in ``world`` equal contiguous pieces (docs/parallel.md's table)."""
    src = whole.state_dict()
    for name, p in part.state_dict().items():
        w = src[name]
        dims = [d for d in range(w.ndim) if w.shape[d] != p.shape[d]]
        assert len(dims) <= 1 and all(w.shape[d] == p.shape[d] * world for d in dims), name
        p.copy_(w.chunk(world, dims[0])[rank] if dims else w)


@torch.no_grad()
def run_full_case(group, rank: int, world: int, device: str, preset: str, dtype: torch.dtype,
                  rounding: str, rounds: int = 3, k: int = 3, graphs: bool = False,
                  backend: str = "auto", config: dict | None = None) -> dict:
    """{"one": the whole model's results, "tp": the rank's share's (``backend``; "auto": the
    Triton kernels on CUDA), and with ``graphs`` "tp_graphs": the share's again with its draft
    steps replayed from CUDA graphs, the collectives captured in them}. ``config``: fields of
    the preset replaced."""
    t0 = time.monotonic()

    def progress(what: str) -> None:  # into the rank's log: where the time goes
        print(f"{preset} {dtype} {rounding}: {what} at {time.monotonic() - t0:.1f} s",
              flush=True)

    cfg = dataclasses.replace(MTPConfig.from_name(preset), **(config or {}))
    kw = dict(weight_format=WeightFormat.released(), dtype=dtype, numerics=ROUNDING[rounding],
              device=device, backend=backend)
    whole = init_random_(DeepSeekV4MTP(cfg, **kw), seed=3)
    progress("built")
    # The eager path, as the rank's share drafts (a tensor-parallel module has no whole-call
    # graphs): the graphs' sampled drafts come from an inverse CDF, not torch.multinomial, so
    # the same seed would draw other drafts there (docs/drafter.md).
    one = Drafter(whole, max_seqs=3, max_draft_tokens=k, cuda_graphs=False)
    out = {"one": play(one, rounds, k)}
    progress(f"one device ({whole.ops.name})")
    part = DeepSeekV4MTP(cfg, process_group=group, **kw)
    rank_share(whole, part, rank, world)
    del whole
    out["tp"] = play(Drafter(part, max_seqs=3, max_draft_tokens=k), rounds, k)
    out["ops"] = part.ops.name
    progress(f"the rank's share ({part.ops.name}, split: {part.tp.sharded})")
    if graphs:
        drafter = Drafter(part, max_seqs=3, max_draft_tokens=k)
        drafter.use_cuda_graphs(buckets=(1, 2, 4))
        progress("captured")
        out["tp_graphs"] = play(drafter, rounds, k)
        progress("graphs")
    return out

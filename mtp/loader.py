"""Load a DeepSeek-V4 MTP drafter from a checkpoint folder or a Hugging Face Hub repo.

Three steps, every check before any parameter is written (:mod:`mtp.checkpoint`):

1. find the files (:func:`mtp.checkpoint.source.find`): ``model.safetensors.index.json`` +
   shards, one ``model.safetensors``, or the reference converter's per-rank
   ``model{r}-mp{MP}.safetensors``, in a folder or a Hub repo; fetch the shards that hold needed
   tensors (only those are downloaded/opened) and read their headers;
2. build the plan (:func:`mtp.checkpoint.plan.build`, pure): name every tensor with the remap
   table (:mod:`mtp.remap`), infer the :class:`~mtp.quant.WeightFormat` from the stored dtypes,
   check each tensor's shape and dtype against the module built from ``config.json``, and that
   every parameter is filled exactly once;
3. stream it (:func:`mtp.checkpoint.stream.stream`): one read path, blocks of at most 16 MiB
   read by a few threads straight into the parameters (or a tensor-parallel rank's slices), so
   peak host memory is the module plus a few buffers.

Example:
    >>> from mtp.loader import load_model, plan
    >>> print(plan("checkpoints/DeepSeek-V4-Flash"))                    # doctest: +SKIP
    >>> model, report = load_model("deepseek-ai/DeepSeek-V4-Flash")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection
from typing import Any

import torch

from . import backend as backends
from .checkpoint import plan as planning
from .checkpoint.errors import CheckpointError
from .checkpoint.header import TensorInfo, check_little_endian, read_header
from .checkpoint.plan import LoadPlan
from .checkpoint.report import LoadReport, Plan, RuleUse, report, summarize
from .checkpoint.source import Source, find
from .checkpoint.stream import Read, stream
from .config import FP8_BLOCK
from .model import DeepSeekV4MTP, Numerics
from .parallel import TensorParallel, check_world_size
from .surgery import (
    Region,
    full_region,
    intersect,
    narrow_region,
    region_shape,
    region_slices,
    tp_range,
)


def _shared(embed_given: bool, head_given: bool) -> frozenset[str]:
    return frozenset(n for n, g in (("embed_tokens", embed_given), ("head", head_given)) if g)


def make_plan(source: Source, *, dtype: torch.dtype = torch.bfloat16,
              shared: Collection[str] = (), fetch: bool = False) -> LoadPlan:
    """The :class:`~mtp.checkpoint.plan.LoadPlan` of ``source``: fetch the needed shards
    (``fetch``), read their headers, build the plan."""
    cfg, kind, message = planning.parse_config(source.raw_config)
    if cfg is None:
        return LoadPlan(source, None, kind, message, problems=source.problems)
    files = planning.needed_files(source, cfg, shared)
    if fetch:
        source.fetch(files)
    headers, problems = source.headers(files)
    return planning.build(source, cfg, headers, problems, dtype, shared)


def _raise_if_bad(lp: LoadPlan) -> None:
    if lp.kind != "v4-mtp":
        raise CheckpointError(f"{lp.source.where}: {lp.message}")
    sections = [("problem", list(lp.problems)), ("unexpected tensor", lp.unexpected),
                ("missing tensor", list(lp.missing))]
    problems = [p for _, items in sections for p in items]
    if not problems:
        return
    lines = [f"{lp.source.where}: refusing to load ({len(problems)} problem(s)); nothing was "
             f"loaded"]
    for what, items in sections:
        for p in items[:12]:
            lines.append(f"  {what}: {p}")
        if len(items) > 12:
            lines.append(f"  ... and {len(items) - 12} more {what}s")
    raise CheckpointError("\n".join(lines), problems)


def _checked_plan(path_or_repo_id, *, dtype, shared, revision, cache_dir, token,
                  local_files_only, tqdm_class=None) -> LoadPlan:
    source = find(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token,
                  local_files_only=local_files_only, tqdm_class=tqdm_class)
    lp = make_plan(source, dtype=dtype, shared=shared, fetch=True)
    _raise_if_bad(lp)
    return lp


def plan(path_or_repo_id, *, revision: str | None = None, cache_dir=None, token=None,
         local_files_only: bool = False, embed_tokens_given: bool = False,
         head_given: bool = False) -> Plan:
    """What the checkpoint holds for the drafter, without reading tensor data.

    For a Hub id this downloads only ``config.json`` and the index (byte counts then need the
    shard headers, so they show as unknown until the shards are downloaded).

    Example:
        >>> p = plan("checkpoints/DeepSeek-V4-Flash")          # doctest: +SKIP
        >>> p.kind, p.shards_read                               # doctest: +SKIP
        ('v4-mtp', ['model-00001-of-00046.safetensors', ...])
    """
    source = find(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token,
                  local_files_only=local_files_only)
    return summarize(make_plan(source, shared=_shared(embed_tokens_given, head_given)))


def load_model(path_or_repo_id, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
               embed_tokens: torch.Tensor | None = None, head: torch.Tensor | None = None,
               numerics: Numerics | None = None, revision: str | None = None, cache_dir=None,
               token=None, local_files_only: bool = False,
               progress: bool | Callable[[int, int], None] | None = None,
               process_group=None, backend: Any = "auto") -> tuple[DeepSeekV4MTP, LoadReport]:
    """Build the drafter from ``config.json`` and load its weights from a checkpoint folder or
    a Hub repo id (downloading config, index and only the shards it needs).

    Args:
        device: where the parameters live. dtype: compute dtype; FP8/FP4 tensors stay as
            stored, plain BF16/F32 ones convert (norms, sinks, hc_* and the gate stay float32).
        embed_tokens, head: the target's [V, D] tensors, shared instead of read (their shards
            are then not opened when nothing else is needed from them).
        numerics: see :class:`~mtp.model.Numerics`.
        revision, cache_dir, token, local_files_only: as in ``huggingface_hub``
            (``HF_HUB_OFFLINE=1`` also means cache only).
        progress: True / False for a progress bar (default: shown for loads of 1 GiB or more
            on a terminal), or a callable ``(bytes_done, bytes_total)``.
        process_group: a ``torch.distributed`` group: build the tensor/expert-parallel module
            (:mod:`mtp.parallel`) and read only this rank's slices. Every rank of the group must
            call this with the same checkpoint (checked: one small all-gather before any read);
            ``embed_tokens`` / ``head`` are then this rank's [V/w, D] rows.
        backend: which ops run the module (:class:`~mtp.model.DeepSeekV4MTP`'s ``backend``:
            ``"auto"``, ``"reference"``, ``"triton"``); checked before anything is read.

    Returns:
        ``(model, report)``. On any refusal a :class:`CheckpointError` lists every problem and
        no module is returned.

    Example:
        >>> model, report = load_model("checkpoints/DeepSeek-V4-Flash", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> print(report)                                                                       # doctest: +SKIP
        loaded 1577 tensors, 5.32 GiB from 3 shard(s) (skipped 43) in ... s (... GB/s); ...
    """  # noqa: E501
    t0 = time.perf_counter()
    tp = TensorParallel(process_group)
    try:
        backends.check_choice(backend)
        check_little_endian()
        lp = _checked_plan(path_or_repo_id, dtype=dtype, revision=revision, cache_dir=cache_dir,
                           token=token, local_files_only=local_files_only,
                           shared=_shared(embed_tokens is not None, head is not None))
        check_world_size(lp.config, tp.world_size)
    except BaseException:
        tp.agree(None, "load_model", device)  # the other ranks raise too, none waits for us
        raise
    settings = repr((dtype, numerics or Numerics(), embed_tokens is None, head is None)).encode()
    tp.agree(_fingerprint(lp) + settings, f"load_model({lp.source.where!r})", device)
    model = DeepSeekV4MTP(lp.config, weight_format=lp.weight_format, dtype=dtype, device=device,
                          embed_tokens=embed_tokens, head=head, numerics=numerics,
                          process_group=process_group, backend=backend)
    params = dict(model.named_parameters())
    if tp.sharded:
        regions = {p: _rank_region(p, lp, tp.rank, tp.world_size)
                   for p in lp.shapes if p not in lp.given}
        for p, r in regions.items():
            if region_shape(r) != tuple(params[p].shape):  # the split facts disagree
                raise AssertionError(f"{p}: rank region {region_shape(r)} but the module holds "
                                     f"{tuple(params[p].shape)}")
        reads = _region_reads(lp, regions, {p: params[p].data for p in regions})
        nbytes = stream(lp.source.folder, reads, progress)
        return model, report(lp, t0, nbytes, sorted({r.info.file for r in reads}), len(reads))
    reads = [Read(d.info, _dest(params[d.target.param].data, d.region, d))
             for d in lp.loads()]
    nbytes = stream(lp.source.folder, reads, progress)
    return model, report(lp, t0, nbytes, lp.needed(), len(reads))


def _fingerprint(lp: LoadPlan) -> bytes:
    """What a rank is about to load, as bytes: config.json and every tensor it reads (name,
    file, dtype, shape, byte offsets). Ranks of one group must agree on it."""
    tensors = sorted((d.entry.name, d.info.file, d.info.dtype, list(d.info.shape), d.info.begin,
                      d.info.end) for d in lp.loads() if d.info is not None)
    return json.dumps([lp.source.raw_config, tensors], sort_keys=True, default=str).encode()


def _dest(tensor: torch.Tensor, region: Region, d: planning.Decision,
          origin: Region | None = None) -> torch.Tensor:
    """The view of ``tensor`` (holding ``origin`` of the parameter) that ``region`` fills;
    an expert's slot without its expert dim (the stored tensor has none)."""
    view = tensor[region_slices(region, origin)]
    return view[0] if d.target.expert is not None else view


def _rank_region(param: str, lp: LoadPlan, rank: int, world_size: int) -> Region:
    """The part of ``param`` that tensor-parallel ``rank`` of ``world_size`` holds."""
    shape = lp.shapes[param][0]
    facts = lp.facts[param]
    region = full_region(shape)
    if facts.tp is None:
        return region
    dim, unit = facts.tp.dim, facts.tp.unit
    try:
        a, b = tp_range(shape[dim], rank, world_size, getattr(lp.config, unit) if unit else 1)
    except ValueError as e:
        raise ValueError(f"{param}: {e}") from None
    if facts.scale_of is not None and not facts.stacked:  # 128x128 block scale of a weight
        weight = param.rsplit(".", 1)[0] + "." + facts.scale_of
        per_rank = lp.shapes[weight][0][dim] // world_size
        if per_rank % FP8_BLOCK:
            raise ValueError(f"{weight}: world_size={world_size} gives each rank {per_rank} "
                             f"rows/columns, not whole {FP8_BLOCK}-wide FP8 scale blocks")
    return narrow_region(region, dim, a, b)


def _region_reads(lp: LoadPlan, regions: dict[str, Region],
                  dests: dict[str, torch.Tensor]) -> list[Read]:
    """The reads filling ``dests[p]`` (holding ``regions[p]`` of parameter p): each stored
    piece cut to the part inside the region."""
    reads = []
    for d in lp.loads():
        inter = intersect(d.region, regions[d.target.param])
        if inter is None:
            continue
        dest = _dest(dests[d.target.param], inter, d, origin=regions[d.target.param])
        # the part of the stored tensor: the intersection in the piece's own coordinates
        part = tuple((a - o, b - o) for (a, b), (o, _) in zip(inter, d.region, strict=True))
        reads.append(Read(d.info, dest, part[1:] if d.target.expert is not None else part))
    return reads


def load_state(path_or_repo_id, *, rank: int, world_size: int, device="cpu",
               dtype: torch.dtype = torch.bfloat16, revision: str | None = None, cache_dir=None,
               token=None, local_files_only: bool = False, embed_tokens_given: bool = False,
               head_given: bool = False, progress=None,
               ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """This tensor-parallel rank's part of every parameter, keyed by module parameter names:
    rows of ``wq_b`` (whole heads), ``wo_a`` (whole groups), ``attn_sink`` and the vocabulary
    rows of embedding and head; columns of ``wo_b``; experts
    ``[rank*E/world_size, (rank+1)*E/world_size)``; everything else whole (each parameter's
    :attr:`~mtp.facts.ParamFacts.tp`). Only the needed rows are read, through the same path as
    :func:`load_model` (a column split reads only the rank's columns, one run per row). These are
    the shapes of ``DeepSeekV4MTP(..., process_group=pg)``'s parameters on that rank;
    ``load_model(..., process_group=pg)`` reads them straight into the module.

    Example:
        >>> state, report = load_state("checkpoints/DeepSeek-V4-Flash", rank=1, world_size=8)  # doctest: +SKIP
        >>> state["model.layers.43.mtp_block.ffn.experts.w13_weight"].shape                       # doctest: +SKIP
        torch.Size([32, 4096, 2048])
    """  # noqa: E501
    t0 = time.perf_counter()
    check_little_endian()
    lp = _checked_plan(path_or_repo_id, dtype=dtype, revision=revision, cache_dir=cache_dir,
                       token=token, local_files_only=local_files_only,
                       shared=_shared(embed_tokens_given, head_given))
    regions = {p: _rank_region(p, lp, rank, world_size) for p in lp.shapes if p not in lp.given}
    state = {p: torch.empty(region_shape(r), dtype=lp.shapes[p][1], device=device)
             for p, r in regions.items()}
    reads = _region_reads(lp, regions, state)
    nbytes = stream(lp.source.folder, reads, progress)
    return state, report(lp, t0, nbytes, sorted({r.info.file for r in reads}), len(reads))


def download(repo_id: str, *, revision: str | None = None, cache_dir=None, token=None,
             progress: bool | None = None, embed_tokens_given: bool = False,
             head_given: bool = False) -> str:
    """Download ``config.json``, the index and only the shards the drafter needs; returns the
    local folder (a ``huggingface_hub`` cache snapshot) that :func:`load_model` reads.

    Example:
        >>> folder = download("deepseek-ai/DeepSeek-V4-Flash")   # 3 of 46 shards  # doctest: +SKIP
    """
    tqdm_class = _quiet_tqdm() if progress is False else None
    if os.path.isdir(os.fspath(repo_id)):
        raise ValueError(f"{repo_id!r} is a local folder, not a Hub repo id: there is nothing "
                         f"to download; load or inspect the folder itself")
    lp = _checked_plan(repo_id, dtype=torch.bfloat16, revision=revision, cache_dir=cache_dir,
                       token=token, local_files_only=False, tqdm_class=tqdm_class,
                       shared=_shared(embed_tokens_given, head_given))
    return lp.source.folder


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


__all__ = ["load_model", "load_state", "plan", "download", "make_plan", "Plan", "RuleUse",
           "LoadReport", "LoadPlan", "CheckpointError", "TensorInfo", "read_header"]

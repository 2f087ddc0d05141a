"""Write a module back out as a checkpoint in the official on-disk format.

The names come from the remap table (:func:`mtp.remap.canonical_names`), so what is written is
exactly what the loader reads back: the drafter's own tensors (MTP layers, embedding, head),
nothing of the main model. Three layouts:

- ``"release"``: ``model-{k:05d}-of-{n:05d}.safetensors`` + ``model.safetensors.index.json``
  laid out like the release: ``embed.weight`` in the first shard, ``head.weight`` in the one
  before last, the MTP block in the last (3 shards).
- ``"single"``: everything in one ``model.safetensors``.
- ``"mp"``: the reference converter's per-rank files ``model{r}-mp{MP}.safetensors``: rows of
  embed, head, wq_b, wo_a, attn_sink and columns of wo_b split over ranks, rank r holding experts
  ``[r*E/MP, (r+1)*E/MP)`` under their global ids, ``wo_a`` dequantised to BF16 without a scale,
  FP4 experts typed ``F4``; the other tensors in every file.

Every tensor keeps the dtype the module holds it in, so a written module loads back bit-exact.
A folder that also holds placeholder main-model tensors, laid out over more shards like a whole
release (for tests and demos of what the loader skips), is
:func:`mtp.testing.write_release_like`'s.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from safetensors.torch import save_file

from . import remap
from .facts import ParamFacts, facts_of
from .model import DeepSeekV4MTP
from .quant import dequant_fp8_block
from .surgery import int8_as_fp4, region_slices, tp_range

LAYOUTS = ("release", "single", "mp")


def _pieces(model: DeepSeekV4MTP, rank: int | None = None,
            world_size: int | None = None) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor (contiguous CPU copy) for the whole module or one rank."""
    cfg, fmt = model.config, model.weight_format
    params = {n: p.detach() for n, p in model.named_parameters()}
    facts = facts_of(model)
    per_rank = world_size is not None
    out = {}
    for name, t in remap.canonical_names(cfg, fmt):
        if t.param not in params:
            continue  # e.g. the scale of a plain weight
        p, f = params[t.param], facts[t.param]
        weight = _weight_of(t.param, f)
        if per_rank and weight is not None and facts[weight].format == "wo_a":
            continue  # the converter stores wo_a dequantised, without its scale
        if per_rank and f.format == "wo_a" and fmt.wo_a == "fp8":
            scale = params[t.param + "_scale_inv"]
            p = dequant_fp8_block(p, scale).to(torch.bfloat16)  # exact: e4m3 x 2^k fits bf16
        region, _ = remap.region_of(t, tuple(p.shape), cfg, rank, world_size, f)
        if per_rank and t.expert is not None:
            lo, hi = tp_range(cfg.n_routed_experts, rank, world_size)
            if not lo <= t.expert < hi:
                continue
        piece = p[region_slices(region)]
        if t.expert is not None:
            piece = piece[0]
        piece = piece.to("cpu").contiguous().clone()
        if per_rank and f.format == "experts" and fmt.experts == "fp4":
            piece = int8_as_fp4(piece)  # the converter types packed FP4 as F4
        out[name] = piece
    return out


def _weight_of(param: str, facts: ParamFacts) -> str | None:
    """The weight a block scale belongs to (None for anything else)."""
    return None if facts.scale_of is None else param.rsplit(".", 1)[0] + "." + facts.scale_of


def _save(tensors: dict[str, torch.Tensor], path: str) -> int:
    save_file(tensors, path, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_checkpoint(model: DeepSeekV4MTP, folder: str | os.PathLike, *,
                     num_shards: int | None = None, layout: str = "release",
                     mp: int | None = None, overwrite: bool = False,
                     main_layers: int | None = None) -> None:
    """Write ``model``'s tensors (config, index, shards) into ``folder`` in the official format.

    Args:
        num_shards: shard files of the "release" layout: 3 (embedding, head, MTP layers).
        layout: "release", "single" or "mp" (then ``mp`` = number of ranks).
        overwrite: replace checkpoint files already in ``folder`` (otherwise refuse).
        main_layers: deprecated (one release): also write that many placeholder main-model
            layers; use :func:`mtp.testing.write_release_like`, which this then calls.

    Example:
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> from mtp.testing import init_random_
        >>> from mtp.loader import load_model
        >>> import tempfile
        >>> m = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> write_checkpoint(m, folder)
        >>> sorted(os.listdir(folder))[-2:]
        ['model-00003-of-00003.safetensors', 'model.safetensors.index.json']
        >>> loaded, report = load_model(folder, dtype=torch.float32)
        >>> report.shards_skipped
        []
    """
    if main_layers is not None:
        warnings.warn("write_checkpoint(main_layers=) is deprecated: the library writes the "
                      "drafter's tensors only; mtp.testing.write_release_like(model, folder, "
                      "main_layers=...) adds placeholder main-model layers", DeprecationWarning,
                      stacklevel=2)
        from .testing import write_release_like

        write_release_like(model, folder, main_layers=main_layers, num_shards=num_shards,
                           layout=layout, mp=mp, overwrite=overwrite)
        return
    _write(model, folder, {}, 0, num_shards=num_shards, layout=layout, mp=mp,
          overwrite=overwrite)


def _write(model: DeepSeekV4MTP, folder: str | os.PathLike, main: dict[str, torch.Tensor],
          main_layers: int, *, num_shards: int | None, layout: str, mp: int | None,
          overwrite: bool) -> None:
    """:func:`write_checkpoint` with ``main`` (main-model tensors, ``main_layers`` of them
    ``layers.{k}.*``) added: in every file of "single"/"mp", spread over the first shards of
    "release" (one layer or more per shard before the head's), the rest beside the head."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")
    if model.tp.sharded:
        raise ValueError("model: a tensor-parallel rank's module holds only its slices; write "
                         "the checkpoint from an unsplit module (process_group=None)")
    if (layout == "mp") != (mp is not None):
        raise ValueError("mp= (the number of ranks) goes with layout='mp', and only with it")
    most = max(main_layers, 1) + 2  # each shard before the head's holds embed or a layer
    n = num_shards if num_shards is not None else most
    if layout == "release" and not 3 <= n <= most:
        more = ("; more shards need placeholder main-model layers "
                "(mtp.testing.write_release_like)" if not main_layers
                else " (raise main_layers for more shards)")
        raise ValueError(f"num_shards={n}: the release layout needs 3 .. {most} shards{more}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    old = [f for f in os.listdir(folder) if f == "config.json"
           or (f.startswith("model") and f.endswith((".safetensors", ".index.json")))]
    if old and not overwrite:
        raise FileExistsError(f"{folder} already holds checkpoint files ({sorted(old)[:3]}); "
                              f"pass overwrite=True or use an empty folder")
    for f in old:
        os.remove(os.path.join(folder, f))

    cfg = model.config
    main = dict(main)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    if layout == "mp":
        for r in range(mp):
            _save({**main, **_pieces(model, r, mp)},
                  os.path.join(folder, f"model{r}-mp{mp}.safetensors"))
        return
    pieces = _pieces(model)
    if layout == "single":
        _save({**main, **pieces}, os.path.join(folder, "model.safetensors"))
        return
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    shards[0]["embed.weight"] = pieces.pop("embed.weight")
    for k in range(main_layers):
        layer = f"layers.{k}."
        for name in [x for x in main if x.startswith(layer)]:
            shards[min(k, n - 3)][name] = main.pop(name)
    shards[n - 2].update(main)
    shards[n - 2]["head.weight"] = pieces.pop("head.weight")
    shards[n - 1].update(pieces)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        total += _save(tensors, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


__all__ = ["write_checkpoint", "LAYOUTS"]

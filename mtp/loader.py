"""Load a DeepSeek-V4 MTP drafter from a checkpoint folder or a Hugging Face Hub repo.

The pipeline, every check before any parameter is written:

1. find the files: ``model.safetensors.index.json`` + shards, one ``model.safetensors``, or the
   reference converter's per-rank ``model{r}-mp{MP}.safetensors``;
2. name every tensor with the remap table (:mod:`mtp.remap`): load, drop on purpose, or refuse;
3. read the headers of the shards that hold needed tensors (only those are downloaded/opened);
4. infer the :class:`~mtp.quant.WeightFormat` from the stored dtypes;
5. check each tensor's shape and dtype against the module built from ``config.json``, and that
   every parameter is filled exactly once (no gap, no overlap);
6. build a fresh module and stream the bytes into its parameters in blocks of at most 16 MiB
   read by a few threads (straight into the parameter's memory when no conversion is needed,
   else through a per-thread 16 MiB buffer), so peak host memory is the module plus a few
   buffers. :mod:`mtp.shards` holds this file-format half (headers, reads).

Example:
    >>> from mtp.loader import load_model, plan
    >>> print(plan("checkpoints/DeepSeek-V4-Flash"))                    # doctest: +SKIP
    >>> model, report = load_model("deepseek-ai/DeepSeek-V4-Flash")     # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from . import remap
from .config import FP8_BLOCK, REFERENCE_KEYS, MTPConfig
from .hub import INDEX, SINGLE, Repo, looks_like_repo_id
from .model import DeepSeekV4MTP, Numerics
from .parallel import TensorParallel, check_world_size
from .quant import WeightFormat
from .shards import (
    DTYPES,
    PLAIN,
    CheckpointError,
    Progress,
    ShardReader,
    TensorInfo,
    check_little_endian,
    read_header,
)
from .surgery import (
    Region,
    full_region,
    intersect,
    narrow_region,
    overlaps,
    region_numel,
    region_shape,
    region_slices,
    tp_range,
)

# Stored dtype -> WeightFormat value, per WeightFormat field (remap.FORMAT_FIELD).
FORMAT_OF_DTYPE: dict[str, dict[str, str]] = {
    "dense": {"F8_E4M3": "fp8", "BF16": "plain", "F16": "plain", "F32": "plain", "F64": "plain"},
    "wo_a": {"F8_E4M3": "fp8", "BF16": "plain", "F16": "plain", "F32": "plain", "F64": "plain"},
    "experts": {"I8": "fp4", "F4": "fp4", "F8_E4M3": "fp8", "BF16": "plain", "F16": "plain",
                "F32": "plain", "F64": "plain"},
    "dense_scale": {"F8_E8M0": "e8m0", "F32": "f32"},
    "expert_scale": {"F8_E8M0": "e8m0", "F32": "f32"},
}
# Parallel reads: a page fault or a cold page-cache miss costs a core; NVMe wants a queue.
_WORKERS = max(1, min(8, os.cpu_count() or 1))
_MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
_NO_MTP = ("The checkpoint may have been quantized without including the MTP layers. Use a "
           "checkpoint that includes MTP layer weights, or disable speculative decoding.")
_NO_MTP_TRANSFORMERS = (
    "This is a transformers save_pretrained folder (its config.json has transformers_version): "
    "transformers drops the MTP weights (mtp.*) when it loads DeepSeek-V4. Load the drafter from "
    "the release folder or repo id (e.g. deepseek-ai/DeepSeek-V4-Flash), sharing the model's "
    "embedding and head (mtp.integrations.transformers.TransformersTarget.load_drafter).")


# ---- where the tensors are -------------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    file: str
    rank: int | None = None  # per-rank files: this file's rank ...
    world: int | None = None  # ... and the number of ranks
    indexed: bool = True


@dataclass
class _Source:
    where: str
    folder: str
    layout: str  # "index" | "single" | "mp"
    raw_config: dict
    entries: list[_Entry]
    all_files: list[str]
    repo: Repo | None = None
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def path(self, file: str) -> str:
        return os.path.join(self.folder, file)

    def fetch(self, files: list[str]) -> None:
        """Make ``files`` present: download them (Hub) or check they exist (folder)."""
        for file in files:
            if self.repo is not None:
                self.repo.fetch(file)
            elif not os.path.isfile(self.path(file)):
                names = sorted(e.name for e in self.entries if e.file == file)
                raise CheckpointError(
                    f"{self.where}: shard {file} is missing; the index puts {len(names)} needed "
                    f"tensor(s) there (e.g. {names[0]}). Download it into {self.folder}")


def _read_index(path: str) -> tuple[list[_Entry], list[str]]:
    problems: list[str] = []

    def no_duplicates(pairs):
        out: dict = {}
        for k, v in pairs:
            if k in out and isinstance(v, str):
                problems.append(f"the index lists {k} twice, in {out[k]} and in {v}: the same "
                                f"tensor in two shards; fix the index")
            out[k] = v
        return out

    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{path}: no weight_map of tensor name -> shard file")
    bad = sorted({v for v in wm.values() if "/" in v or "\\" in v or v.startswith(".")})
    if bad:
        raise CheckpointError(f"{path}: shard names must be plain file names, got {bad[:3]}")
    return [_Entry(k, v) for k, v in wm.items()], problems


def _open(where, *, revision=None, cache_dir=None, token=None, local_files_only=False,
          tqdm_class=None) -> _Source:
    where = os.fspath(where)
    repo = None
    if os.path.isdir(where):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos; {where!r} is a local "
                             f"folder")
        folder = where
        present = set(os.listdir(folder))
        if "config.json" not in present:
            raise CheckpointError(f"{where}: no config.json; copy the model's config.json there")
        layout = (
            "index" if INDEX in present else "single" if SINGLE in present
            else "mp" if any(_MP_FILE.match(f) for f in present) else None)
        if layout is None:
            raise CheckpointError(f"{where}: no {INDEX}, {SINGLE} or per-rank files "
                                  f"(model0-mp8.safetensors, ...): not a safetensors "
                                  f"checkpoint folder")
    elif looks_like_repo_id(where):
        repo = Repo(where, revision=revision, cache_dir=cache_dir, token=token,
                    local_files_only=local_files_only, tqdm_class=tqdm_class)
        repo.fetch("config.json")
        folder = repo.folder
        if repo.exists(INDEX):
            layout = "index"
        elif repo.exists(SINGLE):
            layout = "single"
        else:
            cache = " in the cache (offline mode)" if repo.local_files_only else ""
            raise CheckpointError(f"{where}: neither {INDEX} nor {SINGLE} found{cache} (per-rank "
                                  f"files such as model0-mp8.safetensors are read from local "
                                  f"folders only)")
        present = set()
    else:
        raise FileNotFoundError(f"{where!r} is neither a folder nor a Hub repo id (owner/name)")
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(raw_config, dict):
        raise CheckpointError(f"{where}: config.json is not a JSON object")
    src = _Source(where, folder, layout, raw_config, [], [], repo)
    if layout == "index":
        src.entries, src.problems = _read_index(os.path.join(folder, INDEX))
    elif layout == "single":
        src.headers[SINGLE] = read_header(os.path.join(folder, SINGLE))
        src.entries = [_Entry(k, SINGLE) for k in src.headers[SINGLE]]
    else:
        ranks = {}
        for f in present:
            if (m := _MP_FILE.match(f)) is not None:
                ranks[f] = (int(m.group(1)), int(m.group(2)))
        worlds = {w for _, w in ranks.values()}
        if len(worlds) != 1:
            raise CheckpointError(f"{where}: per-rank files of several world sizes {worlds}; "
                                  f"keep one set")
        world = worlds.pop()
        have = {r for r, _ in ranks.values()}
        lost = [f"model{r}-mp{world}.safetensors" for r in range(world) if r not in have]
        if lost:
            raise CheckpointError(f"{where}: per-rank file(s) {lost} are missing")
        for file in sorted(ranks, key=lambda f: ranks[f][0]):
            src.headers[file] = read_header(os.path.join(folder, file))
            src.entries += [_Entry(k, file, ranks[file][0], world) for k in src.headers[file]]
    src.all_files = sorted({e.file for e in src.entries})
    return src


# ---- naming every tensor, checking everything ------------------------------------------------
@dataclass
class _Decision:
    entry: _Entry
    status: str  # load | drop | given | replica | superseded | refuse
    rule: str
    target: remap.Target | None = None
    info: TensorInfo | None = None
    region: Region | None = None
    note: str = ""


def _decide(entries: list[_Entry], cfg: MTPConfig, fmt: WeightFormat | None,
            embed_given: bool, head_given: bool) -> list[_Decision]:
    head = f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight"
    given = {p for p, g in (("model.embed_tokens.weight", embed_given), (head, head_given)) if g}
    out = []
    for en in entries:
        m = remap.match(en.name, cfg, fmt)
        if m.rule.action == "refuse":
            try:
                remap.resolve(en.name, cfg, fmt)
            except remap.UnknownTensorError as e:
                out.append(_Decision(en, "refuse", m.rule.name, note=str(e)))
            continue
        t = m.target
        if t is None:
            out.append(_Decision(en, "drop", m.rule.name, note=m.rule.why))
        elif t.param in given:
            out.append(_Decision(en, "given", m.rule.name, t, note="passed in by the caller"))
        elif en.rank and remap.param_key(t.param) not in remap.TP_SPLIT:
            out.append(_Decision(en, "replica", m.rule.name, t,
                                 note="replicated in every per-rank file; read from rank 0's"))
        else:
            out.append(_Decision(en, "load", m.rule.name, t))
    return out


def _supersede(decisions: list[_Decision]) -> None:
    """An MTP copy of the embedding or head wins over the main model's (fallback) tensor."""
    slots = defaultdict(list)
    for d in decisions:
        if d.status == "load":
            slots[(d.target.param, d.target.shard, d.target.expert, d.entry.rank)].append(d)
    for group in slots.values():
        if any(not d.target.fallback for d in group):
            for d in group:
                if d.target.fallback:
                    d.status = "superseded"
                    d.note = "an MTP copy fills the same parameter"


def _dtype_ok(stored: str, param: torch.dtype) -> bool:
    src = DTYPES[stored]
    return src == param or (src in PLAIN and param in PLAIN)


def _infer_format(decisions: list[_Decision], problems: list[str]) -> WeightFormat | None:
    seen: dict[str, dict[str, str]] = defaultdict(dict)  # field -> value -> example tensor
    for d in decisions:
        if d.status != "load" or d.info is None:
            continue
        fld = remap.FORMAT_FIELD.get(remap.param_key(d.target.param))
        if fld is None:
            continue
        value = FORMAT_OF_DTYPE[fld].get(d.info.dtype)
        if value is None:
            problems.append(f"{d.entry.name} in {d.info.file}: dtype {d.info.dtype} is not a "
                            f"known {fld} format ({sorted(FORMAT_OF_DTYPE[fld])})")
            continue
        seen[fld].setdefault(value, d.entry.name)
    if not seen:
        return None
    for fld, values in seen.items():
        if len(values) > 1:
            problems.append(f"mixed {fld} formats: " + ", ".join(
                f"{v} ({name})" for v, name in sorted(values.items())))
    return WeightFormat(**{fld: next(iter(values)) for fld, values in seen.items()})


@dataclass
class _Analysis:
    src: _Source
    cfg: MTPConfig | None
    kind: str
    message: str = ""
    fmt: WeightFormat | None = None
    decisions: list[_Decision] = field(default_factory=list)
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    given: set[str] = field(default_factory=set)

    def loads(self) -> list[_Decision]:
        return [d for d in self.decisions if d.status == "load"]

    def needed(self) -> list[str]:
        return sorted({d.entry.file for d in self.loads()})

    @property
    def unexpected(self) -> list[str]:
        return sorted(d.note for d in self.decisions if d.status == "refuse")


def _config(raw: dict) -> tuple[MTPConfig | None, str, str]:
    """(config, kind, message) from config.json; kind is "v4-mtp" when it parses."""
    dspark = sorted(k for k in raw if k.startswith("dspark"))
    if dspark:
        return None, "dspark", (
            f"config.json has {dspark[:3]}: this is a DSpark drafter (DeepSeek-V4-Flash-0731 / "
            f"-Pro-0813: three blocks under mtp.{{0,1,2}}, no e_proj/hnorm), not a V4 MTP layer; "
            f"mtp implements only the MTP layer of the original V4 releases")
    try:
        return MTPConfig.from_dict(raw), "v4-mtp", ""
    except ValueError as e:
        data = {REFERENCE_KEYS.get(k, k): v for k, v in raw.items()}
        kind = "no-mtp" if data.get("num_nextn_predict_layers", 1) == 0 else "unsupported"
        return None, kind, f"config.json: {e}"


def _analyse(src: _Source, *, dtype: torch.dtype, embed_given: bool = False,
             head_given: bool = False, fetch: bool = False) -> _Analysis:
    cfg, kind, message = _config(src.raw_config)
    an = _Analysis(src, cfg, kind, message, problems=list(src.problems))
    if cfg is None:
        return an
    an.decisions = _decide(src.entries, cfg, None, embed_given, head_given)
    _supersede(an.decisions)
    if fetch:
        src.fetch(an.needed())
    # Headers of the needed shards: every key in them must be accounted for.
    where_indexed = {e.name: e.file for e in src.entries if e.indexed}
    for file in an.needed():
        if file in src.headers:
            an.headers[file] = src.headers[file]
        elif os.path.isfile(src.path(file)):
            try:
                an.headers[file] = read_header(src.path(file))
            except CheckpointError as e:
                an.problems.append(str(e))
        elif src.repo is None:
            an.problems.append(f"shard {file} is missing from {src.folder}")
    extra = []
    for file, header in an.headers.items() if src.layout == "index" else ():
        for name in header:
            if where_indexed.get(name, file) != file:
                an.problems.append(f"{name} is in {file} and in {where_indexed[name]} (the one "
                                   f"the index names): the same tensor in two shards")
            elif name not in where_indexed:
                extra.append(_Entry(name, file, indexed=False))
    src.entries += extra
    an.decisions += _decide(extra, cfg, None, embed_given, head_given)
    _attach_infos(an)
    fmt = _infer_format(an.decisions, an.problems)
    if fmt is not None and fmt != WeightFormat.released():  # expert-scale names depend on it
        an.decisions = _decide(src.entries, cfg, fmt, embed_given, head_given)
        _attach_infos(an)
    _supersede(an.decisions)
    an.problems += _index_problems(an)
    an.fmt = fmt
    meta = DeepSeekV4MTP(cfg, weight_format=fmt, dtype=dtype, device="meta")
    an.shapes = {n: (tuple(p.shape), p.dtype) for n, p in meta.named_parameters()}
    head = f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight"
    an.given = {p for p, g in (("model.embed_tokens.weight", embed_given), (head, head_given))
                if g}
    _place(an)
    _coverage(an)
    _classify(an)
    return an


def _attach_infos(an: _Analysis) -> None:
    for d in an.decisions:
        header = an.headers.get(d.entry.file)
        if header is not None:
            d.info = header.get(d.entry.name)


def _index_problems(an: _Analysis) -> list[str]:
    out = []
    for d in an.loads():
        if d.entry.file not in an.headers:
            continue
        if d.info is None:
            out.append(f"the index maps {d.entry.name} to {d.entry.file}, which does not hold "
                       f"it; fix the index or re-download the shard")
        elif not d.entry.indexed:
            out.append(f"{d.entry.file} holds {d.entry.name}, which the index does not list "
                       f"(a stale index?)")
    return out


def _place(an: _Analysis) -> None:
    cfg, fmt = an.cfg, an.fmt or WeightFormat.released()
    for d in an.loads():
        t = d.target
        if t.param not in an.shapes:
            an.problems.append(f"{d.entry.name} loads into {t.param}, which a module of {fmt} "
                               f"does not have (e.g. a scale for an unquantised weight)")
            continue
        shape, pdtype = an.shapes[t.param]
        try:
            d.region, piece = remap.region_of(t, shape, cfg, d.entry.rank, d.entry.world)
        except ValueError as e:
            an.problems.append(f"{d.entry.name}: {e}")
            continue
        if d.info is None:
            continue
        where = f"{d.entry.name} in {d.info.file}"
        if d.info.storage_shape != piece:
            found = list(d.info.shape) + (["(F4)"] if d.info.dtype == "F4" else [])
            an.problems.append(f"{where}: shape {found} {d.info.dtype}, expected {list(piece)} "
                               f"for {t.param} {list(shape)} from config.json")
        elif not _dtype_ok(d.info.dtype, pdtype):
            an.problems.append(f"{where}: dtype {d.info.dtype} cannot load into {t.param} "
                               f"({pdtype}); expected {_expected_dtype(pdtype)}")


def _expected_dtype(param: torch.dtype) -> str:
    if param in PLAIN:
        return "a floating-point dtype (F32, BF16, F16)"
    return " or ".join(k for k, v in DTYPES.items() if v == param)


def _coverage(an: _Analysis) -> None:
    """Each parameter filled exactly once: no overlap (duplicates), no gap (missing)."""
    by_param: dict[str, list[_Decision]] = defaultdict(list)
    for d in an.loads():
        if d.region is not None:
            by_param[d.target.param].append(d)
    for param, ds in by_param.items():
        for j, k in overlaps([d.region for d in ds]):
            an.problems.append(f"{ds[j].entry.name} ({ds[j].entry.file}) and {ds[k].entry.name} "
                               f"({ds[k].entry.file}) both fill part of {param}: duplicate "
                               f"tensors; keep one")
    short = {p for p, (shape, _) in an.shapes.items() if p not in an.given
             and sum(region_numel(d.region) for d in by_param[p]) < math.prod(shape)}
    if not short:
        return
    named = set()
    for name, t in remap.canonical_names(an.cfg, an.fmt):
        if t.param not in short:
            continue
        region, _ = remap.region_of(t, an.shapes[t.param][0], an.cfg)
        have = sum(region_numel(r) for d in by_param[t.param]
                   if (r := intersect(region, d.region)) is not None)
        if have < region_numel(region):
            an.missing.append(f"{name} (-> {t.param})")
            named.add(t.param)
    an.missing += [f"part of {p}" for p in sorted(short - named)]
    an.missing.sort()


def _classify(an: _Analysis) -> None:
    cfg = an.cfg
    head = f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight"
    filled = {d.target.param for d in an.loads() if d.target.param != head}
    empty = [L for L in cfg.mtp_layer_ids
             if not any(p.startswith(f"model.layers.{L}.") for p in filled)]
    refused_mtp = [d for d in an.decisions if d.status == "refuse" and d.rule == "mtp.unknown"]
    if refused_mtp and not any(".e_proj." in p for p in filled):
        an.kind = "dspark"
        an.message = ("tensors under mtp.* but no e_proj: this looks like a DSpark drafter "
                      "(DeepSeek-V4-Flash-0731 / -Pro-0813), not a V4 MTP layer")
    elif empty:
        an.kind = "no-mtp"
        layers = ", ".join(f"{L} (mtp.{L - cfg.num_hidden_layers}.*)" for L in empty)
        hint = _NO_MTP_TRANSFORMERS if "transformers_version" in an.src.raw_config else _NO_MTP
        an.message = f"MTP layer(s) {layers}: no weights in the checkpoint. {hint}"
        an.missing = [m for m in an.missing if not any(f"layers.{L}." in m for L in empty)]


def _raise_if_bad(an: _Analysis) -> None:
    if an.kind != "v4-mtp":
        raise CheckpointError(f"{an.src.where}: {an.message}")
    sections = [("problem", an.problems), ("unexpected tensor", an.unexpected),
                ("missing tensor", an.missing)]
    problems = [p for _, items in sections for p in items]
    if not problems:
        return
    lines = [f"{an.src.where}: refusing to load ({len(problems)} problem(s)); nothing was "
             f"loaded"]
    for what, items in sections:
        for p in items[:12]:
            lines.append(f"  {what}: {p}")
        if len(items) > 12:
            lines.append(f"  ... and {len(items) - 12} more {what}s")
    raise CheckpointError("\n".join(lines), problems)


# ---- the plan --------------------------------------------------------------------------------
@dataclass
class RuleUse:
    rule: str
    status: str  # load | drop | given | replica | superseded | refuse
    tensors: int
    bytes: int | None  # None when the shard headers were not read (a Hub plan)


@dataclass
class Plan:
    """What a checkpoint holds for the drafter, read from config, index and headers only.

    ``kind``: "v4-mtp", "dspark", "no-mtp" or "unsupported". ``ok`` is True when
    :func:`load_model` would load it. ``bytes`` is None when shard headers were not available
    (a Hub repo whose shards are not downloaded yet).
    """

    source: str
    folder: str
    layout: str
    kind: str
    message: str
    config: dict
    weight_format: WeightFormat | None
    shards_read: list[str]
    shards_skipped: list[str]
    rules: list[RuleUse]
    missing: list[str]
    unexpected: list[str]
    problems: list[str]
    tensors: int
    bytes: int | None

    @property
    def ok(self) -> bool:
        return self.kind == "v4-mtp" and not (self.missing or self.unexpected or self.problems)

    def __str__(self) -> str:
        c = self.config
        lines = [f"checkpoint  {self.source}  ({self.layout} layout, {self.folder})"]
        lines.append(f"kind        {self.kind}" + (f": {self.message}" if self.message else ""))
        if c:
            lines.append(
                f"config      hidden {c.get('hidden_size')}, vocab {c.get('vocab_size')}, "
                f"{c.get('num_hidden_layers')} layers + {c.get('num_nextn_predict_layers')} MTP, "
                f"{c.get('num_attention_heads')} heads, {c.get('n_routed_experts')} experts x "
                f"{c.get('moe_intermediate_size')}")
        f = self.weight_format
        lines.append("format      " + ("unknown (shard headers not read)" if f is None else
                     f"dense {f.dense} ({f.dense_scale} scales), wo_a {f.wo_a}, experts "
                     f"{f.experts} ({f.expert_scale} scales)"))
        total = len(self.shards_read) + len(self.shards_skipped)
        lines.append(f"read        {len(self.shards_read)} of {total} shard file(s), "
                     f"{self.tensors} tensors, {_size(self.bytes)}: "
                     f"{', '.join(self.shards_read) or '-'}")
        lines.append("rules       status      tensors  bytes       rule")
        for u in self.rules:
            lines.append(f"            {u.status:<10} {u.tensors:>8}  {_size(u.bytes):<10}  "
                         f"{u.rule}")
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("problems", self.problems)):
            lines.append(f"{title:<12}{'none' if not items else len(items)}")
            lines += [f"            {x}" for x in items[:20]]
            if len(items) > 20:
                lines.append(f"            ... and {len(items) - 20} more")
        lines.append(f"verdict     {'loads' if self.ok else 'refused'}")
        return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k:
            return f"{n / (1 << k):.2f} {unit}"
    return f"{n} B"


def _summary(raw: dict) -> dict:
    data = {REFERENCE_KEYS.get(k, k): v for k, v in raw.items()}
    keys = ("hidden_size", "vocab_size", "num_hidden_layers", "num_nextn_predict_layers",
            "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size")
    return {k: data[k] for k in keys if k in data}


def _plan_of(an: _Analysis) -> Plan:
    uses: dict[tuple[str, str], list] = {}
    for d in an.decisions:
        u = uses.setdefault((d.status, d.rule), [0, 0, False])
        u[0] += 1
        if d.info is not None:
            u[1] += d.info.nbytes
        else:
            u[2] = True  # in a shard whose header was not read
    order = ("load", "given", "superseded", "replica", "drop", "refuse")
    rules = [RuleUse(rule, status, n, None if unknown else b)
             for (status, rule), (n, b, unknown) in sorted(
                 uses.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))]
    loads = an.loads()
    known = all(d.info is not None for d in loads)
    needed = an.needed()
    return Plan(
        source=an.src.where, folder=an.src.folder, layout=an.src.layout, kind=an.kind,
        message=an.message, config=_summary(an.src.raw_config), weight_format=an.fmt,
        shards_read=needed, shards_skipped=[f for f in an.src.all_files if f not in needed],
        rules=rules, missing=an.missing, unexpected=an.unexpected, problems=an.problems,
        tensors=len(loads), bytes=sum(d.info.nbytes for d in loads) if known else None)


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
    src = _open(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=local_files_only)
    return _plan_of(_analyse(src, dtype=torch.bfloat16, embed_given=embed_tokens_given,
                             head_given=head_given))


# ---- loading ---------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a load did. ``dropped`` counts tensors not loaded, by reason (rule name)."""

    source: str
    folder: str
    weight_format: WeightFormat
    tensors: int
    bytes: int
    shards_opened: list[str]
    shards_skipped: list[str]
    dropped: dict[str, int]
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    def __str__(self) -> str:
        by_status: dict[str, int] = defaultdict(int)
        for k, v in self.dropped.items():
            by_status[k.split(":")[0]] += v
        drops = ", ".join(f"{k} {v}" for k, v in sorted(by_status.items())) or "none"
        return (f"loaded {self.tensors} tensors, {_size(self.bytes)} from "
                f"{len(self.shards_opened)} shard(s) (skipped {len(self.shards_skipped)}) in "
                f"{self.seconds:.2f} s ({self.gb_per_s:.2f} GB/s); not loaded: {drops}")


def _dest(tensor: torch.Tensor, region: Region, d: _Decision, origin: Region | None = None):
    view = tensor[region_slices(region, origin)]
    return view[0] if d.target.expert is not None else view


def _stream(an: _Analysis, reads: list[tuple[_Decision, torch.Tensor]], progress) -> int:
    """Run the reads, blocks in file order over a few threads; returns the bytes read."""
    reads = sorted(reads, key=lambda r: (r[0].info.file, r[0].info.begin))
    jobs = [(d.info, dest, r0, r1) for d, dest in reads if d.info.nbytes
            for r0, r1 in ShardReader.blocks(d.info)]
    bar = Progress(sum(d.info.nbytes for d, _ in reads), progress)
    reader = ShardReader(an.src.folder)
    try:
        for d, _ in reads:
            reader.open(d.info.file)
        with torch.no_grad(), ThreadPoolExecutor(_WORKERS) as pool:
            for n in pool.map(lambda job: reader.copy(*job), jobs):
                bar.update(n)
    finally:
        reader.close()
        bar.close()
    return bar.done


def _report(an: _Analysis, t0: float, nbytes: int, opened: list[str], tensors: int):
    dropped: dict[str, int] = defaultdict(int)
    for d in an.decisions:
        if d.status != "load":
            dropped[f"{d.status}:{d.rule}"] += 1
    return LoadReport(an.src.where, an.src.folder, an.fmt, tensors, nbytes, opened,
                      [f for f in an.src.all_files if f not in opened], dict(dropped),
                      time.perf_counter() - t0)


def load_model(path_or_repo_id, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
               embed_tokens: torch.Tensor | None = None, head: torch.Tensor | None = None,
               numerics: Numerics | None = None, revision: str | None = None, cache_dir=None,
               token=None, local_files_only: bool = False,
               progress: bool | Callable[[int, int], None] | None = None,
               process_group=None) -> tuple[DeepSeekV4MTP, LoadReport]:
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
        check_little_endian()
        src = _open(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token,
                    local_files_only=local_files_only)
        an = _analyse(src, dtype=dtype, embed_given=embed_tokens is not None,
                      head_given=head is not None, fetch=True)
        _raise_if_bad(an)
        check_world_size(an.cfg, tp.world_size)
    except BaseException:
        tp.agree(None, "load_model", device)  # the other ranks raise too, none waits for us
        raise
    settings = repr((dtype, numerics or Numerics(), embed_tokens is None, head is None)).encode()
    tp.agree(_fingerprint(an) + settings, f"load_model({an.src.where!r})", device)
    model = DeepSeekV4MTP(an.cfg, weight_format=an.fmt, dtype=dtype, device=device,
                          embed_tokens=embed_tokens, head=head, numerics=numerics,
                          process_group=process_group)
    params = dict(model.named_parameters())
    if tp.sharded:
        regions = {p: _rank_region(p, an.shapes[p][0], tp.rank, tp.world_size, an)
                   for p in an.shapes if p not in an.given}
        for p, r in regions.items():
            if region_shape(r) != tuple(params[p].shape):  # the split facts disagree
                raise AssertionError(f"{p}: rank region {region_shape(r)} but the module holds "
                                     f"{tuple(params[p].shape)}")
        nbytes, opened, count = _read_regions(
            an, regions, {p: params[p].data for p in regions}, progress)
        return model, _report(an, t0, nbytes, opened, count)
    reads = [(d, _dest(params[d.target.param].data, d.region, d)) for d in an.loads()]
    nbytes = _stream(an, reads, progress)
    return model, _report(an, t0, nbytes, an.needed(), len(reads))


def _fingerprint(an: _Analysis) -> bytes:
    """What a rank is about to load, as bytes: config.json and every tensor it reads (name,
    file, dtype, shape, byte offsets). Ranks of one group must agree on it."""
    tensors = sorted((d.entry.name, d.info.file, d.info.dtype, list(d.info.shape), d.info.begin,
                      d.info.end) for d in an.loads() if d.info is not None)
    return json.dumps([an.src.raw_config, tensors], sort_keys=True, default=str).encode()


def _rank_region(param: str, shape: tuple[int, ...], rank: int, world_size: int,
                 an: _Analysis) -> Region:
    key = remap.param_key(param)
    region = full_region(shape)
    if key not in remap.TP_SPLIT:
        return region
    dim, unit = remap.TP_SPLIT[key]
    try:
        a, b = tp_range(shape[dim], rank, world_size, getattr(an.cfg, unit) if unit else 1)
    except ValueError as e:
        raise ValueError(f"{param}: {e}") from None
    if key.endswith("_scale_inv") and key not in remap.STACKED:
        weight = param.removesuffix("_scale_inv")
        per_rank = an.shapes[weight][0][dim] // world_size
        if per_rank % FP8_BLOCK:
            raise ValueError(f"{weight}: world_size={world_size} gives each rank {per_rank} "
                             f"rows/columns, not whole {FP8_BLOCK}-wide FP8 scale blocks")
    return narrow_region(region, dim, a, b)


def load_state(path_or_repo_id, *, rank: int, world_size: int, device="cpu",
               dtype: torch.dtype = torch.bfloat16, revision: str | None = None, cache_dir=None,
               token=None, local_files_only: bool = False, embed_tokens_given: bool = False,
               head_given: bool = False, progress=None,
               ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """This tensor-parallel rank's part of every parameter, keyed by module parameter names:
    rows of ``wq_b`` (whole heads), ``wo_a`` (whole groups), ``attn_sink`` and the vocabulary
    rows of embedding and head; columns of ``wo_b``; experts
    ``[rank*E/world_size, (rank+1)*E/world_size)``; everything else whole. Only the needed
    bytes are read (``safetensors`` ``get_slice`` for partial tensors). These are the shapes of
    ``DeepSeekV4MTP(..., process_group=pg)``'s parameters on that rank; ``load_model(...,
    process_group=pg)`` reads them straight into the module.

    Example:
        >>> state, report = load_state("checkpoints/DeepSeek-V4-Flash", rank=1, world_size=8)  # doctest: +SKIP
        >>> state["model.layers.43.mtp_block.ffn.experts.w13_weight"].shape                       # doctest: +SKIP
        torch.Size([32, 4096, 2048])
    """  # noqa: E501
    t0 = time.perf_counter()
    check_little_endian()
    src = _open(path_or_repo_id, revision=revision, cache_dir=cache_dir, token=token,
                local_files_only=local_files_only)
    an = _analyse(src, dtype=dtype, embed_given=embed_tokens_given, head_given=head_given,
                  fetch=True)
    _raise_if_bad(an)
    regions = {p: _rank_region(p, shape, rank, world_size, an)
               for p, (shape, _) in an.shapes.items() if p not in an.given}
    state = {p: torch.empty(region_shape(r), dtype=an.shapes[p][1], device=device)
             for p, r in regions.items()}
    nbytes, opened, count = _read_regions(an, regions, state, progress)
    return state, _report(an, t0, nbytes, opened, count)


def _read_regions(an: _Analysis, regions: dict[str, Region], state: dict[str, torch.Tensor],
                  progress) -> tuple[int, list[str], int]:
    """Fill ``state[p]`` (holding ``regions[p]`` of parameter p) from the checkpoint, reading
    only the bytes inside the regions. Returns (bytes read, files opened, tensors read)."""
    from safetensors import safe_open

    whole, partial = [], []
    for d in an.loads():
        inter = intersect(d.region, regions[d.target.param])
        if inter is None:
            continue
        dest = _dest(state[d.target.param], inter, d, origin=regions[d.target.param])
        (whole if inter == d.region else partial).append((d, inter, dest))
    nbytes = _stream(an, [(d, dest) for d, _, dest in whole], progress)
    opened = {d.info.file for d, _, _ in whole + partial}
    handles = {}
    try:
        with torch.no_grad():
            for d, inter, dest in partial:
                if d.info.dtype == "F4":  # safetensors 0.8 get_slice cannot shape F4
                    raise CheckpointError(f"{d.entry.name}: cannot read part of an F4 tensor")
                if d.info.file not in handles:
                    handles[d.info.file] = safe_open(an.src.path(d.info.file), framework="pt")
                sl = region_slices(inter, d.region)
                part = handles[d.info.file].get_slice(d.entry.name)[
                    sl[1:] if d.target.expert is not None else sl]
                dest.copy_(part)
                nbytes += part.numel() * part.element_size()
    finally:
        handles.clear()
    return nbytes, sorted(opened), len(whole) + len(partial)


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
    src = _open(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                tqdm_class=tqdm_class)
    an = _analyse(src, dtype=torch.bfloat16, embed_given=embed_tokens_given,
                  head_given=head_given, fetch=True)
    _raise_if_bad(an)
    return src.folder


def _quiet_tqdm():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Quiet(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


__all__ = ["load_model", "load_state", "plan", "download", "Plan", "RuleUse", "LoadReport",
           "CheckpointError", "TensorInfo", "read_header"]

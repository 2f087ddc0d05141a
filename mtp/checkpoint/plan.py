"""Step 2 of a load: the plan, built by pure functions from config, names and headers.

:func:`build` names every tensor with the remap table (load, drop on purpose, refuse), infers the
:class:`~mtp.quant.WeightFormat` from the stored dtypes, checks each tensor's shape and dtype
against the module ``config.json`` describes (built on the meta device: its parameters' shapes
and :class:`~mtp.facts.ParamFacts`), and that every parameter is filled exactly once. The result,
a frozen :class:`LoadPlan`, says what to read from where and every problem found; nothing is
read or written while building it, and it never changes afterwards.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace

import torch

from .. import remap
from ..config import DSPARK, MTPConfig, NotAnMTPLayer
from ..facts import ParamFacts, facts_of
from ..quant import WeightFormat
from ..surgery import Region, intersect, overlaps, region_numel
from .header import DTYPES, PLAIN, TensorInfo
from .source import Entry, Source

# Stored dtype -> WeightFormat value, per WeightFormat field (ParamFacts.format).
FORMAT_OF_DTYPE: dict[str, dict[str, str]] = {
    "dense": {"F8_E4M3": "fp8", "BF16": "plain", "F16": "plain", "F32": "plain", "F64": "plain"},
    "wo_a": {"F8_E4M3": "fp8", "BF16": "plain", "F16": "plain", "F32": "plain", "F64": "plain"},
    "experts": {"I8": "fp4", "F4": "fp4", "F8_E4M3": "fp8", "BF16": "plain", "F16": "plain",
                "F32": "plain", "F64": "plain"},
    "dense_scale": {"F8_E8M0": "e8m0", "F32": "f32"},
    "expert_scale": {"F8_E8M0": "e8m0", "F32": "f32"},
}
NO_MTP = ("The checkpoint may have been quantized without including the MTP layers. Use a "
          "checkpoint that includes MTP layer weights, or disable speculative decoding.")
NO_MTP_TRANSFORMERS = (
    "This is a transformers save_pretrained folder (its config.json has transformers_version): "
    "transformers drops the MTP weights (mtp.*) when it loads DeepSeek-V4. Load the drafter from "
    "the release folder or repo id (e.g. deepseek-ai/DeepSeek-V4-Flash), sharing the model's "
    "embedding and head (mtp.integrations.transformers.TransformersTarget.load_drafter).")
STATUSES = ("load", "given", "superseded", "replica", "drop", "refuse")


@dataclass(frozen=True)
class Decision:
    """What happens to one checkpoint tensor: ``status`` one of :data:`STATUSES`, by ``rule``;
    for a load, its ``target`` and the ``region`` of the parameter it fills."""

    entry: Entry
    status: str
    rule: str
    target: remap.Target | None = None
    info: TensorInfo | None = None
    region: Region | None = None
    note: str = ""


@dataclass(frozen=True)
class LoadPlan:
    """Everything a load needs, and every problem found, before any byte is read.

    ``kind``: "v4-mtp", "dspark", "no-mtp" or "unsupported"; ``shapes``: parameter ->
    (shape, dtype) of the module to build; ``facts``: its parameters' facts; ``given``: the
    parameters the caller supplies."""

    source: Source
    config: MTPConfig | None
    kind: str
    message: str = ""
    weight_format: WeightFormat | None = None
    decisions: tuple[Decision, ...] = ()
    headers: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    facts: dict[str, ParamFacts] = field(default_factory=dict)
    given: frozenset[str] = frozenset()

    def loads(self) -> list[Decision]:
        return [d for d in self.decisions if d.status == "load"]

    def needed(self) -> list[str]:
        """The shard files that hold a tensor to load."""
        return sorted({d.entry.file for d in self.loads()})

    @property
    def unexpected(self) -> list[str]:
        return sorted(d.note for d in self.decisions if d.status == "refuse")

    @property
    def all_problems(self) -> list[str]:
        return [*self.problems, *self.unexpected, *self.missing]

    @property
    def ok(self) -> bool:
        return self.kind == "v4-mtp" and not self.all_problems


def parse_config(raw: dict) -> tuple[MTPConfig | None, str, str]:
    """(config, kind, message) from config.json; kind is "v4-mtp" when it parses."""
    try:
        return MTPConfig.from_dict(raw), "v4-mtp", ""
    except NotAnMTPLayer as e:
        return None, e.kind, f"config.json: {e}"
    except ValueError as e:
        return None, "unsupported", f"config.json: {e}"


def decide(entries: Iterable[Entry], cfg: MTPConfig, fmt: WeightFormat | None,
           shared: Collection[str]) -> list[Decision]:
    """Each entry's decision from the remap table; ``shared``: the tables the caller supplies
    (``"embed_tokens"``, ``"head"``)."""
    facts = remap.param_facts(cfg)
    out = []
    for en in entries:
        m = remap.match(en.name, cfg, fmt)
        if m.rule.action == "refuse":
            try:
                remap.resolve(en.name, cfg, fmt)
            except remap.UnknownTensorError as e:
                out.append(Decision(en, "refuse", m.rule.name, note=str(e)))
            continue
        t = m.target
        if t is None:
            out.append(Decision(en, "drop", m.rule.name, note=m.rule.why))
        elif facts[t.param].shared in shared:
            out.append(Decision(en, "given", m.rule.name, t, note="passed in by the caller"))
        elif en.rank and facts[t.param].tp is None:
            out.append(Decision(en, "replica", m.rule.name, t,
                                note="replicated in every per-rank file; read from rank 0's"))
        else:
            out.append(Decision(en, "load", m.rule.name, t))
    return supersede(out)


def supersede(decisions: list[Decision]) -> list[Decision]:
    """An MTP copy of the embedding or head wins over the main model's (fallback) tensor."""
    slots = defaultdict(list)
    for d in decisions:
        if d.status == "load":
            slots[(d.target.param, d.target.shard, d.target.expert, d.entry.rank)].append(d)
    lost = {id(d) for group in slots.values() if any(not d.target.fallback for d in group)
            for d in group if d.target.fallback}
    return [replace(d, status="superseded", note="an MTP copy fills the same parameter")
            if id(d) in lost else d for d in decisions]


def needed_files(source: Source, cfg: MTPConfig, shared: Collection[str]) -> list[str]:
    """The shards holding a tensor to load, from the names alone (what to fetch)."""
    return sorted({d.entry.file for d in decide(source.entries, cfg, None, shared)
                   if d.status == "load"})


def _with_infos(decisions: list[Decision], headers) -> list[Decision]:
    return [replace(d, info=headers[d.entry.file].get(d.entry.name))
            if d.entry.file in headers else d for d in decisions]


def infer_format(decisions: list[Decision], facts: dict[str, ParamFacts],
                 ) -> tuple[WeightFormat | None, list[str]]:
    """The weight format the stored dtypes say (None: no header read), and the problems."""
    seen: dict[str, dict[str, str]] = defaultdict(dict)  # field -> value -> example tensor
    problems = []
    for d in decisions:
        if d.status != "load" or d.info is None:
            continue
        fld = facts[d.target.param].format
        if fld is None:
            continue
        value = FORMAT_OF_DTYPE[fld].get(d.info.dtype)
        if value is None:
            problems.append(f"{d.entry.name} in {d.info.file}: dtype {d.info.dtype} is not a "
                            f"known {fld} format ({sorted(FORMAT_OF_DTYPE[fld])})")
            continue
        seen[fld].setdefault(value, d.entry.name)
    if not seen:
        return None, problems
    for fld, values in seen.items():
        if len(values) > 1:
            problems.append(f"mixed {fld} formats: " + ", ".join(
                f"{v} ({name})" for v, name in sorted(values.items())))
    return WeightFormat(**{fld: next(iter(values)) for fld, values in seen.items()}), problems


def _unindexed(source: Source, headers) -> tuple[list[Entry], list[str]]:
    """Names a needed shard holds beyond the index, and tensors in two shards."""
    if source.layout != "index":
        return [], []
    where_indexed = {e.name: e.file for e in source.entries if e.indexed}
    extra, problems = [], []
    for file, header in headers.items():
        for name in header:
            if where_indexed.get(name, file) != file:
                problems.append(f"{name} is in {file} and in {where_indexed[name]} (the one "
                                f"the index names): the same tensor in two shards")
            elif name not in where_indexed:
                extra.append(Entry(name, file, indexed=False))
    return extra, problems


def _index_problems(decisions: list[Decision], headers) -> list[str]:
    out = []
    for d in decisions:
        if d.status != "load" or d.entry.file not in headers:
            continue
        if d.info is None:
            out.append(f"the index maps {d.entry.name} to {d.entry.file}, which does not hold "
                       f"it; fix the index or re-download the shard")
        elif not d.entry.indexed:
            out.append(f"{d.entry.file} holds {d.entry.name}, which the index does not list "
                       f"(a stale index?)")
    return out


def _expected_dtype(param: torch.dtype) -> str:
    if param in PLAIN:
        return "a floating-point dtype (F32, BF16, F16)"
    return " or ".join(k for k, v in DTYPES.items() if v == param)


def place(decisions: list[Decision], cfg: MTPConfig, fmt: WeightFormat, shapes, facts,
          ) -> tuple[list[Decision], list[str]]:
    """Each load's region of its parameter; problems where shape or dtype disagree."""
    out, problems = [], []
    for d in decisions:
        t = d.target
        if d.status != "load":
            out.append(d)
            continue
        if t.param not in shapes:
            problems.append(f"{d.entry.name} loads into {t.param}, which a module of {fmt} "
                            f"does not have (e.g. a scale for an unquantised weight)")
            out.append(d)
            continue
        shape, pdtype = shapes[t.param]
        try:
            region, piece = remap.region_of(t, shape, cfg, d.entry.rank, d.entry.world,
                                            facts[t.param])
        except ValueError as e:
            problems.append(f"{d.entry.name}: {e}")
            out.append(d)
            continue
        out.append(replace(d, region=region))
        if d.info is None:
            continue
        where = f"{d.entry.name} in {d.info.file}"
        if d.info.storage_shape != piece:
            found = list(d.info.shape) + (["(F4)"] if d.info.dtype == "F4" else [])
            problems.append(f"{where}: shape {found} {d.info.dtype}, expected {list(piece)} "
                            f"for {t.param} {list(shape)} from config.json")
        elif not (DTYPES[d.info.dtype] == pdtype
                  or (DTYPES[d.info.dtype] in PLAIN and pdtype in PLAIN)):
            problems.append(f"{where}: dtype {d.info.dtype} cannot load into {t.param} "
                            f"({pdtype}); expected {_expected_dtype(pdtype)}")
    return out, problems


def coverage(decisions: list[Decision], cfg: MTPConfig, fmt: WeightFormat | None, shapes,
             given: frozenset[str]) -> tuple[list[str], list[str]]:
    """(problems, missing): each parameter filled exactly once, no overlap, no gap."""
    by_param: dict[str, list[Decision]] = defaultdict(list)
    for d in decisions:
        if d.status == "load" and d.region is not None:
            by_param[d.target.param].append(d)
    problems = []
    for param, ds in by_param.items():
        for j, k in overlaps([d.region for d in ds]):
            problems.append(f"{ds[j].entry.name} ({ds[j].entry.file}) and {ds[k].entry.name} "
                            f"({ds[k].entry.file}) both fill part of {param}: duplicate "
                            f"tensors; keep one")
    short = {p for p, (shape, _) in shapes.items() if p not in given
             and sum(region_numel(d.region) for d in by_param[p]) < math.prod(shape)}
    missing, named = [], set()
    for name, t in remap.canonical_names(cfg, fmt) if short else ():
        if t.param not in short:
            continue
        region, _ = remap.region_of(t, shapes[t.param][0], cfg)
        have = sum(region_numel(r) for d in by_param[t.param]
                   if (r := intersect(region, d.region)) is not None)
        if have < region_numel(region):
            missing.append(f"{name} (-> {t.param})")
            named.add(t.param)
    missing += [f"part of {p}" for p in sorted(short - named)]
    return problems, sorted(missing)


def classify(decisions: list[Decision], cfg: MTPConfig, facts, missing: list[str],
             raw_config: dict | None = None) -> tuple[str, str, list[str]]:
    """(kind, message, missing): a DSpark drafter by its tensors, or MTP layers without
    weights (then their missing tensors are the message, not a list)."""
    filled = {d.target.param for d in decisions
              if d.status == "load" and facts[d.target.param].shared is None}
    empty = [L for L in cfg.mtp_layer_ids
             if not any(p.startswith(f"model.layers.{L}.") for p in filled)]
    refused_mtp = [d for d in decisions if d.status == "refuse" and d.rule == "mtp.unknown"]
    if refused_mtp and not any(".e_proj." in p for p in filled):
        return "dspark", f"tensors under mtp.* but no e_proj: this looks like {DSPARK}", missing
    if empty:
        layers = ", ".join(f"{L} (mtp.{L - cfg.num_hidden_layers}.*)" for L in empty)
        hint = NO_MTP_TRANSFORMERS if "transformers_version" in (raw_config or {}) else NO_MTP
        return "no-mtp", f"MTP layer(s) {layers}: no weights in the checkpoint. {hint}", [
            m for m in missing if not any(f"layers.{L}." in m for L in empty)]
    return "v4-mtp", "", missing


def build(source: Source, cfg: MTPConfig, headers: dict[str, dict[str, TensorInfo]],
          header_problems: list[str], dtype: torch.dtype,
          shared: Collection[str] = ()) -> LoadPlan:
    """The plan for loading ``source`` (whose needed shards' ``headers`` were read) into a
    module of ``cfg`` in compute ``dtype``; ``shared``: the tables the caller supplies."""
    from ..model import DeepSeekV4MTP  # deferred: the model is built only on the meta device

    problems = [*source.problems, *header_problems]
    extra, two_shards = _unindexed(source, headers)
    problems += two_shards
    entries = [*source.entries, *extra]
    fmt, format_problems = infer_format(
        _with_infos(decide(entries, cfg, None, shared), headers), remap.param_facts(cfg))
    problems += format_problems
    # The expert scales' names depend on the format: decide again with it.
    decisions = _with_infos(decide(entries, cfg, fmt, shared), headers)
    problems += _index_problems(decisions, headers)
    meta = DeepSeekV4MTP(cfg, weight_format=fmt, dtype=dtype, device="meta")
    shapes = {n: (tuple(p.shape), p.dtype) for n, p in meta.named_parameters()}
    facts = facts_of(meta)
    given = frozenset(n for n, f in facts.items() if f.shared in shared)
    decisions, place_problems = place(decisions, cfg, fmt or WeightFormat.released(), shapes,
                                      facts)
    problems += place_problems
    cover_problems, missing = coverage(decisions, cfg, fmt, shapes, given)
    problems += cover_problems
    kind, message, missing = classify(decisions, cfg, facts, missing, source.raw_config)
    return LoadPlan(source, cfg, kind, message, fmt, tuple(decisions), headers, tuple(problems),
                    tuple(missing), shapes, facts, given)


__all__ = ["LoadPlan", "Decision", "build", "decide", "supersede", "needed_files", "parse_config",
           "infer_format", "place", "coverage", "classify", "FORMAT_OF_DTYPE", "STATUSES"]

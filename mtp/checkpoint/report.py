"""What a plan and a load tell the user: :class:`Plan` (``print(plan(...))``, ``mtp inspect``)
and :class:`LoadReport`, both read from a :class:`~mtp.checkpoint.plan.LoadPlan`."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from ..config import REFERENCE_KEYS
from ..memory import size_text
from ..quant import WeightFormat
from .plan import STATUSES, LoadPlan


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
    return "?" if n is None else size_text(n)


def _summary(raw: dict) -> dict:
    data = {REFERENCE_KEYS.get(k, k): v for k, v in raw.items()}
    keys = ("hidden_size", "vocab_size", "num_hidden_layers", "num_nextn_predict_layers",
            "num_attention_heads", "head_dim", "q_lora_rank", "o_groups", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size")
    return {k: data[k] for k in keys if k in data}


def summarize(plan: LoadPlan) -> Plan:
    """The printable :class:`Plan` of a :class:`~mtp.checkpoint.plan.LoadPlan`."""
    uses: dict[tuple[str, str], list] = {}
    for d in plan.decisions:
        u = uses.setdefault((d.status, d.rule), [0, 0, False])
        u[0] += 1
        if d.info is not None:
            u[1] += d.info.nbytes
        else:
            u[2] = True  # in a shard whose header was not read
    rules = [RuleUse(rule, status, n, None if unknown else b)
             for (status, rule), (n, b, unknown) in sorted(
                 uses.items(), key=lambda kv: (STATUSES.index(kv[0][0]), kv[0][1]))]
    loads = plan.loads()
    known = all(d.info is not None for d in loads)
    needed = plan.needed()
    src = plan.source
    return Plan(
        source=src.where, folder=src.folder, layout=src.layout, kind=plan.kind,
        message=plan.message, config=_summary(src.raw_config), weight_format=plan.weight_format,
        shards_read=needed, shards_skipped=[f for f in src.files if f not in needed],
        rules=rules, missing=list(plan.missing), unexpected=plan.unexpected,
        problems=list(plan.problems), tensors=len(loads),
        bytes=sum(d.info.nbytes for d in loads) if known else None)


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


def report(plan: LoadPlan, t0: float, nbytes: int, opened: list[str], tensors: int,
           ) -> LoadReport:
    """The :class:`LoadReport` of a load that started at ``t0`` (``time.perf_counter``)."""
    dropped: dict[str, int] = defaultdict(int)
    for d in plan.decisions:
        if d.status != "load":
            dropped[f"{d.status}:{d.rule}"] += 1
    return LoadReport(plan.source.where, plan.source.folder, plan.weight_format, tensors, nbytes,
                      opened, [f for f in plan.source.files if f not in opened], dict(dropped),
                      time.perf_counter() - t0)


__all__ = ["Plan", "RuleUse", "LoadReport", "summarize", "report"]

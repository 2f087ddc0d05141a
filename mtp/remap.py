"""The remap table: which module parameter each checkpoint tensor loads into, as data.

Every row of :data:`RULES` is anchored on whole dot-separated name segments. In a pattern:

- ``{i}`` is an MTP index (``0 <= i < num_nextn_predict_layers``), ``{L}`` an MTP layer index
  (``L = num_hidden_layers + i``), ``{e}`` an expert (``< n_routed_experts``), ``{n}`` a
  main-model layer (``< num_hidden_layers``), ``{m}`` any layer number;
- ``{name:a|b|c}`` is one of the listed segments (substituted into the target when the target
  names ``{name}``; otherwise it lists spellings of the same tensor);
- ``**`` is the rest of the name (one or more segments).

A leading ``model.`` is stripped before matching. Targets name ``{L}`` and ``{L0}`` (the first
MTP layer). The first row that matches decides: ``load`` into the target (``shard``: which block
of rows of a fused parameter; the expert index comes from ``{e}``), ``self`` (the name is already
a module parameter), ``drop`` (on purpose, with the reason) or ``refuse`` (an error naming the
closest rule). ``when`` restricts a row to a weight format. :func:`match` is the whole matcher.

Example:
    >>> from mtp import MTPConfig
    >>> t = resolve("mtp.0.attn.wkv.scale", MTPConfig.from_name("flash"))
    >>> t.param, t.shard, t.expert
    ('model.layers.43.mtp_block.attn.fused_wqa_wkv.weight_scale_inv', 1, None)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from .config import MTPConfig
from .facts import ParamFacts, facts_of
from .quant import WeightFormat
from .surgery import Region, full_region, fused_rows, narrow_region, region_shape, tp_range

ACTIONS = ("load", "self", "drop", "refuse")
_RELEASED = WeightFormat.released()
_SCALE = "{s:scale|weight_scale_inv|weight_scale}"  # release, vLLM, AMD Quark spellings


@dataclass(frozen=True)
class Rule:
    """One row of the table (see the module docstring for the pattern syntax)."""

    name: str
    pattern: str
    target: str | None = None
    shard: int | None = None
    action: str = "load"
    when: str | None = None  # "experts=fp4" / "experts!=fp4": a WeightFormat field test
    fallback: bool = False  # used only when no other tensor fills the same slot
    canonical: bool = False  # part of the official release layout (what export writes)
    origin: str = "seed"
    why: str = ""
    hint: str | None = None  # refusals: suggest the closest "rule" or module "param"


_L = "model.layers.{L}."
_B = "model.layers.{L}.mtp_block."
_SHARED_ONCE = "shared weights are taken from the first MTP layer only"

RULES: tuple[Rule, ...] = (
    # ---- the main model's tensors that the drafter shares -------------------------------------
    Rule("embed", "embed.weight", "model.embed_tokens.weight", fallback=True, canonical=True,
         origin="release",
         why="the main model's embedding: the release has no MTP copy (vLLM skipping it is a "
             "known 0%-acceptance bug); an MTP copy, if present, takes precedence"),
    Rule("head", "head.weight", "model.layers.{L0}.shared_head.head.weight", fallback=True,
         canonical=True, origin="release",
         why="the main model's LM head, shared by every MTP layer; an MTP copy takes precedence"),
    Rule("mtp.emb", "mtp.0.emb.tok_emb.weight", "model.embed_tokens.weight",
         why="an MTP copy of the embedding (some exports carry one)"),
    Rule("mtp.emb.copy", "mtp.{i}.emb.tok_emb.weight", action="drop", why=_SHARED_ONCE),
    Rule("mtp.head", "mtp.0.head.weight", "model.layers.{L0}.shared_head.head.weight",
         why="an MTP copy of the LM head (some exports carry one)"),
    Rule("mtp.head.copy", "mtp.{i}.head.weight", action="drop", why=_SHARED_ONCE),
    # ---- spec-level tensors of MTP layer i (outside mtp_block) --------------------------------
    Rule("norm", "mtp.{i}.norm.weight", _L + "shared_head.norm.weight", canonical=True,
         why="the MTP layer's own final norm, applied before the shared head"),
    Rule("enorm.hnorm", "mtp.{i}.{norm:enorm|hnorm}.weight", _L + "{norm}.weight",
         canonical=True),
    Rule("proj", "mtp.{i}.{proj:e_proj|h_proj}.weight", _L + "{proj}.weight", canonical=True),
    Rule("proj.scale", "mtp.{i}.{proj:e_proj|h_proj}." + _SCALE, _L + "{proj}.weight_scale_inv",
         canonical=True,
         why="FP8 128x128 block scale, a multiplier despite vLLM's name weight_scale_inv; "
             ".weight_scale is AMD Quark's spelling"),
    Rule("hc_head", "mtp.{i}.{hc:hc_head_fn|hc_head_base|hc_head_scale}", _L + "{hc}",
         canonical=True),
    # ---- the decoder block: mtp_block. --------------------------------------------------------
    Rule("block.norms", "mtp.{i}.{norm:attn_norm|ffn_norm}.weight", _B + "{norm}.weight",
         canonical=True),
    Rule("block.hc", "mtp.{i}.{hc:hc_attn_fn|hc_attn_base|hc_attn_scale|hc_ffn_fn|hc_ffn_base"
         "|hc_ffn_scale}", _B + "{hc}", canonical=True),
    Rule("attn.wq_a", "mtp.{i}.attn.wq_a.weight", _B + "attn.fused_wqa_wkv.weight", shard=0,
         canonical=True, why="fused with wkv: wq_a rows first"),
    Rule("attn.wq_a.scale", "mtp.{i}.attn.wq_a." + _SCALE,
         _B + "attn.fused_wqa_wkv.weight_scale_inv", shard=0, canonical=True),
    Rule("attn.wkv", "mtp.{i}.attn.wkv.weight", _B + "attn.fused_wqa_wkv.weight", shard=1,
         canonical=True, why="fused with wq_a: wkv rows after them"),
    Rule("attn.wkv.scale", "mtp.{i}.attn.wkv." + _SCALE,
         _B + "attn.fused_wqa_wkv.weight_scale_inv", shard=1, canonical=True),
    Rule("attn.proj", "mtp.{i}.attn.{proj:wq_b|wo_a|wo_b}.weight", _B + "attn.{proj}.weight",
         canonical=True),
    Rule("attn.proj.scale", "mtp.{i}.attn.{proj:wq_b|wo_a|wo_b}." + _SCALE,
         _B + "attn.{proj}.weight_scale_inv", canonical=True),
    Rule("attn.norms", "mtp.{i}.attn.{norm:q_norm|kv_norm}.weight", _B + "attn.{norm}.weight",
         canonical=True),
    Rule("attn.attn_sink", "mtp.{i}.attn.attn_sink", _B + "attn.attn_sink", canonical=True,
         why="per-head sink logits; a tensor-parallel rank takes its heads' rows"),
    Rule("ffn.gate", "mtp.{i}.ffn.gate.weight", _B + "ffn.gate.weight", canonical=True),
    Rule("ffn.gate.bias", "mtp.{i}.ffn.gate.bias", _B + "ffn.gate.e_score_correction_bias",
         canonical=True, why="the routing bias (vLLM's name)"),
    Rule("shared.w1", "mtp.{i}.ffn.shared_experts.w1.weight",
         _B + "ffn.shared_experts.gate_up_proj.weight", shard=0, canonical=True),
    Rule("shared.w1.scale", "mtp.{i}.ffn.shared_experts.w1." + _SCALE,
         _B + "ffn.shared_experts.gate_up_proj.weight_scale_inv", shard=0, canonical=True),
    Rule("shared.w3", "mtp.{i}.ffn.shared_experts.w3.weight",
         _B + "ffn.shared_experts.gate_up_proj.weight", shard=1, canonical=True),
    Rule("shared.w3.scale", "mtp.{i}.ffn.shared_experts.w3." + _SCALE,
         _B + "ffn.shared_experts.gate_up_proj.weight_scale_inv", shard=1, canonical=True),
    Rule("shared.w2", "mtp.{i}.ffn.shared_experts.w2.weight",
         _B + "ffn.shared_experts.down_proj.weight", canonical=True),
    Rule("shared.w2.scale", "mtp.{i}.ffn.shared_experts.w2." + _SCALE,
         _B + "ffn.shared_experts.down_proj.weight_scale_inv", canonical=True),
    Rule("experts.w1", "mtp.{i}.ffn.experts.{e}.w1.weight", _B + "ffn.experts.w13_weight",
         shard=0, canonical=True, why="stacked over experts; w1 rows then w3 rows"),
    Rule("experts.w3", "mtp.{i}.ffn.experts.{e}.w3.weight", _B + "ffn.experts.w13_weight",
         shard=1, canonical=True),
    Rule("experts.w2", "mtp.{i}.ffn.experts.{e}.w2.weight", _B + "ffn.experts.w2_weight",
         canonical=True),
    Rule("experts.w1.scale.fp4", "mtp.{i}.ffn.experts.{e}.w1." + _SCALE,
         _B + "ffn.experts.w13_weight_scale", shard=0, when="experts=fp4", canonical=True,
         why="FP4 experts: per-32 E8M0 scale (vLLM: weight_scale)"),
    Rule("experts.w3.scale.fp4", "mtp.{i}.ffn.experts.{e}.w3." + _SCALE,
         _B + "ffn.experts.w13_weight_scale", shard=1, when="experts=fp4", canonical=True),
    Rule("experts.w2.scale.fp4", "mtp.{i}.ffn.experts.{e}.w2." + _SCALE,
         _B + "ffn.experts.w2_weight_scale", when="experts=fp4", canonical=True),
    Rule("experts.w1.scale.fp8", "mtp.{i}.ffn.experts.{e}.w1." + _SCALE,
         _B + "ffn.experts.w13_weight_scale_inv", shard=0, when="experts!=fp4", canonical=True,
         why="FP8 experts (-Base: F32 scales): 128x128 block scale (vLLM: weight_scale_inv)"),
    Rule("experts.w3.scale.fp8", "mtp.{i}.ffn.experts.{e}.w3." + _SCALE,
         _B + "ffn.experts.w13_weight_scale_inv", shard=1, when="experts!=fp4", canonical=True),
    Rule("experts.w2.scale.fp8", "mtp.{i}.ffn.experts.{e}.w2." + _SCALE,
         _B + "ffn.experts.w2_weight_scale_inv", when="experts!=fp4", canonical=True),
    # ---- the module's own names: a saved state_dict loads back --------------------------------
    Rule("self.embed", "embed_tokens.weight", action="self", origin="module",
         why="the module's own parameter name"),
    Rule("self.layer", "layers.{L}.**", action="self", origin="module",
         why="the module's own parameter name (any weight format)"),
    Rule("self.head.alias", "layers.{L}.shared_head.head.weight", action="drop", origin="module",
         why="an alias of the first MTP layer's head (state_dict() lists every alias)"),
    Rule("self.unknown", "layers.{L}.**", action="refuse", origin="module", hint="param",
         why="under an MTP layer's prefix but not a parameter of the module"),
    # ---- everything else belongs to the main model --------------------------------------------
    Rule("main.layer", "layers.{n}.**", action="drop", origin="release",
         why="a main-model decoder layer"),
    Rule("main.layer.other", "layers.{m}.**", action="refuse", origin="release",
         why="layer index is neither a main-model layer (< num_hidden_layers) nor an MTP layer "
             "of this config"),
    Rule("main.norm", "norm.weight", action="drop", origin="release",
         why="the main model's final norm (the MTP head uses mtp.{i}.norm)"),
    Rule("main.hc_head", "{hc:hc_head_fn|hc_head_base|hc_head_scale}", action="drop",
         origin="release", why="the main model's hc_head (the MTP head uses mtp.{i}.hc_head_*)"),
    Rule("mtp.unknown", "mtp.**", action="refuse", origin="release", hint="rule",
         why="under mtp. but matches no rule (or its index is beyond the config)"),
    Rule("other", "**", action="drop", origin="release",
         why="not a drafter tensor: left to the main model"),
)

# Facts about the module's parameters (fused pieces, stacked experts, tensor-parallel split,
# stored format) are declared where each parameter is created (mtp/model.py, mtp/facts.py):
# this table only maps names to names.


def param_key(param: str) -> str:
    """``model.layers.43.mtp_block.attn.wq_b.weight`` -> ``mtp_block.attn.wq_b.weight``."""
    return re.sub(r"^model\.(layers\.\d+\.)?", "", param)


# ---- results -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where a checkpoint tensor goes: ``param`` (module parameter name), ``shard`` (block of
    rows of a fused parameter, or None), ``expert`` (index into a stacked parameter, or None)."""

    param: str
    shard: int | None = None
    expert: int | None = None
    rule: str = ""
    fallback: bool = False


@dataclass(frozen=True)
class Match:
    rule: Rule
    index: int  # row number in RULES
    captures: dict
    target: Target | None  # None for drop / refuse


class UnknownTensorError(ValueError):
    """A name inside the drafter's namespace (``mtp.{i}.``, an MTP layer) that no rule loads."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# ---- the matcher ---------------------------------------------------------------------------
_INDEX = re.compile(r"^\{([a-zA-Z])\}$")
_CHOICE = re.compile(r"^\{(\w+):([^}]+)\}$")


def _index_range(kind: str, cfg: MTPConfig) -> range | None:
    n, k = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    if kind == "i":
        return range(k)
    if kind == "L":
        return range(n, n + k)
    if kind == "e":
        return range(cfg.n_routed_experts)
    return range(n) if kind == "n" else None


@functools.cache
def _when(when: str) -> tuple[str, bool, str]:
    field, op, value = re.fullmatch(r"(\w+)(!?=)(\w+)", when).groups()
    return field, op == "=", value


def _when_holds(when: str | None, fmt: WeightFormat) -> bool:
    if when is None:
        return True
    field, equal, value = _when(when)
    return (getattr(fmt, field) == value) == equal


@functools.cache
def _compile(pattern: str) -> tuple[tuple, bool]:
    """``pattern`` -> (one ("index", kind) / ("choice", (name, options)) / ("literal", text)
    per segment, whether it ends in ``**``)."""
    segs = pattern.split(".")
    tail = segs[-1] == "**"
    out = []
    for p in segs[:-1] if tail else segs:
        if (m := _INDEX.match(p)) is not None:
            out.append(("index", m.group(1)))
        elif (m := _CHOICE.match(p)) is not None:
            out.append(("choice", (m.group(1), frozenset(m.group(2).split("|")))))
        else:
            out.append(("literal", p))
    return tuple(out), tail


def _first_words(row: Rule) -> set[str] | None:
    """The segments a row's pattern can start with (None: any)."""
    segs, _ = _compile(row.pattern)
    if not segs or segs[0][0] == "index":
        return None
    kind, value = segs[0]
    return {value} if kind == "literal" else set(value[1])


_BY_FIRST: dict = {"rules": None}


def _candidates(first: str) -> list[int]:
    """Rows whose pattern can start with ``first``, in table order (only a speed-up: a release
    index has ~70k names, nearly all of main-model layers)."""
    if _BY_FIRST["rules"] is not RULES:  # rebuilt if someone rebinds the table
        firsts = [_first_words(row) for row in RULES]
        words = set().union(*(f for f in firsts if f))
        _BY_FIRST.update(
            rules=RULES,
            literal={w: [k for k, f in enumerate(firsts) if f is None or w in f] for w in words},
            wild=[k for k, f in enumerate(firsts) if f is None])
    return _BY_FIRST["literal"].get(first, _BY_FIRST["wild"])


@functools.lru_cache(maxsize=32)
def _param_facts(cfg_key: tuple) -> dict[str, ParamFacts]:
    from .model import DeepSeekV4MTP  # deferred: model imports nothing from here

    cfg = MTPConfig(*cfg_key)
    out: dict[str, ParamFacts] = {}
    for fmt in (WeightFormat.released(), WeightFormat(experts="fp8", expert_scale="f32"),
                WeightFormat.plain()):
        out.update(facts_of(DeepSeekV4MTP(cfg, weight_format=fmt, device="meta")))
    return out


def param_facts(cfg: MTPConfig) -> dict[str, ParamFacts]:
    """Every parameter name of the module for ``cfg``, in any weight format, with the
    :class:`~mtp.facts.ParamFacts` its constructor declares (read from a meta-device module).

    Example:
        >>> from mtp import MTPConfig
        >>> param_facts(MTPConfig.from_name("flash"))["model.embed_tokens.weight"].tp
        TPSplit(dim=0, unit=None)
    """
    return _param_facts(dataclasses.astuple(cfg))


def param_names(cfg: MTPConfig) -> frozenset[str]:
    """Every parameter name of the module for ``cfg``, in any weight format."""
    return frozenset(param_facts(cfg))


def _match_row(row: Rule, segs: list[str], cfg: MTPConfig, fmt: WeightFormat,
               check_ranges: bool = True) -> dict | None:
    if row.when is not None and not _when_holds(row.when, fmt):
        return None
    pat, tail = _compile(row.pattern)
    if (len(segs) <= len(pat)) if tail else (len(segs) != len(pat)):
        return None
    caps: dict = {}
    for (kind, value), s in zip(pat, segs):
        if kind == "literal":
            if value != s:
                return None
        elif kind == "choice":
            if s not in value[1]:
                return None
            caps[value[0]] = s
        else:
            if not (s.isascii() and s.isdigit()) or (len(s) > 1 and s[0] == "0"):
                return None
            r = _index_range(value, cfg)
            if check_ranges and r is not None and int(s) not in r:
                return None
            caps[value] = int(s)
    if row.action == "self" and "model." + ".".join(segs) not in param_names(cfg):
        return None
    return caps


def _strip(name: str) -> list[str]:
    return name.split(".")[1:] if name.startswith("model.") else name.split(".")


def _target(row: Rule, caps: dict, segs: list[str], cfg: MTPConfig) -> Target | None:
    if row.action == "self":
        return Target("model." + ".".join(segs), rule=row.name)
    if row.action != "load":
        return None
    layer = cfg.num_hidden_layers + caps["i"] if "i" in caps else caps.get("L")
    words = {k: v for k, v in caps.items() if isinstance(v, str)}
    param = row.target.format(L=layer, L0=cfg.num_hidden_layers, **words)
    return Target(param, row.shard, caps.get("e"), row.name, row.fallback)


def match(name: str, config: MTPConfig, weight_format: WeightFormat | None = None) -> Match:
    """The first row of :data:`RULES` that matches ``name`` (there always is one: the last row
    matches everything), with its captures and target."""
    fmt = weight_format or _RELEASED
    segs = _strip(name)
    for k in _candidates(segs[0]):
        row = RULES[k]
        caps = _match_row(row, segs, config, fmt)
        if caps is not None:
            return Match(row, k, caps, _target(row, caps, segs, config))
    raise AssertionError("the table's last row matches every name")  # pragma: no cover


def resolve(name: str, config: MTPConfig,
            weight_format: WeightFormat | None = None) -> Target | None:
    """The module parameter a checkpoint tensor loads into, or None if the drafter does not use
    it (dropped on purpose by a named rule). A name in the drafter's namespace that no rule
    loads raises :class:`UnknownTensorError` naming the closest rule. ``weight_format`` (default:
    the release's) only decides the names of expert scales (FP4 ``weight_scale``, FP8
    ``weight_scale_inv``).

    Example:
        >>> from mtp import MTPConfig
        >>> cfg = MTPConfig.from_name("flash")
        >>> resolve("mtp.0.ffn.experts.7.w3.weight", cfg)
        Target(param='model.layers.43.mtp_block.ffn.experts.w13_weight', shard=1, expert=7, \
rule='experts.w3', fallback=False)
        >>> resolve("layers.0.attn_norm.weight", cfg) is None
        True
    """
    m = match(name, config, weight_format)
    if m.rule.action == "refuse":
        raise UnknownTensorError(name, _refusal(name, m, config, weight_format))
    return m.target


def region_of(target: Target, shape: tuple[int, ...], config: MTPConfig,
              rank: int | None = None, world_size: int | None = None,
              facts: ParamFacts | None = None) -> tuple[Region, tuple[int, ...]]:
    """The part of parameter ``target.param`` (of ``shape``) that one checkpoint tensor fills,
    and the shape that tensor has: the expert's slot, the shard's rows, and for a per-rank file
    (``rank`` of ``world_size``) the rank's part along the tensor-parallel dim. ``facts``: the
    parameter's :class:`~mtp.facts.ParamFacts` (default: from :func:`param_facts`).

    Example:
        >>> from mtp import MTPConfig
        >>> cfg = MTPConfig.from_name("flash")
        >>> t = resolve("mtp.0.ffn.experts.3.w3.weight", cfg)
        >>> region_of(t, (256, 4096, 2048), cfg)
        (((3, 4), (2048, 4096), (0, 2048)), (2048, 2048))
    """
    facts = facts or param_facts(config)[target.param]
    region = full_region(shape)
    rows = 0
    if target.expert is not None:
        region = narrow_region(region, 0, target.expert, target.expert + 1)
        rows = 1
    if target.shard is not None:
        sizes = [getattr(config, f) for f in facts.fused]
        region = narrow_region(region, rows, *fused_rows(shape[rows], sizes, target.shard))
    if world_size is not None and facts.tp is not None and target.expert is None:
        dim = facts.tp.dim
        region = narrow_region(region, dim, *tp_range(shape[dim], rank, world_size))
    piece = region_shape(region)
    return region, piece[1:] if target.expert is not None else piece


# ---- explanations --------------------------------------------------------------------------
def _describe(row: Rule) -> str:
    if row.action in ("load", "self"):
        to = row.target or "itself"
        shard = f" [shard {row.shard}]" if row.shard is not None else ""
        when = f" (when {row.when})" if row.when else ""
        return f"{row.pattern} -> {to}{shard}{when}"
    return f"{row.pattern} -> {row.action}"


def _closest(name: str, config: MTPConfig, fmt: WeightFormat | None) -> str:
    """The loading row whose pattern reads most like ``name``; notes an out-of-range index."""
    segs = _strip(name)
    loading = [r for r in RULES if r.action == "load" and _when_holds(r.when, fmt
                                                                      or WeightFormat())]
    for row in loading:
        caps = _match_row(row, segs, config, fmt or WeightFormat(), check_ranges=False)
        if caps is not None:
            bad = [f"{k}={v} not in {_index_range(k, config)}" for k, v in caps.items()
                   if isinstance(v, int) and v not in _index_range(k, config)]
            return f"rule '{row.name}' ({row.pattern}) except that {', '.join(bad)}"
    generic = re.sub(r"(?<=\.)\d+(?=\.|$)", "#", ".".join(segs))
    shapes = {re.sub(r"\{[a-zA-Z]\}", "#", re.sub(r"\{\w+:([^}|]+)[^}]*\}", r"\1", r.pattern)): r
              for r in loading}
    best = difflib.get_close_matches(generic, list(shapes), n=1, cutoff=0.0)
    row = shapes[best[0]]
    return f"rule '{row.name}' ({row.pattern})"


def _refusal(name: str, m: Match, config: MTPConfig, fmt: WeightFormat | None) -> str:
    text = f"checkpoint tensor {name!r}: {m.rule.why} (rule '{m.rule.name}')"
    if m.rule.hint == "rule":
        text += f"; closest: {_closest(name, config, fmt)}"
    elif m.rule.hint == "param":
        near = difflib.get_close_matches("model." + ".".join(_strip(name)),
                                         sorted(param_names(config)), n=1, cutoff=0.0)
        text += f"; closest module parameter: {near[0]}"
    return text + ". If the checkpoint is right, add a row to mtp.remap.RULES"


def explain(name: str, config: MTPConfig, weight_format: WeightFormat | None = None) -> str:
    """Which rule matched ``name`` and why, in words (never raises).

    Example:
        >>> from mtp import MTPConfig
        >>> print(explain("mtp.0.attn.wq_a.scale", MTPConfig.from_name("flash")))
        mtp.0.attn.wq_a.scale: rule 'attn.wq_a.scale' (row 14) mtp.{i}.attn.wq_a.{s:scale|weight_scale_inv|weight_scale} -> model.layers.{L}.mtp_block.attn.fused_wqa_wkv.weight_scale_inv [shard 0]
          captures: i=0, s=scale (L = num_hidden_layers + i = 43)
          loads into model.layers.43.mtp_block.attn.fused_wqa_wkv.weight_scale_inv, rows of shard 0
    """  # noqa: E501
    m = match(name, config, weight_format)
    row = m.rule
    lines = [f"{name}: rule '{row.name}' (row {m.index}) {_describe(row)}"]
    if m.captures:
        caps = ", ".join(f"{k}={v}" for k, v in m.captures.items())
        if "i" in m.captures:
            caps += f" (L = num_hidden_layers + i = {config.num_hidden_layers + m.captures['i']})"
        lines.append(f"  captures: {caps}")
    t = m.target
    if t is not None:
        where = f"loads into {t.param}"
        if t.expert is not None:
            where += f", expert {t.expert}"
        if t.shard is not None:
            where += f", rows of shard {t.shard}"
        if t.fallback:
            where += " (unless an MTP copy fills it)"
        lines.append("  " + where)
    elif row.action == "drop":
        lines.append(f"  dropped on purpose: {row.why}")
    else:
        lines.append(f"  refused: {_refusal(name, m, config, weight_format)}")
    if row.why and row.action in ("load", "self"):
        lines.append(f"  why: {row.why}")
    return "\n".join(lines)


# ---- the release layout, generated from the table -----------------------------------------
def canonical_names(config: MTPConfig,
                    weight_format: WeightFormat | None = None) -> Iterator[tuple[str, Target]]:
    """Every tensor name of the official release layout for ``config`` and its target: the
    rows marked ``canonical`` expanded over ``{i}``, ``{e}`` and substituted choices, with the
    first spelling of the others. The loader names missing tensors with these; the exporter
    writes them. Targets that a module of ``weight_format`` lacks (scales of plain weights)
    are left to the caller to skip.

    Example:
        >>> from mtp import MTPConfig
        >>> names = dict(canonical_names(MTPConfig.from_name("flash")))
        >>> len(names) - 2                       # 6*E + 39 under mtp.0, as in the release
        1575
    """
    fmt = weight_format or WeightFormat.released()
    for row in RULES:
        if not row.canonical or not _when_holds(row.when, fmt):
            continue
        choices: list[list[str]] = [[]]
        for p in row.pattern.split("."):
            if (m := _INDEX.match(p)) is not None:
                options = [str(v) for v in _index_range(m.group(1), config)]
            elif (m := _CHOICE.match(p)) is not None:
                words = m.group(2).split("|")
                options = words if "{" + m.group(1) + "}" in (row.target or "") else words[:1]
            else:
                options = [p]
            choices = [c + [o] for c in choices for o in options]
        for segs in choices:
            name = ".".join(segs)
            yield name, match(name, config, fmt).target


def rules_markdown() -> str:
    """The table as Markdown (``docs/remap-rules.md`` is this text; a test keeps it current)."""
    out = [
        "# Remap rules",
        "",
        "Generated from `mtp.remap.RULES` by `mtp.remap.rules_markdown()`; "
        "`tests/test_remap.py` fails when this file is stale. The first matching row decides. "
        "A leading `model.` is stripped first. `{i}` MTP index, `{L}` = num_hidden_layers + i, "
        "`{L0}` the first MTP layer, `{e}` expert, `{n}` main-model layer, `{m}` any layer, "
        "`{x:a|b}` one of the listed segments, `**` the rest of the name.",
        "",
        "| # | rule | checkpoint name | action / target | shard | when | origin | why |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(RULES):
        action = f"`{r.target}`" if r.action == "load" else r.action
        if r.fallback:
            action += " (fallback)"
        shard = "" if r.shard is None else str(r.shard)
        out.append(f"| {k} | {r.name} | `{r.pattern}` | {action} | {shard} | {r.when or ''} "
                   f"| {r.origin} | {r.why.replace('|', '/')} |")
    facts = {param_key(n): f for n, f in param_facts(MTPConfig.from_name("flash")).items()}
    out += ["", "## Fused parameters (rows of each shard, in order)", "",
            "Declared with each parameter (`mtp.facts.ParamFacts.fused`, in `mtp/model.py`).", ""]
    out += [f"- `{k}`: {' + '.join(f.fused)}" for k, f in facts.items() if f.fused]
    out += ["", "## Tensor-parallel split (everything else is replicated)", "",
            "Declared with each parameter (`mtp.facts.ParamFacts.tp`); scales follow their "
            "weight in 128-wide blocks, stacked experts split by whole experts.", ""]
    out += [f"- `{k}`: dim {f.tp.dim}" + (f", in whole units of `{f.tp.unit}`" if f.tp.unit
                                          else "")
            for k, f in facts.items() if f.tp is not None]
    return "\n".join(out) + "\n"


__all__ = ["RULES", "Rule", "Target", "Match", "UnknownTensorError", "match", "resolve",
           "explain", "canonical_names", "param_names", "param_facts", "param_key", "region_of",
           "rules_markdown"]

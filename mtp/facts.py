"""What each parameter of the module is, declared once where the parameter is created.

A :class:`ParamFacts` travels with every parameter of :class:`~mtp.model.DeepSeekV4MTP`: how
it is stored (which :class:`~mtp.quant.WeightFormat` field its dtype follows), how checkpoint
tensors fill it (fused row blocks, one slot per routed expert), how it splits across
tensor-parallel ranks, and how a test initialises it. The remap table (:mod:`mtp.remap`) only
maps names to names; the loader, the exporter, tensor-parallel slicing and
:func:`mtp.testing.init_random_` read these facts from the module (:func:`facts_of`).

Example:
    >>> from mtp import DeepSeekV4MTP, MTPConfig
    >>> model = DeepSeekV4MTP(MTPConfig.from_name("tiny"), device="meta")
    >>> f = facts_of(model)["model.layers.2.mtp_block.attn.fused_wqa_wkv.weight"]
    >>> f.format, f.fused, f.tp
    ('dense', ('q_lora_rank', 'head_dim'), None)
    >>> facts_of(model)["model.layers.2.mtp_block.attn.wo_b.weight_scale_inv"].tp
    TPSplit(dim=1, unit=None)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

FORMAT_FIELDS = ("dense", "wo_a", "experts", "dense_scale", "expert_scale")
INIT_KINDS = ("normal", "fan_in", "one_plus_normal", "offset_uniform", "by_weight")


@dataclass(frozen=True)
class TPSplit:
    """A parameter split across tensor-parallel ranks along ``dim``, in whole ``unit`` rows
    (a config field: a head's or a group's rows) or single rows (``None``)."""

    dim: int
    unit: str | None = None


@dataclass(frozen=True)
class Init:
    """How :func:`mtp.testing.init_random_` fills a parameter (float32 draws, then stored):
    ``normal`` N(0, value^2); ``fan_in`` N(0, 1/in) with ``in`` the (unpacked) last dim, then
    quantised to the stored format; ``one_plus_normal`` 1 + N(0, value^2); ``offset_uniform``
    value + U(0, 1); ``by_weight`` set when its weight is quantised (block scales)."""

    kind: str
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"Init.kind: {self.kind!r} is not one of {INIT_KINDS}")


@dataclass(frozen=True)
class ParamFacts:
    """Facts about one parameter (see the module docstring).

    format: the WeightFormat field its stored dtype follows (``"dense"``, ``"wo_a"``,
        ``"experts"``, ``"dense_scale"``, ``"expert_scale"``), or None: a float the module
        holds in its compute dtype or float32, whatever the checkpoint stores.
    fused: config fields giving the rows of each checkpoint piece stacked into it, in order
        (``("q_lora_rank", "head_dim")``: ``wq_a`` rows, then ``wkv`` rows); empty: one piece.
    stacked: dim 0 indexes the routed expert (one checkpoint tensor per expert).
    tp: how it splits across tensor-parallel ranks; None: every rank holds all of it.
    scale_of: for a block scale, the attribute name of the weight it scales (it follows that
        weight: fused, stacked and split alike, in 128-wide blocks).
    shared: ``"embed_tokens"`` / ``"head"``: the target's tensor can be passed in instead.
    init: how a test fills it.
    """

    format: str | None = None
    fused: tuple[str, ...] = ()
    stacked: bool = False
    tp: TPSplit | None = None
    scale_of: str | None = None
    shared: str | None = None
    init: Init = Init("normal", 1.0)

    def __post_init__(self) -> None:
        if self.format is not None and self.format not in FORMAT_FIELDS:
            raise ValueError(f"ParamFacts.format: {self.format!r} is not one of "
                             f"{FORMAT_FIELDS}")

    def scale(self, field: str, name: str = "weight") -> ParamFacts:
        """The facts of this weight's block scale (held in WeightFormat field ``field``)."""
        tp = None if self.tp is None else TPSplit(self.tp.dim)
        return replace(self, format=field, tp=tp, scale_of=name, init=Init("by_weight"))


def declare(module: nn.Module, name: str, shape, dtype: torch.dtype, device,
            facts: ParamFacts) -> nn.Parameter:
    """Create parameter ``name`` of ``module`` (uninitialised, no gradient) with its facts.

    Example:
        >>> m = nn.Module()
        >>> p = declare(m, "attn_sink", (4,), torch.float32, "meta", ParamFacts(tp=TPSplit(0)))
        >>> m.param_facts["attn_sink"].tp.dim, tuple(m.attn_sink.shape)
        (0, (4,))
    """
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    return adopt(module, name, param, facts)


def adopt(module: nn.Module, name: str, param: nn.Parameter, facts: ParamFacts,
          ) -> nn.Parameter:
    """Register an existing parameter (a caller's shared tensor) under ``name`` with facts."""
    setattr(module, name, param)
    if "param_facts" not in module.__dict__:
        module.param_facts = {}
    module.param_facts[name] = facts
    return param


def facts_of(model: nn.Module) -> dict[str, ParamFacts]:
    """Parameter name (as ``named_parameters`` gives it) -> its facts, for every parameter.
    Raises ValueError naming a parameter created without facts."""
    by_id: dict[int, ParamFacts] = {}
    for module in model.modules():
        for leaf, facts in module.__dict__.get("param_facts", {}).items():
            param = module._parameters.get(leaf)
            if param is not None:
                by_id[id(param)] = facts
    out = {}
    for name, param in model.named_parameters():
        if id(param) not in by_id:
            raise ValueError(f"parameter {name} was created without ParamFacts; create "
                             f"parameters with mtp.facts.declare")
        out[name] = by_id[id(param)]
    return out


__all__ = ["ParamFacts", "TPSplit", "Init", "declare", "adopt", "facts_of", "FORMAT_FIELDS"]

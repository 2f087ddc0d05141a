"""Random weights in the released formats and release-like folders, and a drafter's host side
alone, for tests, the demo and benchmarks: a deliberate public API, like ``torch.testing``.

The values are scaled so a forward pass stays well conditioned (projections ~ N(0, 1/in),
norm weights near 1), which keeps tolerances meaningful; they are not a trained model.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .facts import Init, facts_of
from .model import DeepSeekV4MTP, Experts, Linear
from .propose_program import ProposeBuckets, StaticProposal
from .quant import quantize_fp4, quantize_fp8_block


def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device) * std


def draw(init: Init, shape, normal: Callable, uniform: Callable) -> torch.Tensor:
    """Values for a parameter of ``shape`` (the unpacked float shape) as its
    :class:`~mtp.facts.Init` says; ``normal(shape, std)`` / ``uniform(shape)`` draw float32
    N(0, std^2) / U(0, 1) (so a benchmark can draw on its own device).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> x = draw(Init("one_plus_normal", 0.1), (1000,), lambda s, std: _normal(s, std, gen),
        ...          lambda s: torch.rand(s, generator=gen))
        >>> round(x.mean().item(), 1)
        1.0
    """
    if init.kind == "normal":
        return normal(shape, init.value)
    if init.kind == "fan_in":
        return normal(shape, shape[-1] ** -0.5)
    if init.kind == "one_plus_normal":
        return 1.0 + normal(shape, init.value)
    if init.kind == "offset_uniform":
        return init.value + uniform(shape)
    raise ValueError(f"draw: {init.kind!r} values come with their weight")


def _fill_weight(weight: torch.Tensor, scale: torch.Tensor | None, storage: str,
                 scale_kind: str | None, init: Init, gen: torch.Generator) -> None:
    """One (expert's) weight drawn in float32 and stored as ``storage`` with its scale."""
    shape = tuple(weight.shape[:-1]) + (weight.shape[-1] * (2 if storage == "fp4" else 1),)
    w = draw(init, shape, lambda s, std: _normal(s, std, gen), None)
    if storage == "fp4":
        w, s = quantize_fp4(w)
    elif storage == "fp8":
        w, s = quantize_fp8_block(w, scale_kind)
    weight.copy_(w)
    if scale is not None:
        scale.copy_(s)


@torch.no_grad()
def init_random_(model: DeepSeekV4MTP, seed: int = 0, *,
                 skip_shared: bool = False) -> DeepSeekV4MTP:
    """Fill every parameter of ``model`` with seeded random values in its stored format
    (FP8 + block scales, packed FP4, or plain) and return the model. What each parameter gets
    is its :class:`~mtp.facts.ParamFacts` ``init``; weights (and their scales) are drawn
    first, in module order, a stacked expert weight expert by expert, then the rest.

    A table the caller passed in (``embed_tokens=`` / ``head=``: the target's own tensors,
    :attr:`~mtp.model.DeepSeekV4MTP.shared_with_caller`) is never overwritten: such a module
    is refused with a ``ValueError`` naming the parameter, unless ``skip_shared=True``, which
    fills only the module's own parameters (their values then differ from an unshared module's
    with the same seed: the skipped draws are not made).

    Example:
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> m = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=1)
        >>> m.model.layers["2"].mtp_block.ffn.experts.w13_weight.dtype
        torch.int8
    """
    facts, params, fmt = facts_of(model), dict(model.named_parameters()), model.weight_format
    shared = {n for n, f in facts.items() if f.shared in model.shared_with_caller}
    if shared and not skip_shared:
        name = sorted(shared)[0]
        raise ValueError(f"init_random_: {name} is the caller's tensor (passed as "
                         f"{facts[name].shared}=, e.g. the target's own {facts[name].shared}): "
                         f"random values would overwrite it; pass skip_shared=True to fill "
                         f"only the drafter's own parameters")
    # On the model's device: full-size models fill in seconds on a GPU (minutes on a CPU). The
    # values depend on the device type (CPU and CUDA generators differ), not on the rank.
    gen = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    scale_of = {name.rsplit(".", 1)[0] + "." + f.scale_of: name
                for name, f in facts.items() if f.scale_of is not None}
    weights = [n for n, f in facts.items() if f.format is not None and f.scale_of is None]
    stacked: dict[str, list[str]] = {}  # a module's stacked weights, drawn expert by expert
    for n in weights:
        if facts[n].stacked:
            stacked.setdefault(n.rsplit(".", 1)[0], []).append(n)
    done: set[str] = set()
    for n in weights:
        if n in done:
            continue
        group = stacked.get(n.rsplit(".", 1)[0], [n]) if facts[n].stacked else [n]
        for k in range(params[n].shape[0]) if facts[n].stacked else [None]:
            for m in group:
                s = scale_of.get(m)
                weight, scale = params[m], None if s is None else params[s]
                if k is not None:
                    weight, scale = weight[k], None if scale is None else scale[k]
                _fill_weight(weight, scale, getattr(fmt, facts[m].format),
                             None if s is None else getattr(fmt, facts[s].format),
                             facts[m].init, gen)
        done.update(group)
    done.update(scale_of.values())
    for name, p in params.items():
        if name not in done and name not in shared:
            p.copy_(draw(facts[name].init, tuple(p.shape), lambda s, std: _normal(s, std, gen),
                         lambda s: torch.rand(s, generator=gen, device=gen.device)))
    return model


def dequantized_copy(model: DeepSeekV4MTP) -> DeepSeekV4MTP:
    """The same weights, every FP8/FP4 tensor dequantised into a ``WeightFormat.plain()``
    module of the same compute dtype (exact for float32)."""
    from .quant import WeightFormat

    plain = DeepSeekV4MTP(model.config, weight_format=WeightFormat.plain(), dtype=model.dtype,
                          numerics=dataclasses.replace(model.numerics))  # a copy, not shared
    src = dict(model.named_modules())
    with torch.no_grad():
        for name, module in plain.named_modules():
            other = src[name]
            if isinstance(module, Linear):
                module.weight.copy_(other.dequantized())
            elif isinstance(module, Experts):
                for e in range(module.w13_weight.shape[0]):
                    w13, w2 = other.expert_weights(e)
                    module.w13_weight[e].copy_(w13)
                    module.w2_weight[e].copy_(w2)
            else:
                for pname, p in module.named_parameters(recurse=False):
                    p.copy_(getattr(other, pname))
    return plain


def main_model_placeholders(config, layers: int) -> dict[str, torch.Tensor]:
    """Small stand-ins for the main model's tensors a release holds beside the drafter's
    (``layers.{k}.attn_norm.weight`` for k < ``layers``, ``norm.weight``, ``hc_head_*``): the
    names a loader must skip, with the release's dtypes and shapes."""
    d, m = config.hidden_size, config.hc_mult
    out = {f"layers.{k}.attn_norm.weight": torch.ones(d, dtype=torch.bfloat16)
           for k in range(layers)}
    out["norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    out["hc_head_fn"] = torch.zeros(m, m * d)
    out["hc_head_base"] = torch.zeros(m)
    out["hc_head_scale"] = torch.ones(1)
    return out


def write_release_like(model: DeepSeekV4MTP, folder: str | os.PathLike, *,
                       main_layers: int = 1, num_shards: int | None = None,
                       layout: str = "release", mp: int | None = None,
                       overwrite: bool = False) -> None:
    """:func:`mtp.export.write_checkpoint` plus placeholder main-model tensors
    (:func:`main_model_placeholders`), laid out like a whole release: ``embed.weight`` and main
    layer 0 in the first shard, further main layers in the next ones, ``head.weight`` with
    ``norm.weight`` and ``hc_head_*`` in the one before last, the MTP block in the last. For
    tests and demos of what the loader skips; the drafter never reads the placeholders.

    Args:
        main_layers: placeholder layers (1 .. ``num_hidden_layers``).
        num_shards: default ``main_layers + 2``; 3 .. ``main_layers + 2`` (each shard before
            the head's holds at least one main-model layer).
        layout, mp, overwrite: as in :func:`~mtp.export.write_checkpoint` (the placeholders go
            into every file of "single" and "mp").

    Example:
        >>> import tempfile
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> from mtp.loader import load_model
        >>> m = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=0)
        >>> folder = tempfile.mkdtemp()
        >>> write_release_like(m, folder, num_shards=4, main_layers=2)
        >>> loaded, report = load_model(folder, dtype=torch.float32)
        >>> report.shards_skipped
        ['model-00002-of-00004.safetensors']
    """
    from .export import _write

    n_layers = model.config.num_hidden_layers
    if isinstance(main_layers, bool) or not isinstance(main_layers, int) \
            or not 1 <= main_layers <= n_layers:
        raise ValueError(f"main_layers={main_layers!r}; expected 1 .. num_hidden_layers="
                         f"{n_layers} (layers beyond are the MTP layers)")
    _write(model, folder, main_model_placeholders(model.config, main_layers), main_layers,
           num_shards=num_shards, layout=layout, mp=mp, overwrite=overwrite)


class HostOnlyProposal(StaticProposal):
    """A whole-call bucket whose program runs once when the bucket is made (real outputs) and
    whose replays then do nothing, or raise ``HostOnlyProposal.fail`` when that is set: a
    captured graph's replay is one launch for the host, so a drafter with these buckets runs a
    graphed ``propose``'s host side alone, on any device."""

    fail: BaseException | None = None

    def __init__(self, program):
        self.program = program
        self.error = program.run_call()[-1]

    def replay(self) -> None:
        if HostOnlyProposal.fail is not None:
            raise HostOnlyProposal.fail


class _HostOnlyBuckets(ProposeBuckets):
    def _make(self, program):
        return HostOnlyProposal(program)


def host_only(drafter):
    """``drafter`` (a :class:`mtp.drafter.Drafter`) with its whole-call buckets made of
    :class:`HostOnlyProposal`: each ``propose`` that fits a bucket does its checks, staging,
    copies and bookkeeping, and no compute after the bucket's first call. Returns it.

    Example:
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> from mtp.drafter import Drafter
        >>> d = host_only(Drafter(init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")))))
        >>> d.add_sequence(0)
        >>> cfg = d.config
        >>> call = dict(hidden_states=torch.zeros(1, cfg.hc_dim), positions=torch.tensor([0]),
        ...             next_token_ids=torch.tensor([1]), num_rows_per_seq=[1], k=2)
        >>> d.propose([0], **call).drafts.shape
        torch.Size([1, 2])
    """
    from .drafter import MAX_ABS_HIDDEN
    drafter._proposer = _HostOnlyBuckets(drafter.model, drafter.cache, *drafter._buckets(),
                                         MAX_ABS_HIDDEN, max_rows=drafter._max_bucket_rows())
    return drafter


class CountOps(TorchDispatchMode):
    """Counts the aten operations dispatched inside it (``.ops``: name -> count); on CUDA each
    is a launch, a copy or an allocation.

    Example:
        >>> with CountOps() as c:
        ...     _ = torch.ones(3) + 1
        >>> dict(c.ops)
        {'ones': 1, 'add': 1}
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


__all__ = ["CountOps", "HostOnlyProposal", "dequantized_copy", "draw", "host_only",
           "init_random_", "main_model_placeholders", "write_release_like"]

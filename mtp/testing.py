"""Random weights in the released formats, for tests, the demo and benchmarks.

The values are scaled so a forward pass stays well conditioned (projections ~ N(0, 1/in),
norm weights near 1), which keeps tolerances meaningful; they are not a trained model.
"""

from __future__ import annotations

import dataclasses

import torch

from .model import DeepSeekV4MTP, Experts, Linear
from .quant import quantize_fp4, quantize_fp8_block


def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=gen.device) * std


def _fill_linear(lin: Linear, gen: torch.Generator, scale_kind: str) -> None:
    out_f, in_f = lin.weight.shape
    w = _normal((out_f, in_f), in_f ** -0.5, gen)
    if lin.storage == "fp8":
        q, s = quantize_fp8_block(w, "e8m0" if lin.weight_scale_inv.dtype != torch.float32
                                  else "f32")
        lin.weight.data.copy_(q)
        lin.weight_scale_inv.data.copy_(s)
    else:
        lin.weight.data.copy_(w)


def _fill_experts(ex: Experts, gen: torch.Generator) -> None:
    e, two_i = ex.w13_weight.shape[:2]
    d = ex.w2_weight.shape[1]
    i = two_i // 2
    for k in range(e):
        w13 = _normal((2 * i, d), d ** -0.5, gen)  # [2I, D]: w1 rows, then w3 rows
        w2 = _normal((d, i), i ** -0.5, gen)
        for name, w in (("w13_weight", w13), ("w2_weight", w2)):
            if ex.storage == "fp4":
                q, s = quantize_fp4(w)
                getattr(ex, name).data[k].copy_(q)
                getattr(ex, name + "_scale").data[k].copy_(s)
            elif ex.storage == "fp8":
                sc = getattr(ex, name + "_scale_inv")
                q, s = quantize_fp8_block(w, "f32" if sc.dtype == torch.float32 else "e8m0")
                getattr(ex, name).data[k].copy_(q)
                sc.data[k].copy_(s)
            else:
                getattr(ex, name).data[k].copy_(w)


@torch.no_grad()
def init_random_(model: DeepSeekV4MTP, seed: int = 0) -> DeepSeekV4MTP:
    """Fill every parameter of ``model`` with seeded random values in its stored format
    (FP8 + block scales, packed FP4, or plain) and return the model.

    Example:
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> m = init_random_(DeepSeekV4MTP(MTPConfig.from_name("tiny")), seed=1)
        >>> m.model.layers["2"].mtp_block.ffn.experts.w13_weight.dtype
        torch.int8
    """
    # On the model's device: full-size models fill in seconds on a GPU (minutes on a CPU). The
    # values depend on the device type (CPU and CUDA generators differ), not on the rank.
    gen = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    cfg = model.config
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, Linear):
            _fill_linear(module, gen, "e8m0")
            done.update(id(p) for p in module.parameters())
        elif isinstance(module, Experts):
            _fill_experts(module, gen)
            done.update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if name.endswith("norm.weight"):
            value = 1.0 + _normal(p.shape, 0.1, gen)
        elif parent == "embed_tokens":
            value = _normal(p.shape, 1.0, gen)
        elif parent == "head":
            value = _normal(p.shape, cfg.hidden_size ** -0.5, gen)
        elif leaf.endswith("_fn"):
            value = _normal(p.shape, p.shape[1] ** -0.5, gen)
        elif leaf.endswith("_base"):
            value = _normal(p.shape, 0.5, gen)
        elif leaf.endswith("_scale"):
            value = 0.5 + torch.rand(p.shape, generator=gen, device=gen.device)
        elif leaf == "attn_sink":
            value = _normal(p.shape, 1.0, gen)
        elif parent == "gate" and leaf == "weight":
            value = _normal(p.shape, cfg.hidden_size ** -0.5, gen)
        elif leaf == "e_score_correction_bias":
            value = _normal(p.shape, 0.1, gen)
        else:
            raise AssertionError(f"init_random_: no rule for parameter {name}")
        p.data.copy_(value)
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


__all__ = ["init_random_", "dequantized_copy"]

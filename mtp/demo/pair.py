"""The tiny trained pair, shipped in the release format, and the way it is written and loaded.

The folder ``mtp/demo/data/tiny_pair`` is laid out like a DeepSeek-V4 release: ``config.json``,
``model.safetensors.index.json`` and shards holding ``embed.weight`` and target layer 0, target
layers 1..3, ``head.weight`` with the target's ``norm.weight`` and ``hc_head_*``, and the MTP
layer ``mtp.0.*`` in the last shard. Dense weights are FP8 e4m3 with E8M0 128x128 block scales,
routed experts FP4 e2m1 with E8M0 per-32 scales (``mtp.testing.write_release_like`` writes
them, with placeholder target layers that the real ones then replace).

Loading goes through the real loader: ``Drafter.from_pretrained`` reads only the MTP shard (the
embedding and head are the target's, shared), and each target layer ``layers.{k}.*`` is read
by the same remap rules as an MTP block (``mtp.loader.load_model`` over a view of the folder
in which ``layers.{k}.`` is renamed ``mtp.{k}.``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from importlib import resources

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..drafter import Drafter
from ..export import write_checkpoint
from ..model import DeepSeekV4MTP, Experts, Linear, Numerics
from ..quant import WeightFormat, quantize_fp4, quantize_fp8_block
from ..testing import write_release_like
from .pair_config import PAIR_CONFIG, PLAIN_NUMERICS, TARGET_LAYERS
from .toy_target import ToyTarget

# What belongs to a decoder block (main layer or MTP block); the rest of ``mtp.0.*`` (enorm,
# hnorm, e_proj, h_proj, norm, hc_head_*) is the MTP layer's own.
_BLOCK_PREFIXES = ("attn.", "ffn.", "attn_norm.", "ffn_norm.", "hc_attn_", "hc_ffn_")
_MAIN_EXTRAS = ("norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")


def data_folder() -> str:
    """Where the shipped pair lies (package data of ``mtp.demo``)."""
    return str(resources.files("mtp.demo") / "data" / "tiny_pair")


# ---- writing -----------------------------------------------------------------------------------
@torch.no_grad()
def quantized_copy(plain: DeepSeekV4MTP) -> DeepSeekV4MTP:
    """The same weights in the release format: FP8 + E8M0 128x128 dense weights, FP4 + E8M0
    per-32 experts (the inverse of ``mtp.testing.dequantized_copy``, up to rounding)."""
    out = DeepSeekV4MTP(plain.config, weight_format=WeightFormat.released(), dtype=plain.dtype,
                        numerics=dataclasses.replace(plain.numerics))
    src = dict(plain.named_modules())
    for name, module in out.named_modules():
        other = src[name]
        if isinstance(module, Linear):
            q, s = quantize_fp8_block(other.dequantized(), "e8m0")
            module.weight.copy_(q)
            module.weight_scale_inv.copy_(s)
        elif isinstance(module, Experts):
            for e in range(module.w13_weight.shape[0]):
                for wname, w in zip(("w13_weight", "w2_weight"), other.expert_weights(e)):
                    q, s = quantize_fp4(w)
                    getattr(module, wname)[e].copy_(q)
                    getattr(module, wname + "_scale")[e].copy_(s)
        else:
            for pname, p in module.named_parameters(recurse=False):
                p.copy_(getattr(other, pname))
    return out


def _carrier(target: ToyTarget) -> DeepSeekV4MTP:
    """A plain module whose MTP blocks 0..L-1 are the target's blocks (so the exporter writes
    them under ``mtp.{k}.`` names, renamed ``layers.{k}.`` below)."""
    cfg = dataclasses.replace(PAIR_CONFIG, num_nextn_predict_layers=len(target.blocks),
                              mtp_compress_ratios=(0,) * len(target.blocks))
    m = DeepSeekV4MTP(cfg, weight_format=WeightFormat.plain(), dtype=torch.float32,
                      embed_tokens=target.embed.weight.float(),
                      head=target.head.weight.float())
    for k, block in enumerate(target.blocks):
        layer = m.layer(k)
        layer.mtp_block.load_state_dict(block.state_dict())
        for p in (layer.enorm.weight, layer.hnorm.weight, layer.shared_head.norm.weight):
            p.data.fill_(1.0)
        for p in (layer.e_proj.weight, layer.h_proj.weight, layer.hc_head_fn,
                  layer.hc_head_base, layer.hc_head_scale):
            p.data.zero_()
    return m


@torch.no_grad()
def export_pair(target: ToyTarget, mtp_layer: DeepSeekV4MTP, folder: str | os.PathLike) -> None:
    """Write the pair in the release format and layout (see the module docstring)."""
    folder = os.fspath(folder)
    n = TARGET_LAYERS + 2
    write_release_like(quantized_copy(mtp_layer), folder, num_shards=n,
                       main_layers=TARGET_LAYERS, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(quantized_copy(_carrier(target)), tmp, layout="single")
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            blocks = {}
            for name in f.keys():
                head, _, rest = name.partition(".")
                if head == "mtp" and rest.split(".", 1)[1].startswith(_BLOCK_PREFIXES):
                    k, tail = rest.split(".", 1)
                    blocks[f"layers.{k}.{tail}"] = f.get_tensor(name)
    extras = {"norm.weight": target.norm.weight.to(torch.bfloat16),
              **{x: getattr(target, x).float() for x in _MAIN_EXTRAS[1:]}}
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    total, new_map = 0, {}
    for file in files:
        path = os.path.join(folder, file)
        with safe_open(path, "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        for name in list(tensors):
            if name.startswith("layers."):  # the exporter's placeholder: the real layer instead
                k = name.split(".")[1]
                del tensors[name]
                tensors.update({b: t for b, t in blocks.items()
                                if b.startswith(f"layers.{k}.")})
            elif name in extras:
                tensors[name] = extras[name]
        save_file(tensors, path, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        new_map.update(dict.fromkeys(tensors, file))
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))},
                  f, indent=2)


# ---- loading -----------------------------------------------------------------------------------
def _tensors(folder: str, names) -> dict[str, torch.Tensor]:
    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(weight_map[name], []).append(name)
    out = {}
    for file, group in by_file.items():
        with safe_open(os.path.join(folder, file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in group})
    return out


@torch.no_grad()
def load_target(folder: str, *, device="cpu", dtype=torch.float32,
                numerics: Numerics | None = None, max_extend: int = 8) -> ToyTarget:
    """The target of a pair folder: its layers through the real loader (``layers.{k}.X``
    read as ``mtp.{k}.X`` of a module with one MTP block per target layer), its embedding,
    head, norm and hc_head read directly."""
    with open(os.path.join(folder, "model.safetensors.index.json"), encoding="utf-8") as f:
        names = list(json.load(f)["weight_map"])
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})
    cfg = dataclasses.replace(PAIR_CONFIG, num_nextn_predict_layers=len(layers),
                              mtp_compress_ratios=(0,) * len(layers))
    main = _tensors(folder, ["embed.weight", "head.weight", *_MAIN_EXTRAS])
    own = [n for n in names if n.startswith("mtp.0.") and not n.split(".", 2)[2].startswith(
        _BLOCK_PREFIXES)]
    view = _tensors(folder, [n for n in names if n.startswith("layers.")] + own)
    renamed = {}
    for k in layers:
        for name, t in view.items():
            if name.startswith(f"layers.{k}."):
                renamed[f"mtp.{k}." + name.split(".", 2)[2]] = t
            elif name.startswith("mtp.0."):  # the MTP layer's own tensors fill the slots the
                renamed[f"mtp.{k}." + name[len("mtp.0."):]] = t.clone()  # loader wants; unused
    from ..loader import load_model

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f)
        save_file(renamed, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        carrier, _ = load_model(tmp, device=device, dtype=dtype,
                                embed_tokens=main["embed.weight"].to(device, dtype),
                                head=main["head.weight"].to(device, dtype))
    target = ToyTarget(PAIR_CONFIG, len(layers), dtype=dtype, weight_format=carrier.weight_format,
                       numerics=numerics, device=device, max_extend=max_extend)
    for k, block in enumerate(target.blocks):
        block.load_state_dict(carrier.layer(k).mtp_block.state_dict())
    target.embed.weight.copy_(main["embed.weight"])
    target.head.weight.copy_(main["head.weight"])
    target.norm.weight.copy_(main["norm.weight"])
    for x in _MAIN_EXTRAS[1:]:
        getattr(target, x).copy_(main[x])
    return target


def load_tiny_pair(device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32,
                   folder: str | None = None, max_seqs: int = 64, max_draft_tokens: int = 4,
                   numerics: Numerics | None = None,
                   target_numerics: Numerics | None = None) -> tuple[ToyTarget, Drafter]:
    """The shipped tiny pair: ``(target, drafter)``, the target implementing the protocol of
    ``mtp.speculative`` and the drafter sharing its embedding and head.

    Both hold their weights as shipped (FP8 + FP4). The drafter computes with ``numerics``
    (default: the release's, FP8-rounded activations and KV); the target with
    ``target_numerics`` (default: unrounded activations and KV, ``PLAIN_NUMERICS``). Why: FP8
    rounding turns the float32 differences between computing a row alone and computing it
    beside others (a verification scores k + 1 rows at once, plain decoding one) into whole
    FP8 steps, enough to flip a near-tied greedy choice; with it, speculative and plain
    greedy decoding of one prompt part ways on about one prompt in ten within 64 tokens.
    Without it the target computes each row the same up to float32 rounding, and greedy
    speculative decoding reproduces plain decoding token for token.

    Example:
        >>> from mtp.demo import load_tiny_pair, TOKENIZER
        >>> from mtp.speculative import generate
        >>> target, drafter = load_tiny_pair()
        >>> drafter.load_report.shards_opened               # only the MTP layer's shard
        ['model-00006-of-00006.safetensors']
        >>> tokens, stats = generate(target, drafter, TOKENIZER.encode("import os\\n"), 16)
        >>> len(tokens), len(stats.acceptance_per_position)
        (16, 3)
    """
    folder = folder or data_folder()
    target = load_target(folder, device=device, dtype=dtype,
                         numerics=target_numerics or PLAIN_NUMERICS,
                         max_extend=max_draft_tokens + 1)
    drafter = Drafter.from_pretrained(folder, device=device, dtype=dtype, max_seqs=max_seqs,
                                      max_draft_tokens=max_draft_tokens, numerics=numerics,
                                      embed_tokens=target.embed.weight,
                                      head=target.head.weight)
    return target, drafter


__all__ = ["data_folder", "export_pair", "load_target", "load_tiny_pair", "quantized_copy"]

"""A toy target model made of the same blocks as DeepSeek-V4, for the guide and the tests.

Embedding -> a few V4 decoder blocks with hyper-connections over hc_mult streams -> hc_head ->
norm -> head, exactly the shape of the real target around its MTP layer, so the residual it
hands the drafter (pre-``hc_head``, [T, hc_mult * hidden_size]) is the real interface. It runs
a whole sequence statelessly (no KV cache: fine for a laptop, wasteful for anything else).

With random weights a drafter agrees with a target only by chance. :func:`matching_mtp` builds
an MTP layer that roughly agrees with a :class:`ToyTarget` by construction, so a speculative
loop accepts a realistic share of drafts: the target's blocks are scaled down (block_scale), so
it is close to a bigram model ``logits(t) ~ head(norm(embed(t)))`` with some context mixed in;
the MTP layer predicts the token after next from the next token the same way (``e_proj`` = I,
``h_proj`` scaled down, the target's ``hc_head`` and ``norm``), sharing the embedding and head.
It is a stand-in for a trained layer, nothing more.

Shape legend: T rows, M hc_mult, D hidden, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from . import ops
from .config import MTPConfig
from .model import DeepSeekV4MTP, Numerics, StepContext
from .quant import WeightFormat
from .testing import init_random_


def _random_layers(cfg: MTPConfig, n_layers: int, seed: int, dtype) -> DeepSeekV4MTP:
    """A plain-format module with ``n_layers`` randomly initialised MTP layers, used as a
    source of blocks and head tensors."""
    many = dataclasses.replace(cfg, num_nextn_predict_layers=n_layers,
                               mtp_compress_ratios=(0,) * n_layers)
    return init_random_(DeepSeekV4MTP(many, weight_format=WeightFormat.plain(), dtype=dtype),
                        seed=seed)


def _scale_block_outputs_(block: nn.Module, scale: float) -> None:
    """Scale what a block adds to the residual (attention and MoE output projections)."""
    with torch.no_grad():
        block.attn.wo_b.weight.mul_(scale)
        block.ffn.shared_experts.down_proj.weight.mul_(scale)
        block.ffn.experts.w2_weight.mul_(scale)


class ToyTarget(nn.Module):
    """A small V4-shaped target: ``forward(tokens)`` -> (logits [T, V], residual [T, M*D]).

    Example:
        >>> from mtp.toy_target import ToyTarget
        >>> target = ToyTarget.random(seed=0)
        >>> logits, residual = target(torch.tensor([1, 2, 3]))
        >>> logits.shape, residual.shape
        (torch.Size([3, 1024]), torch.Size([3, 1024]))
    """

    def __init__(self, config: MTPConfig, n_layers: int = 2, dtype: torch.dtype = torch.float32,
                 seed: int = 0, block_scale: float = 0.1):
        super().__init__()
        self.config, self.dtype = config, dtype
        self.numerics = Numerics()
        src = _random_layers(config, n_layers, seed, dtype)
        layers = [src.layer(i) for i in range(n_layers)]
        self.embed = src.model.embed_tokens  # .weight [V, D]
        self.head = layers[0].shared_head.head  # .weight [V, D]
        self.norm = layers[0].shared_head.norm
        self.hc_head_fn = layers[0].hc_head_fn
        self.hc_head_base = layers[0].hc_head_base
        self.hc_head_scale = layers[0].hc_head_scale
        self.blocks = nn.ModuleList(layer.mtp_block for layer in layers)
        for block in self.blocks:
            _scale_block_outputs_(block, block_scale)

    @classmethod
    def random(cls, config: MTPConfig | None = None, *, n_layers: int = 2, seed: int = 0,
               block_scale: float = 0.1, dtype: torch.dtype = torch.float32) -> ToyTarget:
        """A seeded random target (default: the ``tiny`` preset's dimensions)."""
        return cls(config or MTPConfig.from_name("tiny"), n_layers, dtype, seed, block_scale)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [T] at positions 0..T-1 -> (logits [T, V] predicting the token at each next
        position, pre-``hc_head`` residual [T, M*D]: what the drafter consumes)."""
        cfg = self.config
        t = tokens.shape[0]
        positions = torch.arange(t, device=tokens.device)
        e = nn.functional.embedding(tokens, self.embed.weight).to(self.dtype)  # [T, D]
        x = e.unsqueeze(1).repeat(1, cfg.hc_mult, 1)  # [T, D] -> [T, M, D]: one copy per stream
        ctx = StepContext.single_sequence(cfg, positions, self.numerics)
        for block in self.blocks:
            x, _ = block(x, ctx)
        y = ops.hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, cfg.hc_eps,
                        cfg.rms_norm_eps)  # [T, D]
        y = ops.wide(self.norm(y))
        logits = nn.functional.linear(y, self.head.weight.to(y.dtype))
        return logits, x.flatten(1)  # [T, M, D] -> [T, M*D]


@torch.no_grad()
def matching_mtp(target: ToyTarget, *, seed: int = 1, h_scale: float = 0.1,
                 block_scale: float = 0.1) -> DeepSeekV4MTP:
    """An MTP layer that roughly agrees with ``target`` (see the module docstring), sharing its
    embedding and head tensors (no copies), in the target's dtype and plain weight format.

    Example:
        >>> from mtp.toy_target import ToyTarget, matching_mtp
        >>> target = ToyTarget.random(seed=0)
        >>> mtp_layer = matching_mtp(target)
        >>> mtp_layer.model.embed_tokens.weight.data_ptr() == target.embed.weight.data_ptr()
        True
    """
    cfg = target.config
    src = _random_layers(cfg, 1, seed, target.dtype)
    layer = src.layer(0)
    d = cfg.hidden_size
    layer.e_proj.weight.copy_(torch.eye(d))
    layer.enorm.weight.fill_(1.0)
    layer.h_proj.weight.mul_(h_scale)
    for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
        getattr(layer, name).copy_(getattr(target, name))
    layer.shared_head.norm.weight.copy_(target.norm.weight)
    _scale_block_outputs_(layer.mtp_block, block_scale)

    model = DeepSeekV4MTP(cfg, weight_format=WeightFormat.plain(), dtype=target.dtype,
                          embed_tokens=target.embed.weight, head=target.head.weight)
    shared = ("model.embed_tokens.weight", ".shared_head.head.weight")
    state = {k: v for k, v in src.state_dict().items() if not k.endswith(shared)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(shared) for k in missing), (missing, unexpected)
    return model


__all__ = ["ToyTarget", "matching_mtp"]

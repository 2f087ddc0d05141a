"""A small target model made of the same blocks as DeepSeek-V4, with its own KV cache.

Embedding -> a few V4 decoder blocks (hyper-connections over hc_mult streams, sliding-window
attention with a sink, MoE) -> hc_head -> norm -> head: exactly the shape of the real target
around its MTP layer, so the residual it hands the drafter (pre-``hc_head``, [T, hc_mult *
hidden_size]) is the real interface. The blocks are the library's own ``mtp.model.Block``: the
dataflow is written once, in ``mtp/model.py``.

:class:`ToyTarget` implements the target protocol of ``mtp.speculative`` (``prefill``,
``extend``, ``rollback``) with a per-sequence ring KV cache (``mtp.cache.KVCache``, one layer
per block), and keeps a stateless ``forward(tokens)`` over one whole sequence, which the tests
use as the independent check of the cache.

With random weights a drafter agrees with a target only by chance. :func:`matching_mtp` builds
an MTP layer that roughly agrees with a random :class:`ToyTarget` by construction: the target's
blocks are scaled down (block_scale), so it is close to a bigram model ``logits(t) ~
head(norm(embed(t)))`` with some context mixed in; the MTP layer predicts the token after next
from the next token the same way (``e_proj`` = I, ``h_proj`` scaled down, the target's
``hc_head`` and ``norm``), sharing the embedding and head. The trained pair of ``mtp demo``
(:func:`mtp.demo.load_tiny_pair`) is the real thing.

Shape legend: B sequences, T rows, M hc_mult, D hidden, V vocabulary, W window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .. import ops
from ..cache import KVCache, window_index
from ..config import MTPConfig
from ..model import Block, DeepSeekV4MTP, Numerics, RMSNorm, StepContext
from ..quant import WeightFormat
from ..speculative import TargetOutput, check_prompts
from ..testing import init_random_


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


def _table(shape, dtype, device) -> nn.Module:
    """A module holding one ``.weight`` (the embedding / head naming of the real model)."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device),
                                 requires_grad=False)
    return holder


class ToyTarget(nn.Module):
    """A small V4-shaped target with a per-sequence KV cache.

    Args:
        config: the dimensions (the blocks' shape; ``num_hidden_layers`` is not used).
        n_layers: decoder blocks.
        dtype: compute dtype (float32, bfloat16, or float64 for verification).
        weight_format: how the blocks' weights are held (default: plain, in ``dtype``).
        numerics: the rounding switches of ``mtp.model.Numerics`` (default: the reference's).
        max_extend: the most tokens one :meth:`extend` may append per sequence; the ring cache
            holds W + max_extend entries, which is what a rollback of up to max_extend + 1
            tokens needs.

    Parameters are created empty: fill them (``random``, a state dict, or
    ``mtp.demo.load_tiny_pair``).

    Example:
        >>> from mtp.demo.toy_target import ToyTarget
        >>> target = ToyTarget.random(seed=0)
        >>> logits, residual = target(torch.tensor([1, 2, 3]))     # stateless, one sequence
        >>> logits.shape, residual.shape
        (torch.Size([3, 1024]), torch.Size([3, 1024]))
        >>> out = target.prefill([[1, 2, 3], [4]])                  # the protocol: cached
        >>> torch.allclose(out[0].logits[0], logits, atol=1e-5)   # float32 rounding apart
        True
        >>> target.extend(torch.tensor([[7, 8], [9, 10]])).logits.shape
        torch.Size([2, 2, 1024])
        >>> target.rollback([4, 2]); target.lengths
        [4, 2]
    """

    def __init__(self, config: MTPConfig, n_layers: int = 2, *,
                 dtype: torch.dtype = torch.float32, weight_format: WeightFormat | None = None,
                 numerics: Numerics | None = None, device: torch.device | str | None = None,
                 max_extend: int = 8):
        super().__init__()
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers: expected an int >= 1, got {n_layers!r}")
        if not isinstance(max_extend, int) or max_extend < 1:
            raise ValueError(f"max_extend: expected an int >= 1, got {max_extend!r}")
        cfg = config
        self.config, self.dtype, self.max_extend = cfg, dtype, max_extend
        self.numerics = numerics or Numerics()
        fmt = weight_format or WeightFormat.plain()
        d, m = cfg.hidden_size, cfg.hc_mult
        self.embed = _table((cfg.vocab_size, d), dtype, device)  # .weight [V, D]
        self.blocks = nn.ModuleList(Block(cfg, fmt, dtype, device) for _ in range(n_layers))
        self.hc_head_fn = nn.Parameter(torch.empty(m, m * d, device=device), requires_grad=False)
        self.hc_head_base = nn.Parameter(torch.empty(m, device=device), requires_grad=False)
        self.hc_head_scale = nn.Parameter(torch.empty(1, device=device), requires_grad=False)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, device)
        self.head = _table((cfg.vocab_size, d), dtype, device)  # .weight [V, D]
        self.cache: KVCache | None = None
        self.lengths: list[int] = []  # tokens held per sequence (in the cache)

    # ---- the protocol's attributes ---------------------------------------------------------
    @property
    def hc_dim(self) -> int:
        return self.config.hc_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @classmethod
    def random(cls, config: MTPConfig | None = None, *, n_layers: int = 2, seed: int = 0,
               block_scale: float = 0.1, dtype: torch.dtype = torch.float32,
               max_extend: int = 8) -> ToyTarget:
        """A seeded random target (default: the ``tiny`` preset's dimensions) whose blocks add
        only ``block_scale`` of their output to the residual (see the module docstring)."""
        cfg = config or MTPConfig.from_name("tiny")
        target = cls(cfg, n_layers, dtype=dtype, max_extend=max_extend)
        src = _random_layers(cfg, n_layers, seed, dtype)
        first = src.layer(0)
        with torch.no_grad():
            for i, block in enumerate(target.blocks):
                block.load_state_dict(src.layer(i).mtp_block.state_dict())
                _scale_block_outputs_(block, block_scale)
            target.embed.weight.copy_(src.model.embed_tokens.weight)
            target.head.weight.copy_(first.shared_head.head.weight)
            target.norm.weight.copy_(first.shared_head.norm.weight)
            for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
                getattr(target, name).copy_(getattr(first, name))
        return target

    # ---- the model -------------------------------------------------------------------------
    def rows(self, tokens: torch.Tensor, positions: torch.Tensor,
             seq_slots: torch.Tensor | None = None, cache: KVCache | None = None, *,
             ops_=ops.REFERENCE) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward over T rows: tokens, positions, seq_slots [T] (each sequence's rows
        together, at consecutive positions) -> (logits [T, V] float32, residual [T, M*D]).

        Without ``cache`` the runs of equal ``seq_slots`` are independent sequences starting at
        their first row (a packed training batch); with it they attend to their cached KV and
        are written to it. Differentiable when the parameters require grad (training).
        ``ops_``: the ops that run the blocks (``mtp.demo.training_ops.TrainingOps`` for a
        training batch)."""
        cfg = self.config
        if seq_slots is None:
            seq_slots = torch.zeros_like(positions)
        e = nn.functional.embedding(tokens, self.embed.weight).to(self.dtype)  # [T, D]
        x = e.unsqueeze(1).repeat(1, cfg.hc_mult, 1)  # [T, D] -> [T, M, D]: a copy per stream
        inv_freq = ops.rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, positions.device)
        # Without a cache every block reads the same window (none for ops that attend over
        # whole windows, e.g. TrainingOps: no index, no host synchronisation building it).
        stateless = None
        if cache is None and getattr(ops_, "needs_window_index", True):
            stateless = window_index(positions, seq_slots, cfg.sliding_window, None,
                                     max(positions.shape[0], 1))
        for i, block in enumerate(self.blocks):
            if cache is None:
                window = stateless
            else:
                window = window_index(positions, seq_slots, cfg.sliding_window, cache.pos[i],
                                      cache.capacity)
            x, _ = block(x, StepContext(ops_, positions, window, seq_slots, cache, i,
                                        self.numerics, inv_freq))
        return self.logits(x), x.flatten(1)  # [T, M, D] -> [T, M*D]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Residual x [T, M, D] -> logits [T, V]: hc_head, norm, head (float32)."""
        cfg = self.config
        y = ops.hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, cfg.hc_eps,
                        cfg.rms_norm_eps)  # [T, D]
        y = ops.wide(self.norm(y))
        return nn.functional.linear(y, self.head.weight.to(y.dtype))

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stateless: tokens [T] at positions 0..T-1 -> (logits [T, V] predicting the token at
        each next position, pre-``hc_head`` residual [T, M*D]: what the drafter consumes)."""
        return self.rows(tokens, torch.arange(tokens.shape[0], device=tokens.device))

    # ---- the target protocol (mtp.speculative.Target) --------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[TargetOutput]:
        """Start ``len(prompts)`` sequences (dropping any earlier ones): output i holds prompt
        i's rows, logits [1, n_i, V] and residuals [1, n_i, M*D]."""
        prompts = check_prompts(prompts, self.vocab_size)
        cfg, dev = self.config, self.device
        counts = [len(p) for p in prompts]
        tokens = torch.tensor([t for p in prompts for t in p], device=dev)
        positions = torch.cat([torch.arange(n) for n in counts]).to(dev)
        slots = torch.arange(len(prompts), device=dev).repeat_interleave(
            torch.tensor(counts, device=dev))
        cache = KVCache(len(self.blocks), len(prompts), cfg.sliding_window + self.max_extend,
                        cfg.head_dim, dtype=self.dtype, device=dev)
        logits, residual = self.rows(tokens, positions, slots, cache)
        self.cache, self.lengths = cache, counts
        return [TargetOutput(lg[None], r[None])
                for lg, r in zip(logits.split(counts), residual.split(counts))]

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> TargetOutput:
        """tokens [B, T]: append T tokens to every sequence, each at its own next position ->
        logits [B, T, V] and residuals [B, T, M*D] of those tokens."""
        b = len(self.lengths)
        if self.cache is None:
            raise RuntimeError("extend: no sequences; call prefill first")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != b \
                or not 1 <= tokens.shape[1] <= self.max_extend:
            got = list(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ValueError(f"tokens: expected [B, T] = [{b}, 1..{self.max_extend}] (one row "
                             f"per sequence, at most max_extend tokens), got {got}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens: expected int64 or int32 token ids, got {tokens.dtype}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"tokens: ids must be in [0, {self.vocab_size})")
        t, dev = tokens.shape[1], self.device
        positions = (torch.tensor(self.lengths)[:, None] + torch.arange(t)).flatten().to(dev)
        slots = torch.arange(b, device=dev).repeat_interleave(t)
        logits, residual = self.rows(tokens.to(dev).flatten(), positions, slots, self.cache)
        self.lengths = [n + t for n in self.lengths]
        return TargetOutput(logits.view(b, t, -1), residual.view(b, t, -1))

    def rollback(self, lengths: Sequence[int]) -> None:
        """Sequence b keeps its first ``lengths[b]`` tokens. The ring keeps W + max_extend
        entries, so a sequence can drop at most max_extend + 1 tokens at once."""
        room = self.max_extend + 1
        new = list(lengths)
        if len(new) != len(self.lengths):
            raise ValueError(f"lengths: expected {len(self.lengths)} lengths (one per sequence), "
                             f"got {len(new)}")
        for i, (n, cur) in enumerate(zip(new, self.lengths)):
            if not isinstance(n, int) or isinstance(n, bool) or not cur - room <= n <= cur:
                raise ValueError(f"lengths[{i}]: expected an int in [{max(cur - room, 0)}, "
                                 f"{cur}] (its current length, dropping at most max_extend + 1 "
                                 f"= {room} tokens), got {n!r}")
        for slot, n in enumerate(new):
            self.cache.discard_from(slot, n)
        self.lengths = new


@torch.no_grad()
def matching_mtp(target: ToyTarget, *, seed: int = 1, h_scale: float = 0.1,
                 block_scale: float = 0.1) -> DeepSeekV4MTP:
    """An MTP layer that roughly agrees with a random ``target`` (see the module docstring),
    sharing its embedding and head tensors (no copies), in the target's dtype and plain
    weight format.

    Example:
        >>> from mtp.demo.toy_target import ToyTarget, matching_mtp
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

"""DeepSeekV4MTP: the multi-token-prediction draft layer as a torch.nn.Module.

The interface mirrors vLLM's ``DeepSeekV4MTP`` (``embed_input_ids``, ``forward``,
``compute_logits``) and the parameter names are exactly the targets of its loader, so its
checkpoint rules become our remap table (``mtp/remap.py``):

    model.embed_tokens.weight                                  [V, D]
    model.layers.{L}.{enorm,hnorm}.weight                      [D]
    model.layers.{L}.{e_proj,h_proj}.weight(_scale_inv)        [D, D]
    model.layers.{L}.hc_head_{fn,base,scale}                   [M, M*D] [M] [1]
    model.layers.{L}.shared_head.{norm,head}.weight            [D] [V, D]
    model.layers.{L}.mtp_block.{attn_norm,ffn_norm}.weight     [D]
    model.layers.{L}.mtp_block.hc_{attn,ffn}_{fn,base,scale}   [(2+M)M, M*D] [(2+M)M] [3]
    model.layers.{L}.mtp_block.attn.fused_wqa_wkv.weight       [Q + Dh, D]   (wq_a rows, wkv rows)
    model.layers.{L}.mtp_block.attn.{q_norm,kv_norm}.weight    [Q] [Dh]
    model.layers.{L}.mtp_block.attn.wq_b.weight                [H*Dh, Q]
    model.layers.{L}.mtp_block.attn.wo_a.weight                [G*O, H*Dh/G]
    model.layers.{L}.mtp_block.attn.wo_b.weight                [D, G*O]
    model.layers.{L}.mtp_block.attn.attn_sink                  [H]
    model.layers.{L}.mtp_block.ffn.gate.{weight,e_score_correction_bias}   [E, D] [E]
    model.layers.{L}.mtp_block.ffn.shared_experts.gate_up_proj.weight      [2I, D] (w1, w3)
    model.layers.{L}.mtp_block.ffn.shared_experts.down_proj.weight         [D, I]
    model.layers.{L}.mtp_block.ffn.experts.w13_weight          [E, 2I, D(/2 for FP4)]
    model.layers.{L}.mtp_block.ffn.experts.w2_weight           [E, D, I(/2 for FP4)]

with L = num_hidden_layers + i. FP8 linears carry ``weight_scale_inv`` (128x128 blocks); FP4
experts ``w13_weight_scale`` / ``w2_weight_scale`` (per 32), FP8 experts ``..._scale_inv``.

Shape legend: T rows, M hc_mult, D hidden, H heads, Dh head dim, R RoPE dims, Q q_lora_rank,
G o_groups, O o_lora_rank, E experts, K experts per token, I expert width, V vocabulary.
"""

from __future__ import annotations

import bisect
import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import backend as backends
from . import ops
from .cache import KVCache, WindowIndex, call_window, run_ends, window_index
from .config import FP8_BLOCK, MTPConfig
from .facts import Init, ParamFacts, TPSplit, adopt, declare
from .memory import check_parameters
from .parallel import TensorParallel, check_world_size, vocab_embedding
from .quant import WeightFormat, dequantize, scale_dtype

# float64 is for verification: the same code, comparable tightly with the float64 reference.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# Rows per piece of a cached forward (a long catch-up): bounds the call's temporaries
# (docs/performance.md has the measured peak for a chunk) at one extra read of the weights per
# chunk.
CHUNK_ROWS = 1024


# Facts of the parameters declared in more than one place (see mtp/facts.py).
NORM = ParamFacts(init=Init("one_plus_normal", 0.1))
HC_FN, HC_BASE = ParamFacts(init=Init("fan_in")), ParamFacts(init=Init("normal", 0.5))
HC_SCALE = ParamFacts(init=Init("offset_uniform", 0.5))


def _weight(field: str, **facts) -> ParamFacts:
    """A weight whose stored format is WeightFormat field ``field`` (N(0, 1/in) in tests)."""
    return ParamFacts(field, init=Init("fan_in"), **facts)


@dataclass
class Numerics:
    """Switches for the reference's rounding steps (both on by default: they are the model).

    ``act_quant``: FP8-quantise activations (blocks of 128) before every product whose weight
    is stored in FP8 or FP4, as the reference does (its ``linear()`` dispatches on the weight's
    dtype: a bf16/fp32 weight takes its input unrounded, so a bf16 checkpoint gets no
    activation rounding at all). Off: no product's input is rounded.
    ``kv_fp8``: FP8-simulate the cached KV's non-RoPE dims (blocks of 64); the reference does
    it for every checkpoint, bf16 ones included.
    ``zero_embed_at_pos0``: vLLM's zeroing of the token embedding at position 0 (the reference,
    SGLang and TensorRT-LLM do not; disputed upstream).
    """

    act_quant: bool = True
    kv_fp8: bool = True
    zero_embed_at_pos0: bool = False


@dataclass
class StepContext:
    """What every layer of one forward call needs besides its input.

    ``ops``: the backend's ops (:class:`mtp.ops.ReferenceOps` or a faster one); ``window``: where
    each row finds its keys, or None for a decode step (each sequence's rows together at
    consecutive positions, usually one; keys read from the cache by position); ``seq_slots``:
    each row's cache slot (-1: padding, decode layout only), or None without a cache;
    ``inv_freq``: the RoPE frequencies [R/2] float64; ``side_stream``: a CUDA stream a backend
    may run work off the step's critical path on (the shared expert, hc_pre's post and comb)."""

    ops: Any
    positions: torch.Tensor  # [T]
    window: WindowIndex | None
    seq_slots: torch.Tensor | None
    cache: KVCache | None
    cache_layer: int
    numerics: Numerics
    inv_freq: torch.Tensor
    side_stream: Any = None

    @classmethod
    def single_sequence(cls, cfg: MTPConfig, positions: torch.Tensor, numerics: Numerics,
                        ops_: Any = ops.REFERENCE) -> StepContext:
        """Rows of one sequence at consecutive positions, no cache."""
        window = window_index(positions, torch.zeros_like(positions), cfg.sliding_window, None,
                              max(positions.shape[0], 1))
        inv_freq = ops.rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, positions.device)
        return cls(ops_, positions, window, None, None, 0, numerics, inv_freq)

    def rows(self, out_rows: torch.Tensor, *tensors: torch.Tensor) -> tuple:
        """The context of the rows ``out_rows`` [S] alone (of distinct sequences, e.g. each
        one's last row), in decode layout: each reads its window's earlier keys from the cache,
        where the caller wrote every row's key first (``write_keys``); then those rows of each
        of ``tensors`` [T, ...] (one ``take_rows`` for all: a backend may gather in one launch).
        """
        # optional on an ops object (one written before it may lack it), as argmax_rows is
        take = getattr(self.ops, "take_rows", ops.REFERENCE.take_rows)
        positions, seq_slots, *taken = take(out_rows, (self.positions, self.seq_slots, *tensors))
        ctx = dataclasses.replace(self, positions=positions, window=None, seq_slots=seq_slots)
        return (ctx, *taken)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        # float32 like the reference; the checkpoint's bf16 values convert exactly.
        declare(self, "weight", (dim,), torch.float32, device, NORM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A weight held as stored: FP8 e4m3 with a 128x128 block scale, or plain (compute dtype).

    The pure-PyTorch path dequantises it per call (:meth:`dequantized`)."""

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat,
                 facts: ParamFacts, dtype: torch.dtype, device=None):
        super().__init__()
        self.storage = getattr(fmt, facts.format)
        shape = (out_features, in_features)
        if self.storage == "fp8":
            declare(self, "weight", shape, torch.float8_e4m3fn, device, facts)
            blocks = (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
            declare(self, "weight_scale_inv", blocks, scale_dtype(fmt.dense_scale), device,
                    facts.scale("dense_scale"))
        else:
            declare(self, "weight", shape, dtype, device, facts)
            self.weight_scale_inv = None

    def dequantized(self, rows: tuple[int, int] | None = None,
                    cols: tuple[int, int] | None = None) -> torch.Tensor:
        """float32 [out, in], or its part ``[rows[0]:rows[1], cols[0]:cols[1]]`` (block-aligned:
        a tensor-parallel rank's share of a whole weight)."""
        w, s = self.weight, self.weight_scale_inv
        for dim, part in ((0, rows), (1, cols)):
            if part is not None:
                w = w.narrow(dim, part[0], part[1] - part[0])
                if s is not None:
                    s = s.narrow(dim, part[0] // FP8_BLOCK, -(-part[1] // FP8_BLOCK)
                                 - part[0] // FP8_BLOCK)
        return dequantize(w, s, self.storage)

    def forward(self, x: torch.Tensor, act_quant: bool, wide_out: bool = False) -> torch.Tensor:
        """``act_quant``: the numerics switch; the input is rounded only if this weight is
        stored in FP8 (a plain weight takes it unrounded, as in the reference)."""
        return ops.REFERENCE.linear(x, self, act_quant, wide_out=wide_out)


class Attention(nn.Module):
    """Sliding-window multi-query attention with a sink (compress ratio 0). Tensor-parallel:
    this rank's heads and their ``wo_a`` groups; ``wo_b``'s output is all-reduced."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp = tp or TensorParallel()
        h, g = tp.local(cfg.num_attention_heads), tp.local(cfg.o_groups)  # this rank's
        self.heads, self.groups = h, g
        dh, q, o = cfg.head_dim, cfg.q_lora_rank, cfg.o_lora_rank
        d = cfg.hidden_size
        # wq_a rows then wkv rows; a tensor-parallel rank takes whole heads of wq_b, whole
        # groups of wo_a and the matching columns of wo_b, and its heads' sinks.
        self.fused_wqa_wkv = Linear(d, q + dh, fmt, _weight("dense", fused=(
            "q_lora_rank", "head_dim")), dtype, device)
        self.q_norm = RMSNorm(q, cfg.rms_norm_eps, device)
        self.wq_b = Linear(q, h * dh, fmt, _weight("dense", tp=TPSplit(0, "head_dim")), dtype,
                           device)
        self.kv_norm = RMSNorm(dh, cfg.rms_norm_eps, device)
        self.wo_a = Linear(cfg.o_group_in, g * o, fmt, _weight("wo_a", tp=TPSplit(
            0, "o_lora_rank")), dtype, device)
        self.wo_b = Linear(g * o, d, fmt, _weight("dense", tp=TPSplit(1, "o_lora_rank")), dtype,
                           device)
        declare(self, "attn_sink", (h,), torch.float32, device, ParamFacts(tp=TPSplit(0)))

    def forward(self, u: torch.Tensor, ctx: StepContext, out_rows: torch.Tensor | None = None,
                u_rounded: Any = None) -> torch.Tensor | None:
        """u [T, D] (the normed block input; ``u_rounded``: the backend's form of it for the
        first product, from ``hc_pre_norm``) -> [T, D]; with ``out_rows`` [S] (rows of
        distinct sequences; needs a cache) every row's key goes into the cache and only those
        rows attend -> [S, D] (None when S = 0: the call's keys were all it had to give)."""
        cfg, op, nm = self.cfg, ctx.ops, ctx.numerics
        aq, eps = nm.act_quant, cfg.rms_norm_eps
        h, dh = self.heads, cfg.head_dim
        fused = op.linear(u, self.fused_wqa_wkv, aq, rounded=u_rounded)  # [T, Q + Dh]
        kv_dtype = ctx.cache.kv.dtype if ctx.cache is not None else u.dtype
        q_lat, kv, cos, sin = op.attn_prep(fused, self.q_norm.weight, self.kv_norm.weight,
                                           ctx.positions, ctx.inv_freq, eps, kv_fp8=nm.kv_fp8,
                                           kv_dtype=kv_dtype)
        if out_rows is not None:  # a row's key depends on that row alone (one layer)
            op.write_keys(kv, ctx.positions, cache=ctx.cache, cache_layer=ctx.cache_layer,
                          index=ctx.window, seq_slots=ctx.seq_slots)
            if not out_rows.numel():
                return None
            # they read the others' keys from the cache
            ctx, q_lat, kv, cos, sin = ctx.rows(out_rows, q_lat, kv, cos, sin)
        t = q_lat.shape[0]
        q = op.linear(q_lat, self.wq_b, aq).view(t, h, dh)  # [T, H*Dh] -> [T, H, Dh]
        q = op.q_prep(q, cos, sin, eps)
        o = op.attend(q, kv, self.attn_sink, cos, sin, ctx.positions,
                      window=cfg.sliding_window, cache=ctx.cache, cache_layer=ctx.cache_layer,
                      index=ctx.window, seq_slots=ctx.seq_slots)  # [T, H, Dh]
        z = op.grouped_linear(o, self.wo_a, self.groups)  # [T, G*O]
        if self.tp.sharded:  # this rank's columns of wo_b (whole 128-blocks): a float32 partial
            return self.tp.all_reduce_(op.linear(z, self.wo_b, aq, wide_out=True)).to(u.dtype)
        return op.linear(z, self.wo_b, aq)  # [T, D]


class Gate(nn.Module):
    def __init__(self, cfg: MTPConfig, device=None):
        super().__init__()
        e, d = cfg.n_routed_experts, cfg.hidden_size
        declare(self, "weight", (e, d), torch.float32, device, ParamFacts(init=Init("fan_in")))
        declare(self, "e_score_correction_bias", (e,), torch.float32, device,
                ParamFacts(init=Init("normal", 0.1)))


class SharedExperts(nn.Module):
    """The shared expert, held whole. Tensor-parallel with ``split`` (the rank's width
    ``I/w`` is whole 128-blocks): each rank computes its part of the width, like a dense MLP
    (w1 and w3 rows, w2 columns) and returns a float32 partial sum of the output; otherwise
    every rank computes it whole."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        d, i = cfg.hidden_size, cfg.shared_intermediate_size
        self.limit = cfg.swiglu_limit
        self.tp = tp = tp or TensorParallel()
        self.split = tp.sharded and i % tp.world_size == 0 and tp.local(i) % FP8_BLOCK == 0
        self.gate_up_proj = Linear(d, 2 * i, fmt, _weight("dense", fused=(
            "shared_intermediate_size",) * 2), dtype, device)  # w1 rows, then w3 rows
        self.down_proj = Linear(i, d, fmt, _weight("dense"), dtype, device)


class Experts(nn.Module):
    """The E routed experts, stacked: w13 [E, 2I, D] (w1 rows then w3 rows), w2 [E, D, I];
    FP4 holds the last dim packed in halves. Expert-parallel: this rank's range of E/w experts
    ``[first, first + E/w)``, under local indices."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        self.first = tp.part(cfg.n_routed_experts)[0]
        e, d, i = tp.local(cfg.n_routed_experts), cfg.hidden_size, cfg.moe_intermediate_size
        self.storage, self.limit = fmt.experts, cfg.swiglu_limit
        sdt = scale_dtype(fmt.expert_scale)
        # One checkpoint tensor per expert (w13: w1 rows then w3 rows); a tensor-parallel rank
        # holds a range of whole experts.
        w13 = _weight("experts", fused=("moe_intermediate_size",) * 2, stacked=True,
                      tp=TPSplit(0))
        w2 = _weight("experts", stacked=True, tp=TPSplit(0))
        if fmt.experts == "fp4":
            declare(self, "w13_weight", (e, 2 * i, d // 2), torch.int8, device, w13)
            declare(self, "w13_weight_scale", (e, 2 * i, d // 32), sdt, device,
                    w13.scale("expert_scale", "w13_weight"))
            declare(self, "w2_weight", (e, d, i // 2), torch.int8, device, w2)
            declare(self, "w2_weight_scale", (e, d, i // 32), sdt, device,
                    w2.scale("expert_scale", "w2_weight"))
        elif fmt.experts == "fp8":
            declare(self, "w13_weight", (e, 2 * i, d), torch.float8_e4m3fn, device, w13)
            declare(self, "w13_weight_scale_inv", (e, 2 * i // FP8_BLOCK, d // FP8_BLOCK), sdt,
                    device, w13.scale("expert_scale", "w13_weight"))
            declare(self, "w2_weight", (e, d, i), torch.float8_e4m3fn, device, w2)
            declare(self, "w2_weight_scale_inv", (e, d // FP8_BLOCK, i // FP8_BLOCK), sdt,
                    device, w2.scale("expert_scale", "w2_weight"))
        else:
            declare(self, "w13_weight", (e, 2 * i, d), dtype, device, w13)
            declare(self, "w2_weight", (e, d, i), dtype, device, w2)

    def _scales(self, name: str):
        for suffix in ("_scale", "_scale_inv"):
            if hasattr(self, name + suffix):
                return getattr(self, name + suffix)
        return None

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised float32 (w13 [2I, D], w2 [D, I]) of expert e (a local index)."""
        s13, s2 = self._scales("w13_weight"), self._scales("w2_weight")
        return (dequantize(self.w13_weight[e], None if s13 is None else s13[e], self.storage),
                dequantize(self.w2_weight[e], None if s2 is None else s2[e], self.storage))


class MoE(nn.Module):
    """Routed experts + the shared expert. Sharded: the gate and the shared expert are held
    whole on every rank (as DeepSeek's per-rank checkpoints hold them), the routed experts
    split by range. One all-reduce: of the routed partial sums plus the rank's part of the
    shared expert (``SharedExperts.split``), or of the routed sums alone, the shared expert
    then added whole, in the one-process order."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.tp = tp or TensorParallel()
        self.gate = Gate(cfg, device)
        self.shared_experts = SharedExperts(cfg, fmt, dtype, device, self.tp)
        self.experts = Experts(cfg, fmt, dtype, device, self.tp)

    def forward(self, u: torch.Tensor, u_rounded: Any, ctx: StepContext):
        """u [T, D] (the normed block input; ``u_rounded``: the backend's rounded form of it,
        from ``hc_pre_norm``) -> [T, D], or the backend's unreduced form its ``hc_post`` sums."""
        return ctx.ops.moe(u, u_rounded, self, self.cfg, ctx.numerics.act_quant,
                           side_stream=ctx.side_stream)


class Block(nn.Module):
    """A V4 decoder block with hyper-connections (``mtp_block``)."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device)
        self.attn = Attention(cfg, fmt, dtype, device, tp)
        self.ffn = MoE(cfg, fmt, dtype, device, tp)
        for site in ("attn", "ffn"):
            declare(self, f"hc_{site}_fn", (cfg.hc_mix_dim, cfg.hc_dim), torch.float32, device,
                    HC_FN)
            declare(self, f"hc_{site}_base", (cfg.hc_mix_dim,), torch.float32, device, HC_BASE)
            declare(self, f"hc_{site}_scale", (3,), torch.float32, device, HC_SCALE)

    def _hc_pre_norm(self, op, x: torch.Tensor, site: str, ctx: StepContext, read: bool = True,
                     **hints):
        """``op.hc_pre_norm`` at ``site``; ``read``: post and comb will be read (a backend may
        make them on the side stream only then: their reader joins it)."""
        cfg = self.cfg
        return op.hc_pre_norm(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                              getattr(self, f"hc_{site}_base"),
                              getattr(self, f"{site}_norm").weight, cfg.hc_sinkhorn_iters,
                              cfg.hc_eps, cfg.rms_norm_eps,
                              side_stream=ctx.side_stream if read else None, **hints)

    def forward(self, x: torch.Tensor, ctx: StepContext, head_fn: torch.Tensor | None = None,
                out_rows: torch.Tensor | None = None, partials=None):
        """x [T, M, D] -> (x [T, M, D], partials): ``head_fn`` (the layer's ``hc_head_fn``,
        when its logits follow) lets a backend compute the head's mixes alongside;
        ``partials``: a backend's precomputed mixes of x (from its ``input_proj``).
        ``out_rows`` [S]: only these rows' outputs are wanted (-> [S, M, D]); the others give
        their keys to the cache and stop after the attention's first product."""
        op, aq = ctx.ops, ctx.numerics.act_quant
        read = out_rows is None or out_rows.numel() > 0  # (none: keys only, post unread)
        u, post, comb, u_rounded = self._hc_pre_norm(op, x, "attn", ctx, read, partials=partials,
                                                     proj=(self.attn.fused_wqa_wkv, aq),
                                                     comb_rows=out_rows)
        a = self.attn(u, ctx, out_rows, u_rounded)
        if out_rows is not None:
            if a is None:  # no row's output wanted
                return x[:0], None
            ctx, x, post, comb = ctx.rows(out_rows, x, post, comb)
        x, parts = op.hc_post(a, x, post, comb, mix_fn=self.hc_ffn_fn)
        u, post, comb, u_rounded = self._hc_pre_norm(op, x, "ffn", ctx, partials=parts,
                                                     act_quant=aq)
        return op.hc_post(self.ffn(u, u_rounded, ctx), x, post, comb, mix_fn=head_fn)


class SharedHead(nn.Module):
    def __init__(self, cfg: MTPConfig, head: nn.Parameter):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, head.device)
        self.head = nn.Module()
        # [V, D]: the main model's head, shared by every MTP layer (or the target's own)
        adopt(self.head, "weight", head, HEAD)


class MTPLayer(nn.Module):
    """One MTP layer (``model.layers.{N+i}``): enorm/hnorm, e_proj/h_proj, the block, hc_head."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, head: nn.Parameter,
                 device=None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.hidden_size, cfg.hc_mult
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, device)
        self.e_proj = Linear(d, d, fmt, _weight("dense"), dtype, device)
        self.h_proj = Linear(d, d, fmt, _weight("dense"), dtype, device)
        declare(self, "hc_head_fn", (m, m * d), torch.float32, device, HC_FN)
        declare(self, "hc_head_base", (m,), torch.float32, device, HC_BASE)
        declare(self, "hc_head_scale", (1,), torch.float32, device, HC_SCALE)
        self.shared_head = SharedHead(cfg, head)
        self.mtp_block = Block(cfg, fmt, dtype, device, tp)

    def forward(self, embed: torch.Tensor, input_ids: torch.Tensor | None,
                inputs_embeds: torch.Tensor | None, h: torch.Tensor, ctx: StepContext,
                head_mix: bool = False, out_rows: torch.Tensor | None = None):
        """Token ids [T] (embedded with ``embed`` [V, D]) or ``inputs_embeds`` [T, D], residual
        streams h [T, M, D] -> (x [T, M, D], the head's mix partials or None; ``head_mix``:
        the logits follow, a backend may compute their mixes alongside). ``out_rows`` [S]:
        the rows whose outputs are wanted (-> x [S, M, D]; see :meth:`Block.forward`)."""
        cfg, op, nm = self.cfg, ctx.ops, ctx.numerics
        en, hn = op.embed_norms(input_ids, inputs_embeds, ctx.positions, embed, h,
                                self.enorm.weight, self.hnorm.weight, cfg.rms_norm_eps,
                                dtype=h.dtype, zero_pos0=nm.zero_embed_at_pos0,
                                proj=(self.e_proj, self.h_proj, nm.act_quant))
        x, parts = op.input_proj(en, hn, self.e_proj, self.h_proj, nm.act_quant,
                                 mix_fn=self.mtp_block.hc_attn_fn)  # [T, M, D]
        return self.mtp_block(x, ctx, self.hc_head_fn if head_mix else None, out_rows,
                              partials=parts)

    def logits(self, op, x: torch.Tensor, partials=None) -> torch.Tensor:
        """x [T, M, D] -> [T, V] float32: hc_head, this layer's norm, the shared head
        (sharded: this rank's vocabulary slice [T, V/w])."""
        cfg = self.cfg
        return op.head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base,
                       self.shared_head.norm.weight, self.shared_head.head.weight, cfg.hc_eps,
                       cfg.rms_norm_eps, partials=partials)


class DeepSeekV4MultiTokenPredictor(nn.Module):
    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 embed_tokens: torch.Tensor | None = None, head: torch.Tensor | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        self.embed_tokens = nn.Module()
        adopt(self.embed_tokens, "weight", _shared(embed_tokens, "embed_tokens", cfg, dtype,
                                                   device, tp), EMBED)
        shared_head = _shared(head, "head", cfg, dtype, device, tp)
        self.mtp_start_layer_idx = cfg.num_hidden_layers
        self.num_mtp_layers = cfg.num_nextn_predict_layers
        self.layers = nn.ModuleDict({
            str(L): MTPLayer(cfg, fmt, dtype, shared_head, device, tp)
            for L in cfg.mtp_layer_ids})


# The [V, D] tables a target can share: vocabulary rows split across tensor-parallel ranks.
EMBED = ParamFacts(tp=TPSplit(0), shared="embed_tokens")
HEAD = ParamFacts(tp=TPSplit(0), shared="head", init=Init("fan_in"))


def _shared(t: torch.Tensor | None, name: str, cfg: MTPConfig, dtype, device,
            tp: TensorParallel) -> nn.Parameter:
    """A [V, D] table (sharded: this rank's [V/w, D] rows): the caller's tensor (shared
    storage, no copy) or a fresh one to load."""
    shape = (tp.local(cfg.vocab_size), cfg.hidden_size)
    if t is None:
        return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    if tuple(t.shape) != shape:
        rows = "vocab_size" if not tp.sharded else f"vocab_size/world_size (rank {tp.rank}'s rows)"
        raise ValueError(f"{name}: expected shape [{rows}, hidden_size] = {list(shape)}, "
                         f"got {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return nn.Parameter(t, requires_grad=False)


class DeepSeekV4MTP(nn.Module):
    """The DeepSeek-V4 MTP draft layer(s), with vLLM's ``DeepSeekV4MTP`` interface.

    Args:
        config: the model's dimensions.
        weight_format: how weights are held (default: as released, FP8 + FP4 experts).
        dtype: compute dtype, ``torch.float32`` or ``torch.bfloat16`` (``torch.float64``
            runs the same code in double precision, for verification).
        device: where parameters are created (``"meta"`` for shape-only use).
        embed_tokens, head: the target's [V, D] embedding and LM head, shared instead of loaded
            (no copy; recorded in :attr:`shared_with_caller`).
        numerics: the reference's rounding switches (:class:`Numerics`).
        process_group: a ``torch.distributed`` group to run tensor/expert parallel over (the
            caller's, e.g. the engine's TP group); each rank then holds its share of the
            weights (:mod:`mtp.parallel`, docs/parallel.md) and every rank returns the same
            full results. None: one process.
        backend: which implementation of the ops runs the forward: ``"reference"`` (pure
            PyTorch, any device, format and dtype), ``"triton"`` (``mtp_kernels``: CUDA, the
            released format, bfloat16 or float32, whole or a tensor-parallel rank's share; an
            error where it cannot run)
            or ``"auto"`` (the default: ``"triton"`` where it can run, else ``"reference"``;
            decided at each call from where the parameters are, so ``model.cuda()`` switches
            it). An ops object (``mtp_kernels.TritonOps(model, experts=...)``) is used as
            given. Settable later: ``model.backend = "reference"``.

    Example:
        >>> from mtp import DeepSeekV4MTP, MTPConfig
        >>> from mtp.testing import init_random_
        >>> cfg = MTPConfig.from_name("tiny")
        >>> model = init_random_(DeepSeekV4MTP(cfg), seed=0)
        >>> h = torch.randn(5, cfg.hc_dim)                      # target residuals, rows 0..4
        >>> x = model(torch.tensor([5, 6, 7, 8, 9]), torch.arange(5), h)
        >>> model.compute_logits(x).shape
        torch.Size([5, 1024])
    """

    def __init__(self, config: MTPConfig, *, weight_format: WeightFormat | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 embed_tokens: torch.Tensor | None = None, head: torch.Tensor | None = None,
                 numerics: Numerics | None = None, process_group=None, backend: Any = "auto"):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype: expected one of {COMPUTE_DTYPES}, got {dtype}")
        self.tp = TensorParallel(process_group)
        check_world_size(config, self.tp.world_size)
        self.config = config
        self.weight_format = weight_format or WeightFormat.released()
        self.dtype = dtype
        self.numerics = numerics or Numerics()
        # The tables adopted from the caller (their storage is the target's): ParamFacts.shared
        # names; mtp.testing.init_random_ refuses to overwrite them.
        self.shared_with_caller = frozenset(
            n for n, t in (("embed_tokens", embed_tokens), ("head", head)) if t is not None)
        if not self.tp.sharded:  # a rank holds its share; the whole module is estimated
            check_parameters(config, self.weight_format, dtype, device,
                             shared=self.shared_with_caller)
        self.model = DeepSeekV4MultiTokenPredictor(config, self.weight_format, dtype, device,
                                                   embed_tokens, head, self.tp)
        self.backend = backend

    # ---- the backend -------------------------------------------------------------------------
    @property
    def backend(self) -> Any:
        """The backend asked for (``"reference"``, ``"triton"``, ``"auto"`` or an ops object);
        :attr:`ops` is what runs."""
        return self._backend

    @backend.setter
    def backend(self, value: Any) -> None:
        backends.check_choice(value)
        self._backend = value
        self._resolved: tuple[torch.device, Any] | None = None
        self._override = None

    @property
    def ops(self) -> Any:
        """The ops that run the forward now (:class:`mtp.ops.ReferenceOps` or a backend's),
        resolved from :attr:`backend` for the device the parameters are on."""
        if self._override is not None:
            return self._override
        dev = self.model.embed_tokens.weight.device
        if self._resolved is None or self._resolved[0] != dev:
            self._resolved = (dev, backends.resolve(self._backend, self))
        return self._resolved[1]

    @contextmanager
    def using(self, ops_: Any):
        """Run this model's calls inside the block with ``ops_`` (a backend's ops object)."""
        before, self._override = self._override, ops_
        try:
            yield self
        finally:
            self._override = before

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE frequencies [R/2] float64, derived once per device (a CUDA graph replays them)."""
        cached = getattr(self, "_inv_freq", None)
        if cached is None or cached.device != device:
            cfg = self.config
            cached = ops.rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, device)
            self._inv_freq = cached
        return cached


    # ---- vLLM-compatible surface -------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, D] embeddings (compute dtype)."""
        self._check_ids(input_ids, "input_ids")
        return vocab_embedding(input_ids, self.model.embed_tokens.weight, self.tp, self.dtype)

    def layer(self, spec_step_idx: int = 0) -> MTPLayer:
        """The MTP layer that draft step ``spec_step_idx`` uses (``spec_step_idx % n_mtp``)."""
        if not isinstance(spec_step_idx, int) or spec_step_idx < 0:
            raise ValueError(f"spec_step_idx: expected a non-negative int, got {spec_step_idx!r}")
        n = self.config.num_nextn_predict_layers
        return self.model.layers[str(self.config.num_hidden_layers + spec_step_idx % n)]

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                hidden_states: torch.Tensor, intermediate_tensors: object = None,
                inputs_embeds: torch.Tensor | None = None, spec_step_idx: int = 0, *,
                kv_cache: KVCache | None = None, seq_slots: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """One MTP step over T rows.

        Row i: ``hidden_states[i]`` is the target's pre-``hc_head`` residual at position
        ``positions[i]`` ([T, hc_mult*D]) and ``input_ids[i]`` the token at ``positions[i] + 1``.
        Without ``kv_cache`` the rows form one sequence with consecutive positions (causal,
        sliding window W). With ``kv_cache``, ``seq_slots[i]`` is row i's cache slot; each
        slot's rows come together with consecutive positions, attend to the cached KV before
        them, and are written to the cache.

        Returns [T, hc_mult*D]: the layer's residual, the next draft step's ``hidden_states``.

        ``last_only=True`` returns [S, hc_mult*D] instead: the output of each sequence's last
        row (S sequences, in the order of their rows; without ``kv_cache``, [1, hc_mult*D]),
        equal to the same rows of the full result, and the same cache afterwards. The layer is
        one block, so a row's key depends on that row alone: the other rows run only up to
        their key (input norms and projections, the attention's pre-mix and first product) and
        write it to the cache; the queries, attention, output projections, MoE and mixes run
        for the S last rows. What a catch-up (a prompt, accepted drafts) needs: the next draft
        starts from each sequence's last row.

        Example: two sequences catching up 6 and 3 rows (slots 0 and 1), as a drafter does:

            >>> from mtp import MTPConfig
            >>> from mtp.testing import init_random_
            >>> cfg = MTPConfig.from_name("tiny")
            >>> model = init_random_(DeepSeekV4MTP(cfg), seed=0)
            >>> cache = KVCache(1, 2, cfg.sliding_window + 4, cfg.head_dim)
            >>> slots = torch.tensor([0] * 6 + [1] * 3)
            >>> positions = torch.cat((torch.arange(6), torch.arange(10, 13)))
            >>> x = model(torch.randint(0, cfg.vocab_size, (9,)), positions,
            ...           torch.randn(9, cfg.hc_dim), kv_cache=cache, seq_slots=slots,
            ...           last_only=True)
            >>> x.shape, cfg.hc_dim                  # the rows at positions 5 and 12
            (torch.Size([2, 1024]), 1024)
        """
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors: pipeline parallelism is not supported; pass "
                             "None")
        layer = self.layer(spec_step_idx)
        cfg = self.config
        t = self._check_rows(input_ids, positions, hidden_states, inputs_embeds)
        seq_slots = self._check_slots(kv_cache, seq_slots, positions, t)
        self._check_cache(kv_cache)
        cache_layer = spec_step_idx % cfg.num_nextn_predict_layers
        dev = hidden_states.device
        if last_only and kv_cache is None:  # the keys go through a scratch ring of one window
            kv_cache = KVCache(1, 1, cfg.sliding_window, cfg.head_dim, dtype=self.dtype,
                               device=dev)
            seq_slots, cache_layer = torch.zeros(t, dtype=torch.int64, device=dev), 0
        # A long catch-up over a cache runs in chunks of CHUNK_ROWS rows: each chunk writes its
        # keys before the next reads them, so the result equals one call's, and the call's
        # temporaries are bounded by a chunk's rows instead of growing with T. With last_only
        # a chunk's output rows are the rows that end their sequence's run in the whole call:
        # a run cut by a chunk's end leaves its last C rows in the ring, all its last row's
        # window still needs (C >= W), and its earlier rows give nothing else.
        step = CHUNK_ROWS if kv_cache is not None else max(t, 1)
        ends = ends_host = None
        if last_only:  # each run's last row (one host read: the chunks' shares)
            ends = torch.nonzero(run_ends(seq_slots) == torch.arange(t, device=dev)).flatten()
            ends_host = ends.tolist()
        if t <= step:
            return self._rows(layer, input_ids, inputs_embeds, positions, hidden_states,
                              kv_cache, cache_layer, seq_slots, ends)
        n_out = len(ends_host) if last_only else t
        out = torch.empty(n_out, cfg.hc_dim, dtype=self.dtype, device=dev)
        for a in range(0, t, step):
            rows, dst, out_rows = slice(a, a + step), slice(a, a + step), None
            if last_only:
                i, j = bisect.bisect_left(ends_host, a), bisect.bisect_left(ends_host, a + step)
                dst, out_rows = slice(i, j), ends[i:j] - a
            out[dst] = self._rows(
                layer, None if input_ids is None else input_ids[rows],
                None if inputs_embeds is None else inputs_embeds[rows], positions[rows],
                hidden_states[rows], kv_cache, cache_layer, seq_slots[rows], out_rows)
        return out

    def _rows(self, layer, input_ids, inputs_embeds, positions, hidden_states, cache,
              cache_layer: int, seq_slots, out_rows=None) -> torch.Tensor:
        """``forward`` over checked rows, in one piece -> [T, M*D] (``out_rows`` [S]: only
        those rows' -> [S, M*D])."""
        window = call_window(positions, seq_slots, self.config.sliding_window, cache,
                             cache_layer)
        x, _ = self._step(layer, input_ids, inputs_embeds, positions, hidden_states, cache,
                          cache_layer, window, seq_slots, out_rows=out_rows)
        return x.flatten(1)  # [T, M, D] -> [T, M*D]

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0, *,
                       gather: bool = True) -> torch.Tensor:
        """[T, hc_mult*D] MTP residuals -> [T, V] float32 logits (float64 in float64 mode).

        Tensor-parallel: ``gather=False`` returns this rank's vocabulary slice [T, V/w]
        (ranks in order), e.g. for :meth:`mtp.parallel.TensorParallel.sample`."""
        layer = self.layer(spec_step_idx)
        cfg = self.config
        self._check_hidden(hidden_states, None)
        x = hidden_states.to(self.dtype).view(-1, cfg.hc_mult, cfg.hidden_size)  # [T, M, D]
        logits = layer.logits(self.ops, x)
        return self.tp.all_gather(logits, dim=-1) if gather else logits

    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                    hidden_states: torch.Tensor, seq_slots: torch.Tensor, kv_cache: KVCache,
                    spec_step_idx: int = 0, side_stream: Any = None, *,
                    logits_rows: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for T rows: (next hidden [T, M*D], logits [T, V]).

        The same result as ``forward`` with ``kv_cache``/``seq_slots`` followed by
        ``compute_logits``, but with no checks (the caller validates: ids in the vocabulary,
        positions >= 0, each slot's rows together at consecutive positions, at most
        ``capacity - W + 1`` of them; slot -1 marks a padding row that reads and writes
        nothing) and, with the triton backend, no host synchronisation: it can be captured in a
        CUDA graph (``mtp_kernels.DraftStepGraphs``, ``mtp_kernels.ProposeGraphs``).
        ``side_stream``: a CUDA stream the backend may run the shared expert on, beside the
        routed experts (pays inside a graph).

        ``logits_rows`` [S]: only these rows' outputs are wanted (one per sequence, e.g. each
        sequence's last row; padding rows may be among them): returns (hidden [S, M*D],
        logits [S, V]), ``forward(..., last_only=True)``'s way: every row writes its key, only
        these rows run the rest. Each slot may then bring up to ``min(capacity, W)`` rows (all
        are written before any is read; a wanted row is its sequence's last).
        """
        cfg = self.config
        layer = self.layer(spec_step_idx)
        cache_layer = spec_step_idx % cfg.num_nextn_predict_layers
        x, parts = self._step(layer, input_ids, None, positions, hidden_states, kv_cache,
                              cache_layer, None, seq_slots, side_stream=side_stream,
                              head_mix=True, out_rows=logits_rows)
        return x.flatten(1), layer.logits(self.ops, x, parts)

    def _step(self, layer: MTPLayer, input_ids, inputs_embeds, positions, hidden_states, cache,
              cache_layer: int, window: WindowIndex | None, seq_slots, *, side_stream=None,
              head_mix: bool = False, out_rows: torch.Tensor | None = None):
        """The layer over checked rows -> (x [T, M, D] (``out_rows`` [S]: those rows' [S, M,
        D]), the head's mix partials or None)."""
        cfg = self.config
        t = positions.shape[0]
        h = hidden_states.to(self.dtype).view(t, cfg.hc_mult, cfg.hidden_size)  # [T, M*D] -> ..
        if self.tp.sharded and inputs_embeds is None:  # a vocabulary-parallel lookup
            inputs_embeds = vocab_embedding(input_ids, self.model.embed_tokens.weight, self.tp,
                                            self.dtype)
        ctx = StepContext(self.ops, positions, window, seq_slots, cache, cache_layer,
                          self.numerics, self._rope_inv_freq(positions.device), side_stream)
        return layer(self.model.embed_tokens.weight, input_ids, inputs_embeds, h, ctx,
                     head_mix=head_mix, out_rows=out_rows)

    # ---- input checks (all before any state changes) -----------------------------------------
    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of token ids [T], got "
                             f"{_describe(ids)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected int64 or int32 token ids, got {ids.dtype}")
        # one host synchronisation for both bounds (each costs a device round trip)
        lo, hi = torch.stack((ids.min(), ids.max())).tolist() if ids.numel() else (0, 0)
        if lo < 0 or hi >= self.config.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)][0].item()
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary "
                             f"[0, {self.config.vocab_size})")

    def _check_hidden(self, hidden: torch.Tensor, t: int | None) -> None:
        hc = self.config.hc_dim
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != hc \
                or (t is not None and hidden.shape[0] != t):
            rows = "T" if t is None else str(t)
            raise ValueError(f"hidden_states: expected [{rows}, hc_mult*hidden_size] = "
                             f"[{rows}, {hc}], got {_describe(hidden)}")
        if not hidden.is_floating_point():
            raise TypeError(f"hidden_states: expected a floating-point tensor, got "
                            f"{hidden.dtype}")

    def _check_rows(self, input_ids, positions, hidden_states, inputs_embeds) -> int:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1:
            raise ValueError(f"positions: expected a 1-D tensor [T], got {_describe(positions)}")
        if positions.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"positions: expected int64 or int32, got {positions.dtype}")
        t = positions.shape[0]
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("input_ids: required when inputs_embeds is None")
            self._check_ids(input_ids, "input_ids")
            if input_ids.shape[0] != t:
                raise ValueError(f"input_ids has {input_ids.shape[0]} rows but positions has {t}")
        elif tuple(inputs_embeds.shape) != (t, self.config.hidden_size):
            raise ValueError(f"inputs_embeds: expected [{t}, {self.config.hidden_size}], got "
                             f"{_describe(inputs_embeds)}")
        self._check_hidden(hidden_states, t)
        if t and int(positions.min()) < 0:
            raise ValueError("positions: must be >= 0")
        return t

    def _check_cache(self, cache: KVCache | None) -> None:
        if cache is None:
            return
        dev, dh = self.model.embed_tokens.weight.device, self.config.head_dim
        if cache.kv.device != dev:
            raise ValueError(f"kv_cache is on {cache.kv.device}; the model is on {dev}")
        if cache.kv.shape[-1] != dh or not cache.kv.is_contiguous():
            raise ValueError(f"kv_cache.kv: expected a contiguous [..., {dh}] tensor, got "
                             f"{list(cache.kv.shape)}")

    def _check_slots(self, cache, seq_slots, positions, t):
        if cache is None:
            if seq_slots is not None:
                raise ValueError("seq_slots: given without kv_cache")
            if t > 1 and not bool((positions[1:] == positions[:-1] + 1).all()):
                raise ValueError("positions: without a kv_cache the rows form one sequence and "
                                 "need consecutive positions (p, p+1, ...); use a KVCache and "
                                 "seq_slots for several sequences")
            return None
        if seq_slots is None or tuple(seq_slots.shape) != (t,):
            raise ValueError(f"seq_slots: expected [{t}] cache slots, got {_describe(seq_slots)}")
        lo, hi = torch.stack((seq_slots.min(), seq_slots.max())).tolist() if t else (0, 0)
        if lo < 0 or hi >= cache.max_seqs:
            raise ValueError(f"seq_slots: slots must be in [0, {cache.max_seqs})")
        if t > 1:  # the run checks, read back in one host synchronisation
            same = seq_slots[1:] == seq_slots[:-1]
            broken = (same & (positions[1:] != positions[:-1] + 1)).any()
            distinct = torch.zeros(cache.max_seqs, dtype=torch.int64, device=seq_slots.device)
            distinct = distinct.index_fill_(0, seq_slots.to(torch.int64), 1).sum()
            broken, runs, distinct = torch.stack(
                (broken.to(torch.int64), (~same).sum() + 1, distinct)).tolist()
            if broken:
                raise ValueError("positions: rows of one sequence must be consecutive positions")
            if runs != distinct:
                raise ValueError("seq_slots: each sequence's rows must come together (one run "
                                 "per slot)")
        return seq_slots.to(torch.int64)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)} ({x.dtype})"
    return repr(type(x).__name__) if x is not None else "None"

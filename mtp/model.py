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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import ops
from .cache import KVCache, WindowIndex, call_window
from .config import FP8_BLOCK, KV_FP8_BLOCK, MTPConfig
from .parallel import TensorParallel, check_world_size, vocab_embedding
from .quant import WeightFormat, dequantize, fp8_simulate, scale_dtype

# float64 is for verification: the same code, comparable tightly with the float64 reference.
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_ATTN_CHUNK = 256  # rows per attention chunk: bounds the gathered keys to 256 x W x Dh.


def _param(shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


@dataclass
class Numerics:
    """Switches for the reference's rounding steps (both on by default: they are the model).

    ``act_quant``: FP8-quantise activations (blocks of 128) before every FP8/FP4 product.
    ``kv_fp8``: FP8-simulate the cached KV's non-RoPE dims (blocks of 64).
    ``zero_embed_at_pos0``: vLLM's zeroing of the token embedding at position 0 (the reference,
    SGLang and TensorRT-LLM do not; disputed upstream).
    """

    act_quant: bool = True
    kv_fp8: bool = True
    zero_embed_at_pos0: bool = False


@dataclass
class StepContext:
    """What every layer of one forward call needs besides its input."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor  # [T, R/2]
    sin: torch.Tensor  # [T, R/2]
    window: WindowIndex
    cache: KVCache | None
    cache_layer: int
    numerics: Numerics


def linear(x: torch.Tensor, weight: torch.Tensor, act_quant: bool,
           wide_out: bool = False) -> torch.Tensor:
    """x @ weight^T with float32 accumulation, result in x's dtype (``wide_out``: left in
    float32, e.g. a tensor-parallel partial sum); with ``act_quant`` the input is first
    FP8-rounded in blocks of 128 (the reference's ``act_quant`` before its FP8 GEMMs)."""
    if act_quant:
        x = fp8_simulate(x, FP8_BLOCK)
    xf = ops.wide(x)
    y = F.linear(xf, weight.to(xf.dtype))
    return y if wide_out else y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        # float32 like the reference; the checkpoint's bf16 values convert exactly.
        self.weight = _param((dim,), torch.float32, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A weight held as stored: FP8 e4m3 with a 128x128 block scale, or plain (compute dtype).

    The pure-PyTorch path dequantises it per call (:meth:`dequantized`)."""

    def __init__(self, in_features: int, out_features: int, storage: str, scale_kind: str,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.storage = storage
        if storage == "fp8":
            self.weight = _param((out_features, in_features), torch.float8_e4m3fn, device)
            blocks = (-(-out_features // FP8_BLOCK), -(-in_features // FP8_BLOCK))
            self.weight_scale_inv = _param(blocks, scale_dtype(scale_kind), device)
        else:
            self.weight = _param((out_features, in_features), dtype, device)
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
        return linear(x, self.dequantized(), act_quant, wide_out)


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
        self.fused_wqa_wkv = Linear(d, q + dh, fmt.dense, fmt.dense_scale, dtype, device)
        self.q_norm = RMSNorm(q, cfg.rms_norm_eps, device)
        self.wq_b = Linear(q, h * dh, fmt.dense, fmt.dense_scale, dtype, device)
        self.kv_norm = RMSNorm(dh, cfg.rms_norm_eps, device)
        self.wo_a = Linear(cfg.o_group_in, g * o, fmt.wo_a, fmt.dense_scale, dtype, device)
        self.wo_b = Linear(g * o, d, fmt.dense, fmt.dense_scale, dtype, device)
        self.attn_sink = _param((h,), torch.float32, device)

    def forward(self, u: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        cfg, aq = self.cfg, ctx.numerics.act_quant
        t = u.shape[0]
        h, dh, r = self.heads, cfg.head_dim, cfg.qk_rope_head_dim
        q_lat, kv = self.fused_wqa_wkv(u, aq).split([cfg.q_lora_rank, dh], dim=-1)
        q = self.wq_b(self.q_norm(q_lat), aq).view(t, h, dh)  # [T, H*Dh] -> [T, H, Dh]
        q = ops.rms_norm(q, None, cfg.rms_norm_eps)  # per head, no weight
        q = ops.apply_rope(q, ctx.cos, ctx.sin)
        kv = ops.apply_rope(self.kv_norm(kv), ctx.cos, ctx.sin)  # [T, Dh]
        if ctx.numerics.kv_fp8:
            kv = torch.cat((fp8_simulate(kv[:, :-r], KV_FP8_BLOCK), kv[:, -r:]), dim=-1)

        cache = ctx.cache
        if cache is not None:
            layer_kv = cache.kv[ctx.cache_layer].view(-1, dh)  # [S*C, Dh]
            pool = torch.cat((layer_kv, kv.to(layer_kv.dtype)), dim=0)
        else:
            pool = kv
        idx, valid = ctx.window.keys_index, ctx.window.keys_valid
        o = torch.empty(t, h, dh, dtype=ops.wide(u).dtype, device=u.device)
        for s in range(0, t, _ATTN_CHUNK):
            e = s + _ATTN_CHUNK
            o[s:e] = ops.sink_attention(q[s:e], pool[idx[s:e]], valid[s:e], self.attn_sink,
                                        dh ** -0.5)
        if cache is not None:  # after every read: this call's rows came from `kv` directly
            rows, slots = ctx.window.write_rows, ctx.window.write_slots
            layer_kv.index_copy_(0, slots, kv[rows].to(layer_kv.dtype))
            cache.pos[ctx.cache_layer].view(-1).index_copy_(0, slots, ctx.positions[rows])

        o = ops.apply_rope(o.to(u.dtype), ctx.cos, ctx.sin, inverse=True)
        # Grouped low-rank output: group g owns heads [g*H/G, (g+1)*H/G) and wo_a rows
        # [g*O, (g+1)*O). No activation quantisation before wo_a (the reference applies it as a
        # plain bf16 product).
        o = ops.wide(rearrange(o, "t (g hg) d -> t g (hg d)", g=self.groups))
        wo_a = rearrange(self.wo_a.dequantized(), "(g r) i -> g r i", g=self.groups)
        z = torch.einsum("tgi,gri->tgr", o, wo_a.to(o.dtype)).to(u.dtype)  # [T, G, O]
        # [T, G*O] -> [T, D]; sharded: this rank's columns (whole 128-blocks), a float32 partial
        out = self.wo_b(rearrange(z, "t g r -> t (g r)"), aq, wide_out=True)
        return self.tp.all_reduce_(out).to(u.dtype)


class Gate(nn.Module):
    def __init__(self, cfg: MTPConfig, device=None):
        super().__init__()
        self.weight = _param((cfg.n_routed_experts, cfg.hidden_size), torch.float32, device)
        self.e_score_correction_bias = _param((cfg.n_routed_experts,), torch.float32, device)


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
        self.gate_up_proj = Linear(d, 2 * i, fmt.dense, fmt.dense_scale, dtype, device)
        self.down_proj = Linear(i, d, fmt.dense, fmt.dense_scale, dtype, device)

    def forward(self, u: torch.Tensor, act_quant: bool) -> torch.Tensor:
        if not self.split:
            g, v = self.gate_up_proj(u, act_quant).chunk(2, dim=-1)
            return self.down_proj(ops.swiglu(g, v, self.limit).to(u.dtype), act_quant)
        i = self.down_proj.weight.shape[1]
        a, b = self.tp.part(i)  # this rank's part of the width: w1 rows, w3 rows, w2 columns
        g = linear(u, self.gate_up_proj.dequantized(rows=(a, b)), act_quant)
        v = linear(u, self.gate_up_proj.dequantized(rows=(i + a, i + b)), act_quant)
        return linear(ops.swiglu(g, v, self.limit).to(u.dtype),
                      self.down_proj.dequantized(cols=(a, b)), act_quant, wide_out=True)


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
        if fmt.experts == "fp4":
            self.w13_weight = _param((e, 2 * i, d // 2), torch.int8, device)
            self.w13_weight_scale = _param((e, 2 * i, d // 32), sdt, device)
            self.w2_weight = _param((e, d, i // 2), torch.int8, device)
            self.w2_weight_scale = _param((e, d, i // 32), sdt, device)
        elif fmt.experts == "fp8":
            self.w13_weight = _param((e, 2 * i, d), torch.float8_e4m3fn, device)
            self.w13_weight_scale_inv = _param((e, 2 * i // FP8_BLOCK, d // FP8_BLOCK), sdt,
                                               device)
            self.w2_weight = _param((e, d, i), torch.float8_e4m3fn, device)
            self.w2_weight_scale_inv = _param((e, d // FP8_BLOCK, i // FP8_BLOCK), sdt, device)
        else:
            self.w13_weight = _param((e, 2 * i, d), dtype, device)
            self.w2_weight = _param((e, d, i), dtype, device)

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

    def forward(self, u: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                act_quant: bool) -> torch.Tensor:
        """sum_k weight_k * Expert_{idx_k}(u): u [T, D], idx/weights [T, K] -> [T, D] float32
        (sharded: the sum over this rank's experts only)."""
        out = torch.zeros(u.shape, dtype=ops.wide(u).dtype, device=u.device)
        n = self.w13_weight.shape[0]
        for e in idx.unique().tolist():
            if not self.first <= e < self.first + n:
                continue  # another rank's expert
            rows, k = torch.nonzero(idx == e, as_tuple=True)
            w13, w2 = self.expert_weights(e - self.first)
            g, v = linear(u[rows], w13, act_quant).chunk(2, dim=-1)
            # routing weight BEFORE w2 (and before w2's input is quantised), as the reference
            a = (weights[rows, k, None] * ops.swiglu(g, v, self.limit)).to(u.dtype)
            out.index_add_(0, rows, ops.wide(linear(a, w2, act_quant)))
        return out


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

    def forward(self, u: torch.Tensor, act_quant: bool) -> torch.Tensor:
        cfg = self.cfg
        idx, w = ops.route(u, self.gate.weight, self.gate.e_score_correction_bias,
                           cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor)
        routed = self.experts(u, idx, w, act_quant)  # float32 (sharded: this rank's experts)
        shared = self.shared_experts(u, act_quant)
        if self.shared_experts.split:  # both float32 partials: one all-reduce of their sum
            return self.tp.all_reduce_(routed + shared).to(u.dtype)
        return (self.tp.all_reduce_(routed) + ops.wide(shared)).to(u.dtype)


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
            setattr(self, f"hc_{site}_fn", _param((cfg.hc_mix_dim, cfg.hc_dim), torch.float32,
                                                  device))
            setattr(self, f"hc_{site}_base", _param((cfg.hc_mix_dim,), torch.float32, device))
            setattr(self, f"hc_{site}_scale", _param((3,), torch.float32, device))

    def _hc_pre(self, x: torch.Tensor, site: str):
        cfg = self.cfg
        return ops.hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_scale"),
                          getattr(self, f"hc_{site}_base"), cfg.hc_sinkhorn_iters, cfg.hc_eps,
                          cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """x [T, M, D] -> [T, M, D]."""
        y, post, comb = self._hc_pre(x, "attn")
        x = ops.hc_post(self.attn(self.attn_norm(y), ctx), x, post, comb)
        y, post, comb = self._hc_pre(x, "ffn")
        return ops.hc_post(self.ffn(self.ffn_norm(y), ctx.numerics.act_quant), x, post, comb)


class SharedHead(nn.Module):
    def __init__(self, cfg: MTPConfig, head: nn.Parameter):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, head.device)
        self.head = nn.Module()
        self.head.weight = head  # [V, D]: the main model's head, shared by every MTP layer


class MTPLayer(nn.Module):
    """One MTP layer (``model.layers.{N+i}``): enorm/hnorm, e_proj/h_proj, the block, hc_head."""

    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, head: nn.Parameter,
                 device=None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg = cfg
        d, m = cfg.hidden_size, cfg.hc_mult
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, device)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, device)
        self.e_proj = Linear(d, d, fmt.dense, fmt.dense_scale, dtype, device)
        self.h_proj = Linear(d, d, fmt.dense, fmt.dense_scale, dtype, device)
        self.hc_head_fn = _param((m, m * d), torch.float32, device)
        self.hc_head_base = _param((m,), torch.float32, device)
        self.hc_head_scale = _param((1,), torch.float32, device)
        self.shared_head = SharedHead(cfg, head)
        self.mtp_block = Block(cfg, fmt, dtype, device, tp)

    def forward(self, e: torch.Tensor, h: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """e [T, D] token embeddings, h [T, M, D] residual streams -> [T, M, D]."""
        aq = ctx.numerics.act_quant
        x = self.h_proj(self.hnorm(h), aq) + self.e_proj(self.enorm(e), aq).unsqueeze(1)
        return self.mtp_block(x, ctx)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, M, D] -> [T, V] float32: hc_head, this layer's norm, the shared head
        (sharded: this rank's vocabulary slice [T, V/w])."""
        cfg = self.cfg
        y = ops.hc_head(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, cfg.hc_eps,
                        cfg.rms_norm_eps)
        y = self.shared_head.norm(y)
        yf = ops.wide(y)
        return F.linear(yf, self.shared_head.head.weight.to(yf.dtype))


class DeepSeekV4MultiTokenPredictor(nn.Module):
    def __init__(self, cfg: MTPConfig, fmt: WeightFormat, dtype, device=None,
                 embed_tokens: torch.Tensor | None = None, head: torch.Tensor | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        tp = tp or TensorParallel()
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = _shared(embed_tokens, "embed_tokens", cfg, dtype, device, tp)
        shared_head = _shared(head, "head", cfg, dtype, device, tp)
        self.mtp_start_layer_idx = cfg.num_hidden_layers
        self.num_mtp_layers = cfg.num_nextn_predict_layers
        self.layers = nn.ModuleDict({
            str(L): MTPLayer(cfg, fmt, dtype, shared_head, device, tp)
            for L in cfg.mtp_layer_ids})


def _shared(t: torch.Tensor | None, name: str, cfg: MTPConfig, dtype, device,
            tp: TensorParallel) -> nn.Parameter:
    """A [V, D] table (sharded: this rank's [V/w, D] rows): the caller's tensor (shared
    storage, no copy) or a fresh one to load."""
    shape = (tp.local(cfg.vocab_size), cfg.hidden_size)
    if t is None:
        return _param(shape, dtype, device)
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
        embed_tokens, head: the target's [V, D] embedding and LM head, shared instead of loaded.
        numerics: the reference's rounding switches (:class:`Numerics`).
        process_group: a ``torch.distributed`` group to run tensor/expert parallel over (the
            caller's, e.g. the engine's TP group); each rank then holds its share of the
            weights (:mod:`mtp.parallel`, docs/parallel.md) and every rank returns the same
            full results. None: one process.

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
                 numerics: Numerics | None = None, process_group=None):
        super().__init__()
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype: expected one of {COMPUTE_DTYPES}, got {dtype}")
        self.tp = TensorParallel(process_group)
        check_world_size(config, self.tp.world_size)
        self.config = config
        self.weight_format = weight_format or WeightFormat.released()
        self.dtype = dtype
        self.numerics = numerics or Numerics()
        self.model = DeepSeekV4MultiTokenPredictor(config, self.weight_format, dtype, device,
                                                   embed_tokens, head, self.tp)

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
                kv_cache: KVCache | None = None,
                seq_slots: torch.Tensor | None = None) -> torch.Tensor:
        """One MTP step over T rows.

        Row i: ``hidden_states[i]`` is the target's pre-``hc_head`` residual at position
        ``positions[i]`` ([T, hc_mult*D]) and ``input_ids[i]`` the token at ``positions[i] + 1``.
        Without ``kv_cache`` the rows form one sequence with consecutive positions (causal,
        sliding window W). With ``kv_cache``, ``seq_slots[i]`` is row i's cache slot; each
        slot's rows come together with consecutive positions, attend to the cached KV before
        them, and are written to the cache.

        Returns [T, hc_mult*D]: the layer's residual, the next draft step's ``hidden_states``.
        """
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors: pipeline parallelism is not supported; pass "
                             "None")
        layer = self.layer(spec_step_idx)
        cfg = self.config
        t = self._check_rows(input_ids, positions, hidden_states, inputs_embeds)
        seq_slots = self._check_slots(kv_cache, seq_slots, positions, t)
        e = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        e = e.to(self.dtype)
        if self.numerics.zero_embed_at_pos0:
            e = e.masked_fill((positions == 0)[:, None], 0)
        # [T, M*D] -> [T, M, D]
        h = hidden_states.to(self.dtype).view(t, cfg.hc_mult, cfg.hidden_size)
        cos, sin = ops.rope_cos_sin(positions, cfg.qk_rope_head_dim, cfg.rope_theta,
                                    ops.wide(e).dtype)
        cache_layer = spec_step_idx % cfg.num_nextn_predict_layers
        window = call_window(positions, seq_slots, cfg.sliding_window, kv_cache, cache_layer)
        ctx = StepContext(positions, cos, sin, window, kv_cache, cache_layer, self.numerics)
        return layer(e, h, ctx).flatten(1)  # [T, M, D] -> [T, M*D]

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0, *,
                       gather: bool = True) -> torch.Tensor:
        """[T, hc_mult*D] MTP residuals -> [T, V] float32 logits (float64 in float64 mode).

        Tensor-parallel: ``gather=False`` returns this rank's vocabulary slice [T, V/w]
        (ranks in order), e.g. for :meth:`mtp.parallel.TensorParallel.sample`."""
        layer = self.layer(spec_step_idx)
        cfg = self.config
        self._check_hidden(hidden_states, None)
        x = hidden_states.to(self.dtype).view(-1, cfg.hc_mult, cfg.hidden_size)  # [T, M, D]
        logits = layer.logits(x)
        return self.tp.all_gather(logits, dim=-1) if gather else logits

    # ---- input checks (all before any state changes) -----------------------------------------
    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of token ids [T], got "
                             f"{_describe(ids)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected int64 or int32 token ids, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
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
        if t and (int(seq_slots.min()) < 0 or int(seq_slots.max()) >= cache.max_seqs):
            raise ValueError(f"seq_slots: slots must be in [0, {cache.max_seqs})")
        if t > 1:
            same = seq_slots[1:] == seq_slots[:-1]
            if not bool((positions[1:] == positions[:-1] + 1)[same].all()):
                raise ValueError("positions: rows of one sequence must be consecutive positions")
            runs = int((~same).sum()) + 1
            if runs != int(seq_slots.unique().numel()):
                raise ValueError("seq_slots: each sequence's rows must come together (one run "
                                 "per slot)")
        return seq_slots.to(torch.int64)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {list(x.shape)} ({x.dtype})"
    return repr(type(x).__name__) if x is not None else "None"

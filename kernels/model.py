"""TritonMTP: the draft layer's forward on CUDA through the Triton kernels, with exactly the
reference module's interface and semantics, reading the module's own (stored-format) weights.

Nothing is copied or dequantised ahead: FP8 weights, FP4 experts and their E8M0 scales are read
as stored (E8M0 tensors are reinterpreted as bytes, a view). Every step is sync-free with fixed
shapes for a given row count except what the reference itself needs for arbitrary batches
(input validation and ``window_index`` in :meth:`TritonMTP.forward`); the decode entry point
:meth:`TritonMTP.decode_step` (one row per sequence) has none, so it can be captured in a CUDA
graph (``mtp_kernels.graph``).

Example:
    >>> fast = TritonMTP(model)                       # model: a CUDA DeepSeekV4MTP
    >>> x = fast(input_ids, positions, hidden, kv_cache=cache, seq_slots=slots)
    >>> logits = fast.compute_logits(x)
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from mtp import ops
from mtp.cache import KVCache, call_window
from mtp.config import KV_FP8_BLOCK
from mtp.model import DeepSeekV4MTP, MTPLayer

from . import attention as attn_k
from . import hc as hc_k
from . import head as head_k
from . import moe as moe_k
from . import moe_cuda
from .fp8_linear import fp8_linear

EXPERTS = ("auto", "cuda", "triton")
HEADS = ("cublas", "triton")


class TritonMTP:
    """Fast CUDA path for a :class:`~mtp.DeepSeekV4MTP` in the released weight format (FP8
    dense weights with E8M0 or float32 block scales, FP8 ``wo_a``, FP4 routed experts).

    Args:
        model: the module (on a CUDA device, compute dtype bfloat16 or float32). Its weights are
            used in place; later changes to them (loading) are seen.
        experts: the routed experts' kernels: ``"cuda"`` (``moe_cuda``: hand-written, compiled
            by NVRTC at first use; bfloat16 with the activation rounding on, else the Triton
            ones run), ``"triton"`` (``moe``), or ``"auto"``: ``"cuda"`` where it can run
            (torch with ``torch.cuda._compile_kernel``, compute capability >= 8.0, bfloat16,
            hidden size and expert width multiples of 128).
        head: the LM head's product for up to ``head.HEAD_T`` rows: ``"triton"``
            (``head.head_logits``, 7-11% faster than cuBLAS on an H100, kernels/NOTES.md
            round 6) or ``"cublas"`` (torch.mm); more rows take cuBLAS either way.

    ``forward`` / ``compute_logits`` take and return exactly what the module's do; numerics
    switches are read from ``model.numerics`` at each call.
    """

    def __init__(self, model: DeepSeekV4MTP, *, experts: str = "auto", head: str = "triton"):
        if not isinstance(model, DeepSeekV4MTP):
            raise TypeError(f"TritonMTP wraps a DeepSeekV4MTP, got {type(model).__name__}")
        fmt = model.weight_format
        if (fmt.dense, fmt.wo_a, fmt.experts, fmt.expert_scale) != ("fp8", "fp8", "fp4",
                                                                    "e8m0"):
            raise ValueError(f"TritonMTP supports the released format (FP8 dense and wo_a, FP4 "
                             f"experts with E8M0 scales); got {fmt}. Use the module itself.")
        if model.tp.sharded:
            raise ValueError("TritonMTP runs an unsplit model; a tensor-parallel model "
                             "(process_group=) runs on the module itself for now "
                             "(docs/parallel.md)")
        if model.dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"TritonMTP: compute dtype must be bfloat16 or float32, got "
                             f"{model.dtype}")
        half = model.config.qk_rope_head_dim // 2
        if half & (half - 1):
            raise ValueError(f"TritonMTP: qk_rope_head_dim / 2 = {half} must be a power of two "
                             f"(a Triton block); use the module itself")
        dev = model.model.embed_tokens.weight.device
        if dev.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
            raise ValueError(f"TritonMTP needs the model on a CUDA device; it is on {dev}")
        if experts not in EXPERTS:
            raise ValueError(f"TritonMTP: experts must be one of {EXPERTS}, got {experts!r}")
        if head not in HEADS:
            raise ValueError(f"TritonMTP: head must be one of {HEADS}, got {head!r}")
        self.head = head
        why = moe_cuda.unavailable(dev) or moe_cuda.unsupported(
            model.config.hidden_size, model.config.moe_intermediate_size) or (
            None if model.dtype == torch.bfloat16 else f"compute dtype {model.dtype}: the CUDA "
            f"expert kernels are bfloat16 only")
        if experts == "cuda" and why:
            raise ValueError(f"TritonMTP: experts='cuda' cannot run here: {why}; use 'triton'")
        self.experts = "triton" if experts == "triton" or why else "cuda"
        self.model = model
        self.config = cfg = model.config
        self.dtype = model.dtype
        self.device = dev
        i = torch.arange(0, cfg.qk_rope_head_dim, 2, dtype=torch.float64, device=dev)
        self.inv_freq = cfg.rope_theta ** (-i / cfg.qk_rope_head_dim)  # as ops.rope_cos_sin
        self._small_tiles: dict[tuple[int, int], torch.Tensor] = {}
        # decode_step's side stream (the shared expert), set for the duration of one call
        self._side: torch.cuda.Stream | None = None

    @property
    def _cuda(self) -> bool:
        return self.experts == "cuda"

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- the module's interface -------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                hidden_states: torch.Tensor, intermediate_tensors: object = None,
                inputs_embeds: torch.Tensor | None = None, spec_step_idx: int = 0, *,
                kv_cache: KVCache | None = None,
                seq_slots: torch.Tensor | None = None) -> torch.Tensor:
        """``DeepSeekV4MTP.forward``, same arguments, checks and result."""
        m, cfg = self.model, self.config
        if intermediate_tensors is not None:
            raise ValueError("intermediate_tensors: pipeline parallelism is not supported; pass "
                             "None")
        layer = m.layer(spec_step_idx)
        t = m._check_rows(input_ids, positions, hidden_states, inputs_embeds)
        seq_slots = m._check_slots(kv_cache, seq_slots, positions, t)
        self._check_cache(kv_cache)
        cache_layer = spec_step_idx % cfg.num_nextn_predict_layers
        window = call_window(positions, seq_slots, cfg.sliding_window, kv_cache, cache_layer)
        e = input_ids if inputs_embeds is None else self._embed(None, inputs_embeds, positions)
        h = hidden_states.to(self.dtype).view(t, cfg.hc_mult, cfg.hidden_size)
        x, _ = self._layer(layer, e, h, positions, kv_cache, cache_layer, window=window)
        return x.flatten(1)

    @torch.no_grad()
    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor:
        """``DeepSeekV4MTP.compute_logits``: [T, hc_mult*D] -> [T, V] float32."""
        m, cfg = self.model, self.config
        layer = m.layer(spec_step_idx)
        m._check_hidden(hidden_states, None)
        x = hidden_states.to(self.dtype).view(-1, cfg.hc_mult, cfg.hidden_size)
        return self._logits(layer, x)

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                    hidden_states: torch.Tensor, seq_slots: torch.Tensor, kv_cache: KVCache,
                    spec_step_idx: int = 0, side_stream: torch.cuda.Stream | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step for T sequences, one row each: (next hidden [T, M*D], logits [T, V]).

        No checks and no host synchronisation (the caller validates: ids in the vocabulary,
        positions >= 0, distinct slots; slot -1 marks a padding row that reads and writes
        nothing), so it can be captured in a CUDA graph. Same result as ``forward`` with
        ``kv_cache``/``seq_slots`` followed by ``compute_logits``. ``side_stream``: run the
        shared expert there, beside the routed experts (pays inside a CUDA graph, where the
        fork and join cost nothing; eagerly they cost host time).
        """
        cfg = self.config
        layer = self.model.layer(spec_step_idx)
        t = positions.shape[0]
        cache_layer = spec_step_idx % cfg.num_nextn_predict_layers
        h = hidden_states.to(self.dtype).view(t, cfg.hc_mult, cfg.hidden_size)
        self._side = side_stream
        try:
            x, head_parts = self._layer(layer, input_ids, h, positions, kv_cache, cache_layer,
                                        seq_slots=seq_slots, head_mix=True)
        finally:
            self._side = None
        return x.flatten(1), self._logits(layer, x, head_parts)

    # ---- pieces ---------------------------------------------------------------------------------
    def _check_cache(self, cache: KVCache | None) -> None:
        if cache is None:
            return
        if cache.kv.device != self.device:
            raise ValueError(f"kv_cache is on {cache.kv.device}; the model is on {self.device}")
        if cache.kv.shape[-1] != self.config.head_dim or not cache.kv.is_contiguous():
            raise ValueError(f"kv_cache.kv: expected a contiguous [..., {self.config.head_dim}] "
                             f"tensor, got {list(cache.kv.shape)}")

    def _embed(self, input_ids, inputs_embeds, positions) -> torch.Tensor:
        m = self.model
        if inputs_embeds is None:
            e = F.embedding(input_ids, m.model.embed_tokens.weight)
        else:
            e = inputs_embeds
        e = e.to(self.dtype)
        if m.numerics.zero_embed_at_pos0:
            e = e.masked_fill((positions == 0)[:, None], 0)
        return e.contiguous()

    def _layer(self, layer: MTPLayer, e, h, positions, cache, cache_layer, *, window=None,
               seq_slots=None, head_mix: bool = False):
        """e: the embedded rows [T, D], or the token ids [T] (embedded here, with the norms).
        -> (x [T, M, D], the head's mix partials or None); ``head_mix``: compute those in the
        final hc_post when the rows are few (``hc.POST_MIX_T``)."""
        cfg, nm = self.config, self.model.numerics
        aq = nm.act_quant
        eps = cfg.rms_norm_eps
        t, mult, d = h.shape
        emb = self.model.model.embed_tokens.weight
        if e.dim() == 1 and emb.dtype == self.dtype:  # ids: embedding + both norms, one launch
            en, hn = hc_k.embed_norms(e, positions, emb, h.reshape(t * mult, d).contiguous(),
                                      layer.enorm.weight, layer.hnorm.weight, eps,
                                      zero_pos0=nm.zero_embed_at_pos0)
        else:
            if e.dim() == 1:
                e = self._embed(e, None, positions)
            en = hc_k.rmsnorm(e, layer.enorm.weight, eps)
            hn = hc_k.rmsnorm(h.reshape(t * mult, d), layer.hnorm.weight, eps)
        # e_proj beside h_proj on the side stream was measured slower (kernels/NOTES.md round
        # 6): both stream their weights, so they share the bandwidth, and the add is a launch
        ep = self._lin(en, layer.e_proj, aq)
        x = self._lin(hn, layer.h_proj, aq, add=ep, add_row_div=mult).view(t, mult, d)
        blk = layer.mtp_block
        u, post, comb = hc_k.hc_pre_norm(x, blk.hc_attn_fn, blk.hc_attn_scale, blk.hc_attn_base,
                                         blk.attn_norm.weight, cfg.hc_sinkhorn_iters,
                                         cfg.hc_eps, eps)
        a = self._attention(blk.attn, u, positions, cache, cache_layer, window, seq_slots)
        few = t <= hc_k.POST_MIX_T  # hc_post computes the next hc_pre's mixes (no hc_mix)
        x, parts = hc_k.hc_post(a, x, post, comb, mix_fn=blk.hc_ffn_fn if few else None)
        # with the CUDA experts, the same kernel also writes their input (quant_rows of uq)
        u, post, comb, *q = hc_k.hc_pre_norm(x, blk.hc_ffn_fn, blk.hc_ffn_scale,
                                             blk.hc_ffn_base, blk.ffn_norm.weight,
                                             cfg.hc_sinkhorn_iters, cfg.hc_eps, eps,
                                             act_quant=aq, quant_rows=aq and self._cuda,
                                             partials=parts)
        head_fn = layer.hc_head_fn if head_mix and few else None
        return self._moe(blk.ffn, u, q or None, x, post, comb, head_fn)

    @staticmethod
    def _lin(x, lin, aq, **kw):
        return fp8_linear(x, lin.weight, lin.weight_scale_inv, act_quant=aq, **kw)

    def _attention(self, attn, u, positions, cache, cache_layer, window, seq_slots):
        cfg, nm = self.config, self.model.numerics
        aq, eps = nm.act_quant, cfg.rms_norm_eps
        t = u.shape[0]
        h, dh, q_rank = cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
        fused = self._lin(u, attn.fused_wqa_wkv, aq)  # [T, Q + Dh]
        kv_dtype = cache.kv.dtype if cache is not None else u.dtype
        # RoPE table, q_norm and the kv norm/RoPE/FP8 steps: one launch
        q_lat, new_kv, cos, sin = attn_k.attn_prep(fused, q_rank, attn.q_norm.weight,
                                                   attn.kv_norm.weight, positions,
                                                   self.inv_freq, eps, nm.kv_fp8, kv_dtype,
                                                   KV_FP8_BLOCK)
        q = self._lin(q_lat, attn.wq_b, aq).view(t, h, dh)  # [T, H*Dh] -> [T, H, Dh]
        attn_k.q_prep(q, cos, sin, eps)
        if cache is not None:
            layer_kv = cache.kv[cache_layer].view(-1, dh)  # [S*C, Dh]
            cpos = cache.pos[cache_layer]  # [S, C]
        else:
            layer_kv = cpos = None
        if window is not None:
            o = attn_k.sink_attention(q, new_kv, attn.attn_sink, cos, sin, cfg.sliding_window,
                                      cache_kv=layer_kv, keys_index=window.keys_index,
                                      keys_valid=window.keys_valid)
            if cache is not None:
                attn_k.cache_write(new_kv, positions, layer_kv, cpos.view(-1),
                                   rows=window.write_rows, slots=window.write_slots)
        else:
            o = attn_k.sink_attention(q, new_kv, attn.attn_sink, cos, sin, cfg.sliding_window,
                                      cache_kv=layer_kv, positions=positions,
                                      seq_slots=seq_slots, cache_pos=cpos)
            attn_k.cache_write(new_kv, positions, layer_kv, cpos, seq_slots=seq_slots)
        # [T, H, Dh] -> [T, G * H*Dh/G]; wo_a is grouped and takes no activation rounding
        z = self._lin(o.view(t, h * dh), attn.wo_a, False, group_n=cfg.o_lora_rank)
        return self._lin(z, attn.wo_b, aq)

    def _moe(self, ffn, u, q, residual, post, comb, head_fn=None):
        """q: (u FP8-rounded, and for the CUDA experts the same as quant_rows' (xh, xs)) with
        act_quant on: the experts read it, each of their inputs rounded once instead of in
        every program; None with act_quant off. The gate reads u. -> (x, the head's mix
        partials when ``head_fn`` is given, else None)."""
        cfg = self.config
        rounded = q is not None
        x = q[0] if rounded else u
        main = torch.cuda.current_stream() if self._side is not None else None
        if main is not None:  # fork: the shared expert beside the routed ones
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                shared = self._shared(ffn.shared_experts, x, rounded)
        logits = moe_k.gate_logits(u, ffn.gate.weight)  # [T, E] fp32, as ops.route
        idx, w = moe_k.route(logits, ffn.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                             cfg.scoring_func, cfg.routed_scaling_factor)
        ex = ffn.experts
        if self._cuda and rounded:  # (the CUDA kernels take rounded inputs only)
            pairs, tile_expert = self._tiles(idx, moe_cuda.TILE)
            xh, xs = q[1:]
            act = moe_cuda.moe_w13(xh, xs, ex.w13_weight, ex.w13_weight_scale, pairs,
                                   tile_expert, w, limit=cfg.swiglu_limit)
            ah, as_ = moe_k.quant_rows(act, pairs)
            pair_out = moe_cuda.moe_w2(ah, as_, ex.w2_weight, ex.w2_weight_scale, pairs,
                                       tile_expert, idx.numel())
        else:
            pairs, tile_expert = self._tiles(idx, moe_k.BM)
            act = moe_k.moe_w13(x, ex.w13_weight, ex.w13_weight_scale, pairs, tile_expert, w,
                                act_quant=False, rounded=rounded, limit=cfg.swiglu_limit)
            if rounded:
                moe_k.round_rows(act, pairs)
            pair_out = moe_k.moe_w2(act, ex.w2_weight, ex.w2_weight_scale, pairs, tile_expert,
                                    idx.numel(), act_quant=False, rounded=rounded)
        if main is not None:  # join
            main.wait_stream(self._side)
            shared.record_stream(main)
        else:
            shared = self._shared(ffn.shared_experts, x, rounded)
        return hc_k.hc_post(None, residual, post, comb, moe=(pair_out, idx, shared),
                            mix_fn=head_fn)

    def _shared(self, sh, x, rounded):
        # beside the routed experts (decode_step's side stream): one program per SM, so that
        # the routed chain's small kernels (gate, route, experts: the longer branch) find SMs
        # free instead of queueing behind four programs per SM of these
        tune = {"per_sm": 1} if self._side is not None else None
        gu = self._lin(x, sh.gate_up_proj, False, rounded=rounded, tune=tune)  # [T, 2I]
        return self._lin(gu, sh.down_proj, self.model.numerics.act_quant,
                         swiglu_limit=self.config.swiglu_limit, tune=tune)

    def _tiles(self, idx, bm):
        t, k = idx.shape
        if t >= moe_k.SMALL_T:
            return moe_k.align_tiles(idx, self.config.n_routed_experts, bm)
        key = (t * k, bm)  # few rows: each pair its own tile, a fixed pattern
        if key not in self._small_tiles:
            self._small_tiles[key] = moe_k.align_tiles(idx, self.config.n_routed_experts, bm)[0]
        return self._small_tiles[key], idx.reshape(-1)

    def _logits(self, layer: MTPLayer, x: torch.Tensor, partials=None) -> torch.Tensor:
        cfg = self.config
        y = hc_k.hc_head_norm(x, layer.hc_head_fn, layer.hc_head_scale, layer.hc_head_base,
                              layer.shared_head.norm.weight, cfg.hc_eps, cfg.rms_norm_eps,
                              partials=partials)
        head = layer.shared_head.head.weight
        if head.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and head.is_cuda:
            # bf16 products are exact in fp32; fp32 accumulation and output, as F.linear on
            # the upcast operands, without materialising a float32 head
            if self.head == "triton":
                return head_k.head_logits(y, head)
            return torch.mm(y, head.t(), out_dtype=torch.float32)
        return torch.mm(ops.wide(y), head.t().to(ops.wide(y).dtype))

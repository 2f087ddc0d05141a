"""TritonOps: the module's ops (``mtp.ops.ReferenceOps``' methods, same signatures) on CUDA
through the Triton kernels and the hand-written CUDA expert kernels.

``DeepSeekV4MTP`` picks these with ``backend="triton"`` (or ``"auto"`` on CUDA in the released
format); its forward, written once in ``mtp/model.py``, then launches the kernels below. The
weights are read as stored: FP8 weights, FP4 experts and their E8M0 scales (E8M0 reinterpreted
as bytes, a view); nothing is copied or dequantised ahead.

Five fusions cross the module's op boundaries, each through an argument the reference ignores:
``hc_post(..., mix_fn=fn)`` also computes the next hc_pre's (or the head's) mix partials for a
few rows (``hc.POST_MIX_T``), handed on as ``partials``, and ``input_proj(..., mix_fn=fn)``
the attention's (from the split-K pass of e_proj and h_proj, one launch);
``hc_pre_norm(..., act_quant=True)`` also writes its output FP8-rounded (and in the CUDA
expert kernels' layout), handed to ``moe`` as ``u_rounded``; ``moe`` returns the routed
experts' per-pair outputs unreduced (:class:`MoEPairs`), which ``hc_post`` sums in its own
launch; where the next product goes to cuBLAS (``proj``: a catch-up's prefix),
``embed_norms`` and ``hc_pre_norm`` write its input rounded in cuBLAS's form
(``scaled_mm.FP8Rows``), read by ``input_proj`` and by ``linear(..., rounded=)``
(``ROUND_IN_NORMS``).

Tensor-parallel (a module built with ``process_group=``): the same kernels on the rank's
shapes (its heads, its ``wo_b`` columns, its range of experts, its vocabulary slice) and the
module's collectives at the same points as on the reference ops: ``wo_b``'s product is left in
float32 (``linear(..., wide_out=True)``) for its all-reduce, and ``moe`` sums the rank's pairs
and its part of the shared expert in float32 and all-reduces them itself (the fusion into
``hc_post`` then does not apply). On an NCCL group the collectives are captured in the draft
step's CUDA graphs (``DraftStepGraphs``) with the kernels.

Example:
    >>> model = DeepSeekV4MTP(cfg, dtype=torch.bfloat16, device="cuda")  # backend="auto"
    >>> model.ops.name                                                    # doctest: +SKIP
    'triton'
    >>> model.backend = TritonOps(model, experts="triton", head="cublas")  # explicit options
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mtp import ops
from mtp.config import FP8_BLOCK, KV_FP8_BLOCK
from mtp.model import DeepSeekV4MTP

from . import argmax as argmax_k
from . import attention as attn_k
from . import fp8_linear as fp8_linear_k
from . import hc as hc_k
from . import head as head_k
from . import moe as moe_k
from . import moe_cuda, scaled_mm
from . import prepare as prepare_k
from . import rows as rows_k
from .fp8_linear import fp8_linear

EXPERTS = ("auto", "cuda", "triton")
HEADS = head_k.KERNELS
RELEASED = ("fp8", "fp8", "fp4", "e8m0")  # dense, wo_a, experts, expert scales
# input_proj: e_proj and h_proj in one launch (False: two), and the attention hc_pre's mixes
# from their split-K pass for few rows (False: hc_mix). Benchmarks' A/B (ab_drafter.py)
INPUT_PAIR = True
INPUT_MIX = True
# argmax_rows: the greedy pick by kernels/argmax.py (True) or torch.max (False: its reduction
# took ~37 us a draft step on an H100). Kept for the calls' 2-6% less GPU time inside the
# graphs (ab_drafter.py's "argmax-kernel" / "argmax-torch"; kernels/NOTES.md, "The greedy pick")
ARGMAX_KERNEL = True
# take_rows: a catch-up's last rows of its per-row tensors in one launch of kernels/rows.py
# (True) or an index_select each (False: eleven launches, ~34 us of a Flash 4 x 128 catch-up
# on an H100; kernels/NOTES.md, "The catch-up's timeline"). Kept for 0.8-1.4% less GPU time
# per catch-up inside the graphs (ab_drafter.py's "take-kernel" / "take-torch"; NOTES v38).
TAKE_ROWS_KERNEL = True
# The kernels that end in the norm before a product cuBLAS takes write its input in cuBLAS's
# form (codes, outer-dim-major scales, the weight's float32 scales): embed_norms for e_proj
# and h_proj, hc_pre_norm's finish for the attention's wq_a / wkv (a catch-up's prefix):
# three quant_fp8 launches and three scale conversions fewer (kernels/NOTES.md v42). On with
# scaled_mm.ADD_KERNEL: together 0.4-0.8% off one-sequence catch-ups and 1.0-1.5% off
# four-sequence ones inside the graphs on an H100 (ab_drafter.py's "prefix-glue"; False,
# with ADD_KERNEL False: "prefix-glue-off"; docs/performance.md, "a catch-up's prefix glue").
ROUND_IN_NORMS = True
# A whole-call program's NaN-logits bit folded into its last launch (copy_out; True) or by
# torch's isnan, any and add after a cat of the steps' probes (False: four launches more,
# ~10 us of every call's tail on an H100). ab_drafter.py's "finish-fused" / "finish-torch"
FINISH_IN_COPY = True
# hc_pre_norm's post and comb (the Sinkhorn's 20 serial iterations, ~5 us of a one-row
# hc_finish on an H100) made on the step's side stream where it has one, beside the norm and
# what follows it, joined where they are read (True); or by hc_finish itself (False).
# ab_drafter.py's "comb-apart" / "comb-inline"
COMB_APART = True
# A whole-call program reads its staged record from the page-locked host buffer where the
# driver maps it, in a kernel (stage_in), and copy_out stores the error word to the host's
# copy the same way (True); or a copy node each (False: an idle gap of ~5 us after each on an
# H100). ab_drafter.py's "mapped" / "copies"
MAPPED_HOST = True


@dataclass
class MoEPairs:
    """The MoE's output before its final sum: the routed experts' output per (row, k) pair
    ``pair_out`` [T*K, D], their experts ``idx`` [T, K] and the shared expert [T, D]; the
    triton ``hc_post`` adds them (routed in ascending expert order, then the shared)."""

    pair_out: torch.Tensor
    idx: torch.Tensor
    shared: torch.Tensor


class TritonOps:
    """The module's ops on CUDA for a :class:`~mtp.DeepSeekV4MTP` in the released weight format
    (FP8 dense weights with E8M0 or float32 block scales, FP8 ``wo_a``, FP4 routed experts),
    bfloat16 or float32 compute; whole, or a tensor-parallel rank's share.

    Args:
        model: the module it serves (its config, dtype and device; weights are passed per call).
        experts: the routed experts' kernels: ``"cuda"`` (``moe_cuda``: hand-written, compiled
            by NVRTC at first use; bfloat16 with the activation rounding on, else the Triton
            ones run), ``"triton"`` (``moe``), or ``"auto"``: ``"cuda"`` where it can run
            (torch with ``torch.cuda._compile_kernel``, compute capability >= 8.0, bfloat16,
            hidden size and expert width multiples of 128).
        head: the LM head's product for up to ``head.HEAD_T`` rows: ``"triton"`` (the
            default: ``head.head_logits``' kernel), ``"cublas"`` (torch.mm) or ``"auto"`` (the
            faster of the two for the shape on this GPU, timed once at its first call outside a
            graph capture); more rows take cuBLAS either way
            (docs/performance.md has the timings).
    """

    name = "triton"

    @staticmethod
    def unsupported(model: DeepSeekV4MTP, *, interpret: bool = False) -> str | None:
        """Why these ops cannot run ``model`` as it is now (None: they can). ``interpret``:
        Triton's CPU interpreter stands in for the GPU (development only)."""
        if not isinstance(model, DeepSeekV4MTP):
            return f"expected a DeepSeekV4MTP, got {type(model).__name__}"
        fmt = model.weight_format
        if (fmt.dense, fmt.wo_a, fmt.experts, fmt.expert_scale) != RELEASED:
            return (f"the kernels take the released format (FP8 dense and wo_a, FP4 experts "
                    f"with E8M0 scales); got {fmt}")
        if model.dtype not in (torch.bfloat16, torch.float32):
            return f"compute dtype must be bfloat16 or float32, got {model.dtype}"
        half = model.config.qk_rope_head_dim // 2
        if half & (half - 1):
            return f"qk_rope_head_dim / 2 = {half} must be a power of two (a Triton block)"
        dev = model.model.embed_tokens.weight.device
        if dev.type != "cuda" and not interpret:
            return f"the model is on {dev}; the kernels need a CUDA device"
        return None

    def __init__(self, model: DeepSeekV4MTP, *, experts: str = "auto", head: str = "triton"):
        why = self.unsupported(model, interpret=bool(os.environ.get("TRITON_INTERPRET")))
        if why:
            raise ValueError(f"TritonOps: {why}; use the reference backend")
        if experts not in EXPERTS:
            raise ValueError(f"TritonOps: experts must be one of {EXPERTS}, got {experts!r}")
        if head not in HEADS:
            raise ValueError(f"TritonOps: head must be one of {HEADS}, got {head!r}")
        cfg = model.config
        dev = model.model.embed_tokens.weight.device
        why = moe_cuda.unavailable(dev) or moe_cuda.unsupported(
            cfg.hidden_size, cfg.moe_intermediate_size) or (
            None if model.dtype == torch.bfloat16 else f"compute dtype {model.dtype}: the CUDA "
            f"expert kernels are bfloat16 only")
        if experts == "cuda" and why:
            raise ValueError(f"TritonOps: experts='cuda' cannot run here: {why}; use 'triton'")
        self.experts = "triton" if experts == "triton" or why else "cuda"
        self.head_kernel = head  # (the method `head` is the op)
        self.config, self.dtype, self.device = cfg, model.dtype, dev
        # the experts' ids in routing: this rank's, plus one for other ranks' (skipped tiles)
        self.n_experts = (model.tp.local(cfg.n_routed_experts) + 1 if model.tp.sharded
                          else cfg.n_routed_experts)
        self._small_tiles: dict[tuple[int, int], torch.Tensor] = {}
        # post and comb being made on a side stream (hc_pre_norm's side_stream): that stream
        # and the two tensors; their first reader makes its stream wait for it (_join_comb)
        self._comb_apart: tuple | None = None

    @property
    def _cuda(self) -> bool:
        return self.experts == "cuda"

    # ---- the layer's start -----------------------------------------------------------------
    def embed_norms(self, input_ids, inputs_embeds, positions, embed, h, enorm_w, hnorm_w,
                    eps: float, *, dtype: torch.dtype, zero_pos0: bool, proj=None):
        t, m, d = h.shape
        rows = h.reshape(t * m, d).contiguous()  # [T, M, D] -> [T*M, D]
        if inputs_embeds is None and embed.dtype == dtype:  # lookup + both norms, one launch
            fp8 = self._cublas_scales(proj, t, m, dtype, h.device) if proj else (None, None)
            en, hn = hc_k.embed_norms(input_ids, positions, embed, rows, enorm_w, hnorm_w, eps,
                                      zero_pos0=zero_pos0, fp8=fp8)
            if isinstance(hn, scaled_mm.FP8Rows):  # (for input_proj alone)
                return en, hn
        else:
            e = F.embedding(input_ids, embed) if inputs_embeds is None else inputs_embeds
            e = e.to(dtype)
            if zero_pos0:
                e = e.masked_fill((positions == 0)[:, None], 0)
            en = hc_k.rmsnorm(e.contiguous(), enorm_w, eps)
            hn = hc_k.rmsnorm(rows, hnorm_w, eps)
        return en, hn.view(t, m, d)

    @staticmethod
    def _cublas_scale(lin, rows: int, act_quant: bool, dtype, device):
        """lin's E8M0 scales where its product of ``rows`` rows goes to cuBLAS
        (``fp8_linear.by_cublas``), so that the kernel before it may round its input for it
        (``ROUND_IN_NORMS``); else None."""
        s = lin.weight_scale_inv
        return (s if ROUND_IN_NORMS and act_quant and s.dtype == torch.float8_e8m0fnu
                and s.is_contiguous()
                and fp8_linear_k.by_cublas(rows, lin.weight.shape[1], dtype, device, True)
                else None)

    def _cublas_scales(self, proj, t: int, m: int, dtype, device) -> tuple:
        """(e_proj's, h_proj's) ``_cublas_scale`` (``proj``: (e_proj, h_proj, act_quant)):
        what ``hc.embed_norms(..., fp8=)`` rounds its outputs for; e_proj's only with h_proj's
        (input_proj's FP8Rows path is h_proj's) and of the same shape (one launch's blocks)."""
        e_proj, h_proj, act_quant = proj
        hs = self._cublas_scale(h_proj, t * m, act_quant, dtype, device)
        es = self._cublas_scale(e_proj, t, act_quant, dtype, device) if hs is not None else None
        return (es if es is not None and es.shape == hs.shape else None), hs

    def linear(self, x, lin, act_quant: bool, wide_out: bool = False, rounded=None, **kw):
        if isinstance(rounded, scaled_mm.FP8Rows):  # rounded for cuBLAS by the op before
            return scaled_mm.scaled_mm_product(rounded, lin.weight, lin.weight_scale_inv)
        if wide_out:  # a tensor-parallel partial sum, left in float32 for the all-reduce
            kw["out"] = torch.empty(x.shape[0], lin.weight.shape[0], dtype=torch.float32,
                                    device=x.device)
        return fp8_linear(x, lin.weight, lin.weight_scale_inv, act_quant=act_quant, **kw)

    def input_proj(self, en, hn, e_proj, h_proj, act_quant: bool, *, mix_fn=None):
        # e_proj and h_proj in one launch (and one split-K pass that adds them), where the
        # product takes a split-K pass; for few rows that pass also computes the attention
        # hc_pre's mixes (as hc_post does for the later ones): no hc_mix launch. (e_proj
        # beside h_proj on a side stream was measured slower: kernels/NOTES.md v28)
        if isinstance(hn, scaled_mm.FP8Rows):  # rounded by embed_norms for cuBLAS
            t = en.m if isinstance(en, scaled_mm.FP8Rows) else en.shape[0]
            m = hn.m // t
            e = (scaled_mm.scaled_mm_product(en, e_proj.weight, e_proj.weight_scale_inv)
                 if isinstance(en, scaled_mm.FP8Rows) else self.linear(en, e_proj, act_quant))
            x = scaled_mm.scaled_mm_product(hn, h_proj.weight, h_proj.weight_scale_inv, add=e,
                                            add_row_div=m)
            return x.view(t, m, -1), None  # [T*M, D] -> [T, M, D]
        t, m, d = hn.shape
        mix = mix_fn if INPUT_MIX and t <= hc_k.POST_MIX_T else None
        if INPUT_PAIR:
            kw = {"add_linear": (en, e_proj.weight, e_proj.weight_scale_inv)}
        else:
            kw = {"add": self.linear(en, e_proj, act_quant)}
        out = self.linear(hn.view(t * m, d), h_proj, act_quant, add_row_div=m, mix_fn=mix, **kw)
        x, parts = out if mix is not None else (out, None)  # (with mix_fn: (x, partials))
        return x.view(t, m, d), parts  # [T*M, D] -> [T, M, D]

    # ---- hyper-connections -----------------------------------------------------------------
    def hc_pre_norm(self, x, fn, scale, base, norm_w, iters: int, hc_eps: float, eps: float, *,
                    partials=None, act_quant: bool = False, proj=None, side_stream=None,
                    comb_rows=None):
        # post and comb on the side stream where there is one (COMB_APART): the Sinkhorn off
        # the path from x to the next product; their readers wait for it (_join_comb)
        side = side_stream if COMB_APART else None
        # u rounded for the next product where cuBLAS takes it (the attention's wq_a / wkv of
        # a catch-up's rows): the product reads it in place of rounding u itself
        fp8 = (self._cublas_scale(proj[0], x.shape[0], proj[1], x.dtype, x.device)
               if proj is not None and not act_quant and x.dtype == torch.bfloat16 else None)
        if fp8 is not None:
            u, post, comb, q = hc_k.hc_pre_norm(x, fn, scale, base, norm_w, iters, hc_eps, eps,
                                                partials=partials, fp8=fp8, side_stream=side,
                                                comb_rows=comb_rows)
        else:
            # with the CUDA experts the same kernel also writes their input (quant_rows of u)
            u, post, comb, *q = hc_k.hc_pre_norm(x, fn, scale, base, norm_w, iters, hc_eps,
                                                 eps, act_quant=act_quant,
                                                 quant_rows=act_quant and self._cuda,
                                                 partials=partials, side_stream=side,
                                                 comb_rows=comb_rows)
            q = tuple(q) or None
        if side is not None:
            self._comb_apart = (side, post, comb)
        return u, post, comb, q

    def _join_comb(self, *tensors) -> None:
        """Before reading ``tensors``: if post or comb made on a side stream is among them, the
        current stream waits for that stream (once)."""
        apart = self._comb_apart
        if apart is not None and any(t is apart[1] or t is apart[2] for t in tensors):
            torch.cuda.current_stream().wait_stream(apart[0])
            self._comb_apart = None

    def hc_post(self, a, residual, post, comb, *, mix_fn=None):
        self._join_comb(post, comb)
        if residual.shape[0] > hc_k.POST_MIX_T:  # the mixes' partials pay for few rows only
            mix_fn = None
        if isinstance(a, MoEPairs):
            return hc_k.hc_post(None, residual, post, comb, moe=(a.pair_out, a.idx, a.shared),
                                mix_fn=mix_fn)
        return hc_k.hc_post(a, residual, post, comb, mix_fn=mix_fn)

    # ---- attention -------------------------------------------------------------------------
    def attn_prep(self, fused, q_norm_w, kv_norm_w, positions, inv_freq, eps: float, *,
                  kv_fp8: bool, kv_dtype: torch.dtype):
        # the RoPE table, q_norm and the kv norm/RoPE/FP8 steps: one launch
        return attn_k.attn_prep(fused, q_norm_w.shape[0], q_norm_w, kv_norm_w, positions,
                                inv_freq, eps, kv_fp8, kv_dtype, KV_FP8_BLOCK)

    def q_prep(self, q, cos, sin, eps: float):
        return attn_k.q_prep(q, cos, sin, eps)  # in place

    def attend(self, q, kv, sink, cos, sin, positions, *, window: int, cache, cache_layer: int,
               index, seq_slots):
        dh = q.shape[-1]
        if cache is not None:
            layer_kv = cache.kv[cache_layer].view(-1, dh)  # [S*C, Dh]
            cpos = cache.pos[cache_layer]  # [S, C]
        else:
            layer_kv = cpos = None
        keys = {"cache": cache, "cache_layer": cache_layer, "index": index,
                "seq_slots": seq_slots}
        if index is not None:
            o = attn_k.sink_attention(q, kv, sink, cos, sin, window, cache_kv=layer_kv,
                                      keys_index=index.keys_index, keys_valid=index.keys_valid)
            if cache is not None:
                self.write_keys(kv, positions, **keys)
            return o
        # a decode step: the kernel reads the cache's position table itself (no index tensors).
        # The rows go into the ring first: a sequence with several consecutive rows then finds
        # its earlier rows there (a row's own key comes from kv; the entries overwritten are
        # C positions back, outside every row's window while rows per slot <= C - W + 1)
        self.write_keys(kv, positions, **keys)
        return attn_k.sink_attention(q, kv, sink, cos, sin, window, cache_kv=layer_kv,
                                     positions=positions, seq_slots=seq_slots, cache_pos=cpos)

    def take_rows(self, rows, tensors):
        self._join_comb(*tensors)
        # the forward's per-row tensors are contiguous; any other layout takes index_select
        if TAKE_ROWS_KERNEL and all(t.is_contiguous() for t in tensors):
            return rows_k.take_rows(rows, tensors)
        return ops.REFERENCE.take_rows(rows, tensors)

    def write_keys(self, kv, positions, *, cache, cache_layer: int, index, seq_slots):
        layer_kv = cache.kv[cache_layer].view(-1, kv.shape[-1])  # [S*C, Dh]
        cpos = cache.pos[cache_layer]  # [S, C]
        if index is not None:
            attn_k.cache_write(kv, positions, layer_kv, cpos.view(-1), rows=index.write_rows,
                               slots=index.write_slots)
        else:
            attn_k.cache_write(kv, positions, layer_kv, cpos, seq_slots=seq_slots)

    def grouped_linear(self, o, lin, groups: int):
        t = o.shape[0]
        # [T, H, Dh] -> [T, G * H*Dh/G]; wo_a takes no activation rounding
        return self.linear(o.view(t, -1), lin, False, group_n=lin.weight.shape[0] // groups)

    # ---- MoE -------------------------------------------------------------------------------
    def moe(self, u, u_rounded, ffn, cfg, act_quant: bool, *, side_stream=None):
        """``u_rounded``: (u FP8-rounded, and for the CUDA experts the same as quant_rows'
        (xh, xs)) with act_quant on: the experts read it, each of their inputs rounded once
        instead of in every program; None with act_quant off. The gate reads u.

        Tensor-parallel (``ffn.tp``): the gate routes over all E experts, the pairs routed to
        another rank's experts go to an empty tile (local expert E/w: the kernels skip it),
        and the rank's float32 partial (its pairs' outputs summed, plus its part of the shared
        expert where ``shared_experts.split``) is all-reduced here: [T, D] in u's dtype, as
        ``ReferenceOps.moe``."""
        rounded = u_rounded is not None
        x = u_rounded[0] if rounded else u
        sh, tp = ffn.shared_experts, ffn.tp
        main = torch.cuda.current_stream() if side_stream is not None else None
        if main is not None:  # fork: the shared expert beside the routed ones
            side_stream.wait_stream(main)
            with torch.cuda.stream(side_stream):
                shared = self._shared(sh, x, rounded, act_quant, tp, per_sm=1)
        logits = moe_k.gate_logits(u, ffn.gate.weight)  # [T, E] fp32, as ops.route
        idx, w = moe_k.route(logits, ffn.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                             cfg.scoring_func, cfg.routed_scaling_factor)
        ex = ffn.experts
        mine = None
        if tp.sharded:  # global expert ids -> this rank's range; the others' -> E/w (skipped)
            n_local = ex.w13_weight.shape[0]
            mine = (idx >= ex.first) & (idx < ex.first + n_local)  # [T, K]
            idx = torch.where(mine, idx - ex.first, n_local)
        if self._cuda and rounded:  # (the CUDA kernels take rounded inputs only)
            pairs, tile_expert = self._tiles(idx, moe_cuda.TILE)
            xh, xs = u_rounded[1:]
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
            main.wait_stream(side_stream)
            shared.record_stream(main)
            if self._comb_apart is not None and self._comb_apart[0] is side_stream:
                self._comb_apart = None  # (joined too: queued there before the fork)
        else:
            shared = self._shared(sh, x, rounded, act_quant, tp)
        if mine is None:
            return MoEPairs(pair_out, idx, shared)
        t, k = idx.shape
        # this rank's pairs (the others' rows were never written) in float32, then the shared
        # expert's part, one all-reduce of [T, D] float32, rounded once, as the reference
        part = torch.where(mine[..., None], pair_out.view(t, k, -1), 0).sum(
            1, dtype=torch.float32)  # [T*K, D] -> [T, K, D] -> [T, D]
        if sh.split:
            return tp.all_reduce_(part + shared).to(u.dtype)
        return (tp.all_reduce_(part) + shared.float()).to(u.dtype)

    def _shared(self, sh, x, rounded: bool, act_quant: bool, tp, per_sm: int | None = None):
        """The shared expert of x: [T, D] in x's dtype, or with ``sh.split`` this rank's part
        of its width (rows [a, b) of w1 and of w3, columns [a, b) of w2, read in place) as a
        float32 partial sum."""
        # beside the routed experts (a side stream): one program per SM (per_sm=1), so that
        # the routed chain's small kernels (gate, route, experts: the longer branch) find SMs
        # free instead of queueing behind four programs per SM of these
        tune = {"per_sm": per_sm} if per_sm else None
        gate_up, down = sh.gate_up_proj, sh.down_proj
        if not sh.split:
            gu = self.linear(x, gate_up, False, rounded=rounded, tune=tune)  # [T, 2I]
            return self.linear(gu, down, act_quant, swiglu_limit=self.config.swiglu_limit,
                               tune=tune)
        i = down.weight.shape[1]
        a, b = tp.part(i)
        gu = torch.empty(x.shape[0], 2 * (b - a), dtype=x.dtype, device=x.device)  # [g | v]
        n, blk = b - a, FP8_BLOCK  # (whole 128-blocks: SharedExperts.split)
        for half, start in enumerate((a, i + a)):  # w1 rows, then w3 rows: views, no copy
            fp8_linear(x, gate_up.weight.narrow(0, start, n),
                       gate_up.weight_scale_inv.narrow(0, start // blk, n // blk),
                       act_quant=False, rounded=rounded, tune=tune,
                       out=gu[:, half * n:(half + 1) * n])
        out = torch.empty(x.shape[0], down.weight.shape[0], dtype=torch.float32,
                          device=x.device)
        return fp8_linear(gu, down.weight[:, a:b], down.weight_scale_inv[:, a // blk:b // blk],
                          act_quant=act_quant, swiglu_limit=self.config.swiglu_limit,
                          tune=tune, out=out)

    def _tiles(self, idx, bm):
        """Tiles of the (row, expert) pairs. ``idx`` holds this rank's local expert ids, E/w
        for another rank's (tensor-parallel): one more expert than the rank holds, whose
        tiles the kernels skip."""
        t, k = idx.shape
        n = self.n_experts
        if t >= moe_k.SMALL_T:
            return moe_k.align_tiles(idx, n, bm)
        key = (t * k, bm)  # few rows: each pair its own tile, a fixed pattern
        if key not in self._small_tiles:
            self._small_tiles[key] = moe_k.align_tiles(idx, n, bm)[0]
        return self._small_tiles[key], idx.reshape(-1)

    # ---- the whole-call program's first step -----------------------------------------------
    def propose_prepare(self, meta, src, rows_at, rows: int, width: int, dtype,
                        max_abs_hidden: float, vocab_size: int, cache_pos, error=None):
        # mtp.propose_program.prepare's checks, inputs and rollback: two launches, not ~45,
        # reading the caller's rows by address (no staging copies); the checks' bits OR-ed
        # into ``error`` in place (the call's word, begun with prepare's pre_error)
        return prepare_k.propose_prepare(meta, src, rows_at, rows, width, dtype,
                                         max_abs_hidden, vocab_size, cache_pos, error=error)

    def mapped_address(self, t):
        # where a kernel reaches a page-locked host tensor (None: copies instead)
        return prepare_k.mapped_address(t) if MAPPED_HOST else None

    def stage_in(self, staged, host_at, pre_error, error):
        # the whole-call program's first launch: its staged record in from the host buffer
        prepare_k.stage_in(staged, host_at, pre_error, error)

    def finish_call(self, packed, out_at, error, probes, bit: int, word_at=None):
        # its last launch: the outputs into the call's own buffer, by the staged address, the
        # NaN probes' bit into the error word, the word to the host's copy (at word_at)
        if FINISH_IN_COPY:
            return prepare_k.copy_out(packed, out_at, error=error, probes=probes, bit=bit,
                                      word_at=word_at)
        probes = torch.cat(list(probes))  # (the launch the probes' buffer saved, too)
        error = torch.add(error, torch.isnan(probes).any(), alpha=bit)
        prepare_k.copy_out(packed, out_at, error=error, word_at=word_at)
        return error

    # ---- logits ----------------------------------------------------------------------------
    def head(self, x, fn, scale, base, norm_w, head_w, hc_eps: float, eps: float, *,
             partials=None):
        y = hc_k.hc_head_norm(x, fn, scale, base, norm_w, hc_eps, eps, partials=partials)
        if head_w.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and head_w.is_cuda:
            # bf16 products are exact in fp32; fp32 accumulation and output, as F.linear on
            # the upcast operands, without materialising a float32 head
            return head_k.head_logits(y, head_w, kernel=self.head_kernel)
        return torch.mm(ops.wide(y), head_w.t().to(ops.wide(y).dtype))

    def argmax_rows(self, logits, top=None):
        if ARGMAX_KERNEL:  # (the head's float32 [T, V] rows: what the kernel takes)
            return argmax_k.argmax_rows(logits, top=top)
        return ops.REFERENCE.argmax_rows(logits, top)


class TritonMTP:
    """Deprecated (one release): the module runs the kernels itself. Use
    ``DeepSeekV4MTP(..., backend="triton")`` (``"auto"``, the default, does on CUDA in the
    released format), or ``model.backend = TritonOps(model, experts=..., head=...)``.

    A view of ``model`` whose calls run with :class:`TritonOps` (``model`` itself keeps its
    backend): ``forward``, ``compute_logits``, ``decode_step`` as the module's."""

    def __init__(self, model: DeepSeekV4MTP, *, experts: str = "auto", head: str = "triton"):
        warnings.warn("TritonMTP is deprecated: DeepSeekV4MTP runs the same kernels with "
                      "backend='triton' (the default 'auto' does on CUDA); options: "
                      "model.backend = TritonOps(model, experts=..., head=...)",
                      DeprecationWarning, stacklevel=2)
        if not isinstance(model, DeepSeekV4MTP):
            raise TypeError(f"TritonMTP wraps a DeepSeekV4MTP, got {type(model).__name__}")
        self.model = model
        self.ops = TritonOps(model, experts=experts, head=head)
        self.config, self.dtype, self.device = model.config, model.dtype, self.ops.device
        self.experts, self.head = self.ops.experts, self.ops.head_kernel

    def forward(self, *args, **kwargs):
        with self.model.using(self.ops):
            return self.model.forward(*args, **kwargs)

    __call__ = forward

    def compute_logits(self, *args, **kwargs):
        with self.model.using(self.ops):
            return self.model.compute_logits(*args, **kwargs)

    def decode_step(self, *args, **kwargs):
        with self.model.using(self.ops):
            return self.model.decode_step(*args, **kwargs)

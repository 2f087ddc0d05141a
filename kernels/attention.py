"""Sliding-window multi-query attention with the sink, and its RoPE / norm / FP8-KV pieces
(``mtp.model.Attention`` after the projections).

- :func:`rope_table`: cos/sin [T, R/2] fp32 of p * theta_i with the angles in float64, as
  ``ops.rope_cos_sin`` (one launch instead of eight).
- :func:`q_prep`: per-head RMSNorm (no weight) then RoPE on the last R dims, in place.
- :func:`kv_prep`: kv_norm, RoPE, then the FP8 simulation of the non-RoPE dims in blocks of 64,
  written in the cache's dtype.
- :func:`sink_attention`: one program per (row, block of heads) gathers the row's W keys, either
  from explicit ``keys_index``/``keys_valid`` (``mtp.cache.window_index``; any batch) or, for a
  decode step with one row per sequence, by reading the cache's position table itself (no index
  tensors, fixed shapes: CUDA-graph friendly). The inverse RoPE of the output is fused.
- :func:`cache_write`: the rows' KV and positions into the ring (slot -1: padding, skipped).

Shape legend: T rows, H heads, Dh head dim, R RoPE dims (the last R), W window, C ring capacity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    EXACT,
    fp8_round,
    launch_opts,
    mma,
    pdl_enter,
    pow2_scale_bits,
    rms_row,
    sm_count,
)

# From this many rows (not a decode step) one program takes ATTN_MANY_BH heads: each row's W
# keys are gathered once per program, so fewer head blocks read them fewer times.
ATTN_MANY_T = 64
ATTN_MANY_BH = 64


@triton.jit
def _rope_row(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, t, HALF: tl.constexpr):
    """Row t's cos, sin [HALF] (angles in float64, values float32), stored and returned."""
    i = tl.arange(0, HALF)
    ang = tl.load(pos_ptr + t).to(tl.float64) * tl.load(inv_freq_ptr + i)
    c = tl.cos(ang).to(tl.float32)
    s = tl.sin(ang).to(tl.float32)
    tl.store(cos_ptr + t * HALF + i, c)
    tl.store(sin_ptr + t * HALF + i, s)
    return c, s


@triton.jit
def rope_table_kernel(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, HALF: tl.constexpr):
    pdl_enter()
    _rope_row(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, tl.program_id(0), HALF)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor):
    """positions [T], inv_freq [R/2] float64 -> (cos, sin) [T, R/2] float32."""
    t, half = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(t, half, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if t:
        rope_table_kernel[(t,)](positions, inv_freq, cos, sin, HALF=half, num_warps=1,
                                **launch_opts())
    return cos, sin


@triton.jit
def _rotate(re, im, c, s, odt: tl.constexpr):
    """(re + i im) * (c + i s), each input rounded to odt first, output rounded to odt."""
    re = re.to(odt).to(tl.float32)
    im = im.to(odt).to(tl.float32)
    return (re * c - im * s).to(odt), (re * s + im * c).to(odt)


@triton.jit
def q_prep_kernel(q_ptr, cos_ptr, sin_ptr, eps, DH: tl.constexpr, R: tl.constexpr,
                  NP: tl.constexpr):
    """One (row, head) of q [T, H, Dh] in place: RMSNorm over Dh (no weight), RoPE."""
    pdl_enter()
    t = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    odt = q_ptr.dtype.element_ty
    base = q_ptr + (t * H + h) * DH
    n = tl.arange(0, NP)
    nmask = n < DH - R
    j = tl.arange(0, R // 2)
    nope = tl.load(base + n, mask=nmask, other=0.0).to(tl.float32)
    re = tl.load(base + DH - R + 2 * j).to(tl.float32)
    im = tl.load(base + DH - R + 2 * j + 1).to(tl.float32)
    ss = tl.sum(nope * nope, axis=0) + tl.sum(re * re, axis=0) + tl.sum(im * im, axis=0)
    r = tl.rsqrt(ss / DH + eps)
    tl.store(base + n, (nope * r).to(odt), mask=nmask)
    c = tl.load(cos_ptr + t * (R // 2) + j)
    s = tl.load(sin_ptr + t * (R // 2) + j)
    re2, im2 = _rotate(re * r, im * r, c, s, odt)
    tl.store(base + DH - R + 2 * j, re2)
    tl.store(base + DH - R + 2 * j + 1, im2)


def q_prep(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """q [T, H, Dh] contiguous, in place; returns q."""
    t, h, dh = q.shape
    r = 2 * cos.shape[1]
    if t:
        q_prep_kernel[(t, h)](q, cos, sin, eps, DH=dh, R=r,
                              NP=triton.next_power_of_2(dh - r), num_warps=4, **launch_opts())
    return q


@triton.jit
def kv_prep_kernel(kv_ptr, stride_kv, w_ptr, cos_ptr, sin_ptr, out_ptr, eps,
                   DH: tl.constexpr, R: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
                   KV_FP8: tl.constexpr, KVB: tl.constexpr):
    """One row: kv_norm (weight), RoPE on the last R, FP8 simulation of the first Dh-R in blocks
    of KVB; computed in the row's dtype, stored in out's (the cache's) dtype."""
    pdl_enter()
    t = tl.program_id(0)
    hj = tl.arange(0, R // 2)
    c = tl.load(cos_ptr + t * (R // 2) + hj)
    s = tl.load(sin_ptr + t * (R // 2) + hj)
    _kv_row(kv_ptr + t * stride_kv, w_ptr, c, s, out_ptr + t * DH, eps, DH, R, NB, NBP, KV_FP8,
            KVB)


@triton.jit
def _kv_row(src, w_ptr, c, s, dst, eps, DH: tl.constexpr, R: tl.constexpr, NB: tl.constexpr,
            NBP: tl.constexpr, KV_FP8: tl.constexpr, KVB: tl.constexpr):
    """kv_prep_kernel's work for the row at src, with its RoPE cos, sin given, into dst."""
    cdt = src.dtype.element_ty
    b = tl.arange(0, NBP)
    j = tl.arange(0, KVB)
    noff = b[:, None] * KVB + j[None, :]
    nmask = (b < NB)[:, None]
    nope = tl.load(src + noff, mask=nmask, other=0.0).to(tl.float32)
    hj = tl.arange(0, R // 2)
    re = tl.load(src + DH - R + 2 * hj).to(tl.float32)
    im = tl.load(src + DH - R + 2 * hj + 1).to(tl.float32)
    ss = tl.sum(tl.sum(nope * nope, axis=1), axis=0) + tl.sum(re * re, axis=0) \
        + tl.sum(im * im, axis=0)
    r = tl.rsqrt(ss / DH + eps)
    wn = tl.load(w_ptr + noff, mask=nmask, other=0.0)
    nope = (wn * (nope * r)).to(cdt).to(tl.float32)
    re = tl.load(w_ptr + DH - R + 2 * hj) * (re * r)
    im = tl.load(w_ptr + DH - R + 2 * hj + 1) * (im * r)
    re2, im2 = _rotate(re, im, c, s, cdt)
    if KV_FP8:
        e = pow2_scale_bits(tl.max(tl.abs(nope), axis=1))
        nope = fp8_round(nope, e) * ((e + 127) << 23).to(tl.float32, bitcast=True)[:, None]
    odt = dst.dtype.element_ty
    tl.store(dst + noff, nope.to(cdt).to(odt), mask=nmask)
    tl.store(dst + DH - R + 2 * hj, re2.to(odt))
    tl.store(dst + DH - R + 2 * hj + 1, im2.to(odt))


def kv_prep(kv: torch.Tensor, weight: torch.Tensor, cos, sin, eps: float, kv_fp8: bool,
            out_dtype: torch.dtype, kv_block: int = 64) -> torch.Tensor:
    """kv [T, Dh] (rows may be strided) -> [T, Dh] in ``out_dtype``."""
    t, dh = kv.shape
    r = 2 * cos.shape[1]
    nb = (dh - r) // kv_block
    out = torch.empty(t, dh, dtype=out_dtype, device=kv.device)
    if t:
        kv_prep_kernel[(t,)](kv, kv.stride(0), weight, cos, sin, out, eps, DH=dh, R=r, NB=nb,
                             NBP=triton.next_power_of_2(nb), KV_FP8=kv_fp8, KVB=kv_block,
                             num_warps=4, **launch_opts())
    return out


@triton.jit
def attn_prep_kernel(f_ptr, stride_f, qw_ptr, kvw_ptr, pos_ptr, inv_freq_ptr, q_ptr, kv_out,
                     cos_ptr, sin_ptr, eps, Q: tl.constexpr, QP: tl.constexpr,
                     DH: tl.constexpr, R: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr,
                     KV_FP8: tl.constexpr, KVB: tl.constexpr):
    """One row of the fused wqa/wkv output [Q + Dh]: the RoPE table row, q_norm of the first Q
    (``hc.rmsnorm``'s math) and ``kv_prep`` of the last Dh, in one program."""
    pdl_enter()
    t = tl.program_id(0)
    c, s = _rope_row(pos_ptr, inv_freq_ptr, cos_ptr, sin_ptr, t, R // 2)
    src = f_ptr + t * stride_f
    qq = tl.arange(0, QP)
    qmask = qq < Q
    x = tl.load(src + qq, mask=qmask, other=0.0).to(tl.float32)
    w = tl.load(qw_ptr + qq, mask=qmask, other=0.0)
    tl.store(q_ptr + t * Q + qq, rms_row(x, w, Q, eps).to(q_ptr.dtype.element_ty), mask=qmask)
    _kv_row(src + Q, kvw_ptr, c, s, kv_out + t * DH, eps, DH, R, NB, NBP, KV_FP8, KVB)


def attn_prep(fused: torch.Tensor, q_rank: int, q_norm_w: torch.Tensor,
              kv_norm_w: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              eps: float, kv_fp8: bool, kv_dtype: torch.dtype, kv_block: int = 64):
    """:func:`rope_table`, ``rmsnorm(fused[:, :q_rank], q_norm_w)`` and :func:`kv_prep` of
    ``fused[:, q_rank:]`` in one launch: fused [T, Q + Dh] -> (q_lat [T, Q] in fused's dtype,
    kv [T, Dh] in ``kv_dtype``, cos, sin [T, R/2] float32)."""
    t, width = fused.shape
    dh, half = width - q_rank, inv_freq.shape[0]
    r = 2 * half
    nb = (dh - r) // kv_block
    q_lat = torch.empty(t, q_rank, dtype=fused.dtype, device=fused.device)
    kv = torch.empty(t, dh, dtype=kv_dtype, device=fused.device)
    cos = torch.empty(t, half, dtype=torch.float32, device=fused.device)
    sin = torch.empty_like(cos)
    if t:
        qp = triton.next_power_of_2(q_rank)
        attn_prep_kernel[(t,)](fused, fused.stride(0), q_norm_w, kv_norm_w, positions, inv_freq,
                               q_lat, kv, cos, sin, eps, Q=q_rank, QP=qp, DH=dh, R=r, NB=nb,
                               NBP=triton.next_power_of_2(nb), KV_FP8=kv_fp8, KVB=kv_block,
                               num_warps=4 if qp <= 4096 else 8, **launch_opts())
    return q_lat, kv, cos, sin


@triton.jit
def _keys(cache_ptr, new_ptr, crow, nrow, from_new, wmask, cols, DH: tl.constexpr):
    """[WP, len(cols)] keys: from this call's rows where from_new, else from the cache."""
    kc = tl.load(cache_ptr + crow[:, None] * DH + cols[None, :],
                 mask=(wmask & ~from_new)[:, None], other=0.0)
    kn = tl.load(new_ptr + nrow[:, None] * DH + cols[None, :],
                 mask=(wmask & from_new)[:, None], other=0.0)
    return tl.where(from_new[:, None], kn.to(tl.float32), kc.to(tl.float32))


@triton.jit
def _pv(pr, kc, DOT_F32: tl.constexpr):
    """pr [BH, W] fp32 @ keys [W, n]: IEEE fp32 for float32 models; else two bf16 tensor-core
    dots over pr = hi + lo (keys are bf16-exact), relative error ~2^-16, far below the bf16
    rounding of the output."""
    if DOT_F32:
        return tl.dot(pr, kc, input_precision="ieee")
    hi = pr.to(EXACT)
    lo = (pr - hi.to(tl.float32)).to(EXACT)
    k = kc.to(EXACT)
    return tl.dot(hi, k) + tl.dot(lo, k)


@triton.jit
def sink_attention_kernel(q_ptr, cache_ptr, new_ptr, kidx_ptr, kvalid_ptr, pos_ptr, slot_ptr,
                          cpos_ptr, sink_ptr, cos_ptr, sin_ptr, out_ptr, H, C, n_cached,
                          sm_scale,
                          W: tl.constexpr, WP: tl.constexpr, DH: tl.constexpr, R: tl.constexpr,
                          BH: tl.constexpr, BD: tl.constexpr, DECODE: tl.constexpr,
                          DOT_F32: tl.constexpr):
    pdl_enter()
    t = tl.program_id(0)
    hb = tl.program_id(1)
    heads = hb * BH + tl.arange(0, BH)
    hmask = heads < H
    w = tl.arange(0, WP)
    wmask = w < W
    if DECODE:
        # one row per sequence: key w is position p - W + 1 + w; the last is this row's own KV
        p = tl.load(pos_ptr + t)
        slot = tl.load(slot_ptr + t)
        qpos = p - W + 1 + w
        from_new = w == W - 1
        ring = ((qpos % C) + C) % C
        slot_w = tl.zeros([WP], dtype=tl.int64) + slot
        crow = tl.maximum(slot_w, 0) * C + ring
        look = wmask & (w != W - 1) & (qpos >= 0) & (slot_w >= 0)
        held = tl.load(cpos_ptr + crow, mask=look, other=-1)
        valid = wmask & (from_new | (look & (held == qpos)))
        nrow = tl.zeros([WP], dtype=tl.int32) + t
    else:
        kidx = tl.load(kidx_ptr + t * W + w, mask=wmask, other=0)
        valid = wmask & (tl.load(kvalid_ptr + t * W + w, mask=wmask, other=0) != 0)
        from_new = kidx >= n_cached
        crow = tl.where(from_new, 0, kidx)
        nrow = tl.where(from_new, kidx - n_cached, 0)
    qrow = (t * H + heads) * DH
    s = tl.zeros([BH, WP], dtype=tl.float32)
    for d0 in tl.static_range(0, DH, BD):
        cols = d0 + tl.arange(0, BD)
        qc = tl.load(q_ptr + qrow[:, None] + cols[None, :], mask=hmask[:, None], other=0.0)
        kc = _keys(cache_ptr, new_ptr, crow, nrow, from_new, wmask, cols, DH)
        if DOT_F32:
            s += tl.dot(qc.to(tl.float32), tl.trans(kc), input_precision="ieee")
        else:
            s += mma(qc, tl.trans(kc))
    s = s * sm_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    m = tl.maximum(tl.max(s, axis=1), sink)
    pr = tl.exp(s - m[:, None])
    pr = pr / (tl.sum(pr, axis=1) + tl.exp(sink - m))[:, None]
    odt = out_ptr.dtype.element_ty
    # P @ V in BD-wide blocks of the non-RoPE dims, then the RoPE dims (block n_nope). With few
    # rows the blocks are spread over program_id(2) (each recomputes the scores above, from
    # L2) so that parallel programs write them instead of one program's serial loop (decode is
    # latency bound); with many rows each program does them all.
    n_nope = tl.cdiv(DH - R, BD)
    per = tl.cdiv(n_nope + 1, tl.num_programs(2))
    first = tl.program_id(2) * per
    for part in range(first, tl.minimum(first + per, n_nope + 1)):
        if part < n_nope:
            cols = part * BD + tl.arange(0, BD)  # the last block may reach into the RoPE dims
            kc = _keys(cache_ptr, new_ptr, crow, nrow, from_new, wmask, cols, DH)
            o = _pv(pr, kc, DOT_F32)
            tl.store(out_ptr + qrow[:, None] + cols[None, :], o.to(odt),
                     mask=hmask[:, None] & (cols < DH - R)[None, :])
        else:  # RoPE dims: even and odd halves separately, then the inverse rotation
            j = tl.arange(0, R // 2)
            ke = _keys(cache_ptr, new_ptr, crow, nrow, from_new, wmask, DH - R + 2 * j, DH)
            ko = _keys(cache_ptr, new_ptr, crow, nrow, from_new, wmask, DH - R + 2 * j + 1, DH)
            oe = _pv(pr, ke, DOT_F32)
            oo = _pv(pr, ko, DOT_F32)
            c = tl.load(cos_ptr + t * (R // 2) + j)[None, :]
            sn = tl.load(sin_ptr + t * (R // 2) + j)[None, :]
            re2, im2 = _rotate(oe, oo, c, -sn, odt)
            dst = out_ptr + qrow[:, None] + (DH - R + 2 * j)[None, :]
            tl.store(dst, re2, mask=hmask[:, None])
            tl.store(dst + 1, im2, mask=hmask[:, None])


def sink_attention(q: torch.Tensor, new_kv: torch.Tensor, sink: torch.Tensor, cos, sin,
                   window: int, *, cache_kv: torch.Tensor | None = None,
                   keys_index: torch.Tensor | None = None,
                   keys_valid: torch.Tensor | None = None,
                   positions: torch.Tensor | None = None, seq_slots: torch.Tensor | None = None,
                   cache_pos: torch.Tensor | None = None, tune: dict | None = None
                   ) -> torch.Tensor:
    """Attention of q [T, H, Dh] over each row's W keys, then the inverse RoPE -> [T, H, Dh].

    Keys: ``cat(cache_kv [S*C, Dh], new_kv [T, Dh])[keys_index]`` where ``keys_valid``; or, when
    ``keys_index`` is None (decode: one row per sequence, row t the only new row of slot
    ``seq_slots[t]``), the window read from ``cache_kv``/``cache_pos`` ([S, C]) by position.
    ``tune``: launch settings for benchmarks (``bh``: heads per program, ``bd``: head-dim block,
    ``warps``).
    """
    t, h, dh = q.shape
    r = 2 * cos.shape[1]
    out = torch.empty_like(q)
    if t == 0:
        return out
    decode = keys_index is None
    cache = cache_kv if cache_kv is not None else new_kv
    n_cached = cache_kv.shape[0] if cache_kv is not None else 0
    cap = cache_pos.shape[-1] if cache_pos is not None else 1
    dummy = positions if decode else keys_index
    tune = tune or {}
    many = _common.MANY_ROWS and not decode and t >= ATTN_MANY_T
    bh, bd = tune.get("bh", ATTN_MANY_BH if many else 16), tune.get("bd", 64)
    warps = tune.get("warps", 8 if bh > 16 else 4)
    blocks = t * triton.cdiv(h, bh)
    parts = triton.cdiv(dh - r, bd) + 1  # P @ V output blocks
    split = min(parts, max(1, sm_count(q.device) // blocks))  # few rows: spread the blocks
    sink_attention_kernel[(t, triton.cdiv(h, bh), split)](
        q, cache, new_kv, keys_index if not decode else dummy,
        keys_valid if not decode else dummy, positions if decode else dummy,
        seq_slots if decode else dummy, cache_pos if cache_pos is not None else dummy,
        sink, cos, sin, out, h, cap, n_cached, dh ** -0.5,
        W=window, WP=max(16, triton.next_power_of_2(window)), DH=dh, R=r, BH=bh, BD=bd,
        DECODE=decode, DOT_F32=q.dtype == torch.float32, num_warps=warps,
        **launch_opts())
    return out


@triton.jit
def cache_write_kernel(new_ptr, pos_ptr, rows_ptr, slots_ptr, seq_slot_ptr, cache_ptr, cpos_ptr,
                       C, DH: tl.constexpr, BD: tl.constexpr, DECODE: tl.constexpr):
    pdl_enter()
    i = tl.program_id(0)
    if DECODE:
        row = i
        s = tl.load(seq_slot_ptr + i)
        p = tl.load(pos_ptr + i)
        flat = s * C + p % C
    else:
        row = tl.load(rows_ptr + i)
        flat = tl.load(slots_ptr + i)
        s = flat
        p = tl.load(pos_ptr + row)
    if s >= 0:
        for d0 in tl.static_range(0, DH, BD):
            cols = d0 + tl.arange(0, BD)
            m = cols < DH  # DH need not be a power of two
            v = tl.load(new_ptr + row * DH + cols, mask=m)
            tl.store(cache_ptr + flat * DH + cols, v.to(cache_ptr.dtype.element_ty), mask=m)
        tl.store(cpos_ptr + flat, p.to(tl.int64))


def cache_write(new_kv, positions, cache_kv, cache_pos, *, rows=None, slots=None,
                seq_slots=None) -> None:
    """Write rows of new_kv [T, Dh] and their positions into the ring: explicit (rows, flat
    slots) from ``window_index``, or (decode) row t -> slot seq_slots[t], ring p % C."""
    dh = new_kv.shape[1]
    cap = cache_pos.shape[-1]
    decode = rows is None
    n = new_kv.shape[0] if decode else rows.shape[0]
    if n == 0:
        return
    dummy = positions
    cache_write_kernel[(n,)](new_kv, positions, rows if not decode else dummy,
                             slots if not decode else dummy,
                             seq_slots if decode else dummy, cache_kv, cache_pos, cap, DH=dh,
                             BD=min(512, triton.next_power_of_2(dh)), DECODE=decode,
                             num_warps=4, **launch_opts())

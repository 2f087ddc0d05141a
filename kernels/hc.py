"""Hyper-connections and RMSNorm, fused (``mtp.ops.hc_pre`` / ``hc_post`` / ``hc_head`` /
``rms_norm``).

hc_pre is two launches: :func:`hc_mix_kernel` computes the (2+M)M mixes of the flattened
streams and their sum of squares in split-K partials (fn is read once per row block, by many
programs); :func:`hc_finish_kernel` (one program per row) sums the partials in a fixed order,
applies the sigmoids and the Sinkhorn iterations, collapses the M streams and applies the
block's RMSNorm, writing the normalised block input, post and comb. hc_head is the same pair with
M mixes. hc_post is one elementwise kernel that can also do the MoE's final sum (routed experts
in ascending expert order, as ``index_add_`` does, plus the shared expert).
:func:`embed_norms` is the layer's start in one launch: the embedding lookup and both input
RMSNorms (enorm of the embedded rows, hnorm of the hidden rows).

Shape legend: T rows, M hc_mult, D hidden, F mix rows ((2+M)M, or M for the head).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _common, scaled_mm
from ._common import (
    e8m0_as_torch,
    even_odd8,
    exp2_int,
    fp8_round,
    launch_opts,
    pdl_enter,
    pow2_scale_bits,
    rms_row,
    store_fp8_row,
)

_MIX_BK = 128
_MIX_BT = 16
MIX_PROGRAMS = 128  # hc_mix: split-K programs per block of rows (hc_finish sums their partials)
# Above this many rows (a catch-up) the mixes are one cuBLAS float32 product instead of
# hc_mix (~150 us per call at 512 rows, with 128 or 512 programs alike; kernels/NOTES.md,
# catch-up), handed to hc_finish as a single partial.
MIX_MANY_T = 64
# ... and above it, for bfloat16 streams: hc_mix_many (hc_mix_kernel's SPLIT3: one pass over
# the rows on the tensor cores, fn split into three bfloat16 parts: the products exact, the
# sums in float32) instead of the cuBLAS product and the three torch operations around it
# (~0.1 ms at Flash's 512 rows on an H100, for ~6 us of bytes: kernels/NOTES.md, "The
# catch-up's timeline").
# Measured inside the graphs (ab_drafter.py's "mix-many-kernel": 1.4-4.1% off the catch-ups on
# an H100, 1.7-4.3% on an H200; docs/performance.md). False: the cuBLAS product.
MIX_MANY_KERNEL = True
_MANY_BT, _MANY_BK = 64, 128  # its rows per program and columns per step
POST_MIX_T = 4  # hc_post computes the next mixes itself for up to this many rows (no hc_mix)
_POST_MIX_BD = 128  # ... with column blocks this wide (D/128 programs per row)
FINISH_WARPS = 4  # hc_finish: warps per row's program (8 for rows over 4096)


@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_o, eps, BD: tl.constexpr):
    """One row: (x * rsqrt(mean(x^2) + eps)) * w, rounded to out's dtype (``ops.rms_norm``)."""
    pdl_enter()
    r = tl.program_id(0)
    offs = tl.arange(0, BD)
    mask = offs < D
    x = tl.load(x_ptr + r * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    y = rms_row(x, tl.load(w_ptr + offs, mask=mask, other=0.0), D, eps)
    tl.store(out_ptr + r * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def embed_norms_kernel(ids_ptr, pos_ptr, emb_ptr, h_ptr, ew_ptr, hw_ptr, en_ptr, hn_ptr, es_ptr,
                       hs_ptr, ws0_ptr, ws1_ptr, wf_ptr, T, T_OUT, R, R_OUT, D, NW, eps,
                       ZERO_POS0: tl.constexpr, BD: tl.constexpr, EN_FP8: tl.constexpr,
                       HN_FP8: tl.constexpr, WSCALES: tl.constexpr, BW: tl.constexpr):
    """Program r < T_OUT: the embedding row of ids[r] (zero at position 0 with ZERO_POS0), its
    RMSNorm (enorm) into en[r]; program T_OUT + j < T_OUT + R_OUT: hidden row j's RMSNorm
    (hnorm) into hn[j]. With EN_FP8 / HN_FP8 that output is written as cuBLAS reads it
    (``store_fp8_row``: the bf16 result's FP8 rounding; rows past T / R, up to the padded
    T_OUT / R_OUT, zero codes); with WSCALES the last WSCALES (1 or 2) programs each convert
    one of the products' E8M0 weight scales (ws0, ws1: NW bytes each) to float32 (wf[i])."""
    pdl_enter()
    r = tl.program_id(0)
    if WSCALES and r >= T_OUT + R_OUT:
        i = r - T_OUT - R_OUT
        nb = tl.arange(0, BW)
        if i == 0:
            b = tl.load(ws0_ptr + nb, mask=nb < NW, other=127)
        else:
            b = tl.load(ws1_ptr + nb, mask=nb < NW, other=127)
        tl.store(wf_ptr + i * NW + nb, e8m0_as_torch(b.to(tl.int32)), mask=nb < NW)
    else:
        offs = tl.arange(0, BD)
        mask = offs < D
        # a padding row (past T or R, below a rounded output's T_OUT or R_OUT) reads the last
        # row and drops it
        if r < T_OUT:
            rr = r
            if EN_FP8:
                rr = tl.minimum(r, T - 1)
            row = tl.load(ids_ptr + rr).to(tl.int64)
            x = tl.load(emb_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
            if ZERO_POS0:
                x = tl.where(tl.load(pos_ptr + rr) == 0, 0.0, x)
            if EN_FP8:
                x = tl.where(r < T, x, 0.0)
            w = tl.load(ew_ptr + offs, mask=mask, other=0.0)
            if EN_FP8 or HN_FP8:
                out = emb_ptr  # (not written through)
            else:
                out = en_ptr + r * D
        else:
            j = r - T_OUT
            jj = j
            if HN_FP8:
                jj = tl.minimum(j, R - 1)
            x = tl.load(h_ptr + jj * D + offs, mask=mask, other=0.0).to(tl.float32)
            if HN_FP8:
                x = tl.where(j < R, x, 0.0)
            w = tl.load(hw_ptr + offs, mask=mask, other=0.0)
            if EN_FP8 or HN_FP8:
                out = emb_ptr
            else:
                out = hn_ptr + j * D
        y = rms_row(x, w, D, eps).to(emb_ptr.dtype.element_ty)
        if not (EN_FP8 or HN_FP8):  # (then the launch as before the rounded outputs)
            tl.store(out + offs, y, mask=mask)
        elif r < T_OUT:
            if EN_FP8:
                store_fp8_row(en_ptr, es_ptr, r, T_OUT, y.to(tl.float32), D, BD)
            else:
                tl.store(en_ptr + r * D + offs, y, mask=mask)
        else:
            if HN_FP8:
                store_fp8_row(hn_ptr, hs_ptr, r - T_OUT, R_OUT, y.to(tl.float32), D, BD)
            else:
                tl.store(hn_ptr + (r - T_OUT) * D + offs, y, mask=mask)


def embed_norms(ids: torch.Tensor, positions: torch.Tensor, embed: torch.Tensor,
                h: torch.Tensor, enorm_w: torch.Tensor, hnorm_w: torch.Tensor, eps: float, *,
                zero_pos0: bool, fp8: tuple = (None, None)):
    """The MTP layer's two input norms in one launch: (rms_norm(embed[ids] (zero where
    positions == 0 if ``zero_pos0``), enorm_w), rms_norm(h, hnorm_w)): ids, positions [T],
    embed [V, D], h [R, D] contiguous in embed's dtype (bfloat16 where ``fp8`` asks) -> ([T,
    D], [R, D]).

    ``fp8`` (for en, for hn): None, or the E8M0 scales [N/128, D/128] (contiguous) of the
    weight the output is the input of: then that output is a ``scaled_mm.FP8Rows`` instead,
    the rounding its cuBLAS product takes (``quant_fp8`` of the bf16 result, bit for bit)
    with the weight's scales as float32, all from the same launch.

    Example:
        >>> en, hn = embed_norms(ids, pos, embed, h, enorm_w, hnorm_w, 1e-6, zero_pos0=True,
        ...                      fp8=(e_proj.weight_scale_inv, h_proj.weight_scale_inv))
    """
    t, (r, d) = ids.shape[0], h.shape
    dev = h.device
    ws = [s for s in fp8 if s is not None]  # the weights' scales, in (en, hn) order
    if ws and (embed.dtype != torch.bfloat16 or d % 128
               or any(s.dtype != torch.float8_e8m0fnu or not s.is_contiguous()
                      or s.shape != ws[0].shape or s.shape[1] * 128 != d for s in ws)):
        raise ValueError(f"embed_norms: fp8 outputs take bfloat16 rows and contiguous E8M0 "
                         f"weight scales of one shape [N/128, {d // 128}], got {embed.dtype} "
                         f"and {[(s.dtype, list(s.shape)) for s in ws]}")

    def output(n, scale):  # (values or codes [n_out, D], scales [D/128, n_out] or None, n_out)
        if scale is None:
            return torch.empty(n, d, dtype=embed.dtype, device=dev), None, n
        n_out = scaled_mm.padded_rows(n)
        return (torch.empty(n_out, d, dtype=torch.float8_e4m3fn, device=dev),
                torch.empty(d // 128, n_out, dtype=torch.float32, device=dev), n_out)

    (en, es, t_out), (hn, hs, r_out) = output(t, fp8[0]), output(r, fp8[1])
    nw = ws[0].numel() if ws else 0
    wf = torch.empty(len(ws), nw, dtype=torch.float32, device=dev) if ws else en  # (unread)
    # the scales as bytes (one weight's twice where one converts; none: unread)
    w0, w1 = ([s.view(torch.uint8) for s in ws] * 2)[:2] if ws else (en, en)
    programs = t_out + r_out + len(ws)
    if programs:
        bd = triton.next_power_of_2(d)
        embed_norms_kernel[(programs,)](
            ids, positions, embed, h, enorm_w, hnorm_w, en, hn, en if es is None else es,
            hn if hs is None else hs, w0, w1, wf, t, t_out, r, r_out, d, nw, eps,
            ZERO_POS0=zero_pos0, BD=bd, EN_FP8=es is not None, HN_FP8=hs is not None,
            WSCALES=len(ws), BW=triton.next_power_of_2(max(1, nw)),
            num_warps=4 if bd <= 4096 else 8, **launch_opts())
    wf_of = iter(wf.view(len(ws), *ws[0].shape) if ws else ())
    return tuple(out if s is None else scaled_mm.FP8Rows(out, s.t(), n, next(wf_of))
                 for out, s, n in ((en, es, t), (hn, hs, r)))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, D] (rows may be strided) -> [R, D] contiguous, x's dtype."""
    r, d = x.shape
    if out is None:
        out = torch.empty(r, d, dtype=x.dtype, device=x.device)
    bd = triton.next_power_of_2(d)
    rmsnorm_kernel[(r,)](x, weight, out, d, x.stride(0), out.stride(0), eps, BD=bd,
                         num_warps=4 if bd <= 4096 else 8, **launch_opts())
    return out


@triton.jit
def hc_mix_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, T, KT, F, chunk,
                  FP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  SPLIT3: tl.constexpr = False):
    """Partial (z @ fn^T, sum z^2) over one chunk of z = flatten(x[t]) for a block of rows.
    With SPLIT3 (bfloat16 z, for many rows: ``hc_mix_many``) on the tensor cores: fn = f1 +
    f2 + f3 with each f_i bfloat16 (the leading 8 mantissa bits, then the next 8 of what is
    left, then the rest: 24 bits, exact for fn's normal values), so each z * f_i is exact in
    float32 and three bfloat16 dots sum them in float32 (an IEEE float32 product's sums in
    another order, each step within one ulp: the tensor cores' accumulation truncates)."""
    pdl_enter()
    tb = tl.program_id(0)
    s = tl.program_id(1)
    rows = tb * BT + tl.arange(0, BT)
    rmask = rows < T
    fr = tl.arange(0, FP)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BT, FP], dtype=tl.float32)
    sq = tl.zeros([BT], dtype=tl.float32)
    k_end = tl.minimum(s * chunk + chunk, KT)
    if SPLIT3:  # any number of rows: T * KT may pass 2^31
        zrow = rows[:, None].to(tl.int64) * KT
    else:
        zrow = rows[:, None] * KT
    for k0 in range(s * chunk, k_end, BK):
        z = tl.load(x_ptr + zrow + k0 + kk[None, :], mask=rmask[:, None], other=0.0)
        if not SPLIT3:
            z = z.to(tl.float32)
        f = tl.load(fn_ptr + fr[None, :] * KT + k0 + kk[:, None], mask=fr[None, :] < F,
                    other=0.0)  # [BK, FP] float32
        if SPLIT3:
            f1 = f.to(tl.bfloat16)
            r1 = f - f1.to(tl.float32)  # exact: f1 is f rounded to 8 bits
            f2 = r1.to(tl.bfloat16)
            f3 = (r1 - f2.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(z, f1, acc)
            acc = tl.dot(z, f2, acc)
            acc = tl.dot(z, f3, acc)
            z = z.to(tl.float32)
        else:
            acc += tl.dot(z, f, input_precision="ieee")
        sq += tl.sum(z * z, axis=1)
    tl.store(part_ptr + (s * T + rows[:, None]) * FP + fr[None, :], acc, mask=rmask[:, None])
    tl.store(sq_ptr + s * T + rows, sq, mask=rmask)


def hc_mix_many(z: torch.Tensor, fn: torch.Tensor, fp: int, *, split: int | None = None):
    """The mixes of many bfloat16 rows as split-K partials: z [T, KT] bfloat16 contiguous, fn
    [F, KT] float32 -> (part [S, T, FP] float32, sq [S, T] float32, S): summed over S they
    are (z @ fn^T padded to FP columns, sum z^2). ``split``: S (default: two programs per
    multiprocessor, at most 64 partials for hc_finish to sum)."""
    t, kt = z.shape
    f = fn.shape[0]
    if z.dtype != torch.bfloat16 or not z.is_contiguous() or kt % _MANY_BK or fp < max(16, f):
        raise ValueError(f"hc_mix_many: contiguous bfloat16 [T, KT] rows with KT a multiple of "
                         f"{_MANY_BK} and FP >= max(16, F) expected, got {z.dtype} "
                         f"{list(z.shape)} FP={fp} F={f}")
    tb = triton.cdiv(t, _MANY_BT)
    n_k = kt // _MANY_BK
    if split is None:
        split = max(1, min(n_k, 64, triton.cdiv(2 * _common.sm_count(z.device), tb)))
    per = triton.cdiv(n_k, split)
    split = triton.cdiv(n_k, per)  # no empty chunk
    part = torch.empty(split, t, fp, dtype=torch.float32, device=z.device)
    sq = torch.empty(split, t, dtype=torch.float32, device=z.device)
    hc_mix_kernel[(tb, split)](z, fn, part, sq, t, kt, f, per * _MANY_BK, FP=fp, BT=_MANY_BT,
                               BK=_MANY_BK, SPLIT3=True, num_warps=4, **launch_opts())
    return part, sq, split


@triton.jit
def _mix(part_ptr, T, t, offs, n_split, FP: tl.constexpr, SP: tl.constexpr):
    """Sum over the split partials (all loads in flight at once, fixed order of the tree)."""
    s = tl.arange(0, SP)
    if len(offs.shape) == 1:
        v = tl.load(part_ptr + (s[:, None] * T + t) * FP + offs[None, :],
                    mask=(s < n_split)[:, None], other=0.0)
    else:
        v = tl.load(part_ptr + (s[:, None, None] * T + t) * FP + offs[None, :, :],
                    mask=(s < n_split)[:, None, None], other=0.0)
    return tl.sum(v, axis=0)


@triton.jit
def _row_rs(sq_ptr, T, t, n_split, D, eps, M: tl.constexpr, SP: tl.constexpr):
    """hc's 1 / rms of row t of x from the n_split partial sums of squares."""
    sp = tl.arange(0, SP)
    sq = tl.sum(tl.load(sq_ptr + sp * T + t, mask=sp < n_split, other=0.0), axis=0)
    return tl.rsqrt(sq / (M * D) + eps)


@triton.jit
def _post_comb(part_ptr, rs, scale_ptr, base_ptr, post_ptr, comb_ptr, T, t, n_split, iters,
               hc_eps, M: tl.constexpr, FP: tl.constexpr, SP: tl.constexpr):
    """hc_pre's post [M] and comb [M, M] (the Sinkhorn's serial iterations) of row t, stored."""
    mm = tl.arange(0, M)
    post_mix = _mix(part_ptr, T, t, M + mm, n_split, FP, SP) * rs
    post = 2.0 * tl.sigmoid(post_mix * tl.load(scale_ptr + 1) + tl.load(base_ptr + M + mm))
    tl.store(post_ptr + t * M + mm, post)
    cidx = mm[:, None] * M + mm[None, :]
    c = _mix(part_ptr, T, t, 2 * M + cidx, n_split, FP, SP) * rs
    c = c * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * M + cidx)
    c = tl.exp(c - tl.max(c, axis=1)[:, None])
    c = c / tl.sum(c, axis=1)[:, None] + hc_eps
    c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    for _ in range(iters - 1):
        c = c / (tl.sum(c, axis=1)[:, None] + hc_eps)
        c = c / (tl.sum(c, axis=0)[None, :] + hc_eps)
    tl.store(comb_ptr + t * M * M + cidx, c)


@triton.jit
def hc_finish_kernel(part_ptr, sq_ptr, x_ptr, scale_ptr, base_ptr, normw_ptr, post_ptr, comb_ptr,
                     u_ptr, q_ptr, xh_ptr, xs_ptr, cq_ptr, cs_ptr, ws_ptr, wf_ptr, T, T_OUT, NW,
                     D, n_split, iters, eps, hc_eps, norm_eps,
                     M: tl.constexpr, FP: tl.constexpr, SP: tl.constexpr, BD: tl.constexpr,
                     HEAD: tl.constexpr, QUANT: tl.constexpr, QROWS: tl.constexpr,
                     CUBLAS: tl.constexpr = False, BW: tl.constexpr = 1,
                     COMB: tl.constexpr = True):
    """One row: mixes -> pre (and, with COMB, post and the Sinkhorn comb: else
    ``hc_comb_kernel`` makes them) -> collapse -> RMSNorm; with QUANT also
    the FP8 activation rounding of the result (``fp8_simulate``, blocks of 128) into q, and
    with QROWS the same rounding in ``moe.quant_rows``' layout into xh, xs. With CUBLAS the
    rounding as cuBLAS reads it (``store_fp8_row``) into cq, cs, program 0 also writing the
    padding rows T..T_OUT (zero codes) and the next product's E8M0 weight scales (ws, NW
    bytes) as float32 (wf). (Not extra programs that return early: on an H200 the padding
    rows' stores of such a branch did not reach memory, where the interpreter's did.)"""
    pdl_enter()
    t = tl.program_id(0)
    mm = tl.arange(0, M)
    # the row and the norm weight first: their loads overlap the partials' and the Sinkhorn
    dd = tl.arange(0, BD)
    dmask = dd < D
    x = tl.load(x_ptr + (t * M + mm[:, None]) * D + dd[None, :], mask=dmask[None, :],
                other=0.0).to(tl.float32)
    w = tl.load(normw_ptr + dd, mask=dmask, other=0.0)
    rs = _row_rs(sq_ptr, T, t, n_split, D, eps, M, SP)
    pre_mix = _mix(part_ptr, T, t, mm, n_split, FP, SP) * rs
    pre = tl.sigmoid(pre_mix * tl.load(scale_ptr) + tl.load(base_ptr + mm)) + hc_eps
    if not HEAD:
        if COMB:
            _post_comb(part_ptr, rs, scale_ptr, base_ptr, post_ptr, comb_ptr, T, t, n_split,
                       iters, hc_eps, M, FP, SP)
    y = tl.sum(pre[:, None] * x, axis=0)
    y = y.to(u_ptr.dtype.element_ty).to(tl.float32)
    r = tl.rsqrt(tl.sum(y * y, axis=0) / D + norm_eps)
    u = (w * (y * r)).to(u_ptr.dtype.element_ty)
    tl.store(u_ptr + t * D + dd, u, mask=dmask)
    if CUBLAS:
        store_fp8_row(cq_ptr, cs_ptr, t, T_OUT, u.to(tl.float32), D, BD)
        if t == 0:
            for p in range(T, T_OUT):
                store_fp8_row(cq_ptr, cs_ptr, p, T_OUT, tl.zeros([BD], dtype=tl.float32), D, BD)
            nb = tl.arange(0, BW)
            b = tl.load(ws_ptr + nb, mask=nb < NW, other=127).to(tl.int32)
            tl.store(wf_ptr + nb, e8m0_as_torch(b), mask=nb < NW)
    if QUANT:  # the consumers that round u read this instead (e4m3 x 2^e: exact in u's dtype)
        ub = tl.reshape(u.to(tl.float32), (BD // 128, 128))  # [BD] -> [blocks, 128]
        e = pow2_scale_bits(tl.max(tl.abs(ub), axis=1))
        qv = fp8_round(ub, e)
        qb = tl.reshape(qv * exp2_int(e)[:, None], (BD,))
        tl.store(q_ptr + t * D + dd, qb.to(u_ptr.dtype.element_ty), mask=dmask)
        if QROWS:  # as quant_rows_kernel
            tl.store(xh_ptr + t * D + dd, even_odd8(qv, BD).to(tl.float16), mask=dmask)
            b = tl.arange(0, BD // 128)
            tl.store(xs_ptr + t * (D // 128) + b, exp2_int(e), mask=b < D // 128)


@triton.jit
def hc_comb_kernel(part_ptr, sq_ptr, scale_ptr, base_ptr, post_ptr, comb_ptr, rows_ptr, T, D,
                   n_split, iters, eps, hc_eps, M: tl.constexpr, FP: tl.constexpr,
                   SP: tl.constexpr, ROWS: tl.constexpr):
    """One row's post and comb alone (``hc_finish_kernel``'s, the same code): launched on a
    side stream while the row's norm and what reads it go on. With ROWS program i makes row
    ``rows[i]``'s, else row i's."""
    pdl_enter()
    t = tl.load(rows_ptr + tl.program_id(0)) if ROWS else tl.program_id(0)
    rs = _row_rs(sq_ptr, T, t, n_split, D, eps, M, SP)
    _post_comb(part_ptr, rs, scale_ptr, base_ptr, post_ptr, comb_ptr, T, t, n_split, iters,
               hc_eps, M, FP, SP)


def _mix_partials(x: torch.Tensor, fn: torch.Tensor):
    t, m, d = x.shape
    kt = m * d
    f = fn.shape[0]
    fp = max(16, triton.next_power_of_2(f))
    tb = triton.cdiv(t, _MIX_BT)
    n_k = kt // _MIX_BK
    if _common.MANY_ROWS and t > MIX_MANY_T and x.is_cuda:
        if MIX_MANY_KERNEL and x.dtype == torch.bfloat16:
            part, sq, n_split = hc_mix_many(x.view(t, kt), fn, fp)  # [T, M, D] -> [T, M*D]
            return part, sq, n_split, fp
        # IEEE float32 like hc_mix (cuBLAS, unless the user allowed TF32 for float32 matmuls)
        z = x.view(t, kt).float()  # [T, M, D] -> [T, M*D]
        part = F.pad(torch.mm(z, fn.t()), (0, fp - f)).unsqueeze(0)  # [1, T, FP]
        return part, z.square().sum(1).unsqueeze(0), 1, fp
    n_split = max(1, min(n_k, MIX_PROGRAMS // tb))
    per = triton.cdiv(n_k, n_split)
    n_split = triton.cdiv(n_k, per)
    part = torch.empty(n_split, t, fp, dtype=torch.float32, device=x.device)
    sq = torch.empty(n_split, t, dtype=torch.float32, device=x.device)
    hc_mix_kernel[(tb, n_split)](x, fn, part, sq, t, kt, f, per * _MIX_BK, FP=fp, BT=_MIX_BT,
                                 BK=_MIX_BK, num_warps=4, **launch_opts())
    return part, sq, n_split, fp


def _warps(bd: int) -> int:
    return FINISH_WARPS if bd <= 4096 else 2 * FINISH_WARPS


def hc_pre_norm(x: torch.Tensor, fn, scale, base, norm_weight, iters: int, hc_eps: float,
                eps: float, *, act_quant: bool = False, quant_rows: bool = False,
                partials: tuple | None = None, fp8: torch.Tensor | None = None,
                side_stream: torch.cuda.Stream | None = None,
                comb_rows: torch.Tensor | None = None):
    """``RMSNorm(hc_pre(x)[0])`` and hc_pre's post, comb: x [T, M, D] ->
    (u [T, D] x's dtype, post [T, M] fp32, comb [T, M, M] fp32); with ``act_quant`` a fourth
    result, ``fp8_simulate(u, 128)`` (what every FP8 product of u rounds it to), and with
    ``quant_rows`` too a fifth and sixth: ``moe.quant_rows`` of it (xh, xs: the CUDA expert
    kernels' input), written by the same kernel. ``partials``: x's mix partials from
    ``hc_post(..., mix_fn=fn)`` (else computed here by hc_mix). ``fp8`` (bfloat16 x, not with
    ``act_quant``): the E8M0 scales [N/128, D/128] (contiguous) of the weight u is the input
    of; the fourth result is then u rounded for that product's cuBLAS call
    (``scaled_mm.FP8Rows``, ``quant_fp8`` of u bit for bit, the weight's float32 scales
    included), from the same launch. ``side_stream`` (CUDA): post and comb are made there
    (the Sinkhorn's serial iterations off the norm's path: only hc_post reads them, later),
    after the work queued so far on the current stream; the caller makes the current stream
    wait for ``side_stream`` before reading them. ``comb_rows`` [S] int64 (with
    ``side_stream``): the rows whose post and comb are read (a catch-up's last rows); the
    others' are not made (left unwritten)."""
    t, m, d = x.shape
    if d % _MIX_BK:
        raise ValueError(f"hc_pre_norm: hidden size {d} is not a multiple of {_MIX_BK}")
    if quant_rows and not act_quant:
        raise ValueError("hc_pre_norm: quant_rows=True needs act_quant=True (it is the rounding)")
    if fp8 is not None and (act_quant or x.dtype != torch.bfloat16
                            or fp8.dtype != torch.float8_e8m0fnu or not fp8.is_contiguous()
                            or fp8.shape[1] * 128 != d):
        raise ValueError(f"hc_pre_norm: fp8 takes bfloat16 rows, no act_quant, and the "
                         f"contiguous E8M0 scales [N/128, {d // 128}] of the next weight; got "
                         f"{x.dtype} rows, act_quant={act_quant}, scales {fp8.dtype} "
                         f"{list(fp8.shape)}")
    x = x.contiguous()
    part, sq, n_split, fp = partials or _mix_partials(x, fn)
    u = torch.empty(t, d, dtype=x.dtype, device=x.device)
    post = torch.empty(t, m, dtype=torch.float32, device=x.device)
    comb = torch.empty(t, m, m, dtype=torch.float32, device=x.device)
    q = torch.empty_like(u) if act_quant else u
    if quant_rows:
        xh = torch.empty(t, d, dtype=torch.float16, device=x.device)
        xs = torch.empty(t, d // 128, dtype=torch.float32, device=x.device)
    else:
        xh, xs = u, post  # not written
    t_out, nw = t, 0
    cq = cs = ws = wf = u  # (not written or read without fp8)
    if fp8 is not None:
        t_out, nw = scaled_mm.padded_rows(t), fp8.numel()
        cq = torch.empty(t_out, d, dtype=torch.float8_e4m3fn, device=x.device)
        cs = torch.empty(d // 128, t_out, dtype=torch.float32, device=x.device)
        ws, wf = fp8.view(torch.uint8), torch.empty(fp8.shape, dtype=torch.float32,
                                                    device=x.device)
    bd = triton.next_power_of_2(d)
    sp = triton.next_power_of_2(n_split)
    apart = side_stream is not None and t > 0
    if apart:  # fork: the side stream waits for the partials, then makes post and comb
        some = comb_rows is not None
        if some:  # (the forward's out_rows are already: no launch)
            comb_rows = comb_rows.to(torch.int64).contiguous().view(-1)
        side_stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side_stream):
            n = comb_rows.numel() if some else t
            if n:
                hc_comb_kernel[(n,)](part, sq, scale, base, post, comb,
                                     comb_rows if some else post, t, d, n_split, iters, eps,
                                     hc_eps, M=m, FP=fp, SP=sp, ROWS=some,
                                     num_warps=_warps(bd), **launch_opts())
        if some:
            comb_rows.record_stream(side_stream)
        for a in (part, sq, post, comb):  # (the allocator's: not reused before it is done)
            a.record_stream(side_stream)
    if t:
        hc_finish_kernel[(t,)](
            part, sq, x, scale, base, norm_weight, post, comb, u, q, xh, xs, cq, cs, ws, wf, t,
            t_out, nw, d, n_split, iters, eps, hc_eps, eps, M=m, FP=fp,
            SP=sp, BD=bd, HEAD=False, QUANT=act_quant,
            QROWS=quant_rows, CUBLAS=fp8 is not None, BW=triton.next_power_of_2(max(1, nw)),
            COMB=not apart, num_warps=_warps(bd), **launch_opts())
    if fp8 is not None:
        if not t:  # (no program to convert them)
            wf = fp8.float()
        return u, post, comb, scaled_mm.FP8Rows(cq, cs.t(), t, wf)
    if quant_rows:
        return u, post, comb, q, xh, xs
    return (u, post, comb, q) if act_quant else (u, post, comb)


def hc_head_norm(x: torch.Tensor, fn, scale, base, norm_weight, hc_eps: float, eps: float, *,
                 partials: tuple | None = None):
    """``RMSNorm_norm(hc_head(x))``: x [T, M, D] -> [T, D] in x's dtype (``partials``: as
    ``hc_pre_norm``'s)."""
    t, m, d = x.shape
    x = x.contiguous()
    part, sq, n_split, fp = partials or _mix_partials(x, fn)
    u = torch.empty(t, d, dtype=x.dtype, device=x.device)
    bd = triton.next_power_of_2(d)
    hc_finish_kernel[(t,)](part, sq, x, scale, base, norm_weight, u, u, u, u, u, u, u, u, u, u,
                           t, t, 0, d, n_split, 1, eps, hc_eps, eps, M=m, FP=fp,
                           SP=triton.next_power_of_2(n_split), BD=bd, HEAD=True, QUANT=False,
                           QROWS=False, num_warps=_warps(bd), **launch_opts())
    return u


@triton.jit
def hc_post_kernel(a_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, pair_ptr, idx_ptr, shared_ptr,
                   fn_ptr, part_ptr, sq_ptr, D, F,
                   M: tl.constexpr, MOE: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                   BD: tl.constexpr, MIX: tl.constexpr, FP: tl.constexpr):
    """out[k] = post[k] * a + sum_j comb[j, k] * res[j]. With MOE, a = (sum of the row's routed
    expert outputs in ascending expert order, in fp32, + shared expert) rounded. With MIX also
    the next hc_pre's partial mixes over this program's columns of flatten(out[t]) (as
    hc_mix_kernel: the partials fn @ z and sum z^2, split by column block instead of chunk)."""
    pdl_enter()
    t = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    odt = out_ptr.dtype.element_ty
    if MOE:
        kk = tl.arange(0, KP)
        kmask = kk < TOPK
        ids = tl.load(idx_ptr + t * TOPK + kk, mask=kmask, other=2147483647)
        rank = tl.sum((ids[None, :] < ids[:, None]).to(tl.int32), axis=1)  # position in order
        vals = tl.load(pair_ptr + (t * TOPK + kk)[:, None] * D + dd[None, :],
                       mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        routed = tl.zeros([BD], dtype=tl.float32)
        for r in tl.static_range(TOPK):
            routed += tl.sum(tl.where((rank == r)[:, None], vals, 0.0), axis=0)
        sh = tl.load(shared_ptr + t * D + dd, mask=dmask, other=0.0).to(tl.float32)
        a = (routed + sh).to(odt).to(tl.float32)
    else:
        a = tl.load(a_ptr + t * D + dd, mask=dmask, other=0.0).to(tl.float32)
    if MIX:
        fr = tl.arange(0, FP)
        macc = tl.zeros([FP], dtype=tl.float32)
        sq = tl.sum(tl.zeros([BD], dtype=tl.float32), axis=0)
    for k in tl.static_range(M):
        # sum_j comb[j, k] * res[j] in ascending j, one element per lane: the same bits for
        # every block size BD (a tl.sum over j would follow the layout's reduction tree);
        # the rows are re-read per k from L1
        mixed = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(M):
            r = tl.load(res_ptr + (t * M + j) * D + dd, mask=dmask, other=0.0).to(tl.float32)
            mixed += tl.load(comb_ptr + t * M * M + j * M + k) * r
        y = (tl.load(post_ptr + t * M + k) * a + mixed).to(odt)
        tl.store(out_ptr + (t * M + k) * D + dd, y, mask=dmask)
        if MIX:  # z = flatten(out[t]): column k * D + d; the stored (rounded) values
            z = tl.where(dmask, y.to(tl.float32), 0.0)
            f = tl.load(fn_ptr + fr[:, None] * (M * D) + k * D + dd[None, :],
                        mask=(fr < F)[:, None] & dmask[None, :], other=0.0)
            macc += tl.sum(f * z[None, :], axis=1)
            sq += tl.sum(z * z, axis=0)
    if MIX:
        s = tl.program_id(1)
        tl.store(part_ptr + (s * tl.num_programs(0) + t) * FP + fr, macc)
        tl.store(sq_ptr + s * tl.num_programs(0) + t, sq)


def hc_post(a: torch.Tensor | None, residual: torch.Tensor, post: torch.Tensor,
            comb: torch.Tensor, *, moe: tuple | None = None, mix_fn: torch.Tensor | None = None):
    """``ops.hc_post``: a [T, D], residual [T, M, D] -> (out [T, M, D] in residual's dtype,
    partials). ``moe=(pair_out [T*K, D], idx [T, K], shared [T, D])`` replaces ``a`` by the
    MoE sum. ``mix_fn`` [F, M*D]: partials are also the next hc_pre's mix partials of out, for
    ``hc_pre_norm`` / ``hc_head_norm``'s ``partials`` (no hc_mix launch; each program reads
    fn's columns for its block, so for few rows only: ``POST_MIX_T``); else None."""
    t, m, d = residual.shape
    out = torch.empty_like(residual)
    mix = mix_fn is not None
    bd = _POST_MIX_BD if mix else 1024
    n_split = triton.cdiv(d, bd)
    f = mix_fn.shape[0] if mix else 1
    fp = max(16, triton.next_power_of_2(f))
    if mix:
        part = torch.empty(n_split, t, fp, dtype=torch.float32, device=out.device)
        sq = torch.empty(n_split, t, dtype=torch.float32, device=out.device)
    else:
        mix_fn = part = sq = post  # not read
    if moe is not None:
        pair_out, idx, shared = moe
        topk = idx.shape[1]
        hc_post_kernel[(t, n_split)](shared, residual, post, comb, out, pair_out, idx, shared,
                                     mix_fn, part, sq, d, f, M=m, MOE=True, TOPK=topk,
                                     KP=triton.next_power_of_2(topk), BD=bd, MIX=mix, FP=fp,
                                     num_warps=4, **launch_opts())
    else:
        hc_post_kernel[(t, n_split)](a, residual, post, comb, out, a, a, a, mix_fn, part, sq, d,
                                     f, M=m, MOE=False, TOPK=1, KP=1, BD=bd, MIX=mix, FP=fp,
                                     num_warps=4, **launch_opts())
    return out, ((part, sq, n_split, fp) if mix else None)

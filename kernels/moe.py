"""Routed experts: the gate's product (:func:`gate_logits`: one kernel for a few rows), its
scoring and top-k, and grouped FP4 expert products over the (token, expert) pairs, with fixed
shapes (no host sync, CUDA-graph friendly).

Work is cut into tiles of up to ``BM`` pairs that share one expert; a tile reads that expert's
weights once. ``tile_pairs`` [n_tiles * BM] lists the pair ids (t * K + k, -1 for padding) and
``tile_expert`` [n_tiles] the expert (>= E: an empty tile). For a few rows every pair is its own
tile (no sorting at all: the tiles are fixed and ``tile_expert`` is the routing itself); for many
rows pairs are sorted by expert on the device (:func:`align_tiles`, one kernel), bounded by
``n_tiles <= ceil(P / BM) + min(P, E)`` so the grid is known without looking at the routing.
(The CUDA expert kernels, ``moe_cuda``, take tiles of 8 slots: ``align_tiles(..., bm=8)``.)

- :func:`moe_w13`: per tile and block of I columns: gate (w1) and up (w3) products (the
  activation FP8 rounding fused, or the input rounded ahead: ``rounded``), both rounded to the
  compute dtype, the clamped SwiGLU and the routing weight -> the w2 input ``act`` (as
  ``mtp.ops.routed_experts``: weight before w2).
- :func:`round_rows`: the w2 input's FP8 rounding, once per pair row; :func:`quant_rows` the
  same rounding split into exact float16 values and scales, the CUDA kernels' input.
- :func:`moe_w2`: per tile and block of D: the down product, written per pair.
The final sum (ascending expert order, plus the shared expert) is fused into ``hc.hc_post``.

e2m1 weights: bytes [.., n, k/2], the even input in the low nibble; per-32 E8M0 scales.
``DECODES``: the hand decodes split a 128-input block into two dots, even and odd inputs, and
build exact float bits per code (``f32``: float32 bits, five integer ops per code; ``f16x2``:
float16 bits for 8 codes per register op in inline PTX, ``_common``), then two exact multiplies
(to the code's value, by the block scale), the dots taking the values as bf16 (exact); ``mx``
hands bytes and scales to Triton's microscaling dot (``tl.dot_scaled``). The hand-written
``moe_cuda`` kernels are faster where they run (bandwidths: ``kernels/NOTES.md``, rounds 3
and 4).

Shape legend: T rows, K experts per row, P = T*K pairs, E experts, D hidden, I expert width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    EXACT,
    INTERPRET,
    e2m1_pair_f16,
    e2m1_times_2pow126,
    even_odd8,
    exp2_int,
    fp8_round,
    launch_opts,
    mma,
    pdl_enter,
    pow2_scale_bits,
)

BM = 16
SMALL_T = 16  # below this many rows every pair is its own tile
# e2m1 decode of the expert kernels (same values bit for bit; kernels/NOTES.md, v5):
# "f32": integer ops build float32 bits per code; "f16x2": inline PTX builds float16 bits for
# 8 codes per register op. The CPU interpreter runs no PTX: it always uses "f32".
# "mx": no hand decode: Triton's microscaling dot (``tl.dot_scaled``, e2m1 with E8M0 per-32
# scales: exactly this format).
DECODES = {"f32": 0, "f16x2": 1, "mx": 2}
# The fastest of each kernel on an H100 (kernels/NOTES.md, round 3, v7 and v13).
DEFAULT_DECODE = {"w13": "f16x2", "w2": "mx"}


@triton.jit
def gate_kernel(u_ptr, w_ptr, out_ptr, T, E, stride_u, D: tl.constexpr, BT: tl.constexpr,
                BE: tl.constexpr, BK: tl.constexpr):
    """logits[t, e] = sum_d float32(u[t, d]) * w[e, d] for BE experts and all (<= BT) rows:
    each lane accumulates its column of every BK chunk in float32, one reduction at the end."""
    pdl_enter()
    ee = tl.program_id(0) * BE + tl.arange(0, BE)
    tt = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    emask, tmask = ee < E, tt < T
    acc = tl.zeros([BT, BE, BK], dtype=tl.float32)
    for k0 in tl.static_range(0, D, BK):  # unrolled: every chunk's loads in flight at once
        kmask = k0 + kk < D
        w = tl.load(w_ptr + ee[:, None] * D + k0 + kk[None, :],
                    mask=emask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        u = tl.load(u_ptr + tt[:, None] * stride_u + k0 + kk[None, :],
                    mask=tmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += u[:, None, :] * w[None, :, :]
    out = tl.sum(acc, axis=2)
    tl.store(out_ptr + tt[:, None] * E + ee[None, :], out, mask=tmask[:, None] & emask[None, :])


GATE_T = 8  # gate_logits: up to this many rows in one kernel; more: float32 copy + cuBLAS
# gate_logits' launch by rows (their power of two): experts per program, inputs per unrolled
# chunk (the accumulator [rows, experts, inputs] and a chunk's loads stay in registers: ptxas
# reports no spills for sm_90 at 1-8 rows, D 4096 and 7168), warps. One expert per program,
# chunks of 256, 8 warps: the fastest at 1 and 4 rows of Flash and Pro alike
# (benchmarks/sweep_gate.py; kernels/NOTES.md, v43)
GATE_LAUNCH = {1: (1, 256, 8), 2: (1, 256, 8), 4: (1, 256, 8), 8: (1, 256, 8)}


def gate_logits(u: torch.Tensor, weight: torch.Tensor, *, tune: tuple | None = None
                ) -> torch.Tensor:
    """The gate's product in float32 as ``ops.route``: u [T, D] (bf16 or fp32) @ weight [E, D]
    (fp32)^T -> [T, E] fp32. For a few rows one kernel reads u as it is (no float32 copy of u,
    no second launch); the float32 sums run in another order than cuBLAS (same bound).
    ``tune`` (experts per program, inputs per chunk, warps) overrides :data:`GATE_LAUNCH`
    (benchmarks)."""
    t, d = u.shape
    e = weight.shape[0]
    if not 0 < t <= GATE_T or weight.dtype != torch.float32 or not weight.is_contiguous() \
            or u.stride(-1) != 1:
        return torch.mm(u.float(), weight.t())
    bt = triton.next_power_of_2(t)
    be, bk, warps = tune or GATE_LAUNCH[bt]
    out = torch.empty(t, e, dtype=torch.float32, device=u.device)
    gate_kernel[(triton.cdiv(e, be),)](u, weight, out, t, e, u.stride(0), D=d, BT=bt, BE=be,
                                       BK=bk, num_warps=warps, **launch_opts())
    return out


@triton.jit
def route_kernel(logits_ptr, bias_ptr, idx_ptr, w_ptr, E, scaling,
                 TOPK: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, SCORING: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """``ops.route`` after the gate product: scores, biased top-k, normalised weights."""
    pdl_enter()
    t = tl.program_id(0)
    e = tl.arange(0, EP)
    emask = e < E
    x = tl.load(logits_ptr + t * E + e, mask=emask, other=0.0)
    if SCORING == 0:  # sqrtsoftplus; softplus as torch: x above 20, else log1p(exp(x))
        y = tl.exp(x)
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
        scores = tl.sqrt_rn(tl.where(x > 20.0, x, log1p))
    elif SCORING == 1:
        scores = tl.sigmoid(x)
    else:
        xm = tl.where(emask, x, float("-inf"))
        ex = tl.exp(xm - tl.max(xm, axis=0))
        scores = ex / tl.sum(ex, axis=0)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + e, mask=emask, other=0.0)
    choice = tl.where(emask, choice, float("-inf"))
    kk = tl.arange(0, KP)
    ids = tl.zeros([KP], dtype=tl.int64)
    ws = tl.zeros([KP], dtype=tl.float32)
    for k in tl.static_range(TOPK):
        best = tl.argmax(choice, axis=0)
        wk = tl.sum(tl.where(e == best, scores, 0.0), axis=0)
        ids = tl.where(kk == k, best.to(tl.int64), ids)
        ws = tl.where(kk == k, wk, ws)
        choice = tl.where(e == best, float("-inf"), choice)
    if SCORING != 2:
        ws = ws / tl.sum(ws, axis=0)
    tl.store(idx_ptr + t * TOPK + kk, ids, mask=kk < TOPK)
    tl.store(w_ptr + t * TOPK + kk, ws * scaling, mask=kk < TOPK)


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, scoring_func: str,
          scaling: float):
    """logits [T, E] fp32 -> (idx [T, K] int64, weights [T, K] fp32)."""
    t, e = logits.shape
    idx = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    w = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    if t:
        route_kernel[(t,)](logits, bias if bias is not None else logits, idx, w, e,
                           float(scaling), TOPK=top_k, KP=triton.next_power_of_2(top_k),
                           EP=triton.next_power_of_2(e),
                           SCORING={"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}[scoring_func],
                           HAS_BIAS=bias is not None, num_warps=1, **launch_opts())
    return idx, w


def max_tiles(t: int, top_k: int, n_experts: int, bm: int = BM) -> int:
    p = t * top_k
    return p if t < SMALL_T else triton.cdiv(p, bm) + min(p, n_experts)


def align_tiles(idx: torch.Tensor, n_experts: int, bm: int = BM):
    """(tile_pairs [n_tiles*bm] int32, tile_expert [n_tiles] int64), all on the device.
    ``bm``: pair slots per tile (the Triton kernels take ``BM``; ``moe_cuda`` 8 or 16).
    Many rows: pairs grouped by expert in their original order (a stable counting sort), each
    expert's run starting a new tile (:func:`align_tiles_reference`, in one kernel)."""
    t, k = idx.shape
    p = t * k
    device = idx.device
    flat = idx.reshape(-1)
    if t < SMALL_T:
        pairs = torch.full((p, bm), -1, dtype=torch.int32, device=device)
        pairs[:, 0] = torch.arange(p, dtype=torch.int32, device=device)
        return pairs.view(-1), flat
    n_tiles = max_tiles(t, k, n_experts, bm)
    pairs = torch.full((n_tiles * bm,), -1, dtype=torch.int32, device=device)
    tile_expert = torch.empty(n_tiles, dtype=torch.int64, device=device)
    bp = 64
    align_kernel[(max(triton.cdiv(p, bp), triton.cdiv(n_tiles, bp)),)](
        flat, pairs, tile_expert, p, n_experts, n_tiles, BMS=bm,
        EP=triton.next_power_of_2(n_experts), BP=bp, BJ=256, BC=32, num_warps=4, **launch_opts())
    return pairs, tile_expert


def align_tiles_reference(idx: torch.Tensor, n_experts: int, bm: int = BM):
    """:func:`align_tiles` for many rows in torch ops (sort, counts, cumulative sums): the
    specification its kernel is tested against."""
    t, k = idx.shape
    p = t * k
    device = idx.device
    flat = idx.reshape(-1)
    n_tiles = max_tiles(t, k, n_experts, bm)
    sorted_e, order = torch.sort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    tiles_e = (counts + bm - 1) // bm
    tile_end = torch.cumsum(tiles_e, 0)
    row_start = torch.cumsum(counts, 0) - counts
    dest = (tile_end - tiles_e)[sorted_e] * bm + torch.arange(p, device=device) \
        - row_start[sorted_e]
    pairs = torch.full((n_tiles * bm,), -1, dtype=torch.int32, device=device)
    pairs.scatter_(0, dest, order.to(torch.int32))
    tile_expert = torch.searchsorted(tile_end, torch.arange(n_tiles, device=device),
                                     right=True)
    return pairs, tile_expert


@triton.jit
def align_kernel(e_ptr, pairs_ptr, texp_ptr, P, E, n_tiles, BMS: tl.constexpr,
                 EP: tl.constexpr, BP: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr):
    """Program b: pairs b*BP .. (b+1)*BP - 1 to their slots, and tile_expert of tiles b*BP ..
    Every program counts all P pairs per expert (small: P <= a few thousand)."""
    pdl_enter()
    b = tl.program_id(0)
    ex = tl.arange(0, EP)
    counts = tl.zeros([EP], dtype=tl.int32)
    for j0 in range(0, P, BC):
        j = j0 + tl.arange(0, BC)
        ej = tl.load(e_ptr + j, mask=j < P, other=-1).to(tl.int32)
        counts += tl.sum((ej[:, None] == ex[None, :]).to(tl.int32), axis=0)  # [BC, EP]
    tiles_e = (counts + BMS - 1) // BMS
    tile_end = tl.cumsum(tiles_e, axis=0)
    # pair i goes to slot (first tile of its expert) * BMS + (pairs of that expert before i)
    i = b * BP + tl.arange(0, BP)
    ei = tl.load(e_ptr + i, mask=i < P, other=0).to(tl.int32)
    rank = tl.zeros([BP], dtype=tl.int32)
    for j0 in range(0, P, BJ):
        j = j0 + tl.arange(0, BJ)
        ej = tl.load(e_ptr + j, mask=j < P, other=-1).to(tl.int32)
        same = (ej[None, :] == ei[:, None]) & (j[None, :] < i[:, None])  # [BP, BJ]
        rank += tl.sum(same.to(tl.int32), axis=1)
    first = tl.sum(tl.where(ex[None, :] == ei[:, None], (tile_end - tiles_e)[None, :], 0), axis=1)
    tl.store(pairs_ptr + first * BMS + rank, i.to(tl.int32), mask=i < P)
    # tile n belongs to the first expert whose tiles end after n (searchsorted, right)
    n = b * BP + tl.arange(0, BP)
    owner = tl.sum((tile_end[None, :] <= n[:, None]).to(tl.int32), axis=1)
    tl.store(texp_ptr + n, tl.minimum(owner, E).to(tl.int64), mask=n < n_tiles)  # E: empty


@triton.jit
def _quant_halves(xe, xo):
    """FP8-round one 128-block given as its even and odd halves [BM, 64] -> bf16 halves and
    the per-row scale."""
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    e = pow2_scale_bits(amax)
    sx = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return fp8_round(xe, e).to(EXACT), fp8_round(xo, e).to(EXACT), sx


@triton.jit
def _fp4_block(w_ptr, s_ptr, rows, kb, stride_wn, stride_sn, j, DECODE: tl.constexpr):
    """Rows' e2m1 weights of one 128-input block -> (even, odd) fp32 [BN, 64], scaled (exact
    values, exact in bf16 too)."""
    b8 = tl.load(w_ptr + rows[:, None] * stride_wn + kb * 64 + j[None, :])
    # one E8M0 byte per 32 inputs = per 16 bytes: load [BN, 4], broadcast to [BN, 64]
    g = tl.arange(0, 4)
    s4 = tl.load(s_ptr + rows[:, None] * stride_sn + kb * 4 + g[None, :]).to(tl.int32)
    s4 = (s4 << 23).to(tl.float32, bitcast=True)  # 2^(s-127)
    sc = tl.reshape(tl.broadcast_to(s4[:, :, None], (s4.shape[0], 4, 16)), (s4.shape[0], 64))
    # two exact multiplies: to the code's value (0.5 .. 6), then by the block scale
    if DECODE == 1 and not INTERPRET:
        lo16, hi16 = e2m1_pair_f16(b8)
        lo = (lo16.to(tl.float32) * 2.0 ** 14) * sc
        hi = (hi16.to(tl.float32) * 2.0 ** 14) * sc
    else:
        b = b8.to(tl.int32)
        lo = (e2m1_times_2pow126(b, 0) * 2.0 ** 126) * sc
        hi = (e2m1_times_2pow126(b, 4) * 2.0 ** 126) * sc
    return lo, hi


@triton.jit
def _even_odd(ptr, row_off, col0, valid, BM: tl.constexpr):
    """Rows' 128 inputs from col0, loaded contiguously, as (even, odd) fp32 [BM, 64]."""
    c = tl.arange(0, 128)
    x = tl.load(ptr + row_off[:, None] + col0 + c[None, :], mask=valid[:, None], other=0.0)
    return tl.split(tl.reshape(x.to(tl.float32), (BM, 64, 2)))


@triton.jit
def _act_halves(ptr, row_off, col0, valid, ACT_QUANT: tl.constexpr, BM: tl.constexpr):
    """Rows' 128 inputs from col0 as (even, odd) fp32 [BM, 64], their dot operands (FP8-rounded
    codes, or the values) and the per-row scale of the operands."""
    xe, xo = _even_odd(ptr, row_off, col0, valid, BM)
    if ACT_QUANT:
        qe, qo, sx = _quant_halves(xe, xo)
    else:
        qe = xe.to(EXACT)
        qo = xo.to(EXACT)
        sx = tl.full([BM], 1.0, tl.float32)
    return xe, xo, qe, qo, sx


@triton.jit
def _dot32(x, w):
    return tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")


@triton.jit
def _act_block(ptr, row_off, col0, valid, ACT_QUANT: tl.constexpr):
    """Rows' 128 inputs from col0 as bf16 [BM, 128], FP8-rounded with their power-of-two scale
    applied (an e4m3 value times 2^e is exact in bf16) or as they are."""
    c = tl.arange(0, 128)
    x = tl.load(ptr + row_off[:, None] + col0 + c[None, :], mask=valid[:, None], other=0.0)
    if ACT_QUANT:
        x = x.to(tl.float32)
        e = pow2_scale_bits(tl.max(tl.abs(x), axis=1))
        x = fp8_round(x, e) * exp2_int(e)[:, None]
    return x.to(tl.bfloat16)


@triton.jit
def _e2m1_block(w_ptr, s_ptr, rows, kb, stride_wn, stride_sn):
    """The rows' bytes [BN, 64] (uint8, two codes each) and E8M0 scales [BN, 4] of block kb."""
    j = tl.arange(0, 64)
    g = tl.arange(0, 4)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + kb * 64 + j[None, :])
    s = tl.load(s_ptr + rows[:, None] * stride_sn + kb * 4 + g[None, :])
    return w.to(tl.uint8, bitcast=True), s


@triton.jit
def _mx_dot(acc, q, w_ptr, s_ptr, rows, kb, stride_wn, stride_sn):
    """acc [BM, BN] + q [BM, 128] (bf16) @ the rows' e2m1 block kb, by ``tl.dot_scaled``."""
    w, s = _e2m1_block(w_ptr, s_ptr, rows, kb, stride_wn, stride_sn)
    return tl.dot_scaled(q, None, "bf16", tl.trans(w), s, "e2m1", acc=acc, fast_math=True)


@triton.jit
def _w13_loop(x_ptr, w_e, s_e, tok, valid, n, j, D, I, stride_wn, stride_sn,
              ACT_QUANT: tl.constexpr, F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              DECODE: tl.constexpr):
    """Gate and up products over D, with the kernels' own e2m1 decode."""
    acc_g = tl.zeros([BM, BN], dtype=tl.float32)
    acc_v = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, D // 128):
        xe, xo, qe, qo, sx = _act_halves(x_ptr, tok * D, kb * 128, valid, ACT_QUANT, BM)
        w1e, w1o = _fp4_block(w_e, s_e, n, kb, stride_wn, stride_sn, j, DECODE)
        w3e, w3o = _fp4_block(w_e, s_e, I + n, kb, stride_wn, stride_sn, j, DECODE)
        if F32:  # float32 activations without rounding: IEEE float32 dots
            acc_g += _dot32(xe, w1e) + _dot32(xo, w1o)
            acc_v += _dot32(xe, w3e) + _dot32(xo, w3o)
        else:
            acc_g += (mma(qe, tl.trans(w1e)) + mma(qo, tl.trans(w1o))) * sx[:, None]
            acc_v += (mma(qe, tl.trans(w3e)) + mma(qo, tl.trans(w3o))) * sx[:, None]
    return acc_g, acc_v


@triton.jit
def _w2_loop(act_ptr, w_e, s_e, row_off, valid, n, j, I, stride_wn, stride_sn,
             ACT_QUANT: tl.constexpr, F32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             DECODE: tl.constexpr):
    """The down product over I, with the kernels' own e2m1 decode."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(0, I // 128):
        xe, xo, qe, qo, sx = _act_halves(act_ptr, row_off, kb * 128, valid, ACT_QUANT, BM)
        we, wo = _fp4_block(w_e, s_e, n, kb, stride_wn, stride_sn, j, DECODE)
        if F32:  # float32 activations without rounding: IEEE float32 dots
            acc += _dot32(xe, we) + _dot32(xo, wo)
        else:
            acc += (mma(qe, tl.trans(we)) + mma(qo, tl.trans(wo))) * sx[:, None]
    return acc


@triton.jit
def _swiglu_store(acc_g, acc_v, act_ptr, rw_ptr, pair, valid, rows, n, I, limit):
    """w13 epilogue: gate and up rounded to the compute dtype, clamped SwiGLU, times the
    routing weight -> act rows [BM, BN]."""
    odt = act_ptr.dtype.element_ty
    g = acc_g.to(odt).to(tl.float32)
    v = acc_v.to(odt).to(tl.float32)
    if limit > 0:
        v = tl.minimum(tl.maximum(v, -limit), limit)
        g = tl.minimum(g, limit)
    rw = tl.load(rw_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0)
    a = rw[:, None] * (g / (1.0 + tl.exp(-g)) * v)
    tl.store(act_ptr + rows[:, None] * I + n[None, :], a.to(odt))


@triton.jit
def _tile(pairs_ptr, w_ptr, s_ptr, tile, nb, ex, stride_we, stride_se, TOPK: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr):
    """An expert kernel program's tile: slot rows r [BM], their pair ids, validity and (TOPK >
    0) tokens, its output columns n [BN], the decode's byte index j [64], the expert's weight
    and scale bases."""
    r = tl.arange(0, BM)
    pair = tl.load(pairs_ptr + tile * BM + r)
    valid = pair >= 0
    tok = pair
    if TOPK > 0:
        tok = tl.where(valid, pair // TOPK, 0)
    n = nb * BN + tl.arange(0, BN)
    j = tl.arange(0, 64)
    return r, pair, valid, tok, n, j, w_ptr + ex * stride_we, s_ptr + ex * stride_se


@triton.jit
def moe_w13_kernel(x_ptr, w_ptr, s_ptr, pairs_ptr, texp_ptr, rw_ptr, act_ptr,
                   D, I, E, stride_we, stride_wn, stride_se, stride_sn, limit,
                   TOPK: tl.constexpr, ACT_QUANT: tl.constexpr, F32: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, DECODE: tl.constexpr):
    pdl_enter()
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    ex = tl.load(texp_ptr + tile)
    if ex < E:
        r, pair, valid, tok, n, j, w_e, s_e = _tile(pairs_ptr, w_ptr, s_ptr, tile, nb, ex,
                                                    stride_we, stride_se, TOPK, BM, BN)
        if DECODE == 2 and not F32:  # Triton's microscaling dot
            acc_g = tl.zeros([BM, BN], dtype=tl.float32)
            acc_v = tl.zeros([BM, BN], dtype=tl.float32)
            for kb in range(0, D // 128):
                q = _act_block(x_ptr, tok * D, kb * 128, valid, ACT_QUANT)
                acc_g = _mx_dot(acc_g, q, w_e, s_e, n, kb, stride_wn, stride_sn)
                acc_v = _mx_dot(acc_v, q, w_e, s_e, I + n, kb, stride_wn, stride_sn)
        else:
            acc_g, acc_v = _w13_loop(x_ptr, w_e, s_e, tok, valid, n, j, D, I, stride_wn,
                                     stride_sn, ACT_QUANT, F32, BM, BN, DECODE)
        _swiglu_store(acc_g, acc_v, act_ptr, rw_ptr, pair, valid, tile * BM + r, n, I, limit)


@triton.jit
def moe_w2_kernel(act_ptr, w_ptr, s_ptr, pairs_ptr, texp_ptr, out_ptr,
                  D, I, E, stride_we, stride_wn, stride_se, stride_sn,
                  ACT_QUANT: tl.constexpr, F32: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, DECODE: tl.constexpr):
    pdl_enter()
    tile = tl.program_id(0)
    nb = tl.program_id(1)
    ex = tl.load(texp_ptr + tile)
    if ex < E:
        r, pair, valid, _, n, j, w_e, s_e = _tile(pairs_ptr, w_ptr, s_ptr, tile, nb, ex,
                                                  stride_we, stride_se, 0, BM, BN)
        if DECODE == 2 and not F32:  # Triton's microscaling dot
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for kb in range(0, I // 128):
                q = _act_block(act_ptr, (tile * BM + r) * I, kb * 128, valid, ACT_QUANT)
                acc = _mx_dot(acc, q, w_e, s_e, n, kb, stride_wn, stride_sn)
        else:
            acc = _w2_loop(act_ptr, w_e, s_e, (tile * BM + r) * I, valid, n, j, I, stride_wn,
                           stride_sn, ACT_QUANT, F32, BM, BN, DECODE)
        dst = out_ptr + tl.where(valid, pair, 0)[:, None] * D + n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None])


def _check_tiles(pairs, n_tiles, what):
    if pairs.numel() != n_tiles * BM:
        raise ValueError(f"{what}: the Triton expert kernels take tiles of {BM} pair slots "
                         f"(align_tiles(idx, E)); got {pairs.numel()} slots for {n_tiles} tiles")


def _variant(x, act_quant, rounded, decode, kernel):
    """(ACT_QUANT, F32, DECODE) of a launch. A rounded input (``fp8_simulate``d) is exact in
    bf16: no rounding in the kernel, and float32 inputs take the bf16 dots too."""
    if rounded and act_quant:
        raise ValueError("moe: pass act_quant=False with an input that is already rounded")
    f32 = x.dtype == torch.float32 and not act_quant and not rounded
    dec = decode or DEFAULT_DECODE[kernel]
    if INTERPRET and dec != "f32":  # the interpreter runs no PTX and no tl.dot_scaled
        dec = "f32"
    return act_quant, f32, DECODES[dec]


def moe_w13(u, w13, s13, pairs, tile_expert, weights, *, act_quant: bool, limit: float,
            rounded: bool = False, decode: str | None = None, block_n: int | None = None,
            tune: dict | None = None):
    """u [T, D], w13 int8 [E, 2I, D/2], s13 E8M0 [E, 2I, D/32] -> act [n_tiles*BM, I].
    ``rounded``: u is already FP8-rounded (then ``act_quant=False``); ``decode``: a key of
    ``DECODES`` (default ``DEFAULT_DECODE``); ``block_n``: the tile's output columns (default
    by tile count; for benchmarks); ``tune``: ``warps``, ``stages`` (for benchmarks)."""
    t, d = u.shape
    e, two_i, _ = w13.shape
    i = two_i // 2
    n_tiles = tile_expert.shape[0]
    _check_tiles(pairs, n_tiles, "moe_w13")
    act = torch.empty(n_tiles * BM, i, dtype=u.dtype, device=u.device)
    s = s13.view(torch.uint8)
    aq, f32, dec = _variant(u, act_quant, rounded, decode, "w13")
    bn = block_n or (32 if n_tiles <= 96 else 64)  # few tiles: more, smaller programs
    if n_tiles:
        moe_w13_kernel[(n_tiles, triton.cdiv(i, bn))](
            u, w13, s, pairs, tile_expert, weights, act, d, i, e, w13.stride(0), w13.stride(1),
            s.stride(0), s.stride(1), float(limit), TOPK=weights.shape[1], ACT_QUANT=aq,
            F32=f32, BM=BM, BN=bn, DECODE=dec, num_warps=(tune or {}).get("warps", 4),
            num_stages=(tune or {}).get("stages", 3), **launch_opts())
    return act


@triton.jit
def round_rows_kernel(x_ptr, pairs_ptr, D, BD: tl.constexpr):
    """FP8 activation rounding (blocks of 128) of one row in place, if it holds a pair."""
    pdl_enter()
    r = tl.program_id(0)
    if tl.load(pairs_ptr + r) >= 0:
        c = tl.arange(0, BD)
        x = tl.load(x_ptr + r * D + c, mask=c < D, other=0.0).to(tl.float32)
        xb = tl.reshape(x, (BD // 128, 128))  # [BD] -> [blocks, 128]
        e = pow2_scale_bits(tl.max(tl.abs(xb), axis=1))
        q = tl.reshape(fp8_round(xb, e) * exp2_int(e)[:, None], (BD,))
        tl.store(x_ptr + r * D + c, q.to(x_ptr.dtype.element_ty), mask=c < D)


def round_rows(act: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``fp8_simulate(act, 128)`` in place on the rows of ``moe_w13``'s output that hold a pair
    (the w2 input, rounded once instead of in every w2 program)."""
    rows, i = act.shape
    if i % 128:
        raise ValueError(f"round_rows: width {i} is not a multiple of 128")
    if rows:
        round_rows_kernel[(rows,)](act, pairs, i, BD=triton.next_power_of_2(i), num_warps=4,
                                   **launch_opts())
    return act


@triton.jit
def quant_rows_kernel(x_ptr, pairs_ptr, xh_ptr, xs_ptr, D, HAS_PAIRS: tl.constexpr,
                      BD: tl.constexpr):
    """FP8 activation rounding (blocks of 128) of one row -> the e4m3 values as float16, each
    8 inputs in the order 0 2 4 6 1 3 5 7, and the blocks' scales 2^e (float32)."""
    pdl_enter()
    r = tl.program_id(0)
    ok = r >= 0
    if HAS_PAIRS:
        ok = tl.load(pairs_ptr + r) >= 0
    if ok:
        c = tl.arange(0, BD)
        x = tl.load(x_ptr + r * D + c, mask=c < D, other=0.0).to(tl.float32)
        xb = tl.reshape(x, (BD // 128, 128))  # [BD] -> [blocks, 128]
        e = pow2_scale_bits(tl.max(tl.abs(xb), axis=1))
        q = fp8_round(xb, e)
        q = even_odd8(q, BD)  # [blocks, 128] -> [BD]: even inputs, then odd, per 8
        tl.store(xh_ptr + r * D + c, q.to(tl.float16), mask=c < D)
        b = tl.arange(0, BD // 128)
        tl.store(xs_ptr + r * (D // 128) + b, exp2_int(e), mask=b < D // 128)


def quant_rows(x: torch.Tensor, pairs: torch.Tensor | None = None):
    """``fp8_simulate(x, 128)`` split into what the CUDA expert kernels (``moe_cuda``) read:
    x [R, D] -> (xh [R, D] float16: the e4m3 values, exact, each 8 inputs ordered 0 2 4 6 1 3
    5 7; xs [R, D/128] float32: the blocks' power-of-two scales), so that ``fp8_simulate(x)``
    = xh (un-permuted) * xs. With ``pairs`` [R] only rows whose pair id is >= 0 are written
    (the others keep whatever memory held)."""
    rows, d = x.shape
    if d % 128:
        raise ValueError(f"quant_rows: width {d} is not a multiple of 128")
    xh = torch.empty(rows, d, dtype=torch.float16, device=x.device)
    xs = torch.empty(rows, d // 128, dtype=torch.float32, device=x.device)
    if rows:
        quant_rows_kernel[(rows,)](x, pairs if pairs is not None else x, xh, xs, d,
                                   HAS_PAIRS=pairs is not None,
                                   BD=triton.next_power_of_2(d), num_warps=4, **launch_opts())
    return xh, xs


def moe_w2(act, w2, s2, pairs, tile_expert, n_pairs: int, *, act_quant: bool,
           rounded: bool = False, decode: str | None = None, block_n: int | None = None,
           tune: dict | None = None):
    """act [n_tiles*BM, I], w2 int8 [E, D, I/2], s2 [E, D, I/32] -> [P, D] per pair."""
    e, d, _ = w2.shape
    i = act.shape[1]
    n_tiles = tile_expert.shape[0]
    _check_tiles(pairs, n_tiles, "moe_w2")
    out = torch.empty(n_pairs, d, dtype=act.dtype, device=act.device)
    s = s2.view(torch.uint8)
    aq, f32, dec = _variant(act, act_quant, rounded, decode, "w2")
    bn = block_n or 64
    if n_tiles:
        moe_w2_kernel[(n_tiles, triton.cdiv(d, bn))](
            act, w2, s, pairs, tile_expert, out, d, i, e, w2.stride(0), w2.stride(1),
            s.stride(0), s.stride(1), ACT_QUANT=aq, F32=f32, BM=BM, BN=bn, DECODE=dec,
            num_warps=(tune or {}).get("warps", 4), num_stages=(tune or {}).get("stages", 3),
            **launch_opts())
    return out


@triton.jit
def fp4_decode_kernel(w_ptr, s_ptr, out_ptr, stride_wn, stride_sn, K, BN: tl.constexpr,
                      DECODE: tl.constexpr):
    """Test entry: the expert kernels' decode of rows [BN] x one 128-input block -> fp32."""
    pdl_enter()
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1)
    j = tl.arange(0, 64)
    lo, hi = _fp4_block(w_ptr, s_ptr, n, kb, stride_wn, stride_sn, j, DECODE)
    dst = out_ptr + n[:, None] * K + kb * 128 + 2 * j[None, :]
    tl.store(dst, lo)
    tl.store(dst + 1, hi)


def fp4_decode(w, s, decode: str | None = None) -> torch.Tensor:
    """w int8 [N, K/2], s E8M0 [N, K/32] -> fp32 [N, K] as the expert kernels decode them
    (for tests: must equal ``mtp.quant.dequant_fp4`` bit for bit). N % 16 == 0, K % 128 == 0."""
    n, k = w.shape[0], 2 * w.shape[1]
    if DECODES[decode or "f32"] >= 2:
        raise ValueError(f"fp4_decode: {decode!r} has no decode of its own (tl.dot_scaled)")
    out = torch.empty(n, k, dtype=torch.float32, device=w.device)
    su = s.view(torch.uint8)
    fp4_decode_kernel[(n // 16, k // 128)](w, su, out, w.stride(0), su.stride(0), k, BN=16,
                                           DECODE=DECODES[decode or "f32"], **launch_opts())
    return out

"""FP8 (e4m3 weight, 128x128 E8M0 or float32 block scale) matrix product with the reference's
activation rounding fused into the load: ``mtp.ops.matmul(x, dequant(w), act_quant)``.

out[m, n] = sum_kb  sx[m, kb] * sw[n // 128, kb] * (xq[m, kb-block] . wq[n, kb-block])

The dot sees exactly the reference's operand values: with bf16 activations and act_quant, the
e4m3 codes of both on the FP8 tensor cores (``FP8_DOT``; the codes' sums over a 128-block at
the tensor core's accumulation precision); otherwise both as bf16 (e4m3 codes, e4m3 x 2^k or
bf16 activations are exact in bf16: only the fp32 summation order differs). With float32
activations that are not quantised the dot runs in IEEE float32 instead. Options, all fused:

- ``group_n``: grouped product (``wo_a``): output rows [g*group_n, (g+1)*group_n) read input
  columns [g*K, (g+1)*K).
- ``swiglu_limit``: the input is ``swiglu(x[:, :K], x[:, K:])`` rounded to x's dtype (the shared
  expert's down projection reads the gate/up output directly).
- ``add``/``add_row_div``: the output is ``out.to(dtype) + add[m // add_row_div]`` in x's dtype
  (h_proj + e_proj broadcast over the hc streams).
- split-K with a deterministic second pass when rows are few (decode): enough programs to keep
  every SM streaming weights.
- from ``CUBLAS_ROWS`` rows (512; None: never), cuBLAS's block-scaled FP8 GEMM of the same
  function instead (``scaled_mm``), where the device runs it.

Shape legend: M rows, N outputs, K inputs (a multiple of 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, scaled_mm
from ._common import e8m0_to_f32, fp8_round, launch_opts, mma, pdl_enter, pow2_scale_bits

BK = 128
# bf16 activations with act_quant: the e4m3 activation codes and the e4m3 weights go to the FP8
# tensor cores as they are (products exact; each 128-block summed at the tensor core's FP8
# accumulation precision, then fp32 across blocks, like the reference's own FP8 GEMM). Off:
# both as bf16 (exact values, fp32 accumulation). float32 models never take it.
FP8_DOT = True
# From this many rows the activations are FP8-rounded once by quant_fp8 (one extra launch)
# instead of in every output block's program: at 512 rows the rounding inside the product's
# loop cost as much as the dot (kernels/NOTES.md, catch-up).
PREQ_ROWS = 128
# quant_fp8's launch: (rows per program, warps) over blocks of 128 columns. Data for
# ab_drafter.py's "quant-*" variants (none gained). Alone it runs near the copy bandwidth
# (9.4 us for a catch-up's 2,048 x 4,096 on an H100, its floor 8.4: bench_products.py).
QUANT_LAUNCH = (32, 4)
# From this many rows a product of FP8-rounded bf16 activations goes to cuBLAS's block-scaled
# FP8 GEMM (``scaled_mm``; sm_90, where torch's ``_scaled_mm`` takes DeepSeek's scales)
# instead of the kernel above (the same bits at a catch-up's shapes, faster from 512 rows,
# slower at 128: kernels/NOTES.md v39, benchmarks/bench_products.py). None: never.
CUBLAS_ROWS: int | None = 512
_SMS = 132  # H100 SXM; only used to size split-K (a different count just changes the split)


@triton.jit
def _epilogue(acc, rows, cols, M, N, out_ptr, stride_om, add_ptr, stride_am,
              ADD_ROW_DIV: tl.constexpr):
    odt = out_ptr.dtype.element_ty
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y = acc.to(odt)
    if ADD_ROW_DIV > 0:
        a = tl.load(add_ptr + (rows // ADD_ROW_DIV)[:, None] * stride_am + cols[None, :],
                    mask=mask, other=0.0)
        y = (y.to(tl.float32) + a.to(tl.float32)).to(odt)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y, mask=mask)
    return y


@triton.jit
def _swiglu_block(x, x_ptr, xoff, K, rmask, swiglu_limit):
    """The SwiGLU input of a down projection: x holds the gate block, the value block lies K
    columns on (``ops.swiglu``: clamped where swiglu_limit > 0), in x's dtype."""
    v = tl.load(x_ptr + xoff + K, mask=rmask[:, None], other=0.0).to(tl.float32)
    g = x.to(tl.float32)
    if swiglu_limit > 0:
        v = tl.minimum(tl.maximum(v, -swiglu_limit), swiglu_limit)
        g = tl.minimum(g, swiglu_limit)
    return (g / (1.0 + tl.exp(-g)) * v).to(x_ptr.dtype.element_ty)


@triton.jit
def fp8_linear_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, add_ptr,
                      M, N, K, stride_xm, stride_om, stride_am, stride_wn, stride_wsn,
                      kb_per_split, swiglu_limit,
                      x2_ptr, w2_ptr, ws2_ptr, part2_ptr, M2, stride_x2m, stride_w2n,
                      stride_ws2n, NB1,
                      GROUP_N: tl.constexpr, ACT_QUANT: tl.constexpr, SWIGLU: tl.constexpr,
                      SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
                      ADD_ROW_DIV: tl.constexpr, FP8_DOT: tl.constexpr, PREQ: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      PAIR: tl.constexpr):
    """PREQ: x is already e4m3 codes [M, K] with their scales xs [M, K/128] (``quant_fp8``,
    written once for all output blocks instead of rounded again in each). PAIR: programs
    from column block NB1 on compute a second product of the same N and K, x2 [M2, K] @ w2^T,
    into its own split-K partials part2 (the add of the first, summed by the reduce)."""
    pdl_enter()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    if PAIR and pid_n >= NB1:
        if pid_m * BM < M2:
            _product(x2_ptr, x2_ptr, w2_ptr, ws2_ptr, out_ptr, part2_ptr, add_ptr, M2, N, K,
                     stride_x2m, stride_om, stride_am, stride_w2n, stride_ws2n, kb_per_split,
                     swiglu_limit, pid_n - NB1, pid_m, pid_k, GROUP_N, ACT_QUANT, SWIGLU,
                     SCALE_E8M0, DOT_F32, SPLIT, 0, FP8_DOT, PREQ, BM, BN, BK)
    else:
        _product(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, add_ptr, M, N, K, stride_xm,
                 stride_om, stride_am, stride_wn, stride_wsn, kb_per_split, swiglu_limit,
                 pid_n, pid_m, pid_k, GROUP_N, ACT_QUANT, SWIGLU, SCALE_E8M0, DOT_F32, SPLIT,
                 ADD_ROW_DIV, FP8_DOT, PREQ, BM, BN, BK)


@triton.jit
def _product(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, add_ptr,
             M, N, K, stride_xm, stride_om, stride_am, stride_wn, stride_wsn,
             kb_per_split, swiglu_limit, pid_n, pid_m, pid_k,
             GROUP_N: tl.constexpr, ACT_QUANT: tl.constexpr, SWIGLU: tl.constexpr,
             SCALE_E8M0: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
             ADD_ROW_DIV: tl.constexpr, FP8_DOT: tl.constexpr, PREQ: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """One program's [BM, BN] output block over its K range: the epilogue, or (SPLIT > 1) its
    split-K partial."""
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    cmask = cols < N
    x_col0 = ((pid_n * BN) // GROUP_N) * K  # grouped product: this block's input columns
    kk = tl.arange(0, BK)
    n_kb = K // BK
    kb0 = pid_k * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, n_kb)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kb in range(kb0, kb1):
        xoff = rows[:, None] * stride_xm + x_col0 + kb * BK + kk[None, :]
        x = tl.load(x_ptr + xoff, mask=rmask[:, None], other=0.0)
        if SWIGLU and not PREQ:
            x = _swiglu_block(x, x_ptr, xoff, K, rmask, swiglu_limit)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + kb * BK + kk[None, :],
                    mask=cmask[:, None], other=0.0)
        sb = tl.load(ws_ptr + ((pid_n * BN) // 128) * stride_wsn + kb)
        if SCALE_E8M0:
            sw = e8m0_to_f32(sb)
        else:
            sw = sb.to(tl.float32)
        if PREQ:  # the same dot and scaling as ACT_QUANT with FP8_DOT, rounding hoisted out
            xs = tl.load(xs_ptr + rows * n_kb + kb, mask=rmask, other=0.0)
            acc += tl.dot(x, tl.trans(w)) * (xs * sw)[:, None]
        elif ACT_QUANT:
            xf = x.to(tl.float32)
            e = pow2_scale_bits(tl.max(tl.abs(xf), axis=1))
            q = fp8_round(xf, e)
            if FP8_DOT:  # e4m3 codes . e4m3 weights on the FP8 tensor cores
                d = tl.dot(q.to(tl.float8e4nv), tl.trans(w))
            else:
                d = mma(q, tl.trans(w.to(tl.float32)))
            acc += d * (((e + 127) << 23).to(tl.float32, bitcast=True) * sw)[:, None]
        else:
            if DOT_F32:
                d = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                d = mma(x, tl.trans(w.to(tl.float32)))
            acc += d * sw
    if SPLIT == 1:
        _epilogue(acc, rows, cols, M, N, out_ptr, stride_om, add_ptr, stride_am, ADD_ROW_DIV)
    else:
        poff = (pid_k * M + rows[:, None]) * N + cols[None, :]
        tl.store(part_ptr + poff, acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def splitk_reduce_kernel(part_ptr, out_ptr, add_ptr, part2_ptr, fn_ptr, mix_ptr, sq_ptr, M, N,
                         F, M2, stride_om, stride_am, SPLIT: tl.constexpr,
                         ADD_ROW_DIV: tl.constexpr, BN: tl.constexpr, PAIR: tl.constexpr,
                         MIX: tl.constexpr, FP: tl.constexpr):
    """Sum the split-K partials in a fixed order (deterministic), then the epilogue. With PAIR
    the add of row m is the second product's row m // ADD_ROW_DIV, summed from part2 the same
    way and rounded to the output dtype (as its own reduce would have written it). With MIX
    (output rows t * ADD_ROW_DIV + k: stream k of hyper-connection row t) also the next
    hc_pre's mix partials of the stored values over this block's columns, as ``hc_post``'s:
    z = flatten(out[t]) holds them at columns k * N + cols."""
    pdl_enter()
    m = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BN + tl.arange(0, BN)
    cmask = cols < N
    acc = tl.zeros([BN], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + (s * M + m) * N + cols, mask=cmask, other=0.0)
    rows = m + tl.arange(0, 1)
    if PAIR:
        odt = out_ptr.dtype.element_ty
        acc2 = tl.zeros([BN], dtype=tl.float32)
        for s in range(SPLIT):
            acc2 += tl.load(part2_ptr + (s * M2 + m // ADD_ROW_DIV) * N + cols, mask=cmask,
                            other=0.0)
        y = (acc.to(odt).to(tl.float32) + acc2.to(odt).to(tl.float32)).to(odt)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y,
                 mask=cmask[None, :])
    else:
        y = _epilogue(acc[None, :], rows, cols, M, N, out_ptr, stride_om, add_ptr, stride_am,
                      ADD_ROW_DIV)
    if MIX:
        t, k = m // ADD_ROW_DIV, m % ADD_ROW_DIV
        z = tl.where(cmask, tl.reshape(y, (BN,)).to(tl.float32), 0.0)
        fr = tl.arange(0, FP)
        f = tl.load(fn_ptr + fr[:, None] * (ADD_ROW_DIV * N) + k * N + cols[None, :],
                    mask=(fr < F)[:, None] & cmask[None, :], other=0.0)
        s = k * tl.num_programs(1) + cb  # partial s of row t (hc.hc_finish's layout)
        n_t = M // ADD_ROW_DIV
        tl.store(mix_ptr + (s * n_t + t) * FP + fr, tl.sum(f * z[None, :], axis=1))
        tl.store(sq_ptr + s * n_t + t, tl.sum(z * z, axis=0))


@triton.jit
def quant_fp8_kernel(x_ptr, q_ptr, s_ptr, M, M_OUT, K, stride_xm, stride_sm, stride_sk,
                     swiglu_limit, SWIGLU: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """One [BM, 128] block: ``fp8_simulate`` as e4m3 codes and power-of-two scales (the
    rounding fp8_linear_kernel's ACT_QUANT does per block), of x or of swiglu(x); rows from M
    to M_OUT (padding) get zero codes."""
    pdl_enter()
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    kb = tl.program_id(1)
    cols = kb * BK + tl.arange(0, BK)
    rmask = rows < M
    xoff = rows[:, None] * stride_xm + cols[None, :]
    x = tl.load(x_ptr + xoff, mask=rmask[:, None], other=0.0)
    if SWIGLU:
        x = _swiglu_block(x, x_ptr, xoff, K, rmask, swiglu_limit)
    xf = x.to(tl.float32)
    e = pow2_scale_bits(tl.max(tl.abs(xf), axis=1))
    q = fp8_round(xf, e)
    omask = rows < M_OUT
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv), mask=omask[:, None])
    tl.store(s_ptr + rows * stride_sm + kb * stride_sk,
             ((e + 127) << 23).to(tl.float32, bitcast=True), mask=omask)


def quant_fp8(x: torch.Tensor, k: int, swiglu_limit: float | None = None, *,
              rows: int | None = None, scales_outer_major: bool = False):
    """``fp8_simulate(x, 128)`` (of ``swiglu(x[:, :k], x[:, k:])`` with ``swiglu_limit``) as
    what the FP8 tensor cores read: x [M, k] (or [M, 2k]) bf16 -> (codes [M, k] float8_e4m3fn,
    scales [M, k/128] float32 powers of two): codes * scales = the rounded values, exactly.
    ``rows`` (>= M): the results have that many rows, those past M zero codes (padding);
    ``scales_outer_major``: the scales' rows are adjacent ([k/128, rows] memory, transposed:
    cuBLAS's layout for 1 x 128 scales)."""
    m = x.shape[0]
    rows = m if rows is None else rows
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    if scales_outer_major:
        s = torch.empty(k // BK, rows, dtype=torch.float32, device=x.device).t()
    else:
        s = torch.empty(rows, k // BK, dtype=torch.float32, device=x.device)
    if rows:
        bm, warps = QUANT_LAUNCH
        quant_fp8_kernel[(triton.cdiv(rows, bm), k // BK)](
            x, q, s, m, rows, k, x.stride(0), s.stride(0), s.stride(1),
            float(swiglu_limit or 0.0), SWIGLU=swiglu_limit is not None, BM=bm, BK=BK,
            num_warps=warps, **launch_opts())
    return q, s


# Launch settings by row count: (rows up to, (BM, BN, warps, split-K programs per
# multiprocessor, pipeline stages)); the last entry takes any more rows. Wide tiles and fewer
# programs for many rows, narrow tiles and more split-K for few (the sweep behind it:
# benchmarks/sweep_kernels.py, kernels/NOTES.md v13, on an H100, each product alone). Data,
# so that an A/B (benchmarks/ab_drafter.py) can try another entry inside the real draft step:
# there, on an H200, 128-wide tiles took 2.5% off Flash's batch-1 propose(k=3) and 5.7% off
# Pro's, and lost 0.5-0.7% at 16 rows (kernels/NOTES.md, "The FP8 products' and the experts'
# launch settings").
BLOCKS = (
    (4, (16, 128, 4, 4, 3)),
    (16, (16, 64, 4, 4, 3)),
    (32, (32, 128, 4, 2, 3)),
    (128, (64, 128, 4, 2, 3)),
    (None, (64, 128, 8, 2, 3)),
)


def _blocks(m: int) -> tuple[int, int, int, int, int]:
    """``BLOCKS``' settings for m rows: (BM, BN, warps, per_sm, stages)."""
    return next(b for rows, b in BLOCKS if rows is None or m <= rows)


def launch_settings(m: int, dot_f32: bool, tune: dict) -> tuple[int, int, int, int, int]:
    """(BM, BN, warps, per_sm, stages) of a product of m rows: ``BLOCKS``' entry, then
    ``tune``'s settings over it."""
    bm, bn, warps, per_sm, stages = _blocks(m)
    bm = tune.get("bm", bm)
    if dot_f32 and bm >= 64:
        # float32 operands take twice bf16's shared memory: (64, 128) tiles over 3 stages ask
        # for 256 KiB, more than an H100/H200 multiprocessor's 227 KiB
        bn, stages = 64, 2
    return (bm, tune.get("bn", bn), tune.get("warps", warps), tune.get("per_sm", per_sm),
            tune.get("stages", stages))


def by_cublas(m: int, k: int, dtype: torch.dtype, device: torch.device, rounds: bool) -> bool:
    """Whether :func:`fp8_linear` gives an ungrouped product of m rows of ``dtype`` (K = k,
    input rounded to FP8 where ``rounds``) into a new output to cuBLAS (``scaled_mm``): so a
    kernel before it may write the input in cuBLAS's form (``scaled_mm.FP8Rows``)."""
    return (CUBLAS_ROWS is not None and m >= CUBLAS_ROWS and FP8_DOT and rounds
            and dtype == torch.bfloat16 and k % (4 * BK) == 0 and scaled_mm.ready(device))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, act_quant: bool,
               group_n: int | None = None, swiglu_limit: float | None = None,
               add: torch.Tensor | None = None, add_row_div: int = 1,
               out: torch.Tensor | None = None, rounded: bool = False,
               tune: dict | None = None, mix_fn: torch.Tensor | None = None,
               add_linear: tuple | None = None):
    """``mtp.ops.matmul(x, dequant_fp8_block(weight, scale), act_quant)``.

    x [M, Kx] (bf16 or fp32, last dim contiguous; Kx = K, or G*K grouped, or 2K with
    ``swiglu_limit``), weight e4m3 [N, K] (last dim contiguous: a block-aligned column range
    of a wider weight is read in place), scale [ceil(N/128), K/128] (E8M0 or float32)
    -> [M, N] in x's dtype (or ``out``'s: float32 for a tensor-parallel partial sum).

    ``rounded``: x is already FP8-rounded (``fp8_simulate``; pass ``act_quant=False``): its
    values are exact in bf16, so float32 x still takes the tensor-core dot.
    ``tune``: launch settings for benchmarks (``preq_rows``: rows from which the input is
    rounded ahead by :func:`quant_fp8`, ``bm`` 16 to 128 rows per program, ``bn`` 64 or 128,
    ``warps``, ``stages``, ``per_sm``: split-K programs per multiprocessor).
    ``mix_fn`` [F, add_row_div * N] float32 (with ``add``: the output rows are the
    ``add_row_div`` hyper-connection streams of each row of ``add``): returns (out, partials),
    partials the next ``hc.hc_pre_norm``'s mixes of out computed by the split-K pass (no
    hc_mix launch), or None where the product takes no split-K pass (then hc_pre_norm
    computes them itself).
    ``add_linear`` = (x2, weight2, scale2), in place of ``add``: the add is
    ``fp8_linear(x2, weight2, scale2, act_quant=act_quant)`` (weight2 of weight's shape and
    format), with this product's launch settings (``tune``: so its split-K, and the float32
    summation order, are the product's): in the same launch where the product takes a
    split-K pass, else by a call first (the input projections' e_proj and h_proj).

    Example:
        >>> y = fp8_linear(u, attn.wq_b.weight, attn.wq_b.weight_scale_inv, act_quant=True)
    """
    m = x.shape[0]
    n, k = weight.shape
    if k % BK:
        raise ValueError(f"fp8_linear: K={k} is not a multiple of {BK}")
    if x.stride(-1) != 1:
        raise ValueError("fp8_linear: x's last dim must be contiguous")
    if weight.stride(1) != 1:
        raise ValueError("fp8_linear: weight's last dim must be contiguous")
    group = group_n or n
    if group % 128 and group != n:
        raise ValueError(f"fp8_linear: group_n={group} must be a multiple of 128")
    x2 = None
    if add_linear is not None:
        x2, w2, s2 = add_linear
        if add is not None:
            raise ValueError("fp8_linear: pass add or add_linear, not both")
        if (w2.shape != weight.shape or s2.shape != scale.shape or s2.dtype != scale.dtype
                or x2.dtype != x.dtype or x2.stride(-1) != 1 or w2.stride(1) != 1
                or x2.shape[0] * add_row_div != m or rounded or swiglu_limit is not None
                or group_n not in (None, n) or (out is not None and out.dtype != x.dtype)):
            raise ValueError("fp8_linear: add_linear takes a weight of weight's shape and "
                             "format, x2 [M / add_row_div, K] of x's dtype, and no other option")
    if (group == n and out is None and m % add_row_div == 0 and not tune
            and by_cublas(m, k, x.dtype, x.device, act_quant or rounded)):
        if x2 is not None:  # e_proj's rows are h_proj's over add_row_div: maybe the kernel's
            add = fp8_linear(x2, w2, s2, act_quant=act_quant)
        y = scaled_mm.scaled_mm_product(x, weight, scale, swiglu_limit, add, add_row_div)
        return (y, None) if mix_fn is not None else y  # (None: hc_pre_norm mixes y itself)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    dot_f32 = x.dtype == torch.float32 and not act_quant and not rounded
    tune = tune or {}
    bm, bn, warps, per_sm, stages = launch_settings(m, dot_f32, tune)
    nb, mb, kbs = triton.cdiv(n, bn), triton.cdiv(m, bm), k // BK
    split = 1
    while nb * mb * split * 2 <= per_sm * _SMS and kbs // (split * 2) >= 2:
        split *= 2
    per = triton.cdiv(kbs, split)
    split = triton.cdiv(kbs, per)
    scale_u8 = scale.view(torch.uint8) if scale.dtype == torch.float8_e8m0fnu else scale
    part = (torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1
            else out)
    add_t = add if add is not None else out
    fp8_dot = FP8_DOT and x.dtype == torch.bfloat16
    preq_rows = tune.get("preq_rows", PREQ_ROWS if _common.MANY_ROWS else None)
    preq = (fp8_dot and (act_quant or rounded) and group == n
            and preq_rows is not None and m >= preq_rows)
    pair = x2 is not None and split > 1 and not preq
    if x2 is not None and not pair:  # no split-K pass to sum it in: a call of its own first,
        # with this product's settings, as in the launch (x2's rows are fewer: its BM no wider)
        same = {"bn": bn, "warps": warps, "per_sm": per_sm, "stages": stages}
        add = add_t = fp8_linear(x2, w2, s2, act_quant=act_quant, tune=same)
        x2 = None
    xs = x
    if preq:  # many rows: round each input block once, not once per output block
        x, xs = quant_fp8(x, k, swiglu_limit)
    if pair:
        s2_u8 = s2.view(torch.uint8) if s2.dtype == torch.float8_e8m0fnu else s2
        part2 = torch.empty(split, x2.shape[0], n, dtype=torch.float32, device=x.device)
        second = (x2, w2, s2_u8, part2, x2.shape[0], x2.stride(0), w2.stride(0),
                  s2_u8.stride(0), nb)
    else:
        second = (x, weight, scale_u8, part, 0, 0, 0, 0, nb)  # not read
    fp8_linear_kernel[(nb * (2 if pair else 1), mb, split)](
        x, xs, weight, scale_u8, out, part, add_t, m, n, k, x.stride(0), out.stride(0),
        add_t.stride(0), weight.stride(0), scale_u8.stride(0), per,
        float(swiglu_limit or 0.0), *second,
        GROUP_N=group, ACT_QUANT=act_quant and not preq, SWIGLU=swiglu_limit is not None,
        SCALE_E8M0=scale.dtype == torch.float8_e8m0fnu,
        DOT_F32=dot_f32, SPLIT=split,
        ADD_ROW_DIV=add_row_div if add is not None else 0,
        FP8_DOT=fp8_dot and act_quant, PREQ=preq, BM=bm, BN=bn, BK=BK, PAIR=pair,
        num_warps=warps, num_stages=stages, **launch_opts())
    want_mix, parts = mix_fn is not None, None
    if split > 1:
        rbn = 256
        n_cb = triton.cdiv(n, rbn)
        mix = want_mix and (add is not None or pair) and m % add_row_div == 0
        if mix:
            f, n_split = mix_fn.shape[0], add_row_div * n_cb
            fp = max(16, triton.next_power_of_2(f))
            mixp = torch.empty(n_split, m // add_row_div, fp, dtype=torch.float32,
                               device=x.device)
            sq = torch.empty(n_split, m // add_row_div, dtype=torch.float32, device=x.device)
            parts = (mixp, sq, n_split, fp)
        else:
            f, fp, mix_fn, mixp, sq = 1, 1, part, part, part  # not read
        splitk_reduce_kernel[(m, n_cb)](
            part, out, add_t, second[3], mix_fn, mixp, sq, m, n, f, second[4], out.stride(0),
            add_t.stride(0), SPLIT=split,
            ADD_ROW_DIV=add_row_div if add is not None or pair else 0, BN=rbn, PAIR=pair,
            MIX=mix, FP=fp, num_warps=4, **launch_opts())
    return (out, parts) if want_mix else out


def fp8_linear_reference(x, weight, scale, *, act_quant, group_n=None, swiglu_limit=None,
                         add=None, add_row_div=1):
    """The same function through ``mtp``'s pure-PyTorch code (the specification)."""
    from mtp import ops
    from mtp.quant import dequant_fp8_block

    w = dequant_fp8_block(weight, scale)
    n, k = weight.shape
    if swiglu_limit is not None:
        x = ops.swiglu(x[:, :k], x[:, k:], swiglu_limit).to(x.dtype)
    if group_n is not None and group_n != n:
        g = n // group_n
        xg = x.view(x.shape[0], g, k)  # [M, G*K] -> [M, G, K]
        wg = w.view(g, group_n, k)
        y = torch.einsum("tgd,grd->tgr", ops.wide(xg), wg.to(ops.wide(xg).dtype))
        y = y.to(x.dtype).flatten(1)
    else:
        y = ops.matmul(x, w, act_quant)
    if add is not None:  # row r gets add[r // add_row_div] (the last group may be short)
        y = y + add.repeat_interleave(add_row_div, dim=0)[:y.shape[0]]
    return y

"""Some rows of several tensors in one launch: ``t.index_select(0, rows)`` for each ``t``.

A catch-up's first draft step runs its prefix on every row of the call (each row's key goes
into the cache), then only each sequence's last row goes on: the attention picks those rows of
its six per-row tensors (q's latent, the key, cos, sin, the positions, the cache slots), the
block of its five (the streams, hc's post and comb mixes, the positions, the slots). Eleven
``index_select`` launches took ~34 us per call in a Flash catch-up of 4 x 128 rows on an H100,
for < 1 us of bytes, and each one, not launched with PDL, stops the next kernel's early launch
(kernels/NOTES.md, "The catch-up's timeline"). Here one launch copies every tensor's rows as
bytes: program (s, c) copies bytes [c * BW, (c + 1) * BW) of row ``rows[s]`` of each tensor.

Shape legend: T rows in, S rows out, W a row's bytes (a tensor's elements past its first
dimension times its element size), C the widest row's chunks of BW bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter

BW = 2048  # bytes a program copies of each tensor's row: 16 per thread of 4 warps


@triton.jit
def take_rows_kernel(rows_ptr, srcs, dsts, widths, N: tl.constexpr, BW: tl.constexpr):
    """Program (s, c): bytes [c * BW, (c + 1) * BW) of row rows[s] of each of the N tensors
    (srcs[j] [T, widths[j]] bytes) into row s of dsts[j]."""
    pdl_enter()
    s = tl.program_id(0)
    at = tl.program_id(1) * BW + tl.arange(0, BW)
    r = tl.load(rows_ptr + s).to(tl.int64)
    for j in tl.static_range(N):
        w = widths[j]
        inside = at < w
        v = tl.load(srcs[j] + r * w + at, mask=inside)
        tl.store(dsts[j] + s.to(tl.int64) * w + at, v, mask=inside)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """t [T, ...] with dense rows -> its bytes [T, W] (a view)."""
    return t.reshape(t.shape[0], -1).view(torch.uint8)  # [T, ...] -> [T, elements] -> [T, W]


def take_rows(rows: torch.Tensor, tensors: Sequence[torch.Tensor], *, bw: int = BW
              ) -> tuple[torch.Tensor, ...]:
    """``tuple(t.index_select(0, rows) for t in tensors)``, the same values, bit for bit, in
    one launch. rows [S] int32 or int64, each in [0, T) (not checked: the caller made them);
    tensors: each [T, ...] with the same T, contiguous, on rows' device. ``bw``: bytes per
    program of each row (a power of two, smaller ones for tests).

    Example:
        >>> q, kv = take_rows(out_rows, (q_lat, kv))  # as q_lat[out_rows], kv[out_rows]
    """
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"take_rows: rows must be int32 or int64 [S], got {rows.dtype} "
                         f"{list(rows.shape)}")
    for t in tensors:
        if t.device != rows.device or not t.is_contiguous() or not t.dim() or (
                t.shape[0] != tensors[0].shape[0]):
            raise ValueError(f"take_rows: each tensor must be contiguous [T, ...] with one T "
                             f"on rows' device ({rows.device}), got {t.dtype} {list(t.shape)} "
                             f"strides {t.stride()} on {t.device}")
    outs = tuple(torch.empty((rows.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
                 for t in tensors)
    srcs = tuple(_bytes(t) for t in tensors)
    widths = tuple(s.shape[1] for s in srcs)
    if not rows.numel() or not tensors or not max(widths):
        return outs
    grid = (rows.shape[0], triton.cdiv(max(widths), bw))
    take_rows_kernel[grid](rows, srcs, tuple(_bytes(o) for o in outs), widths, N=len(tensors),
                           BW=bw, num_warps=4, **launch_opts())
    return outs

"""The greedy pick over a vocabulary: each row's first maximum and its value, as
``torch.max(logits, dim=-1)`` gives them, in two launches that spread a row over many programs.

torch's reduction took 37 us per draft step there at V = 129,280 and 4 rows on an H100, for
0.5 MB a row (kernels/NOTES.md, "The greedy pick"). Here P programs per row
each reduce a chunk of the row to (value, index), and one program per row reduces the P
partials. The order is torch's (its CUDA ``GreaterOrNan``): a NaN beats every number, and of
equal values (or of two NaNs) the lower index wins, so the picked tokens are the same; the
value returned is the element at that index (NaN where the row holds one: the drafter's NaN
probe).

Shape legend: S rows, V vocabulary, P programs per row (<= ``PROGRAMS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter

BLOCK = 1024  # elements per load of a program: 8 float32 per thread of 4 warps
PROGRAMS = 128  # most programs per row: ~one wave at batch 1, each one or a few blocks
# the index of a padding lane (2^31 - 1: loses every tie); a constexpr, as Triton reads globals
NONE = tl.constexpr(2 ** 31 - 1)


@triton.jit
def _first_max(a, ia, b, ib):
    """The winner of (a, ia) and (b, ib): NaN first, then the larger, then the lower index."""
    a_nan = a != a
    b_nan = b != b
    lower = ia < ib
    take_a = tl.where(a_nan | b_nan, a_nan & (lower | ~b_nan), (a > b) | ((a == b) & lower))
    return tl.where(take_a, a, b), tl.where(take_a, ia, ib)


@triton.jit
def argmax_partial_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, P,
                          CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (s, p): the winner of row s's columns [p * CHUNK, (p + 1) * CHUNK)."""
    pdl_enter()
    s = tl.program_id(0)
    p = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    at = tl.full([BLOCK], NONE, tl.int32)
    for off in range(0, CHUNK, BLOCK):  # each lane sees its columns in increasing order
        cols = p * CHUNK + off + lanes
        inside = cols < V
        v = tl.load(x_ptr + s.to(tl.int64) * stride_x + cols, mask=inside, other=float("-inf"))
        best, at = _first_max(best, at, v, tl.where(inside, cols, NONE))
    v, i = tl.reduce((best, at), 0, _first_max)
    tl.store(val_ptr + s * P + p, v)
    tl.store(idx_ptr + s * P + p, i)


@triton.jit
def argmax_finish_kernel(val_ptr, idx_ptr, top_ptr, token_ptr, P, BP: tl.constexpr):
    """Program s: the winner of row s's P partials -> its value and index (int64)."""
    pdl_enter()
    s = tl.program_id(0)
    j = tl.arange(0, BP)
    m = j < P
    v = tl.load(val_ptr + s * P + j, mask=m, other=float("-inf"))
    i = tl.load(idx_ptr + s * P + j, mask=m, other=NONE)
    v, i = tl.reduce((v, i), 0, _first_max)
    tl.store(top_ptr + s, v)
    tl.store(token_ptr + s, i.to(tl.int64))


def argmax_rows(logits: torch.Tensor, *, top: torch.Tensor | None = None, block: int = BLOCK,
                programs: int = PROGRAMS) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] float32 (rows of contiguous columns) -> (values [S] float32, indices [S]
    int64): ``torch.max(logits, dim=-1)``'s, bit for bit. ``top``: a contiguous float32 [S]
    the values are written to (and returned), e.g. a row of a buffer that collects several
    picks' values. ``block``, ``programs``: the launch's elements per load and most programs
    per row (smaller ones for tests).

    Example:
        >>> top, token = argmax_rows(logits)   # as logits.max(dim=-1)
    """
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(-1) != 1:
        raise ValueError(f"argmax_rows: float32 [S, V] logits with contiguous rows expected, "
                         f"got {logits.dtype} {list(logits.shape)} strides {logits.stride()}")
    s, v = logits.shape
    if s == 0 or v == 0 or v >= NONE.value:
        raise ValueError(f"argmax_rows: 1 <= V < 2^31 columns and at least one row, got "
                         f"{list(logits.shape)}")
    if top is not None and (top.shape != (s,) or top.dtype != torch.float32
                            or not top.is_contiguous() or top.device != logits.device):
        raise ValueError(f"argmax_rows: top must be a contiguous float32 [{s}] on "
                         f"{logits.device}, got {top.dtype} {list(top.shape)} on {top.device}")
    chunk = block * triton.cdiv(triton.cdiv(v, block), programs)  # a whole number of loads
    p = triton.cdiv(v, chunk)
    dev = logits.device
    vals = torch.empty(s, p, dtype=torch.float32, device=dev)
    idxs = torch.empty(s, p, dtype=torch.int32, device=dev)
    argmax_partial_kernel[(s, p)](logits, vals, idxs, v, logits.stride(0), p, CHUNK=chunk,
                                  BLOCK=block, num_warps=4, **launch_opts())
    if top is None:
        top = torch.empty(s, dtype=torch.float32, device=dev)
    token = torch.empty(s, dtype=torch.int64, device=dev)
    argmax_finish_kernel[(s,)](vals, idxs, top, token, p, BP=max(16, triton.next_power_of_2(p)),
                               num_warps=4, **launch_opts())
    return top, token

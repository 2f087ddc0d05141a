"""The LM head for a few rows: logits = float32(y) @ float32(head)^T, y [T, D] and head [V, D]
bfloat16, float32 out (``DeepSeekV4MTP.compute_logits``'s product).

At batch 1 the head is 1.06 GB of the draft step's 1.31 (V4-Flash): a pure stream of the
weight. cuBLAS's GEMV reaches ~2.76 TB/s on an H100 where a device copy reaches ~2.97
(kernels/NOTES.md, round 5). This kernel streams it with many small programs (BN rows each,
8-16 resident per SM: their independent loads are the bytes in flight) and no tensor cores:
each lane multiplies and accumulates its column of every BK chunk in float32 (bf16 x bf16
products are exact in float32), one reduction at the end.

Shape legend: T rows (<= HEAD_T), V vocabulary, D hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter

HEAD_T = 4  # rows up to which head_logits takes this kernel (more: cuBLAS, tensor cores)


@triton.jit
def head_kernel(y_ptr, w_ptr, out_ptr, T, V, D: tl.constexpr, BT: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    pdl_enter()
    nn = tl.program_id(0) * BN + tl.arange(0, BN)
    tt = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    nmask, tmask = nn < V, tt < T
    acc = tl.zeros([BT, BN, BK], dtype=tl.float32)
    for k0 in range(0, D, BK):
        w = tl.load(w_ptr + nn[:, None].to(tl.int64) * D + k0 + kk[None, :],
                    mask=nmask[:, None], other=0.0, eviction_policy="evict_first")
        y = tl.load(y_ptr + tt[:, None] * D + k0 + kk[None, :], mask=tmask[:, None], other=0.0)
        acc += y.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    out = tl.sum(acc, axis=2)
    tl.store(out_ptr + tt[:, None] * V + nn[None, :], out, mask=tmask[:, None] & nmask[None, :])


def head_logits(y: torch.Tensor, weight: torch.Tensor, *, tune: dict | None = None
                ) -> torch.Tensor:
    """y [T, D] bf16 @ weight [V, D] bf16 ^T -> [T, V] float32, products exact and float32
    sums (the reference's product of the upcast operands). T <= ``HEAD_T`` rows take the
    kernel, more rows cuBLAS (``torch.mm(..., out_dtype=torch.float32)``). ``tune``: ``bn``,
    ``bk`` (per row), ``warps`` for benchmarks.

    Example:
        >>> logits = head_logits(y, layer.shared_head.head.weight)   # [T, V] float32
    """
    t, d = y.shape
    v = weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"head_logits: y is [{t}, {d}] but the head is {list(weight.shape)}")
    if y.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"head_logits: bfloat16 y and head expected, got {y.dtype}, "
                         f"{weight.dtype}")
    if not 0 < t <= HEAD_T or not (y.is_contiguous() and weight.is_contiguous()):
        return torch.mm(y, weight.t(), out_dtype=torch.float32)
    tune = tune or {}
    bt = triton.next_power_of_2(t)
    bn, bk = tune.get("bn", 16), tune.get("bk", 256)
    if d % bk:
        return torch.mm(y, weight.t(), out_dtype=torch.float32)
    out = torch.empty(t, v, dtype=torch.float32, device=y.device)
    # 4 warps per row: the lane accumulator [BT, BN, BK] stays at 32 floats per thread
    head_kernel[(triton.cdiv(v, bn),)](y, weight, out, t, v, D=d, BT=bt, BN=bn, BK=bk,
                                       num_warps=tune.get("warps", 4 * bt), **launch_opts())
    return out

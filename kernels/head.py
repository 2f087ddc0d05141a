"""The LM head for a few rows: logits = float32(y) @ float32(head)^T, y [T, D] and head [V, D]
bfloat16, float32 out (``DeepSeekV4MTP.compute_logits``'s product).

At batch 1 the head is most of the draft step's bytes: a pure stream of the weight. Each
program owns BN vocabulary rows and walks D in BK chunks, pipelined 3 deep, on the tensor
cores: [BN, BK] @ [BK, BT] with the rows padded to BT >= 16 (wgmma's smallest useful width);
thousands of programs keep enough loads in flight. bf16 x bf16 products are exact in float32
and the sums are float32, as cuBLAS's. Constraints: y and weight bfloat16, at most ``HEAD_T``
rows (more rows take cuBLAS, which is as fast there). Timings against cuBLAS: docs/performance.md
and kernels/NOTES.md (round 6).

Shape legend: T rows (<= HEAD_T), V vocabulary, D hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter

HEAD_T = 64  # rows up to which head_logits takes this kernel (more: cuBLAS)
# padded rows BT -> (BN, BK, warps): the sweep's best on an H100 (kernels/NOTES.md round 6)
TILES = {16: (64, 256, 4), 32: (128, 128, 8), 64: (128, 128, 8)}


@triton.jit
def head_kernel(y_ptr, w_ptr, out_ptr, T, V, D: tl.constexpr, BT: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr):
    pdl_enter()
    nn = tl.program_id(0) * BN + tl.arange(0, BN)
    tt = tl.arange(0, BT)
    kk = tl.arange(0, BK)
    nmask, tmask = nn < V, tt < T
    acc = tl.zeros([BN, BT], dtype=tl.float32)
    for k0 in tl.range(0, D, BK, num_stages=STAGES):
        w = tl.load(w_ptr + nn[:, None].to(tl.int64) * D + k0 + kk[None, :],
                    mask=nmask[:, None], other=0.0, eviction_policy="evict_first")  # [BN, BK]
        yt = tl.load(y_ptr + tt[None, :] * D + k0 + kk[:, None], mask=tmask[None, :],
                     other=0.0)  # [BK, BT]: y transposed
        acc = tl.dot(w, yt, acc)
    tl.store(out_ptr + tt[None, :] * V + nn[:, None], acc, mask=tmask[None, :] & nmask[:, None])


def head_logits(y: torch.Tensor, weight: torch.Tensor, *, tune: dict | None = None
                ) -> torch.Tensor:
    """y [T, D] bf16 @ weight [V, D] bf16 ^T -> [T, V] float32, products exact and float32
    sums (the reference's product of the upcast operands). T <= ``HEAD_T`` rows take the
    kernel, more rows cuBLAS (``torch.mm(..., out_dtype=torch.float32)``). ``tune``: ``bn``,
    ``bk``, ``stages``, ``warps`` for benchmarks.

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
    bt = max(16, triton.next_power_of_2(t))
    bn, bk, warps = TILES.get(bt, TILES[16])
    tune = tune or {}
    bn, bk = tune.get("bn", bn), tune.get("bk", bk)
    if not 0 < t <= HEAD_T or d % bk or not (y.is_contiguous() and weight.is_contiguous()):
        return torch.mm(y, weight.t(), out_dtype=torch.float32)
    out = torch.empty(t, v, dtype=torch.float32, device=y.device)
    head_kernel[(triton.cdiv(v, bn),)](y, weight, out, t, v, D=d, BT=bt, BN=bn, BK=bk,
                                       STAGES=tune.get("stages", 3),
                                       num_warps=tune.get("warps", warps), **launch_opts())
    return out

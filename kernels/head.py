"""The LM head for a few rows: logits = float32(y) @ float32(head)^T, y [T, D] and head [V, D]
bfloat16, float32 out (``DeepSeekV4MTP.compute_logits``'s product).

At batch 1 the head is most of the draft step's bytes: a pure stream of the weight. Each
program owns BN vocabulary rows and walks D in BK chunks, pipelined 3 deep, on the tensor
cores: [BN, BK] @ [BK, BT] with the rows padded to BT >= 16 (wgmma's smallest useful width);
thousands of programs keep enough loads in flight. bf16 x bf16 products are exact in float32
and the sums are float32, as cuBLAS's. Constraints: y and weight bfloat16, at most ``HEAD_T``
rows (more rows take cuBLAS, which is as fast there). Timings against cuBLAS: docs/performance.md
and kernels/NOTES.md (round 6, and "The head on an H200").

Which of the two is faster alone depends on the GPU and the shape: on an H100 this kernel beat
cuBLAS by up to 11% at one row; on an H200 cuBLAS beat it by 15% at V4-Flash's head and lost by
2% at V4-Pro's. ``kernel="auto"`` times both at the first call of each shape (device, V, D,
padded rows) outside a graph capture and keeps the faster for the process: a few milliseconds
once, with a host synchronisation (a graph capture's warm-up calls make that choice before
capturing). Inside the draft step's graphs the choice measured neutral on the H200 (the
kernel's launch overlaps the step before it, cuBLAS's does not), and a near tie can choose
differently in two processes (the logits' float32 sums in another order), so the default is
the kernel: the same bits in every run.

Shape legend: T rows (<= HEAD_T), V vocabulary, D hidden.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter

HEAD_T = 64  # rows up to which head_logits takes this kernel (more: cuBLAS)
KERNELS = ("auto", "triton", "cublas")
# cuBLAS is taken only when this much faster: a near tie keeps the kernel, so that two runs
# of a program do not flip between the two on timing noise (their sums differ in order)
MARGIN = 0.03
_CHOSEN: dict[tuple, str] = {}  # (device, V, D, padded rows) -> "triton" or "cublas"
# padded rows BT -> (BN, BK, warps): the sweep's best on an H100 (kernels/NOTES.md round 6),
# but up to 16 rows 128-column tiles of 8 warps: in the whole call ~2% faster on an H200 and
# neutral on an H100 (kernels/NOTES.md, "The head's few-row tiles")
TILES = {16: (128, 256, 8), 32: (128, 128, 8), 64: (128, 128, 8)}
STAGES = 3  # the weight's chunks in flight per program (tl.range's pipelining)


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


def head_logits(y: torch.Tensor, weight: torch.Tensor, *, kernel: str = "triton",
                tune: dict | None = None) -> torch.Tensor:
    """y [T, D] bf16 @ weight [V, D] bf16 ^T -> [T, V] float32, products exact and float32
    sums (the reference's product of the upcast operands). T <= ``HEAD_T`` rows take this
    kernel or cuBLAS (``torch.mm(..., out_dtype=torch.float32)``) as ``kernel`` says:
    ``"auto"`` the faster for this shape on this GPU (timed at its first call, see above),
    ``"triton"`` or ``"cublas"``; more rows take cuBLAS. ``tune``: ``bn``, ``bk``,
    ``stages``, ``warps`` of the kernel, for benchmarks.

    Example:
        >>> logits = head_logits(y, layer.shared_head.head.weight)   # [T, V] float32
    """
    t, d = y.shape
    if weight.shape[1] != d:
        raise ValueError(f"head_logits: y is [{t}, {d}] but the head is {list(weight.shape)}")
    if y.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise ValueError(f"head_logits: bfloat16 y and head expected, got {y.dtype}, "
                         f"{weight.dtype}")
    if kernel not in KERNELS:
        raise ValueError(f"head_logits: kernel must be one of {KERNELS}, got {kernel!r}")
    bt = max(16, triton.next_power_of_2(t))
    bk = (tune or {}).get("bk", TILES.get(bt, TILES[16])[1])
    if not 0 < t <= HEAD_T or d % bk or not (y.is_contiguous() and weight.is_contiguous()):
        kernel = "cublas"
    elif kernel == "auto":
        kernel = _choose(y, weight, bt)
    if kernel == "cublas":
        return torch.mm(y, weight.t(), out_dtype=torch.float32)
    return _launch(y, weight, bt, tune or {})


def _choose(y: torch.Tensor, weight: torch.Tensor, bt: int) -> str:
    """The faster of the kernel and cuBLAS for this shape, timed once per process (the median
    of 5 alternating calls each, after one warm-up) and remembered; inside a graph capture
    before any choice (nothing can be timed there) the kernel."""
    key = (y.device.index, weight.shape[0], weight.shape[1], bt)
    found = _CHOSEN.get(key)
    if found is not None:
        return found
    if torch.cuda.is_current_stream_capturing():
        return "triton"
    runs = {"triton": lambda: _launch(y, weight, bt, {}),
            "cublas": lambda: torch.mm(y, weight.t(), out_dtype=torch.float32)}
    ms: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(6):
        for name, run in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            if rep:  # the first of each: warm-up (compilation, cuBLAS's heuristics)
                ms[name].append(start.elapsed_time(end))
    med = {name: sorted(x)[len(x) // 2] for name, x in ms.items()}
    _CHOSEN[key] = "cublas" if med["cublas"] < (1 - MARGIN) * med["triton"] else "triton"
    return _CHOSEN[key]


def _launch(y: torch.Tensor, weight: torch.Tensor, bt: int, tune: dict) -> torch.Tensor:
    """The kernel on checked operands (T <= HEAD_T contiguous rows)."""
    t, d = y.shape
    v = weight.shape[0]
    bn, bk, warps = TILES.get(bt, TILES[16])
    bn, bk = tune.get("bn", bn), tune.get("bk", bk)
    out = torch.empty(t, v, dtype=torch.float32, device=y.device)
    head_kernel[(triton.cdiv(v, bn),)](y, weight, out, t, v, D=d, BT=bt, BN=bn, BK=bk,
                                       STAGES=tune.get("stages", STAGES),
                                       num_warps=tune.get("warps", warps), **launch_opts())
    return out

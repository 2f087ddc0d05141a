"""Routed-expert products in hand-written CUDA (``moe_fp4.cu``), compiled at first use by NVRTC
through ``torch.cuda._compile_kernel`` (torch >= 2.8: the runtime compiler ships with torch's
CUDA wheels, so no nvcc and no build step).

The same products as :func:`mtp_kernels.moe.moe_w13` / :func:`~mtp_kernels.moe.moe_w2` with the
activation FP8 rounding on (the released numerics), bfloat16 compute dtype only. The inputs
come from :func:`mtp_kernels.moe.quant_rows` (the rounded activations as exact float16 values
plus a power-of-two scale per 128 inputs); the tiles from :func:`~mtp_kernels.moe.align_tiles`.
Weights are read as stored (e2m1 bytes, E8M0 scales), decoded to float16 in registers and
multiplied on the tensor cores (``mma.sync`` m16n8k16, fp32 accumulation); every product is
exact, sums are fp32, so results match the Triton kernels' up to fp32 summation order.

Example:
    >>> pairs, texp = moe.align_tiles(idx, E, bm=TILE)     # idx [T, K]: the routing
    >>> xh, xs = moe.quant_rows(u)                            # u [T, D] bf16
    >>> act = moe_w13(xh, xs, w13, s13, pairs, texp, weights, limit=10.0)
    >>> ah, as_ = moe.quant_rows(act, pairs)
    >>> out = moe_w2(ah, as_, w2, s2, pairs, texp, T * K)   # [T*K, D] bf16
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("moe_fp4.cu")
# Pair slots per tile for these kernels (align_tiles' bm): 8 keeps one token group per tile (the
# kernel variant with fewer registers, so more warps per SM); an expert with more than 8 pairs
# gets several tiles, each reading its weights (kernels/NOTES.md, round 4, v18).
TILE = 8

# Launch settings (kernels/NOTES.md, round 4): warps per block (``wn``, each its own 16 weight
# rows), pipeline stages per warp (``stages``, a power of two, in flight together) and
# 128-input steps per stage (``steps``: 64 bytes of each row per step, so the run read from a
# row at once; halved until it divides the input's steps). A stage takes 1088 * steps + 256
# bytes of shared memory, a block at most 48 KB. The token groups of 8 per tile follow the
# tiling (``align_tiles``' bm: 8 or 16 slots). ``skip``: w2's slots without a pair load no
# activations (kernels/NOTES.md, v49; 0 is the kernel before, for the A/B).
DEFAULT_TUNE = {"wn": 4, "stages": 2, "steps": 2, "skip": 1}


def _smem(wn: int, stages: int, steps: int) -> int:
    return wn * stages * (1088 * steps + 256)


def unsupported(hidden: int, width: int) -> str | None:
    """Why these kernels cannot take experts of this hidden size and width (None: they can)."""
    if hidden % 128 or width % 128:
        return f"hidden size {hidden} and expert width {width} must be multiples of 128"
    return None


@functools.cache
def unavailable(device: torch.device) -> str | None:
    """Why these kernels cannot run on ``device`` (None: they can). Cached per device."""
    if not hasattr(torch.cuda, "_compile_kernel"):
        return f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC; torch >= 2.8)"
    if device.type != "cuda":
        return f"needs a CUDA device, got {device}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"needs compute capability >= 8.0 (mma.sync f16, cvt to bf16); device has {cap}"
    return None


@functools.cache
def _kernel(w13: bool, wn: int, groups: int, stages: int, steps: int, skip: int,
            device_index: int):
    major, minor = torch.cuda.get_device_capability(device_index)
    name = f"moe_fp4<{int(w13)}, {wn}, {groups}, {stages}, {steps}, {skip}>"
    with torch.cuda.device(device_index):
        return torch.cuda._compile_kernel(SOURCE.read_text(), name,
                                          compute_capability=f"{major}{minor}",
                                          nvcc_options=["-std=c++17"])


@functools.cache
def _driver():
    """The CUDA driver library (``cuLaunchKernel``), loaded once."""
    from torch.cuda._utils import _get_gpu_runtime_library
    return _get_gpu_runtime_library()


def _run(kernel, grid, block, args) -> None:
    """Launch a ``_compile_kernel`` kernel on the current stream (captured by CUDA graphs).
    As its own ``__call__``, with the driver library loaded once (that call re-opens the library
    and looks up ``cuLaunchKernel`` at every launch). Tensors go as pointers, ints as C int,
    floats as C double."""
    vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
            else ctypes.c_int(a) if isinstance(a, int) else ctypes.c_double(a) for a in args]
    argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
    stream = torch.cuda.current_stream().cuda_stream
    err = _driver().cuLaunchKernel(kernel.func, *grid, *block, 0, ctypes.c_void_p(stream), argv,
                                   None)
    if err:
        raise RuntimeError(f"moe_cuda: cuLaunchKernel failed with CUDA error {err}")


def _check(xh, xs, w, s, pairs, tile_expert, what):
    reason = unavailable(w.device)
    if reason:
        raise RuntimeError(f"{what}: {reason}")
    rows, k = xh.shape
    if xh.dtype != torch.float16 or xs.dtype != torch.float32 or xs.shape != (rows, k // 128):
        raise ValueError(f"{what}: xh, xs must be moe.quant_rows' float16 [R, K] and float32 "
                         f"[R, K/128]; got {xh.dtype} {tuple(xh.shape)}, {xs.dtype} "
                         f"{tuple(xs.shape)}")
    if w.dtype != torch.int8 or w.shape[-1] * 2 != k or s.shape[:-1] != w.shape[:-1] \
            or s.shape[-1] * 32 != k:
        raise ValueError(f"{what}: weights int8 [E, N, {k // 2}] with E8M0 scales [E, N, "
                         f"{k // 32}] expected; got {w.dtype} {tuple(w.shape)}, "
                         f"{tuple(s.shape)}")
    if k % 128:
        raise ValueError(f"{what}: input width {k} is not a multiple of 128")
    for name, t in (("xh", xh), ("xs", xs), ("weights", w), ("scales", s)):
        if not t.is_contiguous():
            raise ValueError(f"{what}: {name} must be contiguous")
        if t.data_ptr() % 16:  # 16-byte vector loads and asynchronous copies
            raise ValueError(f"{what}: {name} must start 16-byte aligned (a view at an offset "
                             f"is not); pass a fresh tensor (.clone())")
    if pairs.dtype != torch.int32 or tile_expert.dtype != torch.int64 \
            or pairs.numel() not in (8 * tile_expert.numel(), 16 * tile_expert.numel()):
        raise ValueError(f"{what}: pairs int32 [tiles*8] or [tiles*16] and tile_expert int64 "
                         f"[tiles] expected (moe.align_tiles, bm 8 or 16)")


def _launch(w13, xh, xs, w, s, pairs, tile_expert, rw, out, n_out, topk, limit, tune):
    cfg = {**DEFAULT_TUNE, **(tune or {})}
    wn, stages, steps = cfg["wn"], cfg["stages"], cfg["steps"]
    k = xh.shape[1]
    while (k // 128) % steps:  # steps must divide the 128-input steps (Pro: 56 and 24)
        steps //= 2
    if stages & (stages - 1) or _smem(wn, stages, steps) > 48 * 1024:
        raise ValueError(f"moe_cuda: stages a power of two, {_smem(wn, stages, steps)} bytes of "
                         f"shared memory <= 48 KB; got {cfg} for input width {k}")
    n_tiles = tile_expert.numel()
    row_groups = n_out // 8 if w13 else n_out // 16
    if n_tiles:
        groups = pairs.numel() // (8 * n_tiles)  # token groups of 8 per tile
        kern = _kernel(w13, wn, groups, stages, steps, int(cfg["skip"]), w.device.index)
        _run(kern, (n_tiles, -(-row_groups // wn), 1), (32 * wn, 1, 1),
             [xh, xs, w, s, pairs, tile_expert, rw, out, k, n_out, w.shape[0], topk,
              float(limit)])
    return out


def moe_w13(xh, xs, w13, s13, pairs, tile_expert, weights, *, limit: float,
            tune: dict | None = None):
    """xh, xs [T, D] (``quant_rows(u)``), w13 int8 [E, 2I, D/2], s13 E8M0 [E, 2I, D/32];
    tiles of 8 or 16 pair slots (``align_tiles(idx, E, bm)``) -> act [tiles*slots, I] bf16:
    the clamped SwiGLU of the gate and up products (each rounded to bf16) times the routing
    weight, in the rows of pairs (padding rows are left unwritten)."""
    _check(xh, xs, w13, s13, pairs, tile_expert, "moe_cuda.moe_w13")
    t = xh.shape[0]
    i = w13.shape[1] // 2
    if i % 8:
        raise ValueError(f"moe_cuda.moe_w13: expert width {i} is not a multiple of 8")
    if weights.dtype != torch.float32 or weights.shape[0] != t or not weights.is_contiguous():
        raise ValueError(f"moe_cuda.moe_w13: routing weights must be contiguous float32 [{t}, K] "
                         f"(moe.route); got {weights.dtype} {tuple(weights.shape)}")
    act = torch.empty(pairs.numel(), i, dtype=torch.bfloat16, device=xh.device)
    return _launch(True, xh, xs, w13, s13, pairs, tile_expert, weights, act, i,
                   weights.shape[1], limit, tune)


def moe_w2(ah, as_, w2, s2, pairs, tile_expert, n_pairs: int, *, tune: dict | None = None):
    """ah, as_ [tiles*slots, I] (``quant_rows(act, pairs)``), w2 int8 [E, D, I/2], s2 E8M0
    [E, D, I/32] -> [n_pairs, D] bf16 per pair."""
    _check(ah, as_, w2, s2, pairs, tile_expert, "moe_cuda.moe_w2")
    d = w2.shape[1]
    if d % 16:
        raise ValueError(f"moe_cuda.moe_w2: output width {d} is not a multiple of 16")
    out = torch.empty(n_pairs, d, dtype=torch.bfloat16, device=ah.device)
    return _launch(False, ah, as_, w2, s2, pairs, tile_expert, out, out, d, 1, 0.0, tune)

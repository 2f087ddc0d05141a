"""The FP8 products of many rows by cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm`` with
DeepSeek-style scales: 1 x 128 for the activations, 128 x 128 for the weight; sm_90 with
CUDA >= 12.9), in place of ``fp8_linear``'s Triton kernel where ``fp8_linear.CUBLAS_ROWS``
allows.

The same function as the kernel's PREQ path: ``quant_fp8`` rounds the input once into e4m3
codes and power-of-two scales, the GEMM sums each 128-column block's code products on the
FP8 tensor cores and adds it, times both blocks' scales, into a float32 accumulator (the
reference's own FP8 GEMM does the same), and the bf16 result takes the broadcast add
(``add``/``add_row_div``) as the kernel's epilogue does: ``bf16(bf16(acc) + add)``.
Why: Triton 3.9 waits for each block's tensor-core dot before its rescale, so its product
runs at a third of the FP8 rate (kernels/NOTES.md, v39).

cuBLASLt's layouts: the activations' scales outer-dim-major (``quant_fp8(...,
scales_outer_major=True)``, their leading dimension a multiple of 4, so the rows are padded
to one), the weight's [N/128, K/128] float32 and row-major (a copy of the checkpoint's E8M0
scales, made by every call from the scales as they are then: by the launch that rounded an
:class:`FP8Rows` input, else by a torch conversion).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import launch_opts, pdl_enter


class FP8Rows(NamedTuple):
    """A product's input rounded ahead by the kernel that made it, in cuBLAS's form (what
    ``quant_fp8(x, K, rows=R, scales_outer_major=True)`` returns, bit for bit): ``codes`` [R,
    K] float8_e4m3fn (R: m rounded up to a multiple of 4), ``scales`` [R, K/128] float32
    outer-dim-major, ``m`` the real rows; ``weight_scale``: the float32 scales of the weight
    it is for, converted by the same launch (None: the product converts them)."""

    codes: torch.Tensor
    scales: torch.Tensor
    m: int
    weight_scale: torch.Tensor | None = None


def padded_rows(m: int) -> int:
    """Rows of a cuBLAS input of m rows: cuBLASLt takes the scales' leading dimension a
    multiple of 4."""
    return -(-m // 4) * 4


def _f32_scales(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` [N/128, K/128] (E8M0 or float32) as contiguous float32: the tensor itself
    where it is one, else a copy made on every call (~1,000 elements, one small launch). Not
    kept between calls: a kept copy misses writes that bump no version counter
    (``param.data.copy_(...)``, as engines' weight loaders write), and inside a captured
    graph it would be the copy made before capture, where the rest of the layer reads its
    weights in place at every replay (so does this copy, as a node of the graph)."""
    if scale.dtype == torch.float32 and scale.is_contiguous():
        return scale
    return scale.float().contiguous()


# The broadcast add (h_proj + e_proj) by add_rows_ (True) or torch's add (False: 27 us at a
# Flash 4 x 128 catch-up's 2,048 rows on an H100, 1.4 TB/s; the kernel took 17.5 us of it,
# -0.8%: kernels/NOTES.md v40; on since v42, with backend.ROUND_IN_NORMS). Tiles of ADD_BM x
# ADD_BN elements, 8 bf16 (16 bytes) per thread and load.
ADD_KERNEL = True
ADD_BM, ADD_BN = 4, 256

_WHY_NOT: dict[torch.device, str | None] = {}


def ready(device: torch.device) -> bool:
    """Whether the block-scaled GEMM runs on ``device`` (:func:`unavailable`'s answer, found
    once; during graph capture, where no probe may run, False until then)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _WHY_NOT:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _WHY_NOT[device] = unavailable(device)
    return _WHY_NOT[device] is None


def unavailable(device: torch.device) -> str | None:
    """Why the block-scaled GEMM cannot run on ``device`` (None: it can): an sm_90 GPU and a
    torch whose ``_scaled_mm`` takes the DeepSeek recipe there, found by one small product
    (checked against its exact value). Not during graph capture."""
    if device.type != "cuda":
        return f"{device} is not a CUDA device"
    cap = torch.cuda.get_device_capability(device)
    if cap != (9, 0):
        return f"sm_{cap[0]}{cap[1]}: torch's cuBLAS block-scaled FP8 GEMM is for sm_90"
    k = 4 * 128  # (K / 128 a multiple of 4, as CUBLAS_ROWS' products have)
    a = torch.ones(16, k, device=device).to(torch.float8_e4m3fn)
    w = torch.ones(128, k, device=device).to(torch.float8_e4m3fn)
    sa = torch.full((k // 128, 16), 2.0, device=device).t()  # [16, K/128], outer-dim-major
    sw = torch.full((1, k // 128), 0.5, device=device)
    try:
        y = torch._scaled_mm(a, w.t(), sa, sw.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
        return f"torch {torch.__version__}'s _scaled_mm refused the block-scaled recipe: {err}"
    if not torch.equal(y.float(), torch.full((16, 128), float(k), device=device)):
        return "torch._scaled_mm's block-scaled product gave a wrong value"
    return None


def scaled_mm_product(x: torch.Tensor | FP8Rows, weight: torch.Tensor, scale: torch.Tensor,
                      swiglu_limit: float | None = None, add: torch.Tensor | None = None,
                      add_row_div: int = 1) -> torch.Tensor:
    """``fp8_linear(x, weight, scale, act_quant=True, ...)`` for bf16 x [M, K] (or [M, 2K]
    with ``swiglu_limit``), or x rounded ahead (:class:`FP8Rows`: then bf16 out), by cuBLAS
    -> [M, N] bf16 (M divisible by ``add_row_div`` where ``add`` [M / add_row_div, N] is
    given).

    Example:
        >>> y = scaled_mm_product(hn, h_proj.weight, h_proj.weight_scale_inv, add=e,
        ...                       add_row_div=4)
    """
    from .fp8_linear import quant_fp8  # (fp8_linear imports this module)
    n, k = weight.shape
    if isinstance(x, FP8Rows):
        q, xs, m, dtype = x.codes, x.scales, x.m, torch.bfloat16
        sw = x.weight_scale if x.weight_scale is not None else _f32_scales(scale)
        return _product(q, xs, sw, weight, m, dtype, add, add_row_div)
    m, dtype = x.shape[0], x.dtype
    q, xs = quant_fp8(x, k, swiglu_limit, rows=padded_rows(m), scales_outer_major=True)
    return _product(q, xs, _f32_scales(scale), weight, m, dtype, add, add_row_div)


def _product(q, xs, sw, weight, m: int, dtype, add, d: int) -> torch.Tensor:
    y = torch._scaled_mm(q, weight.t(), xs, sw.t(), out_dtype=dtype)[:m]
    if add is None:
        return y
    if ADD_KERNEL:
        return add_rows_(y, add, d)
    n = weight.shape[0]
    return (y.view(m // d, d, n) + add[:, None, :]).view(m, n)  # [M, N] -> [M/d, d, N]


@triton.jit
def add_rows_kernel(y_ptr, a_ptr, M, N, stride_am, D: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr):
    """Block (i, j) of y [M, N] (contiguous) += a[row // D] in place, each sum rounded to y's
    dtype once (as torch's add of two bf16 tensors)."""
    pdl_enter()
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    at = y_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    y = tl.load(at, mask=mask).to(tl.float32)
    a = tl.load(a_ptr + (rows // D).to(tl.int64)[:, None] * stride_am + cols[None, :],
                mask=mask).to(tl.float32)
    tl.store(at, (y + a).to(y_ptr.dtype.element_ty), mask=mask)


def add_rows_(y: torch.Tensor, add: torch.Tensor, d: int) -> torch.Tensor:
    """``y += add.repeat_interleave(d, 0)`` in place, one launch: y [M, N] contiguous, add
    [M / d, N] (last dim contiguous) of y's dtype -> y.

    Example:
        >>> x = add_rows_(h_proj_out, e_proj_out, 4)  # each token's e_proj on its 4 streams
    """
    m, n = y.shape
    if m:
        add_rows_kernel[(triton.cdiv(m, ADD_BM), triton.cdiv(n, ADD_BN))](
            y, add, m, n, add.stride(0), D=d, BM=ADD_BM, BN=ADD_BN, num_warps=4,
            **launch_opts())
    return y

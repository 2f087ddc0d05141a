"""Weight formats of the released checkpoints, and the reference's FP8 rounding steps.

Small pure functions, each testable on hand-built bytes:

- :func:`dequant_fp8_block`: ``float8_e4m3fn`` weight x 128x128 block scale (E8M0 or float32).
- :func:`dequant_fp4`: e2m1 codes packed two per int8 byte (even element in the low nibble) x
  per-32 E8M0 scale.
- :func:`fp8_simulate`: quantise to e4m3 and back in blocks along the last dim with power-of-two
  scales, as the reference does to activations (blocks of 128) and to the cached KV (blocks of 64).
- :func:`quantize_fp8_block`, :func:`quantize_fp4`: the inverse direction, used to write random
  checkpoints in the released formats (tests, demo, benchmarks).

E8M0 scales are decoded to the floats 2^(b-127) (exact in float32) and never copied as raw bytes
into a float buffer or numerically into an integer one (both have produced silent garbage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .config import FP4_BLOCK, FP8_BLOCK

E4M3 = torch.float8_e4m3fn
E8M0 = torch.float8_e8m0fnu
E4M3_MAX = 448.0
# The reference multiplies amax by float32(1/448) rather than dividing by 448.
_INV_E4M3_MAX = torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)
_AMAX_FLOOR = 1e-4  # reference: amax is clamped here so all-zero blocks get a finite scale.

# e2m1 code -> value; codes 8..15 are the negatives of 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0

Storage = Literal["fp8", "fp4", "plain"]
ScaleDtype = Literal["e8m0", "f32"]


@dataclass(frozen=True)
class WeightFormat:
    """How each family of weights is held in memory (as stored in the checkpoint).

    ``dense``: wq_a, wkv, wq_b, wo_b, e_proj, h_proj and the shared expert ("fp8" or "plain").
    ``wo_a``: "fp8" (release) or "plain" (the reference converter's bf16).
    ``experts``: the routed experts: "fp4" (release), "fp8" (``-Base``) or "plain".
    ``*_scale``: dtype of the block scales, "e8m0" (release) or "f32" (``-Base`` experts).
    "plain" means held in the module's compute dtype (tiny tests, dequantised exports).

    Example:
        >>> WeightFormat.released().experts
        'fp4'
    """

    dense: Storage = "fp8"
    dense_scale: ScaleDtype = "e8m0"
    wo_a: Storage = "fp8"
    experts: Storage = "fp4"
    expert_scale: ScaleDtype = "e8m0"

    def __post_init__(self) -> None:
        for key, allowed in (("dense", ("fp8", "plain")), ("wo_a", ("fp8", "plain")),
                             ("experts", ("fp4", "fp8", "plain")),
                             ("dense_scale", ("e8m0", "f32")), ("expert_scale", ("e8m0", "f32"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"WeightFormat.{key}={getattr(self, key)!r}; "
                                 f"expected one of {allowed}")

    @classmethod
    def released(cls) -> WeightFormat:
        """The official V4-Flash / V4-Pro release: FP8 + E8M0, FP4 routed experts."""
        return cls()

    @classmethod
    def plain(cls) -> WeightFormat:
        """Everything dequantised, held in the compute dtype."""
        return cls(dense="plain", wo_a="plain", experts="plain")


def scale_dtype(kind: ScaleDtype) -> torch.dtype:
    return E8M0 if kind == "e8m0" else torch.float32


# ---- decoding ------------------------------------------------------------------------------
def scale_to_float(scale: torch.Tensor) -> torch.Tensor:
    """Block scale -> float32 multipliers. Accepts ``float8_e8m0fnu``, raw uint8 exponents, or
    float32/bfloat16 values (the ``-Base`` checkpoints). E8M0 byte b is 2^(b-127); 255 is NaN.

    Example:
        >>> scale_to_float(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist()[1:]
        [1.0, 1.7014118346046923e+38]
    """
    if scale.dtype == torch.uint8:
        out = torch.exp2(scale.to(torch.float32) - 127.0)
        return out.masked_fill(scale == 255, float("nan"))
    return scale.to(torch.float32)


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block_r: int, block_c: int):
    """[..., ceil(rows/br), ceil(cols/bc)] -> [..., rows, cols], each scale over its block."""
    s = scale.repeat_interleave(block_r, dim=-2)[..., :rows, :]
    return s.repeat_interleave(block_c, dim=-1)[..., :cols]


def dequant_fp8_block(weight: torch.Tensor, scale: torch.Tensor,
                      block: int = FP8_BLOCK) -> torch.Tensor:
    """``W[r, c] = float(q[r, c]) * scale[r // block, c // block]`` in float32.

    Works on stacked experts too (leading dims are batch dims).

    Example:
        >>> q = torch.full((2, 3), 1.5).to(E4M3)
        >>> s = torch.tensor([[128]], dtype=torch.uint8)      # 2^(128-127) = 2
        >>> dequant_fp8_block(q, s).tolist()
        [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]
    """
    rows, cols = weight.shape[-2:]
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape[-2:]) != expected:
        raise ValueError(f"FP8 block scale has shape {tuple(scale.shape)}; expected "
                         f"[..., {expected[0]}, {expected[1]}] for a weight of [{rows}, {cols}]")
    s = _expand_blocks(scale_to_float(scale), rows, cols, block, block)
    return weight.to(torch.float32) * s


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [..., n/2] of packed e2m1 codes -> float32 [..., n] (low nibble first).

    Example:
        >>> unpack_fp4(torch.tensor([[0x21, 0x9F]], dtype=torch.uint8)).tolist()
        [[0.5, 1.0, -6.0, -0.5]]
    """
    if packed.dtype not in (torch.int8, torch.uint8):
        packed = packed.view(torch.uint8)
    b = packed.view(torch.uint8).to(torch.int64)
    codes = torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)  # [..., n/2, 2] -> [..., n]
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=packed.device)
    return table[codes]


def dequant_fp4(packed: torch.Tensor, scale: torch.Tensor,
                block: int = FP4_BLOCK) -> torch.Tensor:
    """``W[r, j] = fp4(r, j) * scale[r, j // 32]`` in float32, for [..., out, in/2] bytes."""
    values = unpack_fp4(packed)
    rows, cols = values.shape[-2:]
    if tuple(scale.shape[-2:]) != (rows, cols // block):
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}; expected "
                         f"[..., {rows}, {cols // block}] for {cols} inputs")
    return values * scale_to_float(scale).repeat_interleave(block, dim=-1)


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, storage: Storage) -> torch.Tensor:
    """Any stored weight -> float32 values (exact: every stored value fits in float32)."""
    if storage == "plain":
        return weight.to(torch.float32)
    if scale is None:
        raise ValueError(f"a {storage} weight needs its scale tensor")
    return dequant_fp4(weight, scale) if storage == "fp4" else dequant_fp8_block(weight, scale)


# ---- the reference's FP8 rounding of activations and KV --------------------------------------
def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(max(amax, 1e-4) * float32(1/448))), the ceiling read off the float32 bits
    exactly as the reference kernel does (exponent - 127, plus 1 if any mantissa bit is set)."""
    v = amax.to(torch.float32).clamp_min(_AMAX_FLOOR) * _INV_E4M3_MAX.to(amax.device)
    bits = v.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.exp2(exponent.to(torch.float32))


def fp8_simulate(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantise ``x`` to e4m3 and back in blocks of ``block`` along the last dim, with
    power-of-two scales and round-to-nearest-even; returns ``x``'s dtype (the values are
    e4m3 x 2^k, exact in bfloat16 and float32).

    Example:
        >>> # amax 3 -> scale 2^-7; 1.0626 / 2^-7 = 136.01 rounds to the e4m3 value 144
        >>> fp8_simulate(torch.tensor([1.0, 1.0626, -3.0, 0.0]), block=4).tolist()
        [1.0, 1.125, -3.0, 0.0]
    """
    *lead, n = x.shape
    if n % block:
        raise ValueError(f"fp8_simulate: last dim {n} is not a multiple of block {block}")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    xb = x.to(wide).reshape(*lead, n // block, block)  # [..., n] -> [..., blocks, block]
    scale = pow2_scale(xb.abs().amax(dim=-1, keepdim=True)).to(wide)
    q = to_e4m3((xb / scale).clamp(-E4M3_MAX, E4M3_MAX))
    return (q.to(wide) * scale).reshape(x.shape).to(x.dtype)


def to_e4m3(y: torch.Tensor) -> torch.Tensor:
    """Round to ``float8_e4m3fn``, nearest-even, correctly also from float64.

    torch converts float64 through float32, and that double rounding moves values within a
    float32 ulp of an e4m3 tie (seen: -4.25000006 became -4.0, not -4.5). Rounding to float32
    with round-to-odd first makes the second rounding exact (24 bits >= 4 + 2)."""
    if y.dtype != torch.float64:
        return y.to(E4M3)
    y32 = y.to(torch.float32)
    over = y32.to(torch.float64).abs() > y.abs()
    trunc = torch.where(over, torch.nextafter(y32, torch.zeros_like(y32)), y32)
    inexact = trunc.to(torch.float64) != y
    odd = (trunc.view(torch.int32) | 1).view(torch.float32)
    return torch.where(inexact, odd, trunc).to(E4M3)


# ---- encoding (for writing checkpoints in the released formats) ------------------------------
def quantize_fp8_block(w: torch.Tensor, scale_kind: ScaleDtype = "e8m0",
                       block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (e4m3 [out, in], scale [ceil(out/128), ceil(in/128)]), power-of-two
    scales chosen so each block's amax fits 448. ``dequant_fp8_block`` inverts it up to e4m3
    rounding."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.to(torch.float32)
    blocks = padded.view(br, block, bc, block)  # [br, block, bc, block]
    scale = pow2_scale(blocks.abs().amax(dim=(1, 3)))  # [br, bc]
    q = (w.to(torch.float32) / _expand_blocks(scale, rows, cols, block, block))
    q = q.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale.to(scale_dtype(scale_kind))


def quantize_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float [out, in] -> (int8 [out, in/2] packed e2m1, E8M0 scale [out, in/32]): per 32 inputs
    a power-of-two scale so the amax fits 6, then nearest e2m1 code."""
    rows, cols = w.shape
    wb = w.to(torch.float32).reshape(rows, cols // block, block)
    amax = wb.abs().amax(dim=-1, keepdim=True).clamp_min(2.0 ** -100)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP4_MAX)))
    v = (wb / scale).reshape(rows, cols)
    table = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    mag = (v.abs().unsqueeze(-1) - table).abs().argmin(dim=-1)  # nearest magnitude code 0..7
    codes = (mag + 8 * (v < 0)).to(torch.uint8)  # [out, in]
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.reshape(rows, cols // block).to(E8M0)

"""Device helpers shared by the kernels: the reference's FP8 activation rounding, E8M0 and
e2m1 decoding, done in registers.

Every helper reproduces a function of ``mtp.quant`` exactly (same power-of-two scales, same
round-to-nearest-even e4m3 cast); the parity tests check them bit for bit.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tlc

# Operand dtype of the "exact" dots: every operand value is exact in bfloat16. Triton's CPU
# interpreter mishandles bfloat16 (used only to develop), so there the dots run in float32,
# which holds the same values exactly.
INTERPRET = tl.constexpr(bool(os.environ.get("TRITON_INTERPRET")))
EXACT = tl.constexpr(tl.float32 if os.environ.get("TRITON_INTERPRET") else tl.bfloat16)

INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)  # used as float32, as the reference


# Programmatic dependent launch (sm_90+). Every kernel starts with pdl_enter(): it waits until
# the kernel before it in the stream has finished and its writes are visible
# (griddepcontrol.wait; a no-op without the launch attribute), then lets the next kernel
# launch. With the attribute (launch_opts(), PDL on), a kernel's launch and its blocks' start
# overlap the previous kernel's tail instead of following its completion: a draft step at
# batch 1 is ~40 dependent launches. The wait comes first, so nothing is read early, and only
# one kernel waits ahead (launching the next before the wait queued the whole chain: slower).
# Off by default (eager calls); `graph.DraftStepGraphs` captures small buckets with it
# (kernels/NOTES.md, round 4 v20 and round 5).
PDL_ARCH = tl.constexpr(not os.environ.get("TRITON_INTERPRET") and torch.cuda.is_available()
                        and torch.cuda.get_device_capability() >= (9, 0))
PDL = False  # the launch attribute (only honoured where PDL_ARCH)

# The catch-up paths for many rows (fp8_linear rounds its input once ahead from PREQ_ROWS
# rows, attention takes ATTN_MANY_BH heads per program from ATTN_MANY_T rows, the hc mixes
# are one cuBLAS product above MIX_MANY_T rows). False: the decode-tuned kernels at every row
# count (benchmarks' A/B; tests/test_kernels.py "many rows" and tests/test_gpu_fast_path.py
# catch-up run both).
MANY_ROWS = True


@triton.jit
def pdl_enter():
    if PDL_ARCH:
        tlc.gdc_wait()
        tlc.gdc_launch_dependents()


def launch_opts() -> dict:
    """Launch options of every kernel: programmatic dependent launch where it is on."""
    return {"launch_pdl": True} if PDL and PDL_ARCH else {}


@functools.cache
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (132 for the CPU interpreter: sizing only)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def pow2_scale_bits(amax):
    """Exponent e of 2^ceil(log2(max(amax, 1e-4) * float32(1/448))), read off the float32 bits
    like ``mtp.quant.pow2_scale`` (exponent - 127, plus 1 if any mantissa bit is set)."""
    v = tl.maximum(amax, 1e-4) * INV_E4M3_MAX
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)


@triton.jit
def exp2_int(e):
    """2^e as float32 for integer e in [-126, 127], exact (built from the exponent bits)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8_round(x, e):
    """e4m3(clamp(x / 2^e, -448, 448)) as float32 values (not yet multiplied back by 2^e).
    Division by a power of two is a multiplication by its exact reciprocal."""
    y = x * exp2_int(-e)[:, None]
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return _round_e4m3(y)


@triton.jit
def rms_row(x, w, n, eps):
    """``ops.rms_norm`` of one row: x float32 (masked lanes 0) of n values, weight w ->
    w * (x * rsqrt(mean(x^2) + eps)) in float32 (rmsnorm, embed_norms and attn_prep's q_norm)."""
    return w * (x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps))


@triton.jit
def even_odd8(q, BD: tl.constexpr):
    """[BD] values -> each 8 in the order 0 2 4 6 1 3 5 7 (``moe.quant_rows``' layout: the CUDA
    expert kernels' float16 pairs): [BD] -> [BD/8, 4, 2] -> [BD/8, 2, 4] -> [BD]."""
    return tl.reshape(tl.permute(tl.reshape(q, (BD // 8, 4, 2)), (0, 2, 1)), (BD,))


@triton.jit
def _round_e4m3(y):
    """e4m3 rounding (nearest-even) of |y| <= 448 as float32 values."""
    if INTERPRET:
        return _e4m3_rne(y)
    return y.to(tl.float8e4nv).to(tl.float32)


@triton.jit
def _e4m3_rne(y):
    """Round |y| <= 448 to e4m3 (nearest-even, subnormals below 2^-6) with float32 adds, for
    the CPU interpreter, whose float8 cast is not correctly rounded: adding and subtracting
    1.5 * 2^23 * ulp rounds to a multiple of ulp in IEEE arithmetic."""
    a = tl.abs(y)
    ex = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6) - 3 + 23
    c = (((ex + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (a + c) - c
    return tl.where(y < 0, -r, r)


@triton.jit
def e8m0_to_f32(b):
    """E8M0 byte(s) (as integers) -> 2^(b-127). Bytes 1..254 are exact; 0 (2^-127, subnormal)
    and 255 (NaN) do not occur in real scales and decode to 0 / inf."""
    return (b.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_as_torch(b):
    """E8M0 byte(s) b (int32) -> float32 as torch converts them (``.float()``): 2^(b - 127),
    byte 0 the subnormal 2^-127, byte 255 NaN (E8M0's own values): cuBLAS's float32 weight
    scales, converted by the launch that rounds the product's input."""
    bits = tl.where(b == 0, 0x400000, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def store_fp8_row(q_ptr, s_ptr, row, rows_out, xf, D, BD: tl.constexpr):
    """One row's ``fp8_simulate`` (blocks of 128) as cuBLAS reads it (``quant_fp8(...,
    rows=rows_out, scales_outer_major=True)``'s layout, bit for bit): x float32 [BD] (masked
    lanes 0) -> e4m3 codes into q[row] ([rows_out, D]) and the blocks' scales 2^e into s[kb,
    row] ([D/128, rows_out] memory)."""
    xb = tl.reshape(xf, (BD // 128, 128))  # [BD] -> [blocks, 128]
    e = pow2_scale_bits(tl.max(tl.abs(xb), axis=1))
    qv = tl.reshape(fp8_round(xb, e), (BD,))  # [blocks, 128] -> [BD]
    dd = tl.arange(0, BD)
    tl.store(q_ptr + row * D + dd, qv.to(tl.float8e4nv), mask=dd < D)
    b = tl.arange(0, BD // 128)
    tl.store(s_ptr + b * rows_out + row, exp2_int(e), mask=b < D // 128)


@triton.jit
def e2m1_times_2pow126(b, shift: tl.constexpr):
    """The e2m1 code in bits [shift, shift+4) of b (int32) as float32 value * 2^-126, exact:
    the sign goes to bit 31 and the 3 magnitude bits to bits 22-24 (exponent's low 2 bits and
    the mantissa's top bit), so exponent e >= 1 reads 2^(e-127) * (1 + m/2) and e = 0 the
    subnormal m * 2^-127. Five integer ops, no selects."""
    bits = ((b << (28 - shift)) & -2147483648) | (((b >> shift) & 7) << 22)
    return bits.to(tl.float32, bitcast=True)


# e2m1 -> float16 bits worth value * 2^-14, four bytes (eight codes) per 32-bit register.
# For a code c = s e1 e0 m, fp16 bits (c & 7) << 9 | (c & 8) << 12 put e1 e0 into the exponent's
# two low bits and m into the mantissa's top bit: exponent field E = e1 e0 >= 1 reads
# 2^(E-15) (1 + m/2) = value * 2^-14, and E = 0 the subnormal 2^-14 (m/2) = value * 2^-14 too.
# Each 16-bit lane gets one code: prmt spreads two bytes into the two lanes, an and keeps one
# nibble per lane, two shifts place magnitude and sign, one lop3 ((a | b) & 0x8E008E00, lut
# 0xA8) merges them: 18 integer ops per 8 codes (the float32 decode: ~6 per code).
_E2M1X4_F16_ASM = tl.constexpr("""{
.reg .b32 x, y, t, a, b, z;
mov.b32 z, 0;
prmt.b32 x, $4, z, 0x4140;
prmt.b32 y, $4, z, 0x4342;
and.b32 t, x, 0x000F000F;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
lop3.b32 $0, a, b, 0x8E008E00, 0xA8;
and.b32 t, y, 0x000F000F;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
lop3.b32 $1, a, b, 0x8E008E00, 0xA8;
and.b32 t, x, 0x00F000F0;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
lop3.b32 $2, a, b, 0x8E008E00, 0xA8;
and.b32 t, y, 0x00F000F0;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
lop3.b32 $3, a, b, 0x8E008E00, 0xA8;
}""")


@triton.jit
def e2m1_pair_f16(b):
    """e2m1 byte(s) b (int8, low nibble first) -> (low code, high code) as float16 value *
    2^-14, exact (see ``_E2M1X4_F16_ASM``); inline PTX, four bytes per asm block."""
    return tl.inline_asm_elementwise(_E2M1X4_F16_ASM, "=r,=r,=r,=r,r", [b],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def mma(a, b):
    """a @ b on operands whose values are exact in bfloat16, fp32 accumulation."""
    return tl.dot(a.to(EXACT), b.to(EXACT))

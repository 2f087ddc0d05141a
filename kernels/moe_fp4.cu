// Routed-expert products with FP4 weights (e2m1 codes, E8M0 scale per 32 inputs) on the tensor
// cores: mma.sync m16n8k16 f16 x f16 -> fp32 (sm_80 and later). Compiled at run time by NVRTC
// (mtp_kernels.moe_cuda): no CUDA headers, every non-trivial instruction in PTX.
//
// Why by hand: the Triton kernels (moe.py) stall at ~1.6 TB/s (kernels/NOTES.md, rounds 3-4).
// Here the weights stream through a per-warp ring of cp.async stages in shared memory (no
// registers held while in flight), ldmatrix hands each thread exactly the bytes of its mma
// fragment, and the e2m1 -> float16 decode is 11 integer ops per 8 codes.
//
// One warp computes 16 weight rows (A, the mma's M) against up to 8 rows of a tile's
// activations (B, the mma's N; a tile holds 8G (token, expert) pairs of one expert, as
// moe.align_tiles builds them, in G groups of 8). One 32-input block is two k16 mmas whose
// A fragments come from the four threads of each row, four bytes (8 codes) each, so the pair
// has one weight scale per row, applied to its fp32 result on the CUDA cores. The 32 inputs
// of a block enter the mmas in a permuted order (A and B alike; a dot product does not care):
// thread c holds inputs 8c + {0, 2, 4, 6} for the first, 8c + {1, 3, 5, 7} for the second.
//
// Activations come in as float16 e4m3 values (exact) with a power-of-two scale per 128 inputs,
// each 8 inputs stored in the order above (moe.quant_rows: the reference's FP8 activation
// rounding, exactly), so every product is exact and that scale too is applied per 128 inputs
// on the CUDA cores.
//
// Shapes: xh [rows, K] float16, xs [rows, K/128] fp32; w [E, N, K/2] bytes, ws [E, N, K/32]
// E8M0 bytes; pairs [tiles*8G] int32 (pair id t*topk + k, or -1), texp [tiles] int64 (>= E:
// empty tile). W13: N = 2I (gate rows, then up rows), out = act [tiles*8G, I] bf16 (clamped
// SwiGLU times the routing weight); else N = D, out [P, D] bf16 per pair.
// Template: W13, WN warps per block, G token groups per tile, S stages (a power of two), P
// 128-input steps per stage, SK: w2's slots without a pair load no activations (1) or load
// their rows anyway (0: the kernel before v49, for the A/B).

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

// e2m1 -> float16, exactly value(code) * 2^-14: for a code s e1 e0 m the float16 bits are
// s << 15 | e1 e0 m << 9 (exponent E = e1 e0 >= 1 reads 2^(E-15) (1 + m/2) = 2^-14 * 2^(E-1)
// (1 + m/2); E = 0 the subnormal 2^-14 * m/2), so only the high byte is ever non-zero:
// hbyte(c) = (c & 7) << 1 | (c & 8) << 4. Built for four codes per register op, then each
// float16 pair placed by one prmt (zero low bytes): 11 integer ops per 8 codes.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// A word's 8 codes (byte j: inputs 2j, 2j + 1 of its 8) -> 4 float16 pairs:
// f[0] = inputs {0, 2}, f[1] = {4, 6}, f[2] = {1, 3}, f[3] = {5, 7}.
__device__ __forceinline__ void e2m1x8_f16(u32 w, u32 (&f)[4]) {
  const u32 lo = ((w << 1) & 0x0E0E0E0Eu) | ((w << 4) & 0x80808080u);  // hbyte of low nibbles
  const u32 hi = ((w >> 3) & 0x0E0E0E0Eu) | (w & 0x80808080u);         // of high nibbles
  f[0] = prmt(lo, 0u, 0x1404u);  // bytes [0, lo.0, 0, lo.1]
  f[1] = prmt(lo, 0u, 0x3424u);
  f[2] = prmt(hi, 0u, 0x1404u);
  f[3] = prmt(hi, 0u, 0x3424u);
}

// d += A (16 x 16, f16) @ B (16 x 8, f16), fp32 accumulation. (FP8 mma.sync exists for
// sm_89+, but on sm_90 ptxas expands it into conversions to f16 and two of these.)
__device__ __forceinline__ void mma_f16(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                        u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ldg128(const u16* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}
// Asynchronous global -> shared copies (no registers held while in flight), in groups.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async8(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

// Four 8 x 16-byte matrices from shared memory; lane l gives the address of row l % 8 of
// matrix l / 8, and thread (g, c) receives bytes 4c .. 4c+3 of row g of each.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

__device__ __forceinline__ float e8m0(u32 word, int j) {  // byte j of word -> 2^(b - 127)
  return __uint_as_float(((word >> (8 * j)) & 0xFFu) << 23);  // 0 -> 0, as the Triton kernels
}

__device__ __forceinline__ u16 to_bf16(float x) {  // round to nearest even
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ float bf16_round(float x) {
  return __uint_as_float(static_cast<u32>(to_bf16(x)) << 16);
}

// Shared memory per warp and pipeline stage: the 16 weight rows' bytes of P 128-input steps
// (64 bytes per row and step: the longer the run read from each row at once, the better the
// DRAM pages are used), rows 64P + 16 bytes apart (ldmatrix reads 8 rows of 16 bytes; the
// 16-byte pad puts them in 8 distinct groups of 4 banks), then the rows' 4P scale bytes.
template <int P>
struct Stage {
  static constexpr int ROW = 64 * P + 16;
  static constexpr int SCALES = 16 * ROW;
  static constexpr int BYTES = SCALES + 16 * 4 * P;
};

template <int W13, int WN, int G, int S, int P, int SK>
__global__ void __launch_bounds__(32 * WN)
moe_fp4(const u16* __restrict__ xh, const float* __restrict__ xs, const u8* __restrict__ w,
        const u8* __restrict__ ws, const int* __restrict__ pairs, const i64* __restrict__ texp,
        const float* __restrict__ rw, u16* __restrict__ out, int K, int n_out, int E,
        int topk, double limit) {
  static_assert((S & (S - 1)) == 0, "S a power of two");
  using St = Stage<P>;
  __shared__ __align__(128) u8 smem[WN][S][St::BYTES];
  const int tile = blockIdx.x;
  const i64 ex = texp[tile];
  if (ex >= E) return;  // an empty tile (align_tiles pads the grid with them)
  const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
  const int warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.y * WN + warp) * (W13 ? 8 : 16);  // this warp's output rows
  if (n0 >= n_out) return;  // no block-wide barrier below: warps run independently
  // weight row of stage row i (A rows g and g + 8; w13: gate and up of output n0 + g)
  auto wrow = [&](int i) { return i < 8 ? n0 + i : (W13 ? n_out + n0 + i - 8 : n0 + i); };
  const int rows_w = W13 ? 2 * n_out : n_out;
  const int kw = K / 2, kb = K / 32, ksteps = K / 128;
  const u8* we = w + ex * (i64)rows_w * kw;
  const u8* se = ws + ex * (i64)rows_w * kb;
  // copies per stage: 64P bytes of 16 rows = 4P 16-byte chunks per row, lane l taking chunks
  // l + 32m (row (l + 32m) / 4P); lanes < 16 the 4P scale bytes of row l
  constexpr int CH = 4 * P, PER_LANE = 16 * CH / 32;
  const u8* cw[PER_LANE];
  u32 dw[PER_LANE];
  u8* base = &smem[warp][0][0];
  const u32 sbase = smem_addr(base);
#pragma unroll
  for (int m = 0; m < PER_LANE; ++m) {
    const int i = lane + 32 * m, row = i / CH, part = i % CH;
    cw[m] = we + (i64)wrow(row) * kw + part * 16;
    dw[m] = sbase + row * St::ROW + part * 16;
  }
  const u8* cs = se + (i64)wrow(lane & 15) * kb;
  const u32 ds = sbase + St::SCALES + (lane & 15) * 4 * P;
  // ldmatrix rows: lane l -> matrix l / 8 = (row half, block): rows (l/8 % 2) * 8 + l % 8
  const u32 lm = sbase + (((lane >> 3) & 1) * 8 + (lane & 7)) * St::ROW + (lane >> 4) * 16;

  auto issue = [&](int q) {  // stage q: steps qP .. qP + P - 1
    const u32 off = (q & (S - 1)) * St::BYTES;
#pragma unroll
    for (int m = 0; m < PER_LANE; ++m) cp_async16(dw[m] + off, cw[m] + q * 64 * P);
    if (lane < 16) {
      if (P == 1) {
        cp_async4(ds + off, cs + q * 4);
      } else if (P == 2) {
        cp_async8(ds + off, cs + q * 8);
      } else {
#pragma unroll
        for (int v = 0; v < P / 4; ++v) cp_async16(ds + off + 16 * v, cs + q * 4 * P + 16 * v);
      }
    }
  };

  // activation rows: the B row of token slot h*8 + g, the scale rows of slots h*8 + 2c (+1)
  // (a tile fills its slots from 0, so group 0 always holds a pair)
  constexpr int TILE = 8 * G;  // pair slots per tile
  const int* tp = pairs + tile * TILE;
  // With SK, w2's slots without a pair load nothing (a zero B column; their outputs are not
  // stored): at 64 rows ~2 of a tile's 8 slots hold a pair, and every slot's own row, read by
  // every warp, took the L2 bandwidth the weights need (w13's padding slots all read token row
  // 0, found in L1).
  bool active[G], bx[G], bs[G][2];
  const u16* xp[G];
  const float* sp[G][2];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const int p = tp[h * 8 + g];
    active[h] = h == 0 || __any_sync(0xFFFFFFFFu, p >= 0);
    bx[h] = W13 || !SK || p >= 0;
    const i64 brow = W13 ? (p >= 0 ? p / topk : 0) : tile * TILE + h * 8 + g;
    xp[h] = xh + brow * K + c * 8;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int q = tp[h * 8 + 2 * c + t];
      bs[h][t] = W13 || !SK || q >= 0;
      const i64 row = W13 ? (q >= 0 ? q / topk : 0) : tile * TILE + h * 8 + 2 * c + t;
      sp[h][t] = xs + row * ksteps;
    }
  }
  // B registers of a step (from L2: activations are small), double-buffered: loaded one step
  // ahead of their use
  struct Bregs {
    uint4 x[G][4];
    float s[G][2];
  };
  auto load_b = [&](Bregs& b, int st) {
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (active[h]) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          b.x[h][j] = bx[h] ? ldg128(xp[h] + st * 128 + j * 32) : uint4{0u, 0u, 0u, 0u};
        b.s[h][0] = bs[h][0] ? __ldg(sp[h][0] + st) : 0.0f;
        b.s[h][1] = bs[h][1] ? __ldg(sp[h][1] + st) : 0.0f;
      }
    }
  };

  float acc[G][4];
#pragma unroll
  for (int h = 0; h < G; ++h)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[h][i] = 0.0f;

  // step st = qP + sub of stage q (its copies waited for by the caller)
  auto step = [&](int st, int sub, const Bregs& cur, Bregs& next) {
    if (st + 1 < ksteps) load_b(next, st + 1);
    const u32 off = ((st / P) & (S - 1)) * St::BYTES;
    u32 wlo[4], whi[4];  // wlo = {wa[0], wb[0], wa[1], wb[1]}, whi the same for blocks 2, 3
    ldmatrix_x4(wlo, lm + off + sub * 64);
    ldmatrix_x4(whi, lm + off + sub * 64 + 32);
    const u32 sa = *reinterpret_cast<const u32*>(base + off + St::SCALES + g * 4 * P + sub * 4);
    const u32 sb =
        *reinterpret_cast<const u32*>(base + off + St::SCALES + (g + 8) * 4 * P + sub * 4);
    float part[G][4];
#pragma unroll
    for (int h = 0; h < G; ++h)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[h][i] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const u32 wa = j < 2 ? wlo[2 * j] : whi[2 * j - 4];
      const u32 wb = j < 2 ? wlo[2 * j + 1] : whi[2 * j - 3];
      u32 fa[4], fb[4];  // A rows g, g + 8: float16 pairs of inputs {0,2} {4,6} {1,3} {5,7}
      e2m1x8_f16(wa, fa);
      e2m1x8_f16(wb, fb);
      const float sca = e8m0(sa, j), scb = e8m0(sb, j);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        if (active[h]) {
          // the block's two k16 halves: inputs 8c + {0, 2, 4, 6}, then 8c + {1, 3, 5, 7}
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          const uint4 x = cur.x[h][j];
          mma_f16(d, fa[0], fb[0], fa[1], fb[1], x.x, x.y);
          mma_f16(d, fa[2], fb[2], fa[3], fb[3], x.z, x.w);
          part[h][0] += d[0] * sca;
          part[h][1] += d[1] * sca;
          part[h][2] += d[2] * scb;
          part[h][3] += d[3] * scb;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (active[h]) {
        acc[h][0] += part[h][0] * cur.s[h][0];
        acc[h][1] += part[h][1] * cur.s[h][1];
        acc[h][2] += part[h][2] * cur.s[h][0];
        acc[h][3] += part[h][3] * cur.s[h][1];
      }
    }
  };

  const int nq = ksteps / P;  // stages (the host checks P divides the steps)
#pragma unroll
  for (int q = 0; q < S - 1; ++q) {
    if (q < nq) issue(q);
    cp_commit();  // (empty groups keep the count uniform)
  }
  Bregs b[2];
  // stage q, its first step's B registers in b[first] (first a constant at each call, so the
  // buffers stay registers)
  auto stage = [&](int q, const int first) {
    if (q + S - 1 < nq) issue(q + S - 1);
    cp_commit();
    cp_wait<S - 1>();  // this thread's copies of stage q have landed
    __syncwarp();      // ... and every lane's
#pragma unroll
    for (int sub = 0; sub < P; ++sub)
      step(q * P + sub, sub, b[(first + sub) & 1], b[(first + sub + 1) & 1]);
    __syncwarp();  // every lane has read the stage before it is refilled
  };
  load_b(b[0], 0);
  for (int q = 0; q < nq; q += 2) {  // two stages per turn: for odd P the second starts at b[1]
    stage(q, 0);
    if (q + 1 < nq) stage(q + 1, P & 1);
  }

  // epilogue; 2^14 undoes the decode's 2^-14. Thread holds A rows g, g + 8 x slots h*8 + 2c (+1).
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (!active[h]) continue;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int slot = h * 8 + 2 * c + t;
      const int p = tp[slot];
      if (p < 0) continue;
      if (W13) {  // as moe._swiglu_store: gate and up rounded to bf16, clamped SwiGLU, weight
        float gt = bf16_round(acc[h][t] * 16384.0f),
              up = bf16_round(acc[h][2 + t] * 16384.0f);
        if (limit > 0) {
          const float lim = static_cast<float>(limit);
          up = fminf(fmaxf(up, -lim), lim);
          gt = fminf(gt, lim);
        }
        const float a = rw[p] * (gt / (1.0f + expf(-gt)) * up);
        out[(i64)(tile * TILE + slot) * n_out + n0 + g] = to_bf16(a);
      } else {
        out[(i64)p * n_out + n0 + g] = to_bf16(acc[h][t] * 16384.0f);
        out[(i64)p * n_out + n0 + 8 + g] = to_bf16(acc[h][2 + t] * 16384.0f);
      }
    }
  }
}

// Mixed-precision matmul on tensor cores for few rows (M <= 64), fp16 activations:
//
//     y[M, N] = x @ dequant(W_q)^T + x[:, S] @ W_S^T (+ bias)
//
// The codes are repacked once at load time (gift_quant/kernels/cuda/native.py, `pack_codes`)
// so that the 32-bit words a lane loads hold exactly the B-operand pairs it gives
// `mma.sync.m16n8k16`: no shared memory, no shuffle and no ldmatrix for the weights. One warp
// owns a strip of 64 output columns; per k16 step each lane holds 16 pairs (8 n8 tiles x the
// two k halves of the fragment), each pair a (k, k+1) couple of one column in the two halves
// of a word lane, at bit position p * BITS of its half (3 bits: 5 pairs per word, the 16th pair
// spread over bit 15 of the three words). A pair becomes an f16x2 by one lop3 with the exponent
// bits 0x6400 (1024 + code << e, exact), then one fma gives code - zero exactly. For up to 32
// rows (MT <= 2) the MMAs of one quantization group accumulate x @ (code - zero) into their own
// fp32 registers, and the group's scales multiply that sum once at the group's end ("scale
// after the MMA": one fma per accumulator per group instead of one fp16 mul per weight; the
// weights are then exact, so the result is at least as accurate as the fp16 reference). With
// 64 rows there are no registers for a second accumulator: one mul applies the scale to the
// weight, rounding as the torch reference rounds `(code - zero) * scale` in fp16.
//
// x is staged per block in shared memory by cp.async (rows padded, conflict-free ldmatrix);
// the salient columns are gathered there too and their fp16 weights are repacked into the same
// fragment layout, so they are extra k16 steps of the same loop. Weights stream through
// registers, PF 64-deep k-steps ahead. Split-K partials are added into a zeroed fp32
// workspace; the last block of a column block adds the bias, writes y and zeroes the workspace
// and its counter again (one launch, no memset), the same protocol as the Triton kernels.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
  return r;
}

__device__ __forceinline__ uint32_t h2u(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 u2h(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// 16 bytes global -> shared, asynchronously (cp.async: no register round trip)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t* a, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// Exponent (bit position in the half) of pair p once it is moved into bits 0..9.
template <int BITS>
__device__ __forceinline__ constexpr int pair_exp(int p) {
  if (BITS == 4) return (p % 4) % 2 * 4;                      // nibbles 0,1 | (>>8) 0,1
  if (BITS == 2) return (p % 8) < 5 ? 2 * (p % 8) : 2 * (p % 8 - 5);  // 0..8 | (>>10) 0..4
  return p == 15 ? 0 : ((p % 5) < 3 ? 3 * (p % 5) : 3 * (p % 5 - 3));  // 0,3,6 | (>>9) 0,3
}

// The 16 raw pairs (0x6400 | code << e in each half) of one k16 step from its BITS words.
template <int BITS>
__device__ __forceinline__ void unpack_pairs(const uint32_t* w, uint32_t* r) {
  constexpr uint32_t E = 0x64006400u;
  if constexpr (BITS == 4) {
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t hi = w[b] >> 8;
      r[4 * b + 0] = lop3_and_or(w[b], 0x000F000Fu, E);
      r[4 * b + 1] = lop3_and_or(w[b], 0x00F000F0u, E);
      r[4 * b + 2] = lop3_and_or(hi, 0x000F000Fu, E);
      r[4 * b + 3] = lop3_and_or(hi, 0x00F000F0u, E);
    }
  } else if constexpr (BITS == 2) {
#pragma unroll
    for (int b = 0; b < 2; ++b) {
      const uint32_t hi = w[b] >> 10;
#pragma unroll
      for (int i = 0; i < 5; ++i) r[8 * b + i] = lop3_and_or(w[b], 0x00030003u << (2 * i), E);
#pragma unroll
      for (int i = 0; i < 3; ++i) r[8 * b + 5 + i] = lop3_and_or(hi, 0x00030003u << (2 * i), E);
    }
  } else {
#pragma unroll
    for (int b = 0; b < 3; ++b) {
      const uint32_t hi = w[b] >> 9;
#pragma unroll
      for (int i = 0; i < 3; ++i) r[5 * b + i] = lop3_and_or(w[b], 0x00070007u << (3 * i), E);
#pragma unroll
      for (int i = 0; i < 2; ++i) r[5 * b + 3 + i] = lop3_and_or(hi, 0x00070007u << (3 * i), E);
    }
    const uint32_t top = ((w[0] >> 15) & 0x00010001u) | ((w[1] >> 14) & 0x00020002u);
    r[15] = lop3_and_or(w[2] >> 13, 0x00040004u, top | E);
  }
}

// acc += scale (per output column, C-fragment layout: columns 8 j + 2 t, +1) * group sum;
// the group sum restarts at zero.
template <int MT>
__device__ __forceinline__ void add_scaled(float (&acc)[MT][8][4], float (&grp)[MT][8][4],
                                           const uint32_t (&scale)[8]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 s = __half22float2(u2h(scale[j]));
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[m][j][e] = fmaf(e & 1 ? s.y : s.x, grp[m][j][e], acc[m][j][e]);
        grp[m][j][e] = 0.0f;
      }
    }
  }
}

template <int BITS, int MT, int WN, int PF>
__global__ void __launch_bounds__(WN * 32, MT == 1 ? 3 : 2)
    mixed_mma_kernel(const half* __restrict__ x, const uint4* __restrict__ qc,
                     const uint2* __restrict__ zp, const uint4* __restrict__ scp,
                     const uint4* __restrict__ wsp, const int* __restrict__ sidx, int nsal,
                     const half* __restrict__ bias, half* __restrict__ y,
                     float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int K,
                     unsigned group_magic, int ss_per_split, int R) {
  // scale after the MMA (file comment). At 4 bits the second accumulator spills 24 bytes under
  // the 168 registers of 3 blocks per SM, and is still faster than the scale on the weights
  // (W4 M = 4: 1.27-1.67x without it, 1.35-1.85x with it: kernels_h200_w4_scale_before.json)
  constexpr bool SA = MT <= 2;
  extern __shared__ __align__(16) half xs[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int B = N >> 6;                  // 64-column strips
  const int b = blockIdx.x * WN + warp;  // this warp's strip
  const int split = blockIdx.y, splits = gridDim.y;
  const int S = K >> 6;  // 64-deep k-steps ("supersteps")
  const int s0 = split * ss_per_split;
  const int nss = min(S, s0 + ss_per_split) - s0;
  const int Q = (nsal + 15) >> 4;  // salient k16 steps, round-robin over the splits
  const int nq = Q > split ? (Q - split + splits - 1) / splits : 0;
  const int kcols = nss * 64 + nq * 16;
  const int ldx = kcols + 8;  // row stride in halves: rows shift by 16 bytes mod 128
  // group of superstep s: floor(s / (group / 64)) (group_magic: see `launch`)
  auto group_of = [group_magic](unsigned s) {
    return group_magic ? __umulhi(s, group_magic) : s;
  };

  // 1. the first PF k-steps of this warp's weights, zero-points (and scales, when they go on
  // the weights), in flight during the x staging. Per k-step and strip, word-vector i of every
  // lane is contiguous (512 B per instruction).
  const size_t qstride = (size_t)B * 32 * BITS;  // uint4 per k-step (all strips)
  const uint4* qp = qc + ((size_t)s0 * B + b) * 32 * BITS + lane;
  const size_t gstride = (size_t)B * 8;  // per group: uint2 of zero-points, uint4 of scales
  const uint2* zbase = zp + (size_t)b * 8 + g;  // the zero-points of columns 8 j + g
  // the scales of columns 8 j + 2 t (+1) after the MMA, of columns 8 j + 2 (g / 2) (+1) before
  const uint4* sbase = scp + ((size_t)b * 4 + (SA ? t : g >> 1)) * 2;
  uint4 wbuf[PF][BITS];
  uint2 zbuf[PF];
  uint4 sbuf[SA ? 1 : PF][2];
#pragma unroll
  for (int p = 0; p < PF; ++p) {
    if (p < nss) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) wbuf[p][i] = ld_stream(qp + p * qstride + i * 32);
      const unsigned grp = group_of(s0 + p);
      zbuf[p] = __ldg(zbase + grp * gstride);
      if constexpr (!SA) {
        sbuf[p][0] = __ldg(sbase + grp * gstride);
        sbuf[p][1] = __ldg(sbase + grp * gstride + 1);
      }
    }
  }

  // 2. stage x: rows 0..R-1 (zeros past M) and a zero row R, this split's k range (16-byte
  // asynchronous copies, all of them in flight at once), then its salient columns (gathered)
  const int k0 = s0 * 64;
  const int chunks = nss * 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < (R + 1) * chunks; i += WN * 32) {
    const int r = i / chunks, c = i - r * chunks;
    half* dst = xs + r * ldx + c * 8;
    if (r < M)
      cp_async16(dst, x + (size_t)r * K + k0 + c * 8);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  const int scols = nq * 16;
  for (int i = threadIdx.x; i < (R + 1) * scols; i += WN * 32) {
    const int r = i / scols, c = i - r * scols;
    const int j = (split + (c >> 4) * splits) * 16 + (c & 15);  // salient position
    half v = __float2half(0.0f);
    if (r < M && j < nsal) v = x[(size_t)r * K + sidx[j]];
    xs[r * ldx + nss * 64 + c] = v;
  }
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();

  float acc[MT][8][4], gacc[MT][8][4];  // gacc: this group's x @ (code - zero) (SA only)
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[m][j][e] = 0.0f, gacc[m][j][e] = 0.0f;

  // ldmatrix.x4 row address of this lane per m-tile: matrix lane/8 = (rows +8 if odd, k +8 if
  // >= 2); rows past the staged ones read the zero row
  uint32_t xa[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int r = m * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    xa[m] = static_cast<uint32_t>(
        __cvta_generic_to_shared(xs + (r < R ? r : R) * ldx + (lane >> 4) * 8));
  }

  // 3. salient k16 steps: fp16 fragments as stored (4 uint4 per lane)
  for (int qi = 0; qi < nq; ++qi) {
    const uint4* wp = wsp + ((size_t)(split + qi * splits) * B + b) * 128 + lane;
    uint32_t f[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(wp + i * 32);
      f[4 * i] = v.x, f[4 * i + 1] = v.y, f[4 * i + 2] = v.z, f[4 * i + 3] = v.w;
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      uint32_t a[4];
      ldmatrix_x4(a, xa[m] + (nss * 64 + qi * 16) * 2);
#pragma unroll
      for (int j = 0; j < 8; ++j) mma16816(acc[m][j], a, f[2 * j], f[2 * j + 1]);
    }
  }

  // 4. the quantized k-steps
  uint32_t sc[8], cz[8][2];  // sc: both halves one column's scale (SA: 2 columns, C layout)
  unsigned cur_group = 0xFFFFFFFFu;
  for (int s = 0; s < nss; s += PF) {
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      const int ss = s + p;
      if (ss < nss) {
        uint32_t w[4 * BITS];
#pragma unroll
        for (int i = 0; i < BITS; ++i) {
          w[4 * i] = wbuf[p][i].x, w[4 * i + 1] = wbuf[p][i].y;
          w[4 * i + 2] = wbuf[p][i].z, w[4 * i + 3] = wbuf[p][i].w;
        }
        const uint2 zw = zbuf[p];
        const uint4 s0w = sbuf[SA ? 0 : p][0], s1w = sbuf[SA ? 0 : p][1];
        if (ss + PF < nss) {
#pragma unroll
          for (int i = 0; i < BITS; ++i)
            wbuf[p][i] = ld_stream(qp + (ss + PF) * qstride + i * 32);
          const unsigned grp = group_of(s0 + ss + PF);
          zbuf[p] = __ldg(zbase + grp * gstride);
          if constexpr (!SA) {
            sbuf[p][0] = __ldg(sbase + grp * gstride);
            sbuf[p][1] = __ldg(sbase + grp * gstride + 1);
          }
        }
        const unsigned grp = group_of(s0 + ss);
        if (grp != cur_group) {  // warp-uniform
          if constexpr (SA) {
            // the last group's sum times its scales; this group's scales, needed at its end
            if (cur_group != 0xFFFFFFFFu) add_scaled<MT>(acc, gacc, sc);
            const uint4 a = __ldg(sbase + grp * gstride);
            const uint4 c = __ldg(sbase + grp * gstride + 1);
            sc[0] = a.x, sc[1] = a.y, sc[2] = a.z, sc[3] = a.w;
            sc[4] = c.x, sc[5] = c.y, sc[6] = c.z, sc[7] = c.w;
          } else {
            // the half of column 8 j + g, in both halves
            const uint32_t sel = g & 1 ? 0x3232u : 0x1010u;
            const uint32_t sw[8] = {s0w.x, s0w.y, s0w.z, s0w.w, s1w.x, s1w.y, s1w.z, s1w.w};
#pragma unroll
            for (int j = 0; j < 8; ++j) sc[j] = __byte_perm(sw[j], 0, sel);
          }
          cur_group = grp;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // -(1024 / 2^e + z) as fp16 bits: exponent 25 - e, mantissa z << e (exact), sign set
            const uint32_t z = ((j < 4 ? zw.x : zw.y) >> (8 * (j & 3))) & 0xFFu;
#pragma unroll
            for (int f = 0; f < 2; ++f) {
              const uint32_t e = pair_exp<BITS>(2 * j + f);
              cz[j][f] = (0x8000u | (0x6400u - (e << 10)) | (z << e)) * 0x00010001u;
            }
          }
        }
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          uint32_t r[16];
          unpack_pairs<BITS>(w + st * BITS, r);
          uint32_t f[16];
#pragma unroll
          for (int p2 = 0; p2 < 16; ++p2) {
            constexpr uint32_t one = 15u << 10;  // fp16 bits of 1.0; 2^-e: exponent - e
            const uint32_t inv = (one - (pair_exp<BITS>(p2) << 10)) * 0x00010001u;
            const half2 q = __hfma2(u2h(r[p2]), u2h(inv), u2h(cz[p2 >> 1][p2 & 1]));
            f[p2] = SA ? h2u(q) : h2u(__hmul2(q, u2h(sc[p2 >> 1])));
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            uint32_t a[4];
            ldmatrix_x4(a, xa[m] + (ss * 64 + st * 16) * 2);
#pragma unroll
            for (int j = 0; j < 8; ++j)
              mma16816(SA ? gacc[m][j] : acc[m][j], a, f[2 * j], f[2 * j + 1]);
          }
        }
      }
    }
  }
  if constexpr (SA) {
    if (nss > 0) add_scaled<MT>(acc, gacc, sc);
  }

  // 5. output: lane holds rows m*16 + g (+8), columns b*64 + 8j + 2t (+1)
  const int col0 = b * 64 + 2 * t;
  if (splits == 1) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = m * 16 + g + 8 * h;
        if (r < M) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int c = col0 + 8 * j;
            float v0 = acc[m][j][2 * h], v1 = acc[m][j][2 * h + 1];
            if (bias != nullptr) v0 += __half2float(bias[c]), v1 += __half2float(bias[c + 1]);
            *reinterpret_cast<half2*>(y + (size_t)r * N + c) = __floats2half2_rn(v0, v1);
          }
        }
      }
    return;
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m * 16 + g + 8 * h;
      if (r < M) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          float* o = ws + (size_t)r * N + col0 + 8 * j;
#if __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(o), make_float2(acc[m][j][2 * h], acc[m][j][2 * h + 1]));
#else
          atomicAdd(o, acc[m][j][2 * h]);
          atomicAdd(o + 1, acc[m][j][2 * h + 1]);
#endif
        }
      }
    }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(cnt + blockIdx.x, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int width = WN * 64, cb = blockIdx.x * width;
  for (int i = threadIdx.x; i < M * width / 2; i += WN * 32) {
    const int r = i / (width / 2), c = cb + (i % (width / 2)) * 2;
    float2* o = reinterpret_cast<float2*>(ws + (size_t)r * N + c);
    float2 v = __ldcg(o);
    __stcg(o, make_float2(0.0f, 0.0f));
    if (bias != nullptr) v.x += __half2float(bias[c]), v.y += __half2float(bias[c + 1]);
    *reinterpret_cast<half2*>(y + (size_t)r * N + c) = __floats2half2_rn(v.x, v.y);
  }
  if (threadIdx.x == 0) cnt[blockIdx.x] = 0;
}

template <int BITS, int MT, int WN>
int launch(const half* x, const uint4* qc, const uint2* zp, const uint4* scp, const uint4* wsp,
           const int* sidx, int nsal, const half* bias, half* y, float* ws, int* cnt, int M,
           int N, int K, int group, int splits, cudaStream_t stream) {
  constexpr int PF = MT == 1 ? 3 : 2;
  auto kernel = mixed_mma_kernel<BITS, MT, WN, PF>;
  const int S = K / 64;
  const int ss_per_split = (S + splits - 1) / splits;
  splits = (S + ss_per_split - 1) / ss_per_split;
  const int Q = (nsal + 15) / 16;
  const int nq = (Q + splits - 1) / splits;
  const int R = min(16 * MT, (M + 7) / 8 * 8);  // rows staged (a zero row follows)
  const size_t smem = (size_t)(R + 1) * (ss_per_split * 64 + nq * 16 + 8) * sizeof(half);
  const unsigned ssg = static_cast<unsigned>(group / 64);
  // floor(s / ssg) = umulhi(s, ceil(2^32 / ssg)) for s, ssg < 2^16; 0 stands for ssg = 1
  const unsigned magic = ssg == 1 ? 0u : static_cast<unsigned>((0x100000000ull + ssg - 1) / ssg);
  static size_t allowed[64] = {};  // per device: the dynamic shared memory already allowed
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return -1;
  if (smem > 48 * 1024 && smem > allowed[dev]) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return static_cast<int>(e);
    allowed[dev] = smem;
  }
  dim3 grid(N / 64 / WN, splits);
  kernel<<<grid, WN * 32, smem, stream>>>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M,
                                          N, K, magic, ss_per_split, R);
  return static_cast<int>(cudaGetLastError());
}

template <int BITS, int MT>
int by_wn(int wn, const half* x, const uint4* qc, const uint2* zp, const uint4* scp,
          const uint4* wsp, const int* sidx, int nsal, const half* bias, half* y, float* ws,
          int* cnt, int M, int N, int K, int group, int splits, cudaStream_t s) {
  switch (wn) {
    case 1: return launch<BITS, MT, 1>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
#ifndef GQ_COMPILE_CHECK  // the CPU test compiles one block width (the code is the same)
    case 2: return launch<BITS, MT, 2>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
    case 4: return launch<BITS, MT, 4>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
#endif
    default: return -1;
  }
}

template <int BITS>
int by_mt(int mt, int wn, const half* x, const uint4* qc, const uint2* zp, const uint4* scp,
          const uint4* wsp, const int* sidx, int nsal, const half* bias, half* y, float* ws,
          int* cnt, int M, int N, int K, int group, int splits, cudaStream_t s) {
  switch (mt) {
    case 1: return by_wn<BITS, 1>(wn, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
    case 2: return by_wn<BITS, 2>(wn, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
    case 4: return by_wn<BITS, 4>(wn, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, s);
    default: return -1;
  }
}

}  // namespace

// Returns a cudaError_t (0 = success), or -1 for arguments outside what was compiled.
extern "C" int gq_mixed_mma(const void* x, const void* qc, const void* zp, const void* scp,
                            const void* wsp,
                            const void* sidx, int nsal, const void* bias, void* y, void* ws,
                            void* cnt, int M, int N, int K, int group, int bits, int wn,
                            int splits, void* stream) {
  if (M < 1 || M > 64 || N % (64 * wn) || K % 64 || group % 64 || K % group || splits < 1)
    return -1;
  const int mt = M <= 16 ? 1 : (M <= 32 ? 2 : 4);
  auto* xh = static_cast<const half*>(x);
  auto* q = static_cast<const uint4*>(qc);
  auto* z = static_cast<const uint2*>(zp);
  auto* sc = static_cast<const uint4*>(scp);
  auto* wp = static_cast<const uint4*>(wsp);
  auto* si = static_cast<const int*>(sidx);
  auto* bh = static_cast<const half*>(bias);
  auto* yh = static_cast<half*>(y);
  auto* w = static_cast<float*>(ws);
  auto* c = static_cast<int*>(cnt);
  auto s = static_cast<cudaStream_t>(stream);
  switch (bits) {
    case 2: return by_mt<2>(mt, wn, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, s);
    case 3: return by_mt<3>(mt, wn, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, s);
    case 4: return by_mt<4>(mt, wn, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, s);
    default: return -1;
  }
}

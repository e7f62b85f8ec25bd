// Mixed-precision matmul on tensor cores for few rows (M <= 64), fp16 or bf16 activations (BF):
//
//     y[M, N] = x @ dequant(W_q)^T + x[:, S] @ W_S^T (+ bias)
//
// The codes are repacked once at load time (gift_quant/kernels/cuda/layout.py, `pack_codes`)
// so that the 32-bit words a lane loads hold exactly the B-operand pairs it gives
// `mma.sync.m16n8k16`: no shared memory, no shuffle and no ldmatrix for the weights. One warp
// owns a strip of 64 output columns; per k16 step each lane holds 16 pairs (8 n8 tiles x the
// two k halves of the fragment), each pair a (k, k+1) couple of one column in the two halves
// of a word lane, in slot s at bit position s * BITS of its half (3 bits: 5 slots per word, the
// 16th spread over bit 15 of the three words); which pair lies in which slot: `pair_slot`
// (fragments.cuh), by k16 step at 3 bits. A pair becomes an f16x2 by one lop3 with the exponent
// bits 0x6400 (1024 + code << e, exact), then one fma gives code - zero exactly. For 16 rows
// (MT = 1), and 32 rows at 2 and 4 bits, the MMAs of one quantization group accumulate
// x @ (code - zero) into their own fp32 registers, and the group's scales multiply that sum
// once at the group's end ("scale after the MMA": one fma per accumulator per group instead of
// one fp16 mul per weight; the weights are then exact, so the result is at least as accurate
// as the fp16 reference). Otherwise (64 rows: no registers for a second accumulator; 32 rows at
// 3 bits: measured faster) one mul applies the scale to the weight, rounding as the torch
// reference rounds `(code - zero) * scale` in fp16 (in bf16, the scale rounded to bf16 first).
// bf16 takes 2- and 4-bit codes to bits 0.. of each half (fragments.cuh, `unpack_pairs_low`):
// one shift more per pair, then one subtraction; 3-bit codes it reads where fp16 does, over
// the exponent bits of their position (`unpack_pairs_bf16_3`), then one subtraction.
//
// x is staged per block in shared memory by cp.async (rows padded, conflict-free ldmatrix);
// the salient columns are gathered there too and their weights (fp16, or bf16 for BF) are
// repacked into the same fragment layout, so they are extra k16 steps of the same loop.
// Weights stream through registers, PF 64-deep k-steps ahead. Split-K partials are added into a zeroed fp32
// workspace; the last block of a column block adds the bias, writes y and zeroes the workspace
// and its counter again (one launch, no memset), the same protocol as the Triton kernels. Or
// (sm_90, `csize` > 1) the splits of a column block run as thread-block clusters of csize
// blocks and add up in distributed shared memory (fragments.cuh, `cluster_reduce`).
// KW > 1 (16-row tiles): KW warps share each strip, each taking a contiguous 1/KW of the
// block's k-steps (and every KW-th of its salient steps) on the same staged x; they add up in
// shared memory before the block's one share of the split-K sum, so a layer's k range can be
// cut into fewer grid splits (fewer fp32 atomics, or a cluster small enough to place) at the
// same number of warps streaming the weights.
#include "fragments.cuh"

namespace {

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

// KW > 1: registers as ptxas needs them (under the 168 of 12 warps per SM the 4-bit kernel
// spills; 6 k-steps in flight take up to 241); the launches that use it run about 8 warps per SM
template <int MT, int WN, int KW>
constexpr int min_blocks() {
  return KW > 1 ? 1 : MT == 1 ? 3 : 2;
}

template <bool BF, int BITS, int MT, int WN, int PF, int KW>
__global__ void __launch_bounds__(WN * KW * 32, (min_blocks<MT, WN, KW>()))
    mixed_mma_kernel(const half* __restrict__ x, const uint4* __restrict__ qc,
                     const uint2* __restrict__ zp, const uint4* __restrict__ scp,
                     const uint4* __restrict__ wsp, const int* __restrict__ sidx, int nsal,
                     const half* __restrict__ bias, half* __restrict__ y,
                     float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int K,
                     unsigned gmagic, int ss_per_split, int R, int csize) {
  // scale after the MMA (file comment). At 4 bits the second accumulator spills a few bytes
  // under the 168 registers of 3 blocks per SM (24 in round 7's build), and is still faster
  // than the scale on the weights (W4 M = 4: 1.27-1.67x without it, 1.35-1.85x with it:
  // kernels_h200_w4_scale_before.json.gz).
  // At 32 rows and 3 bits the scale on the weights was faster: every configuration of the
  // first-use timing on the eight shapes took 0.91-1.00x the time (W4 0.96-1.05x, W2
  // 0.98-1.03x; kernels_h200_r16_sa1.json against kernels_h200_r16a.json.gz)
  constexpr bool SA = MT == 1 || (MT == 2 && BITS != 3);
  extern __shared__ __align__(16) half xs[];
  GQ_TRACE_AT(0);  // (a diagnosis build, tools/trace_mma.py: the block's start)
  GQ_TRACE_VAL(29, gq_smid());
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int B = N >> 6;                  // 64-column strips
  static_assert(KW == 1 || MT == 1, "warps share a strip on 16-row tiles only");
  const int wi = warp % WN, kp = warp / WN;  // strip within the block; share of its k-steps
  const int b = blockIdx.x * WN + wi;       // this warp's strip
  const int split = blockIdx.y, splits = gridDim.y;
  const int S = K >> 6;  // 64-deep k-steps ("supersteps")
  const int s0 = split * ss_per_split;
  const int nss = min(S, s0 + ss_per_split) - s0;
  const int Q = (nsal + 15) >> 4;  // salient k16 steps, round-robin over the splits
  const int nq = Q > split ? (Q - split + splits - 1) / splits : 0;
  const int kcols = nss * 64 + nq * 16;
  const int ldx = kcols + 8;  // row stride in halves: rows shift by 16 bytes mod 128
  // this warp's k-steps of the block's: sb .. sb + nsw - 1 (KW > 1: a contiguous share)
  const int per = (nss + KW - 1) / KW;
  const int sb = min(nss, kp * per), nsw = min(nss, sb + per) - sb;

  // 1. the first PF k-steps of this warp's weights, zero-points (and scales, when they go on
  // the weights), in flight during the x staging; none of it is written by the previous kernel,
  // so it is read before pdl_wait (fragments.cuh). Per k-step and strip, word-vector i of every
  // lane is contiguous (512 B per instruction).
  const size_t qstride = (size_t)B * 32 * BITS;  // uint4 per k-step (all strips)
  const uint4* qp = qc + ((size_t)(s0 + sb) * B + b) * 32 * BITS + lane;
  const size_t gstride = (size_t)B * 8;  // per group: uint2 of zero-points, uint4 of scales
  const uint2* zbase = zp + (size_t)b * 8 + g;  // the zero-points of columns 8 j + g
  // the scales of columns 8 j + 2 t (+1) after the MMA, of columns 8 j + 2 (g / 2) (+1) before
  const uint4* sbase = scp + ((size_t)b * 4 + (SA ? t : g >> 1)) * 2;
  uint4 wbuf[PF][BITS];
  uint2 zbuf[PF];
  uint4 sbuf[SA ? 1 : PF][2];
#pragma unroll
  for (int p = 0; p < PF; ++p) {
    if (p < nsw) {
#pragma unroll
      for (int i = 0; i < BITS; ++i) wbuf[p][i] = ld_stream(qp + p * qstride + i * 32);
      const unsigned grp = group_of(s0 + sb + p, gmagic);
      zbuf[p] = __ldg(zbase + grp * gstride);
      if constexpr (!SA) {
        sbuf[p][0] = __ldg(sbase + grp * gstride);
        sbuf[p][1] = __ldg(sbase + grp * gstride + 1);
      }
    }
  }

  // 2. stage x: rows 0..R-1 (zeros past M) and a zero row R, this split's k range, then its
  // salient columns (KW > 1: the first batch of their indices read before the wait; the
  // others have no registers for it under their cap: 8 bytes of spills at 4 bits)
  int first[GATHER_BATCH];
  if constexpr (KW > 1) salient_first(first, sidx, nsal, M, R, nq, split, splits);
  pdl_wait();  // x comes from the previous kernel
  GQ_TRACE_AT(1);
  stage_x(xs, x, M, K, R, ldx, s0 * 64, nss * 64);
  gather_salient(xs, x, sidx, nsal, M, K, R, ldx, nss * 64, nq, split, splits,
                 KW > 1 ? first : nullptr);
  wait_copies_and_sync<0>();
  GQ_TRACE_AT(2);  // x staged

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

  // 3. salient k16 steps: fragments as stored (4 uint4 per lane; bf16 for BF: layout.py)
  for (int qi = kp; qi < nq; qi += KW) {
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
      for (int j = 0; j < 8; ++j) mma16816<BF>(acc[m][j], a, f[2 * j], f[2 * j + 1]);
    }
  }

  GQ_TRACE_AT(3);  // warp 0's salient steps issued
  // 4. the quantized k-steps
  uint32_t sc[8], cz[8][2];  // sc: both halves one column's scale (SA: 2 columns, C layout)
  unsigned cur_group = 0xFFFFFFFFu;
  for (int s = 0; s < nsw; s += PF) {
#pragma unroll
    for (int p = 0; p < PF; ++p) {
      const int ss = s + p;  // of this warp's k-steps
      if (ss < nsw) {
        uint32_t w[4 * BITS];
#pragma unroll
        for (int i = 0; i < BITS; ++i) {
          w[4 * i] = wbuf[p][i].x, w[4 * i + 1] = wbuf[p][i].y;
          w[4 * i + 2] = wbuf[p][i].z, w[4 * i + 3] = wbuf[p][i].w;
        }
        const uint2 zw = zbuf[p];
        const uint4 s0w = sbuf[SA ? 0 : p][0], s1w = sbuf[SA ? 0 : p][1];
        if (ss + PF < nsw) {
#pragma unroll
          for (int i = 0; i < BITS; ++i)
            wbuf[p][i] = ld_stream(qp + (ss + PF) * qstride + i * 32);
          const unsigned grp = group_of(s0 + sb + ss + PF, gmagic);
          zbuf[p] = __ldg(zbase + grp * gstride);
          if constexpr (!SA) {
            sbuf[p][0] = __ldg(sbase + grp * gstride);
            sbuf[p][1] = __ldg(sbase + grp * gstride + 1);
          }
        }
        const unsigned grp = group_of(s0 + sb + ss, gmagic);
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
            for (int j = 0; j < 8; ++j) sc[j] = from_fp16x2<BF>(__byte_perm(sw[j], 0, sel));
          }
          cur_group = grp;
          zero_pairs<BF, BITS>(zw, cz);
        }
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          uint32_t f[16];
          dequant_pairs<BF, BITS>(w + st * BITS, cz, f, st);
          if constexpr (!SA) {
#pragma unroll
            for (int p2 = 0; p2 < 16; ++p2) f[p2] = mul2<BF>(f[p2], sc[p2 >> 1]);
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            uint32_t a[4];
            ldmatrix_x4(a, xa[m] + ((sb + ss) * 64 + st * 16) * 2);
#pragma unroll
            for (int j = 0; j < 8; ++j)
              mma16816<BF>(SA ? gacc[m][j] : acc[m][j], a, f[2 * j], f[2 * j + 1]);
          }
        }
#ifdef GQ_TRACE
        if (ss == 0) GQ_TRACE_AT(4);  // warp 0's first k-step: its words here, its MMAs issued
#endif
      }
    }
  }
  if constexpr (SA) {
    if (nsw > 0) add_scaled<MT>(acc, gacc, sc);
  }
  GQ_TRACE_AT(5);  // warp 0's k-steps done
  pdl_launch_dependents();  // the next kernel may start once every block is here
  if constexpr (KW > 1) {  // the strip's shares add up in warp kp = 0's registers
    constexpr int E = MT * 32;  // accumulators per lane
    float* red = reinterpret_cast<float*>(xs);  // [(kp - 1) * WN + wi][e][lane]
    __syncthreads();  // every warp is done with the staged x
    if (kp > 0) {
      float* mine = red + ((kp - 1) * WN + wi) * E * 32 + lane;
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) mine[((m * 8 + j) * 4 + e) * 32] = acc[m][j][e];
    }
    __syncthreads();
    if (kp == 0) {
      for (int q = 1; q < KW; ++q) {  // in share order: the same sum every run
        const float* theirs = red + ((q - 1) * WN + wi) * E * 32 + lane;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][j][e] += theirs[((m * 8 + j) * 4 + e) * 32];
      }
    }
  }
  GQ_TRACE_AT(6);  // the block's k-steps summed (KW > 1: the strip's shares)

  // 5. output: lane holds rows m*16 + g (+8), columns b*64 + 8j + 2t (+1)
  if (csize > 1) {  // launch-uniform: the cluster's splits add up in shared memory
    constexpr int W = WN * 64;
    cluster_reduce<BF, W>(
        [&](float* red) {
#pragma unroll
          for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = m * 16 + g + 8 * h;
              if (r < M && kp == 0) {
#pragma unroll
                for (int j = 0; j < 8; ++j)
                  *reinterpret_cast<float2*>(red + r * W + wi * 64 + 8 * j + 2 * t) =
                      make_float2(acc[m][j][2 * h], acc[m][j][2 * h + 1]);
              }
            }
        },
        reinterpret_cast<float*>(xs), bias, y, ws, 0, M, N, blockIdx.x * W, splits == csize);
    if (splits > csize) finish_splits<BF>(ws, cnt, bias, y, M, N, W);
    GQ_TRACE_AT(30);
    return;
  }
  const int col0 = b * 64 + 2 * t;
  if (splits == 1) {
    if (kp > 0) return;
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
            if (bias != nullptr) v0 += to_float<BF>(bias[c]), v1 += to_float<BF>(bias[c + 1]);
            *reinterpret_cast<uint32_t*>(y + (size_t)r * N + c) = pack2<BF>(v0, v1);
          }
        }
      }
    GQ_TRACE_AT(30);
    return;
  }
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = m * 16 + g + 8 * h;
      if (r < M && kp == 0) {
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
  GQ_TRACE_AT(7);  // the block's atomics issued
  finish_splits<BF>(ws, cnt, bias, y, M, N, WN * 64);
  GQ_TRACE_AT(30);
}

template <bool BF, int BITS, int MT, int WN, int KW>
int launch(const half* x, const uint4* qc, const uint2* zp, const uint4* scp, const uint4* wsp,
           const int* sidx, int nsal, const half* bias, half* y, float* ws, int* cnt, int M,
           int N, int K, int group, int splits, int csize, bool pdl, cudaStream_t stream) {
  // KW > 1: a warp's share is a few k-steps (4-7 in rules.mma_kw_configs), so all of it is
  // in flight from the start (one memory round trip, not two or three); 8 warps per SM leave
  // the registers for it (194-241, no spills)
  constexpr int PF = KW > 1 ? 6 : MT == 1 ? 3 : 2;
  auto kernel = mixed_mma_kernel<BF, BITS, MT, WN, PF, KW>;
  const int S = K / 64;
  const int ss_per_split = (S + splits - 1) / splits;
  splits = (S + ss_per_split - 1) / ss_per_split;
  if (splits % csize) return -1;  // clusters tile the splits
  const int Q = (nsal + 15) / 16;
  const int nq = (Q + splits - 1) / splits;
  const int R = min(16 * MT, (M + 7) / 8 * 8);  // rows staged (a zero row follows)
  size_t smem = (size_t)(R + 1) * (ss_per_split * 64 + nq * 16 + 8) * sizeof(half);
  if (csize > 1) smem = max(smem, (size_t)M * WN * 64 * sizeof(float));  // the partial tile
  if (KW > 1) smem = max(smem, (size_t)(KW - 1) * WN * MT * 32 * 32 * sizeof(float));  // shares
  static size_t allowed[64] = {};  // per device: the dynamic shared memory already allowed
  static bool clustered[64] = {};   // per device: clusters past 8 blocks allowed
  int rc = allow_smem(kernel, smem, allowed);
  if (!rc) rc = allow_cluster(kernel, csize, clustered);
  if (rc) return rc;
  return launch_ex(kernel, dim3(N / 64 / WN, splits), dim3(WN * KW * 32), smem, stream, csize,
                   pdl, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K,
                   group_magic(group), ss_per_split, R, csize);
}

// (warps per strip KW, strips per block WN): KW > 1 for 16-row tiles, up to 8 warps a block
template <bool BF, int BITS, int MT>
int by_wn(int wn, int kw, const half* x, const uint4* qc, const uint2* zp, const uint4* scp,
          const uint4* wsp, const int* sidx, int nsal, const half* bias, half* y, float* ws,
          int* cnt, int M, int N, int K, int group, int splits, int csize, bool pdl,
          cudaStream_t s) {
#define GQ_MMA(WN, KW) \
  launch<BF, BITS, MT, WN, KW>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s)
  if (kw == 1) {
    switch (wn) {
      case 1: return GQ_MMA(1, 1);
#ifndef GQ_COMPILE_CHECK  // the CPU test compiles one block width (the code is the same)
      case 2: return GQ_MMA(2, 1);
      case 4: return GQ_MMA(4, 1);
#endif
      default: return -1;
    }
  }
  if constexpr (MT == 1) {
    switch (wn * 16 + kw) {
      case 1 * 16 + 4: return GQ_MMA(1, 4);
#ifndef GQ_COMPILE_CHECK
      case 1 * 16 + 2: return GQ_MMA(1, 2);
      case 1 * 16 + 8: return GQ_MMA(1, 8);
      case 2 * 16 + 2: return GQ_MMA(2, 2);
      case 2 * 16 + 4: return GQ_MMA(2, 4);
      case 4 * 16 + 2: return GQ_MMA(4, 2);
#endif
      default: return -1;
    }
  }
#undef GQ_MMA
  return -1;
}

template <bool BF, int BITS>
int by_mt(int mt, int wn, int kw, const half* x, const uint4* qc, const uint2* zp,
          const uint4* scp, const uint4* wsp, const int* sidx, int nsal, const half* bias,
          half* y, float* ws, int* cnt, int M, int N, int K, int group, int splits, int csize,
          bool pdl, cudaStream_t s) {
  switch (mt) {
    case 1: return by_wn<BF, BITS, 1>(wn, kw, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
    case 2: return by_wn<BF, BITS, 2>(wn, kw, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
    case 4: return by_wn<BF, BITS, 4>(wn, kw, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
    default: return -1;
  }
}

}  // namespace

// Returns a cudaError_t (0 = success), or -1 for arguments outside what was compiled.
extern "C" int gq_mixed_mma(const void* x, const void* qc, const void* zp, const void* scp,
                            const void* wsp,
                            const void* sidx, int nsal, const void* bias, void* y, void* ws,
                            void* cnt, int M, int N, int K, int group, int bits, int bf16,
                            int wn, int splits, int csize, int kw, int pdl, void* stream) {
  if (M < 1 || M > 64 || wn < 1 || N % (64 * wn) || K % 64 || group % 64 || K % group || splits < 1)
    return -1;
  if (csize < 1 || csize > 16 || (csize > 1 && !device_has_clusters())) return -1;
  const int mt = M <= 16 ? 1 : (M <= 32 ? 2 : 4);
  if (kw < 1 || (kw > 1 && mt != 1)) return -1;
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
  auto run = [&](auto bf) {
    constexpr bool BF = decltype(bf)::value;
    switch (bits) {
      case 2: return by_mt<BF, 2>(mt, wn, kw, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      case 3: return by_mt<BF, 3>(mt, wn, kw, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      case 4: return by_mt<BF, 4>(mt, wn, kw, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      default: return -1;
    }
  };
  return bf16 ? run(std::true_type{}) : run(std::false_type{});
}

#ifdef GQ_TRACE
// A diagnosis build's timelines (GQ_TRACE, fragments.cuh): `count` values of this file's
// trace buffer into dst (host memory), then the buffer zeroed
extern "C" int gq_mma_trace(void* dst, int count) { return trace_read(dst, count); }
#endif

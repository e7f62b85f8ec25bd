// Mixed-precision matmul for very few rows (M <= 16), fp16 or bf16 activations (BF), on tensor
// cores with the operands swapped:
//
//     y^T[N, M] = dequant(W_q) x^T + W_S x[:, S]^T (+ bias)
//
// The same packed words as mixed_mma.cu (layout.py, `pack_codes`), read as the A operand of
// `mma.m16n8k16`: the B fragments of n8 tiles 2i and 2i+1 of a k16 step are, together, the A
// fragment of 16 output columns (rows g and g + 8 of the A tile are columns 8 (2i) + g and
// 8 (2i + 1) + g), so no repacking. x is the B operand, one or two tiles of 8 rows (NB): the
// M real rows and a zero row for the rest. Up to 8 rows a lane does 4 MMAs per k16 step
// (mixed_mma.cu: 8 per 16-row tile) and holds 16 fp32 accumulators (32), so more warps fit on
// an SM and more weight bytes are in flight; with two tiles each A fragment serves both. The
// products are exact and summed in fp32 (a GEMV on fp16 FMAs would sum in fp16).
// Scale after the MMA as in mixed_mma.cu: a group's MMAs add x @ (code - zero) into their own
// registers, which the group's scales (one per output column) multiply once at its end. The
// scales and zero-points of the next group are loaded at the start of the current one.
#include "fragments.cuh"

namespace {

// acc += scale * group sum, C rows g (columns 16 i + g: scale sc[2 i]) and g + 8 (16 i + 8 + g:
// sc[2 i + 1]), for each 8-row tile of x; the group sum restarts at zero.
template <int NB>
__device__ __forceinline__ void add_scaled_mmv(float (&acc)[NB][4][4], float (&grp)[NB][4][4],
                                               const uint32_t (&sc)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float s = __low2float(u2h(sc[2 * i + (e >> 1)]));
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        acc[n][i][e] = fmaf(s, grp[n][i][e], acc[n][i][e]);
        grp[n][i][e] = 0.0f;
      }
    }
}

// sc[j]: the scale of column 8 j + g in both halves, from the 8 scale words of row g / 2
__device__ __forceinline__ void column_scales(uint4 a, uint4 c, int g, uint32_t (&sc)[8]) {
  const uint32_t sel = g & 1 ? 0x3232u : 0x1010u;
  const uint32_t sw[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) sc[j] = __byte_perm(sw[j], 0, sel);
}

// the 4 x NB MMAs of one k16 step: f = 16 pairs (n8 tile j, half h) = f[2 j + h], as B
// fragments; each A fragment serves the NB 8-row tiles of x (words k, k + 4 of xr[n])
template <bool BF, int NB>
__device__ __forceinline__ void mma_swapped(float (&c)[NB][4][4], const uint32_t* f,
                                            const uint32_t* const (&xr)[NB], int k) {
  uint32_t b0[NB], b1[NB];
#pragma unroll
  for (int n = 0; n < NB; ++n) b0[n] = xr[n][k], b1[n] = xr[n][k + 4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a[4] = {f[4 * i], f[4 * i + 2], f[4 * i + 1], f[4 * i + 3]};
#pragma unroll
    for (int n = 0; n < NB; ++n) mma16816<BF>(c[n][i], a, b0[n], b1[n]);
  }
}

// f(value, row, column within the warp's 64-column strip) for each accumulator element of a
// row below M: acc[n][i][e] is column 16 i + 8 (e / 2) + g, row 8 n + 2 t + e % 2
template <int NB, typename F>
__device__ __forceinline__ void each_output(const float (&acc)[NB][4][4], int M, F&& f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = 8 * n + 2 * t + (e & 1);
        if (r < M) f(acc[n][i][e], r, 16 * i + 8 * (e >> 1) + g);
      }
}


// 20 warps per SM with one 8-row tile of x: at most 96 registers (no spills on sm_90; 24
// warps, 80 registers, spill); 16 warps with two tiles (128)
// CL: whether the cluster epilogue is compiled in (the launcher gives it to the default ring
// depth only, the one the routes and the first-use timing use: it lengthens the compile)
template <bool BF, int BITS, int WN, int PF, int NB, bool CL>
__global__ void __launch_bounds__(WN * 32, (NB == 1 ? 20 : 16) / WN)
    mixed_mmv_kernel(const half* __restrict__ x, const uint4* __restrict__ qc,
                     const uint2* __restrict__ zp, const uint4* __restrict__ scp,
                     const uint4* __restrict__ wsp, const int* __restrict__ sidx, int nsal,
                     const half* __restrict__ bias, half* __restrict__ y,
                     float* __restrict__ ws, int* __restrict__ cnt, int M, int N, int K,
                     unsigned gmagic, int ss_per_split, int csize) {
  // shared memory: each warp's ring of PF k-steps of weights (BITS x 512 bytes each), then x
  extern __shared__ __align__(16) uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint4* ring = smem + warp * PF * BITS * 32 + lane;  // this lane's vectors: + (slot BITS + i) 32
  half* xs = reinterpret_cast<half*>(smem + WN * PF * BITS * 32);
  const int g = lane >> 2, t = lane & 3;
  const int B = N >> 6;                  // 64-column strips
  const int b = blockIdx.x * WN + warp;  // this warp's strip
  const int split = blockIdx.y, splits = gridDim.y;
  const int S = K >> 6;  // 64-deep k-steps
  const int s0 = split * ss_per_split;
  const int nss = min(S, s0 + ss_per_split) - s0;
  const int Q = (nsal + 15) >> 4;  // salient k16 steps, round-robin over the splits
  const int nq = Q > split ? (Q - split + splits - 1) / splits : 0;
  const int ldx = nss * 64 + nq * 16 + 8;  // row stride in halves: rows shift by 16 bytes

  // 1. the first PF - 1 k-steps of weights into the ring, one copy group each (each lane copies
  // and later reads only its own vectors, so its own wait orders them), and the first group's
  // scales and zero-points: none of it written by the previous kernel, so before pdl_wait; then
  // x (rows 0..M-1, a zero row M) in one more group and its salient columns, and wait for all
  const size_t qstride = (size_t)B * 32 * BITS;
  const uint4* qp = qc + ((size_t)s0 * B + b) * 32 * BITS + lane;
  const size_t gstride = (size_t)B * 8;
  const uint2* zbase = zp + (size_t)b * 8 + g;                  // columns 8 j + g
  const uint4* sbase = scp + ((size_t)b * 4 + (g >> 1)) * 2;  // columns 8 j + 2 (g / 2) (+1)
  const unsigned last_group = group_of(S - 1, gmagic);
#pragma unroll
  for (int p = 0; p < PF - 1; ++p) {
    if (p < nss)
#pragma unroll
      for (int i = 0; i < BITS; ++i) cp_async16(ring + (p * BITS + i) * 32, qp + p * qstride + i * 32);
    asm volatile("cp.async.commit_group;\n" ::);  // one group per k-step, empty or not
  }
  unsigned grp = group_of(s0, gmagic);
  uint4 sa = __ldg(sbase + grp * gstride), sb = __ldg(sbase + grp * gstride + 1);
  uint2 zw = __ldg(zbase + grp * gstride);
  pdl_wait();  // x comes from the previous kernel
  stage_x(xs, x, M, K, M, ldx, s0 * 64, nss * 64);
  gather_salient(xs, x, sidx, nsal, M, K, M, ldx, nss * 64, nq, split, splits);
  wait_copies_and_sync<0>();

  // this lane's B-fragment words per 8-row tile n: row 8 n + g (the zero row past M), input
  // columns 2 t (+1), +8
  const uint32_t* xr[NB];
  float acc[NB][4][4], gacc[NB][4][4];
#pragma unroll
  for (int n = 0; n < NB; ++n) {
    const int r = 8 * n + g;
    xr[n] = reinterpret_cast<const uint32_t*>(xs + (r < M ? r : M) * ldx) + t;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][i][e] = 0.0f, gacc[n][i][e] = 0.0f;
  }

  // 2. salient k16 steps: fragments as stored (4 uint4 per lane; bf16 for BF: layout.py)
  for (int qi = 0; qi < nq; ++qi) {
    const uint4* wp = wsp + ((size_t)(split + qi * splits) * B + b) * 128 + lane;
    uint32_t f[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v = __ldg(wp + i * 32);
      f[4 * i] = v.x, f[4 * i + 1] = v.y, f[4 * i + 2] = v.z, f[4 * i + 3] = v.w;
    }
    mma_swapped<BF, NB>(acc, f, xr, (nss * 64 + qi * 16) / 2);
  }

  // 3. the quantized k-steps; the group's scales and zero-points were loaded one group ahead
  uint32_t sc[8], cz[8][2];
  column_scales(sa, sb, g, sc);
  zero_pairs<BF, BITS>(zw, cz);
  if (grp < last_group) {
    sa = __ldg(sbase + (grp + 1) * gstride), sb = __ldg(sbase + (grp + 1) * gstride + 1);
    zw = __ldg(zbase + (grp + 1) * gstride);
  }
  for (int ss = 0; ss < nss; ++ss) {
    // k-step ss has landed once at most PF - 2 later groups are pending
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PF - 2) : "memory");
    uint32_t w[4 * BITS];
    const uint4* slot = ring + (ss % PF) * BITS * 32;
#pragma unroll
    for (int i = 0; i < BITS; ++i) {
      const uint4 v = slot[i * 32];
      w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
    }
    // k-step ss + PF - 1 into the slot k-step ss - 1 was read from (its words are consumed)
    const int nx = ss + PF - 1;
    if (nx < nss) {
#pragma unroll
      for (int i = 0; i < BITS; ++i)
        cp_async16(ring + ((nx % PF) * BITS + i) * 32, qp + nx * qstride + i * 32);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    const unsigned gs = group_of(s0 + ss, gmagic);
    if (gs != grp) {  // warp-uniform: the next group (loaded ahead) starts here
      add_scaled_mmv<NB>(acc, gacc, sc);
      grp = gs;
      column_scales(sa, sb, g, sc);
      zero_pairs<BF, BITS>(zw, cz);
      if (grp < last_group) {
        sa = __ldg(sbase + (grp + 1) * gstride), sb = __ldg(sbase + (grp + 1) * gstride + 1);
        zw = __ldg(zbase + (grp + 1) * gstride);
      }
    }
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      uint32_t f[16];
      dequant_pairs<BF, BITS>(w + st * BITS, cz, f, st);
      mma_swapped<BF, NB>(gacc, f, xr, ss * 32 + st * 8);  // k in x words
    }
  }
  if (nss > 0) add_scaled_mmv<NB>(acc, gacc, sc);
  pdl_launch_dependents();  // the next kernel may start once every block is here

  // 4. output: acc[n][i][e] is column 64 b + 16 i + 8 (e / 2) + g, row 8 n + 2 t + e % 2
  if (CL && csize > 1) {  // launch-uniform: the cluster's splits add up in shared memory
    const int strip = warp * 64;  // the warp's first column in the block
    cluster_reduce<BF, WN * 64>(
        [&](float* red) {
          each_output(acc, M, [&](float v, int r, int c) { red[r * WN * 64 + strip + c] = v; });
        },
        reinterpret_cast<float*>(smem), bias, y, ws, 0, M, N, blockIdx.x * WN * 64,
        splits == csize);
    if (splits > csize) finish_splits<BF>(ws, cnt, bias, y, M, N, WN * 64);
    return;
  }
  each_output(acc, M, [&](float v, int r, int c) {
    c += b * 64;
    if (splits == 1)
      y[(size_t)r * N + c] = from_float<BF>(v + (bias != nullptr ? to_float<BF>(bias[c]) : 0.0f));
    else
      atomicAdd(ws + (size_t)r * N + c, v);
  });
  if (splits > 1) finish_splits<BF>(ws, cnt, bias, y, M, N, WN * 64);
}

// PF: the ring's k-steps per warp, DEPTH x 16 bytes per lane (DEPTH / BITS k-steps, PF - 1 of
// them in flight while one is computed)
template <bool BF, int BITS, int WN, int DEPTH>
int launch_mmv(const half* x, const uint4* qc, const uint2* zp, const uint4* scp,
               const uint4* wsp, const int* sidx, int nsal, const half* bias, half* y,
               float* ws, int* cnt, int M, int N, int K, int group, int splits, int csize,
               bool pdl, cudaStream_t stream) {
  constexpr int PF = DEPTH / BITS;
  static_assert(PF >= 2, "the ring needs two k-steps");
  const int S = K / 64;
  const int ss_per_split = (S + splits - 1) / splits;
  splits = (S + ss_per_split - 1) / ss_per_split;
  const int nq = ((nsal + 15) / 16 + splits - 1) / splits;
  constexpr bool CL = DEPTH == 8;  // clusters at the default depth (rules.MMV_DEPTH) only
  if (csize > 1 && (!CL || splits % csize)) return -1;  // and they tile the splits
  size_t smem = (size_t)WN * PF * BITS * 32 * sizeof(uint4) +
                (size_t)(M + 1) * (ss_per_split * 64 + nq * 16 + 8) * sizeof(half);
  if (csize > 1) smem = max(smem, (size_t)M * WN * 64 * sizeof(float));  // the partial tile
  static size_t allowed[2][64] = {};  // per kernel and device: the shared memory allowed
  static bool clustered[2][64] = {};  // per kernel and device: clusters past 8 blocks allowed
  const dim3 grid(N / 64 / WN, splits);
  const unsigned magic = group_magic(group);
  auto run = [&](auto kernel, size_t* table, bool* cl) {
    int rc = allow_smem(kernel, smem, table);
    if (rc) return rc;
    rc = allow_cluster(kernel, csize, cl);
    if (rc) return rc;
    return launch_ex(kernel, grid, dim3(WN * 32), smem, stream, csize, pdl, x, qc, zp, scp, wsp,
                     sidx, nsal, bias, y, ws, cnt, M, N, K, magic, ss_per_split, csize);
  };
  // one 8-row tile of x up to 8 rows, two up to 16
  return M <= 8 ? run(mixed_mmv_kernel<BF, BITS, WN, PF, 1, CL>, allowed[0], clustered[0])
                : run(mixed_mmv_kernel<BF, BITS, WN, PF, 2, CL>, allowed[1], clustered[1]);
}

template <bool BF, int BITS, int WN>
int mmv_by_depth(int depth, const half* x, const uint4* qc, const uint2* zp, const uint4* scp,
                 const uint4* wsp, const int* sidx, int nsal, const half* bias, half* y,
                 float* ws, int* cnt, int M, int N, int K, int group, int splits,
                 int csize, bool pdl, cudaStream_t s) {
  switch (depth) {
    case 8: return launch_mmv<BF, BITS, WN, 8>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
#ifndef GQ_COMPILE_CHECK  // the CPU test compiles one depth and block width (the same code)
    case 16: return launch_mmv<BF, BITS, WN, 16>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
    case 32: return launch_mmv<BF, BITS, WN, 32>(x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
#endif
    default: return -1;
  }
}

template <bool BF, int BITS>
int mmv_by_wn(int wn, int depth, const half* x, const uint4* qc, const uint2* zp,
              const uint4* scp, const uint4* wsp, const int* sidx, int nsal, const half* bias,
              half* y, float* ws, int* cnt, int M, int N, int K, int group, int splits,
              int csize, bool pdl, cudaStream_t s) {
  switch (wn) {
    case 1: return mmv_by_depth<BF, BITS, 1>(depth, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
#ifndef GQ_COMPILE_CHECK
    case 2: return mmv_by_depth<BF, BITS, 2>(depth, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
    case 4: return mmv_by_depth<BF, BITS, 4>(depth, x, qc, zp, scp, wsp, sidx, nsal, bias, y, ws, cnt, M, N, K, group, splits, csize, pdl, s);
#endif
    default: return -1;
  }
}

}  // namespace

// Returns a cudaError_t (0 = success), or -1 for arguments outside what was compiled.
extern "C" int gq_mixed_mmv(const void* x, const void* qc, const void* zp, const void* scp,
                            const void* wsp, const void* sidx, int nsal, const void* bias,
                            void* y, void* ws, void* cnt, int M, int N, int K, int group,
                            int bits, int bf16, int wn, int splits, int depth, int csize,
                            int pdl, void* stream) {
  if (M < 1 || M > 16 || wn < 1 || N % (64 * wn) || K % 64 || group % 64 || K % group || splits < 1)
    return -1;
  if (csize < 1 || csize > 16) return -1;
  if (csize > 1 && !device_has_clusters()) return -1;  // sm_90 and later
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
      case 2: return mmv_by_wn<BF, 2>(wn, depth, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      case 3: return mmv_by_wn<BF, 3>(wn, depth, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      case 4: return mmv_by_wn<BF, 4>(wn, depth, xh, q, z, sc, wp, si, nsal, bh, yh, w, c, M, N, K, group, splits, csize, pdl, s);
      default: return -1;
    }
  };
  return bf16 ? run(std::true_type{}) : run(std::false_type{});
}

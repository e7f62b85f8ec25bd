// Mixed-precision matmul for many rows (M > 64), fp16 activations, on Hopper's warpgroup MMA
// (wgmma, sm_90a) with the operands swapped:
//
//     y^T[N, M] = dequant(W_q) x^T + W_S x[:, S]^T (+ bias)
//
// The weights are wgmma's A operand, from registers: one warpgroup (4 warps) computes one
// 64-column strip for a tile of NT rows of x, and warp w dequantizes the strip's columns
// 16 w .. 16 w + 15 (A rows 16 w ..). They come from the same packed words as the other two
// kernels (native.py, `pack_codes`): the pairs 4 w .. 4 w + 3 of a k16 step are, in order
// (0, 2, 1, 3), the A fragment of those 16 columns (mixed_mmv.cu). x is the B operand, read by
// the MMA from shared memory in its K-major core-matrix layout (8 rows x 16 bytes per core
// matrix, no swizzle). Each 64-deep k-step's x tile (NT rows, zeros past M), the strip's codes,
// zero-points and scales stream through a STAGES-deep ring of cp.async copies, so the
// warpgroup issues the copies of k-step s + STAGES - 1 while the MMAs of k-step s run (the
// dequantization of k-step s + 1 waits for them: its registers are their operands). The
// weights are exact (code - zero in fp16) times the scale in fp16, rounded as the torch
// reference rounds `(code - zero) * scale`; products are summed in fp32.
//
// The salient columns of x, gathered by the caller into xs [M, 64 QS] (zeros past the last),
// are extra k-steps before the quantized ones, round-robin over the K splits, with their fp16
// weights' fragments as stored (native.py, `pack_salient`). One K split writes y through
// shared memory in 16-byte rows; several add into the zeroed fp32 workspace and the last block
// of each output tile writes it (fragments.cuh, `finish_tile`).
#include "fragments.cuh"

namespace {

constexpr int WG_STAGES = 4;

__host__ __device__ constexpr int wg_x_bytes(int nt) { return nt * 64 * 2; }
__host__ __device__ constexpr int wg_slot_bytes(int bits, int nt) {
  // x tile, the strip's codes (32 lanes x BITS x 16 bytes), 64 zero-point bytes and 128 bytes
  // of scales, rounded up to 128 bytes
  return (wg_x_bytes(nt) + 32 * bits * 16 + 192 + 127) / 128 * 128;
}

// 16 bytes global -> shared, or 16 zero bytes where `bytes` is 0
__device__ __forceinline__ void cp_async16_or_zero(void* smem, const void* gmem, int bytes) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GQ_WGMMA 1

// wgmma shared-memory matrix descriptor: start address, leading (K) and stride (M / N) byte
// offsets between core matrices, no swizzle
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d (64 x N, fp32) += a (this warp's 16 rows x k16, registers) * B (k16 x N, shared memory)
__device__ __forceinline__ void wgmma_m64n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
      "}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_m64n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

template <int NT>
__device__ __forceinline__ void wgmma_tile(float (&d)[NT / 2], const uint32_t (&a)[4],
                                           uint64_t desc) {
  if constexpr (NT == 64)
    wgmma_m64n64(d, a, desc);
  else
    wgmma_m64n128(d, a, desc);
}

// words[i] where i is warp-uniform (selects, not an indexed register array)
template <int BITS>
__device__ __forceinline__ uint32_t pick_word(const uint32_t* w, int i) {
  uint32_t r = w[0];
#pragma unroll
  for (int j = 1; j < BITS; ++j) r = i == j ? w[j] : r;
  return r;
}
#endif

template <int BITS, int NT>
__global__ void __launch_bounds__(128)
    mixed_wg_kernel(const half* __restrict__ x, const half* __restrict__ xs,
                    const uint4* __restrict__ qc, const uint4* __restrict__ zp,
                    const uint4* __restrict__ scp, const uint4* __restrict__ wsp, int Q, int QS,
                    const half* __restrict__ bias, half* __restrict__ y, float* __restrict__ ws,
                    int* __restrict__ cnt, int M, int N, int K, unsigned gmagic,
                    int ss_per_split, int T) {
#ifdef GQ_WGMMA
  constexpr int XB = wg_x_bytes(NT), WB = 32 * BITS * 16, SB = wg_slot_bytes(BITS, NT);
  constexpr int PER = BITS == 4 ? 4 : BITS == 2 ? 8 : 5;  // pairs per word
  extern __shared__ __align__(128) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x % T, b = blockIdx.x / T;  // row tile (fastest), 64-column strip
  const int B = N >> 6, row0 = tile * NT;
  const int split = blockIdx.y, splits = gridDim.y;
  const int S = K >> 6;
  const int s0 = split * ss_per_split, nss = max(0, min(S, s0 + ss_per_split) - s0);
  const int nps = QS > split ? (QS - split + splits - 1) / splits : 0;  // salient k-steps
  const int iters = nps + nss;
  const uint32_t smem0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  // copies of iteration `it` into its ring slot: x rows row0 .. row0 + NT - 1 (zeros past M)
  // as 8 column blocks of NT x 16 bytes (core matrix (n / 8, kb) at kb * NT * 16 + n / 8 * 128),
  // and for a quantized k-step the strip's codes, zero-points and scales
  auto issue = [&](int it) {
    uint8_t* slot = smem + (it % WG_STAGES) * SB;
    const bool sal = it < nps;
    const half* src = sal ? xs : x;
    const int ld = sal ? QS * 64 : K;
    const int s = s0 + it - nps;
    const int k0 = (sal ? split + it * splits : s) * 64;
#pragma unroll
    for (int i = threadIdx.x; i < NT * 8; i += 128) {
      const int n = i >> 3, kb = i & 7, r = row0 + n;
      const half* gp = src + (size_t)min(r, M - 1) * ld + k0 + kb * 8;
      cp_async16_or_zero(slot + kb * NT * 16 + n * 16, gp, r < M ? 16 : 0);
    }
    if (!sal) {
      const uint4* wp = qc + ((size_t)s * B + b) * 32 * BITS;
      for (int i = threadIdx.x; i < 32 * BITS; i += 128) cp_async16(slot + XB + i * 16, wp + i);
      const unsigned grp = group_of(s, gmagic);
      if (threadIdx.x < 4)  // 64 zero-point bytes [g][j]
        cp_async16(slot + XB + WB + threadIdx.x * 16, zp + ((size_t)grp * B + b) * 4 + threadIdx.x);
      else if (threadIdx.x < 12)  // 64 scales [t'][j][c] (column 8 j + 2 t' + c)
        cp_async16(slot + XB + WB + 64 + (threadIdx.x - 4) * 16,
                   scp + ((size_t)grp * B + b) * 8 + threadIdx.x - 4);
    }
  };
#pragma unroll
  for (int p = 0; p < WG_STAGES - 1; ++p) {
    if (p < iters) issue(p);
    commit_copies();
  }

  // this warp's pairs 4 w + u: word and bit position within a k16 step's BITS words
  int widx[4], wpos[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) widx[u] = (4 * warp + u) / PER, wpos[u] = (4 * warp + u) % PER * BITS;
  const bool spread = BITS == 3 && warp == 3;  // pair 15 of 3 bits: bit 15 of the three words
  const uint32_t sel = g & 1 ? 0x3232u : 0x1010u;

  float acc[NT / 2];
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;

  for (int it = 0; it < iters; ++it) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(WG_STAGES - 2) : "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // copies -> MMA's reads
    __syncthreads();
    const uint8_t* slot = smem + (it % WG_STAGES) * SB;
    uint32_t a[4][4];  // A fragments of the k-step's four k16 steps
    if (it < nps) {
      const int q0 = (split + it * splits) * 4;  // first salient k16 step
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (q0 + st < Q) v = __ldg(wsp + ((size_t)((q0 + st) * B + b) * 4 + warp) * 32 + lane);
        a[st][0] = v.x, a[st][1] = v.z, a[st][2] = v.y, a[st][3] = v.w;
      }
    } else {
      uint32_t w[4 * BITS];
      const uint4* wv = reinterpret_cast<const uint4*>(slot + XB) + lane;
#pragma unroll
      for (int i = 0; i < BITS; ++i) {
        const uint4 v = wv[i * 32];
        w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
      }
      // zero-points of columns 16 w + g (lo) and 16 w + 8 + g (hi) as 1024 + z in both halves;
      // their scales in both halves
      const uint32_t zb = *reinterpret_cast<const uint16_t*>(slot + XB + WB + g * 8 + 2 * warp);
      const uint32_t zlo = (0x6400u | (zb & 0xFFu)) * 0x00010001u;
      const uint32_t zhi = (0x6400u | (zb >> 8)) * 0x00010001u;
      const uint2 sw =
          *reinterpret_cast<const uint2*>(slot + XB + WB + 64 + ((g >> 1) * 16 + 4 * warp) * 2);
      const uint32_t slo = __byte_perm(sw.x, 0, sel), shi = __byte_perm(sw.y, 0, sel);
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        const uint32_t* ws3 = w + st * BITS;
        uint32_t f[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          uint32_t raw = lop3_and_or(pick_word<BITS>(ws3, widx[u]) >> wpos[u],
                                     (1u << BITS) - 1 | ((1u << BITS) - 1) << 16, 0x64006400u);
          if (u == 3 && spread) {
            const uint32_t top = ((ws3[0] >> 15) & 0x00010001u) | ((ws3[1] >> 14) & 0x00020002u);
            raw = lop3_and_or(ws3[2] >> 13, 0x00040004u, top | 0x64006400u);
          }
          const half2 v = __hsub2(u2h(raw), u2h(u < 2 ? zlo : zhi));  // code - zero, exact
          f[u] = h2u(__hmul2(v, u2h(u < 2 ? slo : shi)));
        }
        a[st][0] = f[0], a[st][1] = f[2], a[st][2] = f[1], a[st][3] = f[3];
      }
    }
    wg_fence();
#pragma unroll
    for (int st = 0; st < 4; ++st)
      wgmma_tile<NT>(acc, a[st], smem_desc(smem0 + (it % WG_STAGES) * SB + st * 2 * NT * 16,
                                           NT * 16, 128));
    wg_commit();
    // while they run, the previous k-step's slot (its MMAs done) takes the copies of k-step
    // it + STAGES - 1
    if (it + WG_STAGES - 1 < iters) issue(it + WG_STAGES - 1);
    commit_copies();
    // the MMAs read their A fragments (registers) and the slot asynchronously: nothing may
    // write either before they are done (a wait for the previous k-step only, with the next
    // fragments written meanwhile, gave wrong products once three blocks shared an SM)
    wg_wait<0>();
  }
  wg_wait<0>();
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");

  // acc[i]: column 16 w + g + 8 ((i / 2) % 2) of the strip, row row0 + 8 (i / 4) + 2 t + i % 2
  const int c0 = b * 64 + 16 * warp + g;
  if (splits == 1) {
    constexpr int LD = 72;  // halves per staged row (64 + 8: rows shift by 16 bytes)
    half* out = reinterpret_cast<half*>(smem);
    __syncthreads();  // every warp is done with the ring
    const float bl = bias != nullptr ? __half2float(bias[c0]) : 0.0f;
    const float bh = bias != nullptr ? __half2float(bias[c0 + 8]) : 0.0f;
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) {
      const int hi = (i >> 1) & 1, r = 8 * (i >> 2) + 2 * t + (i & 1);
      out[r * LD + 16 * warp + g + 8 * hi] = __float2half_rn(acc[i] + (hi ? bh : bl));
    }
    __syncthreads();
    for (int i = threadIdx.x; i < NT * 8; i += 128) {
      const int r = i >> 3, c = i & 7;
      if (row0 + r < M)
        *reinterpret_cast<uint4*>(y + (size_t)(row0 + r) * N + b * 64 + c * 8) =
            *reinterpret_cast<const uint4*>(out + r * LD + c * 8);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < NT / 2; ++i) {
    const int r = row0 + 8 * (i >> 2) + 2 * t + (i & 1);
    if (r < M) atomicAdd(ws + (size_t)r * N + c0 + 8 * ((i >> 1) & 1), acc[i]);
  }
  finish_tile(ws, cnt, blockIdx.x, splits, bias, y, row0, min(NT, M - row0), N, b * 64, 64);
#endif
}

template <int BITS, int NT>
int launch_wg(const half* x, const half* xs, const uint4* qc, const uint4* zp, const uint4* scp,
              const uint4* wsp, int Q, int QS, const half* bias, half* y, float* ws, int* cnt,
              int M, int N, int K, int group, int splits, cudaStream_t stream) {
  auto kernel = mixed_wg_kernel<BITS, NT>;
  const int S = K / 64;
  const int ss_per_split = (S + splits - 1) / splits;
  splits = (S + ss_per_split - 1) / ss_per_split;
  const int T = (M + NT - 1) / NT;
  const long blocks = static_cast<long>(T) * (N / 64);
  if (blocks > 0x7FFFFFFF || (splits > 1 && blocks > (1 << 16))) return -1;  // counters
  const size_t smem = static_cast<size_t>(WG_STAGES) * wg_slot_bytes(BITS, NT);
  static size_t allowed[64] = {};
  const int rc = allow_smem(kernel, smem, allowed);
  if (rc) return rc;
  dim3 grid(static_cast<unsigned>(blocks), splits);
  kernel<<<grid, 128, smem, stream>>>(x, xs, qc, zp, scp, wsp, Q, QS, bias, y, ws, cnt, M, N, K,
                                      group_magic(group), ss_per_split, T);
  return static_cast<int>(cudaGetLastError());
}

template <int BITS>
int by_nt(int nt, const half* x, const half* xs, const uint4* qc, const uint4* zp,
          const uint4* scp, const uint4* wsp, int Q, int QS, const half* bias, half* y,
          float* ws, int* cnt, int M, int N, int K, int group, int splits, cudaStream_t s) {
  switch (nt) {
    case 64: return launch_wg<BITS, 64>(x, xs, qc, zp, scp, wsp, Q, QS, bias, y, ws, cnt, M, N, K, group, splits, s);
    case 128: return launch_wg<BITS, 128>(x, xs, qc, zp, scp, wsp, Q, QS, bias, y, ws, cnt, M, N, K, group, splits, s);
    default: return -1;
  }
}

}  // namespace

// Returns a cudaError_t (0 = success), or -1 for arguments outside what was compiled. Needs a
// build for sm_90a (the caller checks: on other targets the kernel body is empty). xs: x's
// salient columns [M, 64 QS] (zeros past the last; unused where QS = 0); Q: salient k16 steps
// of wsp.
extern "C" int gq_mixed_wg(const void* x, const void* xs, const void* qc, const void* zp,
                           const void* scp, const void* wsp, int Q, int QS, const void* bias,
                           void* y, void* ws, void* cnt, int M, int N, int K, int group,
                           int bits, int nt, int splits, void* stream) {
  if (M < 1 || N % 64 || K % 64 || group % 64 || K % group || splits < 1 || Q < 0 || QS < 0 ||
      4 * QS < Q)
    return -1;
  auto* xh = static_cast<const half*>(x);
  auto* xsh = static_cast<const half*>(xs);
  auto* q = static_cast<const uint4*>(qc);
  auto* z = static_cast<const uint4*>(zp);
  auto* sc = static_cast<const uint4*>(scp);
  auto* wp = static_cast<const uint4*>(wsp);
  auto* bh = static_cast<const half*>(bias);
  auto* yh = static_cast<half*>(y);
  auto* w = static_cast<float*>(ws);
  auto* c = static_cast<int*>(cnt);
  auto s = static_cast<cudaStream_t>(stream);
  switch (bits) {
    case 2: return by_nt<2>(nt, xh, xsh, q, z, sc, wp, Q, QS, bh, yh, w, c, M, N, K, group, splits, s);
    case 3: return by_nt<3>(nt, xh, xsh, q, z, sc, wp, Q, QS, bh, yh, w, c, M, N, K, group, splits, s);
    case 4: return by_nt<4>(nt, xh, xsh, q, z, sc, wp, Q, QS, bh, yh, w, c, M, N, K, group, splits, s);
    default: return -1;
  }
}

// What the kernels of this folder share (mixed_mma.cu: M <= 64 rows on the B side of the MMA;
// mixed_mmv.cu: M <= 16 rows, the weights on the A side; mixed_wg.cu: M >= 64 on the warpgroup
// MMA): the packed words' unpacking into 16-bit pairs, the zero-point constants, the staging
// of x and the split-K finish. The layout itself is described in layout.py.
//
// Activations, bias and y are 16-bit elements: fp16, or bf16 where a kernel's BF parameter
// says so. They travel as `half` storage (staging and copies move bits); only the MMA's type,
// the dequantization and the conversions to and from fp32 differ (`to_float`, `pack2`).
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace {

__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

#ifdef GQ_TRACE
// A diagnosis build (native.build_defines): thread 0 of each block records the global timer
// at points of its path (tools/trace_wg.py, tools/trace_mma.py); slot i of block b (blocks of
// the launch in grid order) at gq_trace_buf[b * GQ_TRACE_SLOTS + i], one buffer per source
// file (this namespace is each file's own). Slots the kernels share: 27 (the split-K count's
// answer is back), 28 (1: this block summed the splits), 29 (the SM), 30 (the exit).
constexpr int GQ_TRACE_SLOTS = 32, GQ_TRACE_BLOCKS = 8192;
__device__ unsigned long long gq_trace_buf[GQ_TRACE_BLOCKS * GQ_TRACE_SLOTS];
__device__ __forceinline__ void gq_trace_put(int i, unsigned long long v) {
  const unsigned b = blockIdx.y * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0 && b < GQ_TRACE_BLOCKS) gq_trace_buf[b * GQ_TRACE_SLOTS + i] = v;
}
__device__ __forceinline__ unsigned gq_smid() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
#define GQ_TRACE_AT(i) gq_trace_put((i), globaltimer_ns())
#define GQ_TRACE_VAL(i, v) gq_trace_put((i), static_cast<unsigned long long>(v))
// `count` values of this file's buffer into dst (host memory), then the buffer zeroed: 0 or
// a cudaError_t (-1: count out of range)
inline int trace_read(void* dst, int count) {
  if (count < 0 || count > GQ_TRACE_BLOCKS * GQ_TRACE_SLOTS) return -1;
  const size_t bytes = static_cast<size_t>(count) * sizeof(unsigned long long);
  if (const cudaError_t rc = cudaMemcpyFromSymbol(dst, gq_trace_buf, bytes)) return rc;
  void* buf = nullptr;
  if (const cudaError_t rc = cudaGetSymbolAddress(&buf, gq_trace_buf)) return rc;
  return cudaMemset(buf, 0, sizeof(gq_trace_buf));
}
#else
#define GQ_TRACE_AT(i)
#define GQ_TRACE_VAL(i, v)
#endif

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(a), "r"(mask), "r"(bits));
  return r;
}

__device__ __forceinline__ uint32_t h2u(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 u2h(uint32_t u) { return *reinterpret_cast<half2*>(&u); }
__device__ __forceinline__ uint32_t b2u(__nv_bfloat162 h) {
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ __nv_bfloat162 u2b(uint32_t u) {
  return *reinterpret_cast<__nv_bfloat162*>(&u);
}

// one 16-bit element (fp16, or bf16 where BF) as fp32
template <bool BF>
__device__ __forceinline__ float to_float(half v) {
  if constexpr (BF) {
    return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&v));
  } else {
    return __half2float(v);
  }
}
// two fp32 values rounded to a pair of 16-bit elements (low half: a)
template <bool BF>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (BF) {
    return b2u(__floats2bfloat162_rn(a, b));
  } else {
    return h2u(__floats2half2_rn(a, b));
  }
}
// one fp32 value rounded to a 16-bit element
template <bool BF>
__device__ __forceinline__ half from_float(float v) {
  if constexpr (BF) {
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    return *reinterpret_cast<const half*>(&b);
  } else {
    return __float2half_rn(v);
  }
}
// a - b and a * b on pairs of 16-bit elements (rounded to nearest)
template <bool BF>
__device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
  if constexpr (BF) {
    return b2u(__hsub2(u2b(a), u2b(b)));
  } else {
    return h2u(__hsub2(u2h(a), u2h(b)));
  }
}
template <bool BF>
__device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
  if constexpr (BF) {
    return b2u(__hmul2(u2b(a), u2b(b)));
  } else {
    return h2u(__hmul2(u2h(a), u2h(b)));
  }
}
// an fp16 pair (the stored scales) in the elements' type: bf16 rounded to nearest, as the
// torch reference's `scales.to(bfloat16)`
template <bool BF>
__device__ __forceinline__ uint32_t from_fp16x2(uint32_t h) {
  if constexpr (BF) {
    return b2u(__float22bfloat162_rn(__half22float2(u2h(h))));
  } else {
    return h;
  }
}
// The exponent bits that make a code in the low bits of a 16-bit element the number
// MAGIC + code, exactly: 1024 in fp16 (10 mantissa bits), 128 in bf16 (7: codes < 128)
template <bool BF>
__device__ __forceinline__ constexpr uint32_t magic() {
  return BF ? 0x4300u : 0x6400u;
}

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

#define GQ_MMA16816(TY)                                                                      \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, "       \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"                                       \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                               \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <bool BF>
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (BF) {
    GQ_MMA16816("bf16");
  } else {
    GQ_MMA16816("f16");
  }
}
#undef GQ_MMA16816

__device__ __forceinline__ void ldmatrix_x4(uint32_t* a, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(addr));
}

// The pair in slot 15 of a 3-bit k16 step, whose code bit i sits at bit 15 of word i's halves
// (layout.py), in bits 3..5 of each half over the exponent bits `e`: read at exponent 3, as
// the slot's others
__device__ __forceinline__ uint32_t spread_pair_at3(const uint32_t* w, uint32_t e) {
  const uint32_t top = ((w[0] >> 12) & 0x00080008u) | ((w[1] >> 11) & 0x00100010u);
  return lop3_and_or(w[2] >> 10, 0x00200020u, top | e);
}

// Which slot (field of a k16 step's words: layout.py, `_slot_fields`) holds pair p = 2 j + f.
// The warpgroup kernel's warp q dequantizes pairs 4 q + u (u = 0, 1: column 16 q + g, its two
// k halves; u = 2, 3: column 16 q + 8 + g), and each column has one zero-point constant:
// * 2 and 4 bits (layout.py, `_pair_slots`): u = 0, 2 in the low byte of each half, u = 1, 3
//   at the same bits of the high byte, so u = 0, 1 share a bit position e (and so one
//   constant; fp16 exponent bits that make the code there count in ones: `pos_magic`), and
//   u = 2, 3 theirs; one shift by 8 per word.
// * 3 bits: the warps have roles that turn with the k16 step st. Warp `w3_rest(st)` takes the
//   rest of the three words, slots 4, 9, 14 (bits 12..14) and the spread slot 15 (u = 0, 1, 2,
//   3); each other warp one word's slots 5 k .. 5 k + 3 (k = 0, 1, 2 in warp order after it),
//   u = 0, 2, 1, 3 at bits 0, 3, 6, 9: u = 0, 1 at bit 0 and u = 2, 3 at bit 3 of the word and
//   of the word shifted by 6. So in fp16 every code is read where it lies, the lo column's at
//   exponent 0 and the hi column's at exponent 3 in both roles (slot 14 shifted by 9, the spread
//   pair built at bit 3), and no warp loads all three words in every step.
__host__ __device__ constexpr int w3_rest(int st) { return (st + 3) & 3; }
template <int BITS>
__host__ __device__ constexpr int pair_slot(int st, int p) {
  if (BITS == 4) return (p & ~3) + (p & 1) * 2 + ((p >> 1) & 1);
  if (BITS == 2) return (p & ~7) + (p & 1) * 4 + ((p >> 2) & 1) * 2 + ((p >> 1) & 1);
  const int q = p >> 2, u = p & 3, rest = w3_rest(st);
  if (q == rest) return u == 3 ? 15 : 5 * u + 4;
  return 5 * ((q - rest - 1) & 3) + (u & 1) * 2 + (u >> 1);
}
// r (16 raw pairs by slot) into pair order for k16 step st (constants once unrolled)
template <int BITS>
__device__ __forceinline__ void slots_to_pairs(uint32_t* r, int st) {
  uint32_t t[16];
#pragma unroll
  for (int p = 0; p < 16; ++p) t[p] = r[pair_slot<BITS>(st, p)];
#pragma unroll
  for (int p = 0; p < 16; ++p) r[p] = t[p];
}

// Exponent (bit position in the half) of slot s once unpack_pairs has moved it into bits 0..9,
// and of pair p (its slot's: the same in every k16 step)
template <int BITS>
__host__ __device__ constexpr int slot_exp(int s) {
  if (BITS == 4) return (s % 4) % 2 * 4;                      // nibbles 0,1 | (>>8) 0,1
  if (BITS == 2) return (s % 8) < 5 ? 2 * (s % 8) : 2 * (s % 8 - 5);  // 0..8 | (>>10) 0..4
  return s >= 14 ? 3 : s % 5 == 4 ? 0 : (s % 5) % 2 * 3;  // 0,3 | (>>6) 0,3 | (>>12) 0; 14, 15: 3
}
template <int BITS>
__host__ __device__ constexpr int pair_exp(int p) {
  return slot_exp<BITS>(pair_slot<BITS>(0, p));
}
// Each step's map is a permutation of the 16 slots, and a pair's exponent is its slot's in every
// k16 step (the tensor-core and swapped kernels build their zero-point constants once a group)
template <int BITS>
__host__ __device__ constexpr bool pair_slots_hold() {
  for (int st = 0; st < 4; ++st) {
    int seen = 0;
    for (int p = 0; p < 16; ++p) {
      seen |= 1 << pair_slot<BITS>(st, p);
      if (slot_exp<BITS>(pair_slot<BITS>(st, p)) != pair_exp<BITS>(p)) return false;
    }
    if (seen != 0xFFFF) return false;
  }
  return true;
}
static_assert(pair_slots_hold<2>() && pair_slots_hold<3>() && pair_slots_hold<4>(),
              "the pair -> slot maps");
// fp16 bits (one half) whose mantissa bit e counts 1: 2^(10 - e) + (code << e) read as a number
// is 2^(10 - e) + code, exactly (e + BITS <= 10); pos_magic(0) is 0x6400 (1024)
__host__ __device__ constexpr uint32_t pos_magic(int e) {
  return 0x6400u - (static_cast<uint32_t>(e) << 10);
}
// The same in bf16 (7 mantissa bits): 2^(7 - e) + (code << e) reads 2^(7 - e) + code, exactly
// for e + BITS <= 7 (3-bit codes at bit 0 or 3); pos_magic_bf16(0) is 0x4300 (128)
__host__ __device__ constexpr uint32_t pos_magic_bf16(int e) {
  return 0x4300u - (static_cast<uint32_t>(e) << 7);
}
static_assert(pos_magic_bf16(3) == 0x4180u, "16 in bf16");

// 3 bits: the 16 raw pairs (by slot) of one k16 step from its three words, each code read
// where it lies over `e0` (a slot at exponent 0) or `e3` (exponent 3: `slot_exp`)
__device__ __forceinline__ void unpack_pairs_3(const uint32_t* w, uint32_t* r, uint32_t e0,
                                               uint32_t e3) {
#pragma unroll
  for (int b = 0; b < 3; ++b) {
    const uint32_t w6 = w[b] >> 6;
    r[5 * b + 0] = lop3_and_or(w[b], 0x00070007u, e0);
    r[5 * b + 1] = lop3_and_or(w[b], 0x00380038u, e3);
    r[5 * b + 2] = lop3_and_or(w6, 0x00070007u, e0);
    r[5 * b + 3] = lop3_and_or(w6, 0x00380038u, e3);
  }
  r[4] = lop3_and_or(w[0] >> 12, 0x00070007u, e0);
  r[9] = lop3_and_or(w[1] >> 12, 0x00070007u, e0);
  r[14] = lop3_and_or(w[2] >> 9, 0x00380038u, e3);
  r[15] = spread_pair_at3(w, e3);
}

// The 16 raw pairs (0x6400 | code << e in each half) of one k16 step from its BITS words, by
// slot (`slots_to_pairs` puts them in pair order).
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
    unpack_pairs_3(w, r, E, E);  // fp16: 1024 + code << e, scaled by 2^-e after
  }
}

// The 16 raw pairs (by slot) of one k16 step with each code moved to bits 0.. of its half,
// over the exponent bits of 128 in bf16 (128 + code, exact): bf16 has 7 mantissa bits, too
// few for unpack_pairs' 2- and 4-bit codes left in place (up to bit 8)
template <int BITS>
__device__ __forceinline__ void unpack_pairs_low(const uint32_t* w, uint32_t* r) {
  static_assert(BITS != 3, "3 bits: unpack_pairs_bf16_3");
  constexpr uint32_t E = magic<true>() * 0x00010001u, MASK = ((1u << BITS) - 1) * 0x00010001u;
  constexpr int PER = BITS == 4 ? 4 : 8;  // pairs per word (layout.py)
#pragma unroll
  for (int p = 0; p < 16; ++p) r[p] = lop3_and_or(w[p / PER] >> (p % PER * BITS), MASK, E);
}

// bf16, 3 bits: the 16 raw pairs (by slot) of one k16 step read where unpack_pairs reads them,
// each over the bf16 exponent bits that make its code count in ones at its slot's exponent
// (slot_exp: 0 or 3, and 3 + 3 bits fit bf16's 7): 2^(7 - e) + code, exact (`pos_magic_bf16`)
__device__ __forceinline__ void unpack_pairs_bf16_3(const uint32_t* w, uint32_t* r) {
  unpack_pairs_3(w, r, pos_magic_bf16(0) * 0x00010001u, pos_magic_bf16(3) * 0x00010001u);
}

// The zero-point constants per (n8 tile j, fragment half f). fp16: -(1024 / 2^e + z) in both
// halves, so that one hfma2 of a raw pair by 2^-e with it gives code - z exactly. bf16: 128 + z
// in both halves (one subtraction, exact), at 3 bits 2^(7 - e) + z for the pair's exponent e.
// zw: the zero-points of columns 8 j + g (one byte each).
template <bool BF, int BITS>
__device__ __forceinline__ void zero_pairs(uint2 zw, uint32_t (&cz)[8][2]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t z = ((j < 4 ? zw.x : zw.y) >> (8 * (j & 3))) & 0xFFu;
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      if constexpr (BF) {  // 2- and 4-bit codes are moved to bit 0 (unpack_pairs_low)
        const uint32_t e = BITS == 3 ? pair_exp<BITS>(2 * j + f) : 0;
        cz[j][f] = (pos_magic_bf16(e) | (z << e)) * 0x00010001u;
      } else {
        const uint32_t e = pair_exp<BITS>(2 * j + f);
        cz[j][f] = (0x8000u | pos_magic(e) | (z << e)) * 0x00010001u;
      }
    }
  }
}

// code - zero of the 16 pairs of k16 step st (f16x2 or bf16x2, exact) from its BITS words
template <bool BF, int BITS>
__device__ __forceinline__ void dequant_pairs(const uint32_t* w, const uint32_t (&cz)[8][2],
                                              uint32_t* f, int st) {
  uint32_t r[16];
  if constexpr (BF) {
    if constexpr (BITS == 3)
      unpack_pairs_bf16_3(w, r);
    else
      unpack_pairs_low<BITS>(w, r);
    slots_to_pairs<BITS>(r, st);
#pragma unroll
    for (int p = 0; p < 16; ++p) f[p] = sub2<true>(r[p], cz[p >> 1][p & 1]);
  } else {
    unpack_pairs<BITS>(w, r);
    slots_to_pairs<BITS>(r, st);
#pragma unroll
    for (int p = 0; p < 16; ++p) {
      constexpr uint32_t one = 15u << 10;  // fp16 bits of 1.0; 2^-e: exponent - e
      const uint32_t inv = (one - (pair_exp<BITS>(p) << 10)) * 0x00010001u;
      f[p] = h2u(__hfma2(u2h(r[p]), u2h(inv), u2h(cz[p >> 1][p & 1])));
    }
  }
}

// Stage x in shared memory: rows 0..R-1 (zeros past M) and a zero row R, `kq` input columns
// from k0, by 16-byte asynchronous copies (one commit group; the caller waits and syncs).
// Row stride `ldx` halves.
__device__ __forceinline__ void stage_x(half* xs, const half* __restrict__ x, int M, int K,
                                        int R, int ldx, int k0, int kq) {
  const int chunks = kq / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < (R + 1) * chunks; i += blockDim.x) {
    const int r = i / chunks, c = i - r * chunks;
    half* dst = xs + r * ldx + c * 8;
    if (r < M)
      cp_async16(dst, x + (size_t)r * K + k0 + c * 8);
    else
      *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
  }
  asm volatile("cp.async.commit_group;\n" ::);
}

// The split's `nq` x 16 salient columns of x (positions split + c * splits of the salient
// list), gathered into columns kq.. of the staged rows (plain stores: the caller syncs). A
// thread handles GATHER_BATCH elements at a time, their index loads issued together, then their
// x loads: two memory round trips per batch (one element at a time made every element two
// dependent round trips, about 12% of the stall samples at M = 16 on an H200). Row and column
// advance by the block's width without dividing per element. The indices are the layer's, not
// the previous kernel's output: `salient_first` loads a thread's first batch of them before the
// dependent wait, and `gather_salient` takes them from there (`first`).
constexpr int GATHER_BATCH = 4;

struct GatherWalk {  // the elements of a thread: (row, column) stepping by the block's width
  int r, c, scols, total, dq, dr, bd;
  __device__ __forceinline__ GatherWalk(int nq, int R)
      : scols(nq * 16), total((R + 1) * nq * 16), bd(static_cast<int>(blockDim.x)) {
    dq = bd / scols, dr = bd - dq * scols;  // (rows, columns) per step of bd elements
    r = static_cast<int>(threadIdx.x) / scols, c = static_cast<int>(threadIdx.x) - r * scols;
  }
  // element u of the batch from i0: row << 16 | column, -1 past the end; then the next one
  __device__ __forceinline__ int next(int i0, int u) {
    const int rc = i0 + u * bd < total ? r << 16 | c : -1;
    c += dr, r += dq;
    if (c >= scols) c -= scols, ++r;
    return rc;
  }
};

// The column of x element rc (GatherWalk) reads, -1 for a zero (past M or the list).
__device__ __forceinline__ int salient_col(int rc, const int* __restrict__ sidx, int nsal, int M,
                                           int split, int splits) {
  const int r = rc >> 16, c = rc & 0xFFFF;
  const int j = (split + (c >> 4) * splits) * 16 + (c & 15);  // salient position
  return rc >= 0 && r < M && j < nsal ? __ldg(sidx + j) : -1;
}

__device__ __forceinline__ void salient_first(int (&first)[GATHER_BATCH],
                                              const int* __restrict__ sidx, int nsal, int M,
                                              int R, int nq, int split, int splits) {
  if (nq == 0) return;
  GatherWalk w(nq, R);
#pragma unroll
  for (int u = 0; u < GATHER_BATCH; ++u)
    first[u] = salient_col(w.next(threadIdx.x, u), sidx, nsal, M, split, splits);
}

__device__ __forceinline__ void gather_salient(half* xs, const half* __restrict__ x,
                                               const int* __restrict__ sidx, int nsal, int M,
                                               int K, int R, int ldx, int kq, int nq,
                                               int split, int splits,
                                               const int* first = nullptr) {
  if (nq == 0) return;  // no salient step in this split (block-uniform; no barrier here)
  GatherWalk w(nq, R);
  for (int i0 = threadIdx.x; i0 < w.total; i0 += GATHER_BATCH * w.bd) {
    int rc[GATHER_BATCH], col[GATHER_BATCH];  // row << 16 | column (-1: past the end); col of x
#pragma unroll
    for (int u = 0; u < GATHER_BATCH; ++u) {
      rc[u] = w.next(i0, u);
      col[u] = first != nullptr && i0 == static_cast<int>(threadIdx.x)
                   ? first[u]
                   : salient_col(rc[u], sidx, nsal, M, split, splits);
    }
    half v[GATHER_BATCH];
#pragma unroll
    for (int u = 0; u < GATHER_BATCH; ++u)
      v[u] = col[u] >= 0 ? x[(size_t)(rc[u] >> 16) * K + col[u]] : __ushort_as_half(0);  // +0 in fp16 and bf16
#pragma unroll
    for (int u = 0; u < GATHER_BATCH; ++u)
      if (rc[u] >= 0) xs[(rc[u] >> 16) * ldx + kq + (rc[u] & 0xFFFF)] = v[u];
  }
}

// Wait until at most N of this thread's copy groups are pending, then a block barrier.
template <int N>
__device__ __forceinline__ void wait_copies_and_sync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
  __syncthreads();
}

// After every thread of the block has added its partials into ws: the last block of column
// block blockIdx.x (`width` columns) adds the bias, writes y [M, N] and zeroes its part of ws
// and its counter again (the Triton kernels' protocol: one launch, no memset). A thread reads
// the ws pairs of FINISH_BATCH rows before it writes any: one round trip per batch (one pair at
// a time made the last block's M * width / 2 / threads round trips the kernel's tail: about
// 17% of the stall samples at M = 16 on an H200).
// The block's adds are released by one thread: the barrier orders every thread's adds before
// thread 0's fence, which is cumulative at GPU scope, then its counter add (a CUTLASS-style
// semaphore); the last block's thread 0 fences after seeing the count (acquire), and the
// barrier passes that to the block. A fence in every thread (the CUDA sample's pattern) made
// the fence 6-18% of the tensor-core kernel's stall samples at M = 16-64 (round 15 profile).
constexpr int FINISH_BATCH = 8;

// finish_tile: the last of the `parts` blocks counted at cnt[counter] does it for the tile of
// `rows` rows from row0 and `width` columns from col0 (the warpgroup kernel's row tiles);
// finish_splits: for column block blockIdx.x of `width` columns, all M rows, its gridDim.y
// K splits.
template <bool BF>
__device__ __forceinline__ void finish_tile(float* __restrict__ ws, int* __restrict__ cnt,
                                            int counter, int parts,
                                            const half* __restrict__ bias, half* __restrict__ y,
                                            int row0, int rows, int N, int col0, int width) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();  // release: the block's adds before the count
    last = atomicAdd(cnt + counter, 1) == parts - 1;
    GQ_TRACE_AT(27);
    GQ_TRACE_VAL(28, last);
    if (last) __threadfence();  // acquire: every block's adds before the reads below
  }
  __syncthreads();
  if (!last) return;
  // element i = (row, column pair): rows and pairs advance by the block's width per step
  const int hw = width / 2, total = rows * hw, bd = blockDim.x;
  const int dq = bd / hw, dr = bd - dq * hw;
  int r = threadIdx.x / hw, c = threadIdx.x - r * hw;
  for (int i0 = threadIdx.x; i0 < total; i0 += FINISH_BATCH * bd) {
    float2 v[FINISH_BATCH];
    int at[FINISH_BATCH];  // offset of the pair in ws and y, -1 past the end
#pragma unroll
    for (int u = 0; u < FINISH_BATCH; ++u) {
      at[u] = i0 + u * bd < total ? (row0 + r) * N + col0 + 2 * c : -1;
      if (at[u] >= 0) v[u] = __ldcg(reinterpret_cast<const float2*>(ws + at[u]));
      c += dr, r += dq;
      if (c >= hw) c -= hw, ++r;
    }
#pragma unroll
    for (int u = 0; u < FINISH_BATCH; ++u)
      if (at[u] >= 0) {
        const int o = at[u];
        __stcg(reinterpret_cast<float2*>(ws + o), make_float2(0.0f, 0.0f));
        if (bias != nullptr) {
          const int cc = o % N;  // only with a bias
          v[u].x += to_float<BF>(bias[cc]), v[u].y += to_float<BF>(bias[cc + 1]);
        }
        *reinterpret_cast<uint32_t*>(y + o) = pack2<BF>(v[u].x, v[u].y);
      }
  }
  if (threadIdx.x == 0) cnt[counter] = 0;
}

template <bool BF>
__device__ __forceinline__ void finish_splits(float* __restrict__ ws, int* __restrict__ cnt,
                                              const half* __restrict__ bias,
                                              half* __restrict__ y, int M, int N, int width) {
  finish_tile<BF>(ws, cnt, blockIdx.x, gridDim.y, bias, y, 0, M, N, blockIdx.x * width, width);
}

// The split-K sum inside a thread-block cluster of blocks along the splits (sm_90), the
// kernels' alternative to the atomics and `finish_tile`: each block leaves its partial tile
// (`rows` rows x its W columns, fp32, row stride LD) in its own shared memory at `red`
// (`store(red)`, after a barrier: the staged x and rings there are done with), and block q of
// the cluster adds slice q of the tile over the cluster's blocks (distributed shared memory,
// in rank order: the same sum every run), then writes it to y at (row0, col0) (`whole`: the
// cluster holds every split; bias added) or adds it into ws for the finish of the splits
// across clusters. Replaces rows x W fp32 atomics per split, the memory fence and the last
// block's pass with two cluster barriers.
template <bool BF, int W, int LD = W, typename Store>
__device__ __forceinline__ void cluster_reduce(Store&& store, float* red,
                                               const half* __restrict__ bias,
                                               half* __restrict__ y, float* __restrict__ ws,
                                               int row0, int rows, int N, int col0, bool whole) {
  static_assert(W % 4 == 0 && LD % 4 == 0, "float4 rows");
#if __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  __syncthreads();  // every warp is done with the shared memory the tile takes (or, where the
                    // caller staged the tile itself and `store` does nothing, the tile is whole)
  store(red);
  cluster.sync();  // release / acquire: every block's tile is visible to the cluster
  const int C = static_cast<int>(cluster.num_blocks()), q = static_cast<int>(cluster.block_rank());
  const int total = rows * (W / 4), per = (total + C - 1) / C, end = min(total, (q + 1) * per);
  for (int i = q * per + static_cast<int>(threadIdx.x); i < end; i += blockDim.x) {
    const int r = i / (W / 4), c4 = i - r * (W / 4), c = col0 + 4 * c4;
    float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float4* mine = reinterpret_cast<float4*>(red + r * LD) + c4;
#pragma unroll 4  // four remote loads in flight, added in rank order
    for (int p = 0; p < C; ++p) {
      const float4 v = *cluster.map_shared_rank(mine, p);
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    const size_t o = (size_t)(row0 + r) * N + c;
    if (whole) {
      if (bias != nullptr) {
        s.x += to_float<BF>(bias[c]), s.y += to_float<BF>(bias[c + 1]);
        s.z += to_float<BF>(bias[c + 2]), s.w += to_float<BF>(bias[c + 3]);
      }
      uint32_t* out = reinterpret_cast<uint32_t*>(y + o);
      out[0] = pack2<BF>(s.x, s.y), out[1] = pack2<BF>(s.z, s.w);
    } else {
      atomicAdd(reinterpret_cast<float4*>(ws + o), s);
    }
  }
  // no block leaves while another still reads its shared memory: a relaxed arrival (the
  // release's fence waited for this thread's stores to y: 3% of the stall samples at 4096^2,
  // M = 64). The PTX model does not order the remote loads before a relaxed arrival; what
  // does is that every loaded value feeds the adds whose sum is stored before it (in-order
  // issue: the arrival waits for the loads' data). Keep it so: no remote load here whose
  // value is left unused, or used only after this barrier.
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
  asm volatile("barrier.cluster.wait;\n" ::: "memory");
#else
  __trap();  // clusters need sm_90; the launchers refuse them below it
#endif
}

// Whether the current device has thread-block clusters (sm_90 and later).
inline bool device_has_clusters() {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major >= 9;
}

// Allow clusters of more than the portable 8 blocks for `kernel` where `csize` asks for them
// (sm_90 allows 16) and `done` (the caller's, one per kernel: [64] devices) says it was not
// yet on this device: 0 or a cudaError_t (-1 for a device index past 63).
template <typename Kernel>
int allow_cluster(Kernel* kernel, int csize, bool* done) {
  if (csize <= 8) return 0;
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return -1;
  if (done[dev]) return 0;
  const cudaError_t rc =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (rc) {
    cudaGetLastError();  // taken here: the next launch must not report it as its own
    return static_cast<int>(rc);
  }
  done[dev] = true;
  return 0;
}

// floor(s / ssg) = umulhi(s, magic) for s, ssg < 2^16 with magic = ceil(2^32 / ssg); 0 stands
// for ssg = 1 (group of 64: the k-step is the group)
inline unsigned group_magic(int group) {
  const unsigned ssg = static_cast<unsigned>(group / 64);
  return ssg == 1 ? 0u : static_cast<unsigned>((0x100000000ull + ssg - 1) / ssg);
}

__device__ __forceinline__ unsigned group_of(unsigned s, unsigned magic) {
  return magic ? __umulhi(s, magic) : s;
}

// Programmatic dependent launch (sm_90 and later; rules.dependent_launch): a kernel launched
// with the attribute may start while the kernel before it finishes. It reads only its weights
// before `pdl_wait`, which returns once the previous kernel is done and its writes are
// visible, and reads x and the workspace after; it lets the next kernel start once each of its
// blocks has finished its main loop (`pdl_launch_dependents`: at the start, the next kernel's
// blocks took places while this one still streamed weights). No-ops without the attribute.
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launch `kernel` on `stream`: in clusters of `cluster_y` blocks along y (> 1: sm_90), as a
// programmatic dependent (`pdl`: sm_90). A cudaError_t; a refused launch's error is taken here,
// so that the next (ordinary) launch does not report it as its own.
template <typename... Params, typename... Args>
int launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
              cudaStream_t stream, int cluster_y, bool pdl, Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  int n = 0;
  if (cluster_y > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = 1, attr[n].val.clusterDim.y = cluster_y;
    attr[n++].val.clusterDim.z = 1;
  }
  if (pdl) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  cfg.attrs = attr, cfg.numAttrs = n;
  const cudaError_t rc = cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
  if (rc) cudaGetLastError();
  return static_cast<int>(rc);
}

// Allow `smem` bytes of dynamic shared memory for `kernel` on the current device, where
// `allowed` (the caller's, one per kernel: [64] devices) does not already: 0, or a cudaError_t
// (-1 for a device index past 63).
template <typename Kernel>
int allow_smem(Kernel* kernel, size_t smem, size_t* allowed) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return -1;
  if (smem > 48 * 1024 && smem > allowed[dev]) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) {
      cudaGetLastError();  // taken here: the next launch must not report it as its own
      return static_cast<int>(e);
    }
    allowed[dev] = smem;
  }
  return 0;
}

}  // namespace

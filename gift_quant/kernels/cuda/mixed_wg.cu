// Mixed-precision matmul for many rows (timed from M = 9 on: routes.WG_M), fp16 or bf16
// activations (BF), on Hopper's warpgroup MMA (wgmma, sm_90a) with the operands swapped:
//
//     y^T[N, M] = dequant(W_q) x^T + W_S x[:, S]^T (+ bias)
//
// The weights are wgmma's A operand, from registers. A block of WGS warpgroups covers WGS
// adjacent 64-column strips for one tile of NT rows of x and one K split: warpgroup w computes
// strip w, and its warp q dequantizes the strip's columns 16 q .. 16 q + 15 (A rows 16 q ..)
// from the same packed words as the other two kernels (layout.py, `pack_codes`): the pairs
// 4 q .. 4 q + 3 of a k16 step are, in the order (0, 2, 1, 3), the A fragment of those 16
// columns. x is the B operand, read by the MMA from shared memory: one tile per k-step shared
// by the block's warpgroups (a block per strip re-read x for every 64 output columns: round
// 14's version of this kernel spent its time there), loaded by the tensor memory accelerator
// (one copy per tile, rows past M filled with zeros, 128-byte swizzle: the layout the MMA
// reads without bank conflicts) with an mbarrier per ring slot. TMA writes through the async
// proxy, as the MMA reads, so no proxy fence stands in the loop (the fence after cp.async
// copies waited for every copy in flight: one memory latency per k-step).
//
// The block's codes, zero-points and scales stream through the same ring (`wg_stages` deep).
// The A fragments are double buffered: while the MMAs of k-step s run, the warpgroup
// dequantizes k-step s + 1 into the other set of registers (it waits for the MMAs of k-step
// s - 1 first: the asynchronous MMA reads its register operands until then). Where a ninth
// warp costs no registers (`wg_producer`: tiles of 64 rows or fewer, 128 x 2; 256-row tiles
// have a producer warpgroup that hands its registers to the consumers), that producer warp issues
// every copy -- x by the tensor copy, the weights by three bulk copies, all completing on the
// slot's full barrier -- and refills a slot once every consumer warp has arrived on its empty
// barrier (the MMAs that read it are done): the consumers only wait, dequantize and issue
// MMAs. Elsewhere every thread issues cp.async copies, and one block barrier per k-step both
// publishes the codes of k-step s + 1 and frees the slot of k-step s - 1 for new copies. The
// weights are exact (code - zero in fp16 or bf16) times the scale in that type (bf16: the fp16
// scale rounded to bf16 first), rounded as the torch reference rounds `(code - zero) * scale`;
// products are summed in fp32.
//
// The salient columns are extra k-steps (64 of them per k-step, round-robin over the K splits),
// their weights' fragments as stored (fp16, or bf16 for BF: layout.py, `pack_salient`), their x
// tiles loaded by the same tensor copies from xs [M, 64 per salient k-step] (zeros past the last
// column). xs is gathered from x once per launch: by a small kernel before this one, whose blocks
// then run the salient k-steps first; or (tiles of 64 rows or fewer, where the caller asks for it,
// timed at first use as its own configuration, and the launch is all on the GPU at once: `coop`) by
// the blocks themselves, a slice each after the dependent wait, counted, and the salient k-steps
// run last, by when the count is whole (a launch before the kernel put about 0.5-1.2 us on the
// chain at M = 32-64; a gather of each block's own columns read x's scattered columns once per
// column block: at 28672 x 4096, M = 256, 224 times, most of the kernel's global-load sectors). One
// K split writes y through shared memory in 16-byte rows; several add into the zeroed fp32
// workspace and the last block of each output tile writes it (fragments.cuh, `finish_tile`), or
// (`csize` > 1, sm_90 clusters along the splits) add up in distributed shared memory
// (`cluster_reduce`), the cluster's blocks writing y where the cluster holds every split (two
// splits of two warpgroups: each block sends the other the strip it does not write, `exchange`,
// from registers). A split
// tail (`tail` > 1, one split): the tiles past the device's last whole wave of blocks run as `tail`
// K splits each through the workspace, the others whole, in one launch.
#include <cuda.h>  // CUtensorMap (the encoder is the driver's, found through the runtime)
#include <cudaTypedefs.h>

#include "fragments.cuh"

namespace {

// ring depth by tile height: 256-row tiles as deep as shared memory allows at 4 bits (6 slots
// of 37 KB), 8 slots otherwise (64-row tiles with two warpgroups keep two blocks per SM: 8 of
// 13 KB). The weights of a
// k-step are dequantized one k-step before its MMAs, so the weights' copies run STAGES - 2
// k-steps ahead of their use (one at the 3 slots 256-row tiles had before)
__host__ __device__ constexpr int wg_stages(int nt) { return nt == 256 ? 6 : 8; }

__host__ __device__ constexpr int wg_slot_bytes(int bits, int nt, int wgs) {
  // x tile, then per strip: codes (32 lanes x BITS x 16 bytes), 64 zero-point bytes and 128
  // bytes of scales; rounded up to 1024 bytes (the swizzle's alignment)
  return (nt * 128 + wgs * (32 * bits * 16 + 192) + 1023) / 1024 * 1024;
}

__host__ __device__ constexpr int wg_smem_bytes(int bits, int nt, int wgs) {
  // the ring, or the output staging if larger (one K split: NT rows x 72 halves per strip;
  // several: NT rows x (64 WGS + 4) floats), and 1024 bytes to align the ring
  return 1024 + (wg_stages(nt) * wg_slot_bytes(bits, nt, wgs) > nt * (wgs * 64 + 4) * 4
                     ? wg_stages(nt) * wg_slot_bytes(bits, nt, wgs)
                     : nt * (wgs * 64 + 4) * 4);
}

// A producer warp (the block's last, `WGS * 128` and up) issues every copy of the ring where it
// costs the consumers neither registers nor occupancy: tiles of 64 rows or fewer and 128-row tiles
// with two warpgroups. A ninth (seventeenth) warp puts a fifth warp on some sub-partition of the
// SM: 64 x 2 keeps two blocks per SM at 96 registers a thread, which every width fits in (3 bits
// since each warp's pair positions are constants: 103-105 uncapped, 109-111 with the selects
// between words before); 128 x 4 (capped at 96 too) needs 127-128. 256-row tiles need 194-197 a
// consumer thread, more than a ninth warp leaves them (168), so they get a producer warpgroup whose
// registers the consumers take (`setmaxnreg`, as CUTLASS's warp-specialized kernels do): 384
// threads start at 168, the producer's drop to 56 and the consumers' rise to 224 (56 + 2 x 224 = 3
// x 168 per sub-partition; at 40 / 232, CUTLASS's split, the producer's loop spilled 40 bytes).
// Only its first warp's lane 0 issues copies.
__host__ __device__ constexpr int wg_producer_warps(int nt, int wgs) {
  return nt == 256 ? 4 : nt <= 64 || (nt == 128 && wgs == 2) ? 1 : 0;
}
__host__ __device__ constexpr bool wg_producer(int nt, int wgs) {
  return wg_producer_warps(nt, wgs) > 0;
}
// Tiles of 64 rows or fewer with a producer warp, outside stream-K, may gather x's salient columns
// into xs themselves, a slice each block (`coop`: where the caller asks, WG_BLOCKS_GATHER, and the
// launch's blocks are all on the GPU at once), instead of a gather launch before them
// (`wg_gather_kernel`)
__host__ __device__ constexpr bool wg_in_gather(int nt, int wgs, bool sk) {
  return nt <= 64 && wg_producer_warps(nt, wgs) == 1 && !sk;
}
__host__ __device__ constexpr int wg_threads(int nt, int wgs) {
  return wgs * 128 + 32 * wg_producer_warps(nt, wgs);
}
// registers a thread of the producer warpgroup keeps, and a consumer thread takes: the split
// holds for 384 threads and one block per SM only (a consumer waiting in `setmaxnreg.inc` for
// registers no warp gives back would wait forever)
constexpr int WG_PRODUCER_REGS = 56, WG_CONSUMER_REGS = 224;
__host__ __device__ constexpr int wg_min_blocks(int nt, int wgs) {
  return nt <= 64 && wgs == 2 ? 2 : 1;
}
static_assert((WG_PRODUCER_REGS + 2 * WG_CONSUMER_REGS) * 128 <= 65536 &&
                  wg_threads(256, 2) == 384 && wg_min_blocks(256, 2) == 1,
              "the 256-row tiles' register split");

// mbarriers (shared-memory addresses) and the copies that complete on them
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// one arrival on the barrier, and `bytes` more to land before its phase completes
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// the warpgroup's registers per thread set to R (all of its threads, warp-uniform)
template <int R>
__device__ __forceinline__ void regs_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void regs_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
// a barrier of every thread of the cluster's blocks (release / acquire: each thread's writes
// before it, to any block's shared memory, are seen by every thread after it)
__device__ __forceinline__ void cluster_sync_all() {
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
}
// a barrier of the block's consumer threads only (named barrier 1: the producer warps go on)
template <int COUNT>
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(COUNT) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared by the copy
// engine, completing on the barrier
__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, uint32_t bytes,
                                          uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(dst), "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// box (64 columns x NT rows) of the 2-D tensor map at (column c0, row r0) into dst; the
// barrier's phase completes once its `bytes` have landed
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int r0,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(r0), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}


#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GQ_WGMMA 1

// wgmma shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle (rows of
// 128 bytes, 8-row groups 1024 bytes apart; the k16 slice st starts st * 32 bytes in)
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (1ull << 16) | (64ull << 32) |
         (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// d (64 x N, fp32) += a (this warp's 16 rows x k16, registers) * B (k16 x N, shared memory).
// scale-d is a predicate (true: accumulate into d).
#define GQ_D8(o)                                                                           \
  "+f"(d[o * 8]), "+f"(d[o * 8 + 1]), "+f"(d[o * 8 + 2]), "+f"(d[o * 8 + 3]),              \
      "+f"(d[o * 8 + 4]), "+f"(d[o * 8 + 5]), "+f"(d[o * 8 + 6]), "+f"(d[o * 8 + 7])

#define GQ_WGMMA_16(TY) \
  asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " " \
  "{%0, %1, %2, %3, %4, %5, %6, %7}, " \
  "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n" \
  : GQ_D8(0) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <bool BF>
__device__ __forceinline__ void wgmma_m64n16(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BF) {
    GQ_WGMMA_16("bf16");
  } else {
    GQ_WGMMA_16("f16");
  }
}
#undef GQ_WGMMA_16

#define GQ_WGMMA_32(TY) \
  asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " " \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
  "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n" \
  : GQ_D8(0), GQ_D8(1) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <bool BF>
__device__ __forceinline__ void wgmma_m64n32(float (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BF) {
    GQ_WGMMA_32("bf16");
  } else {
    GQ_WGMMA_32("f16");
  }
}
#undef GQ_WGMMA_32

#define GQ_WGMMA_64(TY) \
  asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
  "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n" \
  : GQ_D8(0), GQ_D8(1), GQ_D8(2), GQ_D8(3) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <bool BF>
__device__ __forceinline__ void wgmma_m64n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BF) {
    GQ_WGMMA_64("bf16");
  } else {
    GQ_WGMMA_64("f16");
  }
}
#undef GQ_WGMMA_64

#define GQ_WGMMA_128(TY) \
  asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
  "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
  : GQ_D8(0), GQ_D8(1), GQ_D8(2), GQ_D8(3), GQ_D8(4), GQ_D8(5), GQ_D8(6), GQ_D8(7) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <bool BF>
__device__ __forceinline__ void wgmma_m64n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BF) {
    GQ_WGMMA_128("bf16");
  } else {
    GQ_WGMMA_128("f16");
  }
}
#undef GQ_WGMMA_128

#define GQ_WGMMA_256(TY) \
  asm volatile( \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n" \
  "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, " \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, " \
  "%125, %126, %127}, " \
  "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n" \
  : GQ_D8(0), GQ_D8(1), GQ_D8(2), GQ_D8(3), GQ_D8(4), GQ_D8(5), GQ_D8(6), GQ_D8(7), \
  GQ_D8(8), GQ_D8(9), GQ_D8(10), GQ_D8(11), GQ_D8(12), GQ_D8(13), GQ_D8(14), GQ_D8(15) \
  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))
template <bool BF>
__device__ __forceinline__ void wgmma_m64n256(float (&d)[128], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BF) {
    GQ_WGMMA_256("bf16");
  } else {
    GQ_WGMMA_256("f16");
  }
}
#undef GQ_WGMMA_256
#undef GQ_D8

template <bool BF, int NT>
__device__ __forceinline__ void wgmma_tile(float (&d)[NT / 2], const uint32_t (&a)[4],
                                           uint64_t desc) {
  if constexpr (NT == 16)
    wgmma_m64n16<BF>(d, a, desc);
  else if constexpr (NT == 32)
    wgmma_m64n32<BF>(d, a, desc);
  else if constexpr (NT == 64)
    wgmma_m64n64<BF>(d, a, desc);
  else if constexpr (NT == 128)
    wgmma_m64n128<BF>(d, a, desc);
  else
    wgmma_m64n256<BF>(d, a, desc);
}

// shared-memory loads at a 32-bit shared address (the ring's per-thread bases are computed
// once); asm volatile, as the barrier waits are, so they stay after the wait that publishes
// the slot
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint32_t lds_u32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds_v2(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
// a store only where `p` holds, without a branch (the stream-K epilogue's stores of the
// accumulators: an access to them on a divergent path serializes every warpgroup MMA, ptxas
// C7518), and a load with acquire semantics at the GPU's scope
__device__ __forceinline__ void st_global_if(bool p, void* ptr, uint32_t v) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@p st.global.b32 [%1], %2;\n}\n" ::"r"(
                   static_cast<int>(p)),
               "l"(ptr), "r"(v)
               : "memory");
}
// lane ^ 4's value, in program order with the stores around it (asm volatile: the compiler
// would otherwise issue all 64 of a 256-row tile first, holding a register each)
__device__ __forceinline__ float shfl_xor4(float v) {
  float o;
  asm volatile("shfl.sync.bfly.b32 %0, %1, 4, 0x1f, 0xffffffff;\n" : "=f"(o) : "f"(v));
  return o;
}
// how long a block of a launch whose blocks gather xs together (`coop`) waits for the others'
// slices before it gathers all of xs itself: far past the slices' time (about a microsecond
// after the dependent wait), so only blocks that have not started yet make it gather
constexpr uint64_t WG_GATHER_WAIT_NS = 20000;
__device__ __forceinline__ uint32_t ld_acquire(const int* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// x as a value the compiler cannot recompute: without it, the producer kernels' consumers
// recomputed their shared-memory addresses from the thread index in every k-step
template <bool OPAQUE>
__device__ __forceinline__ uint32_t kept(uint32_t x) {
  if constexpr (OPAQUE) asm volatile("mov.b32 %0, %0;\n" : "+r"(x));
  return x;
}
#endif

// CO: the blocks gather xs themselves (`coop`, below), a kernel of its own so that the other
// configurations' k-step loop keeps its plain indices (a run-time choice made every
// configuration of 64-row tiles 1.02-1.04x the time in one A/B, round 44)
template <bool BF, int BITS, int NT, int WGS, bool SK = false, bool CO = false>
__global__ void __launch_bounds__(wg_threads(NT, WGS), wg_min_blocks(NT, WGS))
    mixed_wg_kernel(const uint4* __restrict__ qc, const uint4* __restrict__ zp,
                    const uint4* __restrict__ scp, const uint4* __restrict__ wsp, int nsal,
                    const half* __restrict__ bias, half* __restrict__ y, float* __restrict__ ws,
                    int* __restrict__ cnt, int M, int N, int K, unsigned gmagic,
                    int ss_per_split, int T, int csize, int tail0, int tail, int tail_ss,
                    int sk0, const __grid_constant__ CUtensorMap xmap,
                    const __grid_constant__ CUtensorMap smap, const half* __restrict__ x,
                    const int* __restrict__ sidx, half* __restrict__ xs, int* __restrict__ gcnt) {
#ifdef GQ_WGMMA
  constexpr int STAGES = wg_stages(NT), THREADS = wg_threads(NT, WGS);
  constexpr bool PROD = wg_producer(NT, WGS);
  constexpr bool HANDOFF = wg_producer_warps(NT, WGS) == 4;  // its registers to the consumers
  static_assert(!HANDOFF || WGS == 2, "a register handoff: two consumer warpgroups");
  constexpr int XB = NT * 128, WB = 32 * BITS * 16, SB = wg_slot_bytes(BITS, NT, WGS);
  constexpr int ZOFF = XB + WGS * WB, SOFF = ZOFF + WGS * 64;  // zero-points, scales
  constexpr int PER = BITS == 4 ? 4 : BITS == 2 ? 8 : 5;        // pairs per word
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full[STAGES];  // per slot: its copies are in place
  __shared__ __align__(8) uint64_t empty[PROD ? STAGES : 1];  // per slot: its reads are done
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2, wq = warp & 3;                  // warpgroup (strip), warp in it
  const bool producer = PROD && warp >= WGS * 4;  // the producer warp(group)
  const bool issuer = producer && warp == WGS * 4 && lane == 0;  // its copies' one thread
  // coop: the blocks gather xs together (a slice each, counted in gcnt[0]) after the dependent
  // wait, and each split runs its salient k-steps last, by when the slices are in
  constexpr bool coop = CO;
  static_assert(!CO || wg_in_gather(NT, WGS, SK),
                "the blocks' gather: tiles of 64 rows or fewer, a producer warp");
  // The block's tile (linear index tix) and K split. Blocks below tail0 take tiles as the
  // launch splits them (gridDim.y); from it on, each of the last tiles (those past the last
  // whole wave) runs as `tail` splits of tail_ss k-steps, added by the atomics
  GQ_TRACE_AT(0);  // (a diagnosis build: the block's start)
  GQ_TRACE_VAL(29, gq_smid());
  int tix = blockIdx.x, split = blockIdx.y, splits = gridDim.y, ssp = ss_per_split;
  if (tix >= tail0) {
    const int r = tix - tail0;
    tix = tail0 + r / tail, split = r % tail, splits = tail, ssp = tail_ss;
  }
  const int tile = tix % T, cb = tix / T;  // row tile (fastest), column block
  const int B = N >> 6, b0 = cb * WGS, b = b0 + wg, row0 = tile * NT;
  const int S = K >> 6;
  const int s0 = split * ssp, nss = max(0, min(S, s0 + ssp) - s0);
  const int Q = (nsal + 15) >> 4, QS = (nsal + 63) >> 6;  // salient k16 steps, k-steps
  const int nps = QS > split ? (QS - split + splits - 1) / splits : 0;
  const int iters = nps + nss;
  // iteration d of the split: salient (its k-step split + sal_ix(d) splits of the gathered
  // columns) or quantized (k-step s0 + q_ix(d)); the salient ones first, or last (coop)
  auto is_sal = [&](int d) { return coop ? d >= nss : d < nps; };
  auto sal_ix = [&](int d) { return coop ? d - nss : d; };
  auto q_ix = [&](int d) { return coop ? d : d - nps; };
  // Stream-K (SK, a launch of one split): the blocks below sk0 take one whole tile each; the
  // launch's G = gridDim.x - sk0 others share the remaining tiles' k-steps. Those tiles are
  // dealt out in L lanes: lane l holds the tiles sk0 + l, sk0 + l + L, ... (row tile fastest),
  // their k-steps flattened tile after tile (each tile's salient k-steps first, then its
  // quantized ones: St = iters), and its G / L blocks (SK blocks l, l + L, ...) take equal
  // contiguous ranges [u0, u1) of them. L = T (a lane per row tile) where T divides G and sk0,
  // so that every lane has the same range bounds: the blocks j .. j + T - 1 that hold one
  // column block's row tiles run its k-steps in step and read its weights at about the same
  // time (L2 serves all but the first read), as adjacent blocks do in the other schedules;
  // else L = 1 (one lane: tile after tile). A block's range runs as segments, one per tile it
  // touches; the segment that holds a tile's first k-step (its head) sums the partial tiles of
  // the blocks after it in its lane that share the tile (each left in the scratch by its
  // range's first segment) and writes y; so a block waits only on blocks launched after it,
  // and only for their first segment, which waits on nothing.
  int u0 = 0, u1 = 0, tile0 = 0, tstep = 1, lanes = 1;  // the block's i-th tile: tile0 + i tstep
  auto sk_begin = [&](int jj) {  // the first k-step of a lane's jj-th block (jj = G / L: the
    // end); 32-bit (the launch checks U G < 2^31): a 64-bit division is a call, whose clobbers
    // spill
    const unsigned G = (gridDim.x - sk0) / lanes, U = (T * (N / 64 / WGS) - sk0) / lanes * iters;
    return static_cast<int>(U * static_cast<unsigned>(jj) / G);
  };
  if constexpr (SK) {
    const int j = static_cast<int>(blockIdx.x) - sk0;
    if (j < 0) {
      u0 = static_cast<int>(blockIdx.x) * iters, u1 = u0 + iters;
    } else {
      lanes = (static_cast<int>(gridDim.x) - sk0) % T == 0 && sk0 % T == 0 ? T : 1;
      tile0 = sk0 + j % lanes, tstep = lanes;
      u0 = sk_begin(j / lanes), u1 = sk_begin(j / lanes + 1);
    }
  }
  const uint32_t raw0 = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t smem0 = (raw0 + 1023) & ~1023u;  // the ring, 1024-aligned
  uint8_t* smem = smem_raw + (smem0 - raw0);
  const uint32_t bar0 = kept<PROD>(static_cast<uint32_t>(__cvta_generic_to_shared(full)));
  const uint32_t ebar0 = kept<PROD>(static_cast<uint32_t>(__cvta_generic_to_shared(empty)));

  // The copies of iteration `it` into its ring slot. Weights (quantized k-steps): the block's
  // strips' codes, zero-points and scales, each contiguous in the packed tensors; they are
  // not written by the previous kernel, so the prologue issues them before pdl_wait.
  // Where they come from: the codes of k-step s0 + q_ix(it), and the row of its group's
  // zero-points and scales.
  // (Ring slot r, data d: the same but in stream-K blocks, where r counts the block's k-steps
  // and d the tile's, for the tile at row0 / column block b0 the arguments name.)
  auto w_codes = [&](int d, int bb0) {
    return qc + ((size_t)(s0 + q_ix(d)) * B + bb0) * 32 * BITS;
  };
  auto w_group = [&](int d, int bb0) {
    return (size_t)group_of(s0 + q_ix(d), gmagic) * B + bb0;
  };
  auto issue_w = [&](int it) {
    if (is_sal(it)) return;
    uint8_t* slot = smem + (it % STAGES) * SB;
    const uint4* wp = w_codes(it, b0);
    for (int i = threadIdx.x; i < WGS * 32 * BITS; i += THREADS) cp_async16(slot + XB + i * 16, wp + i);
    const size_t gb = w_group(it, b0);
    if (threadIdx.x < WGS * 4)
      cp_async16(slot + ZOFF + threadIdx.x * 16, zp + gb * 4 + threadIdx.x);
    else if (threadIdx.x < WGS * 12)
      cp_async16(slot + SOFF + (threadIdx.x - WGS * 4) * 16, scp + gb * 8 + threadIdx.x - WGS * 4);
  };
  // x: rows row0 .. row0 + NT - 1 of the k-step's 64 columns (zeros past M), row n at
  // n * 128 bytes with its 16-byte chunk c at chunk c ^ (n % 8) (the 128-byte swizzle), by one
  // tensor copy from x, or for a salient k-step from the gathered copy xs
  static_assert(wg_smem_bytes(BITS, NT, WGS) + 1024 <= 227 * 1024, "shared memory per block");
  auto issue_x = [&](int r, int d, int rr0) {
    if (!PROD && threadIdx.x != 0) return;  // the producer warp's lane 0, or thread 0
    const uint32_t dst = smem0 + (r % STAGES) * SB, bar = bar0 + (r % STAGES) * 8;
    if (!PROD) mbar_expect(bar, XB);  // the producer expects the slot's bytes at once
    if (is_sal(d))
      tma_load_2d(dst, &smap, (split + sal_ix(d) * splits) * 64, rr0, bar);
    else
      tma_load_2d(dst, &xmap, (s0 + q_ix(d)) * 64, rr0, bar);
  };
  // The producer's copies of iteration `it`'s weights: three bulk copies (codes, zero-points,
  // scales), and the slot's full barrier expecting them and the x tile
  auto produce_w = [&](int r, int d, int bb0) {
    const uint32_t dst = smem0 + (r % STAGES) * SB, bar = bar0 + (r % STAGES) * 8;
    if (is_sal(d)) {
      mbar_expect(bar, XB);
      return;
    }
    mbar_expect(bar, XB + WGS * (WB + 192));
    const size_t gb = w_group(d, bb0);
    bulk_load(dst + XB, w_codes(d, bb0), WGS * WB, bar);
    bulk_load(dst + ZOFF, zp + gb * 4, WGS * 64, bar);
    bulk_load(dst + SOFF, scp + gb * 8, WGS * 128, bar);
  };
  auto wait_slot = [&](uint32_t sl, uint32_t parity) { mbar_wait(bar0 + sl * 8, parity); };
  auto wait_x = [&](int it) {
    mbar_wait(bar0 + static_cast<uint32_t>(it) % STAGES * 8, static_cast<uint32_t>(it) / STAGES & 1);
  };
  // coop, the producer warp after the dependent wait: this block's slice of xs [M, W] (pairs
  // of columns, zeros past the last salient column), then one count in gcnt[0] (released by
  // lane 0 after the warp's stores, as `finish_tile` releases a block's adds). Before its
  // first salient tensor copy, lane 0 waits until every block's count is in (acquire; then the
  // proxy fence, the copies reading through the async proxy); each block then counts once in
  // gcnt[1] (a block without salient k-steps right after its slice), and the last one zeroes
  // both for the next launch, whose blocks count only after their dependent wait: past this
  // grid's end. Blocks wait only on blocks of their own launch (meant to be on the GPU at once:
  // the launch's condition), only for their slice, which waits on nothing, and for a bounded
  // time (`await_slices`).
  const int nblocks = static_cast<int>(gridDim.x * gridDim.y);
  const int xs_w = QS * 64, xs_pairs = M * (xs_w / 2);
  // pairs [i0, i1) of xs, every `step`-th from i0 on
  auto gather_pairs = [&](int i0, int i1, int step) {
    const int hw = xs_w / 2;
    const auto* xb = reinterpret_cast<const unsigned short*>(x);
    for (int i = i0; i < i1; i += step) {
      const int r = i / hw, c = (i - r * hw) * 2;
      const int ca = c < nsal ? __ldg(sidx + c) : -1, cb = c + 1 < nsal ? __ldg(sidx + c + 1) : -1;
      const size_t ro = static_cast<size_t>(r) * K;
      const uint32_t lo = ca >= 0 ? __ldcg(xb + ro + ca) : 0u, hi = cb >= 0 ? __ldcg(xb + ro + cb) : 0u;
      reinterpret_cast<uint32_t*>(xs + static_cast<size_t>(r) * xs_w)[c >> 1] = lo | hi << 16;
    }
  };
  auto gather_slice = [&] {
    const int per = (xs_pairs + nblocks - 1) / nblocks;
    const int i0 = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x) * per;
    gather_pairs(i0 + lane, min(xs_pairs, i0 + per), 32);
    __syncwarp();
    if (lane == 0) {
      __threadfence();
      atomicAdd(gcnt, 1);
    }
  };
  auto done_reading = [&] {  // lane 0 (the fence: its own count in gcnt[0] first)
    __threadfence();
    if (atomicAdd(gcnt + 1, 1) == nblocks - 1) atomicExch(gcnt, 0), atomicExch(gcnt + 1, 0);
  };
  // The wait is bounded (WG_GATHER_WAIT_NS): where the count is still short then (blocks of
  // this launch not yet on the GPU, which `wg_all_resident` does not rule out: the clusters
  // of a launch at cudaOccupancyMaxActiveClusters' bound placed while the kernel before it
  // still held SMs), lane 0 gathers all of xs itself, the values the slices write, so no
  // block waits on a block that cannot start
  bool gathered = false;
  auto await_slices = [&] {  // lane 0, before its first salient tensor copy
    if (gathered) return;
    const uint64_t t0 = globaltimer_ns();
    while (static_cast<int>(ld_acquire(gcnt)) < nblocks) {
      if (globaltimer_ns() - t0 > WG_GATHER_WAIT_NS) {
        gather_pairs(0, xs_pairs, 1);
        __threadfence();
        break;
      }
    }
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
    done_reading();
    gathered = true;
  };

  // 2 and 4 bits: this warp's pairs 4 q + u lie in word (4 q) / PER of a k16 step's BITS words
  const int widx = 4 * wq / PER;
  const uint32_t sel = g & 1 ? 0x3232u : 0x1010u;

  // The A fragments of k-step d, in ring slot sl (its copies are in place), from
  // this thread's code words, zero-points and scales at these offsets of every slot
  const uint32_t cw_at = kept<PROD>(smem0 + XB + wg * WB + lane * 16);
  const uint32_t z_at = kept<PROD>(smem0 + ZOFF + wg * 64 + g * 8 + 2 * wq);
  const uint32_t s_at = kept<PROD>(smem0 + SOFF + wg * 128 + ((g >> 1) * 16 + 4 * wq) * 2);
  auto frags = [&](uint32_t sl, int d, int bb, uint32_t (&a)[4][4]) {
    if (is_sal(d)) {  // salient: the stored fragments (zeros past the last k16 step)
      const int q0 = (split + sal_ix(d) * splits) * 4;
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        uint4 v = make_uint4(0, 0, 0, 0);
        if (q0 + st < Q) v = __ldg(wsp + ((size_t)((q0 + st) * B + bb) * 4 + wq) * 32 + lane);
        a[st][0] = v.x, a[st][1] = v.z, a[st][2] = v.y, a[st][3] = v.w;
      }
      return;
    }
    const uint32_t so = sl * SB;  // the slot's offset
    // lane's word i of the k-step: component i % 4 of its uint4 i / 4
    auto word = [&](int i) { return lds_u32(cw_at + so + ((i >> 2) * 128 + (i & 3)) * 4); };
#ifdef GQ_NO_DEQUANT
    // (a diagnosis build: each k16 step's word loaded as the fragments load it, then used as
    // the fragment itself -- no unpacking, zero-point or scale arithmetic: wrong products from
    // the same shared-memory loads and MMAs, for what the dequantization costs in time and power)
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      const uint32_t w = word(st * BITS);
      a[st][0] = w, a[st][1] = w, a[st][2] = w, a[st][3] = w;
    }
    return;
#endif
    // zero-points of columns 16 q + g (lo) and 16 q + 8 + g (hi) in both halves, as the raw
    // pairs hold the codes: MAGIC + z (1024 + z in fp16, 128 + z in bf16), or for a code read
    // at bit e, 2^(10 - e) + z in fp16 (`pos_magic`), 2^(7 - e) + z in bf16 (`pos_magic_bf16`);
    // their scales in both halves
    constexpr uint32_t MAG = magic<BF>(), E = MAG * 0x00010001u;
    constexpr uint32_t MASK = (1u << BITS) - 1 | ((1u << BITS) - 1) << 16;
    const uint32_t zb = lds_u16(z_at + so);
    // (the same numbers either way at e = 0; ptxas takes each form with fewer instructions
    // where it is used)
    constexpr auto pos = [](int e) { return BF ? pos_magic_bf16(e) : pos_magic(e); };
    auto zero = [&](uint32_t z, int e) {
      constexpr uint32_t BOTH = 0x00010001u;
      return e == 0 ? (MAG | z) * BOTH : pos(e) * BOTH | (z << e) * BOTH;
    };
    const uint2 sw = lds_v2(s_at + so);
    const uint32_t slo = from_fp16x2<BF>(__byte_perm(sw.x, 0, sel));
    const uint32_t shi = from_fp16x2<BF>(__byte_perm(sw.y, 0, sel));
    // k16 step st's fragment from its four raw pairs (u = 0, 1 of the lo column, 2, 3 hi)
    auto put = [&](int st, const uint32_t (&raw)[4], uint32_t zlo, uint32_t zhi) {
      uint32_t f[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)  // (code - zero, exact) * scale
        f[u] = mul2<BF>(sub2<BF>(raw[u], u < 2 ? zlo : zhi), u < 2 ? slo : shi);
      a[st][0] = f[0], a[st][1] = f[2], a[st][2] = f[1], a[st][3] = f[3];
    };
    if constexpr (BITS == 3) {
      // the warp's role in each k16 step (`pair_slot`): warp w3_rest(st) reads bits 12..14 of
      // the three words and the spread pair, each other warp one word (u = 0, 2 at bits 0, 3;
      // u = 1, 3 at the same bits of the word shifted by 6). Both builds read the lo column's
      // codes at bit 0 and the hi column's at bit 3 in both roles (3 + 3 bits fit bf16's 7)
      const uint32_t zlo = zero(zb & 0xFFu, 0), zhi = zero(zb >> 8, 3);
      constexpr uint32_t E3 = pos(3) * 0x00010001u;
      constexpr uint32_t M3 = MASK << 3;
      auto steps = [&](auto warp_q) {  // std::integral_constant<int, q>
        constexpr int q = decltype(warp_q)::value;
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          uint32_t raw[4];
          if (q == w3_rest(st)) {  // a constant once the loop is unrolled
            const uint32_t w[3] = {word(st * 3), word(st * 3 + 1), word(st * 3 + 2)};
            raw[0] = lop3_and_or(w[0] >> 12, MASK, E), raw[1] = lop3_and_or(w[1] >> 12, MASK, E);
            raw[2] = lop3_and_or(w[2] >> 9, M3, E3);
            raw[3] = spread_pair_at3(w, E3);
          } else {
            const uint32_t w = word(st * 3 + ((q - w3_rest(st) - 1) & 3)), w6 = w >> 6;
            raw[0] = lop3_and_or(w, MASK, E), raw[1] = lop3_and_or(w6, MASK, E);
            raw[2] = lop3_and_or(w, M3, E3);
            raw[3] = lop3_and_or(w6, M3, E3);
          }
          put(st, raw, zlo, zhi);
        }
      };
      switch (wq) {  // warp-uniform: the warps meet again before the MMAs
        case 0: steps(std::integral_constant<int, 0>{}); break;
        case 1: steps(std::integral_constant<int, 1>{}); break;
        case 2: steps(std::integral_constant<int, 2>{}); break;
        default: steps(std::integral_constant<int, 3>{}); break;
      }
    } else {
      // 2 and 4 bits: the step's one word this warp reads holds u = 0, 2 at bits ELO, EHI of
      // the low byte of each half and u = 1, 3 at the same bits of the high byte (`pair_slot`).
      // Each code is read where it lies (one shift by 8 per word, `pos_magic`), but in bf16 (7
      // mantissa bits): 2-bit codes at bits 4, 6 (h = 1) are read at 2, 4 of the word shifted
      // by 2, and 4-bit codes, whose high nibble cannot fit (4 + 4 > 7), are each moved to
      // bit 0. h: the warp's half of its word (q % 2 at 2 bits)
      auto steps = [&](auto half_c) {
        constexpr int h = decltype(half_c)::value;
        constexpr int ELO = BITS == 4 ? 0 : 4 * h, EHI = ELO + BITS;
        constexpr bool LOW = BF && BITS == 4;
        constexpr int PRE = BF && BITS == 2 ? 2 * h : 0;  // the word's shift before reading
        constexpr int RLO = LOW ? 0 : ELO - PRE, RHI = LOW ? 0 : EHI - PRE;  // read at
        const uint32_t zlo = zero(zb & 0xFFu, RLO), zhi = zero(zb >> 8, RHI);
#pragma unroll
        for (int st = 0; st < 4; ++st) {
          const uint32_t w = word(st * BITS + widx);
          uint32_t raw[4];
          if constexpr (LOW) {
            const uint32_t w8 = w >> 8;
            raw[0] = lop3_and_or(w >> ELO, MASK, E), raw[1] = lop3_and_or(w8 >> ELO, MASK, E);
            raw[2] = lop3_and_or(w >> EHI, MASK, E), raw[3] = lop3_and_or(w8 >> EHI, MASK, E);
          } else {
            const uint32_t wp = w >> PRE, w8 = w >> (8 + PRE);
            constexpr uint32_t MLO = MASK << RLO, MHI = MASK << RHI;
            constexpr uint32_t ELOW = pos(RLO) * 0x00010001u, EHIW = pos(RHI) * 0x00010001u;
            raw[0] = lop3_and_or(wp, MLO, ELOW), raw[1] = lop3_and_or(w8, MLO, ELOW);
            raw[2] = lop3_and_or(wp, MHI, EHIW), raw[3] = lop3_and_or(w8, MHI, EHIW);
          }
          put(st, raw, zlo, zhi);
        }
      };
      if (BITS == 2 && (wq & 1))  // warp-uniform, as the 3-bit switch
        steps(std::integral_constant<int, 1>{});
      else
        steps(std::integral_constant<int, 0>{});
    }
  };

  // Without a register handoff every thread zeroes its accumulators here and the consumers
  // stage them in the epilogue below, with the block (round 30: 128-row tiles 0.96-0.99x the
  // time of zeroing and staging them in the consumers' path); with it, no accumulator may
  // live in the producer's 56 registers: zeroed and staged in the consumers' path alone
  float acc[NT / 2];
  if constexpr (!HANDOFF) {
#pragma unroll
    for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;
  }
  // the x tile's descriptors: slot p's k16 slice st is the ring's, its address field plus the
  // offset in 16-byte units (no carry out of the 14-bit field: shared memory is below 256 KB)
  const uint64_t desc0 = smem_desc_sw128(smem0);
  const uint32_t dlo = kept<PROD>(static_cast<uint32_t>(desc0));
  auto mma = [&](uint32_t sl, const uint32_t (&a)[4][4]) {  // on ring slot sl
    wg_fence();
    // lane 0's value through a shuffle, which ptxas then keeps in uniform registers: the four
    // descriptors by uniform adds instead of a register move each (8 R2UR a k-step -> 1)
    const uint32_t lo =
        __shfl_sync(0xFFFFFFFFu, dlo + sl * (SB >> 4), 0);
#pragma unroll
    for (int st = 0; st < 4; ++st)
      wgmma_tile<BF, NT>(acc, a[st], (desc0 >> 32 << 32) | (lo + st * 2));
    wg_commit();
  };

  // ring iteration it's slot, the slots before and after it and the after one's phase parity.
  // With 6 slots (256-row tiles) each `% STAGES` is a multiply-high, a shift and a
  // multiply-add, and ptxas placed the previous slot's between the MMAs: there the steps take
  // all four from one division (H100: 256-row tiles 0.98x the time at W4, M = 128-512). With
  // 8 slots each is a mask, and the one division made 64- and 128-row tiles up to 1.8% slower:
  // there the steps compute each where it is used, as before (`RING` false)
  constexpr bool RING = (STAGES & (STAGES - 1)) != 0;
  struct Ring {
    uint32_t s, prev, next, next_parity;
  };
  auto ring = [](int it) {
    const uint32_t u = static_cast<uint32_t>(it), q = u / STAGES, s = u - q * STAGES;
    const bool wrap = s + 1 == STAGES;
    return Ring{s, s == 0 ? STAGES - 1 : s - 1, wrap ? 0u : s + 1, (q + wrap) & 1};
  };

  // The epilogue's first half, in the consumer threads once their loop is done: the
  // accumulators staged in shared memory over the ring, after a barrier (each thread is done
  // with the ring; every copy landed, all were waited). With a register handoff (256-row
  // tiles) it is the consumers' own barrier, in their path: no code past it reads `acc`, so
  // the producer warpgroup, which gave its registers away, joins only for the stores. The
  // other tiles stage after a block barrier (or cluster_reduce's), in the consumer threads.
  // acc[i]: column 16 q + g + 8 ((i / 2) % 2) of the strip, row row0 + 8 (i / 4) + 2 t + i % 2.
  // One K split: y staged in fp16 (bf16), rows of 72 halves (64 + 8: rows shift by 16 bytes);
  // several: the partial tile in fp32, rows of 64 WGS + 4 floats (the lanes' stores hit 32
  // banks).
  constexpr int LD = 72, W = WGS * 64, LDF = W + 4;
  // two clustered K splits of 128- or 256-row tiles of two warpgroups sum by `exchange`
  // (launch-uniform), received at XRECV bytes into the ring
  const bool xchg = WGS == 2 && NT >= 128 && !SK && csize == 2 && splits == 2;
  constexpr int XRECV = WGS * NT * LD * 2;
  static_assert(WGS != 2 || XRECV + NT * 256 <= STAGES * SB, "the exchange's tile fits the ring");
  half* out = reinterpret_cast<half*>(smem);
  float* out32 = reinterpret_cast<float*>(smem);
  // (stage_at: for the strip bq's bias; a stream-K head stages the tile it sums)
  auto stage_at = [&](int bq) {
    if (splits > 1 && !xchg) {
#pragma unroll
      for (int i = 0; i < NT / 2; ++i)
        out32[(8 * (i >> 2) + 2 * t + (i & 1)) * LDF + wg * 64 + 16 * wq + g + 8 * ((i >> 1) & 1)] =
            acc[i];
      return;
    }
    const int c0 = bq * 64 + 16 * wq + g;
    const float bl = bias != nullptr ? to_float<BF>(bias[c0]) : 0.0f;
    const float bh = bias != nullptr ? to_float<BF>(bias[c0 + 8]) : 0.0f;
    // staged transposed by stmatrix: the pair (acc[4 j + 2 h], +1) is the m8n8 fragment of
    // columns 16 q + 8 h .. + 7 by rows 8 j .. 8 j + 7 (fragment row g, columns 2 t, 2 t + 1);
    // stored transposed, it is those rows' 16 bytes of columns. Four blocks per instruction:
    // (j, h) = (2 p + m / 2, m % 2) for matrix m, whose row rr lane 8 m + rr addresses.
#pragma unroll
    for (int p = 0; p < NT / 16; ++p) {
      uint32_t v[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const int i = 4 * (2 * p + (m >> 1)) + 2 * (m & 1);
        const float bb = m & 1 ? bh : bl;
        v[m] = pack2<BF>(acc[i] + bb, acc[i + 1] + bb);
      }
      const int m = lane >> 3, rr = lane & 7;
      const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(
          out + (wg * NT + 8 * (2 * p + (m >> 1)) + rr) * LD + 16 * wq + 8 * (m & 1)));
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                   "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3])
                   : "memory");
    }
  };
  auto stage_acc = [&] { stage_at(b); };
  // strip w of the staged tile written to y in 16-byte rows, by threads tid, tid + nthr, ...
  auto store_strip = [&](int w, int tid, int nthr) {
    for (int i = tid; i < NT * 8; i += nthr) {
      const int r = i >> 3, c = i & 7;
      if (row0 + r < M)
        *reinterpret_cast<uint4*>(y + (size_t)(row0 + r) * N + (b0 + w) * 64 + c * 8) =
            *reinterpret_cast<const uint4*>(out + (w * NT + r) * LD + c * 8);
    }
  };
  // Two K splits of two warpgroups in a cluster (`xchg`), in the consumer threads once their
  // MMAs are done: after a cluster barrier (every block's ring is free), block q's warpgroup
  // 1 - q sends its accumulators to block 1 - q (NT / 8 float4s a thread, thread i's v-th at
  // XRECV + 2048 v + 16 i there: past the fp16 staging), and after a second barrier warpgroup q
  // adds what it got to its own, stages strip q in fp16 and the consumers write it to y. 64 NT
  // floats a block cross the cluster, as in cluster_reduce, but from registers: no fp32 staging
  // of the whole tile, no read back of it, and no block reads another's memory after the second
  // barrier, so none waits there for the others to leave.
  auto exchange = [&] {
    uint32_t q;
    asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(q));
    const uint32_t mine = smem0 + XRECV + (threadIdx.x & 127) * 16;
    cluster_sync_all();  // every block's MMAs are done: its ring is free
    if (wg != static_cast<int>(q)) {
      uint32_t there;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n"
                   : "=r"(there)
                   : "r"(mine), "r"(static_cast<uint32_t>(wg)));
#pragma unroll
      for (int v = 0; v < NT / 8; ++v)
        asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(there + v * 2048),
                     "f"(acc[4 * v]), "f"(acc[4 * v + 1]), "f"(acc[4 * v + 2]), "f"(acc[4 * v + 3])
                     : "memory");
    }
    cluster_sync_all();  // the sent accumulators are in place
    if (wg == static_cast<int>(q)) {
#pragma unroll
      for (int v = 0; v < NT / 8; ++v) {
        float4 p;
        asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                     : "=f"(p.x), "=f"(p.y), "=f"(p.z), "=f"(p.w)
                     : "r"(mine + v * 2048)
                     : "memory");
        acc[4 * v] += p.x, acc[4 * v + 1] += p.y, acc[4 * v + 2] += p.z, acc[4 * v + 3] += p.w;
      }
      stage_at(b);
    }
    consumers_sync<WGS * 128>();
    store_strip(static_cast<int>(q), threadIdx.x, WGS * 128);
  };
  // the staged tile at rows rr0.., strips bb0.. written to y in 16-byte rows, by threads
  // tid, tid + nthr, ...
  auto store_y = [&](int rr0, int bb0, int tid, int nthr) {
    for (int i = tid; i < NT * WGS * 8; i += nthr) {
      const int r = i / (WGS * 8), c = i % (WGS * 8);
      if (rr0 + r < M)
        *reinterpret_cast<uint4*>(y + (size_t)(rr0 + r) * N + bb0 * 64 + c * 8) =
            *reinterpret_cast<const uint4*>(out + ((c >> 3) * NT + r) * LD + (c & 7) * 8);
    }
  };

  if (threadIdx.x == 0) {
#pragma unroll
    for (int p = 0; p < STAGES; ++p) {
      mbar_init(bar0 + p * 8, 1);
      if (PROD) mbar_init(ebar0 + p * 8, WGS * 4);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  uint32_t a0[4][4], a1[4][4];
  // the main loop: the accumulators zeroed, `step` (the producer path's or the old one's) on
  // alternating fragment sets, then every MMA retired
  auto k_steps = [&](auto&& step) {
    if constexpr (HANDOFF) {
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;
    }
    for (int it = 0; it < iters; it += 2) {
      step(it, a0, a1);
      if (it + 1 < iters) step(it + 1, a1, a0);
    }
    wg_wait<0>();
  };
  if constexpr (SK) {
    static_assert(PROD, "stream-K: a producer warp(group) issues every copy");
    // a head waits on blocks launched after it: the launch's G shared blocks (one wave of the
    // kernel without the schedule) must all fit on the GPU at once, so one block per SM here
    // as there (shared memory holds two of neither)
    static_assert(2 * (wg_smem_bytes(BITS, NT, WGS) + 1024) > 228 * 1024, "one block per SM");
    const int St = iters, total = u1 - u0;
    auto row_of = [&](int tx) { return tx % T * NT; };  // a tile's first row, first strip
    auto strip_of = [&](int tx) { return tx / T * WGS; };
    if (producer) {  // as below, over the block's range: slot r holds k-step u0 + r
      if constexpr (HANDOFF) regs_down<WG_PRODUCER_REGS>();
      // k-step d of the tile at row tile rt, column block cb, from the range's first on (the
      // lane's next tile: the next column block at a lane per row tile, else the next tile)
      int d, rt, cb;
      auto first = [&] {
        const int i = u0 / St, tx = tile0 + i * tstep;
        d = u0 - i * St, rt = tx % T, cb = tx / T;
      };
      auto next = [&] {
        if (++d == St) d = 0, tstep == T ? ++cb : ++rt == T ? rt = 0, ++cb : 0;
      };
      if (issuer) {
        first();
        for (int r = 0; r < STAGES && r < total; ++r, next()) produce_w(r, d, cb * WGS);
      }
      pdl_wait();
      if (issuer) {
        first();
        for (int r = 0; r < total; ++r, next()) {
          if (r >= STAGES) {
            mbar_wait(ebar0 + (r % STAGES) * 8, ((r / STAGES) + 1) & 1);
            produce_w(r, d, cb * WGS);
          }
          issue_x(r, d, rt * NT);
        }
      }
      __syncwarp();
      return;
    }
    if constexpr (HANDOFF) regs_up<WG_CONSUMER_REGS>();
    // A segment's end, from the registers (the ring stays the producer's): y written by the
    // lanes in pairs of adjacent columns (the pair's other half from the lane of the next or
    // previous column, lane ^ 4); a partial tile stored to this block's slot of the scratch
    // in fragment order (a warp's 512 bytes contiguous per float4), then the warp's flag in
    // cnt set (release); a head adds the slots of the blocks after it that share its tile, in
    // block order (the same sum every run), zeroing each flag for the next launch. The slots are
    // a scratch buffer of the launch's own (native.mixed_wg), never the split kernels' zeroed
    // workspace: left as they are (round 58: a head zeroed each 128 KB partial it read).
    constexpr int CT = WGS * 128, NF = NT / 8;  // consumer threads; float4s a thread holds
    const int j = static_cast<int>(blockIdx.x) - sk0;  // this SK block (< 0: one whole tile)
    float4* const slots = reinterpret_cast<float4*>(ws);
    auto write_y = [&](int tx) {
      const int rr0 = row_of(tx), col = (strip_of(tx) + wg) * 64 + 16 * wq + g, odd = g & 1;
      const float bl = bias != nullptr ? to_float<BF>(bias[col]) : 0.0f;
      const float bh = bias != nullptr ? to_float<BF>(bias[col + 8]) : 0.0f;
#pragma unroll
      for (int i = 0; i < NT / 2; i += 2) {  // acc[i], acc[i + 1]: rows 2 t, 2 t + 1 of column
        const float bb = (i >> 1) & 1 ? bh : bl;
        const float v0 = acc[i] + bb, v1 = acc[i + 1] + bb;
        const float other = shfl_xor4(odd ? v0 : v1);
        const int row = rr0 + 8 * (i >> 2) + 2 * t + odd;
        st_global_if(row < M, y + (size_t)row * N + col + 8 * ((i >> 1) & 1) - odd,
                     pack2<BF>(odd ? other : v0, odd ? v1 : other));
      }
    };
    auto segment_end = [&](int ti, int tx, int d0, int d1) {  // the lane's ti-th tile, tile tx
      if (d0 > 0) {  // a later part of a tile: the partial tile for its head
        float4* sl = slots + (size_t)j * NF * CT + threadIdx.x;
#pragma unroll
        for (int v = 0; v < NF; ++v)
          __stcg(sl + v * CT, make_float4(acc[4 * v], acc[4 * v + 1], acc[4 * v + 2], acc[4 * v + 3]));
        __syncwarp();  // the warp's stores before lane 0's release (no SC fence: the release
                       // store orders what happens before it, the lanes' stores by the barrier)
        if (lane == 0)
          asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(cnt + j * WGS * 4 + warp), "r"(1)
                       : "memory");
        return;
      }
      if (d1 == St) return write_y(tx);  // a whole tile
      // The head of a tile that blocks after this one finish: the block's last segment, so
      // the ring is free once every consumer warp is past its MMAs. Each thread copies the
      // partial tiles' floats it adds into shared memory (cp.async: all in flight at once, no
      // register holding them; round 57: the loads through registers, a few in flight beside
      // 128 accumulators, took most of a head's 8-12 us), adds them from there, then the tile
      // is staged and written to y in 16-byte rows as whole tiles are.
      consumers_sync<CT>();
      float4* const part = reinterpret_cast<float4*>(smem) + threadIdx.x;
      for (int c = j + lanes; sk_begin(c / lanes) < (ti + 1) * St; c += lanes) {
        int* flag = cnt + c * WGS * 4 + warp;
        while (!__all_sync(0xFFFFFFFFu, ld_acquire(flag) != 0)) {
        }
        float4* sl = slots + (size_t)c * NF * CT + threadIdx.x;
#pragma unroll
        for (int v = 0; v < NF; ++v) cp_async16(part + v * CT, sl + v * CT);
        commit_copies();
        wait_copies<0>();
#pragma unroll
        for (int v = 0; v < NF; ++v) {
          const float4 p = part[v * CT];
          acc[4 * v] += p.x, acc[4 * v + 1] += p.y, acc[4 * v + 2] += p.z, acc[4 * v + 3] += p.w;
        }
        __syncwarp();
        if (lane == 0) *flag = 0;
      }
      consumers_sync<CT>();  // every thread's partial floats read: the staging may overwrite them
      stage_at(strip_of(tx) + wg);
      consumers_sync<CT>();
      store_y(row_of(tx), strip_of(tx), threadIdx.x, CT);
    };
    pdl_wait();
    GQ_TRACE_AT(1);
    // one segment a pass: its k-steps as the producer path's loop below (from fragment set a0,
    // every MMA retired after it), then its end; the branch on the segment's kind stays out of
    // the loop that issues the MMAs (an MMA wait on a path ptxas cannot prove convergent
    // serializes every MMA of the kernel: C7518)
    for (int r = 0, ti = u0 / St, d = u0 - ti * St; r < total; d = 0, ++ti) {
      // ring slots r .. end - 1 hold the tile's k-steps d .. (slot rr: k-step rr + off)
      const int tx = tile0 + ti * tstep;
      const int end = min(r + St - d, total), off = d - r, bq = strip_of(tx) + wg;
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[i] = 0.0f;
      wait_x(r);
#ifdef GQ_TRACE
      const int seg_ = ti - u0 / St;  // this block's segment: its data in place, its k-steps
      if (seg_ < 6) GQ_TRACE_AT(2 + 4 * seg_), GQ_TRACE_VAL(5 + 4 * seg_, d << 16 | (end - r));
#endif
      frags(static_cast<uint32_t>(r) % STAGES, d, bq, a0);
      auto step = [&](int rr, const uint32_t (&cur)[4][4], uint32_t (&nxt)[4][4]) {
        const Ring rg = ring(rr);
        mma(RING ? rg.s : static_cast<uint32_t>(rr) % STAGES, cur);
        wg_wait<1>();
        if (rr > 0 && lane == 0)
          mbar_arrive(ebar0 + (RING ? rg.prev : static_cast<uint32_t>(rr - 1) % STAGES) * 8);
        if (rr + 1 < end) {
          if constexpr (RING)
            wait_slot(rg.next, rg.next_parity);
          else
            wait_x(rr + 1);
          frags(RING ? rg.next : static_cast<uint32_t>(rr + 1) % STAGES, rr + 1 + off, bq, nxt);
        }
      };
      for (; r < end; r += 2) {
        step(r, a0, a1);
        if (r + 1 < end) step(r + 1, a1, a0);
      }
      r = end;
      wg_wait<0>();
#ifdef GQ_TRACE
      if (seg_ < 6) GQ_TRACE_AT(3 + 4 * seg_);  // its MMAs done
#endif
      segment_end(ti, tx, d, end + off);
#ifdef GQ_TRACE
      if (seg_ < 6) GQ_TRACE_AT(4 + 4 * seg_);  // its end (partial tile, or the sum and y)
#endif
    }
    pdl_launch_dependents();
    GQ_TRACE_AT(30);
    return;
  } else if constexpr (PROD) {
    if (producer) {
      if constexpr (HANDOFF) regs_down<WG_PRODUCER_REGS>();
      // every slot's weights first (not written by the previous kernel), then the x tiles;
      // a slot is refilled once each consumer warp has arrived on its empty barrier (the
      // MMAs that read it are done)
      if (issuer) {
        for (int p = 0; p < STAGES && p < iters; ++p) produce_w(p, p, b0);
        if (coop)  // the salient steps' fragments (read at use, last) into L2
          for (int d = nss; d < iters; ++d)
            for (int q = (split + sal_ix(d) * splits) * 4, st = 0; st < 4 && q + st < Q; ++st)
              asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(
                               wsp + (size_t)((q + st) * B + b0) * 4 * 32),
                           "r"(WGS * 4 * 32 * 16)
                           : "memory");
      }
      pdl_wait();  // every thread: the producer warps write outputs in the epilogue
      if (coop && warp == WGS * 4) {  // the first slots' x tiles, the slice, then as below
        if (issuer)
          for (int p = 0; p < STAGES && p < iters; ++p)
            if (!is_sal(p)) issue_x(p, p, row0);
        gather_slice();
        if (issuer) {
          if (nps == 0) done_reading();
          for (int p = 0; p < STAGES && p < iters; ++p)
            if (is_sal(p)) await_slices(), issue_x(p, p, row0);
          for (int it = STAGES; it < iters; ++it) {
            mbar_wait(ebar0 + (it % STAGES) * 8, ((it / STAGES) + 1) & 1);
            produce_w(it, it, b0);
            if (is_sal(it)) await_slices();
            issue_x(it, it, row0);
          }
        }
      } else if (issuer) {
        for (int p = 0; p < STAGES && p < iters; ++p) issue_x(p, p, row0);
        for (int it = STAGES; it < iters; ++it) {
          mbar_wait(ebar0 + (it % STAGES) * 8, ((it / STAGES) + 1) & 1);
          produce_w(it, it, b0);
          issue_x(it, it, row0);
        }
      }
      __syncwarp();
    } else {
      if constexpr (HANDOFF) regs_up<WG_CONSUMER_REGS>();
      if (iters > 0 && is_sal(0)) frags(0u, 0, b, a0);  // salient: global memory, before the wait
      pdl_wait();
      GQ_TRACE_AT(1);
      if (iters > 0) {
        wait_x(0);
        GQ_TRACE_AT(2);
        GQ_TRACE_VAL(5, iters);
        if (!is_sal(0)) frags(0u, 0, b, a0);
      }
      // one k-step: its MMAs on `cur`; once the previous k-step's MMAs are done, its slot is
      // released and the next k-step's fragments go into `nxt` while these MMAs run
      auto step = [&](int it, const uint32_t (&cur)[4][4], uint32_t (&nxt)[4][4]) {
        const Ring rg = ring(it);
        mma(RING ? rg.s : static_cast<uint32_t>(it) % STAGES, cur);
        wg_wait<1>();
        if (it > 0 && lane == 0)
          mbar_arrive(ebar0 + (RING ? rg.prev : static_cast<uint32_t>(it - 1) % STAGES) * 8);
        if (it + 1 < iters) {
          if constexpr (RING)
            wait_slot(rg.next, rg.next_parity);
          else
            wait_x(it + 1);
          frags(RING ? rg.next : static_cast<uint32_t>(it + 1) % STAGES, it + 1, b, nxt);
        }
      };
      k_steps(step);
      GQ_TRACE_AT(3);
      pdl_launch_dependents();  // a block's first call counts: the first consumer warp's
      if (xchg) {
        exchange();
      } else if constexpr (HANDOFF) {
        consumers_sync<WGS * 128>();
        stage_acc();
      }
    }
  } else {
    // every thread issues copies: the first STAGES - 1 k-steps', one commit group of weights
    // each (the first group holds them all, issued before the wait for the previous kernel),
    // x by the tensor copies
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p)
      if (p < iters) issue_w(p);
    // a salient first k-step's fragments are weights as stored (global memory): loaded while
    // the previous kernel finishes
    if (nps > 0) frags(0u, 0, b, a0);
    pdl_wait();  // x (and xs) come from the previous kernels
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p) {
      if (p < iters) issue_x(p, p, row0);
      commit_copies();
    }
    if (iters > 0) {
      wait_copies<STAGES - 2>();
      __syncthreads();
      wait_x(0);
      if (nps == 0) frags(0u, 0, b, a0);
    }
    // one k-step: its MMAs on `cur`, then (once the previous k-step's MMAs are done) the next
    // k-step's fragments into `nxt` while they run
    auto step = [&](int it, const uint32_t (&cur)[4][4], uint32_t (&nxt)[4][4]) {
      const Ring rg = ring(it);
      mma(RING ? rg.s : static_cast<uint32_t>(it) % STAGES, cur);
      wg_wait<1>();  // k-step it - 1's MMAs are done: `nxt` and its slot are free
      if (it + 1 < iters) {
        wait_copies<STAGES - 3>();  // this thread's copies of k-step it + 1's weights
        __syncthreads();  // every thread's copies of it + 1; every warpgroup past it - 1
        const int ahead = it + STAGES - 1;
        if (ahead < iters) issue_w(ahead), issue_x(ahead, ahead, row0);
        commit_copies();
        if constexpr (RING)
          wait_slot(rg.next, rg.next_parity);
        else
          wait_x(it + 1);
        frags(RING ? rg.next : static_cast<uint32_t>(it + 1) % STAGES, it + 1, b, nxt);
      }
    };
    k_steps(step);
    wait_copies<0>();
    pdl_launch_dependents();
  }

  // The epilogue's second half, every thread once the consumers staged the tile: one K split
  // writes y in 16-byte rows; several are summed in the cluster (csize > 1: the splits of a
  // tile run as clusters of csize blocks), or added into ws 16 bytes per atomic (a quarter of
  // the atomics of one per element) and written by the tile's last block
  auto stage_here = [&](float*) {  // without a handoff: the staging, in the consumer threads
    if (!HANDOFF && !producer) stage_acc();
  };
  if (xchg) {  // the consumers wrote y (`exchange`); the producer warps join its two barriers
    if (producer) cluster_sync_all(), cluster_sync_all();
    GQ_TRACE_AT(30);
    return;
  }
  if (!HANDOFF && (splits == 1 || csize == 1)) {  // (clusters: after cluster_reduce's barrier)
    __syncthreads();
    stage_here(out32);
  }
  if (splits == 1) {
    __syncthreads();
    store_y(row0, b0, threadIdx.x, THREADS);
    GQ_TRACE_AT(30);
    return;
  }
  const int rows = min(NT, M - row0);
  if (csize > 1) {  // launch-uniform; staged here (no handoff) or already (its barrier)
    cluster_reduce<BF, W, LDF>(stage_here, out32, bias, y, ws, row0, rows, N, b0 * 64,
                               splits == csize);
    if (splits == csize) {
      GQ_TRACE_AT(30);
      return;
    }
  } else {
    __syncthreads();
    for (int i = threadIdx.x; i < rows * WGS * 16; i += THREADS) {
      const int r = i / (WGS * 16), c4 = i - r * (WGS * 16);
      const float4 v = *reinterpret_cast<const float4*>(out32 + r * LDF + c4 * 4);
      atomicAdd(reinterpret_cast<float4*>(ws + (size_t)(row0 + r) * N + b0 * 64 + c4 * 4), v);
    }
  }
  finish_tile<BF>(ws, cnt, tix, splits, bias, y, row0, rows, N, b0 * 64, W);
  GQ_TRACE_AT(30);
#else
  __trap();  // built without sm_90a: the library reports no warpgroup kernel (native.py)
#endif
}

// cuTensorMapEncodeTiled, from the driver through the runtime (no link to libcuda)
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
#if CUDART_VERSION >= 12050  // the versioned query; the unversioned one is deprecated there
    const cudaError_t rc = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                            cudaEnableDefault, &q);
#else
    const cudaError_t rc = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
    if (rc != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// x's salient columns into xs [M, W] (W = 64 per salient k-step; zeros past the last column),
// two columns a thread. It lets the main kernel start at once (its prologue streams weights;
// its `pdl_wait` waits for this grid before any tensor copy reads xs) and waits for the
// previous kernel's x itself (read through L2: that kernel may have run alongside).
__global__ void __launch_bounds__(256)
    wg_gather_kernel(const half* __restrict__ x, const int* __restrict__ sidx, int nsal,
                     half* __restrict__ xs, int M, int K, int W) {
  pdl_launch_dependents();
  const long i = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x, hw = W >> 1;
  const int r = static_cast<int>(i / hw), c = static_cast<int>(i % hw) * 2;
  const int ca = i < M * hw && c < nsal ? __ldg(sidx + c) : -1;  // indices: not from a kernel
  const int cb = i < M * hw && c + 1 < nsal ? __ldg(sidx + c + 1) : -1;
  pdl_wait();
  if (i >= M * hw) return;
  const half* xr = x + static_cast<size_t>(r) * K;
  // 16-bit elements moved as bits (fp16 or bf16), zeros (+0) past the last column
  const auto* xb = reinterpret_cast<const unsigned short*>(xr);
  const uint32_t lo = ca >= 0 ? __ldcg(xb + ca) : 0u, hi = cb >= 0 ? __ldcg(xb + cb) : 0u;
  reinterpret_cast<uint32_t*>(xs + static_cast<size_t>(r) * W)[c >> 1] = lo | hi << 16;
}

// the two counters of the blocks' own gather (`coop`): the last two of the 1 << 16 counters
// the caller gives (native.py; the tiles' counters of such a launch, one per block at most,
// lie far below)
constexpr int WG_GATHER_COUNTERS = (1 << 16) - 2;

// gq_mixed_wg's `schedule` bits
constexpr int WG_STREAM_K = 1, WG_BLOCKS_GATHER = 2;

// one launch's arguments (gq_mixed_wg)
struct WgCall {
  const half* x;
  const uint4 *qc, *zp, *scp, *wsp;
  const int* sidx;
  int nsal;
  const half* bias;
  half* y;
  float* ws;
  int* cnt;
  half* xs;  // M x 64 ceil(nsal / 64) halves for the gathered salient columns (nsal > 0)
  int M, N, K, group, splits, csize, tail;
  bool stream_k, gather, pdl;  // gather: the blocks may gather xs themselves (`coop`)
  cudaStream_t stream;
};

// a row-major [rows, cols] fp16 (bf16: BF) tensor as a 2-D tensor map for the tensor copies:
// boxes of 64 columns x NT rows, 128-byte swizzle, zeros past the last row
bool encode_rows(CUtensorMap* map, const half* base, int cols, int rows, int nt, bool bf) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * sizeof(half)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(nt)}, unit[2] = {1, 1};
  return encode(map, bf ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<half*>(base), dims, strides,
                box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The kernel of a configuration with `smem` bytes of dynamic shared memory allowed (0: its
// own; one record per device of the most allowed, whichever size asks) and (clusters past the
// portable 8 blocks) its non-portable cluster size, once per device: 0 or a cudaError_t
template <bool BF, int BITS, int NT, int WGS, bool SK = false, bool CO = false>
int prepare_wg(int csize, size_t smem = 0) {
  static size_t allowed[64] = {};
  static bool clustered[64] = {};  // per device: clusters past 8 blocks allowed
  auto kernel = mixed_wg_kernel<BF, BITS, NT, WGS, SK, CO>;
  const int rc = allow_smem(kernel, smem ? smem : wg_smem_bytes(BITS, NT, WGS), allowed);
  return rc ? rc : allow_cluster(kernel, csize, clustered);
}

// the tiles compiled with a stream-K schedule: two warpgroups of 128 or 256 rows (a producer,
// one block per SM)
__host__ __device__ constexpr bool wg_stream_k(int nt, int wgs) {
  return wgs == 2 && (nt == 128 || nt == 256);
}

// The current device's SM count, once per device; 0 where the query fails
int sm_count() {
  static int per_device[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return cudaGetLastError(), 0;
  if (per_device[dev] == 0 &&
      cudaDeviceGetAttribute(&per_device[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return cudaGetLastError(), per_device[dev] = 0;
  return per_device[dev];
}

// How many blocks of a configuration the current device runs at once (its SMs times the
// blocks an SM holds, cudaOccupancyMaxActiveBlocksPerMultiprocessor after the launch's
// shared-memory attribute), once per device; 0 where a query fails
template <bool BF, int BITS, int NT, int WGS>
int wave_blocks() {
  static int per_device[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return cudaGetLastError(), 0;
  if (per_device[dev] == 0) {
    const int sms = sm_count();
    int per_sm = 0;
    if (sms <= 0 || prepare_wg<BF, BITS, NT, WGS>(1) ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mixed_wg_kernel<BF, BITS, NT, WGS>,
                                                      wg_threads(NT, WGS),
                                                      wg_smem_bytes(BITS, NT, WGS)) != cudaSuccess)
      return cudaGetLastError(), 0;
    per_device[dev] = sms * per_sm;
  }
  return per_device[dev];
}

// How many clusters of `csize` blocks along the splits of a configuration the current device
// holds at once (cudaOccupancyMaxActiveClusters): a launch of more runs its clusters in waves.
// `smem`: the blocks' dynamic shared memory (0: the configuration's own)
template <bool BF, int BITS, int NT, int WGS>
int wg_clusters(int csize, int* out, size_t smem = 0) {
  if (const int rc = prepare_wg<BF, BITS, NT, WGS>(csize, smem)) return rc;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, csize), cfg.blockDim = dim3(wg_threads(NT, WGS));
  cfg.dynamicSmemBytes = smem ? smem : wg_smem_bytes(BITS, NT, WGS);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1, attr.val.clusterDim.y = csize, attr.val.clusterDim.z = 1;
  cfg.attrs = &attr, cfg.numAttrs = 1;
  const cudaError_t rc = cudaOccupancyMaxActiveClusters(out, mixed_wg_kernel<BF, BITS, NT, WGS>, &cfg);
  if (rc) cudaGetLastError();
  return static_cast<int>(rc);
}

// Tiles of 64 rows or fewer at two warpgroups keep two blocks per SM or more (16 x 2: three),
// so that launches of more blocks than SMs run in one wave; a launch of no more blocks than
// SMs is given shared memory past half an SM's instead, one block on each SM (where its
// clusters still fit at one block per SM): in round 38 the same clustered launch of 96 blocks
// took about 2 us more on some machine starts than on others. Returns that shared memory, or
// 0 where the configuration's own stands.
constexpr size_t WG_SPREAD_SMEM = 116 * 1024;
template <bool BF, int BITS, int NT, int WGS>
size_t wg_spread_smem(long blocks, int csize) {
  if constexpr (wg_min_blocks(NT, WGS) < 2) {
    return 0;
  } else {
    static_assert(2 * (WG_SPREAD_SMEM + 1024) > 228 * 1024 &&
                      WG_SPREAD_SMEM >= wg_smem_bytes(BITS, NT, WGS),
                  "one block per SM, and room for the ring");
    static int fit[64][17] = {};  // per device: clusters of c blocks held at one block per SM
    // no more blocks than SMs (not half a wave: a wave holds three blocks an SM at 16 x 2)
    const int sms = sm_count();
    if (sms <= 0 || blocks > sms || csize > 16) return 0;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return cudaGetLastError(), 0;
    if (prepare_wg<BF, BITS, NT, WGS>(csize, WG_SPREAD_SMEM)) return 0;
    if (csize > 1) {
      if (fit[dev][csize] == 0 &&
          (wg_clusters<BF, BITS, NT, WGS>(csize, &fit[dev][csize], WG_SPREAD_SMEM) ||
           fit[dev][csize] <= 0))
        fit[dev][csize] = -1;  // failed, or none fit: the configuration's own, without asking again
      if (blocks / csize > fit[dev][csize]) return 0;
    }
    return WG_SPREAD_SMEM;
  }
}

// Whether every block of a launch of `blocks` blocks in clusters of `csize` with `smem` bytes of
// shared memory is on the GPU at once (blocks that wait on each other: `coop` in the kernel):
// one block per SM where `wg_spread_smem` gave it that (it checked its clusters), otherwise
// no more blocks than the device holds (`wave_blocks`) and, in clusters, no more clusters
// (cudaOccupancyMaxActiveClusters, once per device and size)
template <bool BF, int BITS, int NT, int WGS>
bool wg_all_resident(long blocks, int csize, size_t smem) {
  if (smem == WG_SPREAD_SMEM) return true;
  const int wave = wave_blocks<BF, BITS, NT, WGS>();
  if (wave <= 0 || blocks > wave || csize > 16) return false;
  if (csize == 1) return true;
  static int fit[64][17] = {};  // per device: clusters of c blocks held at once
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return cudaGetLastError(), false;
  if (fit[dev][csize] == 0 &&
      (wg_clusters<BF, BITS, NT, WGS>(csize, &fit[dev][csize]) || fit[dev][csize] <= 0))
    fit[dev][csize] = -1;
  return blocks / csize <= fit[dev][csize];
}

// A stream-K launch (SK): the tiles past the last whole wave but one (all of them where there are
// fewer than two waves) shared by one wave of blocks, G of them, each at least one k-step;
// the tiles before it whole, a block each. Workspace: G partial tiles (NT x 64 WGS floats
// each, in a scratch buffer (`ws` here) native.mixed_wg sizes by `wg_stream_floats` and no other
// kernel reads; left unzeroed), counters: G x 4 WGS flags (left zeroed).
template <bool BF, int BITS, int NT, int WGS, bool SK>
int launch_wg(const WgCall& a) {
  auto kernel = mixed_wg_kernel<BF, BITS, NT, WGS, SK>;
  const int S = a.K / 64;
  const int ss_per_split = (S + a.splits - 1) / a.splits;
  const int splits = (S + ss_per_split - 1) / ss_per_split;
  if ((a.N / 64) % WGS || splits % a.csize) return -1;  // whole column blocks; clusters tile the splits
  if (a.tail > 1 && (splits > 1 || a.csize > 1)) return -1;  // a split tail: whole tiles before it
  const int T = (a.M + NT - 1) / NT;
  const long blocks = static_cast<long>(T) * (a.N / 64 / WGS);
  if (blocks > 0x7FFFFFFF || ((splits > 1 || a.tail > 1) && blocks > (1 << 16))) return -1;  // counters
  // a split tail: the tiles past the last whole wave run as `tail` K splits each (whole tiles
  // everywhere where the tiles fill whole waves)
  long full = blocks, grid_x = blocks;
  int tail = 1, tail_ss = ss_per_split;
  if (a.tail > 1) {
    const int wave = wave_blocks<BF, BITS, NT, WGS>();
    if (wave <= 0) return -1;
    const long last = blocks % wave;
    tail_ss = (S + a.tail - 1) / a.tail;
    tail = (S + tail_ss - 1) / tail_ss;
    full = blocks - last;
    grid_x = full + last * tail;
    if (grid_x > 0x7FFFFFFF) return -1;
  }
  int sk0 = static_cast<int>(blocks);  // stream-K: the first block of the shared range
  if constexpr (SK) {
    // (the wave the caller sized the workspace by: gq_wg_wave_blocks at 4 bits, fp16)
    const int wave = wave_blocks<false, 4, NT, WGS>();
    if (wave <= 0 || splits > 1 || a.csize > 1 || a.tail > 1) return -1;
    if (blocks % wave == 0 && blocks >= wave) return -1;  // whole waves: nothing to share
    const long shared = blocks < 2l * wave ? blocks : wave + blocks % wave;
    const long units = shared * (S + (a.nsal + 63) / 64);
    const long g = units < wave ? units : wave;
    if (units * g >= 0x7FFFFFFF || blocks * (S + (a.nsal + 63) / 64) >= 0x7FFFFFFF)
      return -1;  // the kernel's 32-bit shares and k-step indices
    sk0 = static_cast<int>(blocks - shared);
    grid_x = sk0 + g;
    if (g * WGS * 4 > (1 << 16)) return -1;  // flags
  }
  const int W = (a.nsal + 63) / 64 * 64;
  CUtensorMap xmap, smap;
  if (!encode_rows(&xmap, a.x, a.K, a.M, NT, BF)) return -1;
  if (W > 0 && (a.xs == nullptr || !encode_rows(&smap, a.xs, W, a.M, NT, BF))) return -1;
  if (W == 0) smap = xmap;  // not read
  size_t smem = wg_smem_bytes(BITS, NT, WGS);
  int rc = prepare_wg<BF, BITS, NT, WGS, SK>(a.csize);
  if (rc) return rc;
  if constexpr (!SK) {
    if (const size_t spread = wg_spread_smem<BF, BITS, NT, WGS>(grid_x * splits, a.csize))
      smem = spread;
  }
  // the blocks gather xs themselves where all of them are on the GPU at once (`coop`); the
  // occupancy queries ask the plain kernel, whose launch bounds, threads and shared memory the
  // CO kernel shares (its registers no more in allocation units: test_cuda_compile.py)
  bool coop = false;
  if constexpr (wg_in_gather(NT, WGS, SK))
    coop = a.gather && W > 0 &&
           wg_all_resident<BF, BITS, NT, WGS>(grid_x * splits, a.csize, smem);
  if (W > 0 && !coop) {
    const long threads = static_cast<long>(a.M) * (W / 2);
    rc = launch_ex(wg_gather_kernel, dim3(static_cast<unsigned>((threads + 255) / 256)), dim3(256),
                   0, a.stream, 1, a.pdl, a.x, a.sidx, a.nsal, a.xs, a.M, a.K, W);
    if (rc) return rc;
  }
  const dim3 grid(static_cast<unsigned>(grid_x), splits), block(wg_threads(NT, WGS));
  auto go = [&](auto kern) {
    return launch_ex(kern, grid, block, smem, a.stream, a.csize, a.pdl, a.qc, a.zp, a.scp, a.wsp,
                     a.nsal, a.bias, a.y, a.ws, a.cnt, a.M, a.N, a.K, group_magic(a.group),
                     ss_per_split, T, a.csize, static_cast<int>(full), tail, tail_ss, sk0, xmap,
                     smap, a.x, a.sidx, a.xs, a.cnt + WG_GATHER_COUNTERS);
  };
  if constexpr (wg_in_gather(NT, WGS, SK)) {
    if (coop) {  // its own kernel, allowed the same shared memory and cluster size
      if ((rc = prepare_wg<BF, BITS, NT, WGS, SK, true>(a.csize, smem))) return rc;
      return go(mixed_wg_kernel<BF, BITS, NT, WGS, SK, true>);
    }
  }
  return go(kernel);
}

template <bool BF, int BITS, int NT, int WGS>
int launch_any(const WgCall& a) {
  if (!a.stream_k) return launch_wg<BF, BITS, NT, WGS, false>(a);
  if constexpr (wg_stream_k(NT, WGS)) return launch_wg<BF, BITS, NT, WGS, true>(a);
  return -1;
}

// f(std::integral_constant<int, NT>, std::integral_constant<int, WGS>) for a compiled tile, or -1.
// 256-row tiles hold 128 accumulators per thread: two warpgroups per block at most; 16- and
// 32-row tiles (m64n16k16, m64n32k16) 8 and 16, 70-80 registers. Every configuration is
// compiled by the CPU test too (GQ_COMPILE_CHECK: their static checks)
template <typename F>
int by_tile(int nt, int wgs, F&& f) {
  using std::integral_constant;
  switch (nt * 10 + wgs) {
    case 162: return f(integral_constant<int, 16>{}, integral_constant<int, 2>{});
    case 164: return f(integral_constant<int, 16>{}, integral_constant<int, 4>{});
    case 322: return f(integral_constant<int, 32>{}, integral_constant<int, 2>{});
    case 324: return f(integral_constant<int, 32>{}, integral_constant<int, 4>{});
    case 642: return f(integral_constant<int, 64>{}, integral_constant<int, 2>{});
    case 644: return f(integral_constant<int, 64>{}, integral_constant<int, 4>{});
    case 1282: return f(integral_constant<int, 128>{}, integral_constant<int, 2>{});
    case 1284: return f(integral_constant<int, 128>{}, integral_constant<int, 4>{});
    case 2562: return f(integral_constant<int, 256>{}, integral_constant<int, 2>{});
    default: return -1;
  }
}

// f(bf16, bits, NT, WGS as integral constants) for a compiled configuration, or -1
template <typename F>
int by_config(int bits, int bf16, int nt, int wgs, F&& f) {
  auto run = [&](auto bf) {
    auto tile = [&](auto b) {
      return by_tile(nt, wgs, [&](auto t, auto w) { return f(bf, b, t, w); });
    };
    switch (bits) {
      case 2: return tile(std::integral_constant<int, 2>{});
      case 3: return tile(std::integral_constant<int, 3>{});
      case 4: return tile(std::integral_constant<int, 4>{});
      default: return -1;
    }
  };
  return bf16 ? run(std::true_type{}) : run(std::false_type{});
}

}  // namespace

// Returns a cudaError_t (0 = success), or -1 for arguments outside what was compiled. Needs a build
// for sm_90a (the caller checks: on other targets the kernel body is empty). `xs`: room for M x 64
// ceil(nsal / 64) halves (the gathered salient columns), when nsal > 0. `cluster` (1..16, dividing
// the splits the launch runs): the splits of a tile in clusters of that many blocks. `tail` (1..16;
// > 1 with one split and no cluster): the tiles past the last whole wave of the device
// (gq_wg_wave_blocks) run as that many K splits each. `schedule`: WG_STREAM_K (one split, no
// cluster or tail; 128- and 256-row tiles of two warpgroups): the tiles past the last whole wave
// but one shared out by k-steps over one wave of blocks; `ws` must hold that many
// (gq_wg_wave_blocks) partial tiles of nt x 64 wgs floats, a scratch no other kernel reads (left
// unzeroed; `cnt`'s flags are left zeroed). WG_BLOCKS_GATHER
// (tiles of 64 rows or fewer): where the launch's blocks are all on the GPU at once, they gather
// x's salient columns themselves (`coop`), counted in the last two of `cnt`'s 1 << 16 counters,
// instead of a gather launch before them.
extern "C" int gq_mixed_wg(const void* x, const void* qc, const void* zp, const void* scp,
                           const void* wsp, const void* sidx, int nsal, const void* bias,
                           void* y, void* ws, void* cnt, int M, int N, int K, int group,
                           int bits, int bf16, int nt, int wgs, int splits, int cluster,
                           int tail, int schedule, void* xs, int pdl, void* stream) {
  if (M < 1 || N % 64 || K % 64 || group % 64 || K % group || splits < 1 || nsal < 0 ||
      static_cast<long long>(M) * N >= (1ll << 31) || cluster < 1 || cluster > 16 || tail < 1 ||
      tail > 16)
    return -1;  // (clusters need sm_90: this kernel runs only where it was built for sm_90a)
  const WgCall a{static_cast<const half*>(x),   static_cast<const uint4*>(qc),
                 static_cast<const uint4*>(zp), static_cast<const uint4*>(scp),
                 static_cast<const uint4*>(wsp), static_cast<const int*>(sidx),
                 nsal,                           static_cast<const half*>(bias),
                 static_cast<half*>(y),          static_cast<float*>(ws),
                 static_cast<int*>(cnt),         static_cast<half*>(xs),
                 M,                              N,
                 K,                              group,
                 splits,                         cluster,
                 tail,                           (schedule & WG_STREAM_K) != 0,
                 (schedule & WG_BLOCKS_GATHER) != 0, pdl != 0,
                 static_cast<cudaStream_t>(stream)};
  return by_config(bits, bf16, nt, wgs, [&](auto bf, auto b, auto t, auto w) {
    return launch_any<decltype(bf)::value, decltype(b)::value, decltype(t)::value,
                      decltype(w)::value>(a);
  });
}

// How many clusters of `cluster` (1..16) blocks of a configuration (as gq_mixed_wg takes it)
// the current device holds at once, into *out: 0 or a cudaError_t (-1: not compiled)
extern "C" int gq_wg_max_clusters(int bits, int bf16, int nt, int wgs, int cluster, int* out) {
  if (cluster < 1 || cluster > 16 || out == nullptr) return -1;
  return by_config(bits, bf16, nt, wgs, [&](auto bf, auto b, auto t, auto w) {
    return wg_clusters<decltype(bf)::value, decltype(b)::value, decltype(t)::value,
                       decltype(w)::value>(cluster, out);
  });
}

// How many blocks of a configuration (as gq_mixed_wg takes it) the current device runs at
// once, into *out (its SMs times the blocks an SM holds): 0 or -1 (not compiled, or a query
// failed)
extern "C" int gq_wg_wave_blocks(int bits, int bf16, int nt, int wgs, int* out) {
  if (out == nullptr) return -1;
  return by_config(bits, bf16, nt, wgs, [&](auto bf, auto b, auto t, auto w) {
    *out = wave_blocks<decltype(bf)::value, decltype(b)::value, decltype(t)::value,
                       decltype(w)::value>();
    return *out > 0 ? 0 : -1;
  });
}

#ifdef GQ_TRACE
// A diagnosis build's timelines (GQ_TRACE, fragments.cuh): `count` values of this file's
// trace buffer into dst (host memory), then the buffer zeroed
extern "C" int gq_wg_trace(void* dst, int count) { return trace_read(dst, count); }
#endif

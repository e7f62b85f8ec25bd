/* GIFT-SW's training weight on the CPU in one pass (kernels/cpu_native.py builds and loads it,
   with cpu_gemv.c, into one library).

   wt[k, n] = s[g, n] * (q[k, n] - z[g, n]) + delta[n] * noise(seed, k * N + n),  g = k / group

   The noise is Triton's: tl.randn(seed, offset) * 0.5 ("normal") or tl.rand(seed, offset) - 0.5
   ("uniform") at the offset k * N + n, as the GPU kernel (kernels/triton/mm.py) draws it, so a
   layer trained with a given seed sees the same noise on either device, up to the last bits of
   the log and cosine; in bf16 the grid value is rounded as the GPU kernel and the torch
   reference round it (the scale, then the product), so the two rebuilds give the same bf16
   weight but for a rare tie. Triton's generator is Philox4x32 with 10 rounds, counter (offset, 0, 0,
   0) and key (low, high 32 bits of the seed); a normal is the Box-Muller cosine of the first
   two words, both mapped to [0, 1) as tl's uint_to_uniform_float does.

   The uniform draws' u * scale - 1/2 may be fused into one rounding (-ffp-contract=fast), as
   the GPU compiler fuses it; Triton's interpreter does not (3e-8 apart).

   Plain C loops over blocks of LB counters, each step over the whole block, which GCC and Clang
   vectorize (-O3 -march=native -fno-math-errno); log and cos are Cephes' single-precision
   polynomials, written out so that they vectorize too. Rows are shared over OpenMP threads;
   the result does not depend on their number. Output fp32 (the grid value exact) or bf16. */

#include <stdint.h>
#include <string.h>
#include <math.h>

#define LB 64 /* counters per block */

static inline uint32_t mulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }

static inline float as_float(int32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline int32_t as_int(float f) { int32_t b; memcpy(&b, &f, 4); return b; }

/* tl's uint_to_uniform_float: the word as int32, negatives folded (-x - 1), times the largest
   scale that keeps INT32_MAX below 1.0: [0, 1) */
static inline float uniform01(uint32_t u) {
    int32_t x = (int32_t)u;
    x = x < 0 ? ~x : x; /* -x - 1, defined for INT32_MIN too */
    return (float)x * 4.6566127342e-10f;
}

/* log(x), x > 0 normal: x = m 2^e with m in [sqrt(1/2), sqrt(2)), Cephes logf's polynomial */
static inline float log_f(float x) {
    int32_t b = as_int(x);
    int32_t e = ((b >> 23) & 0xff) - 126;
    float m = as_float((b & 0x007fffff) | 0x3f000000); /* [0.5, 1) */
    int low = m < 0.70710678f;
    m = low ? m + m : m;
    e = low ? e - 1 : e;
    float t = m - 1.0f, z = t * t;
    float p = 7.0376836292e-2f;
    p = p * t - 1.1514610310e-1f;
    p = p * t + 1.1676998740e-1f;
    p = p * t - 1.2420140846e-1f;
    p = p * t + 1.4249322787e-1f;
    p = p * t - 1.6668057665e-1f;
    p = p * t + 2.0000714765e-1f;
    p = p * t - 2.4999993993e-1f;
    p = p * t + 3.3333331174e-1f;
    return t * z * p - 0.5f * z + t + (float)e * 0.693147180559945f;
}

/* cos(x), 0 <= x < 2 pi: reduced by the nearest even multiple j of pi/4 (Cephes' three-part
   pi/4), then its sine or cosine polynomial by the octant */
static inline float cos_f(float x) {
    int32_t j = (int32_t)(x * 1.27323954473516f);
    j = (j + 1) & ~1;
    float y = (float)j;
    float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
    float z = r * r;
    float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
              0.5f * z + 1.0f;
    float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    int32_t q = j & 7; /* 0, 2, 4 or 6: cos r, -sin r, -cos r, sin r */
    float v = (q & 2) ? s : c;
    return ((q + 2) & 4) ? -v : v;
}

/* LB unit draws at offsets c0, c0 + 1, ... (uint32, wrapping as Triton's int32 offsets do):
   kind 1 N(0, 1/4), kind 2 U(-1/2, 1/2) */
static inline void draw_block(uint32_t c0, uint32_t k0, uint32_t k1, int kind, float *out) {
    uint32_t x0[LB], x1[LB], x2[LB], x3[LB];
    for (int l = 0; l < LB; l++) {
        x0[l] = c0 + (uint32_t)l;
        x1[l] = x2[l] = x3[l] = 0;
    }
    for (int r = 0; r < 10; r++) {
        for (int l = 0; l < LB; l++) {
            uint32_t a = x0[l], b = x2[l];
            x0[l] = mulhi(0xCD9E8D57u, b) ^ x1[l] ^ k0;
            x2[l] = mulhi(0xD2511F53u, a) ^ x3[l] ^ k1;
            x1[l] = 0xCD9E8D57u * b;
            x3[l] = 0xD2511F53u * a;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    if (kind == 2) {
        for (int l = 0; l < LB; l++) out[l] = uniform01(x0[l]) - 0.5f;
        return;
    }
    for (int l = 0; l < LB; l++) {
        float u1 = uniform01(x0[l]), u2 = uniform01(x1[l]);
        u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
        out[l] = 0.5f * sqrtf(-2.0f * log_f(u1)) * cos_f(6.283185307179586f * u2);
    }
}

/* n unit draws at offsets offset, offset + 1, ... (the tests compare them with Triton's) */
void gq_draw(uint64_t seed, uint32_t offset, int64_t n, int kind, float *out, int threads) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    int64_t blocks = (n + LB - 1) / LB;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        float tmp[LB];
        int64_t i0 = b * LB, len = n - i0 < LB ? n - i0 : LB;
        draw_block(offset + (uint32_t)i0, k0, k1, kind, tmp);
        memcpy(out + i0, tmp, (size_t)len * sizeof(float));
    }
}

static inline uint16_t to_bf16(float f) { /* round to nearest even; the values are finite */
    uint32_t u = (uint32_t)as_int(f);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_value(float f) { return as_float((int32_t)((uint32_t)to_bf16(f) << 16)); }

/* wt [K, N] (fp32, or bf16 bits where bf16) from codes [K, N] uint8, zeros [G, N] int32, scales
   [G, N] fp32, rows k of group k / group; noise (kind 0: none) of scale delta [N] */
void gq_noisy_weight_t(const uint8_t *codes, const int32_t *zeros, const float *scales, int64_t K,
                       int64_t N, int64_t group, const float *delta, int kind, uint64_t seed,
                       int bf16, void *wt, int threads) {
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t k = 0; k < K; k++) {
        const uint8_t *q = codes + k * N;
        const int32_t *z = zeros + (k / group) * N;
        const float *s = scales + (k / group) * N;
        float row[LB], r[LB];
        for (int64_t n0 = 0; n0 < N; n0 += LB) {
            int64_t len = N - n0 < LB ? N - n0 : LB;
            if (kind) draw_block((uint32_t)(k * N + n0), k0, k1, kind, r);
            for (int64_t l = 0; l < len; l++) {
                float code = (float)(q[n0 + l] - z[n0 + l]);
                float w = bf16 ? bf16_value(code * bf16_value(s[n0 + l])) : code * s[n0 + l];
                /* one rounding, as the GPU kernel's fused w + r * d */
                row[l] = kind ? fmaf(r[l], delta[n0 + l], w) : w;
            }
            if (bf16) {
                uint16_t *o = (uint16_t *)wt + k * N + n0;
                for (int64_t l = 0; l < len; l++) o[l] = to_bf16(row[l]);
            } else {
                memcpy((float *)wt + k * N + n0, row, (size_t)len * sizeof(float));
            }
        }
    }
}

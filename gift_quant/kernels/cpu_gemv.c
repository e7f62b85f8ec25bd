/* Mixed-precision GEMV/GEMM for a few rows on the CPU (kernels/cpu_native.py builds and loads it).

   y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * (q[k, n] - z[g, n])
             + sum_j x[m, S_j] * W_S[n, j] + bias[n]

   Codes q (2, 3 or 4 bits; all widened to 4 bits, which is exact) stay packed. Code j of a word
   (bits 4j..4j+3) is masked in place, not shifted down: the int (w & 15 << 4j) is q * 16^j, an
   exact float, and (q - z) * 16^j, with z * 16^j made once per group, is exact too. It
   multiplies x * 16^-j, prepared once per call (a power-of-two scaling, exact barring
   underflow), so each product is x * (q - z) as if q had been shifted down, fused into the
   group's fp32 sum as before. The sums run in several independent chains (so that the FMA
   units do not wait on one), added at the end of the group, which the group's scale then
   multiplies. Salient columns and bias are added in the same pass, so one call computes the
   whole mixed layer.

   Layout (built once per layer by cpu_native.pack):
     words  int32 [N/16][K/8][16]: word (b, r, i) holds the codes of input rows 8r..8r+7 of
            output column 16b+i, row 8r+j at bits 4j..4j+3 (the GPTQ 4-bit word, blocked by 16
            columns so one block streams contiguously);
     zeros, scales  fp32 [N/16][G][16];
     sal_w  fp16 bits [N/16][k][16] (salient weights, transposed and blocked), sal_idx int32 [k];
     bias   fp32 [N] or NULL.
   Written with GCC/Clang vector extensions (AVX2 or NEON from -march=native); the one intrinsic
   is F16C's fp16 -> fp32 conversion, which GCC 12 would otherwise do one value at a time. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h> /* GCC 12 scalarizes the generic fp16 -> fp32 vector conversion */
#endif

typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef _Float16 v8h __attribute__((vector_size(16)));

#define NB 16 /* output columns per block: two v8f accumulators per row */
#define MR 4  /* rows per pass */
/* Independent sums per row and 8 columns: an fp32 FMA takes 4-5 cycles and a core issues two a
   cycle, so one chain per 8 columns would leave the FMA units waiting at one or two rows. */
#define SETS(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1)

typedef struct {
    int64_t K, N, G, group, k; /* k: salient columns */
    const int32_t *words;
    const float *zeros, *scales;
    const uint16_t *sal_w;
    const int32_t *sal_idx;
    const float *bias;
} layer_t;

static inline v8i load_i(const int32_t *p) { v8i v; memcpy(&v, p, sizeof v); return v; }
static inline v8f load_f(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store_f(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f bcast(float a) { return (v8f){a, a, a, a, a, a, a, a}; }
static inline v8f load_h(const uint16_t *p) {
#if defined(__F16C__) && defined(__AVX__)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8h h;
    memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, v8f);
#endif
}

static const float pow16[8] = {1.f, 0x1p4f, 0x1p8f, 0x1p12f, 0x1p16f, 0x1p20f, 0x1p24f, 0x1p28f};

/* Code j of each word as the float q * 16^j (exact: at most 4 significant bits). */
static inline v8f code_at(v8i w, int j) {
    if (j == 7) return __builtin_convertvector((v8i)((v8u)w >> 28), v8f) * pow16[7];
    return __builtin_convertvector(w & (15 << (4 * j)), v8f);
}

/* rows m0 .. m0+R-1 of one 16-column block b; xp: the rows prepared by prepare_rows */
static inline void block_rows(const layer_t *L, const float *x, const float *xp, int64_t ldx,
                              float *y, int64_t ldy, int64_t b, int R) {
    const int64_t K = L->K, G = L->G, rows_per_group = L->group / 8;
    const int S = SETS(R);
    const int32_t *w = L->words + b * (K / 8) * NB;
    const float *zb = L->zeros + b * G * NB, *sb = L->scales + b * G * NB;
    v8f out0[MR], out1[MR];
    for (int m = 0; m < MR; m++) out0[m] = out1[m] = bcast(0.f);
    for (int64_t g = 0; g < G; g++) {
        const v8f z0 = load_f(zb + g * NB), z1 = load_f(zb + g * NB + 8);
        v8f zs0[8], zs1[8]; /* z * 16^j: exact */
        for (int j = 0; j < 8; j++) {
            zs0[j] = z0 * pow16[j];
            zs1[j] = z1 * pow16[j];
        }
        v8f a0[4][MR], a1[4][MR];
        for (int s = 0; s < 4; s++)
            for (int m = 0; m < MR; m++) a0[s][m] = a1[s][m] = bcast(0.f);
        for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
            const v8i w0 = load_i(w + r * NB), w1 = load_i(w + r * NB + 8);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const v8f d0 = code_at(w0, j) - zs0[j], d1 = code_at(w1, j) - zs1[j];
                for (int m = 0; m < R; m++) {
                    const v8f xv = bcast(xp[m * K + 8 * r + j]);
                    a0[j % S][m] += xv * d0;
                    a1[j % S][m] += xv * d1;
                }
            }
        }
        const v8f s0 = load_f(sb + g * NB), s1 = load_f(sb + g * NB + 8);
        for (int m = 0; m < R; m++) {
            for (int s = 1; s < S; s++) {
                a0[0][m] += a0[s][m];
                a1[0][m] += a1[s][m];
            }
            out0[m] += s0 * a0[0][m];
            out1[m] += s1 * a1[0][m];
        }
    }
    const uint16_t *sw = L->sal_w + b * L->k * NB;
    for (int64_t j = 0; j < L->k; j++) {
        const v8f c0 = load_h(sw + j * NB), c1 = load_h(sw + j * NB + 8);
        const int64_t col = L->sal_idx[j];
        for (int m = 0; m < R; m++) {
            const v8f xv = bcast(x[m * ldx + col]);
            out0[m] += xv * c0;
            out1[m] += xv * c1;
        }
    }
    if (L->bias) {
        const v8f c0 = load_f(L->bias + b * NB), c1 = load_f(L->bias + b * NB + 8);
        for (int m = 0; m < R; m++) {
            out0[m] += c0;
            out1[m] += c1;
        }
    }
    for (int m = 0; m < R; m++) {
        store_f(y + m * ldy + b * NB, out0[m]);
        store_f(y + m * ldy + b * NB + 8, out1[m]);
    }
}

/* xp [M, K] = x * 16^-(k % 8); K is a multiple of 8 (cpu_native.native_unsupported), so k % 8
   is the flat index's. */
static void prepare_rows(const float *x, float *xp, int64_t M, int64_t K) {
    static const float inv16[8] = {1.f, 0x1p-4f, 0x1p-8f, 0x1p-12f,
                                   0x1p-16f, 0x1p-20f, 0x1p-24f, 0x1p-28f};
    for (int64_t i = 0; i < M * K; i++) xp[i] = x[i] * inv16[i % 8];
}

/* y [M, N] = the mixed product of x [M, K] (rows contiguous), fp32. Returns 0, or 1 when the
   M * K floats of prepared rows could not be allocated (nothing written). */
int gq_mixed_gemm(const layer_t *L, const float *x, float *y, int64_t M, int threads) {
    const int64_t blocks = L->N / NB;
    if (M <= 0) return 0;
    float *xp = malloc((size_t)(M * L->K) * sizeof(float));
    if (!xp) return 1;
    prepare_rows(x, xp, M, L->K);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t left = M - m0;
            const float *xm = x + m0 * L->K, *xpm = xp + m0 * L->K;
            float *ym = y + m0 * L->N;
            /* constant R lets the compiler keep the accumulators in registers */
            if (left >= 4) block_rows(L, xm, xpm, L->K, ym, L->N, b, 4);
            else if (left == 3) block_rows(L, xm, xpm, L->K, ym, L->N, b, 3);
            else if (left == 2) block_rows(L, xm, xpm, L->K, ym, L->N, b, 2);
            else block_rows(L, xm, xpm, L->K, ym, L->N, b, 1);
        }
    }
    free(xp);
    return 0;
}

/* wt [K, N] = dequant(W_q)^T in fp32 (salient columns 0, like the reference's). */
void gq_dequantize(const layer_t *L, float *wt, int threads) {
    const int64_t K = L->K, N = L->N, blocks = N / NB, rows_per_group = L->group / 8;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int32_t *w = L->words + b * (K / 8) * NB;
        for (int64_t g = 0; g < L->G; g++) {
            const float *zp = L->zeros + (b * L->G + g) * NB, *sp = L->scales + (b * L->G + g) * NB;
            const v8f z0 = load_f(zp), z1 = load_f(zp + 8), s0 = load_f(sp), s1 = load_f(sp + 8);
            for (int64_t r = g * rows_per_group; r < (g + 1) * rows_per_group; r++) {
                const v8i w0 = load_i(w + r * NB), w1 = load_i(w + r * NB + 8);
                for (int j = 0; j < 8; j++) {
                    float *o = wt + (8 * r + j) * N + b * NB;
                    store_f(o, (__builtin_convertvector((w0 >> (4 * j)) & 15, v8f) - z0) * s0);
                    store_f(o + 8, (__builtin_convertvector((w1 >> (4 * j)) & 15, v8f) - z1) * s1);
                }
            }
        }
    }
}

/* A dense Linear whose fp32 weights are all fp16 values (an export's unquantized lm_head):
   y [M, N] = x [M, K] @ W^T, W read as fp16 from hw (fp16 bits [N/16][K][16]) and widened in
   registers, which is exact; half the bytes of the fp32 weight. */
static inline void half_rows(const uint16_t *hw, int64_t K, int64_t N, const float *x, float *y,
                             int64_t b, int R) {
    const int S = SETS(R);
    const uint16_t *w = hw + b * K * NB;
    v8f a0[4][MR], a1[4][MR];
    for (int s = 0; s < 4; s++)
        for (int m = 0; m < MR; m++) a0[s][m] = a1[s][m] = bcast(0.f);
    int64_t k = 0;
    for (; k + S <= K; k += S)
        for (int s = 0; s < S; s++) {
            const v8f c0 = load_h(w + (k + s) * NB), c1 = load_h(w + (k + s) * NB + 8);
            for (int m = 0; m < R; m++) {
                const v8f xv = bcast(x[m * K + k + s]);
                a0[s][m] += xv * c0;
                a1[s][m] += xv * c1;
            }
        }
    for (; k < K; k++) {
        const v8f c0 = load_h(w + k * NB), c1 = load_h(w + k * NB + 8);
        for (int m = 0; m < R; m++) {
            const v8f xv = bcast(x[m * K + k]);
            a0[0][m] += xv * c0;
            a1[0][m] += xv * c1;
        }
    }
    for (int m = 0; m < R; m++) {
        for (int s = 1; s < S; s++) {
            a0[0][m] += a0[s][m];
            a1[0][m] += a1[s][m];
        }
        store_f(y + m * N + b * NB, a0[0][m]);
        store_f(y + m * N + b * NB + 8, a1[0][m]);
    }
}

void gq_half_gemm(const uint16_t *hw, int64_t K, int64_t N, const float *x, float *y, int64_t M,
                  int threads) {
    const int64_t blocks = N / NB;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t left = M - m0;
            const float *xm = x + m0 * K;
            float *ym = y + m0 * N;
            if (left >= 4) half_rows(hw, K, N, xm, ym, b, 4);
            else if (left == 3) half_rows(hw, K, N, xm, ym, b, 3);
            else if (left == 2) half_rows(hw, K, N, xm, ym, b, 2);
            else half_rows(hw, K, N, xm, ym, b, 1);
        }
    }
}

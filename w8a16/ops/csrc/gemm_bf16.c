/* W8A16 GEMM for bf16 activations on CPUs with AVX512-BF16 dot products (AMD Zen 4+, Intel Cooper Lake,
 * Sapphire Rapids+): y = round_bf16((x @ q^T) * scales + bias), for batches of `native.BF16_DOT_MIN_M` (32)
 * rows of x and more; below that gemv.c's own bf16 dot-product tiles are faster.
 *
 * Why: on these CPUs PyTorch's dense bf16 matmul runs on VDPBF16PS, which does 32 multiply-adds per
 * instruction, twice what an fp32 FMA does; a W8A16 kernel that widens int8 to fp32 (gemv.c, the tiled path)
 * is then compute-bound at half that rate, and from 16 rows of x on it fell behind the layer it replaces
 * (0.4-0.6x dense bf16 at M = 16-256 on a 2-core EPYC). Here the int8 weights are widened to bf16 instead
 * (exact: |q| <= 127 needs 7 bits of the 8 a bf16 keeps) and multiplied with VDPBF16PS, so we run at the
 * dense layer's rate while reading half its weight bytes: 0.98-1.10x dense bf16 at M = 32-256 on that EPYC.
 *
 * Accuracy: the same rule as every path. Each product of two bf16 numbers is exact in fp32 and the sums are
 * fp32; the per-channel scale (fp32) and the bias are applied once, at the end, and the result is rounded to
 * bf16 once (round to nearest even). One difference from an FMA loop: VDPBF16PS treats bf16 inputs below
 * 2^-126 (denormals) as zero, a relative change far below bf16's own rounding.
 *
 * Layout. VDPBF16PS multiplies 16 lanes of bf16 pairs: lane i gets a[2i] * b[2i] + a[2i+1] * b[2i+1].
 * Here a lane is a row of x, and a pair is two consecutive k: x is packed once per call into blocks of 32 (or
 * 16) rows, ``xp[kp][row]`` = (x[row][2kp], x[row][2kp+1]), and each weight row's pair (q[n][2kp], q[n][2kp+1])
 * is broadcast to all lanes. One step of the inner loop: 2 loads of x pairs, 8 broadcasts of weight pairs
 * (8 output channels), 16 dot products into 16 accumulators (32 rows x 8 channels).
 *
 * Threads: output channels are split into blocks of 8; a thread widens its block's weights to bf16 once
 * (8 rows x k, in its own buffer) and runs every block of rows of x over them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 8  /* output channels per block */

static inline float param(const void *p, int64_t i, int bf16) {  /* a scale or bias, fp32 or bf16 */
    if (!bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t round_to_bf16(float f) {  /* round to nearest even, as PyTorch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The same compilers as gemv.c's avx512bf16 level: GCC and clang 11 or newer know the intrinsics. */
#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 11 : (defined(__GNUC__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#define TARGET_BF16 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))

/* Whether this CPU (and OS) can run the kernel: 1 or 0. */
int w8a16_bf16_dot_supported(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")))
        return 0;
    unsigned a, b, c, d;  /* AVX512_BF16: CPUID leaf 7, subleaf 1, EAX bit 5 */
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5));
}

/* Weights q[0 .. len) of one row -> (len + 1) / 2 pairs of bf16 (an odd last one padded with 0). Exact: an
 * integer of at most 8 bits is the top half of its fp32. */
TARGET_BF16 static void widen_row(const int8_t *q, int64_t len, uint16_t *out) {
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m512 f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(f), 16)));
    }
    for (; i < len; ++i) {
        float f = (float)q[i];
        uint32_t u;
        memcpy(&u, &f, 4);
        out[i] = (uint16_t)(u >> 16);
    }
    if (len & 1) out[len] = 0;
}

/* R (1 or 2) vectors of 16 rows of x against NR weight rows, over ``steps`` pairs of k, added to acc:
 * acc[r][j] lane l += sum_k x[16r + l][k] * q[j][k]. xp: (steps, 16R) pairs; wb: NR rows of ``ldw`` pairs. */
TARGET_BF16 static inline __attribute__((always_inline)) void block_r(const uint32_t *xp, const uint32_t *wb,
                                                                      int64_t ldw, int64_t steps, const int R,
                                                                      __m512 acc[2][NR]) {
    for (int64_t p = 0; p < steps; ++p) {
        __m512i a[2];
        for (int r = 0; r < R; ++r) a[r] = _mm512_loadu_si512(xp + p * 16 * R + 16 * r);
        for (int j = 0; j < NR; ++j) {
            __m512i b = _mm512_set1_epi32((int)wb[j * ldw + p]);
            for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)a[r], (__m512bh)b);
        }
    }
}

/* y[m, n] (bf16) = round((x @ q^T)[m, n] * scales[n] + bias[n]); x (m, k) bf16, q (n, k) int8, scales and bias
 * (n,) fp32, or bf16 if params_bf16 (bias may be NULL); all contiguous. Returns 0, -1 when this CPU cannot run
 * it, -2 when out of memory. */
TARGET_BF16 int w8a16_gemm_bf16(const int8_t *q, const uint16_t *x, const void *scales, const void *bias,
                                uint16_t *y, int64_t m, int64_t n, int64_t k, int threads, int params_bf16) {
    if (!w8a16_bf16_dot_supported()) return -1;
    const int64_t kp = (k + 1) / 2, mp = (m + 15) / 16 * 16;  /* pairs of k; rows padded to 16 */
    const int64_t blocks = (n + NR - 1) / NR;
    uint32_t *xp = (uint32_t *)malloc((size_t)(kp * mp) * 4);
    if (!xp) return -2;
    int failed = 0;
    (void)threads;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads)
#endif
    {
        /* Pack x: blocks of 32 rows (the last may be 16), each (kp, rows) pairs; padding rows and k are 0. */
#ifdef _OPENMP
        #pragma omp for schedule(static)
#endif
        for (int64_t row = 0; row < mp; ++row) {
            const int64_t m0 = row / 32 * 32, rows = mp - m0 >= 32 ? 32 : 16;
            uint32_t *dst = xp + m0 * kp + (row - m0);
            if (row >= m) {
                for (int64_t p = 0; p < kp; ++p) dst[p * rows] = 0;
            } else {
                const uint16_t *src = x + row * k;
                for (int64_t p = 0; p < k / 2; ++p) dst[p * rows] = src[2 * p] | ((uint32_t)src[2 * p + 1] << 16);
                if (k & 1) dst[(kp - 1) * rows] = src[k - 1];
            }
        }
        /* The weights of NR channels, widened to bf16 once and kept in L2 while every block of rows uses them.
         * (Slicing k so that a slice of x stayed in L2 across channels measured slower, 0.91-0.97x of this.) */
        uint16_t *wb = (uint16_t *)malloc((size_t)(NR * 2 * kp) * 2);
        if (!wb) {
#ifdef _OPENMP
            #pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
        #pragma omp for schedule(static)
#endif
        for (int64_t b = 0; b < blocks; ++b) {
            if (!wb) continue;
            const int64_t n0 = b * NR, cols = n - n0 < NR ? n - n0 : NR;
            for (int64_t j = 0; j < NR; ++j)  /* missing channels of the last block: a copy of its first */
                widen_row(q + (n0 + (j < cols ? j : 0)) * k, k, wb + j * 2 * kp);
            for (int64_t m0 = 0; m0 < mp; m0 += 32) {
                const int R = mp - m0 >= 32 ? 2 : 1;
                __m512 acc[2][NR];
                for (int j = 0; j < NR; ++j)
                    for (int r = 0; r < R; ++r) acc[r][j] = _mm512_setzero_ps();
                if (R == 2) block_r(xp + m0 * kp, (const uint32_t *)wb, kp, kp, 2, acc);
                else block_r(xp + m0 * kp, (const uint32_t *)wb, kp, kp, 1, acc);
                float out[NR][32];  /* scale, bias, one rounding, into y's rows */
                for (int j = 0; j < NR; ++j)
                    for (int r = 0; r < R; ++r) _mm512_storeu_ps(&out[j][16 * r], acc[r][j]);
                for (int64_t r = 0; r < 16 * R && m0 + r < m; ++r) {
                    uint16_t *yrow = y + (m0 + r) * n + n0;
                    for (int64_t j = 0; j < cols; ++j) {
                        float v = out[j][r] * param(scales, n0 + j, params_bf16);
                        if (bias) v += param(bias, n0 + j, params_bf16);
                        yrow[j] = round_to_bf16(v);
                    }
                }
            }
        }
        free(wb);
    }
    free(xp);
    return failed ? -2 : 0;
}

#else /* no AVX512-BF16 in this compiler or architecture */

int w8a16_bf16_dot_supported(void) { return 0; }

int w8a16_gemm_bf16(const int8_t *q, const uint16_t *x, const void *scales, const void *bias, uint16_t *y,
                    int64_t m, int64_t n, int64_t k, int threads, int params_bf16) {
    (void)q; (void)x; (void)scales; (void)bias; (void)y; (void)m; (void)n; (void)k; (void)threads;
    (void)params_bf16; (void)round_to_bf16; (void)param;
    return -1;
}
#endif

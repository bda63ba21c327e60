/* W8A16 GEMV for the CPU: y[r, o] = scales[o] * sum_i w[o, i] * x[r, i] (+ bias[o]), all in fp32.
 *
 * Why a C kernel: at small batch a W8A16 matmul is bound by reading the weights, and int8 is half the bytes
 * of bf16 and a quarter of fp32. PyTorch has no CPU op that reads int8 weights with fp32 activations at
 * memory speed (_weight_int8pack_mm is a scalar loop outside bf16), so this loop converts 8 int8 weights to
 * fp32 in registers and fuses them with x — the weights are read once, from memory, as int8.
 *
 * Contract (checked by w8a16/native.py before every call): w is (n, k) int8; x is (m, k), scales and bias (may
 * be NULL) are (n,), y is (m, n); each of x, scales/bias and y is fp32 or bf16 as its flag says; all
 * contiguous. Unaligned loads only: no alignment needed. Taking bf16 directly saves the four small conversion
 * ops per call that would otherwise dominate a decode step's overhead.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_fp32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even, as PyTorch does; NaN stays NaN. */
static inline uint16_t fp32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_value(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_fp32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 load8_int8_as_fp32(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline float horizontal_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One weight row against one row of x; the tail (k % 32) is summed in scalar code. */
static float dot_int8_fp32(const int8_t *w, const float *x, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        a0 = _mm256_fmadd_ps(load8_int8_as_fp32(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8_int8_as_fp32(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8_int8_as_fp32(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8_int8_as_fp32(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < k; ++i) s += (float)w[i] * x[i];
    return s;
}

/* Four weight rows against one row of x: each load of x serves four rows, and the eight accumulators are
 * independent FMA chains. ``next`` (the next block of four rows, or NULL) is prefetched one cache line per
 * step: the four interleaved row streams are too short (k bytes each) for the hardware prefetcher to ramp
 * up, and prefetching the next block doubled the bandwidth on 1024-wide rows (9 -> 21 GB/s, 2 cores). */
#define HAS_DOT4 1
static void dot4_int8_fp32(const int8_t *w, int64_t k, const float *x, float out[4], const int8_t *next) {
    const int8_t *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        if (next) _mm_prefetch((const char *)(next + 4 * i), _MM_HINT_T0);  /* 64 bytes per 64 consumed */
        __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(load8_int8_as_fp32(w0 + i), x0, a0);
        b0 = _mm256_fmadd_ps(load8_int8_as_fp32(w0 + i + 8), x1, b0);
        a1 = _mm256_fmadd_ps(load8_int8_as_fp32(w1 + i), x0, a1);
        b1 = _mm256_fmadd_ps(load8_int8_as_fp32(w1 + i + 8), x1, b1);
        a2 = _mm256_fmadd_ps(load8_int8_as_fp32(w2 + i), x0, a2);
        b2 = _mm256_fmadd_ps(load8_int8_as_fp32(w2 + i + 8), x1, b2);
        a3 = _mm256_fmadd_ps(load8_int8_as_fp32(w3 + i), x0, a3);
        b3 = _mm256_fmadd_ps(load8_int8_as_fp32(w3 + i + 8), x1, b3);
    }
    out[0] = horizontal_sum(_mm256_add_ps(a0, b0));
    out[1] = horizontal_sum(_mm256_add_ps(a1, b1));
    out[2] = horizontal_sum(_mm256_add_ps(a2, b2));
    out[3] = horizontal_sum(_mm256_add_ps(a3, b3));
    for (; i < k; ++i) {
        out[0] += (float)w0[i] * x[i];
        out[1] += (float)w1[i] * x[i];
        out[2] += (float)w2[i] * x[i];
        out[3] += (float)w3[i] * x[i];
    }
}

/* Several rows of x (prefill, small batches): a tile of two weight rows × R ≤ 4 rows of x. Each group of 8
 * weights is converted to fp32 once and used for R rows of x, where `dot4_int8_fp32` would convert it R times:
 * at M ≥ 2 the conversion, not memory, is the bottleneck. 8 accumulators + 2 weights + 1 x = 11 registers. */
#define HAS_TILE2 1
static inline __attribute__((always_inline)) void tile2(const int8_t *w0, const int8_t *w1, int64_t k,
                                                        const float *x, int64_t ldx, const int R,
                                                        float out[2][4], const int8_t *next) {
    __m256 acc[2][4];
    for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        if (next && (i & 31) == 0) _mm_prefetch((const char *)(next + 2 * i), _MM_HINT_T0);
        __m256 a = load8_int8_as_fp32(w0 + i), b = load8_int8_as_fp32(w1 + i);
        for (int r = 0; r < R; ++r) {
            __m256 xr = _mm256_loadu_ps(x + r * ldx + i);
            acc[0][r] = _mm256_fmadd_ps(a, xr, acc[0][r]);
            acc[1][r] = _mm256_fmadd_ps(b, xr, acc[1][r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        out[0][r] = horizontal_sum(acc[0][r]);
        out[1][r] = horizontal_sum(acc[1][r]);
        for (int64_t j = i; j < k; ++j) {
            out[0][r] += (float)w0[j] * x[r * ldx + j];
            out[1][r] += (float)w1[j] * x[r * ldx + j];
        }
    }
}

static void tile2_rows(const int8_t *w0, const int8_t *w1, int64_t k, const float *x, int64_t ldx, int rows,
                       float out[2][4], const int8_t *next) {
    switch (rows) {  /* constant R per case: the r loops unroll and the accumulators stay in registers */
        case 1: tile2(w0, w1, k, x, ldx, 1, out, next); break;
        case 2: tile2(w0, w1, k, x, ldx, 2, out, next); break;
        case 3: tile2(w0, w1, k, x, ldx, 3, out, next); break;
        default: tile2(w0, w1, k, x, ldx, 4, out, next); break;
    }
}
#else
/* Portable version: the compiler vectorises what it can. */
static float dot_int8_fp32(const int8_t *w, const float *x, int64_t k) {
    float s = 0.f;
    for (int64_t i = 0; i < k; ++i) s += (float)w[i] * x[i];
    return s;
}
#endif

static inline void store(void *y, int64_t i, int64_t o, float dot, const void *scales, const void *bias,
                         int params_bf16, int y_bf16) {
    float v = dot * load_value(scales, o, params_bf16);
    if (bias) v += load_value(bias, o, params_bf16);
    if (y_bf16) ((uint16_t *)y)[i] = fp32_to_bf16(v);
    else ((float *)y)[i] = v;
}

/* Blocks of output rows (four at M=1, two in `tile2` tiles at M > 1) are split across threads; each weight row
 * is read from memory once and reused from L1 for every row of x. bf16 x is widened to fp32 once, up front.
 * Returns the SIMD width in floats it was built for (8 with AVX2, 1 without), or -1 if it could not allocate. */
int w8a16_gemv(const int8_t *w, const void *x_in, const void *scales, const void *bias, void *y,
               int64_t m, int64_t n, int64_t k, int threads, int x_bf16, int params_bf16, int y_bf16) {
    const float *x = (const float *)x_in;
    float *widened = NULL;
    if (x_bf16) {
        widened = (float *)malloc((size_t)(m * k) * sizeof(float));
        if (!widened) return -1;
        for (int64_t i = 0; i < m * k; ++i) widened[i] = bf16_to_fp32(((const uint16_t *)x_in)[i]);
        x = widened;
    }
#ifdef HAS_TILE2
    if (m > 1) {
        int64_t pairs = (n + 1) / 2;
        #pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < pairs; ++b) {
            int64_t o = 2 * b;
            const int8_t *w0 = w + o * k, *w1 = o + 1 < n ? w0 + k : w0;  /* an odd last row is computed twice */
            for (int64_t r0 = 0; r0 < m; r0 += 4) {
                int rows = m - r0 < 4 ? (int)(m - r0) : 4;
                float d[2][4];
                const int8_t *next = (r0 == 0 && o + 4 <= n) ? w + (o + 2) * k : NULL;
                tile2_rows(w0, w1, k, x + r0 * k, k, rows, d, next);
                for (int r = 0; r < rows; ++r)
                    for (int j = 0; j < 2 && o + j < n; ++j)
                        store(y, (r0 + r) * n + o + j, o + j, d[j][r], scales, bias, params_bf16, y_bf16);
            }
        }
        free(widened);
        return 8;
    }
#endif
    int64_t blocks = (n + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; ++b) {
        int64_t o = 4 * b;
        for (int64_t r = 0; r < m; ++r) {
            const float *xr = x + r * k;
#ifdef HAS_DOT4
            if (o + 4 <= n) {
                float d[4];
                const int8_t *next = (r == 0 && o + 8 <= n) ? w + (o + 4) * k : NULL;
                dot4_int8_fp32(w + o * k, k, xr, d, next);
                for (int j = 0; j < 4; ++j) store(y, r * n + o + j, o + j, d[j], scales, bias, params_bf16, y_bf16);
                continue;
            }
#endif
            for (int64_t j = o; j < n && j < o + 4; ++j)
                store(y, r * n + j, j, dot_int8_fp32(w + j * k, xr, k), scales, bias, params_bf16, y_bf16);
        }
    }
    free(widened);
#if defined(__AVX2__) && defined(__FMA__)
    return 8;
#else
    return 1;
#endif
}

/* pagedllm's fused CPU kernels for the decode step (bf16 activations).
 *
 * Built at first use with the system C compiler (-O3 -march=native -fopenmp, else
 * -fopenmp-simd) and loaded with ctypes; see build.py. Each kernel replaces several small torch ops whose
 * dispatch cost, not their arithmetic, dominated a batch-1 decode step:
 *
 *   pl_add_rms_norm      residual add + RMSNorm, rounded where torch's ops round
 *   pl_rope_neox         rotate-half rotary of q and k in place, rounded as torch's ops
 *   pl_silu_and_mul      silu(gate) * up
 *   pl_paged_decode      KV cache write of the new tokens + attention of one query per
 *                        row over its blocks, read in place (no gather)
 *   pl_int4_matmul       x @ W^T for a 4-bit grouped W, each weight tile unpacked once
 *                        for a block of 8 rows of x, or for all rows past 8
 *   pl_int8_matmul       the same for an int8 W with row scales, float32 out (LM head)
 *
 * bf16 values travel as uint16_t; arithmetic is float32; float -> bf16 rounds to nearest
 * even, as torch does.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float bf2f(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f2bf(float f) {
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40u); /* NaN */
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

/* exp(x) in float32 to about 2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial
 * for e^r, then 2^n in two factors (so that n = 128 stays finite). Like torch's exp it is
 * +inf above log(FLT_MAX) and NaN for NaN; below -87 it returns e^-87 (no denormals).
 * Plain arithmetic and selects, so loops over it vectorize. */
static inline float exp_f32(float x) {
    float xc = x != x ? 0.0f : x; /* NaN: computed on 0, returned as NaN below */
    xc = xc < -87.0f ? -87.0f : (xc > 88.75f ? 88.75f : xc);
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666666666e-1f + r * (4.1666666667e-2f
              + r * (8.3333333333e-3f + r * 1.3888888889e-3f)))));
    int32_t ni = (int32_t)n, n1 = ni / 2, n2 = ni - n1;
    union { uint32_t u; float f; } s1, s2;
    s1.u = (uint32_t)(n1 + 127) << 23;
    s2.u = (uint32_t)(n2 + 127) << 23;
    float y = p * s1.f * s2.f;
    y = x > 88.72283935546875f ? INFINITY : y;
    return x != x ? x : y;
}

/* exp(x) for x <= 0 (softmax numerators): exp_f32's arithmetic without its range
 * handling, which kept the softmax loop from vectorizing; below -87 it returns e^-87. */
static inline float exp_nonpos_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666666666e-1f + r * (4.1666666667e-2f
              + r * (8.3333333333e-3f + r * 1.3888888889e-3f)))));
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * s.f;
}

/* ceil(log2(x)) for x > 2, else 1. */
static inline int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t b = 0;
    for (uint64_t v = (uint64_t)(x - 1); v; v >>= 1) b++;
    return b;
}

/* sum(v[0..n)) in the order torch's CPU sum reduces a contiguous float row with vectors of
 * `lanes` floats (16 with its AVX512 kernels, 8 with AVX2), so that the result is the same
 * float: the row's whole vectors are taken as rows of four (four vector accumulators), each
 * summed in cascade levels of 2^p vectors (p = max(4, ceil(log2(rows)) / 4)), the leftover
 * vectors go to the first accumulator, the four are added in order; then the leftover
 * scalars, then the lanes, one by one. */
static float torch_order_sum(const float *v, int64_t n, int64_t lanes) {
    enum { ILP = 4, LEVELS = 4, MAX_LANES = 16 };
    float acc[LEVELS][ILP][MAX_LANES];
    memset(acc, 0, sizeof(acc));
    int64_t nvec = n / lanes, nrows = nvec / ILP;
    int64_t power = ceil_log2(nrows) / LEVELS;
    if (power < 4) power = 4;
    int64_t step = (int64_t)1 << power, mask = step - 1;
    int64_t i = 0;
    while (i + step <= nrows) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int64_t k = 0; k < ILP; k++)
                for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * ILP + k) * lanes + l];
        for (int64_t j = 1; j < LEVELS; j++) {
            for (int64_t k = 0; k < ILP; k++)
                for (int64_t l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < nrows; i++)
        for (int64_t k = 0; k < ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * ILP + k) * lanes + l];
    for (int64_t j = 1; j < LEVELS; j++)
        for (int64_t k = 0; k < ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t r = nrows * ILP; r < nvec; r++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += v[r * lanes + l];
    for (int64_t k = 1; k < ILP; k++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t r = nvec * lanes; r < n; r++) total += v[r];
    for (int64_t l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* For each of `rows` rows of width h: y = bf16(x + residual) (when residual is given),
 * out = bf16(y * rsqrt(mean(y^2) + eps) * w) in float32, the sum of squares taken in torch's
 * order for vectors of `lanes` floats: bit for bit what torch's add + F.rms_norm give in
 * bf16. y goes to res_out (when residual is given). Row strides are in elements. */
void pl_add_rms_norm(const uint16_t *x, int64_t x_stride, const uint16_t *residual,
                     int64_t res_stride, const uint16_t *w, uint16_t *out, uint16_t *res_out,
                     int64_t rows, int64_t h, float eps, int64_t lanes) {
    float *y = (float *)malloc(sizeof(float) * (size_t)(2 * h)), *sq = y + h;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * x_stride;
        if (residual) {
            const uint16_t *rr = residual + r * res_stride;
            uint16_t *ro = res_out + r * h;
#pragma omp simd
            for (int64_t i = 0; i < h; i++) {
                uint16_t s = f2bf(bf2f(xr[i]) + bf2f(rr[i]));
                ro[i] = s;
                y[i] = bf2f(s);
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < h; i++) y[i] = bf2f(xr[i]);
        }
#pragma omp simd
        for (int64_t i = 0; i < h; i++) sq[i] = y[i] * y[i];
        float inv = 1.0f / sqrtf(torch_order_sum(sq, h, lanes) / (float)h + eps);
        uint16_t *o = out + r * h;
#pragma omp simd
        for (int64_t i = 0; i < h; i++) o[i] = f2bf(y[i] * inv * bf2f(w[i]));
    }
    free(y);
}

/* Rotate-half rotary embedding in place: `heads` heads of d values per row (q's heads then
 * k's, adjacent), row stride x_stride; cos / sin: [rows, d] bf16 (sin signed: -sin on the
 * first half). x' = bf16(bf16(x * cos) + bf16(swap_halves(x) * sin)). */
void pl_rope_neox(uint16_t *x, int64_t x_stride, const uint16_t *cos, const uint16_t *sin,
                  int64_t rows, int64_t heads, int64_t d) {
    int64_t half = d / 2;
    float *t = (float *)malloc(sizeof(float) * (size_t)d);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * d, *s = sin + r * d;
        for (int64_t hh = 0; hh < heads; hh++) {
            uint16_t *v = x + r * x_stride + hh * d;
            for (int64_t i = 0; i < d; i++) t[i] = bf2f(v[i]);
#pragma omp simd
            for (int64_t i = 0; i < d; i++) {
                float sw = i < half ? t[i + half] : t[i - half];
                float a = bf2f(f2bf(t[i] * bf2f(c[i])));
                float b = bf2f(f2bf(sw * bf2f(s[i])));
                v[i] = f2bf(a + b);
            }
        }
    }
    free(t);
}

/* out[r, i] = bf16(bf16(silu(g)) * u) with g = x[r, i], u = x[r, d + i] (row stride
 * x_stride), silu(g) = g / (1 + exp(-g)) in float32. */
void pl_silu_and_mul(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t rows,
                     int64_t d) {
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = x + r * x_stride, *u = g + d;
        uint16_t *o = out + r * d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) {
            float gv = bf2f(g[i]);
            float sv = bf2f(f2bf(gv / (1.0f + exp_f32(-gv))));
            o[i] = f2bf(sv * bf2f(u[i]));
        }
    }
}

#ifdef __AVX512F__
/* 16 bf16 values widened to float32. */
static inline __m512 load_bf16x16(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

/* sum_i bf16 a[i] * float b[i] for n a multiple of 16. */
static inline float dot_bf16_f32(const uint16_t *restrict a, const float *restrict b,
                                 int64_t n) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        acc = _mm512_fmadd_ps(load_bf16x16(a + i), _mm512_loadu_ps(b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float lanes[16] = {0};
    for (int64_t i0 = 0; i0 < n; i0 += 16)
#pragma omp simd
        for (int64_t i = 0; i < 16; i++) lanes[i] += bf2f(a[i0 + i]) * b[i0 + i];
    float s = 0.0f;
    for (int64_t i = 0; i < 16; i++) s += lanes[i];
    return s;
#endif
}

/* One decode step's attention for `rows` single-token queries.
 *
 * First the new keys / values (k_new, v_new: [rows, hkv, d], row strides k_stride /
 * v_stride; heads contiguous) go to their slots (slot = block * block_size + offset; < 0:
 * skipped) of k_cache / v_cache ([num_blocks, block_size, hkv, d], contiguous). Then each
 * row's query heads (q: [rows, hq, d], row stride q_stride) attend over positions
 * [max(0, len - window), len) of its blocks (block_table row r, stride bt_stride; len =
 * seq_lens[r]; window 0 = all): scores in float32 (times `scale`), softmax in float32, out
 * [rows, hq, d] in bf16. Query head j reads KV head j / (hq / hkv). d must be a multiple of
 * 16 and at most 512 (the caller checks). */
#define PL_MAX_GROUP 16
/* (tokens x KV heads) of a step from which the decode attention runs on all threads */
#define PL_PARALLEL_TOKENS 1024

/* out[i] = bf16(inv * sum_t p[t] * bf16 v[off[t] + i]) for i < d, d a multiple of 16. */
static inline void weighted_sum_bf16(const float *restrict p, const uint16_t *restrict v,
                                     const int64_t *restrict off, int64_t n, int64_t d,
                                     float inv, uint16_t *restrict out) {
#ifdef __AVX512F__
    for (int64_t i0 = 0; i0 < d; i0 += 16) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                         _mm512_setzero_ps()};
        int64_t t = 0;
        for (; t + 4 <= n; t += 4)
            for (int u = 0; u < 4; u++)
                acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(p[t + u]),
                                         load_bf16x16(v + off[t + u] + i0), acc[u]);
        for (; t < n; t++)
            acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), load_bf16x16(v + off[t] + i0), acc[0]);
        acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        float a[16];
        _mm512_storeu_ps(a, _mm512_mul_ps(acc[0], _mm512_set1_ps(inv)));
        for (int64_t i = 0; i < 16; i++) out[i0 + i] = f2bf(a[i]);
    }
#else
    float acc[512];
    for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *restrict vt = v + off[t];
        float pt = p[t];
#pragma omp simd
        for (int64_t i = 0; i < d; i++) acc[i] += pt * bf2f(vt[i]);
    }
    for (int64_t i = 0; i < d; i++) out[i] = f2bf(acc[i] * inv);
#endif
}

/* Softmax numerators of scores[j * n + t] in place; inv[j] = 1 / their sum. */
static void softmax_rows(float *restrict scores, int64_t group, int64_t n, float *inv) {
    for (int64_t j = 0; j < group; j++) {
        float *restrict sj = scores + j * n;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < n; t++) m = sj[t] > m ? sj[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; t++) {
            float e = exp_nonpos_f32(sj[t] - m);
            sj[t] = e;
            sum += e;
        }
        inv[j] = n ? 1.0f / sum : 0.0f;
    }
}

/* One KV head of one row: its `group` query heads q (bf16, contiguous) attend over the
 * tokens at element offsets off[0..n) of k_cache / v_cache (already offset to the head). */
static void decode_head_any(const uint16_t *restrict q, int64_t group, int64_t d,
                            const uint16_t *restrict k_cache,
                            const uint16_t *restrict v_cache, const int64_t *restrict off,
                            int64_t n, float scale, float *restrict scores,
                            uint16_t *restrict out) {
    float qf[PL_MAX_GROUP * 512], inv[PL_MAX_GROUP];
    for (int64_t i = 0; i < group * d; i++) qf[i] = bf2f(q[i]) * scale;
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *restrict kp = k_cache + off[t];
        for (int64_t j = 0; j < group; j++) scores[j * n + t] = dot_bf16_f32(kp, qf + j * d, d);
    }
    softmax_rows(scores, group, n, inv);
    for (int64_t j = 0; j < group; j++)
        weighted_sum_bf16(scores + j * n, v_cache, off, n, d, inv[j], out + j * d);
}

#ifdef __AVX512F__
/* decode_head_any for a group of G query heads known at compile time: each K row and V
 * chunk is loaded once for the whole group, the group's accumulators stay in registers. */
#define PL_DECODE_HEAD(G)                                                                    \
    static void decode_head_##G(const uint16_t *restrict q, int64_t d,                      \
                                const uint16_t *restrict k_cache,                           \
                                const uint16_t *restrict v_cache,                           \
                                const int64_t *restrict off, int64_t n, float scale,        \
                                float *restrict scores, uint16_t *restrict out) {           \
        float qf[G * 512], inv[G];                                                          \
        for (int64_t i = 0; i < G * d; i++) qf[i] = bf2f(q[i]) * scale;                     \
        for (int64_t t = 0; t < n; t++) {                                                   \
            const uint16_t *restrict kp = k_cache + off[t];                                 \
            __m512 acc[G];                                                                  \
            for (int j = 0; j < G; j++) acc[j] = _mm512_setzero_ps();                       \
            for (int64_t i = 0; i < d; i += 16) {                                           \
                __m512 kv = load_bf16x16(kp + i);                                           \
                for (int j = 0; j < G; j++)                                                 \
                    acc[j] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(qf + j * d + i), acc[j]);  \
            }                                                                               \
            for (int j = 0; j < G; j++) scores[j * n + t] = _mm512_reduce_add_ps(acc[j]);   \
        }                                                                                   \
        softmax_rows(scores, G, n, inv);                                                    \
        for (int64_t i = 0; i < d; i += 16) {                                               \
            __m512 acc[G];                                                                  \
            for (int j = 0; j < G; j++) acc[j] = _mm512_setzero_ps();                       \
            for (int64_t t = 0; t < n; t++) {                                               \
                __m512 vv = load_bf16x16(v_cache + off[t] + i);                             \
                for (int j = 0; j < G; j++)                                                 \
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j * n + t]), vv, acc[j]);\
            }                                                                               \
            for (int j = 0; j < G; j++) {                                                   \
                float a[16];                                                                \
                _mm512_storeu_ps(a, _mm512_mul_ps(acc[j], _mm512_set1_ps(inv[j])));         \
                for (int l = 0; l < 16; l++) out[j * d + i + l] = f2bf(a[l]);               \
            }                                                                               \
        }                                                                                   \
    }
PL_DECODE_HEAD(1)
PL_DECODE_HEAD(2)
PL_DECODE_HEAD(3)
PL_DECODE_HEAD(4)
PL_DECODE_HEAD(5)
PL_DECODE_HEAD(6)
PL_DECODE_HEAD(7)
PL_DECODE_HEAD(8)
#endif

static void decode_head(const uint16_t *restrict q, int64_t group, int64_t d,
                        const uint16_t *restrict k_cache, const uint16_t *restrict v_cache,
                        const int64_t *restrict off, int64_t n, float scale,
                        float *restrict scores, uint16_t *restrict out) {
#ifdef __AVX512F__
    switch (group) {
    case 1: decode_head_1(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 2: decode_head_2(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 3: decode_head_3(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 4: decode_head_4(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 5: decode_head_5(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 6: decode_head_6(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 7: decode_head_7(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    case 8: decode_head_8(q, d, k_cache, v_cache, off, n, scale, scores, out); return;
    default: break;
    }
#endif
    decode_head_any(q, group, d, k_cache, v_cache, off, n, scale, scores, out);
}

/* Item `item` (row item / hkv, KV head item % hkv) of pl_paged_decode. */
static void decode_item(int64_t item, const uint16_t *q, int64_t q_stride,
                        const uint16_t *k_cache, const uint16_t *v_cache,
                        const int32_t *seq_lens, const int64_t *off, int64_t max_len,
                        uint16_t *out, int64_t hq, int64_t hkv, int64_t d, float scale,
                        int64_t window, float *scores) {
    int64_t r = item / hkv, h = item % hkv, group = hq / hkv;
    int64_t len = seq_lens[r];
    int64_t start = (window > 0 && len > window) ? len - window : 0;
    decode_head(q + r * q_stride + h * group * d, group, d, k_cache + h * d, v_cache + h * d,
                off + r * max_len, len - start, scale, scores, out + (r * hq + h * group) * d);
}

void pl_paged_decode(const uint16_t *q, int64_t q_stride, const uint16_t *k_new,
                     int64_t k_stride, const uint16_t *v_new, int64_t v_stride,
                     uint16_t *k_cache, uint16_t *v_cache, const int32_t *block_table,
                     int64_t bt_stride, const int32_t *seq_lens, const int64_t *slots,
                     uint16_t *out, int64_t rows, int64_t hq, int64_t hkv, int64_t d,
                     int64_t block_size, float scale, int64_t window) {
    int64_t tok = hkv * d;
    for (int64_t r = 0; r < rows; r++) {
        if (slots[r] < 0) continue;
        memcpy(k_cache + slots[r] * tok, k_new + r * k_stride, sizeof(uint16_t) * (size_t)tok);
        memcpy(v_cache + slots[r] * tok, v_new + r * v_stride, sizeof(uint16_t) * (size_t)tok);
    }
    int64_t group = hq / hkv;
    int64_t max_len = 1, total = 0;
    for (int64_t r = 0; r < rows; r++) {
        max_len = seq_lens[r] > max_len ? seq_lens[r] : max_len;
        total += seq_lens[r];
    }
    /* every row's token offsets first, then (row, KV head) pairs in parallel where the
     * work pays for waking the other threads (OpenMP: torch's own runtime and threads) */
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(rows * max_len));
    for (int64_t r = 0; r < rows; r++) {
        int64_t len = seq_lens[r];
        int64_t start = (window > 0 && len > window) ? len - window : 0;
        const int32_t *bt = block_table + r * bt_stride;
        int64_t *offr = off + r * max_len;
        for (int64_t t = start, b = start / block_size, o = start % block_size; t < len; t++) {
            offr[t - start] = ((int64_t)bt[b] * block_size + o) * tok;
            if (++o == block_size) o = 0, b++;
        }
    }
    if (rows > 1 && total * hkv >= PL_PARALLEL_TOKENS) {
#pragma omp parallel
        {
            float *scores = (float *)malloc(sizeof(float) * (size_t)(group * max_len));
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < rows * hkv; item++)
                decode_item(item, q, q_stride, k_cache, v_cache, seq_lens, off, max_len, out,
                            hq, hkv, d, scale, window, scores);
            free(scores);
        }
    } else { /* no OpenMP region at all: even an inactive one costs half a microsecond */
        float *scores = (float *)malloc(sizeof(float) * (size_t)(group * max_len));
        for (int64_t item = 0; item < rows * hkv; item++)
            decode_item(item, q, q_stride, k_cache, v_cache, seq_lens, off, max_len, out, hq,
                        hkv, d, scale, window, scores);
        free(scores);
    }
    free(off);
}

/* torch_order_sum, exported for the tests. */
float pl_torch_order_sum(const float *v, int64_t n, int64_t lanes) {
    return torch_order_sum(v, n, lanes);
}

/* pl_int4_matmul: y [m, n] (bf16, row stride ys) = x [m, k] (bf16, row stride xs) @ W^T for
 * a 4-bit W in groups of 32 inputs, w = (q - 8) * scale + zero (GGUF Q4_0 / Q4_1 as torch's
 * int4 CPU kernel takes them). Layout (`int4_tiles` in ops.py): 16 output columns per tile,
 *   codes [n / 16][k / 32][16 pairs][16 columns] bytes, q of inputs 2p (low nibble) and
 *   2p + 1 (high) of each column;
 *   sc, zz float32 [n / 16][k / 32][16]: the scale and zero - shift * scale of each
 *   group (shift: pl_int4_zero_shift).
 * Each weight tile is unpacked once for a block of up to 8 rows of x, or once for all
 * of them past 8 rows (torch's kernel unpacks it again for every row): per group acc += sc * sum_j x_j q_j
 * + zz * sum_j x_j, in float32, rounded to bf16 once at the end. n must be a multiple of
 * 16 and k of 32 (the tiles are padded at packing). Parallel over tiles where the work pays
 * for waking the other threads. */
#ifdef __AVX512F__
#define PL_INT4_PARALLEL_MACS (1 << 19)

/* f2bf of 16 floats at once (round to nearest even; NaN stays NaN, as f2bf). */
static inline __m256i f2bf_x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* A tile's input pair p of group g as weight vectors (PL_INT4_W of them; an unpacked tile is
 * groups x 16 pairs of them), and PL_INT4_DOT(MB): their products with MB rows' inputs of
 * that pair, added to part[0..MB). */
#ifdef __AVX512BF16__
/* AVX512-BF16: a code q becomes the bf16 16 + q by bit operations ((q << 3) | 0x4180, exact),
 * two inputs' codes per 32-bit lane, and one vdpbf16ps multiplies them by a broadcast pair of
 * bf16 inputs and adds both products in float32 (16 columns x 2 inputs per instruction).
 * zz then holds zero - 24 * scale: sum_j x_j (16 + q_j) - 16 sum_j x_j = sum_j x_j q_j. */
#define PL_INT4_W 1
static inline void int4_unpack(const uint8_t *c, __m512i *w) {
    const __m512i lo_mask = _mm512_set1_epi32(0x0F), hi_mask = _mm512_set1_epi32(0xF0);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    w[0] = _mm512_or_si512(
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(v, lo_mask), 3),
                        _mm512_slli_epi32(_mm512_and_si512(v, hi_mask), 15)),
        _mm512_set1_epi32(0x41804180));
}
#define PL_INT4_DOT(MB)                                                                      \
    for (int r = 0; r < MB; r++) {                                                           \
        uint32_t pair;                                                                       \
        memcpy(&pair, x + r * xs + g * 32 + 2 * p, sizeof(pair));                            \
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)w[0],                                  \
                                   (__m512bh)_mm512_set1_epi32((int)pair));                  \
    }
#define PL_INT4_ZERO_SHIFT 24.0f
#else
/* Float32 FMAs on the codes converted to float (zz = zero - 8 * scale). */
#define PL_INT4_W 2
static inline void int4_unpack(const uint8_t *c, __m512i *w) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    w[0] = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF))));
    w[1] = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)));
}
#define PL_INT4_DOT(MB)                                                                      \
    for (int r = 0; r < MB; r++) {                                                           \
        const uint16_t *xp = x + r * xs + g * 32 + 2 * p;                                    \
        part[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(w[0]), _mm512_set1_ps(bf2f(xp[0])),   \
                                  part[r]);                                                  \
        part[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(w[1]), _mm512_set1_ps(bf2f(xp[1])),   \
                                  part[r]);                                                  \
    }
#define PL_INT4_ZERO_SHIFT 8.0f
#endif

/* int4_block_MB: out[0..MB) = the 16 columns of one tile for MB rows of x. With `unpacked`
 * NULL each pair is unpacked from the codes here (once for the MB rows); else it is read
 * from `unpacked`, the whole tile unpacked once for all the rows of x (int4_tile). */
#define PL_INT4_BLOCK(MB)                                                                    \
static void int4_block_##MB(const uint16_t *x, int64_t xs, const float *xsum, int64_t groups,\
                            const uint8_t *codes, const __m512i *unpacked, const float *sc, \
                            const float *zz, __m512 *out) {                                 \
    __m512 acc[MB];                                                                          \
    for (int r = 0; r < MB; r++) acc[r] = _mm512_setzero_ps();                              \
    for (int64_t g = 0; g < groups; g++) {                                                   \
        __m512 part[MB];                                                                     \
        for (int r = 0; r < MB; r++) part[r] = _mm512_setzero_ps();                         \
        for (int p = 0; p < 16; p++) {                                                       \
            __m512i own[PL_INT4_W];                                                          \
            const __m512i *w = own;                                                          \
            if (unpacked) w = unpacked + (g * 16 + p) * PL_INT4_W;                           \
            else int4_unpack(codes + g * 256 + 16 * p, own);                                 \
            PL_INT4_DOT(MB)                                                                  \
        }                                                                                    \
        __m512 s = _mm512_loadu_ps(sc + g * 16), z = _mm512_loadu_ps(zz + g * 16);          \
        for (int r = 0; r < MB; r++) {                                                       \
            acc[r] = _mm512_fmadd_ps(s, part[r], acc[r]);                                    \
            acc[r] = _mm512_fmadd_ps(z, _mm512_set1_ps(xsum[r * groups + g]), acc[r]);      \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < MB; r++) out[r] = acc[r];                                            \
}
PL_INT4_BLOCK(1)
PL_INT4_BLOCK(2)
PL_INT4_BLOCK(3)
PL_INT4_BLOCK(4)
PL_INT4_BLOCK(5)
PL_INT4_BLOCK(6)
PL_INT4_BLOCK(7)
PL_INT4_BLOCK(8)

typedef void (*int4_block_fn)(const uint16_t *, int64_t, const float *, int64_t,
                              const uint8_t *, const __m512i *, const float *, const float *,
                              __m512 *);
static const int4_block_fn INT4_BLOCKS[9] = {
    NULL, int4_block_1, int4_block_2, int4_block_3, int4_block_4, int4_block_5, int4_block_6,
    int4_block_7, int4_block_8};

/* One tile's 16 columns for all m rows of x. Past one block of 8 rows the tile is unpacked
 * once into `scratch` (groups x 16 x PL_INT4_W vectors, at most 64 B x k x PL_INT4_W / 2:
 * L1 / L2-sized for the widths of small models) and every block reads it from there. */
static void int4_tile(int64_t t, const uint16_t *x, int64_t xs, const float *xsum, int64_t m,
                      int64_t k, const uint8_t *codes, const float *sc, const float *zz,
                      uint16_t *y, int64_t ys, __m512i *scratch) {
    int64_t groups = k / 32;
    const uint8_t *ct = codes + t * groups * 256;
    const float *st = sc + t * groups * 16, *zt = zz + t * groups * 16;
    const __m512i *unpacked = NULL;
    if (m > 8 && scratch) {
        for (int64_t i = 0; i < groups * 16; i++) int4_unpack(ct + 16 * i, scratch + i * PL_INT4_W);
        unpacked = scratch;
    }
    __m512 out[8];
    for (int64_t r0 = 0; r0 < m; ) {
        int64_t mb = m - r0 < 8 ? m - r0 : 8;
        const uint16_t *xr = x + r0 * xs;
        const float *sr = xsum + r0 * groups;
        INT4_BLOCKS[mb](xr, xs, sr, groups, ct, unpacked, st, zt, out);
        for (int64_t r = 0; r < mb; r++)
            _mm256_storeu_si256((__m256i *)(y + (r0 + r) * ys + t * 16), f2bf_x16(out[r]));
        r0 += mb;
    }
}
#endif

/* The multiple of the scale that zz subtracts from the zero: 24 with AVX512-BF16 (codes as
 * 16 + q), else 8; 0 without AVX-512 (no int4 kernel: the caller keeps torch's). */
float pl_int4_zero_shift(void) {
#ifdef __AVX512F__
    return PL_INT4_ZERO_SHIFT;
#else
    return 0.0f;
#endif
}

/* Returns 0, or -1 where this build has no AVX-512 (the caller keeps torch's kernel). */
int pl_int4_matmul(const uint16_t *x, int64_t xs, const uint8_t *codes, const float *sc,
                   const float *zz, uint16_t *y, int64_t ys, int64_t m, int64_t n, int64_t k) {
#ifdef __AVX512F__
    int64_t groups = k / 32, tiles = n / 16;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(m * groups + 1));
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xg = x + r * xs + g * 32;
            xsum[r * groups + g] = _mm512_reduce_add_ps(
                _mm512_add_ps(load_bf16x16(xg), load_bf16x16(xg + 16)));
        }
    }
    size_t scratch_bytes = sizeof(__m512i) * (size_t)(groups * 16 * PL_INT4_W);
    if (tiles > 1 && m * n * k >= PL_INT4_PARALLEL_MACS) {
#pragma omp parallel
        {
            __m512i *scratch = m > 8 ? (__m512i *)aligned_alloc(64, scratch_bytes) : NULL;
#pragma omp for schedule(static)
            for (int64_t t = 0; t < tiles; t++)
                int4_tile(t, x, xs, xsum, m, k, codes, sc, zz, y, ys, scratch);
            free(scratch);
        }
    } else {
        __m512i *scratch = m > 8 ? (__m512i *)aligned_alloc(64, scratch_bytes) : NULL;
        for (int64_t t = 0; t < tiles; t++)
            int4_tile(t, x, xs, xsum, m, k, codes, sc, zz, y, ys, scratch);
        free(scratch);
    }
    free(xsum);
    return 0;
#else
    (void)x; (void)xs; (void)codes; (void)sc; (void)zz; (void)y; (void)ys; (void)m; (void)n;
    (void)k;
    return -1;
#endif
}

/* pl_int8_matmul: y [m, n] (float32, row stride ys) = x [m, k] (bf16, row stride xs) @ W^T
 * for an int8 W with one scale per output row (the GGUF Q8_0 embedding as a tied LM head).
 * Layout (`int8_tiles` in ops.py): codes int8 [n / 16][k / 2][16 columns][2 inputs], scale
 * float32 [n / 16][16]. An int8 code is exact in bf16, so vdpbf16ps multiplies two inputs
 * per lane exactly and sums in float32; the output stays float32 (logits without bf16's
 * rounding ties). Needs AVX512-BF16, n a multiple of 16 and k even; returns -1 without
 * AVX512-BF16 (the caller keeps torch's kernel). */
#ifdef __AVX512BF16__
#define PL_INT8_BLOCK(MB)                                                                    \
static void int8_block_##MB(const uint16_t *x, int64_t xs, int64_t pairs, const int8_t *codes,\
                            __m512 *out) {                                                  \
    __m512 acc[MB];                                                                          \
    for (int r = 0; r < MB; r++) acc[r] = _mm512_setzero_ps();                              \
    for (int64_t p = 0; p < pairs; p++) {                                                    \
        const int8_t *c = codes + 32 * p;                                                    \
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c))); \
        __m512 hi = _mm512_cvtepi32_ps(                                                      \
            _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 16))));              \
        __m512bh wb = _mm512_cvtne2ps_pbh(hi, lo);                                           \
        for (int r = 0; r < MB; r++) {                                                       \
            uint32_t pair;                                                                   \
            memcpy(&pair, x + r * xs + 2 * p, sizeof(pair));                                 \
            acc[r] = _mm512_dpbf16_ps(acc[r], wb, (__m512bh)_mm512_set1_epi32((int)pair));  \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < MB; r++) out[r] = acc[r];                                            \
}
PL_INT8_BLOCK(1)
PL_INT8_BLOCK(2)
PL_INT8_BLOCK(3)
PL_INT8_BLOCK(4)
PL_INT8_BLOCK(5)
PL_INT8_BLOCK(6)
PL_INT8_BLOCK(7)
PL_INT8_BLOCK(8)

typedef void (*int8_block_fn)(const uint16_t *, int64_t, int64_t, const int8_t *, __m512 *);
static const int8_block_fn INT8_BLOCKS[9] = {
    NULL, int8_block_1, int8_block_2, int8_block_3, int8_block_4, int8_block_5, int8_block_6,
    int8_block_7, int8_block_8};

static void int8_tile(int64_t t, const uint16_t *x, int64_t xs, int64_t m, int64_t k,
                      const int8_t *codes, const float *scale, float *y, int64_t ys) {
    __m512 out[8];
    __m512 s = _mm512_loadu_ps(scale + 16 * t);
    for (int64_t r0 = 0; r0 < m; ) {
        int64_t mb = m - r0 < 8 ? m - r0 : 8;
        INT8_BLOCKS[mb](x + r0 * xs, xs, k / 2, codes + t * 16 * k, out);
        for (int64_t r = 0; r < mb; r++)
            _mm512_storeu_ps(y + (r0 + r) * ys + 16 * t, _mm512_mul_ps(out[r], s));
        r0 += mb;
    }
}
#endif

int pl_int8_matmul(const uint16_t *x, int64_t xs, const int8_t *codes, const float *scale,
                   float *y, int64_t ys, int64_t m, int64_t n, int64_t k) {
#ifdef __AVX512BF16__
    int64_t tiles = n / 16;
    if (m <= 0) return 0;
    if (tiles > 1 && m * n * k >= PL_INT4_PARALLEL_MACS) {
#pragma omp parallel for schedule(static)
        for (int64_t t = 0; t < tiles; t++) int8_tile(t, x, xs, m, k, codes, scale, y, ys);
    } else {
        for (int64_t t = 0; t < tiles; t++) int8_tile(t, x, xs, m, k, codes, scale, y, ys);
    }
    return 0;
#else
    (void)x; (void)xs; (void)codes; (void)scale; (void)y; (void)ys; (void)m; (void)n; (void)k;
    return -1;
#endif
}

/* See fc_decode.h. The packed products and the attention are compiled once per vector path
   (decode_body.h through fc_each_isa.h: AVX-512, AVX2 + FMA, NEON) and run on the path
   fastchar/isa.py chose (fc_isa()); the generic path runs fc_matmul and the baseline attention. The
   bf16 products are AVX512_BF16 intrinsics (vdpbf16ps has no portable spelling). */
#include "fc_decode.h"

#include <math.h>
#include <string.h>

#include "fc_isa.h"
#include "fc_math.h"

/* ifunc-based clones: GCC on x86-64 Linux (macOS has no ifunc; ARM needs none). Not clang: clang 14
   left these functions, declared in fc_decode.h without the attribute, as undefined symbols. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FC_CLONES
#endif

/* y[:M] = x[:M] @ w; y (M, N) with row stride ldy, x (M, K) with row stride ldx, w (K, N) with row
   stride ldw, all row-major (a column slice y[:, j0:j1] = x @ w[:, j0:j1] is y + j0, w + j0, N = j1 - j0). Four
   input channels per pass over an output row; output rows in blocks of four, so each weight
   element loaded feeds four rows. Every output element is computed the same way whatever the
   slice, so splitting the columns across threads changes no value. */
void fc_matmul(float *restrict y, const float *restrict x, ptrdiff_t ldx, const float *restrict w, ptrdiff_t M,
               ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldy, ptrdiff_t ldw) {
    ptrdiff_t K4 = K - K % 4, m = 0, i, j;
    for (; m + 4 <= M; m += 4) {
        float *y0 = y + m * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
        const float *x0 = x + m * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx, *x3 = x2 + ldx;
        for (j = 0; j < N; j++) y0[j] = y1[j] = y2[j] = y3[j] = 0.0f;
        for (i = 0; i < K4; i += 4) {
            const float *w0 = w + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
            float a0 = x0[i], a1 = x0[i + 1], a2 = x0[i + 2], a3 = x0[i + 3];
            float b0 = x1[i], b1 = x1[i + 1], b2 = x1[i + 2], b3 = x1[i + 3];
            float c0 = x2[i], c1 = x2[i + 1], c2 = x2[i + 2], c3 = x2[i + 3];
            float d0 = x3[i], d1 = x3[i + 1], d2 = x3[i + 2], d3 = x3[i + 3];
            for (j = 0; j < N; j++) {
                float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
                y0[j] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
                y1[j] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3;
                y2[j] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3;
                y3[j] += d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3;
            }
        }
        for (; i < K; i++) {
            const float *wi = w + i * ldw;
            float a0 = x0[i], b0 = x1[i], c0 = x2[i], d0 = x3[i];
            for (j = 0; j < N; j++) {
                y0[j] += a0 * wi[j];
                y1[j] += b0 * wi[j];
                y2[j] += c0 * wi[j];
                y3[j] += d0 * wi[j];
            }
        }
    }
    for (; m < M; m++) {
        float *yr = y + m * ldy;
        const float *xr = x + m * ldx;
        for (j = 0; j < N; j++) yr[j] = 0.0f;
        for (i = 0; i < K4; i += 4) {
            const float *w0 = w + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
            float a0 = xr[i], a1 = xr[i + 1], a2 = xr[i + 2], a3 = xr[i + 3];
            for (j = 0; j < N; j++) yr[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
        for (; i < K; i++) {
            const float *wi = w + i * ldw;
            float a0 = xr[i];
            for (j = 0; j < N; j++) yr[j] += a0 * wi[j];
        }
    }
}

ptrdiff_t fc_packed_size(ptrdiff_t K, ptrdiff_t N) { return (N + 15) / 16 * 16 * K; }

void fc_pack16(float *dst, const float *w, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldw) {
    ptrdiff_t p, k, l;
    for (p = 0; p < (N + 15) / 16; p++)
        for (k = 0; k < K; k++)
            for (l = 0; l < 16; l++) dst[(p * K + k) * 16 + l] = p * 16 + l < N ? w[k * ldw + p * 16 + l] : 0.0f;
}

ptrdiff_t fc_packed_size_bf16(ptrdiff_t K, ptrdiff_t N) { return (N + 15) / 16 * 16 * ((K + 1) / 2); }

/* float32 -> bf16 bits, round to nearest even; subnormals to signed zero and NaN stays a quiet NaN,
   as fastchar.backends.reference.round_bf16 and the AVX512_BF16 instructions. */
static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7F800000u) == 0) return (uint16_t)((u & 0x80000000u) >> 16);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)(((uint64_t)u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static uint32_t bf16_pair(const float *v, ptrdiff_t k, ptrdiff_t K, ptrdiff_t stride) {
    uint32_t lo = bf16_bits(v[k * stride]), hi = k + 1 < K ? bf16_bits(v[(k + 1) * stride]) : 0;
    return lo | (hi << 16);
}

void fc_pack16_bf16(uint32_t *dst, const float *w, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldw) {
    ptrdiff_t p, k, l, K2 = (K + 1) / 2;
    for (p = 0; p < (N + 15) / 16; p++)
        for (k = 0; k < K2; k++)
            for (l = 0; l < 16; l++)
                dst[(p * K2 + k) * 16 + l] = p * 16 + l < N ? bf16_pair(w + p * 16 + l, 2 * k, K, ldw) : 0u;
}

#ifdef FC_BUILD_X86
#include <immintrin.h>

#define FC_TBF16 __attribute__((target("avx512f,avx512bf16,fma")))

FC_TBF16 static inline __mmask16 lanes(ptrdiff_t p, ptrdiff_t j0, ptrdiff_t j1) {
    ptrdiff_t lo = j0 > p * 16 ? j0 - p * 16 : 0, hi = j1 < p * 16 + 16 ? j1 - p * 16 : 16;
    return hi <= lo ? 0 : (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

int fc_packed_bf16_ok(void) { return fc_isa_bf16(); }


/* As tile, with bf16 pairs: acc = vdpbf16ps(acc, xw[r, p], w[p, panel]) for p = 0..K2-1; xw rows of K2
   pairs, panels kp2 pairs apart. */
FC_TBF16 static inline __attribute__((always_inline)) void tile_bf16(float *y, ptrdiff_t ldy, const uint32_t *xw,
                                                                     ptrdiff_t K2, const uint32_t *wp, ptrdiff_t kp2,
                                                                     const __mmask16 *mask, int MR, int NP) {
    __m512 acc[8][4];
    ptrdiff_t k;
    int r, q;
    for (r = 0; r < MR; r++)
        for (q = 0; q < NP; q++) acc[r][q] = _mm512_setzero_ps();
    for (k = 0; k < K2; k++) {
        __m512bh w[4];
        for (q = 0; q < NP; q++) w[q] = (__m512bh)_mm512_loadu_si512(wp + (q * kp2 + k) * 16);
        for (r = 0; r < MR; r++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)xw[r * K2 + k]);
            for (q = 0; q < NP; q++) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], a, w[q]);
        }
    }
    for (r = 0; r < MR; r++)
        for (q = 0; q < NP; q++) _mm512_mask_storeu_ps(y + r * ldy + q * 16, mask[q], acc[r][q]);
}

FC_TBF16 static inline __attribute__((always_inline)) void panels_bf16(float *y, const uint32_t *xw,
                                                                       const uint32_t *wp, ptrdiff_t kp2, ptrdiff_t M,
                                                                       ptrdiff_t K2, ptrdiff_t ldy,
                                                                       const __mmask16 *mask, int NP) {
    /* tiles of 8, 4, 3 and 2 rows, never 1 but for M = 1: a 1-row tile's 2 accumulators wait on
       vdpbf16ps (5 rows: 3 + 2 78 % of the peak, 4 + 1 65-74 %; bench_decode_products, Zen 4) */
    for (ptrdiff_t m = 0, r, L; m < M; m += r) {
        L = M - m;
        r = L >= 8 && L != 9 ? 8 : L == 9 || L >= 6 ? 4 : L == 5 ? 3 : L;
        if (r == 8) tile_bf16(y + m * ldy, ldy, xw + m * K2, K2, wp, kp2, mask, 8, NP);
        else if (r == 4) tile_bf16(y + m * ldy, ldy, xw + m * K2, K2, wp, kp2, mask, 4, NP);
        else if (r == 3) tile_bf16(y + m * ldy, ldy, xw + m * K2, K2, wp, kp2, mask, 3, NP);
        else if (r == 2) tile_bf16(y + m * ldy, ldy, xw + m * K2, K2, wp, kp2, mask, 2, NP);
        else tile_bf16(y + m * ldy, ldy, xw + m * K2, K2, wp, kp2, mask, 1, NP);
    }
}

/* xw (K2,) = x (K,) as bf16 pairs, 32 floats at a time: vcvtne2ps2bf16 rounds as bf16_bits does, and
   its 32 halves in order are the pairs (x[2i], x[2i+1]), low half first. */
FC_TBF16 static void to_pairs(uint32_t *xw, const float *x, ptrdiff_t K) {
    ptrdiff_t k, n;
    for (k = 0; k < K; k += 32) {
        n = K - k < 32 ? K - k : 32;
        __mmask16 lo = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u);
        __mmask16 hi = n <= 16 ? 0 : n >= 32 ? 0xFFFF : (__mmask16)((1u << (n - 16)) - 1u);
        __m512bh h = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, x + k + 16), _mm512_maskz_loadu_ps(lo, x + k));
        _mm512_mask_storeu_epi32(xw + k / 2, (__mmask16)((1u << ((n + 1) / 2)) - 1u), (__m512i)h);
    }
}

FC_TBF16 void fc_matmul_packed_bf16(float *y, const float *x, ptrdiff_t ldx, const uint32_t *wp, ptrdiff_t M,
                                    ptrdiff_t K, ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1,
                                    uint32_t *xw) {
    ptrdiff_t p, p1 = (j1 + 15) / 16, q, m, kp2 = (K + 1) / 2, K2 = (k1 - k0 + 1) / 2;
    __mmask16 mask[4];
    for (m = 0; m < M; m++) to_pairs(xw + m * K2, x + m * ldx + k0, k1 - k0);
    int np = M < 2 ? 4 : 2; /* one row: four panels in flight; more: tiles of two panels */
    for (p = j0 / 16; p < p1; p += np) {
        int n = p1 - p < np ? (int)(p1 - p) : np;
        for (q = 0; q < n; q++) mask[q] = lanes(p + q, j0, j1);
        float *yp = y + p * 16;
        const uint32_t *w = wp + (p * kp2 + k0 / 2) * 16;
        if (n == 4) panels_bf16(yp, xw, w, kp2, M, K2, ldy, mask, 4);
        else if (n == 3) panels_bf16(yp, xw, w, kp2, M, K2, ldy, mask, 3);
        else if (n == 2) panels_bf16(yp, xw, w, kp2, M, K2, ldy, mask, 2);
        else panels_bf16(yp, xw, w, kp2, M, K2, ldy, mask, 1);
    }
}
#else
int fc_packed_bf16_ok(void) { return 0; }
void fc_matmul_packed_bf16(float *y, const float *x, ptrdiff_t ldx, const uint32_t *wp, ptrdiff_t M, ptrdiff_t K,
                           ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1, uint32_t *xw) {
    (void)y, (void)x, (void)ldx, (void)wp, (void)M, (void)K, (void)k0, (void)k1, (void)ldy, (void)j0, (void)j1, (void)xw;
}
#endif

/* The decode attention (decode_attention_body.h) once for the generic path; the vector paths'
   copies come with their products below. */
#define FC_N(name) name##_generic
#include "decode_attention_body.h"
#undef FC_N

#if defined(FC_BUILD_X86) || defined(FC_BUILD_NEON)
#define FC_BODY "decode_body.h"
#include "fc_each_isa.h"
#endif

#ifdef FC_BUILD_X86
/* bf16 caches (see fc_decode.h): AVX512_BF16 intrinsics beside the avx512 pass's vexp. */
#define FC_TKV __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,avx512bf16")))
typedef uint32_t fc_word __attribute__((may_alias)); /* a pair of bf16 in a cache or the scores */

int fc_kv16_ok(ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head) {
    return fc_isa_bf16() && n_head > 0 && C % n_head == 0 && (C / n_head) % 16 == 0 && C / n_head <= 256 && S % 2 == 0;
}

FC_TKV static inline __mmask16 first(ptrdiff_t n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1u); }

/* Heads h0..h1-1 of one row's key and value (row (3C,): q, k, v) into slot `slot` of bf16 caches. */
FC_TKV static void append16(uint16_t *kt, uint16_t *vt, const float *row, ptrdiff_t C, ptrdiff_t S, ptrdiff_t HS,
                            ptrdiff_t h0, ptrdiff_t h1, ptrdiff_t slot) {
    fc_word *kp = (fc_word *)kt;
    uint32_t pairs[8];
    for (ptrdiff_t c = h0 * HS; c < h1 * HS; c += 16) {
        _mm256_storeu_si256((__m256i *)pairs, (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + C + c)));
        for (int i = 0; i < 8; i++) kp[(c / 2 + i) * S + slot] = pairs[i];
        /* the value's 16 channels: every other half of 32 (the slot's side of the pair of positions) */
        __m512i v = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + 2 * C + c)));
        ptrdiff_t h = c / HS, j = c % HS;
        uint16_t *vrow = vt + (h * S + slot - slot % 2) * HS + 2 * j;
        if (slot % 2) _mm512_mask_storeu_epi16(vrow, 0xAAAAAAAAu, _mm512_slli_epi32(v, 16));
        else _mm512_mask_storeu_epi16(vrow, 0x55555555u, v);
    }
}

/* One row's attention (q: the row's q, n cache rows) over bf16 caches, heads h0..h1-1, into out (C,).
   Scores: q * scale rounded to bf16 pairs of channels, one vdpbf16ps per pair and 16 positions, four
   chains of 16 positions; softmax in float32 (vexp); the weights rounded to bf16 pairs of positions
   (written over the scores already read), then one vdpbf16ps per pair of positions and 16 channels,
   four chains (pairs mod 4), added ((0 + 1) + (2 + 3)) and divided by the float32 sum of the
   weights. An odd n's last pair masks its partner slot's value to 0 (whatever that slot holds).
   Every value depends on the row's own data and n only. */
FC_TKV static void attend16(float *out, const float *q, const uint16_t *kt, const uint16_t *vt, ptrdiff_t n,
                            ptrdiff_t S, ptrdiff_t HS, ptrdiff_t h0, ptrdiff_t h1, float *scores,
                            const uint16_t *k_next, const uint16_t *v_next) {
    ptrdiff_t H2 = HS / 2, n2 = n / 2, t;
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)HS));
    uint32_t qp[128];
    const fc_word *pw = (const fc_word *)scores;
    for (ptrdiff_t h = h0; h < h1; h++) {
        const uint16_t *kh = kt + h * HS * S, *vh = vt + h * S * HS;
        /* the next head's blocks (this row's, else the caller's next), line by line as in attention_v */
        const uint16_t *kp = h + 1 < h1 ? kh + HS * S : k_next ? k_next : kh;
        const uint16_t *vp = h + 1 < h1 ? vh + S * HS : v_next ? v_next : vh;
        for (ptrdiff_t p = 0; p < H2; p += 8)
            _mm256_storeu_si256((__m256i *)(qp + p),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + h * HS + 2 * p), scale)));
        for (t = 0; t + 64 <= n; t += 64) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (ptrdiff_t p = 0; p < H2; p++) {
                const uint16_t *kr = kh + (p * S + t) * 2;
                __m512bh qc = (__m512bh)_mm512_set1_epi32((int)qp[p]);
                for (int l = 0; l < 128; l += 32) _mm_prefetch((const char *)(kp + (p * S + t) * 2 + l), _MM_HINT_T0);
                a0 = _mm512_dpbf16_ps(a0, qc, (__m512bh)_mm512_loadu_si512(kr));
                a1 = _mm512_dpbf16_ps(a1, qc, (__m512bh)_mm512_loadu_si512(kr + 32));
                a2 = _mm512_dpbf16_ps(a2, qc, (__m512bh)_mm512_loadu_si512(kr + 64));
                a3 = _mm512_dpbf16_ps(a3, qc, (__m512bh)_mm512_loadu_si512(kr + 96));
            }
            _mm512_storeu_ps(scores + t, a0);
            _mm512_storeu_ps(scores + t + 16, a1);
            _mm512_storeu_ps(scores + t + 32, a2);
            _mm512_storeu_ps(scores + t + 48, a3);
        }
        for (; t < n; t += 16) {
            __mmask16 m = first(n - t);
            __m512 a0 = _mm512_setzero_ps();
            for (ptrdiff_t p = 0; p < H2; p++)
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_set1_epi32((int)qp[p]),
                                      (__m512bh)_mm512_maskz_loadu_epi32(m, kh + (p * S + t) * 2));
            _mm512_mask_storeu_ps(scores + t, m, a0);
        }
        __m512 vm = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (t = 0; t < n; t += 16) {
            __mmask16 m = first(n - t);
            vm = _mm512_mask_max_ps(vm, m, vm, _mm512_maskz_loadu_ps(m, scores + t));
        }
        __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
        /* bf16 weight t lands on the scores' bytes 2t.., read already; an odd n's partner gets a 0 */
        for (t = 0; t < n; t += 16) {
            __mmask16 m = first(n - t);
            __m512 s = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), mx);
            __m512 e = _mm512_maskz_mov_ps(m, (__m512)vexp_avx512((vf_avx512)s));
            sum = _mm512_add_ps(sum, e);
            _mm256_mask_storeu_epi16((uint16_t *)scores + t, first((n - t + 1) & ~(ptrdiff_t)1),
                                     (__m256i)_mm512_cvtneps_pbh(e));
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (ptrdiff_t j = 0; j < HS; j += 16) {
            const uint16_t *vc = vh + 2 * j;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            ptrdiff_t u = 0;
#define FC_PV(acc, i) acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)pw[i]), \
                                             (__m512bh)_mm512_loadu_si512(vc + (i) * HS * 2))
            for (; u + 4 <= n2; u += 4) {
                if (j == 0) /* one line a pair of positions: all of it at HS = 16 */
                    for (int w = 0; w < 4; w++) _mm_prefetch((const char *)(vp + (u + w) * HS * 2), _MM_HINT_T0);
                FC_PV(a0, u);
                FC_PV(a1, u + 1);
                FC_PV(a2, u + 2);
                FC_PV(a3, u + 3);
            }
            for (; u < n2; u++) FC_PV(a0, u);
#undef FC_PV
            if (n % 2)
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_set1_epi32((int)pw[n2]),
                                      (__m512bh)_mm512_and_si512(_mm512_loadu_si512(vc + n2 * HS * 2),
                                                                 _mm512_set1_epi32(0xFFFF)));
            __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            _mm512_storeu_ps(out + h * HS + j, _mm512_mul_ps(a, inv));
        }
    }
}
#else
int fc_kv16_ok(ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head) { return (void)C, (void)S, (void)n_head, 0; }
static void append16(uint16_t *kt, uint16_t *vt, const float *row, ptrdiff_t C, ptrdiff_t S, ptrdiff_t HS,
                     ptrdiff_t h0, ptrdiff_t h1, ptrdiff_t slot) {
    (void)kt, (void)vt, (void)row, (void)C, (void)S, (void)HS, (void)h0, (void)h1, (void)slot;
}
static void attend16(float *out, const float *q, const uint16_t *kt, const uint16_t *vt, ptrdiff_t n, ptrdiff_t S,
                     ptrdiff_t HS, ptrdiff_t h0, ptrdiff_t h1, float *scores, const uint16_t *k_next,
                     const uint16_t *v_next) {
    (void)out, (void)q, (void)kt, (void)vt, (void)n, (void)S, (void)HS, (void)h0, (void)h1, (void)scores;
    (void)k_next, (void)v_next;
}
#endif

void fc_kv_append(void *kt, void *vt, const float *row, ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0,
                  ptrdiff_t h1, ptrdiff_t slot, int kv16) {
    ptrdiff_t HS = C / n_head, j, h;
    if (kv16) {
        append16(kt, vt, row, C, S, HS, h0, h1, slot);
        return;
    }
    for (j = h0 * HS; j < h1 * HS; j++) ((float *)kt)[j * S + slot] = row[C + j];
    for (h = h0; h < h1; h++) memcpy((float *)vt + (h * S + slot) * HS, row + 2 * C + h * HS, HS * sizeof(float));
}

/* fc_attention, asking for k_next and v_next (the blocks the caller runs next; NULL: none) on the
   vector paths as it goes. */
static void attention_next(float *restrict out, const float *restrict qkv, const void *kt, const void *vt,
                           ptrdiff_t n0, ptrdiff_t M, ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0,
                           ptrdiff_t h1, float *restrict scores, const void *k_next, const void *v_next, int kv16) {
    if (kv16) {
        for (ptrdiff_t m = 0; m < M; m++)
            attend16(out + m * C, qkv + m * 3 * C, kt, vt, n0 + m + 1 < S ? n0 + m + 1 : S, S, C / n_head, h0, h1,
                     scores, m + 1 < M ? NULL : k_next, m + 1 < M ? NULL : v_next);
        return;
    }
    switch (fc_isa()) {
#ifdef FC_BUILD_X86
    case FC_ISA_AVX512:
        attention_any_avx512(out, qkv, kt, vt, n0, M, C, S, n_head, h0, h1, scores, k_next, v_next);
        return;
    case FC_ISA_AVX2:
        attention_any_avx2(out, qkv, kt, vt, n0, M, C, S, n_head, h0, h1, scores, k_next, v_next);
        return;
#endif
#ifdef FC_BUILD_NEON
    case FC_ISA_NEON:
        attention_any_neon(out, qkv, kt, vt, n0, M, C, S, n_head, h0, h1, scores, k_next, v_next);
        return;
#endif
    default: (void)k_next, (void)v_next; attention_generic(out, qkv, kt, vt, n0, M, C, S, n_head, h0, h1, scores);
    }
}

void fc_attention(float *out, const float *qkv, const void *kt, const void *vt, ptrdiff_t n0, ptrdiff_t M,
                  ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *scores, int kv16) {
    attention_next(out, qkv, kt, vt, n0, M, C, S, n_head, h0, h1, scores, NULL, NULL, kv16);
}

void fc_attention_rows(float *out, const float *qkv, void *kall, void *vall, const int64_t *stream,
                       const int64_t *slot, const int64_t *n, ptrdiff_t L, ptrdiff_t layer, ptrdiff_t M, ptrdiff_t C,
                       ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *scores, int kv16) {
    ptrdiff_t HS = C / n_head, es = kv16 ? 2 : 4, m;
    char *ks = kall, *vs = vall;
    for (m = 0; m < M; m++) {
        char *kc = ks + (stream[m] * L + layer) * C * S * es, *vc = vs + (stream[m] * L + layer) * C * S * es;
        const char *k_next = NULL, *v_next = NULL;
        const float *row = qkv + m * 3 * C;
        if (m + 1 < M) {
            k_next = ks + ((stream[m + 1] * L + layer) * C * S + h0 * HS * S) * es;
            v_next = vs + ((stream[m + 1] * L + layer) * C * S + h0 * S * HS) * es;
        }
        fc_kv_append(kc, vc, row, C, S, n_head, h0, h1, slot[m], kv16);
        attention_next(out + m * C, row, kc, vc, n[m] - 1, 1, C, S, n_head, h0, h1, scores, k_next, v_next, kv16);
    }
}

int fc_packed_ok(void) { return fc_isa() != FC_ISA_GENERIC; }

int fc_decode_tile_rows(void) {
    switch (fc_isa()) {
    case FC_ISA_AVX512: return 8;
    case FC_ISA_AVX2: return 6;
    case FC_ISA_NEON: return 4;
    default: return 1;
    }
}

void fc_matmul_packed(float *y, const float *x, ptrdiff_t ldx, const float *wp, ptrdiff_t M, ptrdiff_t K, ptrdiff_t k0,
                      ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1) {
    switch (fc_isa()) {
#ifdef FC_BUILD_X86
    case FC_ISA_AVX512: matmul_packed_avx512(y, x, ldx, wp, M, K, k0, k1, ldy, j0, j1); return;
    case FC_ISA_AVX2: matmul_packed_avx2(y, x, ldx, wp, M, K, k0, k1, ldy, j0, j1); return;
#endif
#ifdef FC_BUILD_NEON
    case FC_ISA_NEON: matmul_packed_neon(y, x, ldx, wp, M, K, k0, k1, ldy, j0, j1); return;
#endif
    default: (void)y, (void)x, (void)ldx, (void)wp, (void)M, (void)K, (void)k0, (void)k1, (void)ldy, (void)j0, (void)j1;
    }
}

/* cos, sin rows (M, half) of positions pos0..pos0+M-1: angle p * inv_freq[i] in float64 (as
   fastchar.graph.rope_tables), rounded to float32. */
void fc_rope_tables(float *cos_rows, float *sin_rows, const double *inv_freq, ptrdiff_t half, int64_t pos0,
                    ptrdiff_t M) {
    ptrdiff_t m, i;
    for (m = 0; m < M; m++)
        for (i = 0; i < half; i++) {
            double angle = (double)(pos0 + m) * inv_freq[i];
            cos_rows[m * half + i] = (float)cos(angle);
            sin_rows[m * half + i] = (float)sin(angle);
        }
}

/* Rotate q and k of heads h0..h1-1 in place (rope_forward of the reference): pair i of a head at
   row m, (a, b) = (x[i], x[half + i]) -> (a cos - b sin, a sin + b cos). qkv (M, 3C). */
void fc_rope_heads(float *qkv, const float *cos_rows, const float *sin_rows, ptrdiff_t M, ptrdiff_t C,
                   ptrdiff_t half, ptrdiff_t h0, ptrdiff_t h1) {
    ptrdiff_t m, h, part, i;
    for (m = 0; m < M; m++)
        for (part = 0; part < 2; part++)
            for (h = h0; h < h1; h++) {
                float *x = qkv + m * 3 * C + part * C + h * 2 * half;
                const float *c = cos_rows + m * half, *s = sin_rows + m * half;
                for (i = 0; i < half; i++) {
                    float a = x[i], b = x[half + i];
                    x[i] = a * c[i] - b * s[i];
                    x[half + i] = a * s[i] + b * c[i];
                }
            }
}

/* The sum of v[0..n-1] * w[0..n-1] in eight interleaved partial sums, added in a fixed order: the
   compiler vectorises it (a single running sum is a chain it may not reorder). */
static inline float dot8(const float *v, const float *w, ptrdiff_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    ptrdiff_t k, i;
    for (k = 0; k + 8 <= n; k += 8)
        for (i = 0; i < 8; i++) acc[i] += v[k + i] * w[k + i];
    for (; k < n; k++) acc[0] += v[k] * w[k];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* out[m] = x[m] / sqrt(mean(x[m]**2) + eps) * g. out, x (M, C); g (C,). */
void fc_rmsnorm(float *out, const float *x, const float *g, ptrdiff_t M, ptrdiff_t C, float eps) {
    ptrdiff_t m, c;
    for (m = 0; m < M; m++) {
        float ss = dot8(x + m * C, x + m * C, C), s;
        s = 1.0f / sqrtf(ss / (float)C + eps);
        for (c = 0; c < C; c++) out[m * C + c] = x[m * C + c] * s * g[c];
    }
}

/* out[m] = (x[m] - mean) / sqrt(var + eps) * g, biased variance, no bias (layernorm_forward of the
   reference). out, x (M, C); g (C,). */
void fc_layernorm(float *out, const float *x, const float *g, ptrdiff_t M, ptrdiff_t C, float eps) {
    ptrdiff_t m, c;
    for (m = 0; m < M; m++) {
        float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, ss[8] = {0, 0, 0, 0, 0, 0, 0, 0}, mean, r, d;
        const float *xm = x + m * C;
        ptrdiff_t i;
        /* eight interleaved partial sums, as dot8 (the loops vectorise) */
        for (c = 0; c + 8 <= C; c += 8)
            for (i = 0; i < 8; i++) s[i] += xm[c + i];
        for (; c < C; c++) s[0] += xm[c];
        mean = (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]))) / (float)C;
        for (c = 0; c + 8 <= C; c += 8)
            for (i = 0; i < 8; i++) {
                d = xm[c + i] - mean;
                ss[i] += d * d;
            }
        for (; c < C; c++) {
            d = xm[c] - mean;
            ss[0] += d * d;
        }
        r = 1.0f / sqrtf((((ss[0] + ss[4]) + (ss[1] + ss[5])) + ((ss[2] + ss[6]) + (ss[3] + ss[7]))) / (float)C + eps);
        for (c = 0; c < C; c++) out[m * C + c] = (x[m * C + c] - mean) * r * g[c];
    }
}

/* y[:M, j] = x[:M] . w[j] for j < N: the product with weights stored [out, in] (a tied lm_head
   reading wte). y (M, N) row stride ldy; x (M, K); w (N, K). */
void fc_matmul_t(float *y, const float *x, const float *w, ptrdiff_t M, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldy) {
    ptrdiff_t m, j, k;
    for (m = 0; m < M; m++)
        for (j = 0; j < N; j++) {
            const float *xr = x + m * K, *wr = w + j * K;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a;
            for (k = 0; k + 8 <= K; k += 8)
                for (int i = 0; i < 8; i++) acc[i] += xr[k + i] * wr[k + i];
            a = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (; k < K; k++) a += xr[k] * wr[k];
            y[m * ldy + j] = a;
        }
}

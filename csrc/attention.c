/* Causal softmax attention for one (batch, head) pair at a time, AVX-512F. See attention.h.
 *
 * Forward, per head: K is transposed once into kt (HS, Tp) scratch (Tp = T rounded up to 16,
 * zero-padded) so that 16 scores of one query row are HS broadcast-FMAs; the row's softmax runs
 * on vectors (vectorised exp, below); out[t] = sum_t2 att[t, t2] v[t2] keeps HS/16 accumulators.
 * Backward, per head: V is transposed the same way for dP = dy v^T; each row then gets the
 * softmax backward dS = att * (dP - sum(att * dP)) * scale (stored in datt) and dq[t] += dS k;
 * a second pass over key rows t2 accumulates dk[t2] += sum_t dS[t, t2] q[t] and
 * dv[t2] += sum_t att[t, t2] dy[t] (t >= t2), each head's dq/dk/dv columns owned by one thread.
 *
 * exp: x clamped to [-104, 88], x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, two constants),
 * e^r by a degree-6 Taylor/Horner polynomial (error < 2 ulp on that interval), times 2^n by
 * vscalefps (which underflows to 0 cleanly). Masked (future) lanes are set to 0 explicitly.
 */
#include "attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "gemm_bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FC_GEMM_NO_X86)
#define FC_ATT_X86 1
#include <immintrin.h>

#define FC_T_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma")))
#define FC_AINLINE static inline __attribute__((always_inline))

static inline __mmask16 att_lanes(long n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

FC_T_AVX512 FC_AINLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Per-thread scratch: two (HS, Tp) transposes or rows; grown on demand, never freed. */
static __thread float *att_ws = NULL;
static __thread size_t att_ws_n = 0;

static float *att_scratch(size_t n) {
    if (n > att_ws_n) {
        free(att_ws);
        att_ws = (float *)aligned_alloc(64, ((n * sizeof(float)) + 63) & ~(size_t)63);
        att_ws_n = att_ws ? n : 0;
    }
    return att_ws;
}

/* xt[d*Tp + t2] = x[t2*ld + d] for t2 < T, zero for T <= t2 < Tp. */
static void transpose_head(float *xt, const float *x, long ld, long T, long Tp, long HS) {
    for (long d = 0; d < HS; ++d) {
        for (long t2 = 0; t2 < T; ++t2) xt[d * Tp + t2] = x[t2 * ld + d];
        for (long t2 = T; t2 < Tp; ++t2) xt[d * Tp + t2] = 0.0f;
    }
}

/* s[0 .. 16*nv) = scale * sum_d x[d] * xt[d, 0 .. 16*nv); lanes >= n set to `fill`.
 * Four 16-key blocks per pass share each broadcast and give four independent FMA chains. */
FC_T_AVX512 FC_AINLINE void row_times_t(float *s, const float *x, const float *xt, long Tp, long n, long HS,
                                         float scale, float fill) {
    long nv = (n + 15) / 16;
    const __m512 f = _mm512_set1_ps(fill), sc = _mm512_set1_ps(scale);
    for (long j = 0; j < nv; j += 4) {
        int nb = (int)(nv - j < 4 ? nv - j : 4);
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        const float *col = xt + 16 * j;
        for (long d = 0; d < HS; ++d) {
            __m512 xd = _mm512_set1_ps(x[d]);
            for (int u = 0; u < 4; ++u)
                if (u < nb) acc[u] = _mm512_fmadd_ps(xd, _mm512_loadu_ps(col + d * Tp + 16 * u), acc[u]);
        }
        for (int u = 0; u < nb; ++u)
            _mm512_storeu_ps(s + 16 * (j + u), _mm512_mask_mul_ps(f, att_lanes(n - 16 * (j + u)), acc[u], sc));
    }
}

/* o[0..16*NC) (+)= sum_{t2 < n} w[t2] * rows[t2*ld .. +16*NC), keys split over 4 independent
 * accumulator sets (one FMA chain would wait on its own latency at HS = 16). */
#define DEF_WEIGHTED(NC)                                                                               \
    FC_T_AVX512 static void weighted_rows_##NC(float *o, int accumulate, const float *w, const float *rows, \
                                                long ld, long n) {                                     \
        __m512 acc[4][NC];                                                                             \
        for (int u = 0; u < 4; ++u)                                                                    \
            for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_setzero_ps();                              \
        long t2 = 0;                                                                                   \
        for (; t2 + 4 <= n; t2 += 4)                                                                   \
            for (int u = 0; u < 4; ++u) {                                                              \
                __m512 wb = _mm512_set1_ps(w[t2 + u]);                                                 \
                for (int c = 0; c < NC; ++c)                                                           \
                    acc[u][c] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(rows + (t2 + u) * ld + 16 * c), acc[u][c]); \
            }                                                                                          \
        for (; t2 < n; ++t2) {                                                                         \
            __m512 wb = _mm512_set1_ps(w[t2]);                                                         \
            for (int c = 0; c < NC; ++c) acc[0][c] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(rows + t2 * ld + 16 * c), acc[0][c]); \
        }                                                                                              \
        for (int c = 0; c < NC; ++c) {                                                                 \
            __m512 t = _mm512_add_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_add_ps(acc[2][c], acc[3][c])); \
            if (accumulate) t = _mm512_add_ps(t, _mm512_loadu_ps(o + 16 * c));                          \
            _mm512_storeu_ps(o + 16 * c, t);                                                           \
        }                                                                                              \
    }
DEF_WEIGHTED(1)
DEF_WEIGHTED(2)
DEF_WEIGHTED(3)
DEF_WEIGHTED(4)

/* o[0..HS) += sum_{t0 <= t < T} w[t*ldw] * rows[t*ld ..]: a column of w against rows, 4 chains. */
#define DEF_WEIGHTED_COL(NC)                                                                           \
    FC_T_AVX512 static void weighted_col_##NC(float *o, const float *w, long ldw, const float *rows, long ld, \
                                               long t0, long T) {                                      \
        __m512 acc[4][NC];                                                                             \
        for (int u = 0; u < 4; ++u)                                                                    \
            for (int c = 0; c < NC; ++c) acc[u][c] = _mm512_setzero_ps();                              \
        long t = t0;                                                                                   \
        for (; t + 4 <= T; t += 4)                                                                     \
            for (int u = 0; u < 4; ++u) {                                                              \
                __m512 wb = _mm512_set1_ps(w[(t + u) * ldw]);                                          \
                for (int c = 0; c < NC; ++c)                                                           \
                    acc[u][c] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(rows + (t + u) * ld + 16 * c), acc[u][c]); \
            }                                                                                          \
        for (; t < T; ++t) {                                                                           \
            __m512 wb = _mm512_set1_ps(w[t * ldw]);                                                    \
            for (int c = 0; c < NC; ++c) acc[0][c] = _mm512_fmadd_ps(wb, _mm512_loadu_ps(rows + t * ld + 16 * c), acc[0][c]); \
        }                                                                                              \
        for (int c = 0; c < NC; ++c) {                                                                 \
            __m512 s4 = _mm512_add_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_add_ps(acc[2][c], acc[3][c])); \
            _mm512_storeu_ps(o + 16 * c, _mm512_add_ps(_mm512_loadu_ps(o + 16 * c), s4));             \
        }                                                                                              \
    }
DEF_WEIGHTED_COL(1)
DEF_WEIGHTED_COL(2)
DEF_WEIGHTED_COL(3)
DEF_WEIGHTED_COL(4)

typedef void (*weighted_fn)(float *, int, const float *, const float *, long, long);
typedef void (*weighted_col_fn)(float *, const float *, long, const float *, long, long, long);
static const weighted_fn WEIGHTED[5] = {NULL, weighted_rows_1, weighted_rows_2, weighted_rows_3, weighted_rows_4};
static const weighted_col_fn WEIGHTED_COL[5] = {NULL, weighted_col_1, weighted_col_2, weighted_col_3, weighted_col_4};

/* Three passes over the rows of one head (scores, softmax, weighted values) instead of one pass
 * doing all three per row: the rows of a pass are independent, so the CPU overlaps one row's
 * reductions (max, sum: latency chains) with the next row's work. s holds T x Tp scores. */
FC_T_AVX512 static void forward_head(float *out, float *att, const float *qkv, long T, long C, long HS, float *ws) {
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *kt = ws, *S = ws + HS * Tp;
    weighted_fn wrows = WEIGHTED[HS / 16];
    transpose_head(kt, qkv + C, C3, T, Tp, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    for (long t = 0; t < T; ++t) row_times_t(S + t * Tp, qkv + t * C3, kt, Tp, t + 1, HS, scale, -INFINITY);
    for (long t = 0; t < T; ++t) {
        long n = t + 1, nv = (n + 15) / 16;
        float *s = S + t * Tp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (long j = 0; j < nv; ++j) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + 16 * j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (long j = 0; j < nv; ++j) {
            __m512 e = _mm512_maskz_mov_ps(att_lanes(n - 16 * j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * j), m)));
            _mm512_storeu_ps(s + 16 * j, e);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        float *a = att + t * T;
        for (long j = 0; j < nv; ++j) {
            __m512 p = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * j), inv);
            _mm512_storeu_ps(s + 16 * j, p);
            _mm512_mask_storeu_ps(a + 16 * j, att_lanes(T - 16 * j), p);
        }
        if (16 * nv < T) memset(a + 16 * nv, 0, (size_t)(T - 16 * nv) * sizeof(float));
    }
    for (long t = 0; t < T; ++t) wrows(out + t * C, 0, S + t * Tp, qkv + 2 * C, C3, t + 1);
}

/* Passes over the rows as in forward_head: dP = dy v^T for every row, then each row's softmax
 * backward (into datt and S), then dq, then the key rows' dk and dv. S holds T x Tp values. */
FC_T_AVX512 static void backward_head(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att,
                                      long T, long C, long HS, float *ws) {
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *vt = ws, *S = ws + HS * Tp;
    weighted_fn wrows = WEIGHTED[HS / 16];
    weighted_col_fn wcol = WEIGHTED_COL[HS / 16];
    transpose_head(vt, qkv + 2 * C, C3, T, Tp, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    for (long t = 0; t < T; ++t) row_times_t(S + t * Tp, dout + t * C, vt, Tp, t + 1, HS, 1.0f, 0.0f);
    for (long t = 0; t < T; ++t) {
        long n = t + 1, nv = (n + 15) / 16;
        const float *a = att + t * T;
        float *s = S + t * Tp;
        __m512 dot = _mm512_setzero_ps();
        for (long j = 0; j < nv; ++j)
            dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(att_lanes(n - 16 * j), a + 16 * j), _mm512_loadu_ps(s + 16 * j), dot);
        const __m512 rd = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), sc = _mm512_set1_ps(scale);
        float *ds = datt + t * T;
        for (long j = 0; j < nv; ++j) {
            __mmask16 m = att_lanes(n - 16 * j);
            __m512 p = _mm512_maskz_loadu_ps(m, a + 16 * j);
            __m512 g = _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(s + 16 * j), rd)), sc);
            _mm512_storeu_ps(s + 16 * j, g);
            _mm512_mask_storeu_ps(ds + 16 * j, att_lanes(T - 16 * j), g);
        }
        if (16 * nv < T) memset(ds + 16 * nv, 0, (size_t)(T - 16 * nv) * sizeof(float));
    }
    for (long t = 0; t < T; ++t) wrows(dqkv + t * C3, 1, S + t * Tp, qkv + C, C3, t + 1); /* dq[t] += dS[t] k */
    for (long t2 = 0; t2 < T; ++t2) {
        wcol(dqkv + t2 * C3 + C, datt + t2, T, qkv, C3, t2, T);    /* dk[t2] += sum_t dS[t, t2] q[t] */
        wcol(dqkv + t2 * C3 + 2 * C, att + t2, T, dout, C, t2, T); /* dv[t2] += sum_t att[t, t2] dy[t] */
    }
}
#endif /* FC_ATT_X86 */

static int att_check(long B, long T, long C, long NH) {
    if (B < 0 || T < 0 || C <= 0 || NH <= 0 || C % NH != 0) return FC_GEMM_BADARG;
    long HS = C / NH;
    if (HS % 16 != 0 || HS > 64 || !fc_gemm_has_avx512f()) return FC_GEMM_UNSUPPORTED;
    return FC_GEMM_OK;
}

#ifdef FC_ATT_X86
static int att_threads(int nthreads) {
#ifdef _OPENMP
    if (nthreads <= 0) nthreads = omp_get_max_threads();
    if (omp_in_parallel()) nthreads = 1;
    return nthreads < 1 ? 1 : nthreads;
#else
    (void)nthreads;
    return 1;
#endif
}
#endif

int fc_attention_forward(float *out, float *att, const float *qkv, long B, long T, long C, long NH, int nthreads) {
    int rc = att_check(B, T, C, NH);
    if (rc != FC_GEMM_OK) return rc;
#ifdef FC_ATT_X86
    long HS = C / NH, Tp = (T + 15) / 16 * 16;
    int failed = 0;
    nthreads = att_threads(nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : failed)
#endif
    {
        float *ws = att_scratch((size_t)(HS + T) * Tp);
        if (ws == NULL) failed = 1;
#ifdef _OPENMP
/* one batch element (all its heads) per chunk: heads of one row share cache lines of out / dqkv,
 * and two threads writing neighbouring heads made the backward slower on 2 threads than on 1 */
#pragma omp for schedule(dynamic, NH)
#endif
        for (long bh = 0; bh < B * NH; ++bh) {
            long b = bh / NH, h = bh % NH;
            if (ws != NULL)
                forward_head(out + b * T * C + h * HS, att + bh * T * T, qkv + b * T * 3 * C + h * HS, T, C, HS, ws);
        }
    }
    return failed ? FC_GEMM_NOMEM : FC_GEMM_OK;
#else
    (void)out; (void)att; (void)qkv; (void)nthreads;
    return FC_GEMM_UNSUPPORTED;
#endif
}

int fc_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att, long B,
                          long T, long C, long NH, int nthreads) {
    int rc = att_check(B, T, C, NH);
    if (rc != FC_GEMM_OK) return rc;
#ifdef FC_ATT_X86
    long HS = C / NH, Tp = (T + 15) / 16 * 16;
    int failed = 0;
    nthreads = att_threads(nthreads);
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : failed)
#endif
    {
        float *ws = att_scratch((size_t)(HS + T) * Tp);
        if (ws == NULL) failed = 1;
#ifdef _OPENMP
/* one batch element (all its heads) per chunk: heads of one row share cache lines of out / dqkv,
 * and two threads writing neighbouring heads made the backward slower on 2 threads than on 1 */
#pragma omp for schedule(dynamic, NH)
#endif
        for (long bh = 0; bh < B * NH; ++bh) {
            long b = bh / NH, h = bh % NH;
            if (ws != NULL)
                backward_head(dqkv + b * T * 3 * C + h * HS, datt + bh * T * T, dout + b * T * C + h * HS,
                              qkv + b * T * 3 * C + h * HS, att + bh * T * T, T, C, HS, ws);
        }
    }
    return failed ? FC_GEMM_NOMEM : FC_GEMM_OK;
#else
    (void)dqkv; (void)datt; (void)dout; (void)qkv; (void)att; (void)nthreads;
    return FC_GEMM_UNSUPPORTED;
#endif
}

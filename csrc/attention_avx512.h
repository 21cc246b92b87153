/* The AVX-512 attention of csrc/attention.c in hand-written intrinsics, kept beside the portable
   attention_body.h for sequences under 128 keys, where it measured faster on the avx512 path (AMD
   EPYC family 25 model 17, Zen 4, one thread, CPU time, GFLOP/s forward / backward; python -m
   benchmarks.bench_attention --threads 1 --clock cpu; ranges over two runs): base (T = 64) 31-32 / 43
   against the portable form's 21-28 / 39, wide (T = 64) 35-36 / 39-44 against 28-35 / 44-45. From
   128 keys on the portable form (four query rows per register tile) is faster and runs instead:
   long (T = 256, HS = 16) 32 / 44-48 against 25-29 / 32-41, nanoGPT (T = 256, HS = 64) 60-61 / 70-71
   against 37-42 / 49-54.
   Included by attention.c (which defines att_scratch, transpose_head and pack_head); same
   layout, dropout and accumulation contract as attention_body.h. */
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

typedef void (*weighted_fn)(float *, int, const float *, const float *, long, long);
static const weighted_fn WEIGHTED[5] = {NULL, weighted_rows_1, weighted_rows_2, weighted_rows_3, weighted_rows_4};

/* Dropout on the probabilities: for the 16 flat indices i0 .. i0+15 of att, dscale where
 * fc_dropout_hash(i, key) >= thr (csrc/fc_math.h), else 0; the same mask as every backend's. */
FC_T_AVX512 FC_AINLINE __m512 keep_scale(long long i0, const fc_att_dropout *drop) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i h = _mm512_add_epi32(_mm512_set1_epi32((int)(unsigned int)i0), lane);
    h = _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x9E3779B9u)), _mm512_set1_epi32((int)drop->key));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x7FEB352D));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x846CA68Bu));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    __mmask16 kept = _mm512_cmpge_epu32_mask(h, _mm512_set1_epi32((int)drop->thr));
    return _mm512_maskz_mov_ps(kept, _mm512_set1_ps(drop->dscale));
}

/* o[t2*ldo + d] += (overwrite: =) sum_{t >= j0} w[t*ldw + t2] x[t*HS + d] for the key block t2 in [j0, j0 + 16)
 * (lanes past T masked off), d < HS: dK = dS^T Q or dV = P^T dY for 16 keys at once. Rows of w
 * are read whole (one vector per query row) and 16 accumulators hold one 16 x 16 block of the
 * result, transposed back by gathers. w must be zero above the diagonal. */
FC_T_AVX512 static void add_key_block(float *o, long ldo, const float *w, long ldw, const float *x, long j0, long T,
                                      long HS, int overwrite) {
    const __mmask16 lanes = att_lanes(T - j0);
    const __m512i column = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    float block[256] __attribute__((aligned(64)));
    for (long d0 = 0; d0 < HS; d0 += 16) {
        __m512 acc[16];
        for (int d = 0; d < 16; ++d) acc[d] = _mm512_setzero_ps();
        for (long t = j0; t < T; ++t) {
            const __m512 wt = _mm512_maskz_loadu_ps(lanes, w + t * ldw + j0);
            const float *xt = x + t * HS + d0;
            for (int d = 0; d < 16; ++d) acc[d] = _mm512_fmadd_ps(wt, _mm512_set1_ps(xt[d]), acc[d]);
        }
        for (int d = 0; d < 16; ++d) _mm512_store_ps(block + 16 * d, acc[d]);
        for (long k = 0; k < 16 && j0 + k < T; ++k) {
            float *row = o + (j0 + k) * ldo + d0;
            __m512 add = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32((int)k)), block, 4);
            _mm512_storeu_ps(row, overwrite ? add : _mm512_add_ps(_mm512_loadu_ps(row), add));
        }
    }
}

/* Three passes over the rows of one head (scores, softmax, weighted values) instead of one pass
 * doing all three per row: the rows of a pass are independent, so the CPU overlaps one row's
 * reductions (max, sum: latency chains) with the next row's work. ws holds kt (HS x Tp), the
 * packed values (T x HS) and the scores S (T x Tp). With drop, S holds att * mask for the values
 * (att keeps the probabilities before dropout; base: att's flat index of this head's [0, 0]). */
FC_T_AVX512 static void forward_head_i(float *out, float *att, const float *qkv, long T, long C, long HS, float *ws,
                                     const fc_att_dropout *drop, long long base) {
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *kt = ws, *vp = ws + HS * Tp, *S = vp + HS * Tp;
    weighted_fn wrows = WEIGHTED[HS / 16];
    transpose_head(kt, qkv + C, C3, T, Tp, HS);
    pack_head(vp, qkv + 2 * C, C3, T, HS);
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
            _mm512_mask_storeu_ps(a + 16 * j, att_lanes(T - 16 * j), p);
            if (drop) p = _mm512_mul_ps(p, keep_scale(base + t * T + 16 * j, drop));
            _mm512_storeu_ps(s + 16 * j, p);
        }
        if (16 * nv < T) memset(a + 16 * nv, 0, (size_t)(T - 16 * nv) * sizeof(float));
    }
    for (long t = 0; t < T; ++t) wrows(out + t * C, 0, S + t * Tp, vp, HS, t + 1);
}

/* Passes over the rows as in forward_head: dP = dy v^T for every row, then each row's softmax
 * backward (into S; with drop, dP times the mask first), then dq, then dk and dv a block
 * of 16 key rows at a time. ws holds vt (HS x Tp), packed k, q and dy (T x HS each), S (T x Tp). */
FC_T_AVX512 static void backward_head_i(float *dqkv, const float *dout, const float *qkv, const float *att,
                                      long T, long C, long HS, float *ws, const fc_att_dropout *drop, long long base,
                                      int overwrite) {
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *vt = ws, *kp = vt + HS * Tp, *qp = kp + HS * Tp, *dyp = qp + HS * Tp, *S = dyp + HS * Tp;
    weighted_fn wrows = WEIGHTED[HS / 16];
    transpose_head(vt, qkv + 2 * C, C3, T, Tp, HS);
    pack_head(kp, qkv + C, C3, T, HS);
    pack_head(qp, qkv, C3, T, HS);
    pack_head(dyp, dout, C, T, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    for (long t = 0; t < T; ++t) row_times_t(S + t * Tp, dyp + t * HS, vt, Tp, t + 1, HS, 1.0f, 0.0f);
    for (long t = 0; t < T; ++t) {
        long n = t + 1, nv = (n + 15) / 16;
        const float *a = att + t * T;
        float *s = S + t * Tp;
        if (drop)
            for (long j = 0; j < nv; ++j)
                _mm512_storeu_ps(s + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(s + 16 * j), keep_scale(base + t * T + 16 * j, drop)));
        __m512 dot = _mm512_setzero_ps();
        for (long j = 0; j < nv; ++j)
            dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(att_lanes(n - 16 * j), a + 16 * j), _mm512_loadu_ps(s + 16 * j), dot);
        const __m512 rd = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), sc = _mm512_set1_ps(scale);
        for (long j = 0; j < nv; ++j) {
            __m512 p = _mm512_maskz_loadu_ps(att_lanes(n - 16 * j), a + 16 * j);
            _mm512_storeu_ps(s + 16 * j, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(s + 16 * j), rd)), sc));
        }
    }
    for (long t = 0; t < T; ++t) wrows(dqkv + t * C3, !overwrite, S + t * Tp, kp, HS, t + 1); /* dq[t] += dS[t] k */
    for (long j0 = 0; j0 < T; j0 += 16) add_key_block(dqkv + C, C3, S, Tp, qp, j0, T, HS, overwrite); /* dk += dS^T q */
    if (!drop) {
        for (long j0 = 0; j0 < T; j0 += 16)
            add_key_block(dqkv + 2 * C, C3, att, T, dyp, j0, T, HS, overwrite); /* dv += P^T dy */
        return;
    }
    for (long t = 0; t < T; ++t) { /* S = att * mask, the probabilities the values saw */
        long n = t + 1, nv = (n + 15) / 16;
        for (long j = 0; j < nv; ++j)
            _mm512_storeu_ps(S + t * Tp + 16 * j, _mm512_mul_ps(_mm512_maskz_loadu_ps(att_lanes(n - 16 * j), att + t * T + 16 * j),
                                                                keep_scale(base + t * T + 16 * j, drop)));
    }
    for (long j0 = 0; j0 < T; j0 += 16) add_key_block(dqkv + 2 * C, C3, S, Tp, dyp, j0, T, HS, overwrite);
}

/* The (batch, head) loop of attention_body.h's attention_heads, over these kernels. */
static void attention_heads_avx512i(int backward, float *o, const float *dout, float *att, const float *qkv, long B,
                                    long T, long C, long NH, const fc_att_dropout *drop, int nthreads, int *failed,
                                    int overwrite) {
    long HS = C / NH, Tp = (T + 15) / 16 * 16;
    int bad = 0;
    (void)nthreads; /* without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : bad)
#endif
    {
        float *ws = att_scratch((size_t)(4 * HS + T) * Tp);
        if (ws == NULL) bad = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, NH)
#endif
        for (long bh = 0; bh < B * NH; ++bh) {
            long b = bh / NH, h = bh % NH;
            if (ws == NULL) continue;
            if (backward)
                backward_head_i(o + b * T * 3 * C + h * HS, dout + b * T * C + h * HS, qkv + b * T * 3 * C + h * HS,
                                att + bh * T * T, T, C, HS, ws, drop, (long long)bh * T * T, overwrite);
            else
                forward_head_i(o + b * T * C + h * HS, att + bh * T * T, qkv + b * T * 3 * C + h * HS, T, C, HS, ws,
                               drop, (long long)bh * T * T);
        }
    }
    *failed = bad;
}

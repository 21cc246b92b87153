/* The decode loop's fp32 products against weights packed by fc_pack16 (fc_decode.h), written once over
   the vector width FC_VL (fc_simd.h) and compiled per path by fc_each_isa.h; also the decode
   attention for the same path (attention_v, or decode_attention_body.h's plain copy). Included by fc_decode.c.

   A packed panel is 16 columns, [K][16] floats: DP_PV = 16 / FC_VL vectors per panel on every path,
   so the packed weights do not depend on the path. A tile is DP_ROWS rows x NP panels, one
   accumulator per (row, vector): acc = fma(x[r, k], w[k, panel], acc) for k = 0..K-1 from zero,
   so every output element is the same chain whatever the tile, the rows batched or the columns
   split. Accumulators: AVX-512 8 x 2 x 1 = 16 (one row: 4), AVX2 6 x 1 x 2 = 12 (four rows: 8, one
   row: 8), NEON 4 x 1 x 4 = 16 (one row: 16). */
#undef DP_PV
#undef DP_ROWS
#undef DP_NP
#define DP_PV (16 / FC_VL)
#define DP_ROWS (FC_VL == 16 ? 8 : FC_VL == 8 ? 6 : 4)
#define DP_NP (FC_VL == 16 ? 2 : 1)

#define DP_TILE(NAME, MR, NP)                                                                           \
    static void FC_N(NAME)(float *y, ptrdiff_t ldy, const float *x, ptrdiff_t ldx, ptrdiff_t K, const float *wp, \
                           ptrdiff_t kp, const int *lo, const int *hi) {                                \
        vf acc[MR][NP * DP_PV];                                                                         \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int q = 0; q < NP * DP_PV; q++) acc[r][q] = FC_N(vzero)();                             \
        for (ptrdiff_t k = 0; k < K; k++) {                                                             \
            vf w[NP * DP_PV];                                                                           \
            for (int q = 0; q < NP; q++)                                                                \
                for (int v = 0; v < DP_PV; v++) w[q * DP_PV + v] = FC_N(vload)(wp + (q * kp + k) * 16 + v * FC_VL); \
            for (int r = 0; r < MR; r++) {                                                              \
                const vf a = FC_N(vset1)(x[r * ldx + k]);                                               \
                for (int q = 0; q < NP * DP_PV; q++) acc[r][q] = FC_N(vfma)(acc[r][q], a, w[q]);        \
            }                                                                                           \
        }                                                                                               \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int q = 0; q < NP; q++) {                                                              \
                float *yq = y + r * ldy + q * 16;                                                       \
                if (lo[q] == 0 && hi[q] == 16) {                                                        \
                    for (int v = 0; v < DP_PV; v++) FC_N(vstore)(yq + v * FC_VL, acc[r][q * DP_PV + v]); \
                } else {                                                                                \
                    float buf[16];                                                                      \
                    for (int v = 0; v < DP_PV; v++) FC_N(vstore)(buf + v * FC_VL, acc[r][q * DP_PV + v]); \
                    for (int j = lo[q]; j < hi[q]; j++) yq[j] = buf[j];                                  \
                }                                                                                       \
            }                                                                                           \
    }
DP_TILE(tile_multi, DP_ROWS, DP_NP)
DP_TILE(tile_half, DP_ROWS / 2, DP_NP)
DP_TILE(tile_multi_1, DP_ROWS, 1)
DP_TILE(tile_half_1, DP_ROWS / 2, 1)
DP_TILE(tile_one_1, 1, 1)
DP_TILE(tile_one_4, 1, 4)
DP_TILE(tile_one_3, 1, 3)
DP_TILE(tile_one_2, 1, 2)
#if FC_VL == 16 /* avx512: 3 and 2 rows x 2 panels, 6 and 4 accumulators (a row's 2 wait on the latency) */
DP_TILE(tile_three, 3, DP_NP)
DP_TILE(tile_two, 2, DP_NP)
#elif FC_VL == 8 /* avx2: 5 and 4 rows x 2 vectors, 10 and 8 accumulators (the half tile, 3 rows, keeps 6) */
DP_TILE(tile_five, 5, DP_NP)
DP_TILE(tile_four, 4, DP_NP)
#endif
#undef DP_TILE

/* Batches below this many rows run row by row, four panels at a time (row_panels4): one row on
   avx512, two on avx2, three on neon. Larger batches run tiles (next_tile): on avx512 2 and 3 rows
   took 62 and 67 % of one core's peak in tiles of 2 panels, 48 and 53 % row by row; on avx2 3 rows
   in a 3-row tile 59 %, 51 % row by row (benchmarks/bench_decode_products, Zen 4). */
#undef DP_ROW_BY_ROW
#define DP_ROW_BY_ROW (FC_VL == 16 ? 2 : FC_VL == 8 ? 3 : 4)

/* The rows of the next tile (DP_NP panels) for L rows left, in the path's tiles, chosen by
   benchmarks/bench_decode_products (Zen 4): avx512 8, 4, 3, 2, 1 (5 = 4 + 1: 80 % of the peak, as
   3 + 2 69 %; 6 = 4 + 2, 7 = 4 + 3); avx2 6, 5, 4, 3 (every count from 8 on in tiles of 4 to 6, no
   1-row tile, whose 2 accumulators wait on the FMA latency; 7 = 4 + 3); neon 4, 2, 1. */
static inline int FC_N(next_tile)(ptrdiff_t L) {
#if FC_VL == 16
    return L >= 8 ? 8 : L >= 5 ? 4 : (int)L;
#elif FC_VL == 8
    if ((L >= 12 && L != 13) || L == 6 || L == 10 || L == 11) return 6;
    if (L == 5 || L == 9 || L == 13) return 5;
    return L >= 4 ? 4 : L == 3 ? 3 : 1;
#else
    return L >= DP_ROWS ? DP_ROWS : L >= DP_ROWS / 2 ? DP_ROWS / 2 : 1;
#endif
}

/* One row, four whole panels: y[0:64] = x[0:Kr] @ w, w at the first panel's row (rows 16 floats
   apart, panels ps floats apart); the same chains as tile_one_4. Inline, with no masked stores: as a
   call (tile_one_4) one stream's character took 2.5-4 % longer (2-core Zen 4, avx512 and avx2, one
   thread and two; calls of each alternating in one process). */
static inline void FC_N(row_panels4)(float *restrict y, const float *restrict x, ptrdiff_t Kr, const float *restrict w,
                                     ptrdiff_t ps) {
    vf acc[4 * DP_PV];
    for (int q = 0; q < 4 * DP_PV; q++) acc[q] = FC_N(vzero)();
    for (ptrdiff_t k = 0; k < Kr; k++, w += 16) {
        const vf a = FC_N(vset1)(x[k]);
        for (int q = 0; q < 4 * DP_PV; q++) acc[q] = FC_N(vfma)(acc[q], a, FC_N(vload)(w + q / DP_PV * ps + q % DP_PV * FC_VL));
    }
    for (int q = 0; q < 4 * DP_PV; q++) FC_N(vstore)(y + q * FC_VL, acc[q]);
}

/* y[:M, j0:j1] = x[:M, k0:k1] @ w[k0:k1, j0:j1], w (K, N) packed, x row stride ldx (see
   fc_matmul_packed in fc_decode.h). One row (a single stream): 4 panels in flight hide the FMA
   latency; more rows: DP_NP panels per tile. */
static void FC_N(matmul_packed)(float *y, const float *x, ptrdiff_t ldx, const float *wp, ptrdiff_t M, ptrdiff_t K,
                                ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1) {
    ptrdiff_t p1 = (j1 + 15) / 16, Kr = k1 - k0;
    int np = M < DP_ROW_BY_ROW ? 4 : DP_NP;
    x += k0;
    for (ptrdiff_t p = j0 / 16; p < p1; p += np) {
        int n = p1 - p < np ? (int)(p1 - p) : np, lo[4], hi[4];
        for (int q = 0; q < n; q++) {
            ptrdiff_t c0 = (p + q) * 16;
            lo[q] = j0 > c0 ? (int)(j0 - c0) : 0;
            hi[q] = j1 < c0 + 16 ? (int)(j1 - c0) : 16;
        }
        float *yp = y + p * 16;
        const float *w = wp + (p * K + k0) * 16;
#define DP_CALL(TILE) FC_N(TILE)(yp + m * ldy, ldy, x + m * ldx, ldx, Kr, w, K, lo, hi)
        if (M < DP_ROW_BY_ROW) {
            for (ptrdiff_t m = 0; m < M; m++) {
                if (n == 4 && lo[0] == 0 && hi[3] == 16) FC_N(row_panels4)(yp + m * ldy, x + m * ldx, Kr, w, 16 * K);
                else if (n == 4) DP_CALL(tile_one_4);
                else if (n == 3) DP_CALL(tile_one_3);
                else if (n == 2) DP_CALL(tile_one_2);
                else DP_CALL(tile_one_1);
            }
            continue;
        }
        ptrdiff_t m = 0;
        if (n == DP_NP) {
            for (int r; m < M; m += r) {
                r = FC_N(next_tile)(M - m);
                if (r == DP_ROWS) DP_CALL(tile_multi);
                else if (r == DP_ROWS / 2) DP_CALL(tile_half);
#if FC_VL == 16
                else if (r == 3) DP_CALL(tile_three);
                else if (r == 2) DP_CALL(tile_two);
                else DP_CALL(tile_one_2);
#elif FC_VL == 8
                else if (r == 5) DP_CALL(tile_five);
                else if (r == 4) DP_CALL(tile_four);
                else DP_CALL(tile_one_1);
#else
                else DP_CALL(tile_one_1);
#endif
            }
        } else { /* the ragged last panel of the two-panel tiles (AVX-512) */
            for (; m + DP_ROWS <= M; m += DP_ROWS) DP_CALL(tile_multi_1);
            for (; m + DP_ROWS / 2 <= M; m += DP_ROWS / 2) DP_CALL(tile_half_1);
            for (; m < M; m++) DP_CALL(tile_one_1);
        }
#undef DP_CALL
    }
}

#include "decode_attention_body.h"

/* The decode attention in vectors, for head sizes that are a multiple of FC_VL (else the plain
   copy above): the same contract as attention (fc_attention in fc_decode.h). Scores: FC_VL
   positions per vector, four vectors in flight, each a fused multiply-add chain over the head's
   channels; softmax with a vector exp; p.v over the head's position-major values: HS / FC_VL vectors,
   four partial sums over the positions (t mod 4), added ((0 + 1) + (2 + 3)) at the end. Every
   value depends on n and the row's own data only, never on M or the other rows. */
static void FC_N(attention_v)(float *restrict out, const float *restrict qkv, const float *restrict kt,
                              const float *restrict v, ptrdiff_t n0, ptrdiff_t M, ptrdiff_t C, ptrdiff_t S,
                              ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *restrict scores,
                              const float *k_next, const float *v_next) {
    ptrdiff_t HS = C / n_head, NV = HS / FC_VL;
    float scale = 1.0f / sqrtf((float)HS);
    for (ptrdiff_t m = 0; m < M; m++) {
        const float *q = qkv + m * 3 * C;
        ptrdiff_t n = n0 + m + 1 < S ? n0 + m + 1 : S, t;
        for (ptrdiff_t h = h0; h < h1; h++) {
            const float *kh = kt + h * HS * S;
            /* the next head's blocks (this row's, else the caller's next), asked for line by line
               beside this head's own loads: a head's keys and values are 4 KB each at the base
               shape, a page the hardware prefetcher does not run past */
            const float *kp = h + 1 < h1 ? kh + HS * S : k_next ? k_next : kh;
            const float *vp = h + 1 < h1 ? v + (h + 1) * S * HS : v_next ? v_next : v + h * S * HS;
            float qs[256];
            for (ptrdiff_t c = 0; c < HS; c++) qs[c] = q[h * HS + c] * scale;
            for (t = 0; t + 4 * FC_VL <= n; t += 4 * FC_VL) {
                vf a0 = FC_N(vzero)(), a1 = a0, a2 = a0, a3 = a0;
                for (ptrdiff_t c = 0; c < HS; c++) {
                    const float *kr = kh + c * S + t;
                    vf qc = FC_N(vset1)(qs[c]);
                    for (int l = 0; l < 4 * FC_VL; l += 16) __builtin_prefetch(kp + c * S + t + l);
                    a0 = FC_N(vfma)(a0, qc, FC_N(vload)(kr));
                    a1 = FC_N(vfma)(a1, qc, FC_N(vload)(kr + FC_VL));
                    a2 = FC_N(vfma)(a2, qc, FC_N(vload)(kr + 2 * FC_VL));
                    a3 = FC_N(vfma)(a3, qc, FC_N(vload)(kr + 3 * FC_VL));
                }
                FC_N(vstore)(scores + t, a0);
                FC_N(vstore)(scores + t + FC_VL, a1);
                FC_N(vstore)(scores + t + 2 * FC_VL, a2);
                FC_N(vstore)(scores + t + 3 * FC_VL, a3);
            }
            for (; t + FC_VL <= n; t += FC_VL) {
                vf a0 = FC_N(vzero)();
                for (ptrdiff_t c = 0; c < HS; c++) a0 = FC_N(vfma)(a0, FC_N(vset1)(qs[c]), FC_N(vload)(kh + c * S + t));
                FC_N(vstore)(scores + t, a0);
            }
            for (; t < n; t++) {
                float a = 0.0f;
                for (ptrdiff_t c = 0; c < HS; c++) a += qs[c] * kh[c * S + t];
                scores[t] = a;
            }
            float mx = scores[0], tot;
            vf vm = FC_N(vset1)(mx);
            for (t = 0; t + FC_VL <= n; t += FC_VL) vm = FC_N(vmax)(vm, FC_N(vload)(scores + t));
            mx = FC_N(vhmax)(vm);
            for (; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
            vf sum = FC_N(vzero)(), vmx = FC_N(vset1)(mx);
            for (t = 0; t + FC_VL <= n; t += FC_VL) {
                vf e = FC_N(vexp)(FC_N(vload)(scores + t) - vmx);
                FC_N(vstore)(scores + t, e);
                sum += e;
            }
            tot = FC_N(vhsum)(sum);
            for (; t < n; t++) {
                scores[t] = fc_expf(scores[t] - mx);
                tot += scores[t];
            }
            vf inv = FC_N(vset1)(1.0f / tot);
            for (ptrdiff_t j = 0; j < NV; j++) {
                const float *vc = v + h * S * HS + j * FC_VL;
                vf a0 = FC_N(vzero)(), a1 = a0, a2 = a0, a3 = a0;
                for (t = 0; t + 4 <= n; t += 4) {
                    if (j == 0) /* one line a row: all of it at HS = 16 (a loop over the lines cost 10 %) */
                        for (int u = 0; u < 4; u++) __builtin_prefetch(vp + (t + u) * HS);
                    a0 = FC_N(vfma)(a0, FC_N(vset1)(scores[t]), FC_N(vload)(vc + t * HS));
                    a1 = FC_N(vfma)(a1, FC_N(vset1)(scores[t + 1]), FC_N(vload)(vc + (t + 1) * HS));
                    a2 = FC_N(vfma)(a2, FC_N(vset1)(scores[t + 2]), FC_N(vload)(vc + (t + 2) * HS));
                    a3 = FC_N(vfma)(a3, FC_N(vset1)(scores[t + 3]), FC_N(vload)(vc + (t + 3) * HS));
                }
                for (; t < n; t++) a0 = FC_N(vfma)(a0, FC_N(vset1)(scores[t]), FC_N(vload)(vc + t * HS));
                FC_N(vstore)(out + m * C + h * HS + j * FC_VL, ((a0 + a1) + (a2 + a3)) * inv);
            }
        }
    }
}

static void FC_N(attention_any)(float *restrict out, const float *restrict qkv, const float *restrict kt,
                                const float *restrict v, ptrdiff_t n0, ptrdiff_t M, ptrdiff_t C, ptrdiff_t S,
                                ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *restrict scores,
                                const float *k_next, const float *v_next) {
    ptrdiff_t HS = C / n_head;
    if (HS % FC_VL == 0 && HS <= 256)
        FC_N(attention_v)(out, qkv, kt, v, n0, M, C, S, n_head, h0, h1, scores, k_next, v_next);
    else FC_N(attention)(out, qkv, kt, v, n0, M, C, S, n_head, h0, h1, scores);
}

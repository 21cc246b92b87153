/* The decode loop's fp32 products against weights packed by fc_pack16 (fc_decode.h), written once over
   the vector width FC_VL (fc_simd.h) and compiled per path by fc_each_isa.h; also the decode
   attention of decode_attention_body.h for the same path. Included by fc_decode.c.

   A packed panel is 16 columns, [K][16] floats: DP_PV = 16 / FC_VL vectors per panel on every path,
   so the packed weights do not depend on the path. A tile is DP_ROWS rows x NP panels, one
   accumulator per (row, vector): acc = fma(x[r, k], w[k, panel], acc) for k = 0..K-1 from zero,
   so every output element is the same chain whatever the tile, the rows batched or the columns
   split. Accumulators: AVX-512 8 x 2 x 1 = 16 (one row: 4), AVX2 6 x 1 x 2 = 12 (one row: 8),
   NEON 4 x 1 x 4 = 16 (one row: 16). */
#undef DP_PV
#undef DP_ROWS
#undef DP_NP
#define DP_PV (16 / FC_VL)
#define DP_ROWS (FC_VL == 16 ? 8 : FC_VL == 8 ? 6 : 4)
#define DP_NP (FC_VL == 16 ? 2 : 1)

#define DP_TILE(NAME, MR, NP)                                                                           \
    static void FC_N(NAME)(float *y, ptrdiff_t ldy, const float *x, ptrdiff_t K, const float *wp, const int *lo, \
                           const int *hi) {                                                             \
        vf acc[MR][NP * DP_PV];                                                                         \
        for (int r = 0; r < MR; r++)                                                                    \
            for (int q = 0; q < NP * DP_PV; q++) acc[r][q] = FC_N(vzero)();                             \
        for (ptrdiff_t k = 0; k < K; k++) {                                                             \
            vf w[NP * DP_PV];                                                                           \
            for (int q = 0; q < NP; q++)                                                                \
                for (int v = 0; v < DP_PV; v++) w[q * DP_PV + v] = FC_N(vload)(wp + (q * K + k) * 16 + v * FC_VL); \
            for (int r = 0; r < MR; r++) {                                                              \
                const vf a = FC_N(vset1)(x[r * K + k]);                                                 \
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
#undef DP_TILE

/* y[:M, j0:j1] = x[:M] @ w[:, j0:j1], w packed (see fc_matmul_packed in fc_decode.h). One row (a
   single stream): 4 panels in flight hide the FMA latency; more rows: DP_NP panels per tile. */
static void FC_N(matmul_packed)(float *y, const float *x, const float *wp, ptrdiff_t M, ptrdiff_t K, ptrdiff_t ldy,
                                ptrdiff_t j0, ptrdiff_t j1) {
    ptrdiff_t p1 = (j1 + 15) / 16;
    int np = M < 4 ? 4 : DP_NP;
    for (ptrdiff_t p = j0 / 16; p < p1; p += np) {
        int n = p1 - p < np ? (int)(p1 - p) : np, lo[4], hi[4];
        for (int q = 0; q < n; q++) {
            ptrdiff_t c0 = (p + q) * 16;
            lo[q] = j0 > c0 ? (int)(j0 - c0) : 0;
            hi[q] = j1 < c0 + 16 ? (int)(j1 - c0) : 16;
        }
        float *yp = y + p * 16;
        const float *w = wp + p * 16 * K;
        if (M < 4) {
            for (ptrdiff_t m = 0; m < M; m++) {
                if (n == 4) FC_N(tile_one_4)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
                else if (n == 3) FC_N(tile_one_3)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
                else if (n == 2) FC_N(tile_one_2)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
                else FC_N(tile_one_1)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
            }
            continue;
        }
        ptrdiff_t m = 0;
        if (n == DP_NP) {
            for (; m + DP_ROWS <= M; m += DP_ROWS) FC_N(tile_multi)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
            for (; m + DP_ROWS / 2 <= M; m += DP_ROWS / 2) FC_N(tile_half)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
            for (; m < M; m++)
                if (DP_NP == 2) FC_N(tile_one_2)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
                else FC_N(tile_one_1)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
        } else { /* the ragged last panel of the two-panel tiles (AVX-512) */
            for (; m + DP_ROWS <= M; m += DP_ROWS) FC_N(tile_multi_1)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
            for (; m + DP_ROWS / 2 <= M; m += DP_ROWS / 2) FC_N(tile_half_1)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
            for (; m < M; m++) FC_N(tile_one_1)(yp + m * ldy, ldy, x + m * K, K, w, lo, hi);
        }
    }
}

#include "decode_attention_body.h"

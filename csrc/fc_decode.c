/* See fc_decode.h. The matrix product and attention are compiled three times (x86-64-v4 / v3 /
   baseline, GCC's target_clones; the loader picks one for the CPU), because the extension itself is
   built for the baseline ISA: SSE2 without FMA would run them several times slower. */
#include "fc_decode.h"

#include <math.h>

#include "fc_math.h"

/* ifunc-based clones: GCC on x86-64 Linux (macOS has no ifunc; ARM needs none). Not clang: clang 14
   left these functions, declared in fc_decode.h without the attribute, as undefined symbols. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FC_CLONES
#endif

/* y[:M] = x[:M] @ w; y (M, N) with row stride ldy, x (M, K), w (K, N) with row stride ldw, all
   row-major (a column slice y[:, j0:j1] = x @ w[:, j0:j1] is y + j0, w + j0, N = j1 - j0). Four
   input channels per pass over an output row; output rows in blocks of four, so each weight
   element loaded feeds four rows. Every output element is computed the same way whatever the
   slice, so splitting the columns across threads changes no value. */
FC_CLONES
void fc_matmul(float *restrict y, const float *restrict x, const float *restrict w, ptrdiff_t M, ptrdiff_t K,
               ptrdiff_t N, ptrdiff_t ldy, ptrdiff_t ldw) {
    ptrdiff_t K4 = K - K % 4, m = 0, i, j;
    for (; m + 4 <= M; m += 4) {
        float *y0 = y + m * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
        const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
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
        const float *xr = x + m * K;
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

/* out[m] = softmax(q[m] K^T / sqrt(HS)) V over the first n = min(n0 + m + 1, S) cache rows, for
   heads h0..h1-1 (keys already cached; out's other columns are left alone). A full cache (a ring,
   rotary positions) is attended whole, in slot order. out (M, C); qkv (M, 3C), q first; kt, vt
   (C, S) with time last, so every inner loop runs over contiguous rows; scores (S,) scratch. */
FC_CLONES
void fc_attention(float *restrict out, const float *restrict qkv, const float *restrict kt,
                  const float *restrict vt, ptrdiff_t n0, ptrdiff_t M, ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head,
                  ptrdiff_t h0, ptrdiff_t h1, float *restrict scores) {
    ptrdiff_t HS = C / n_head, m, h, c, t, n;
    float scale = 1.0f / sqrtf((float)HS);
    for (m = 0; m < M; m++) {
        const float *q = qkv + m * 3 * C;
        n = n0 + m + 1 < S ? n0 + m + 1 : S;
        for (h = h0; h < h1; h++) {
            float mx, tot = 0.0f, inv;
            for (t = 0; t < n; t++) scores[t] = 0.0f;
            for (c = h * HS; c < h * HS + HS; c++) {
                const float *krow = kt + c * S;
                float qc = q[c] * scale;
                for (t = 0; t < n; t++) scores[t] += qc * krow[t];
            }
            mx = scores[0];
            for (t = 1; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
            for (t = 0; t < n; t++) {
                scores[t] = fc_expf(scores[t] - mx);
                tot += scores[t];
            }
            inv = 1.0f / tot;
            for (c = h * HS; c < h * HS + HS; c++) {
                const float *vrow = vt + c * S;
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a;
                ptrdiff_t n8 = n - n % 8, j;
                for (t = 0; t < n8; t += 8)
                    for (j = 0; j < 8; j++) acc[j] += scores[t + j] * vrow[t + j];
                a = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                for (; t < n; t++) a += scores[t] * vrow[t];
                out[m * C + c] = a * inv;
            }
        }
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

/* out[m] = x[m] / sqrt(mean(x[m]**2) + eps) * g. out, x (M, C); g (C,). */
void fc_rmsnorm(float *out, const float *x, const float *g, ptrdiff_t M, ptrdiff_t C, float eps) {
    ptrdiff_t m, c;
    for (m = 0; m < M; m++) {
        float ss = 0.0f, s;
        for (c = 0; c < C; c++) ss += x[m * C + c] * x[m * C + c];
        s = 1.0f / sqrtf(ss / (float)C + eps);
        for (c = 0; c < C; c++) out[m * C + c] = x[m * C + c] * s * g[c];
    }
}

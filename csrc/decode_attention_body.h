/* The decode loop's attention against the KV cache (fc_attention of fc_decode.h), plain C that the
   compiler vectorises: compiled once per vector path (from decode_body.h) and once for the
   generic path, each copy named by FC_N. Included by fc_decode.c, which includes fc_math.h. */
/* out[m] = softmax(q[m] K^T / sqrt(HS)) V over the first n = min(n0 + m + 1, S) cache rows, for
   heads h0..h1-1 (keys already cached; out's other columns are left alone). A full cache (a ring,
   rotary positions) is attended whole, in slot order. out (M, C); qkv (M, 3C), q first; kt (C, S)
   keys with time last (the scores run over contiguous positions), vt (NH, S, HS) values
   position-major per head (a head's values are one contiguous block, read in order; a new row
   appends HS floats per head); scores (S,) scratch. */
static void FC_N(attention)(float *restrict out, const float *restrict qkv, const float *restrict kt,
                  const float *restrict vt, ptrdiff_t n0, ptrdiff_t M, ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head,
                  ptrdiff_t h0, ptrdiff_t h1, float *restrict scores) {
    ptrdiff_t HS = C / n_head, m, h, c, t, n;
    float scale = 1.0f / sqrtf((float)HS);
    for (m = 0; m < M; m++) {
        const float *q = qkv + m * 3 * C;
        n = n0 + m + 1 < S ? n0 + m + 1 : S;
        for (h = h0; h < h1; h++) {
            float mx, tot = 0.0f, inv;
            /* 16 positions at a time, summed over the head's channels in registers (the score row
               is written once, not once per channel) */
            for (t = 0; t + 16 <= n; t += 16) {
                float acc[16] = {0};
                ptrdiff_t j;
                for (c = h * HS; c < h * HS + HS; c++) {
                    const float *krow = kt + c * S + t;
                    float qc = q[c] * scale;
                    for (j = 0; j < 16; j++) acc[j] += qc * krow[j];
                }
                for (j = 0; j < 16; j++) scores[t + j] = acc[j];
            }
            for (; t < n; t++) {  /* the last n % 16 positions: the same sums, one at a time */
                float a = 0.0f;
                for (c = h * HS; c < h * HS + HS; c++) a += q[c] * scale * kt[c * S + t];
                scores[t] = a;
            }
            mx = scores[0];
            for (t = 1; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
            for (t = 0; t < n; t++) scores[t] = fc_expf(scores[t] - mx); /* vectorises without the sum */
            for (t = 0; t < n; t++) tot += scores[t];
            inv = 1.0f / tot;
            for (c = h * HS; c < h * HS + HS; c++) {
                float acc[4] = {0, 0, 0, 0}, a;
                ptrdiff_t j;
                const float *vh = vt + h * S * HS + (c - h * HS);
                for (t = 0; t + 4 <= n; t += 4)
                    for (j = 0; j < 4; j++) acc[j] += scores[t + j] * vh[(t + j) * HS];
                for (; t < n; t++) acc[0] += scores[t] * vh[t * HS];
                a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
                out[m * C + c] = a * inv;
            }
        }
    }
}


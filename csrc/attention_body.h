/* The attention kernels of csrc/attention.c, written once over the vector width FC_VL (fc_simd.h)
   and compiled per path by fc_each_isa.h. Included inside attention.c, which defines
   transpose_head and the scratch. HS is 16, 32, 48 or 64 (a multiple of every FC_VL). */

/* The first cnt (< FC_VL) floats at p, zeros after: the ragged end of a row, never read past. */
FC_SIMD_INLINE vf FC_N(vload_part)(const float *p, long cnt) {
    float buf[FC_VL] = {0};
    for (long i = 0; i < cnt; ++i) buf[i] = p[i];
    return FC_N(vload)(buf);
}
FC_SIMD_INLINE vf FC_N(vload_n)(const float *p, long cnt) {
    return cnt >= FC_VL ? FC_N(vload)(p) : FC_N(vload_part)(p, cnt < 0 ? 0 : cnt);
}

/* dst[t*HS + d] = src[t*ld + d]: one head's rows packed contiguously (attention.c's pack_head), in
   vectors: HS is a multiple of FC_VL, and a libc memcpy call per 64-byte row cost 5-10 % of a head. */
static void FC_N(pack_rows)(float *dst, const float *src, long ld, long T, long HS) {
    for (long t = 0; t < T; ++t)
        for (long d = 0; d < HS; d += FC_VL) FC_N(vstore)(dst + t * HS + d, FC_N(vload)(src + t * ld + d));
}

/* Dropout on the probabilities: for the FC_VL flat indices i0 .. of att, dscale where
   fc_dropout_hash(i, key) >= thr (csrc/fc_math.h), else 0; the same mask as every backend's. */
FC_SIMD_INLINE vf FC_N(keep_scale)(long long i0, const fc_att_dropout *drop) {
    vu h = (vu)FC_N(viset1)((int)(unsigned int)i0) + (vu)FC_N(vlanes)();
    h = h * 0x9E3779B9u + drop->key;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    return FC_N(vand0)((vi)(h >= drop->thr), FC_N(vset1)(drop->dscale));
}

/* s[0 .. VL*nv) = scale * sum_d x[d] * xt[d, 0 .. VL*nv); lanes >= n set to `fill`.
   Eight blocks per pass share each broadcast and give eight independent FMA chains: two FMA units
   of 4 cycles' latency need eight (four, the earlier choice, ran the AVX2 scores at half speed). */
#define ATT_ROW_BLOCKS(U)                                                                              \
    do {                                                                                               \
        vf acc[U];                                                                                     \
        for (int u = 0; u < (U); ++u) acc[u] = FC_N(vzero)();                                          \
        const float *col = xt + FC_VL * j;                                                             \
        for (long d = 0; d < HS; ++d) {                                                                \
            const vf xd = FC_N(vset1)(x[d]);                                                           \
            for (int u = 0; u < (U); ++u) acc[u] = FC_N(vfma)(acc[u], xd, FC_N(vload)(col + d * Tp + FC_VL * u)); \
        }                                                                                              \
        for (int u = 0; u < (U); ++u)                                                                  \
            FC_N(vstore)(s + FC_VL * (j + u), FC_N(vsel)(FC_N(vlt)(n - FC_VL * (j + u)), acc[u] * sc, f)); \
        j += (U);                                                                                      \
    } while (0)
static void FC_N(row_times_t)(float *s, const float *x, const float *xt, long Tp, long n, long HS, float scale,
                              float fill) {
    long nv = (n + FC_VL - 1) / FC_VL, j = 0;
    const vf f = FC_N(vset1)(fill), sc = FC_N(vset1)(scale);
    while (nv - j >= 8) ATT_ROW_BLOCKS(8);
    if (nv - j >= 4) ATT_ROW_BLOCKS(4);
    if (nv - j >= 2) ATT_ROW_BLOCKS(2);
    if (nv - j >= 1) ATT_ROW_BLOCKS(1);
}
#undef ATT_ROW_BLOCKS

/* Four query rows at once: S[t0 + r, 0 .. ) = scale * x[r] . xt for r < 4 (rows ldx apart), row r's
   lanes >= t0 + r + 1 set to `fill`, every row written up to the vectors of the longest (t0 + 4
   keys; the rows' own softmax never reads past its own). A register tile of 4 rows x ATT_CV vectors:
   each key vector loaded once serves four rows (row_times_t loads one per FMA, which made the
   scores load-bound at HS = 16). */
#undef ATT_CV
#define ATT_CV (FC_VL == 8 ? 2 : 4)
#define ATT_ROWS4_TILE(CV)                                                                             \
    do {                                                                                               \
        vf acc[4][CV];                                                                                 \
        for (int r = 0; r < 4; ++r)                                                                    \
            for (int v = 0; v < (CV); ++v) acc[r][v] = FC_N(vzero)();                                  \
        const float *col = xt + FC_VL * j;                                                             \
        for (long d = 0; d < HS; ++d) {                                                                \
            vf c[CV];                                                                                  \
            for (int v = 0; v < (CV); ++v) c[v] = FC_N(vload)(col + d * Tp + FC_VL * v);               \
            for (int r = 0; r < 4; ++r) {                                                              \
                const vf xd = FC_N(vset1)(x[r * ldx + d]);                                             \
                for (int v = 0; v < (CV); ++v) acc[r][v] = FC_N(vfma)(acc[r][v], xd, c[v]);            \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < 4; ++r)                                                                    \
            for (int v = 0; v < (CV); ++v)                                                             \
                FC_N(vstore)(S + r * lds + FC_VL * (j + v),                                            \
                             FC_N(vsel)(FC_N(vlt)(t0 + r + 1 - FC_VL * (j + v)), acc[r][v] * sc, f));  \
        j += (CV);                                                                                     \
    } while (0)
static void FC_N(rows4_times_t)(float *S, long lds, const float *x, long ldx, const float *xt, long Tp, long t0,
                                long HS, float scale, float fill) {
    long nv = (t0 + 4 + FC_VL - 1) / FC_VL, j = 0;
    const vf f = FC_N(vset1)(fill), sc = FC_N(vset1)(scale);
    while (nv - j >= ATT_CV) ATT_ROWS4_TILE(ATT_CV);
    while (nv - j >= 1) ATT_ROWS4_TILE(1);
}
#undef ATT_ROWS4_TILE

/* Every row t < T of S (rows lds apart) = scale * x[t] . xt, lanes >= t + 1 set to fill: four rows
   at a time, the last T % 4 one by one. */
static void FC_N(scores)(float *S, long lds, const float *x, long ldx, const float *xt, long Tp, long T, long HS,
                         float scale, float fill) {
    long t = 0;
    for (; t + 4 <= T; t += 4) FC_N(rows4_times_t)(S + t * lds, lds, x + t * ldx, ldx, xt, Tp, t, HS, scale, fill);
    for (; t < T; ++t) FC_N(row_times_t)(S + t * lds, x + t * ldx, xt, Tp, t + 1, HS, scale, fill);
}

/* One tile of weighted4: CV vectors of channels (o, rw already offset to them) for the four rows. */
#define ATT_W4(CV)                                                                                     \
    static void FC_N(weighted4_##CV)(float *o, long ldo, int accumulate, const float *w, long ldw, const float *rw, \
                                     long ld, long t0) {                                                \
        vf acc[4][CV];                                                                                 \
        for (int r = 0; r < 4; ++r)                                                                    \
            for (int v = 0; v < (CV); ++v) acc[r][v] = FC_N(vzero)();                                  \
        for (long t2 = 0; t2 <= t0; ++t2) { /* keys every row of the four sees */                      \
            vf c[CV];                                                                                  \
            for (int v = 0; v < (CV); ++v) c[v] = FC_N(vload)(rw + t2 * ld + FC_VL * v);               \
            for (int r = 0; r < 4; ++r) {                                                              \
                const vf wb = FC_N(vset1)(w[r * ldw + t2]);                                            \
                for (int v = 0; v < (CV); ++v) acc[r][v] = FC_N(vfma)(acc[r][v], wb, c[v]);            \
            }                                                                                          \
        }                                                                                              \
        for (int r = 1; r < 4; ++r) /* the keys past row 0's diagonal: t0 + 1 .. t0 + r */             \
            for (long t2 = t0 + 1; t2 <= t0 + r; ++t2) {                                               \
                const vf wb = FC_N(vset1)(w[r * ldw + t2]);                                            \
                for (int v = 0; v < (CV); ++v)                                                         \
                    acc[r][v] = FC_N(vfma)(acc[r][v], wb, FC_N(vload)(rw + t2 * ld + FC_VL * v));      \
            }                                                                                          \
        for (int r = 0; r < 4; ++r)                                                                    \
            for (int v = 0; v < (CV); ++v) {                                                           \
                float *dst = o + r * ldo + FC_VL * v;                                                  \
                FC_N(vstore)(dst, accumulate ? FC_N(vload)(dst) + acc[r][v] : acc[r][v]);              \
            }                                                                                          \
    }
ATT_W4(1)
ATT_W4(2)
#if ATT_CV == 4
ATT_W4(3)
ATT_W4(4)
#endif
#undef ATT_W4

/* o[r] (+)= sum_{t2 <= t0 + r} w[r][t2] * rows[t2*ld ..] for four query rows r < 4 (o rows ldo apart,
   w rows ldw apart; w is read only up to each row's own diagonal). Tiles of 4 rows x up to ATT_CV
   vectors of channels: each value vector loaded once serves four rows. */
static void FC_N(weighted4)(float *o, long ldo, int accumulate, const float *w, long ldw, const float *rows,
                            long ld, long t0, long HS) {
    for (long d0 = 0; d0 < HS;) {
        long cv = (HS - d0) / FC_VL;
        if (cv > ATT_CV) cv = ATT_CV;
        switch (cv) {
#if ATT_CV == 4
        case 4: FC_N(weighted4_4)(o + d0, ldo, accumulate, w, ldw, rows + d0, ld, t0); break;
        case 3: FC_N(weighted4_3)(o + d0, ldo, accumulate, w, ldw, rows + d0, ld, t0); break;
#endif
        case 2: FC_N(weighted4_2)(o + d0, ldo, accumulate, w, ldw, rows + d0, ld, t0); break;
        default: FC_N(weighted4_1)(o + d0, ldo, accumulate, w, ldw, rows + d0, ld, t0); break;
        }
        d0 += cv * FC_VL;
    }
}

/* o[0 .. VL*NC) (+)= sum_{t2 < n} w[t2] * rows[t2*ld ..]: NC vectors per row, the keys split over U
   independent accumulator sets (one FMA chain would wait on its own latency at HS = 16), U x NC
   accumulators at most 16 (8 on AVX2's 16 registers). */
#define ATT_WEIGHTED(HS16)                                                                              \
    static void FC_N(weighted_rows_##HS16)(float *o, int accumulate, const float *w, const float *rows, long ld, \
                                           long n) {                                                    \
        enum { NC = 16 * HS16 / FC_VL, AMAX = FC_VL == 8 ? 8 : 16, U0 = AMAX / NC, U = U0 < 1 ? 1 : U0 > 4 ? 4 : U0 }; \
        vf acc[U][NC];                                                                                  \
        for (int u = 0; u < U; ++u)                                                                     \
            for (int c = 0; c < NC; ++c) acc[u][c] = FC_N(vzero)();                                     \
        long t2 = 0;                                                                                    \
        for (; t2 + U <= n; t2 += U)                                                                    \
            for (int u = 0; u < U; ++u) {                                                               \
                const vf wb = FC_N(vset1)(w[t2 + u]);                                                   \
                for (int c = 0; c < NC; ++c)                                                            \
                    acc[u][c] = FC_N(vfma)(acc[u][c], wb, FC_N(vload)(rows + (t2 + u) * ld + FC_VL * c)); \
            }                                                                                           \
        for (; t2 < n; ++t2) {                                                                          \
            const vf wb = FC_N(vset1)(w[t2]);                                                           \
            for (int c = 0; c < NC; ++c) acc[0][c] = FC_N(vfma)(acc[0][c], wb, FC_N(vload)(rows + t2 * ld + FC_VL * c)); \
        }                                                                                               \
        for (int c = 0; c < NC; ++c) {                                                                  \
            vf t = acc[0][c];                                                                           \
            for (int u = 1; u < U; ++u) t += acc[u][c];                                                 \
            if (accumulate) t += FC_N(vload)(o + FC_VL * c);                                            \
            FC_N(vstore)(o + FC_VL * c, t);                                                             \
        }                                                                                               \
    }
ATT_WEIGHTED(1)
ATT_WEIGHTED(2)
ATT_WEIGHTED(3)
ATT_WEIGHTED(4)
#undef ATT_WEIGHTED

static void FC_N(weighted_rows)(long HS, float *o, int accumulate, const float *w, const float *rows, long ld, long n) {
    switch (HS / 16) {
    case 1: FC_N(weighted_rows_1)(o, accumulate, w, rows, ld, n); break;
    case 2: FC_N(weighted_rows_2)(o, accumulate, w, rows, ld, n); break;
    case 3: FC_N(weighted_rows_3)(o, accumulate, w, rows, ld, n); break;
    default: FC_N(weighted_rows_4)(o, accumulate, w, rows, ld, n); break;
    }
}

/* Every query row t < T: o[t] (+)= sum_{t2 <= t} w[t][t2] * rows[t2] (o rows ldo, w rows ldw apart):
   four rows at a time, the last T % 4 one by one. */
static void FC_N(weighted_all)(long HS, float *o, long ldo, int accumulate, const float *w, long ldw,
                               const float *rows, long ld, long T) {
    long t = 0;
    for (; t + 4 <= T; t += 4) FC_N(weighted4)(o + t * ldo, ldo, accumulate, w + t * ldw, ldw, rows, ld, t, HS);
    for (; t < T; ++t) FC_N(weighted_rows)(HS, o + t * ldo, accumulate, w + t * ldw, rows, ld, t + 1);
}

/* Four keys jk .. jk+3 (all < T) x CV vectors of channels (o, x already offset to them):
   o[(jk + k)*ldo ..] (+)= sum_{t >= jk} w[t*ldw + jk + k] * x[t*HS ..]. Each row of x loaded once
   serves the four keys (one key per accumulator of VL channels loaded every row VL times over). */
#define ATT_KEYS4(CV)                                                                                  \
    static void FC_N(add_keys4_##CV)(float *o, long ldo, const float *w, long ldw, const float *x, long HS, \
                                     long jk, long T, int overwrite) {                                 \
        vf acc[4][CV];                                                                                 \
        for (int k = 0; k < 4; ++k)                                                                    \
            for (int v = 0; v < (CV); ++v) acc[k][v] = FC_N(vzero)();                                  \
        for (long t = jk; t < T; ++t) {                                                                \
            vf c[CV];                                                                                  \
            for (int v = 0; v < (CV); ++v) c[v] = FC_N(vload)(x + t * HS + FC_VL * v);                 \
            const float *wt = w + t * ldw + jk;                                                        \
            for (int k = 0; k < 4; ++k) {                                                              \
                const vf wb = FC_N(vset1)(wt[k]);                                                      \
                for (int v = 0; v < (CV); ++v) acc[k][v] = FC_N(vfma)(acc[k][v], wb, c[v]);            \
            }                                                                                          \
        }                                                                                              \
        for (int k = 0; k < 4; ++k)                                                                    \
            for (int v = 0; v < (CV); ++v) {                                                           \
                float *row = o + (jk + k) * ldo + FC_VL * v;                                           \
                FC_N(vstore)(row, overwrite ? acc[k][v] : FC_N(vload)(row) + acc[k][v]);               \
            }                                                                                          \
    }
ATT_KEYS4(1)
ATT_KEYS4(2)
#if ATT_CV == 4
ATT_KEYS4(3)
ATT_KEYS4(4)
#endif
#undef ATT_KEYS4

/* o[t2*ldo + d] += (overwrite: =) sum_{t >= j0} w[t*ldw + t2] x[t*HS + d] for the key block t2 in [j0, j0 + VL)
   (keys past T left out), d < HS: dK = dS^T Q or dV = P^T dY for VL keys at once. Tiles of four
   keys x up to ATT_CV vectors of channels (add_keys4); the last T % 4 keys one accumulator per key,
   whose row of x is loaded once and multiplied by each key's broadcast weight, so the result needs
   no transpose. w must be zero above the diagonal (a sub-block's sum starts at its first key). */
static void FC_N(add_key_block)(float *o, long ldo, const float *w, long ldw, const float *x, long j0, long T,
                                long HS, int overwrite) {
    const long kn = T - j0 < FC_VL ? T - j0 : FC_VL, k4 = kn / 4 * 4;
    for (long k0 = 0; k0 < k4; k0 += 4)
        for (long d0 = 0; d0 < HS;) {
            long cv = (HS - d0) / FC_VL;
            if (cv > ATT_CV) cv = ATT_CV;
            switch (cv) {
#if ATT_CV == 4
            case 4: FC_N(add_keys4_4)(o + d0, ldo, w, ldw, x + d0, HS, j0 + k0, T, overwrite); break;
            case 3: FC_N(add_keys4_3)(o + d0, ldo, w, ldw, x + d0, HS, j0 + k0, T, overwrite); break;
#endif
            case 2: FC_N(add_keys4_2)(o + d0, ldo, w, ldw, x + d0, HS, j0 + k0, T, overwrite); break;
            default: FC_N(add_keys4_1)(o + d0, ldo, w, ldw, x + d0, HS, j0 + k0, T, overwrite); break;
            }
            d0 += cv * FC_VL;
        }
    if (k4 == kn) return;
    const long jr = j0 + k4, kr = kn - k4; /* the last 1-3 keys */
    for (long d0 = 0; d0 < HS; d0 += FC_VL) {
        vf acc[3] = {FC_N(vzero)(), FC_N(vzero)(), FC_N(vzero)()};
        for (long t = jr; t < T; ++t) {
            const vf xv = FC_N(vload)(x + t * HS + d0);
            const float *wt = w + t * ldw + jr;
            for (int k = 0; k < kr; ++k) acc[k] = FC_N(vfma)(acc[k], FC_N(vset1)(wt[k]), xv);
        }
        for (long k = 0; k < kr; ++k) {
            float *row = o + (jr + k) * ldo + d0;
            FC_N(vstore)(row, overwrite ? acc[k] : FC_N(vload)(row) + acc[k]);
        }
    }
}

/* Three passes over the rows of one head (scores, softmax, weighted values) instead of one pass
   doing all three per row: the rows of a pass are independent, so the CPU overlaps one row's
   reductions (max, sum: latency chains) with the next row's work. ws holds kt (HS x Tp), the
   packed values (T x HS) and the scores S (T x Tp). With drop, S holds att * mask for the values
   (att keeps the probabilities before dropout; base: att's flat index of this head's [0, 0]). */
static void FC_N(forward_head)(float *out, float *att, const float *qkv, long T, long C, long HS, float *ws,
                               const fc_att_dropout *drop, long long base, int big) {
    /* att larger than the caches (big) is written with streaming stores where its rows allow: a
       store that misses reads the line first, and the backward finds none of it in the caches anyway */
    const int stream = big && T % FC_VL == 0 && (unsigned long)att % (FC_VL * sizeof(float)) == 0;
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *kt = ws, *vp = ws + HS * Tp, *qp = vp + HS * Tp, *S = qp + HS * Tp;
    transpose_head(kt, qkv + C, C3, T, Tp, HS);
    FC_N(pack_rows)(vp, qkv + 2 * C, C3, T, HS);
    FC_N(pack_rows)(qp, qkv, C3, T, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    FC_N(scores)(S, Tp, qp, HS, kt, Tp, T, HS, scale, -INFINITY);
    for (long t = 0; t < T; ++t) {
        long n = t + 1, nv = (n + FC_VL - 1) / FC_VL;
        float *s = S + t * Tp;
        vf mx = FC_N(vset1)(-INFINITY), mx2 = mx; /* two chains */
        long j = 0;
        for (; j + 2 <= nv; j += 2) {
            mx = FC_N(vmax)(mx, FC_N(vload)(s + FC_VL * j));
            mx2 = FC_N(vmax)(mx2, FC_N(vload)(s + FC_VL * (j + 1)));
        }
        if (j < nv) mx = FC_N(vmax)(mx, FC_N(vload)(s + FC_VL * j));
        const vf m = FC_N(vset1)(FC_N(vhmax)(FC_N(vmax)(mx, mx2)));
        vf sum = FC_N(vzero)(), sum2 = sum;
        for (j = 0; j + 1 < nv; ++j) { /* whole vectors below the diagonal: no mask */
            vf e = FC_N(vexp)(FC_N(vload)(s + FC_VL * j) - m);
            FC_N(vstore)(s + FC_VL * j, e);
            if (j & 1) sum2 += e;
            else sum += e;
        }
        { /* the diagonal's vector: lanes >= n are 0 */
            vf e = FC_N(vand0)(FC_N(vlt)(n - FC_VL * j), FC_N(vexp)(FC_N(vload)(s + FC_VL * j) - m));
            FC_N(vstore)(s + FC_VL * j, e);
            sum += e;
        }
        const vf inv = FC_N(vset1)(1.0f / FC_N(vhsum)(sum + sum2));
        float *a = att + t * T;
        if (stream) { /* whole aligned rows, zeros above the diagonal included, past the caches */
            for (long j = 0; j < nv; ++j) {
                vf p = FC_N(vload)(s + FC_VL * j) * inv;
                FC_N(vstore_nt)(a + FC_VL * j, p);
                if (drop) p = p * FC_N(keep_scale)(base + t * T + FC_VL * j, drop);
                FC_N(vstore)(s + FC_VL * j, p);
            }
            for (long j = nv; FC_VL * j < T; ++j) FC_N(vstore_nt)(a + FC_VL * j, FC_N(vzero)());
            continue;
        }
        for (long j = 0; j < nv; ++j) {
            vf p = FC_N(vload)(s + FC_VL * j) * inv;
            if (FC_VL * (j + 1) <= T) FC_N(vstore)(a + FC_VL * j, p);
            else
                for (long i = 0; FC_VL * j + i < T; ++i) a[FC_VL * j + i] = p[i];
            if (drop) p = p * FC_N(keep_scale)(base + t * T + FC_VL * j, drop);
            FC_N(vstore)(s + FC_VL * j, p);
        }
        if (FC_VL * nv < T) memset(a + FC_VL * nv, 0, (size_t)(T - FC_VL * nv) * sizeof(float));
    }
    if (stream) FC_N(vstore_fence)();
    FC_N(weighted_all)(HS, out, C, 0, S, Tp, vp, HS, T);
}

/* Passes over the rows as in forward_head: dP = dy v^T for every row, then each row's softmax
   backward (into S; with drop, dP times the mask first), then dq, then dk and dv a block
   of VL key rows at a time. ws holds vt (HS x Tp), packed k, q and dy (T x HS each), S (T x Tp). */
static void FC_N(backward_head)(float *dqkv, const float *dout, const float *qkv, const float *att, long T, long C,
                                long HS, float *ws, const fc_att_dropout *drop, long long base, int overwrite) {
    const long C3 = 3 * C, Tp = (T + 15) / 16 * 16;
    float *vt = ws, *kp = vt + HS * Tp, *qp = kp + HS * Tp, *dyp = qp + HS * Tp, *S = dyp + HS * Tp;
    transpose_head(vt, qkv + 2 * C, C3, T, Tp, HS);
    FC_N(pack_rows)(kp, qkv + C, C3, T, HS);
    FC_N(pack_rows)(qp, qkv, C3, T, HS);
    FC_N(pack_rows)(dyp, dout, C, T, HS);
    const float scale = 1.0f / sqrtf((float)HS);
    FC_N(scores)(S, Tp, dyp, HS, vt, Tp, T, HS, 1.0f, 0.0f);
    for (long t = 0; t < T; ++t) {
        long n = t + 1, nv = (n + FC_VL - 1) / FC_VL;
        const float *a = att + t * T;
        float *s = S + t * Tp;
        if (drop)
            for (long j = 0; j < nv; ++j)
                FC_N(vstore)(s + FC_VL * j, FC_N(vload)(s + FC_VL * j) * FC_N(keep_scale)(base + t * T + FC_VL * j, drop));
        /* sum(att * dP): four partial sums (one FMA chain ran at the FMA's latency, not its rate) */
        vf dot[4] = {FC_N(vzero)(), FC_N(vzero)(), FC_N(vzero)(), FC_N(vzero)()};
        long j = 0; /* whole vectors below the diagonal (j < nv - 1) load att plainly; the last one masked */
        for (; j + 5 <= nv; j += 4)
            for (int u = 0; u < 4; ++u)
                dot[u] = FC_N(vfma)(dot[u], FC_N(vload)(a + FC_VL * (j + u)), FC_N(vload)(s + FC_VL * (j + u)));
        for (; j + 1 < nv; ++j) dot[0] = FC_N(vfma)(dot[0], FC_N(vload)(a + FC_VL * j), FC_N(vload)(s + FC_VL * j));
        const vf alast = FC_N(vand0)(FC_N(vlt)(n - FC_VL * j), FC_N(vload_n)(a + FC_VL * j, T - FC_VL * j));
        dot[1] = FC_N(vfma)(dot[1], alast, FC_N(vload)(s + FC_VL * j));
        const vf rd = FC_N(vset1)(FC_N(vhsum)((dot[0] + dot[1]) + (dot[2] + dot[3]))), sc = FC_N(vset1)(scale);
        for (j = 0; j + 1 < nv; ++j) {
            vf p = FC_N(vload)(a + FC_VL * j);
            FC_N(vstore)(s + FC_VL * j, p * (FC_N(vload)(s + FC_VL * j) - rd) * sc);
        }
        FC_N(vstore)(s + FC_VL * j, alast * (FC_N(vload)(s + FC_VL * j) - rd) * sc);
    }
    FC_N(weighted_all)(HS, dqkv, C3, !overwrite, S, Tp, kp, HS, T); /* dq += dS k */
    for (long j0 = 0; j0 < T; j0 += FC_VL) FC_N(add_key_block)(dqkv + C, C3, S, Tp, qp, j0, T, HS, overwrite); /* dk += dS^T q */
    if (drop)
        for (long t = 0; t < T; ++t) { /* S = att * mask, the probabilities the values saw */
            long n = t + 1, nv = (n + FC_VL - 1) / FC_VL;
            for (long j = 0; j < nv; ++j)
                FC_N(vstore)(S + t * Tp + FC_VL * j, FC_N(vload_n)(att + t * T + FC_VL * j, n - FC_VL * j) *
                                                         FC_N(keep_scale)(base + t * T + FC_VL * j, drop));
        }
    /* dv += P^T dy: att is zero above the diagonal and rows T long */
    for (long j0 = 0; j0 < T; j0 += FC_VL)
        FC_N(add_key_block)(dqkv + 2 * C, C3, drop ? S : att, drop ? Tp : T, dyp, j0, T, HS, overwrite);
}

/* every path; avx512 below 128 keys runs attention_avx512.h instead (attention.c) */
static void FC_N(attention_heads)(int backward, float *o, const float *dout, float *att, const float *qkv, long B,
                                  long T, long C, long NH, const fc_att_dropout *drop, int nthreads, int *failed,
                                  int overwrite) {
    long HS = C / NH, Tp = (T + 15) / 16 * 16;
    const int big = (double)B * NH * T * T * sizeof(float) >= ATT_STREAM_BYTES;
    int bad = 0;
    (void)nthreads; /* without OpenMP */
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : bad)
#endif
    {
        float *ws = att_scratch((size_t)(4 * HS + T) * Tp);
        if (ws == NULL) bad = 1;
#ifdef _OPENMP
/* one batch element (all its heads) per chunk: heads of one row share cache lines of out / dqkv,
 * and two threads writing neighbouring heads made the backward slower on 2 threads than on 1 */
#pragma omp for schedule(dynamic, NH)
#endif
        for (long bh = 0; bh < B * NH; ++bh) {
            long b = bh / NH, h = bh % NH;
            if (ws == NULL) continue;
            if (backward)
                FC_N(backward_head)(o + b * T * 3 * C + h * HS, dout + b * T * C + h * HS, qkv + b * T * 3 * C + h * HS,
                                    att + bh * T * T, T, C, HS, ws, drop, (long long)bh * T * T, overwrite);
            else
                FC_N(forward_head)(o + b * T * C + h * HS, att + bh * T * T, qkv + b * T * 3 * C + h * HS, T, C, HS, ws,
                                   drop, (long long)bh * T * T, big);
        }
    }
    *failed = bad;
}

/* The fp32 engine of csrc/gemm_bf16.c, written once over the vector width FC_VL (fc_simd.h) and
   compiled per path by fc_each_isa.h: AVX-512 (16 floats, 8 x 48 or 8 x 32 tiles: 24 or 16
   accumulators of 32 registers), AVX2 (8 floats, 6 x 16: 12 of 16, the BLIS Haswell shape) and
   NEON (4 floats, 8 x 12: 24 of 32). Included inside gemm_bf16.c, which defines word, engine,
   cdiv and lmin.

   Panels (one 32-bit word = one float here):
     B          [p][nr]   nr columns side by side per depth step: the kernel loads GM_NV vectors
     A, k-major [p][MR]   (A^T in memory, the dW product): a copy of MR contiguous floats per step
     A, rows    [MR][as]  (A in memory: forward and dinp): the kernel broadcasts a[r * as + p], MR
                          sequential streams the prefetcher follows; the driver passes A's own rows
                          (as = lda) where it can, else a copy of MR rows (as = kp).
   The lane-major B (W^T, the dinp product) is transposed by scalar code: it is packed once per
   block and reused by every row of C, so it costs little next to the products. */
#undef GM_MR
#undef GM_NV
#if FC_VL == 8
#define GM_MR 6
#define GM_NV 2
#else
#define GM_MR 8
#define GM_NV 3
#endif

/* B, k-major source (lane l, depth k at src[k*ld + l]) -> panels [k][W] (W a multiple of FC_VL).
   Row by row: each source row is read once, front to back, and its W-wide pieces go to every panel.
   A panel at a time read a column strip of the source instead, one line per row at a stride the
   prefetchers did not follow: at long's dW (dout 4096 x 384) that was a quarter of the product. */
static void FC_N(pack_b_k)(const float *src, long ld, long kc, long w, int W, word *dst_, long ps) {
    float *dst = (float *)dst_;
    const long whole = w / W * W;
    for (long k = 0; k < kc; ++k) {
        const float *s = src + k * ld;
        float *d = dst + k * W;
        for (long l0 = 0; l0 < whole; l0 += W, d += ps, s += W)
            for (int j = 0; j < W; j += FC_VL) FC_N(vstore)(d + j, FC_N(vload)(s + j));
        if (whole < w)
            for (int j = 0; j < W; ++j) d[j] = j < w - whole ? s[j] : 0.0f;
    }
}

/* B, lane-major source (lane l, depth k at src[l*ld + k]) -> panels [k][W]: a transpose, FC_VL
   lanes by FC_VL depth steps at a time through a small tile (the panel's rows are written whole,
   not one float per cache line as a lane-by-lane copy did). */
static void FC_N(pack_b_l)(const float *src, long ld, long kc, long w, int W, word *dst_, long ps) {
    float *dst = (float *)dst_;
    for (long l0 = 0; l0 < w; l0 += W) {
        long n = lmin(W, w - l0);
        float *d = dst + (l0 / W) * ps;
        for (long k0 = 0; k0 < kc; k0 += FC_VL) {
            long kn = lmin(FC_VL, kc - k0);
            for (int j = 0; j < W; j += FC_VL) {
                float t[FC_VL][FC_VL]; /* t[lane][depth] */
                for (int l = 0; l < FC_VL; ++l) {
                    const float *s = src + (l0 + j + l) * ld + k0;
                    if (j + l < n && kn == FC_VL) FC_N(vstore)(t[l], FC_N(vload)(s));
                    else
                        for (int k = 0; k < FC_VL; ++k) t[l][k] = j + l < n && k < kn ? s[k] : 0.0f;
                }
                for (long k = 0; k < kn; ++k) {
                    vf col;
                    for (int l = 0; l < FC_VL; ++l) col[l] = t[l][k];
                    FC_N(vstore)(d + (k0 + k) * W + j, col);
                }
            }
        }
    }
}

/* A, k-major source (row i, depth k at src[k*ld + i]) -> panels [k][MR]. */
static void FC_N(pack_a_k)(const float *src, long ld, long kc, long w, int W, word *dst_, long ps) {
    float *dst = (float *)dst_;
    for (long l0 = 0; l0 < w; l0 += W) {
        long n = lmin(W, w - l0);
        float *d = dst + (l0 / W) * ps;
        const float *s = src + l0;
        if (n == GM_MR)
            for (long k = 0; k < kc; ++k) __builtin_memcpy(d + k * GM_MR, s + k * ld, GM_MR * sizeof(float));
        else
            for (long k = 0; k < kc; ++k)
                for (int r = 0; r < GM_MR; ++r) d[k * GM_MR + r] = r < n ? s[k * ld + r] : 0.0f;
    }
}

/* A, row source (row i, depth k at src[i*ld + k]) -> panels [MR][kc]: row copies, zero rows past w. */
static void FC_N(pack_a_l)(const float *src, long ld, long kc, long w, int W, word *dst_, long ps) {
    float *dst = (float *)dst_;
    for (long l0 = 0; l0 < w; l0 += W) {
        float *d = dst + (l0 / W) * ps;
        for (int r = 0; r < GM_MR; ++r) {
            if (l0 + r < w)
                __builtin_memcpy(d + r * kc, src + (l0 + r) * ld, (size_t)kc * sizeof(float));
            else
                __builtin_memset(d + r * kc, 0, (size_t)kc * sizeof(float));
        }
    }
}

/* One MR x (FC_VL * NVV) register tile: C[m, n] (= or beta *) += A panel x B panel; AT(r, p) is
   A's element of row r at depth step p in the panel's layout. Full tiles are stored directly,
   ragged ones through a buffer (vector extensions have no masked stores). */
#define GM_UKR(NAME, NVV, AT)                                                                             \
    static void FC_N(NAME)(long kp, const word *a_, const word *b_, float *c, long ldc, int m, int n,   \
                           float beta, int nr, long as) {                                              \
        (void)as;                                                                                        \
        const float *a = (const float *)a_, *b = (const float *)b_;                                      \
        vf s[GM_MR][NVV];                                                                                \
        /* C's rows, stored (and read when beta != 0) after the loop: fetched meanwhile */              \
        _Pragma("GCC unroll 8") for (int r = 0; r < GM_MR; ++r) if (r < m) {                             \
            __builtin_prefetch(c + r * ldc, 1, 3);                                                       \
            __builtin_prefetch(c + r * ldc + FC_VL * NVV - 1, 1, 3);                                     \
        }                                                                                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < GM_MR; ++r)                                          \
            _Pragma("GCC unroll 3") for (int v = 0; v < NVV; ++v) s[r][v] = FC_N(vzero)();               \
        for (long p = 0; p < kp; ++p) {                                                                  \
            vf bw[NVV];                                                                                  \
            _Pragma("GCC unroll 3") for (int v = 0; v < NVV; ++v) bw[v] = FC_N(vload)(b + FC_VL * v);    \
            _Pragma("GCC unroll 8") for (int r = 0; r < GM_MR; ++r) {                                    \
                const vf av = FC_N(vset1)(AT);                                                           \
                _Pragma("GCC unroll 3") for (int v = 0; v < NVV; ++v) s[r][v] = FC_N(vfma)(s[r][v], av, bw[v]); \
            }                                                                                            \
            b += nr;                                                                                     \
        }                                                                                                \
        if (m == GM_MR && n == FC_VL * NVV) {                                                            \
            _Pragma("GCC unroll 8") for (int r = 0; r < GM_MR; ++r)                                      \
                _Pragma("GCC unroll 3") for (int v = 0; v < NVV; ++v) {                                  \
                    float *cr = c + r * ldc + FC_VL * v;                                                 \
                    vf t = s[r][v];                                                                      \
                    if (beta != 0.0f) t = FC_N(vfma)(t, FC_N(vload)(cr), FC_N(vset1)(beta));             \
                    FC_N(vstore)(cr, t);                                                                 \
                }                                                                                        \
            return;                                                                                      \
        }                                                                                                \
        float tile[GM_MR][FC_VL * NVV];                                                                  \
        /* unrolled like the loops above: a rolled loop here kept s on the stack in every call */      \
        _Pragma("GCC unroll 8") for (int r = 0; r < GM_MR; ++r)                                          \
            _Pragma("GCC unroll 3") for (int v = 0; v < NVV; ++v) FC_N(vstore)(&tile[r][FC_VL * v], s[r][v]); \
        for (int r = 0; r < m; ++r)                                                                      \
            for (int j = 0; j < n; ++j)                                                                  \
                c[r * ldc + j] = beta != 0.0f ? tile[r][j] + beta * c[r * ldc + j] : tile[r][j];          \
    }

GM_UKR(ukr_k1, 1, a[p * GM_MR + r])
GM_UKR(ukr_k2, 2, a[p * GM_MR + r])
GM_UKR(ukr_l1, 1, a[r * as + p])
GM_UKR(ukr_l2, 2, a[r * as + p])
#if GM_NV == 3
GM_UKR(ukr_k3, 3, a[p * GM_MR + r])
GM_UKR(ukr_l3, 3, a[r * as + p])
#define GM_K3 FC_N(ukr_k3)
#define GM_L3 FC_N(ukr_l3)
#else
#define GM_K3 NULL
#define GM_L3 NULL
#endif
#undef GM_UKR

static const engine FC_N(engine_f32) = {
    1, KC_F32, GM_MR, FC_VL, GM_NV, FC_N(pack_b_k), FC_N(pack_b_l), FC_N(pack_a_k), FC_N(pack_a_l),
    {NULL, FC_N(ukr_k1), FC_N(ukr_k2), GM_K3}, {NULL, FC_N(ukr_l1), FC_N(ukr_l2), GM_L3},
};
#undef GM_K3
#undef GM_L3

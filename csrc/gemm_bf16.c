/* Packed matrix products: fp32 on every vector path, bf16 on AVX512_BF16. See gemm_bf16.h for the API.
 *
 * Structure (the GotoBLAS / BLIS layering, written for fastchar's shapes):
 *   for each column block jc of C (NC wide)            -- B block stays in L2
 *     for each depth block pc (KC deep)
 *       pack B[pc.., jc..] into nr-wide panels
 *       for each row chunk (<= MC rows)                 -- A chunk stays in L2
 *         pack A into MR-row panels
 *         for each B panel (L1), for each A panel: one MR x nr register tile
 * Threads: C is split along its longer side, and each thread runs all of the above alone on its
 * rows or columns (gemm_split).
 *
 * The driver below is plain C; an engine supplies the packing and the register tiles:
 *   fp32  gemm_f32_body.h, written once over the vector width and compiled for AVX-512, AVX2 + FMA
 *         and NEON by fc_each_isa.h (engine_f32_avx512, _avx2, _neon);
 *   bf16  AVX512_BF16 intrinsics below (vdpbf16ps has no portable spelling), x86-64 only.
 * The path is the one fastchar/isa.py chose (fc_isa(), fc_isa_bf16()); without one fc_gemm returns
 * FC_GEMM_UNSUPPORTED and the caller keeps its BLAS kernels.
 *
 * bf16 panels hold W "lanes" (rows of op(A), or columns of op(B)) and store, for each depth step p,
 * the W lanes side by side: [p][W] 32-bit words, a word a pair of bf16 (k = 2p in the low half,
 * 2p+1 in the high half), which is what vdpbf16ps consumes: lane j of acc += a.lo * b[j].lo +
 * a.hi * b[j].hi. The micro-kernel broadcasts A's word of row r and multiplies it with NV vectors
 * of 16 B words, so an 8 x 48 tile keeps 24 accumulators in registers (of 32).
 * Packing reads the source in one of two layouts and writes the same panel:
 *   k-major    lane l, depth k at src[k*ld + l] (B, or A^T): contiguous 16-lane loads of rows k,
 *              k+1; vcvtne2ps2bf16 rounds both, vpermw interleaves them into pairs.
 *   lane-major lane l, depth k at src[l*ld + k] (A, or B^T): 8 rows x 32 floats rounded to pairs,
 *              then an 8 x 16 transpose in registers.
 * Rounding is the CPU's (round to nearest even); odd depth and ragged edges are zero-padded.
 */
#include "gemm_bf16.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fc_isa.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- Blocking. MR rows x nr columns per register tile; KC depth (elements) per packed block. ---- */
enum {
    KC_BF16 = 512, /* 256 pair-words per packed block (measured best of 128..768 words) */
    KC_F32 = 384,  /* fp32 depth per block: 384 (one block for nanoGPT's C = 384) beat 256 on Zen 4 by 9 % (AVX2)
                      and 4-8 % (AVX-512) on nanoGPT's products, 1-2 % on wide's; 512 measured the same */
    MC = 192,  /* rows of A per packed chunk (MC x KC words = 288 KiB at most); a multiple of every MR */
    NC = 768,  /* columns of B per packed block; a multiple of every nr */
};

typedef uint32_t word;

static inline long cdiv(long a, long b) { return (a + b - 1) / b; }
static inline long lmin(long a, long b) { return a < b ? a : b; }

/* ukr(kp, a panel, b panel, c, ldc, m rows, n cols to store, beta, nr, as): one register tile; as is
 * the distance of A's rows in words for the fp32 row panels (kp when packed, lda when the rows are
 * read in place), unused by the others. */
typedef void (*ukr_fn)(long, const word *, const word *, float *, long, int, int, float, int, long);
/* pack(src, ld, kc, w lanes, W lanes per panel, dst, panel stride): lanes 0..w-1 (zero-padded to a
 * multiple of W) of depth 0..kc-1, lane l into panel l / W. */
typedef void (*pack_fn)(const float *, long, long, long, int, word *, long);

typedef struct {
    int kstep; /* depth elements per word: 2 (bf16 pair) or 1 (fp32) */
    long kc;   /* depth elements per packed block */
    int mr, vl, nv; /* rows per tile, floats per vector, most vectors per tile row */
    pack_fn pack_b_k, pack_b_l; /* B from a k-major (B) or lane-major (W^T) source */
    pack_fn pack_a_k, pack_a_l; /* A from a k-major (A^T) or lane-major (A) source */
    ukr_fn ukr_k[4], ukr_l[4];  /* by vectors per panel, for the A panels of pack_a_k / pack_a_l */
} engine;

#define FC_BODY "gemm_f32_body.h"
#include "fc_each_isa.h"

#ifdef FC_BUILD_X86
#include <immintrin.h>

#define FC_T_BF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,avx512bf16,prfchw")))
#define FC_INLINE static inline __attribute__((always_inline))
enum { MR = 8, NV = 3 }; /* the bf16 tile: 8 x 48 */

/* ---- bf16 packing (AVX512_BF16 intrinsics) ---- */

/* vpermw index: output word j = (first[j], second[j]) from [first(16 bf16) | second(16 bf16)] */
FC_T_BF16 FC_INLINE __m512i pair_interleave_index(void) {
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
                            19, 3, 18, 2, 17, 1, 16, 0);
}

FC_T_BF16 FC_INLINE __mmask16 lanes16(long n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* Every pack writes lanes 0..w-1 (zero-padded to a multiple of W) of depth 0..kc-1: lane l goes to
 * panel l / W (panels ps words apart), column l % W; depth step p of a panel starts at word p * W.
 * The A operand is packed one MC-row chunk per call (W = MR, several panels); B one panel per call,
 * or (k-major bf16 B) one depth slice of every panel of the block per call. */

/* k-major source: element (lane l, depth k) at src[k*ld + l]. Row pair by row pair (depth 2p, 2p+1),
 * each walked along up to KM_LANES lanes, 16 (one cache line) at a time, so the rows are read in
 * order; gemm_run hands it B in depth slices of whole rows (by_depth). */
enum { KM_LANES = 1024 }; /* lanes per pass over the depth (a B block of NC = 768 in one); destinations computed once */
FC_T_BF16 static void pack_bf16_kmajor(const float *src, long ld, long kc, long w, int W, word *dst, long ps) {
    const __m512i idx = pair_interleave_index();
    long kp = (kc + 1) / 2, lanes = cdiv(w, W) * W;
    for (long l0 = 0; l0 < lanes; l0 += KM_LANES) {
        int nl = (int)cdiv(lmin(KM_LANES, lanes - l0), 16); /* 16-lane groups in this pass */
        word *d0[KM_LANES / 16], *d1[KM_LANES / 16];
        __mmask16 mk[KM_LANES / 16];
        unsigned char two[KM_LANES / 16], whole[KM_LANES / 16];
        for (int g = 0; g < nl; ++g) {
            long l = l0 + 16L * g;
            d0[g] = dst + (l / W) * ps + l % W;
            d1[g] = dst + ((l + 8) / W) * ps + (l + 8) % W;
            two[g] = l + 8 < lanes;
            whole[g] = two[g] && d1[g] == d0[g] + 8; /* lanes l+8.. in the same panel */
            mk[g] = lanes16(w - l);
        }
        for (long p = 0; p < kp; ++p) {
            const float *r0 = src + 2 * p * ld + l0;
            const int odd = 2 * p + 1 < kc; /* row 2p+1 exists */
            for (int g = 0; g < nl; ++g) {
                __m512 x0 = _mm512_maskz_loadu_ps(mk[g], r0 + 16 * g);
                __m512 x1 = odd ? _mm512_maskz_loadu_ps(mk[g], r0 + ld + 16 * g) : _mm512_setzero_ps();
                __m512i pr = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
                if (whole[g]) {
                    _mm512_storeu_si512((void *)(d0[g] + p * W), pr);
                } else {
                    _mm256_storeu_si256((__m256i *)(d0[g] + p * W), _mm512_castsi512_si256(pr));
                    if (two[g]) _mm256_storeu_si256((__m256i *)(d1[g] + p * W), _mm512_extracti64x4_epi64(pr, 1));
                }
            }
        }
    }
}

/* Lane-major sources (lane l, depth k at src[l*ld + k]) are packed 8 lanes x 16 words at a time:
 * 8 row loads (one word per depth step: a float, or a bf16 pair from vcvtne2ps2bf16 of 32 floats),
 * then an 8 x 16 transpose in registers (unpack 32, unpack 64, vpermt2d) and one 8-word store per
 * depth step. This replaced 64-bit gathers, which cost ~6 cycles per 8 words on Zen 5. */
FC_T_BF16 FC_INLINE void transpose8x16_store(const __m512i R[8], word *dst, long W, int np) {
    __m512i lo[4], hi[4], X[4], Y[4];
    for (int i = 0; i < 4; ++i) {
        lo[i] = _mm512_unpacklo_epi32(R[2 * i], R[2 * i + 1]); /* lane L: r0 r1 r0 r1 at p = 4L, 4L+1 */
        hi[i] = _mm512_unpackhi_epi32(R[2 * i], R[2 * i + 1]); /* p = 4L+2, 4L+3 */
    }
    /* X[q] lane L: rows 0-3 at depth p = 4L + q; Y[q]: rows 4-7 */
    X[0] = _mm512_unpacklo_epi64(lo[0], lo[1]), X[1] = _mm512_unpackhi_epi64(lo[0], lo[1]);
    X[2] = _mm512_unpacklo_epi64(hi[0], hi[1]), X[3] = _mm512_unpackhi_epi64(hi[0], hi[1]);
    Y[0] = _mm512_unpacklo_epi64(lo[2], lo[3]), Y[1] = _mm512_unpackhi_epi64(lo[2], lo[3]);
    Y[2] = _mm512_unpacklo_epi64(hi[2], hi[3]), Y[3] = _mm512_unpackhi_epi64(hi[2], hi[3]);
    /* [X.L, Y.L, X.L+1, Y.L+1]: rows 0-7 at depth 4L+q, then rows 0-7 at depth 4(L+1)+q */
    const __m512i i01 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i i23 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int q = 0; q < 4; ++q) {
        __m512i o01 = _mm512_permutex2var_epi32(X[q], i01, Y[q]);
        __m512i o23 = _mm512_permutex2var_epi32(X[q], i23, Y[q]);
        if (q < np) _mm256_storeu_si256((__m256i *)(dst + q * W), _mm512_castsi512_si256(o01));
        if (4 + q < np) _mm256_storeu_si256((__m256i *)(dst + (4 + q) * W), _mm512_extracti64x4_epi64(o01, 1));
        if (8 + q < np) _mm256_storeu_si256((__m256i *)(dst + (8 + q) * W), _mm512_castsi512_si256(o23));
        if (12 + q < np) _mm256_storeu_si256((__m256i *)(dst + (12 + q) * W), _mm512_extracti64x4_epi64(o23, 1));
    }
}

FC_T_BF16 static void pack_bf16_lanemajor(const float *src, long ld, long kc, long w, int W, word *dst, long ps) {
    long kp = (kc + 1) / 2, lanes = cdiv(w, W) * W;
    for (long l = 0; l < lanes; l += 8) {
        const float *base = src + l * ld;
        word *d = dst + (l / W) * ps + l % W;
        for (long p0 = 0; p0 < kp; p0 += 16) {
            long left = kc - 2 * p0; /* floats of each row still to read */
            __mmask16 m0 = lanes16(left), m1 = lanes16(left - 16);
            __m512i R[8];
            for (int r = 0; r < 8; ++r) {
                const float *row = base + r * ld + 2 * p0;
                /* 4 lines ahead on each of the 8 rows: the strided streams defeat the prefetcher */
                _mm_prefetch((const char *)(row + 64), _MM_HINT_T0);
                _mm_prefetch((const char *)(row + 80), _MM_HINT_T0);
                __m512 x0 = l + r < w ? _mm512_maskz_loadu_ps(m0, row) : _mm512_setzero_ps();
                __m512 x1 = l + r < w ? _mm512_maskz_loadu_ps(m1, row + 16) : _mm512_setzero_ps();
                R[r] = (__m512i)_mm512_cvtne2ps_pbh(x1, x0); /* word p = (x[2p], x[2p+1]) */
            }
            transpose8x16_store(R, d + p0 * W, W, (int)lmin(16, kp - p0));
        }
    }
}

/* ---- bf16 micro-kernel ---- */

/* Write the MR x (16*nv) accumulator tile: C = acc (beta == 0) or C = beta*C + acc; m rows, n cols. */
#define STORE_TILE(nv)                                                                          \
    do {                                                                                        \
        const __m512 bv_ = _mm512_set1_ps(beta);                                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {                                  \
            if (r >= m) continue; /* no break: the loop unrolls and s stays in registers */    \
            float *cr = c + r * ldc;                                                            \
            _Pragma("GCC unroll 3") for (int v = 0; v < (nv); ++v) {                            \
                __mmask16 mk = lanes16(n - 16 * v);                                             \
                __m512 t = s[r][v];                                                             \
                if (beta != 0.0f) t = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, cr + 16 * v), bv_, t); \
                _mm512_mask_storeu_ps(cr + 16 * v, mk, t);                                      \
            }                                                                                   \
        }                                                                                       \
    } while (0)

FC_T_BF16 FC_INLINE void ukr_bf16(const int nv, long kp, const word *a, const word *b, float *c, long ldc, int m,
                                  int n, float beta, int nr) {
    /* The tile's lines of C, asked for (to write) before the products: C is often out of cache (an
     * activation or gradient arena of tens of MB; dW's gradients are read too), and a store or a
     * beta load missing at the end of the tile stalled it. The depth loop hides the wait. Zen 4, one
     * thread, operands evicted first: wide's products 4-10 % faster; the wide bf16 step 3-4 %. */
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
        if (r < m)
#pragma GCC unroll 3
            for (int v = 0; v < nv; ++v) __builtin_prefetch(c + r * ldc + 16 * v, 1, 3);
    __m512 s[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) s[r][v] = _mm512_setzero_ps();
    for (long p = 0; p < kp; ++p) {
        __m512i bw[NV];
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) bw[v] = _mm512_loadu_si512((const void *)(b + 16 * v));
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
            __m512i aw = _mm512_set1_epi32((int)a[r]);
#pragma GCC unroll 3
            for (int v = 0; v < nv; ++v) s[r][v] = _mm512_dpbf16_ps(s[r][v], (__m512bh)aw, (__m512bh)bw[v]);
        }
        a += MR;
        b += nr;
    }
    STORE_TILE(nv);
}


#define DEF_UKR(name, nv)                                                                                 \
    FC_T_BF16 static void name(long kp, const word *a, const word *b, float *c, long ldc, int m, int n, float beta, \
                               int nr, long as) {                                                         \
        (void)as;                                                                                         \
        ukr_bf16(nv, kp, a, b, c, ldc, m, n, beta, nr);                                                   \
    }
DEF_UKR(ukr_bf16_1, 1)
DEF_UKR(ukr_bf16_2, 2)
DEF_UKR(ukr_bf16_3, 3)

static const engine ENGINE_BF16 = {2, KC_BF16, MR, 16, NV, pack_bf16_kmajor, pack_bf16_lanemajor, pack_bf16_kmajor,
                                   pack_bf16_lanemajor, {NULL, ukr_bf16_1, ukr_bf16_2, ukr_bf16_3},
                                   {NULL, ukr_bf16_1, ukr_bf16_2, ukr_bf16_3}};
#endif /* FC_BUILD_X86 */

/* ---- Workspace: one growing 64-byte-aligned buffer per calling thread ---- */

static __thread word *ws_buf = NULL;
static __thread size_t ws_words = 0;

static word *workspace(size_t words) {
    if (words > ws_words) {
        free(ws_buf);
        size_t bytes = (words * sizeof(word) + 63) & ~(size_t)63;
        ws_buf = (word *)aligned_alloc(64, bytes);
        ws_words = ws_buf ? words : 0;
    }
    return ws_buf;
}

/* C = beta * C when there is nothing to multiply (K == 0). */
static void scale_c(long M, long N, float beta, float *C, long ldc) {
    for (long i = 0; i < M; ++i)
        for (long j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
}

/* Tile width: nv vectors (3 x 16 = 48 columns on AVX-512) unless one vector fewer wastes fewer
 * columns on N's ragged last panel (N = 128: 3 x 48 computes 144 columns, 4 x 32 exactly 128). */
static int choose_nr(const engine *e, long N) {
    int nr = e->vl * e->nv;
    if (e->nv == 3 && N % nr != 0 && N % (2 * e->vl) == 0) return 2 * e->vl;
    return nr;
}

/* One thread's share of a (jc, pc) block: rows [m0, m1) of C against the packed B panels. */
static void compute_rows(const engine *e, int trans_a, const float *A, long lda, long m0, long m1, long pc, long kc,
                         long kp, const word *bp, long jc, long nc, int nr, float beta, float *C, long ldc,
                         word *ap) {
    pack_fn pack_a = trans_a ? e->pack_a_k : e->pack_a_l;
    const ukr_fn *ukr = trans_a ? e->ukr_k : e->ukr_l;
    const int mr = e->mr;
    long nbp = cdiv(nc, nr);
    /* fp32 rows of A (forward, dinp) are read where they lie, not copied: the copy cost as much as
     * 3 % of the products. Not where rows are a multiple of 2 KiB apart (the MR rows of a panel
     * would crowd one or two L1 sets; AVX2's 6-row panels only at 4 KiB, all in one set: 2 KiB
     * apart, long's K = 512 products, in place measured as fast on hot data and skip copying A's
     * 8 MB), nor for a ragged last panel (its missing rows are zeros in a copy). */
    const long crowd = e->vl == 8 ? 4096 : 2048;
    const int in_place = !trans_a && e->kstep == 1 && (lda * (long)sizeof(float)) % crowd != 0;
    for (long ic = m0; ic < m1; ic += MC) {
        long mc = lmin(MC, m1 - ic), full = in_place ? mc / mr * mr : 0;
        if (full < mc) /* the panels from row `full` on, packed */
            pack_a(trans_a ? A + pc * lda + ic + full : A + (ic + full) * lda + pc, lda, kc, mc - full, mr,
                   ap + (full / mr) * kp * mr, kp * mr);
        for (long q = 0; q < nbp; ++q) {
            int n = (int)lmin(nr, nc - q * nr);
            ukr_fn k = ukr[cdiv(n, e->vl)];
            const word *b = bp + q * kp * nr;
            float *cq = C + ic * ldc + jc + q * nr;
            long r = 0;
            for (; r < full; r += mr)
                k(kp, (const word *)(A + (ic + r) * lda + pc), b, cq + r * ldc, ldc, mr, n, beta, nr, lda);
            for (; r < mc; r += mr)
                k(kp, ap + (r / mr) * kp * mr, b, cq + r * ldc, ldc, (int)lmin(mr, mc - r), n, beta, nr, kp);
        }
    }
}

/* The blocked product on the calling thread. */
static int gemm_run(const engine *e, int trans_a, int trans_b, long M, long N, long K, const float *A, long lda,
                    const float *B, long ldb, float beta, float *C, long ldc) {
    int nr = choose_nr(e, N);
    /* Depth blocks of equal size (a multiple of 16), at most the engine's kc: K = 384 on a 256 kc
     * was a 256 block and a 128 one, whose tiles paid their fixed costs twice as often. */
    long kc_max = lmin(e->kc, K);
    if (K > kc_max) kc_max = lmin(e->kc, cdiv(cdiv(K, cdiv(K, e->kc)), 16) * 16);
    long kp_max = cdiv(kc_max, e->kstep);
    long nc_max = lmin(NC, cdiv(N, nr) * nr);
    /* segments rounded to 16 words (64 bytes): the A buffer starts on its own line */
    size_t b_words = ((size_t)kp_max * nc_max + 15) & ~(size_t)15, a_words = ((size_t)kp_max * MC + 15) & ~(size_t)15;
    word *ws = workspace(b_words + a_words);
    if (ws == NULL) return FC_GEMM_NOMEM;
    word *ap = ws + b_words;
    pack_fn pack_b = trans_b ? e->pack_b_l : e->pack_b_k;
    /* k-major B by depth slices: whole rows of the block per slice, read in order, where a panel at
     * a time read 32 or 48 floats of every row, rows 1-4 KiB apart. Zen 4, one thread, operands in
     * cache: bf16, wide's dW products with N = 1024 rose from 184-192 to 207-213 GFLOP/s; fp32 on the
     * avx2 path, long's qkv dW from 75-80 to 89-94 GFLOP/s (slices of 32 rows). */
    const int by_depth = !trans_b;
    const long slice = e->kstep == 2 ? cdiv(cdiv(kp_max, 4), 8) * 8 : 32; /* in depth steps: bf16 about 4 a block */
    for (long jc = 0; jc < N; jc += NC) {
        long nc = lmin(NC, N - jc), nbp = cdiv(nc, nr);
        for (long pc = 0; pc < K; pc += kc_max) {
            long kc = lmin(kc_max, K - pc), kp = cdiv(kc, e->kstep);
            if (by_depth)
                for (long sl = 0; sl < cdiv(kp, slice); ++sl) {
                    long p0 = sl * slice, k0 = p0 * e->kstep;
                    pack_b(B + (pc + k0) * ldb + jc, ldb, lmin(slice * e->kstep, kc - k0), nc, nr, ws + p0 * nr,
                           kp * nr);
                }
            else
                for (long q = 0; q < nbp; ++q) {
                    long j = jc + q * nr;
                    const float *src = trans_b ? B + j * ldb + pc : B + pc * ldb + j;
                    pack_b(src, ldb, kc, lmin(nr, N - j), nr, ws + q * kp * nr, kp * nr);
                }
            compute_rows(e, trans_a, A, lda, 0, M, pc, kc, kp, ws, jc, nc, nr, pc == 0 ? beta : 1.0f, C, ldc, ap);
        }
    }
    return FC_GEMM_OK;
}

/* Threads: C split between them along its longer side, whole register panels each, and each thread
 * runs gemm_run alone on its part: its own B panels and A copies (its thread-local workspace), no
 * buffer shared, no barrier. Splitting C's columns makes every thread read all of op(A) (M x K),
 * splitting its rows all of op(B) (K x N), so the rows are split where M > N: the forward and dinp
 * products (M the tokens), dW where the output is narrower than the input.
 * - Columns against the earlier shared packed B (a barrier per depth block, dynamic row chunks): in
 *   the host's slow spells that scheme lost 15 % of base's and wide's training step on 2 threads
 *   (docs/instruction-sets.md, round 9), and in its fast spells it was no faster.
 * - Rows where M > N against columns everywhere, one process, alternating (round 10): avx2 long
 *   23,600 -> 26,750 tokens/s, base, wide and nanoGPT 2-3 % more; bf16 long 30,500 -> 37,000, base
 *   32,700 -> 36,500, wide and nanoGPT 6-7 % more.
 * What a thread computes does not change how an element is summed, so the result is the same on
 * any number of threads. */
static int gemm_split(const engine *e, int trans_a, int trans_b, long M, long N, long K, const float *A, long lda,
                      const float *B, long ldb, float beta, float *C, long ldc, int nthreads) {
    const int rows = M > N, unit = rows ? e->mr : choose_nr(e, N);
    const long panels = cdiv(rows ? M : N, unit);
    if (nthreads > panels) nthreads = (int)panels;
    if (nthreads <= 1) return gemm_run(e, trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    int rc = FC_GEMM_OK;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int tid = 0, nt = 1;
#endif
        const long lo = tid * panels / nt * unit, hi = lmin(rows ? M : N, (tid + 1) * panels / nt * unit);
        int r = FC_GEMM_OK;
        if (hi > lo && rows)
            r = gemm_run(e, trans_a, trans_b, hi - lo, N, K, trans_a ? A + lo : A + lo * lda, lda, B, ldb, beta,
                         C + lo * ldc, ldc);
        else if (hi > lo)
            r = gemm_run(e, trans_a, trans_b, M, hi - lo, K, A, lda, trans_b ? B + lo * ldb : B + lo, ldb, beta,
                         C + lo, ldc);
        if (r != FC_GEMM_OK) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            rc = r;
        }
    }
    return rc;
}

/* The engine of the path in use, or NULL. */
static const engine *engine_for(int precision) {
    if (precision == FC_BF16) {
#ifdef FC_BUILD_X86
        if (fc_isa_bf16()) return &ENGINE_BF16;
#endif
        return NULL;
    }
    switch (fc_isa()) {
#ifdef FC_BUILD_X86
    case FC_ISA_AVX512: return &engine_f32_avx512;
    case FC_ISA_AVX2: return &engine_f32_avx2;
#endif
#ifdef FC_BUILD_NEON
    case FC_ISA_NEON: return &engine_f32_neon;
#endif
    default: return NULL;
    }
}

int fc_gemm_available(int precision) { return engine_for(precision) != NULL; }

int fc_gemm(int precision, int trans_a, int trans_b, long M, long N, long K, const float *A, long lda,
            const float *B, long ldb, float beta, float *C, long ldc, int nthreads) {
    if (precision != FC_F32 && precision != FC_BF16) return FC_GEMM_BADARG;
    if (M < 0 || N < 0 || K < 0 || ldc < N || lda < (trans_a ? M : K) || ldb < (trans_b ? K : N)) return FC_GEMM_BADARG;
    const engine *e = engine_for(precision);
    if (e == NULL) return FC_GEMM_UNSUPPORTED;
    if (M == 0 || N == 0) return FC_GEMM_OK;
    if (K == 0) {
        scale_c(M, N, beta, C, ldc);
        return FC_GEMM_OK;
    }
#ifdef _OPENMP
    if (nthreads <= 0) nthreads = omp_get_max_threads();
    if (omp_in_parallel()) nthreads = 1;
#else
    nthreads = 1;
#endif
    return gemm_split(e, trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc, nthreads);
}

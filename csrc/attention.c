/* Causal softmax attention for one (batch, head) pair at a time, on every vector path. See attention.h.
 *
 * The kernels live in attention_body.h, written once over the vector width and compiled for
 * AVX-512, AVX2 + FMA and NEON (fc_each_isa.h). The avx512 path runs the portable body for
 * sequences of ATT_PORTABLE_T_AVX512 = 128 keys and more and the hand-written intrinsics of
 * attention_avx512.h below that, each where it measured faster (figures there). fc_attention_*
 * run the path fastchar/isa.py chose.
 *
 * Forward, per head: K is transposed once into kt (HS, Tp) scratch (Tp = T rounded up to 16,
 * zero-padded) so that a vector of scores of one query row is HS broadcast-FMAs; the row's softmax
 * runs on vectors (fc_expf lane by lane); out[t] = sum_t2 att[t, t2] v[t2] keeps HS/VL accumulators.
 * The head's query and value rows are packed contiguously first (T x HS): rows of qkv lie 3C floats
 * apart and, walked in order, fall into a few L1 sets and evict one another (reading the queries in
 * place made the scores 2x slower at T = 256, HS = 16). An att of ATT_STREAM_BYTES and more is
 * written with streaming stores (fc_simd.h's vstore_nt) where its rows are aligned to the vector.
 * Backward, per head: V is transposed the same way for dP = dy v^T; each row then gets the
 * softmax backward dS = att * (dP - sum(att * dP)) * scale and dq[t] += dS k;
 * then dK = dS^T Q and dV = P^T dY a block of VL key rows at a time (one accumulator per key),
 * each head's dq/dk/dv columns owned by one thread.
 * Dropout on the probabilities (drop != NULL): the forward's values see att * mask and att keeps
 * the probabilities before dropout; the backward masks dP before the softmax backward and dV uses
 * att * mask. The mask is fc_dropout_hash over att's flat index, as in every backend.
 */
#include "attention.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "fc_isa.h"
#include "gemm_bf16.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(FC_BUILD_X86) || defined(FC_BUILD_NEON)
#define FC_ATT_VECTOR 1

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

/* dst[t*HS + d] = src[t*ld + d]: one head's rows packed contiguously, so that walking them does
 * not map every row onto the same few L1 sets (rows of qkv are 3C floats apart). */
static void pack_head(float *dst, const float *src, long ld, long T, long HS) {
    for (long t = 0; t < T; ++t) memcpy(dst + t * HS, src + t * ld, (size_t)HS * sizeof(float));
}

enum { ATT_PORTABLE_T_AVX512 = 128 };
/* att of at least this many bytes is written with streaming stores (half of a 32 MB L3: below it,
   the backward may still find the forward's att in the caches) */
#define ATT_STREAM_BYTES (16.0 * 1024 * 1024)

#define FC_BODY "attention_body.h"
#include "fc_each_isa.h"

#ifdef FC_BUILD_X86
#include "attention_avx512.h" /* the avx512 path's kernels: intrinsics, measured faster (see there) */
#endif

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
#endif /* vector paths */

int fc_attention_available(long C, long NH) {
    if (C <= 0 || NH <= 0 || C % NH != 0) return 0;
    long HS = C / NH;
    if (HS % 16 != 0 || HS > 64) return 0;
    int isa = fc_isa();
    return isa == FC_ISA_AVX512 || isa == FC_ISA_AVX2 || isa == FC_ISA_NEON;
}

/* o: out (forward) or dqkv (backward); dout only for the backward. */
static int run(int backward, float *o, const float *dout, float *att, const float *qkv, long B, long T, long C,
               long NH, const fc_att_dropout *drop, int nthreads, int overwrite) {
    if (B < 0 || T < 0 || C <= 0 || NH <= 0 || C % NH != 0) return FC_GEMM_BADARG;
    if (!fc_attention_available(C, NH)) return FC_GEMM_UNSUPPORTED;
#ifdef FC_ATT_VECTOR
    int failed = 0;
    nthreads = att_threads(nthreads);
    switch (fc_isa()) {
#ifdef FC_BUILD_X86
    case FC_ISA_AVX512: /* the portable body from T = 128 on, the intrinsics below (see the header) */
        if (T >= ATT_PORTABLE_T_AVX512)
            attention_heads_avx512(backward, o, dout, att, qkv, B, T, C, NH, drop, nthreads, &failed, overwrite);
        else
            attention_heads_avx512i(backward, o, dout, att, qkv, B, T, C, NH, drop, nthreads, &failed, overwrite);
        break;
    case FC_ISA_AVX2: attention_heads_avx2(backward, o, dout, att, qkv, B, T, C, NH, drop, nthreads, &failed, overwrite); break;
#endif
#ifdef FC_BUILD_NEON
    case FC_ISA_NEON: attention_heads_neon(backward, o, dout, att, qkv, B, T, C, NH, drop, nthreads, &failed, overwrite); break;
#endif
    default: return FC_GEMM_UNSUPPORTED;
    }
    return failed ? FC_GEMM_NOMEM : FC_GEMM_OK;
#else
    (void)backward; (void)o; (void)dout; (void)att; (void)qkv; (void)B; (void)T; (void)drop; (void)nthreads;
    (void)overwrite;
    return FC_GEMM_UNSUPPORTED;
#endif
}

int fc_attention_forward(float *out, float *att, const float *qkv, long B, long T, long C, long NH,
                         const fc_att_dropout *drop, int nthreads) {
    return run(0, out, NULL, att, qkv, B, T, C, NH, drop, nthreads, 0);
}

int fc_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att, long B,
                          long T, long C, long NH, const fc_att_dropout *drop, int nthreads, int overwrite) {
    (void)datt; /* the score gradients live in per-thread scratch */
    return run(1, dqkv, dout, (float *)att, qkv, B, T, C, NH, drop, nthreads, overwrite);
}

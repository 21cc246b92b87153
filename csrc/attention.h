/* Causal softmax attention, forward and backward, vectorised (fp32) on the AVX-512, AVX2 and NEON paths.
 *
 * Same math, layout and accumulation contract as fastchar.backends.reference.attention_forward /
 * attention_backward, with dropout on the probabilities as an option:
 *   forward   att = softmax(q k^T / sqrt(HS) + causal mask); out = att v, heads merged
 *             out (B, T, C) overwritten; att (B, NH, T, T) overwritten, zero above the diagonal;
 *             qkv (B, T, 3C), columns q | k | v, head h owns columns h*HS .. h*HS + HS - 1
 *   backward  dqkv (B, T, 3C) accumulated (+=), or written (=) when overwrite != 0 (a plan's first
 *             writer of dqkv); datt (B, NH, T, T) scratch the other backends
 *             use, left untouched here; dout (B, T, C); qkv; att as saved by forward
 * Requirements: HS = C / NH a multiple of 16 and at most 64, and a vector path in use (fc_isa());
 * else FC_GEMM_UNSUPPORTED (the caller keeps its generic kernel); fc_attention_available says so.
 * Threads: one OpenMP parallel region over (batch, head) pairs, like fc_gemm (see gemm_bf16.h).
 */
#ifndef FASTCHAR_ATTENTION_H
#define FASTCHAR_ATTENTION_H

#ifdef __cplusplus
extern "C" {
#endif

/* Dropout on the probabilities: an element of att with flat index i is kept, times dscale, when
 * fc_dropout_hash(i, key) >= thr (csrc/fc_math.h); NULL: no dropout. */
typedef struct {
    unsigned int key, thr;
    float dscale;
} fc_att_dropout;

int fc_attention_available(long C, long NH);
int fc_attention_forward(float *out, float *att, const float *qkv, long B, long T, long C, long NH,
                         const fc_att_dropout *drop, int nthreads);
int fc_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att, long B,
                          long T, long C, long NH, const fc_att_dropout *drop, int nthreads, int overwrite);

#ifdef __cplusplus
}
#endif
#endif

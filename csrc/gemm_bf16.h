/* Packed matrix products for fastchar: bf16 (AVX512_BF16, vdpbf16ps) and fp32 (AVX-512F FMA).
 *
 *   C[M,N] = beta * C + op(A)[M,K] @ op(B)[K,N]        all row-major float32, accumulation in fp32
 *
 *   op(A): trans_a == 0 -> A is (M, K) with row stride lda;  trans_a == 1 -> A is (K, M), op(A) = A^T
 *   op(B): trans_b == 0 -> B is (K, N) with row stride ldb;  trans_b == 1 -> B is (N, K), op(B) = B^T
 *
 * A linear layer's three products (weights stored [in, out] = (IC, OC)):
 *   forward   out[N,OC]  = inp[N,IC]   @ W[IC,OC]     fc_gemm(.., 0, 0, N,  OC, IC, inp, IC, W,    OC, 0, out,  OC, ..)
 *   dinp      dinp[N,IC] += dout[N,OC] @ W^T          fc_gemm(.., 0, 1, N,  IC, OC, dout, OC, W,   OC, 1, dinp, IC, ..)
 *   dweight   dW[IC,OC] += inp^T[IC,N] @ dout[N,OC]   fc_gemm(.., 1, 0, IC, OC, N,  inp, IC, dout, OC, 1, dW,  OC, ..)
 *
 * FC_BF16: both operands are rounded to bfloat16 (round to nearest even, by the CPU's vcvtne2ps2bf16)
 * while they are packed; products and sums are fp32 (vdpbf16ps), AVX512_BF16 only. FC_F32: plain fp32
 * with FMA on the AVX-512, AVX2 and NEON paths. The path is fc_isa() (csrc/fc_isa.h, set from
 * Python); the build needs no -march flag. Where the path has no engine for the precision, fc_gemm
 * returns FC_GEMM_UNSUPPORTED and computes nothing (fc_gemm_available says so beforehand).
 *
 * Threads: with nthreads > 1 (0 = omp_get_max_threads()) the call opens ONE OpenMP parallel region
 * (libgomp, the pool the Cython kernels already use) and splits C between threads (its rows where
 * M > N, else its columns); it spawns nothing else. Called from inside a parallel region, or with
 * nthreads == 1, it runs on the calling thread only. Packing buffers are per calling thread, grown
 * on demand, never freed.
 */
#ifndef FASTCHAR_GEMM_BF16_H
#define FASTCHAR_GEMM_BF16_H

#ifdef __cplusplus
extern "C" {
#endif

enum { FC_F32 = 0, FC_BF16 = 1 };
enum { FC_GEMM_OK = 0, FC_GEMM_UNSUPPORTED = -1, FC_GEMM_NOMEM = -2, FC_GEMM_BADARG = -3 };

/* 1 when fc_gemm runs this precision on the path in use. */
int fc_gemm_available(int precision);

int fc_gemm(int precision, int trans_a, int trans_b, long M, long N, long K, const float *A, long lda,
            const float *B, long ldb, float beta, float *C, long ldc, int nthreads);

#ifdef __cplusplus
}
#endif
#endif

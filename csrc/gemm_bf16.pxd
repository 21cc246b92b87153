# Declarations of csrc/gemm_bf16.h (packed bf16 / fp32 matrix products) for Cython modules.
# A module that cimports this must compile csrc/gemm_bf16.c too (see setup.py's fastchar._gemm).

cdef extern from "gemm_bf16.h" nogil:
    enum:
        FC_F32
        FC_BF16
        FC_GEMM_OK
        FC_GEMM_UNSUPPORTED
        FC_GEMM_NOMEM
        FC_GEMM_BADARG
    int fc_gemm_available(int precision)
    int fc_gemm(int precision, int trans_a, int trans_b, long M, long N, long K, const float *A, long lda,
                const float *B, long ldb, float beta, float *C, long ldc, int nthreads)

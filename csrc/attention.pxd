# Declarations of csrc/attention.h (vectorised causal attention) for Cython modules.
# A module that cimports this must compile csrc/attention.c and csrc/gemm_bf16.c too.

cdef extern from "attention.h" nogil:
    ctypedef struct fc_att_dropout:
        unsigned int key
        unsigned int thr
        float dscale
    int fc_attention_available(long C, long NH)
    int fc_attention_forward(float *out, float *att, const float *qkv, long B, long T, long C, long NH,
                             const fc_att_dropout *drop, int nthreads)
    int fc_attention_backward(float *dqkv, float *datt, const float *dout, const float *qkv, const float *att,
                              long B, long T, long C, long NH, const fc_att_dropout *drop, int nthreads,
                              int overwrite)

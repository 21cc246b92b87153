# Declarations of csrc/fc_isa.h (the instruction-set path of the compiled kernels) for Cython modules.
# A module that cimports this must compile csrc/fc_isa.c too.

cdef extern from "fc_isa.h" nogil:
    enum:
        FC_ISA_GENERIC
        FC_ISA_AVX2
        FC_ISA_AVX512
        FC_ISA_NEON
    int fc_isa_cpu()
    int fc_isa_cpu_bf16()
    int fc_isa_compiled(int isa)
    void fc_isa_set(int isa, int bf16)
    int fc_isa()
    int fc_isa_bf16()

/* Instruction-set paths of the compiled kernels, and the one in use.

   Paths: FC_ISA_GENERIC (no fastchar vector kernel: the Cython loops and BLAS), FC_ISA_AVX2 (x86-64
   AVX2 + FMA), FC_ISA_AVX512 (x86-64 AVX-512 F/VL/BW/DQ + FMA; AVX512_BF16 as well for the bf16
   products) and FC_ISA_NEON (ARM64). The kernels are written once over a vector width (fc_simd.h)
   and compiled for every path this compiler can target (fc_each_isa.h); fc_isa_cpu() says what the
   CPU offers (cpuid + xgetbv on x86-64; ARM64 always has NEON). The path in use is chosen in Python
   (fastchar/isa.py reads FASTCHAR_ISA once) and handed down by fc_isa_set(): the C code reads no
   environment variable. Until fc_isa_set is called the path is FC_ISA_GENERIC. Each extension
   module holds its own copy of this state (the Python side sets every one). */
#ifndef FC_ISA_H
#define FC_ISA_H

#ifdef __cplusplus
extern "C" {
#endif

enum { FC_ISA_GENERIC = 0, FC_ISA_AVX2 = 1, FC_ISA_AVX512 = 2, FC_ISA_NEON = 3 };

/* The best path of this CPU (and OS) that this build compiled, and whether it has AVX512_BF16. */
int fc_isa_cpu(void);
int fc_isa_cpu_bf16(void);
/* 1 when this build holds the kernels of `isa` (a compiler without vector extensions has none). */
int fc_isa_compiled(int isa);
/* The path in use, and whether the bf16 products may run (set from Python; never above the CPU's). */
void fc_isa_set(int isa, int bf16);
int fc_isa(void);
int fc_isa_bf16(void);

#ifdef __cplusplus
}
#endif

/* Compilers that take GCC's vector extensions and per-function targets build the vector paths. */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(FC_NO_SIMD)
#if defined(__x86_64__)
#define FC_BUILD_X86 1
#elif defined(__aarch64__)
#define FC_BUILD_NEON 1
#endif
#endif

#endif

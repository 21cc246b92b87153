/* Compile the kernel source named by FC_BODY once per vector path of this compiler.

   Usage, in a .c file:   #define FC_BODY "attention_body.h"
                          #include "fc_each_isa.h"
   Each pass defines FC_VL (floats per vector register), FC_SUF (the suffix fc_simd.h's FC_N()
   appends to every name, so the passes do not collide) and FC_ISA_ID, compiles fc_simd.h's vector
   layer and then FC_BODY, with the path's instruction set switched on for those functions only
   (GCC: #pragma GCC target, clang: #pragma clang attribute): the rest of the extension stays
   baseline, and a path runs only after fc_isa_cpu() said the CPU has it.
   x86-64: avx512 (16 floats, AVX-512 F/VL/BW/DQ + FMA) and avx2 (8 floats, AVX2 + FMA);
   ARM64: neon (4 floats; NEON is part of the baseline, no target switch). Other compilers and
   CPUs: no pass, and the callers keep their generic code. */
#include "fc_isa.h"

#ifdef FC_BUILD_X86
#define FC_VL 16
#define FC_SUF avx512
#define FC_ISA_ID FC_ISA_AVX512
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#endif
#include "fc_simd.h"
#include FC_BODY
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef FC_VL
#undef FC_SUF
#undef FC_ISA_ID

#define FC_VL 8
#define FC_SUF avx2
#define FC_ISA_ID FC_ISA_AVX2
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
/* tune=haswell: GCC's generic tuning splits unaligned 256-bit loads in two (and then kept the
   AVX2 tile's accumulators on the stack); every AVX2 CPU loads them whole */
#pragma GCC target("avx2,fma,tune=haswell")
#endif
#include "fc_simd.h"
#include FC_BODY
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef FC_VL
#undef FC_SUF
#undef FC_ISA_ID
#endif /* FC_BUILD_X86 */

#ifdef FC_BUILD_NEON
#define FC_VL 4
#define FC_SUF neon
#define FC_ISA_ID FC_ISA_NEON
#include "fc_simd.h"
#include FC_BODY
#undef FC_VL
#undef FC_SUF
#undef FC_ISA_ID
#endif

#undef FC_BODY

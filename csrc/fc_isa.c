/* See fc_isa.h: CPU detection and the path in use (one copy per extension module). */
#include "fc_isa.h"

#ifdef FC_BUILD_X86
#include <cpuid.h>

/* bit 0: AVX2 + FMA usable, bit 1: AVX-512 F/VL/BW/DQ usable, bit 2: AVX512_BF16 too */
static int detect_x86(void) {
    unsigned a, b, c, d, xlo, xhi;
    int flags = 0;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1;
    if (!osxsave || !avx || __get_cpuid_max(0, 0) < 7) return 0;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    __cpuid_count(7, 0, a, b, c, d);
    unsigned max_sub = a;
    /* XCR0: the OS saves SSE (bit 1) and AVX (bit 2) state; for AVX-512 also opmask, ZMM_Hi256, Hi16_ZMM */
    if ((xlo & 0x6u) == 0x6u && fma && ((b >> 5) & 1)) flags |= 1;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if ((flags & 1) && (xlo & 0xE6u) == 0xE6u && f && dq && bw && vl) flags |= 2;
    if ((flags & 2) && max_sub >= 1) {
        __cpuid_count(7, 1, a, b, c, d);
        if ((a >> 5) & 1) flags |= 4;
    }
    return flags;
}

static int cpu_flags = -1;
static int flags(void) {
    if (cpu_flags < 0) cpu_flags = detect_x86(); /* idempotent; a race only repeats the cpuid */
    return cpu_flags;
}
int fc_isa_cpu(void) { return flags() & 2 ? FC_ISA_AVX512 : flags() & 1 ? FC_ISA_AVX2 : FC_ISA_GENERIC; }
int fc_isa_cpu_bf16(void) { return (flags() >> 2) & 1; }
int fc_isa_compiled(int isa) { return isa == FC_ISA_GENERIC || isa == FC_ISA_AVX2 || isa == FC_ISA_AVX512; }
#elif defined(FC_BUILD_NEON)
int fc_isa_cpu(void) { return FC_ISA_NEON; }
int fc_isa_cpu_bf16(void) { return 0; }
int fc_isa_compiled(int isa) { return isa == FC_ISA_GENERIC || isa == FC_ISA_NEON; }
#else
int fc_isa_cpu(void) { return FC_ISA_GENERIC; }
int fc_isa_cpu_bf16(void) { return 0; }
int fc_isa_compiled(int isa) { return isa == FC_ISA_GENERIC; }
#endif

static int isa_in_use = FC_ISA_GENERIC, bf16_in_use = 0;

/* A path above the CPU's is refused here too (the Python side reports it as an error first). */
void fc_isa_set(int isa, int bf16) {
    int best = fc_isa_cpu();
    int ok = isa == FC_ISA_GENERIC || (fc_isa_compiled(isa) && (isa == best || (isa == FC_ISA_AVX2 && best == FC_ISA_AVX512)));
    isa_in_use = ok ? isa : FC_ISA_GENERIC;
    bf16_in_use = bf16 && isa_in_use == FC_ISA_AVX512 && fc_isa_cpu_bf16();
}
int fc_isa(void) { return isa_in_use; }
int fc_isa_bf16(void) { return bf16_in_use; }

/* The vector layer the kernels are written in: GCC/clang vector extensions over FC_VL floats.
   No include guard: fc_each_isa.h includes it once per path, with FC_VL and FC_SUF defined.

   vf, vi, vu      FC_VL floats, int32, uint32 (loads and stores may be unaligned)
   FC_N(name)      name_<suffix>: every function of a kernel body is declared with it
   vload(p), vstore(p, v), vset1(x), viset1(i), vzero()
   vfma(acc, a, b) acc + a * b, one fused multiply-add (GCC and clang contract it where FMA exists)
   vmax(a, b), vsel(mask, a, b) (mask lanes all ones: a, else b), vand0(mask, a) (a or 0.0f)
   vlanes()        (0, 1, .., FC_VL-1) as vi; vlt(n) the mask of lanes < n
   vstore_nt(p, v) a streaming store, past the caches (p aligned to the vector; NEON: vstore),
   vstore_fence()  after a kernel's last vstore_nt (other threads read what they wrote)
   vexp(x)         exp(x) for x <= 0 (the steps of fc_math.h's fc_expf)
   vhsum(v), vhmax(v) horizontal sum (a fixed pairwise order) and maximum */
#undef vf
#undef vi
#undef vu
#undef FC_N
#define FC_CAT2(a, b) a##_##b
#define FC_CAT(a, b) FC_CAT2(a, b)
#define FC_N(name) FC_CAT(name, FC_SUF)
#define vf FC_N(vf)
#define vi FC_N(vi)
#define vu FC_N(vu)

typedef float vf __attribute__((vector_size(FC_VL * 4), aligned(4)));
typedef int vi __attribute__((vector_size(FC_VL * 4), aligned(4)));
typedef unsigned int vu __attribute__((vector_size(FC_VL * 4), aligned(4)));

#ifdef __clang__
#pragma clang fp contract(fast)
#endif

#define FC_SIMD_INLINE static inline __attribute__((always_inline))
#ifdef FC_BUILD_X86
#include <immintrin.h> /* vmax, vstore_nt: see there */
#endif

/* vf's alignment is 4 bytes: these are unaligned loads and stores (vmovups), which GCC keeps in
   registers; a memcpy-based load made GCC 12 bounce AVX2 vectors through the stack. */
FC_SIMD_INLINE vf FC_N(vload)(const float *p) { return *(const vf *)p; }
FC_SIMD_INLINE void FC_N(vstore)(float *p, vf v) { *(vf *)p = v; }
FC_SIMD_INLINE vf FC_N(vzero)(void) { return (vf){0}; }
FC_SIMD_INLINE vf FC_N(vset1)(float x) {
#if FC_VL == 16
    return (vf){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif FC_VL == 8
    return (vf){x, x, x, x, x, x, x, x};
#else
    return (vf){x, x, x, x};
#endif
}
FC_SIMD_INLINE vi FC_N(viset1)(int x) {
#if FC_VL == 16
    return (vi){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#elif FC_VL == 8
    return (vi){x, x, x, x, x, x, x, x};
#else
    return (vi){x, x, x, x};
#endif
}
FC_SIMD_INLINE vi FC_N(vlanes)(void) {
#if FC_VL == 16
    return (vi){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#elif FC_VL == 8
    return (vi){0, 1, 2, 3, 4, 5, 6, 7};
#else
    return (vi){0, 1, 2, 3};
#endif
}
FC_SIMD_INLINE vf FC_N(vfma)(vf acc, vf a, vf b) { return acc + a * b; }
FC_SIMD_INLINE vf FC_N(vsel)(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
FC_SIMD_INLINE vf FC_N(vand0)(vi mask, vf a) { return (vf)((vi)a & mask); }
/* x86: one vmaxps (the compare-and-blend of vsel is two instructions, and the softmax's exp runs
   one per score); elsewhere the portable form, which the compilers turn into fmax. The intrinsics
   name the same instruction on every x86 path, so this stays one source. */
#if defined(FC_BUILD_X86) && FC_VL == 16
FC_SIMD_INLINE vf FC_N(vmax)(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
FC_SIMD_INLINE void FC_N(vstore_nt)(float *p, vf v) { _mm512_stream_ps(p, (__m512)v); }
FC_SIMD_INLINE void FC_N(vstore_fence)(void) { _mm_sfence(); }
#elif defined(FC_BUILD_X86) && FC_VL == 8
/* builtins, not intrinsics: GCC refuses to inline the AVX intrinsics into the tune=haswell pass */
FC_SIMD_INLINE vf FC_N(vmax)(vf a, vf b) { return (vf)__builtin_ia32_maxps256((__v8sf)a, (__v8sf)b); }
#ifdef __clang__
FC_SIMD_INLINE void FC_N(vstore_nt)(float *p, vf v) { __builtin_nontemporal_store((__v8sf)v, (__v8sf *)p); }
#else
FC_SIMD_INLINE void FC_N(vstore_nt)(float *p, vf v) { __builtin_ia32_movntps256(p, (__v8sf)v); }
#endif
FC_SIMD_INLINE void FC_N(vstore_fence)(void) { __builtin_ia32_sfence(); }
#else
FC_SIMD_INLINE vf FC_N(vmax)(vf a, vf b) { return FC_N(vsel)(a > b, a, b); }
FC_SIMD_INLINE void FC_N(vstore_nt)(float *p, vf v) { FC_N(vstore)(p, v); }
FC_SIMD_INLINE void FC_N(vstore_fence)(void) {}
#endif
FC_SIMD_INLINE vi FC_N(vlt)(long n) { return FC_N(vlanes)() < FC_N(viset1)((int)(n < 0 ? 0 : n > FC_VL ? FC_VL : n)); }
/* Halving steps: fold(v, w) moves lanes w..2w-1 down to 0..w-1, so v + fold(v, w) adds lane i + w
   to lane i (the pairwise order of the scalar loop below, kept where there is no shuffle builtin). */
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
#if FC_VL == 16
#define FC_FOLD(v, w)                                                                                   \
    ((w) == 8   ? __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15) \
     : (w) == 4 ? __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7)         \
     : (w) == 2 ? __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3)         \
                : __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1))
#elif FC_VL == 8
#define FC_FOLD(v, w)                                                                                   \
    ((w) == 4   ? __builtin_shufflevector(v, v, 4, 5, 6, 7, 4, 5, 6, 7)                                 \
     : (w) == 2 ? __builtin_shufflevector(v, v, 2, 3, 2, 3, 2, 3, 2, 3)                                 \
                : __builtin_shufflevector(v, v, 1, 1, 1, 1, 1, 1, 1, 1))
#else
#define FC_FOLD(v, w) ((w) == 2 ? __builtin_shufflevector(v, v, 2, 3, 2, 3) : __builtin_shufflevector(v, v, 1, 1, 1, 1))
#endif
FC_SIMD_INLINE float FC_N(vhsum)(vf v) {
    if (FC_VL >= 16) v = v + FC_FOLD(v, 8);
    if (FC_VL >= 8) v = v + FC_FOLD(v, 4);
    v = v + FC_FOLD(v, 2);
    v = v + FC_FOLD(v, 1);
    return v[0];
}
FC_SIMD_INLINE float FC_N(vhmax)(vf v) {
    if (FC_VL >= 16) v = FC_N(vmax)(v, FC_FOLD(v, 8));
    if (FC_VL >= 8) v = FC_N(vmax)(v, FC_FOLD(v, 4));
    v = FC_N(vmax)(v, FC_FOLD(v, 2));
    v = FC_N(vmax)(v, FC_FOLD(v, 1));
    return v[0];
}
#undef FC_FOLD
#else
FC_SIMD_INLINE float FC_N(vhsum)(vf v) {
    float h[FC_VL];
    FC_N(vstore)(h, v);
    for (int w = FC_VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; ++i) h[i] += h[i + w];
    return h[0];
}
FC_SIMD_INLINE float FC_N(vhmax)(vf v) {
    float m = v[0];
    for (int i = 1; i < FC_VL; ++i) m = v[i] > m ? v[i] : m;
    return m;
}
#endif

/* exp(x) for x <= 0, lane by lane: fc_expf of fc_math.h (the same constants and steps), which the
   Cython kernels use too; the training and the decode attention share this one. */
FC_SIMD_INLINE vf FC_N(vexp)(vf x) {
    x = FC_N(vmax)(x, FC_N(vset1)(-87.0f));
    vf n = x * FC_N(vset1)(1.44269504088896341f) + FC_N(vset1)(12582912.0f);
    n = n - FC_N(vset1)(12582912.0f);
    vf r = x - n * FC_N(vset1)(0.693359375f);
    r = r + n * FC_N(vset1)(2.12194440e-4f);
    vf p = FC_N(vset1)(1.9875691500e-4f);
    p = p * r + FC_N(vset1)(1.3981999507e-3f);
    p = p * r + FC_N(vset1)(8.3334519073e-3f);
    p = p * r + FC_N(vset1)(4.1665795894e-2f);
    p = p * r + FC_N(vset1)(1.6666665459e-1f);
    p = p * r + FC_N(vset1)(5.0000001201e-1f);
    p = p * r * r + r + FC_N(vset1)(1.0f);
    vi e = (__builtin_convertvector(n, vi) + FC_N(viset1)(127)) << 23;
    return p * (vf)e;
}

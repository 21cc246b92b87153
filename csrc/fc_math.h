/* fastchar's shared C helpers (one definition each): the float32 exp of every softmax, GELU's erf. */
#ifndef FC_MATH_H
#define FC_MATH_H

/* exp(x) for x <= 0 within ~2 ulp (Cephes expf), branch-free so loops over it vectorise.
   Round x/ln2 to n with the 1.5*2^23 trick, r = x - n ln2 (two-part ln2), degree-6 polynomial
   for e^r, then scale by 2^n built in the exponent bits. Inputs below -87 flush to ~1e-38. */
static inline float fc_expf(float x) {
    union { float f; int i; } b;
    float n, r, p;
    x = x > -87.0f ? x : -87.0f;
    n = x * 1.44269504088896341f + 12582912.0f;
    n = n - 12582912.0f;
    r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    b.i = ((int)n + 127) << 23;
    return p * b.f;
}

/* erf(x) within ~1.2e-7 absolute (Numerical Recipes' Chebyshev fit of erfc, through fc_expf),
   branch-free so loops over it vectorise: the exact GELU's erf in the compiled kernels (libm's
   erff is a call per element). */
static inline float fc_erff(float x) {
    float z = x < 0.0f ? -x : x, t = 1.0f / (1.0f + 0.5f * z), p, e;
    p = 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    e = t * fc_expf(p - z * z); /* erfc(|x|) */
    return x < 0.0f ? e - 1.0f : 1.0f - e;
}

/* The exact GELU 0.5 x (1 + erf(x / sqrt 2)) and its derivative Phi(x) + x phi(x). */
static inline float fc_gelu(float x) { return 0.5f * x * (1.0f + fc_erff(x * 0.70710678118654752f)); }
static inline float fc_gelu_grad(float x) {
    return 0.5f * (1.0f + fc_erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * fc_expf(-0.5f * x * x);
}

/* lowbias32((i mod 2**32) * 0x9E3779B9 + key), wrapping uint32 arithmetic: the dropout mask hash
   (the constants are fastchar/graph.py's DROPOUT_GOLDEN, LOWBIAS32_MUL1, LOWBIAS32_MUL2). */
static inline unsigned int fc_dropout_hash(long long i, unsigned int key) {
    unsigned int h = (unsigned int)i * 0x9E3779B9u + key;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    return h ^ (h >> 16);
}

#endif

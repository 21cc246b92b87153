/* fastchar's shared C helpers (one definition each): the float32 exp of every softmax. */
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

/* The machine's arithmetic limits: fp32 FMA and bf16 vdpbf16ps GFLOP/s from register-only loops.
 *
 *   gcc -O3 -fopenmp -march=native benchmarks/peak.c -o /tmp/peak && /tmp/peak 2
 *
 * Each thread runs 12 independent zmm accumulator chains (enough to cover the FMA latency on
 * two pipes) for a fixed count, reported as the median of 5 repeats. An FMA is 2 FLOP per fp32
 * lane (32 per zmm); a vdpbf16ps is 2 FLOP per bf16 pair (64 per zmm). Not part of the package.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12
#define ITERS 20000000L

static int cmp(const void *a, const void *b) { return (*(const double *)a > *(const double *)b) - (*(const double *)a < *(const double *)b); }

__attribute__((target("avx512f"))) static float fp32_loop(long n) {
    __m512 acc[CHAINS], x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_set1_ps((float)c);
    for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_fmadd_ps(acc[c], x, y);
    }
    float s = 0;
    for (int c = 0; c < CHAINS; ++c) s += _mm512_reduce_add_ps(acc[c]);
    return s;
}

__attribute__((target("avx512f,avx512bf16"))) static float bf16_loop(long n) {
    __m512 acc[CHAINS];
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F80), b = (__m512bh)_mm512_set1_epi16(0x3F80);
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_setzero_ps();
    for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
    }
    float s = 0;
    for (int c = 0; c < CHAINS; ++c) s += _mm512_reduce_add_ps(acc[c]);
    return s;
}

static double gflops(int threads, int bf16) {
    double times[5];
    volatile float sink = 0;
    for (int r = 0; r < 5; ++r) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float s = bf16 ? bf16_loop(ITERS) : fp32_loop(ITERS);
#pragma omp atomic
            sink += s;
        }
        times[r] = omp_get_wtime() - t0;
    }
    qsort(times, 5, sizeof(double), cmp);
    return (double)threads * ITERS * CHAINS * (bf16 ? 64.0 : 32.0) / times[2] / 1e9;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    for (int t = 1; t <= threads; ++t)
        printf("%d thread(s): fp32 FMA %.0f GFLOP/s, bf16 vdpbf16ps %.0f GFLOP/s\n", t, gflops(t, 0), gflops(t, 1));
    return 0;
}

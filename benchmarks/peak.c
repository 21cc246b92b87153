/* The machine's arithmetic limits: fp32 FMA and bf16 vdpbf16ps GFLOP/s from register-only loops, on any
 * x86-64 with AVX2 + FMA or AVX-512 (the instruction set is chosen at run time, not by -march).
 *
 *   gcc -O3 -fopenmp benchmarks/peak.c -o /tmp/peak && /tmp/peak 2          # 1 and 2 threads, best ISA
 *   /tmp/peak 2 avx2                                                         # the AVX2 fp32 limit
 *   /tmp/peak --bandwidth 3.2 2      # read bandwidth of a 3.2 MB buffer on 2 threads (see read_bandwidth)
 *   /tmp/peak --latency              # a cache line's round trip between two threads (see round_trip)
 *
 * Each thread runs 12 independent accumulator chains (enough to cover the FMA latency on two pipes)
 * for a fixed count, reported as the median of 5 repeats. An FMA is 2 FLOP per fp32 lane (32 per
 * zmm, 16 per ymm); a vdpbf16ps is 2 FLOP per bf16 pair (64 per zmm). The last line is JSON
 * ({"threads", "isa", "fp32", "bf16"} of the last thread count; bf16 null without AVX512_BF16), which
 * benchmarks/bench_train.py reads. Not part of the package.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHAINS 12
#define ITERS 20000000L

static int cmp(const void *a, const void *b) { return (*(const double *)a > *(const double *)b) - (*(const double *)a < *(const double *)b); }

__attribute__((target("avx512f"))) static float fp32_avx512(long n) {
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

/* 12 ymm accumulators and 2 constants: 14 of AVX2's 16 registers */
__attribute__((target("avx2,fma"))) static float fp32_avx2(long n) {
    __m256 acc[CHAINS], x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(0.9999999f);
    for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_set1_ps((float)c);
    for (long i = 0; i < n; ++i) {
#pragma GCC unroll 12
        for (int c = 0; c < CHAINS; ++c) acc[c] = _mm256_fmadd_ps(acc[c], x, y);
    }
    float t[8], s = 0;
    for (int c = 0; c < CHAINS; ++c) {
        _mm256_storeu_ps(t, acc[c]);
        for (int i = 0; i < 8; ++i) s += t[i];
    }
    return s;
}

__attribute__((target("avx512f,avx512bf16"))) static float bf16_avx512(long n) {
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

typedef float (*loop_fn)(long);

/* GFLOP/s of `threads` threads each running loop (flops FLOP per chain step) */
static double gflops(int threads, loop_fn loop, double flops) {
    double times[5];
    volatile float sink = 0;
    for (int r = 0; r < 5; ++r) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float s = loop(ITERS);
#pragma omp atomic
            sink += s;
        }
        times[r] = omp_get_wtime() - t0;
    }
    qsort(times, 5, sizeof(double), cmp);
    return (double)threads * ITERS * CHAINS * flops / times[2] / 1e9;
}

/* Read bandwidth from cache: the bound of a one-stream decode step, which streams its weights
 * (3.2 MB in fp32, 1.6 MB in bf16 for the base model) once per character, each thread its own share.
 * `peak --bandwidth MB THREADS`: a buffer of MB megabytes (10^6 bytes) split in equal contiguous
 * shares, one per thread (as the decode splits a product's columns); each thread sums its share
 * REPS times with 8 independent vector accumulators (GCC vector extensions, cloned for AVX-512 and
 * AVX2 and chosen at run time: 64-byte vectors split into what the ISA has); GB/s = bytes read /
 * time, median of 5. */
typedef float bw_vec __attribute__((vector_size(64)));
#define BW_ACC 8

__attribute__((target_clones("avx512f", "avx2", "default"))) static float read_share(const bw_vec *p, long n,
                                                                                     int reps) {
    bw_vec acc[BW_ACC] = {{0}};
    for (int r = 0; r < reps; ++r)
        for (long i = 0; i + BW_ACC <= n; i += BW_ACC)
#pragma GCC unroll 8
            for (int a = 0; a < BW_ACC; ++a) acc[a] += p[i + a];
    float s = 0;
    for (int a = 0; a < BW_ACC; ++a)
        for (int j = 0; j < 16; ++j) s += acc[a][j];
    return s;
}

static double read_bandwidth(int threads, double megabytes) {
    long nvec = (long)(megabytes * 1e6 / sizeof(bw_vec)) / (threads * BW_ACC) * (threads * BW_ACC);
    long share = nvec / threads;
    int reps = (int)(4e9 / (nvec * sizeof(bw_vec))) + 1;  /* about 4 GB read per timing */
    bw_vec *buf = aligned_alloc(64, nvec * sizeof(bw_vec));
    double times[5];
    volatile float sink = 0;
    if (buf == NULL) return 0;
#pragma omp parallel num_threads(threads)
    {   /* each thread writes its own share first: its pages and lines start in its own cache */
        int t = omp_get_thread_num();
        for (long i = t * share; i < (t + 1) * share; ++i)
            for (int j = 0; j < 16; ++j) buf[i][j] = (float)((i + j) % 7);
    }
    for (int r = 0; r < 5; ++r) {
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float s = read_share(buf + omp_get_thread_num() * share, share, reps);
#pragma omp atomic
            sink += s;
        }
        times[r] = omp_get_wtime() - t0;
    }
    qsort(times, 5, sizeof(double), cmp);
    free(buf);
    return (double)nvec * sizeof(bw_vec) * reps / times[2] / 1e9;
}

/* The round trip of a cache line between two threads (each writes the turn the other waits for),
 * median of 5 runs of 100,000 round trips: what each hand-over between the threads of a one-stream
 * decode step costs at least (it meets the other thread about 16 times a character). On a virtual
 * machine it depends on where the host runs the two virtual CPUs (same core complex or not). */
static double round_trip(void) {
    static volatile long turn __attribute__((aligned(64)));
    const long n = 100000;
    double times[5];
    for (int r = 0; r < 5; ++r) {
        turn = 0;
        double t0 = omp_get_wtime();
#pragma omp parallel num_threads(2)
        {
            long me = omp_get_thread_num();
            if (omp_get_num_threads() == 2)
                for (long i = 0; i < n; ++i) {
                    while (turn != 2 * i + me) _mm_pause();
                    turn = 2 * i + me + 1;
                }
        }
        times[r] = omp_get_wtime() - t0;
    }
    qsort(times, 5, sizeof(double), cmp);
    return times[2] / n * 1e9;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--latency") == 0) {
        printf("round trip between 2 threads: %.0f ns\n", round_trip());
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--bandwidth") == 0) {
        double mb = argc > 2 ? atof(argv[2]) : 3.2;
        int threads = argc > 3 ? atoi(argv[3]) : 1;
        printf("read bandwidth, %.2f MB buffer, %d thread(s): %.1f GB/s\n", mb, threads, read_bandwidth(threads, mb));
        return 0;
    }
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    __builtin_cpu_init();
    int has512 = __builtin_cpu_supports("avx512f"), has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int hasbf16 = has512 && __builtin_cpu_supports("avx512bf16");
    const char *isa = argc > 2 ? argv[2] : has512 ? "avx512" : "avx2";
    if (!((strcmp(isa, "avx512") == 0 && has512) || (strcmp(isa, "avx2") == 0 && has2))) {
        fprintf(stderr, "peak: this CPU has no %s (it has%s%s)\n", isa, has512 ? " avx512" : "", has2 ? " avx2" : " neither avx2 nor avx512");
        return 2;
    }
    int wide = strcmp(isa, "avx512") == 0;
    if (!wide) hasbf16 = 0; /* bf16 belongs to the avx512 path */
    double fp32 = 0, bf16 = 0;
    for (int t = 1; t <= threads; ++t) {
        fp32 = wide ? gflops(t, fp32_avx512, 32.0) : gflops(t, fp32_avx2, 16.0);
        bf16 = hasbf16 ? gflops(t, bf16_avx512, 64.0) : 0;
        printf("%d thread(s): fp32 FMA (%s) %.0f GFLOP/s", t, isa, fp32);
        if (hasbf16) printf(", bf16 vdpbf16ps %.0f GFLOP/s", bf16);
        printf("\n");
    }
    printf("{\"threads\": %d, \"isa\": \"%s\", \"fp32\": %.1f, \"bf16\": ", threads, isa, fp32);
    if (hasbf16) printf("%.1f}\n", bf16);
    else printf("null}\n");
    return 0;
}

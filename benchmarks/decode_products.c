/* The decode loop's packed products alone (fc_matmul_packed, fc_matmul_packed_bf16 in csrc/fc_decode.c),
   one thread: a step of the base model's products (per layer q/k/v 128x384, out 128x128, fc1 128x512,
   fc2 512x128; the head 128x65) for M rows, best of 20 batches of 50 steps. Built and run by
   benchmarks/bench_decode_products.py against the tree's own csrc/.

   usage: decode_products ISA BF16 M [M ...]   (ISA: fc_isa.h's code, 1 avx2, 2 avx512, 3 neon; BF16 0 or 1)
   prints one line per M: "M <rows> <seconds a step> <GFLOP/s>" */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "fc_decode.h"
#include "fc_isa.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: decode_products ISA BF16 M [M ...]\n");
        return 2;
    }
    int bf16 = atoi(argv[2]), n = 0;
    fc_isa_set(atoi(argv[1]), bf16);
    ptrdiff_t Ks[17], Ns[17];
    for (int l = 0; l < 4; l++) {
        const ptrdiff_t k[4] = {128, 128, 128, 512}, m[4] = {384, 128, 512, 128};
        for (int i = 0; i < 4; i++, n++) Ks[n] = k[i], Ns[n] = m[i];
    }
    Ks[n] = 128, Ns[n++] = 65;
    void *packs[17];
    double flop_row = 0;
    for (int i = 0; i < n; i++) {
        float *w = malloc(sizeof(float) * Ks[i] * Ns[i]);
        for (ptrdiff_t j = 0; j < Ks[i] * Ns[i]; j++) w[j] = (float)rand() / RAND_MAX - 0.5f;
        ptrdiff_t words = bf16 ? fc_packed_size_bf16(Ks[i], Ns[i]) : fc_packed_size(Ks[i], Ns[i]);
        packs[i] = aligned_alloc(64, (size_t)(words + 15) / 16 * 64);
        if (bf16) fc_pack16_bf16(packs[i], w, Ks[i], Ns[i], Ns[i]);
        else fc_pack16(packs[i], w, Ks[i], Ns[i], Ns[i]);
        flop_row += 2.0 * (double)(Ks[i] * Ns[i]);
        free(w);
    }
    for (int a = 3; a < argc; a++) {
        ptrdiff_t M = atoi(argv[a]);
        float *x = malloc(sizeof(float) * M * 512), *y = malloc(sizeof(float) * M * 512);
        uint32_t *xw = malloc(sizeof(uint32_t) * M * 512);
        for (ptrdiff_t j = 0; j < M * 512; j++) x[j] = (float)rand() / RAND_MAX;
        double best = 1e30;
        for (int r = 0; r < 20; r++) {
            double t0 = now();
            for (int rep = 0; rep < 50; rep++)
                for (int i = 0; i < n; i++) {
                    if (bf16) fc_matmul_packed_bf16(y, x, Ks[i], packs[i], M, Ks[i], 0, Ks[i], Ns[i], 0, Ns[i], xw);
                    else fc_matmul_packed(y, x, Ks[i], packs[i], M, Ks[i], 0, Ks[i], Ns[i], 0, Ns[i]);
                }
            double t = (now() - t0) / 50;
            best = t < best ? t : best;
        }
        printf("M %td %.9f %.2f\n", M, best, flop_row * (double)M / best / 1e9);
        free(x), free(y), free(xw);
    }
    return 0;
}

/* The native pieces of the Cython generation loop (csrc/_decode.pyx, declared in fc.pxd):
   matrix-vector(s) products, attention against the KV cache, rotary positions, and the lock-free
   work sharing of one generate_tokens call. Shapes: S cache rows (the window), C channels, HS head
   size, M new rows. */
#ifndef FC_DECODE_H
#define FC_DECODE_H

#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
static inline int fc_max_threads(void) { return omp_get_max_threads(); }
static inline int fc_thread_num(void) { return omp_get_thread_num(); }
#else
static inline int fc_max_threads(void) { return 1; }
static inline int fc_thread_num(void) { return 0; }
#endif

/* Work sharing without barriers. A stage is n tasks: the main thread runs task 0 itself, and
   publishes the other n - 1 as tickets (limit..limit+n-2: ticket t is task 1 + t % (n - 1)) that
   every thread claims until none is left; the main thread then waits until all are finished. A
   helper that is descheduled (another process on the core) just claims nothing, and the main
   thread runs its tasks itself: it only ever waits for a task already under way. Counters on their
   own cache lines, so that a stage moves as few lines between the cores as it can: the main thread
   writes only limit, the claims (next) stay in the helpers' caches unless the main thread takes a
   task, and done (and taken: see fc_taken) comes back. */
typedef struct {
    long next __attribute__((aligned(64)));
    long limit __attribute__((aligned(64)));
    long done __attribute__((aligned(64)));
    long taken __attribute__((aligned(64))); /* tickets whose stage description is no longer read */
    int quit __attribute__((aligned(64)));
} fc_team;

static inline void fc_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
/* A published, unclaimed ticket, or -1. */
static inline long fc_claim(fc_team *t) {
    long n = __atomic_load_n(&t->next, __ATOMIC_ACQUIRE);
    while (n < __atomic_load_n(&t->limit, __ATOMIC_ACQUIRE))
        if (__atomic_compare_exchange_n(&t->next, &n, n + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return n;
    return -1;
}
static inline void fc_finish(fc_team *t) { __atomic_add_fetch(&t->done, 1, __ATOMIC_RELEASE); }
/* A claimed ticket's stage description was copied (or its task ran on the main thread): the main thread
   may describe the next stage in its place (fc_wait_taken). */
static inline void fc_taken(fc_team *t) { __atomic_add_fetch(&t->taken, 1, __ATOMIC_RELEASE); }
static inline long fc_limit(fc_team *t) { return t->limit; }
/* Main thread only, every ticket of the last stage finished: publish n tickets. The stage's
   description is written before this. */
static inline void fc_publish(fc_team *t, long n) { __atomic_store_n(&t->limit, t->limit + n, __ATOMIC_RELEASE); }
static inline double fc_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
/* Spin, then yield (the thread waited for may share the core), until *count reaches target; returns 1
   if the wait took over `slow` seconds. */
static inline int fc_wait_count(long *count, long target, double slow) {
    long spins = 0;
    double t0 = 0.0;
    int late = 0;
    while (__atomic_load_n(count, __ATOMIC_ACQUIRE) < target) {
        if (++spins < 4096) {
            fc_pause();
            continue;
        }
        if (t0 == 0.0) t0 = fc_now();
        else if (fc_now() - t0 > slow) late = 1;
        sched_yield();
    }
    return late;
}
/* Main thread: wait until the tickets up to `target` are finished (fc_wait_finished), or their stage
   descriptions taken (fc_wait_taken); 1 if the wait took over `slow` seconds. */
static inline int fc_wait_finished(fc_team *t, long target, double slow) { return fc_wait_count(&t->done, target, slow); }
static inline int fc_wait_taken(fc_team *t, long target, double slow) { return fc_wait_count(&t->taken, target, slow); }
/* Helper with nothing to do: spin a while, then yield (the main thread may share its core). */
static inline void fc_idle(long *spins) {
    if (++*spins < 16384) fc_pause();
    else sched_yield();
}
/* Ask for the lines of p[0:bytes] (at most 8 KB) at once: rows another core has just written come
   over together, not one by one as a product's loop reaches them. */
static inline void fc_prefetch(const void *p, size_t bytes) {
    const char *c = (const char *)p;
    if (bytes > 8192) bytes = 8192;
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}
static inline void fc_set_quit(fc_team *t) { __atomic_store_n(&t->quit, 1, __ATOMIC_RELEASE); }
static inline int fc_quitting(fc_team *t) { return __atomic_load_n(&t->quit, __ATOMIC_ACQUIRE); }

/* Weights packed for the vector products (every path: 16 columns are 1, 2 or 4 registers): a (K, N)
   matrix as ceil(N/16) panels of 16 columns, each panel [K][16] floats, zero-padded past column N.
   fc_packed_size is the floats it takes. */
ptrdiff_t fc_packed_size(ptrdiff_t K, ptrdiff_t N);
void fc_pack16(float *dst, const float *w, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldw);
/* 1 if the path in use (fc_isa(): avx512, avx2 or neon) runs fc_matmul_packed; 0 on the generic path. */
int fc_packed_ok(void);
/* The rows of fc_matmul_packed's full tile on the path in use (decode_body.h's DP_ROWS; 1 on the
   generic path): a batch of a multiple of it runs no ragged tile. */
int fc_decode_tile_rows(void);
/* y[:M, j0:j1] = x[:M, k0:k1] @ w[k0:k1, j0:j1] with w (K, N) packed by fc_pack16; y row stride ldy, x
   row stride ldx (x points at column 0). Every output element is one fused multiply-add chain over
   k = k0..k1-1 from zero, whatever M, the row's place in the batch and the column range: the result
   does not depend on how rows are batched or columns split. A product over all of K is k0 = 0,
   k1 = K; a part of K (k0 < k1 inside it) is what a task of a fused stage sums (_decode.pyx). */
void fc_matmul_packed(float *y, const float *x, ptrdiff_t ldx, const float *wp, ptrdiff_t M, ptrdiff_t K, ptrdiff_t k0,
                      ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1);
/* The same in bf16 (AVX512_BF16): w packed by fc_pack16_bf16 as ceil(N/16) panels of [ceil(K/2)][16]
   words, a word the bf16 pair (w[2p, j], w[2p+1, j]) rounded to nearest even (low half first); x's
   rows x[m, k0:k1] are rounded the same way into xw (M, ceil((k1-k0)/2)) words first (k0 even). Each
   output element is one vdpbf16ps chain over the pairs from k0: again independent of the batch and
   the split. */
ptrdiff_t fc_packed_size_bf16(ptrdiff_t K, ptrdiff_t N);
void fc_pack16_bf16(uint32_t *dst, const float *w, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldw);
int fc_packed_bf16_ok(void);
void fc_matmul_packed_bf16(float *y, const float *x, ptrdiff_t ldx, const uint32_t *wp, ptrdiff_t M, ptrdiff_t K,
                           ptrdiff_t k0, ptrdiff_t k1, ptrdiff_t ldy, ptrdiff_t j0, ptrdiff_t j1, uint32_t *xw);
void fc_matmul(float *y, const float *x, ptrdiff_t ldx, const float *w, ptrdiff_t M, ptrdiff_t K, ptrdiff_t N,
               ptrdiff_t ldy, ptrdiff_t ldw);
/* The caches of one layer, in float32 (kv16 0): kt (C, S) keys time-last, vt (NH, S, HS) values
   position-major per head (decode_attention_body.h); or in bf16 (kv16 1, where fc_kv16_ok: AVX512_BF16,
   HS a multiple of 16 and at most 256, S even): kt (C/2, S, 2) pairs of channels, each position's
   pair side by side, vt (NH, S/2, HS, 2) pairs of positions, each channel's pair side by side (the
   operands of vdpbf16ps), both uint16 bits rounded to nearest even. */
int fc_kv16_ok(ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head);
/* Heads h0..h1-1 of row (3C,)'s key and value (row[C:2C], row[2C:3C]) into slot `slot`. */
void fc_kv_append(void *kt, void *vt, const float *row, ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0,
                  ptrdiff_t h1, ptrdiff_t slot, int kv16);
/* Attention of M new rows (qkv (M, 3C)) against the cache, heads h0..h1-1, into out (M, C); scores
   (S,) scratch. */
void fc_attention(float *out, const float *qkv, const void *kt, const void *vt, ptrdiff_t n0, ptrdiff_t M,
                  ptrdiff_t C, ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *scores, int kv16);
/* The batch's attention (heads h0..h1-1): row m is stream[m]'s new token; its key and value (from
   qkv (M, 3C)) go to slot[m] of that stream's layer `layer` cache, kall (B, L) of layer caches as
   above, which then holds n[m] rows; then fc_attention of that row over them into out[m] (M, C).
   The same values as fc_attention row by row; the next row's blocks are asked for while one row
   runs. */
void fc_attention_rows(float *out, const float *qkv, void *kall, void *vall, const int64_t *stream,
                       const int64_t *slot, const int64_t *n, ptrdiff_t L, ptrdiff_t layer, ptrdiff_t M, ptrdiff_t C,
                       ptrdiff_t S, ptrdiff_t n_head, ptrdiff_t h0, ptrdiff_t h1, float *scores, int kv16);
void fc_rope_tables(float *cos_rows, float *sin_rows, const double *inv_freq, ptrdiff_t half, int64_t pos0,
                    ptrdiff_t M);
void fc_rope_heads(float *qkv, const float *cos_rows, const float *sin_rows, ptrdiff_t M, ptrdiff_t C,
                   ptrdiff_t half, ptrdiff_t h0, ptrdiff_t h1);
void fc_rmsnorm(float *out, const float *x, const float *g, ptrdiff_t M, ptrdiff_t C, float eps);
void fc_layernorm(float *out, const float *x, const float *g, ptrdiff_t M, ptrdiff_t C, float eps);
void fc_matmul_t(float *y, const float *x, const float *w, ptrdiff_t M, ptrdiff_t K, ptrdiff_t N, ptrdiff_t ldy);

#endif

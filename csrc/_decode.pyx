# cython: language_level=3
"""fastchar._cydecode: the Cython backend's compiled generation loop (see fastchar/backends/cython_decode.py).

`generate_tokens` runs fastchar/sampler.py's sampler (KVCache.advance's window refill, sample_token's
temperature / top-k / top-p) for a chunk of new characters in one nogil call. It is the twin of
fastchar/backends/numba_decode.py: same name, signature, loop structure and scratch layout.

Every position goes through `_forward_rows`, which runs M positions at once (1 for a decode step,
window/2 for a refill, the prompt's length for the prompt): each weight row is read once per call
and reused for all M rows, so a refill costs one pass over the weights. The matrix product is plain
C (below) compiled three times (x86-64-v4 / v3 / baseline, target_clones of GCC or clang; the loader picks one
for the CPU), because the extension itself is built for the baseline ISA: SSE2 without FMA would
run the product several times slower.

Threads (OpenMP's count, i.e. fastchar.set_threads; at most max(2, C // 32)): at batch 1 a step is
~0.8 M multiply-adds, mostly streaming ~3 MB of weights, so each matrix product's output columns
(and the attention heads) are split across the threads, each streaming its share of the weights.
The main thread runs the loop (norms, embedding, logits, sampling) and publishes each stage as
tasks that any thread may claim (fc_team below); it never waits at a barrier for a helper that
has not started, so a helper descheduled by other work on the machine costs little, and one that
holds it up mid-task sends the next calls single-threaded for a while (SLOW_WAIT, SOLO_CALLS).
A task computes each value exactly as the single-threaded product would: the thread count never
changes the result.

Letters in shapes: S the window (cache rows), C channels, NH heads, HS head size, H the MLP width,
V vocabulary, L layers, N new tokens per call, P the flat parameter count.
Not here: batch > 1, float64 (the Python loop in fastchar/sampler.py covers both).
"""

from cython.parallel cimport parallel
from libc.math cimport exp, sqrtf
from libc.stdint cimport int64_t
from libc.stdlib cimport free

cdef extern from "<stdlib.h>" nogil:
    void* aligned_alloc(size_t alignment, size_t size)

cdef extern from *:
    """
    /* ifunc-based clones: GCC, and clang from 14 on, on x86-64 Linux (macOS has no ifunc; ARM needs none) */
    #if (defined(__clang__) ? __clang_major__ >= 14 : defined(__GNUC__)) && defined(__x86_64__) && defined(__linux__)
    #define FC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    #else
    #define FC_CLONES
    #endif
    #include <math.h>
    #include <sched.h>
    #include <time.h>

    /* The team of one generate_tokens call (OpenMP; without it, one thread). */
    #ifdef _OPENMP
    #include <omp.h>
    static int fc_max_threads(void) { return omp_get_max_threads(); }
    static int fc_thread_num(void) { return omp_get_thread_num(); }
    #else
    static int fc_max_threads(void) { return 1; }
    static int fc_thread_num(void) { return 0; }
    #endif

    /* Work sharing without barriers. The main thread publishes a stage of n tasks (tickets
       limit..limit+n-1); every thread claims tickets until none is left; the main thread then
       waits until all are finished. A helper that is descheduled (another process on the core)
       just claims nothing, and the main thread runs its tasks itself: it only ever waits for a
       task already under way. Counters on their own cache lines. */
    typedef struct {
        long next __attribute__((aligned(64)));
        long limit __attribute__((aligned(64)));
        long done __attribute__((aligned(64)));
        int quit __attribute__((aligned(64)));
    } fc_team;

    static void fc_pause(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }
    /* A published, unclaimed ticket, or -1. */
    static long fc_claim(fc_team *t) {
        long n = __atomic_load_n(&t->next, __ATOMIC_ACQUIRE);
        while (n < __atomic_load_n(&t->limit, __ATOMIC_ACQUIRE))
            if (__atomic_compare_exchange_n(&t->next, &n, n + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                return n;
        return -1;
    }
    static void fc_finish(fc_team *t) { __atomic_add_fetch(&t->done, 1, __ATOMIC_RELEASE); }
    /* Main thread only: the stage's description is written before this. */
    static void fc_publish(fc_team *t, long n) {
        __atomic_store_n(&t->limit, t->limit + n, __ATOMIC_RELEASE);
    }
    static double fc_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    /* Main thread: wait until every published task is finished. Spins, then yields (the helper it
       waits for may share its core); returns 1 if the wait took over `slow` seconds. */
    static int fc_wait_done(fc_team *t, double slow) {
        long spins = 0;
        double t0 = 0.0;
        int late = 0;
        while (__atomic_load_n(&t->done, __ATOMIC_ACQUIRE) < t->limit) {
            if (++spins < 4096) { fc_pause(); continue; }
            if (t0 == 0.0) t0 = fc_now();
            else if (fc_now() - t0 > slow) late = 1;
            sched_yield();
        }
        return late;
    }
    /* Helper with nothing to do: spin a while, then yield (the main thread may share its core). */
    static void fc_idle(long *spins) {
        if (++*spins < 16384) fc_pause();
        else sched_yield();
    }
    static void fc_set_quit(fc_team *t) { __atomic_store_n(&t->quit, 1, __ATOMIC_RELEASE); }
    static int fc_quitting(fc_team *t) { return __atomic_load_n(&t->quit, __ATOMIC_ACQUIRE); }

    /* y[:M] = x[:M] @ w; y (M, N) with row stride ldy, x (M, K), w (K, N) with row stride ldw, all
       row-major (a column slice y[:, j0:j1] = x @ w[:, j0:j1] is y + j0, w + j0, N = j1 - j0). Four
       input channels per pass over an output row; output rows in blocks of four, so each weight
       element loaded feeds four rows. Every output element is computed the same way whatever the
       slice, so splitting the columns across threads changes no value. */
    FC_CLONES
    static void fc_matmul(float *restrict y, const float *restrict x, const float *restrict w,
                          Py_ssize_t M, Py_ssize_t K, Py_ssize_t N,
                          Py_ssize_t ldy, Py_ssize_t ldw) {
        Py_ssize_t K4 = K - K % 4, m = 0, i, j;
        for (; m + 4 <= M; m += 4) {
            float *y0 = y + m * ldy, *y1 = y0 + ldy, *y2 = y1 + ldy, *y3 = y2 + ldy;
            const float *x0 = x + m * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            for (j = 0; j < N; j++) { y0[j] = 0.0f; y1[j] = 0.0f; y2[j] = 0.0f; y3[j] = 0.0f; }
            for (i = 0; i < K4; i += 4) {
                const float *w0 = w + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
                float a0 = x0[i], a1 = x0[i + 1], a2 = x0[i + 2], a3 = x0[i + 3];
                float b0 = x1[i], b1 = x1[i + 1], b2 = x1[i + 2], b3 = x1[i + 3];
                float c0 = x2[i], c1 = x2[i + 1], c2 = x2[i + 2], c3 = x2[i + 3];
                float d0 = x3[i], d1 = x3[i + 1], d2 = x3[i + 2], d3 = x3[i + 3];
                for (j = 0; j < N; j++) {
                    float v0 = w0[j], v1 = w1[j], v2 = w2[j], v3 = w3[j];
                    y0[j] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
                    y1[j] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3;
                    y2[j] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3;
                    y3[j] += d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3;
                }
            }
            for (; i < K; i++) {
                const float *wi = w + i * ldw;
                float a0 = x0[i], b0 = x1[i], c0 = x2[i], d0 = x3[i];
                for (j = 0; j < N; j++) {
                    y0[j] += a0 * wi[j]; y1[j] += b0 * wi[j]; y2[j] += c0 * wi[j]; y3[j] += d0 * wi[j];
                }
            }
        }
        for (; m < M; m++) {
            float *yr = y + m * ldy;
            const float *xr = x + m * K;
            for (j = 0; j < N; j++) yr[j] = 0.0f;
            for (i = 0; i < K4; i += 4) {
                const float *w0 = w + i * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
                float a0 = xr[i], a1 = xr[i + 1], a2 = xr[i + 2], a3 = xr[i + 3];
                for (j = 0; j < N; j++) yr[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
            }
            for (; i < K; i++) {
                const float *wi = w + i * ldw;
                float a0 = xr[i];
                for (j = 0; j < N; j++) yr[j] += a0 * wi[j];
            }
        }
    }

    /* exp(x) for x <= 0, Cephes expf as in _kernels.pyx (~2 ulp; below -87 flushes to ~1e-38). */
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

    /* out[m] = softmax(q[m] K[:p0+m+1]^T / sqrt(HS)) V[:p0+m+1] for heads h0..h1-1 (keys already
       cached; out's other columns are left alone). out (M, C); qkv (M, 3C), q first; kt, vt (C, S)
       with time last, so every inner loop runs over contiguous positions; scores (S,) scratch. */
    FC_CLONES
    static void fc_attention(float *restrict out, const float *restrict qkv, const float *restrict kt,
                             const float *restrict vt, Py_ssize_t p0, Py_ssize_t M, Py_ssize_t C,
                             Py_ssize_t S, Py_ssize_t n_head, Py_ssize_t h0, Py_ssize_t h1,
                             float *restrict scores) {
        Py_ssize_t HS = C / n_head, m, h, c, t, n;
        float scale = 1.0f / sqrtf((float)HS);
        for (m = 0; m < M; m++) {
            const float *q = qkv + m * 3 * C;
            n = p0 + m + 1;
            for (h = h0; h < h1; h++) {
                float mx, tot = 0.0f, inv;
                for (t = 0; t < n; t++) scores[t] = 0.0f;
                for (c = h * HS; c < h * HS + HS; c++) {
                    const float *krow = kt + c * S;
                    float qc = q[c] * scale;
                    for (t = 0; t < n; t++) scores[t] += qc * krow[t];
                }
                mx = scores[0];
                for (t = 1; t < n; t++) mx = scores[t] > mx ? scores[t] : mx;
                for (t = 0; t < n; t++) { scores[t] = fc_expf(scores[t] - mx); tot += scores[t]; }
                inv = 1.0f / tot;
                for (c = h * HS; c < h * HS + HS; c++) {
                    const float *vrow = vt + c * S;
                    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a;
                    Py_ssize_t n8 = n - n % 8, j;
                    for (t = 0; t < n8; t += 8)
                        for (j = 0; j < 8; j++) acc[j] += scores[t + j] * vrow[t + j];
                    a = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                    for (; t < n; t++) a += scores[t] * vrow[t];
                    out[m * C + c] = a * inv;
                }
            }
        }
    }
    """
    void fc_matmul(float* y, const float* x, const float* w, Py_ssize_t M, Py_ssize_t K,
                   Py_ssize_t N, Py_ssize_t ldy, Py_ssize_t ldw) noexcept nogil
    void fc_attention(float* out, const float* qkv, const float* kt, const float* vt, Py_ssize_t p0,
                      Py_ssize_t M, Py_ssize_t C, Py_ssize_t S, Py_ssize_t n_head, Py_ssize_t h0,
                      Py_ssize_t h1, float* scores) noexcept nogil
    int fc_max_threads() noexcept nogil
    int fc_thread_num() noexcept nogil
    ctypedef struct fc_team:
        long next
        long limit
        long done
        int quit
    void fc_pause() noexcept nogil
    long fc_claim(fc_team* t) noexcept nogil
    void fc_finish(fc_team* t) noexcept nogil
    void fc_publish(fc_team* t, long n) noexcept nogil
    int fc_wait_done(fc_team* t, double slow) noexcept nogil
    void fc_idle(long* spins) noexcept nogil
    double fc_now() noexcept nogil
    void fc_set_quit(fc_team* t) noexcept nogil
    int fc_quitting(fc_team* t) noexcept nogil


cdef float RMSNORM_EPS = 1e-5  # = fastchar.model.RMSNORM_EPS

# A helper that holds the main thread up for longer than SLOW_WAIT seconds (it was descheduled: other
# processes want the cores) sends the call solo, and the next calls run single-threaded: SOLO_CALLS
# of them, twice as many each time this repeats (up to MAX_SOLO_CALLS), back to SOLO_CALLS after a
# threaded call that went well.
cdef double SLOW_WAIT = 200e-6
cdef int SOLO_CALLS = 16
cdef int MAX_SOLO_CALLS = 1024
cdef int _solo_left = 0
cdef int _solo_next = SOLO_CALLS

# Index of each tensor in the offsets table (param_specs order): wte, wpe, then 6 per layer
# (ln1, qkv, proj, ln2, fc, mlp proj), then ln_f, lm_head.
cdef enum:
    WTE = 0
    WPE = 1
    LN1 = 0
    QKV = 1
    PROJ = 2
    LN2 = 3
    FC = 4
    MPROJ = 5
    PER_LAYER = 6


# ---------------------------------------------------------------------------------------------
# The forward pass over M new positions
# ---------------------------------------------------------------------------------------------

cdef void _rmsnorm(float* out, const float* x, const float* g, Py_ssize_t M, Py_ssize_t C) noexcept nogil:
    """out[m] = x[m] / sqrt(mean(x[m]**2) + eps) * g. out, x (M, C); g (C,)."""
    cdef Py_ssize_t m, c
    cdef float ss, s
    for m in range(M):
        ss = 0.0
        for c in range(C):
            ss = ss + x[m * C + c] * x[m * C + c]
        s = 1.0 / sqrtf(ss / C + RMSNORM_EPS)
        for c in range(C):
            out[m * C + c] = x[m * C + c] * s * g[c]


# What a stage does (Net.kind), and what its tasks do after their slice of a matrix product (Net.post)
cdef enum:
    MATMUL = 0
    ATTENTION = 1  # q, k, v of a range of heads (a slice of the qkv product each), then attention
    POST_NONE = 0
    POST_RESIDUAL = 2  # x += y over the slice
    POST_RELU2 = 3  # y = relu(y)**2 over the slice


cdef struct Net:
    # the model, the buffers, the team, and the stage now published (see _stage)
    const float* params
    const int64_t* offsets
    float* kcache
    float* vcache
    float* x
    float* hb
    float* proj
    float* qkv
    float* atty
    float* fch
    float* scores  # (ntask, S): one row per attention task
    Py_ssize_t L, S, C, H, V, n_head
    fc_team* team
    Py_ssize_t ntask
    bint solo  # the main thread runs every task itself, publishing none (see _stage)
    int kind
    int post
    float* y
    const float* xin
    const float* w
    Py_ssize_t M, K, N, p0
    float* kc
    float* vc


cdef inline Py_ssize_t _pad16(Py_ssize_t n) noexcept nogil:
    """n rounded up to a whole number of cache lines of floats (keeps 64-byte alignment)."""
    return (n + 15) // 16 * 16


cdef inline Py_ssize_t _split(Py_ssize_t n, Py_ssize_t t, Py_ssize_t nt) noexcept nogil:
    """First of task t's columns of n (of nt tasks): rounded to 16 floats, one cache line."""
    cdef Py_ssize_t j
    if t >= nt:
        return n
    j = (n * t // nt + 8) // 16 * 16
    return j if j < n else n


cdef void _task(Net* net, Py_ssize_t i) noexcept nogil:
    """Task i of the published stage: a column slice of its matrix product (and the post-op on that
    slice), or a range of attention heads: their columns of q, k and v (so no other task's output is
    needed), the keys and values into the cache, and attention. Each value is computed as it would
    be in one piece."""
    cdef Py_ssize_t C = net.C, S = net.S, M = net.M, N = net.N
    cdef Py_ssize_t j0, j1, m, j, part
    cdef Py_ssize_t h0 = net.n_head * i // net.ntask, h1 = net.n_head * (i + 1) // net.ntask
    cdef float r
    cdef float* y = net.y
    if net.kind == ATTENTION:
        if h1 <= h0:
            return
        j0 = h0 * (C // net.n_head)
        j1 = h1 * (C // net.n_head)
        for part in range(3):
            fc_matmul(net.qkv + part * C + j0, net.xin, net.w + part * C + j0, M, C, j1 - j0, 3 * C, 3 * C)
        for m in range(M):
            for j in range(j0, j1):
                net.kc[j * S + net.p0 + m] = net.qkv[m * 3 * C + C + j]
                net.vc[j * S + net.p0 + m] = net.qkv[m * 3 * C + 2 * C + j]
        fc_attention(net.atty, net.qkv, net.kc, net.vc, net.p0, M, C, S, net.n_head, h0, h1, net.scores + i * S)
        return
    j0 = _split(N, i, net.ntask)
    j1 = _split(N, i + 1, net.ntask)
    if j1 <= j0:
        return
    fc_matmul(y + j0, net.xin, net.w + j0, M, net.K, j1 - j0, N, N)
    if net.post == POST_RESIDUAL:
        for m in range(M):
            for j in range(m * N + j0, m * N + j1):
                net.x[j] = net.x[j] + y[j]
    elif net.post == POST_RELU2:
        for m in range(M):
            for j in range(m * N + j0, m * N + j1):
                r = y[j] if y[j] > 0 else 0.0
                y[j] = r * r


cdef void _stage(Net* net) noexcept nogil:
    """Main thread: publish the stage described in net, run tasks until none is left, wait for all.

    If a helper held it up for over SLOW_WAIT (descheduled mid-task: the cores are busy with other
    work), the rest of the call runs solo: every task on the main thread, in the same split.
    """
    cdef long t
    cdef Py_ssize_t i
    if net.solo:
        for i in range(net.ntask):
            _task(net, i)
        return
    fc_publish(net.team, net.ntask)
    while True:
        t = fc_claim(net.team)
        if t < 0:
            break
        _task(net, t % net.ntask)
        fc_finish(net.team)
    if fc_wait_done(net.team, SLOW_WAIT):
        net.solo = True


cdef void _helper(Net* net) noexcept nogil:
    """Every other thread: run published tasks until the main thread is done."""
    cdef long t, spins = 0
    while True:
        t = fc_claim(net.team)
        if t >= 0:
            _task(net, t % net.ntask)
            fc_finish(net.team)
            spins = 0
        elif fc_quitting(net.team):
            break
        else:
            fc_idle(&spins)


cdef void _matmul_stage(Net* net, float* y, const float* xin, const float* w, Py_ssize_t M, Py_ssize_t K,
                        Py_ssize_t N, int post) noexcept nogil:
    net.kind = MATMUL
    net.y, net.xin, net.w, net.M, net.K, net.N, net.post = y, xin, w, M, K, N, post
    _stage(net)


cdef void _forward_rows(Net* net, float* logits, const int* tokens, Py_ssize_t p0, Py_ssize_t M) noexcept nogil:
    """Encode tokens[p0:p0+M] at positions p0..p0+M-1, appending their keys/values to the cache,
    and put the last position's logits (V,) in logits. Main thread; the helpers share the matrix
    products (by output columns, so each streams a share of the weights) and the attention heads.

    tokens (S,); kcache, vcache (L, C, S), time last; x, hb, proj, atty (S, C); qkv (S, 3C); fch (S, H).
    """
    cdef Py_ssize_t L = net.L, S = net.S, C = net.C, H = net.H, V = net.V
    cdef const float* params = net.params
    cdef const int64_t* offsets = net.offsets
    cdef float* x = net.x
    cdef float* hb = net.hb
    cdef const float* wte = params + offsets[2 * WTE]
    cdef const float* wpe = params + offsets[2 * WPE]
    cdef Py_ssize_t m, c, layer, b
    for m in range(M):
        for c in range(C):
            x[m * C + c] = wte[tokens[p0 + m] * C + c] + wpe[(p0 + m) * C + c]
    net.p0 = p0
    for layer in range(L):
        b = 2 * (2 + layer * PER_LAYER)  # this layer's first row of offsets, as a flat index
        net.kc = net.kcache + layer * S * C
        net.vc = net.vcache + layer * S * C
        _rmsnorm(hb, x, params + offsets[b + 2 * LN1], M, C)
        net.kind = ATTENTION
        net.xin, net.w, net.M = hb, params + offsets[b + 2 * QKV], M
        _stage(net)
        _matmul_stage(net, net.proj, net.atty, params + offsets[b + 2 * PROJ], M, C, C, POST_RESIDUAL)
        _rmsnorm(hb, x, params + offsets[b + 2 * LN2], M, C)
        _matmul_stage(net, net.fch, hb, params + offsets[b + 2 * FC], M, C, H, POST_RELU2)
        _matmul_stage(net, net.proj, net.fch, params + offsets[b + 2 * MPROJ], M, H, C, POST_RESIDUAL)
    b = 2 * (2 + L * PER_LAYER)
    _rmsnorm(hb, x + (M - 1) * C, params + offsets[b], 1, C)
    fc_matmul(logits, hb, params + offsets[b + 2], 1, C, V, V, V)


# ---------------------------------------------------------------------------------------------
# Sampling: sample_token of fastchar/sampler.py, operation for operation in float64
# ---------------------------------------------------------------------------------------------

cdef double _pairwise_sum(const double* a, Py_ssize_t n) noexcept nogil:
    """sum(a[:n]) in NumPy's summation order (8 accumulators up to 128 items, then halves)."""
    cdef double r[8]
    cdef double s
    cdef Py_ssize_t i, j, n2
    if n < 8:
        s = 0.0
        for i in range(n):
            s = s + a[i]
        return s
    if n <= 128:
        for j in range(8):
            r[j] = a[j]
        i = 8
        while i < n - n % 8:
            for j in range(8):
                r[j] = r[j] + a[i + j]
            i = i + 8
        s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        while i < n:
            s = s + a[i]
            i = i + 1
        return s
    n2 = n // 2
    n2 = n2 - n2 % 8
    return _pairwise_sum(a, n2) + _pairwise_sum(a + n2, n - n2)


cdef Py_ssize_t _sample(const float* logits, Py_ssize_t V, double temperature, Py_ssize_t top_k,
                        double top_p, double u, double* work, int* order) noexcept nogil:
    """Token id drawn from logits (V,) with the uniform u: greedy, or temperature/top-k/top-p.

    work (3V,) scratch; order (V,) scratch. top_k <= 0 means no top-k; top_p >= 1 no top-p.
    """
    cdef Py_ssize_t j, i, best, keep
    cdef double* z = work
    cdef double* probs = work + V
    cdef double* tmp = work + 2 * V
    cdef double v, kth, mx, total, mass, target, cdf
    if temperature == 0:
        best = 0
        for j in range(1, V):
            if logits[j] > logits[best]:
                best = j
        return best
    for j in range(V):
        z[j] = <double>logits[j] / temperature
    if 0 < top_k < V:
        # the k-th largest value (with multiplicity), by insertion sort descending; keep z >= it
        for j in range(V):
            v = z[j]
            i = j
            while i > 0 and tmp[i - 1] < v:
                tmp[i] = tmp[i - 1]
                i = i - 1
            tmp[i] = v
        kth = tmp[top_k - 1]
        for j in range(V):
            if not z[j] >= kth:
                z[j] = -1.0 / 0.0
    mx = z[0]
    for j in range(1, V):
        mx = z[j] if z[j] > mx else mx
    for j in range(V):
        probs[j] = exp(z[j] - mx)
    total = _pairwise_sum(probs, V)
    for j in range(V):
        probs[j] = probs[j] / total
    if top_p < 1:
        # stable descending order by probability (ties: lower id first), cumulative mass
        for j in range(V):
            i = j
            while i > 0 and probs[order[i - 1]] < probs[j]:
                order[i] = order[i - 1]
                i = i - 1
            order[i] = <int>j
        mass = 0.0
        for j in range(V):
            mass = mass + probs[order[j]]
            tmp[j] = mass
        target = top_p * tmp[V - 1]
        keep = V
        for j in range(V):
            if tmp[j] >= target:
                keep = j + 1
                break
        for j in range(V):
            z[j] = 0.0
        for j in range(keep):
            z[order[j]] = probs[order[j]]
        total = _pairwise_sum(z, V)
        for j in range(V):
            probs[j] = z[j] / total
    # first index whose cdf exceeds u * cdf[-1] (searchsorted side="right"), clamped to V - 1
    cdf = 0.0
    for j in range(V):
        cdf = cdf + probs[j]
        tmp[j] = cdf
    target = u * tmp[V - 1]
    for j in range(V):
        if tmp[j] > target:
            return j
    return V - 1


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

cdef struct Loop:
    # one generate_tokens call; see there. n_cache is updated on return.
    Net* net
    int* out
    int* tokens
    float* logits
    float* logits_out
    const double* uniforms
    double* work
    int* order
    double temperature
    double top_p
    Py_ssize_t top_k
    Py_ssize_t N
    Py_ssize_t n_cache
    Py_ssize_t n_feed
    Py_ssize_t n_rows
    bint advance_last
    double t_end  # when _run finished (the helpers may still have to notice)


cdef void _run(Loop* job) noexcept nogil:
    """The body of generate_tokens (main thread); tells the helpers to stop when done."""
    cdef Net* net = job.net
    cdef Py_ssize_t S = net.S, V = net.V, N = job.N, n_cache = job.n_cache
    cdef Py_ssize_t i, j, n_keep, tok
    cdef int* pt = job.tokens
    cdef float* logits = job.logits
    cdef double u
    if job.n_feed > 0:
        _forward_rows(net, logits, pt, n_cache, job.n_feed)
        n_cache = n_cache + job.n_feed
    for i in range(N):
        if job.n_rows > 0:
            for j in range(V):
                job.logits_out[i * V + j] = logits[j]
        u = job.uniforms[i] if job.temperature > 0 else 0.0
        tok = _sample(logits, V, job.temperature, job.top_k, job.top_p, u, job.work, job.order)
        job.out[i] = <int>tok
        if i + 1 == N and not job.advance_last:
            break
        if n_cache >= S:
            # KVCache.advance: keep the newest S//2 - 1 tokens plus this one, re-encoded from 0
            n_keep = S // 2 - 1 if S // 2 - 1 > 0 else 0
            for j in range(n_keep):
                pt[j] = pt[n_cache - n_keep + j]
            pt[n_keep] = <int>tok
            _forward_rows(net, logits, pt, 0, n_keep + 1)
            n_cache = n_keep + 1
        else:
            pt[n_cache] = <int>tok
            _forward_rows(net, logits, pt, n_cache, 1)
            n_cache = n_cache + 1
    job.n_cache = n_cache
    job.t_end = fc_now()
    fc_set_quit(net.team)


def generate_tokens(int[::1] out, int[::1] tokens, Py_ssize_t n_cache, Py_ssize_t n_feed,
                    const float[::1] params, const int64_t[:, ::1] offsets, Py_ssize_t n_head,
                    float[:, :, ::1] kcache, float[:, :, ::1] vcache, float[::1] scratch,
                    double[::1] work, int[::1] order, double temperature, Py_ssize_t top_k,
                    double top_p, const double[::1] uniforms, bint advance_last,
                    float[:, ::1] logits_out) -> int:
    """Sample out.shape[0] tokens, advancing the KV cache after each (after the last only if advance_last).

    First feeds tokens[n_cache:n_cache+n_feed] (a prompt; n_feed = 0 on later calls). The logits of
    the next draw live in scratch[:V] between calls. Returns the new cache length.
    out (N,) int32; tokens (S,) int32, the cached tokens at positions 0..n_cache-1;
    params (P,) float32; offsets (n, 2) int64 (start, stop) per param_specs entry;
    kcache, vcache (L, C, S) float32, time last, S the window; scratch (decode_scratch_size,) float32;
    work (3V,) float64; order (V,) int32; uniforms (N,) float64 (unused when temperature is 0);
    logits_out (N, V) float32 receives each draw's logits, or (0, V) to skip.
    Runs on OpenMP's thread count (fastchar.set_threads), at most max(2, C // 32); the result does
    not depend on it.
    """
    cdef Py_ssize_t L = kcache.shape[0], C = kcache.shape[1], S = kcache.shape[2]
    cdef Py_ssize_t V = (offsets[WTE, 1] - offsets[WTE, 0]) // C
    cdef Py_ssize_t H = (offsets[2 + FC, 1] - offsets[2 + FC, 0]) // C
    cdef Py_ssize_t N = out.shape[0]
    cdef Py_ssize_t n_rows = logits_out.shape[0]
    cdef int nt
    if offsets.shape[0] != 4 + PER_LAYER * L or offsets.shape[1] != 2:
        raise ValueError(f"offsets must have shape ({4 + PER_LAYER * L}, 2) for {L} layers")
    if scratch.shape[0] < V + S * (7 * C + H + 1) or work.shape[0] < 3 * V or order.shape[0] < V:
        raise ValueError("scratch, work or order is too small (see fastchar.sampler.decode_scratch_size)")
    if tokens.shape[0] < S or n_cache + n_feed > S or (n_cache + n_feed == 0 and N > 0):
        raise ValueError(f"need 0 < n_cache + n_feed <= S={S}, got {n_cache} + {n_feed}")
    if (temperature > 0 and uniforms.shape[0] < N) or (n_rows > 0 and (n_rows < N or logits_out.shape[1] != V)):
        raise ValueError("uniforms or logits_out is too small")
    if N == 0 and n_feed == 0:
        return n_cache
    nt = fc_max_threads()
    if nt > max(2, C // 32):
        nt = max(2, C // 32)
    if nt < 1:
        nt = 1
    global _solo_left, _solo_next
    if _solo_left > 0:
        _solo_left -= 1
        nt = 1
    cdef fc_team team
    cdef Net net
    cdef Loop job
    cdef Loop* jp = &job
    team.next = 0
    team.limit = 0
    team.done = 0
    team.quit = 0
    net.params = &params[0]
    net.offsets = &offsets[0, 0]
    net.kcache = &kcache[0, 0, 0]
    net.vcache = &vcache[0, 0, 0]
    # The activations (x, hb, proj, atty (S, C), qkv (S, 3C), fch (S, H), scores (nt, S)) in a block
    # of our own, each on a cache-line boundary: with C and H multiples of 16, the threads' column
    # slices then never share a cache line (in scratch, after the V logits, they would).
    cdef Py_ssize_t SC = _pad16(S * C)
    cdef float* block = <float*>aligned_alloc(64, (5 * SC + _pad16(3 * S * C) + _pad16(S * H) + _pad16(nt * S)) * 4)
    if block == NULL:
        raise MemoryError()
    net.x = block
    net.hb = net.x + SC
    net.proj = net.hb + SC
    net.atty = net.proj + SC
    net.qkv = net.atty + SC
    net.fch = net.qkv + _pad16(3 * S * C)
    net.scores = net.fch + _pad16(S * H)
    net.L, net.S, net.C, net.H, net.V, net.n_head = L, S, C, H, V, n_head
    net.team = &team
    net.ntask = nt
    net.solo = False
    job.net = &net
    job.out = &out[0] if N > 0 else NULL
    job.tokens = &tokens[0]
    job.logits = &scratch[0]
    job.logits_out = &logits_out[0, 0] if n_rows > 0 else NULL
    job.uniforms = &uniforms[0] if temperature > 0 and N > 0 else NULL
    job.work = &work[0]
    job.order = &order[0]
    job.temperature, job.top_p, job.top_k = temperature, top_p, top_k
    job.N, job.n_cache, job.n_feed, job.n_rows, job.advance_last = N, n_cache, n_feed, n_rows, advance_last
    if nt > 1:
        with nogil, parallel(num_threads=nt):
            if fc_thread_num() == 0:
                _run(jp)
            else:
                _helper(jp.net)
    else:
        with nogil:
            _run(jp)
    free(block)
    if nt > 1 and fc_now() - job.t_end > SLOW_WAIT:
        net.solo = True  # the end of the parallel region waited for a descheduled helper
    if net.solo:
        _solo_left = _solo_next
        _solo_next = min(2 * _solo_next, MAX_SOLO_CALLS)
    elif nt > 1:
        _solo_next = SOLO_CALLS
    return job.n_cache

# cython: language_level=3
"""fastchar._cykernels: the Cython kernels (see fastchar/backends/cython_cpu.py).

Every kernel of fastchar.backends.KERNELS with the reference signature: a thin `def` that unpacks
shapes from typed memoryviews, releases the GIL and calls `cdef ... noexcept nogil` loops. Parallel
loops (OpenMP `prange`) split the writes: rows for activations, channel blocks for weight grads,
(batch, head) pairs for attention, so no two threads ever `+=` into the same element. Matrix
products go through scipy's BLAS (`sgemm`); data is row-major and BLAS column-major, so a row-major
C = A @ B is computed as the column-major C^T = B^T @ A^T.

Letters in shapes: B batch, T time, C channels, NH heads, HS head size, V vocabulary, N = B*T rows,
IC/OC matmul in/out channels, H the MLP width, P the flat parameter count, S the cache length.
Not here: anything allocating, Python objects inside loops, float64 (only grad_norm sums in double).

Dropout masks are recomputed, never stored: element i of a tensor is kept when
lowbias32(i * 0x9E3779B9 + key) >= thr in wrapping uint32 arithmetic, thr from the reference's
_dropout_threshold(p) (fastchar/backends/reference.py), so every backend draws the same mask.
"""

from cython.parallel cimport parallel, prange
from libc.math cimport expf, logf, sqrt, sqrtf
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm

from fc cimport fc_dropout_hash, fc_expf, fc_gelu, fc_gelu_grad  # csrc/fc_math.h

from fastchar.backends.reference import _dropout_threshold

cdef extern from "fc_openmp.h" nogil:
    # OpenMP's thread count, or 1 in a build without OpenMP (see csrc/fc_openmp.h)
    enum: FC_HAVE_OPENMP
    int fc_omp_max_threads()
    void fc_omp_set_num_threads(int n)

# Elements per parallel chunk for elementwise kernels: big enough to amortise scheduling, small
# enough that 2 threads split the smallest training tensors (B*T*C = 768*128) evenly.
cdef enum:
    CHUNK = 4096
    # Channels per block when a weight gradient is reduced over rows (one thread owns a block).
    CBLOCK = 16
    # Below this many multiply-adds a decode step runs on one thread (OpenMP start-up dominates).
    DECODE_PARALLEL_MIN = 65536
    # Floats per (HS, T) stack scratch of one attention head (2 of them in backward: 32 KiB).
    ATT_SCRATCH = 4096


# Matrix products: our OpenMP threads split each product into single-threaded sgemm calls (BLAS
# runs 1 thread; fastchar.threads pins it), so one thread pool serves every kernel.
cdef inline int _gemm_threads() noexcept nogil:
    return fc_omp_max_threads()


def openmp_enabled() -> bool:
    """Whether this module was compiled with OpenMP (without it every loop runs on one thread)."""
    return FC_HAVE_OPENMP != 0


def openmp_max_threads() -> int:
    """OpenMP's current thread limit for this module's parallel loops (1 in a build without OpenMP)."""
    return fc_omp_max_threads()


def set_openmp_threads(int n) -> None:
    """Set OpenMP's thread count for this module's parallel loops (no effect without OpenMP)."""
    fc_omp_set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Small inline helpers. Reductions keep 8 independent partial sums so the compiler can vectorise
# them without reassociating (strict IEEE); the summation order is fixed, so results are
# deterministic and independent of the thread count.
# ---------------------------------------------------------------------------------------------

cdef inline float _dot(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    """sum_i a[i] * b[i] with 8 partial sums."""
    cdef float acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t n8 = n - n % 8
    cdef float s
    for j in range(8):
        acc[j] = 0.0
    for i in range(0, n8, 8):
        for j in range(8):
            acc[j] = acc[j] + a[i + j] * b[i + j]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for i in range(n8, n):
        s = s + a[i] * b[i]
    return s


cdef inline float _vmax(const float* a, Py_ssize_t n) noexcept nogil:
    """max of a[0:n], n >= 1, 8 partial maxima."""
    cdef float acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t n8 = n - n % 8
    cdef float s
    for j in range(8):
        acc[j] = a[0]
    for i in range(0, n8, 8):
        for j in range(8):
            acc[j] = a[i + j] if a[i + j] > acc[j] else acc[j]
    s = acc[0]
    for j in range(1, 8):
        s = acc[j] if acc[j] > s else s
    for i in range(n8, n):
        s = a[i] if a[i] > s else s
    return s


cdef inline float _vsum(const float* a, Py_ssize_t n) noexcept nogil:
    """sum of a[0:n], 8 partial sums."""
    cdef float acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t n8 = n - n % 8
    cdef float s
    for j in range(8):
        acc[j] = 0.0
    for i in range(0, n8, 8):
        for j in range(8):
            acc[j] = acc[j] + a[i + j]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for i in range(n8, n):
        s = s + a[i]
    return s


cdef inline void _axpy(float* y, float alpha, const float* x, Py_ssize_t n) noexcept nogil:
    """y += alpha * x."""
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = y[i] + alpha * x[i]


cdef inline void _row_times_t(float* out, const float* x, const float* mt, Py_ssize_t Tp,
                               Py_ssize_t n, Py_ssize_t HS, float alpha) noexcept nogil:
    """out[t2] = alpha * sum_d x[d] * mt[d*Tp + t2] for t2 < n; mt (HS, Tp) zero-padded, Tp % 8 == 0.

    Blocks of 8 keys are accumulated in registers over d (one store per key, no reloads).
    """
    cdef float acc[8]
    cdef Py_ssize_t t0, d, j
    cdef float xd
    cdef const float* m
    for t0 in range(0, n, 8):
        for j in range(8):
            acc[j] = 0.0
        for d in range(HS):
            xd = x[d]
            m = mt + d * Tp + t0
            for j in range(8):
                acc[j] = acc[j] + xd * m[j]
        for j in range(min(8, n - t0)):
            out[t0 + j] = alpha * acc[j]


cdef inline void _weighted_rows(float* out, const float* w, const float* rows, Py_ssize_t ld,
                                Py_ssize_t n, Py_ssize_t HS) noexcept nogil:
    """out[d] += sum_{t2 < n} w[t2] * rows[t2*ld + d]: blocks of 8 columns held in registers."""
    cdef float acc[8]
    cdef Py_ssize_t d0, t2, j
    cdef Py_ssize_t HS8 = HS - HS % 8
    cdef float wt
    cdef const float* r
    for d0 in range(0, HS8, 8):
        for j in range(8):
            acc[j] = out[d0 + j]
        for t2 in range(n):
            wt = w[t2]
            r = rows + t2 * ld + d0
            for j in range(8):
                acc[j] = acc[j] + wt * r[j]
        for j in range(8):
            out[d0 + j] = acc[j]
    for d0 in range(HS8, HS):
        wt = out[d0]
        for t2 in range(n):
            wt = wt + w[t2] * rows[t2 * ld + d0]
        out[d0] = wt


cdef inline void _causal_at_b(float* out, const float* x, Py_ssize_t ldx, const float* m,
                              Py_ssize_t T, Py_ssize_t Tp, Py_ssize_t HS) noexcept nogil:
    """out[d*Tp + t2] = sum_{t >= t2} x[t*ldx + d] * m[t*T + t2] for a lower-triangular m (T, T).

    x^T m with blocks of 8 columns of m accumulated in registers (rows t < t2 are zero in m).
    """
    cdef float acc[8]
    cdef Py_ssize_t d, t0, t, j
    cdef Py_ssize_t T8 = T - T % 8
    cdef float xd
    cdef const float* mr
    for d in range(HS):
        for t0 in range(0, T8, 8):
            for j in range(8):
                acc[j] = 0.0
            for t in range(t0, T):
                xd = x[t * ldx + d]
                mr = m + t * T + t0
                for j in range(8):
                    acc[j] = acc[j] + xd * mr[j]
            for j in range(8):
                out[d * Tp + t0 + j] = acc[j]
        for t0 in range(T8, T):
            xd = 0.0
            for t in range(t0, T):
                xd = xd + x[t * ldx + d] * m[t * T + t0]
            out[d * Tp + t0] = xd


cdef inline float _dropout_scale(Py_ssize_t i, unsigned int key, unsigned int thr,
                                 float dscale) noexcept nogil:
    """dscale if flat index i is kept, else 0: fc_dropout_hash(i, key) >= thr (csrc/fc_math.h)."""
    cdef unsigned int h = fc_dropout_hash(i, key)
    return dscale if h >= thr else <float>0.0


cdef inline unsigned int _threshold(double p) except? 0:
    """The reference's uint32 dropout threshold of p (raises ValueError outside [0, 1))."""
    return _dropout_threshold(p)


# ---------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------

cdef void _embedding_forward(float* out, const int* idx, const float* wte, const float* wpe,
                             Py_ssize_t N, Py_ssize_t T, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t n, c
    cdef const float* e
    cdef const float* p
    cdef float* o
    for n in prange(N, schedule="static"):
        e = wte + <Py_ssize_t>idx[n] * C
        p = wpe + (n % T) * C
        o = out + n * C
        for c in range(C):
            o[c] = e[c] + p[c]


def embedding_forward(float[:, :, ::1] out, const int[:, ::1] idx, const float[:, ::1] wte,
                      const float[:, ::1] wpe) -> None:
    """out[b, t] = wte[idx[b, t]] + wpe[t].

    out (B, T, C); idx (B, T) int32; wte (V, C); wpe (>=T, C), position t reads row t.
    """
    cdef Py_ssize_t B = out.shape[0], T = out.shape[1], C = out.shape[2]
    with nogil:
        _embedding_forward(&out[0, 0, 0], &idx[0, 0], &wte[0, 0], &wpe[0, 0], B * T, T, C)


cdef void _embedding_backward_block(float* dwte, float* dwpe, const float* dout, const int* idx,
                                    Py_ssize_t N, Py_ssize_t T, Py_ssize_t C,
                                    Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels [c0, c1) of every row: this block's columns of dwte and dwpe belong to one thread."""
    cdef Py_ssize_t n, c
    cdef float* w
    cdef float* p
    cdef const float* d
    for n in range(N):
        w = dwte + <Py_ssize_t>idx[n] * C
        p = dwpe + (n % T) * C
        d = dout + n * C
        for c in range(c0, c1):
            w[c] = w[c] + d[c]
            p[c] = p[c] + d[c]


def embedding_backward(float[:, ::1] dwte, float[:, ::1] dwpe, const float[:, :, ::1] dout,
                       const int[:, ::1] idx) -> None:
    """dwte[idx[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]. Accumulates.

    dwte (V, C); dwpe (>=T, C); dout (B, T, C); idx (B, T) int32.
    Parallel over channel blocks, so repeated tokens never race on a dwte row.
    """
    cdef Py_ssize_t B = dout.shape[0], T = dout.shape[1], C = dout.shape[2]
    cdef Py_ssize_t nblocks = (C + CBLOCK - 1) // CBLOCK
    cdef Py_ssize_t blk
    cdef float* pw = &dwte[0, 0]
    cdef float* pp = &dwpe[0, 0]
    cdef const float* pd = &dout[0, 0, 0]
    cdef const int* pi = &idx[0, 0]
    with nogil:
        for blk in prange(nblocks, schedule="static"):
            _embedding_backward_block(pw, pp, pd, pi, B * T, T, C,
                                      blk * CBLOCK, min((blk + 1) * CBLOCK, C))


# ---------------------------------------------------------------------------------------------
# rmsnorm
# ---------------------------------------------------------------------------------------------

cdef inline void _rmsnorm_row(float* out, float* rstd, const float* x, const float* w,
                              Py_ssize_t C, float eps) noexcept nogil:
    cdef Py_ssize_t c
    cdef float r = 1.0 / sqrtf(_dot(x, x, C) / C + eps)
    rstd[0] = r
    for c in range(C):
        out[c] = x[c] * r * w[c]


def rmsnorm_forward(float[:, :, ::1] out, float[:, ::1] rstd, const float[:, :, ::1] inp,
                    const float[::1] weight, float eps) -> None:
    """out = inp / sqrt(mean(inp**2) + eps) * weight, over the last axis.

    out (B, T, C); rstd (B, T) saved 1/sqrt(mean + eps); inp (B, T, C); weight (C,).
    """
    cdef Py_ssize_t B = inp.shape[0], T = inp.shape[1], C = inp.shape[2]
    cdef Py_ssize_t n
    cdef float* po = &out[0, 0, 0]
    cdef float* pr = &rstd[0, 0]
    cdef const float* px = &inp[0, 0, 0]
    cdef const float* pw = &weight[0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _rmsnorm_row(po + n * C, pr + n, px + n * C, pw, C, eps)


cdef inline void _rmsnorm_backward_row(float* dx, const float* dy, const float* x, const float* w,
                                       float r, Py_ssize_t C) noexcept nogil:
    """dx += r * (dy*w - xhat * mean(dy*w*xhat)), xhat = x*r; one reduction over C, then a pass."""
    cdef Py_ssize_t c
    cdef float acc[8]
    cdef Py_ssize_t j
    cdef Py_ssize_t C8 = C - C % 8
    cdef float s
    for j in range(8):
        acc[j] = 0.0
    for c in range(0, C8, 8):
        for j in range(8):
            acc[j] = acc[j] + dy[c + j] * w[c + j] * x[c + j]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for c in range(C8, C):
        s = s + dy[c] * w[c] * x[c]
    # mean(dxhat * xhat) = r * s / C; the xhat factor contributes another r
    s = s * r * r / C
    for c in range(C):
        dx[c] = dx[c] + r * (dy[c] * w[c] - x[c] * s)


cdef void _rmsnorm_dweight_block(float* dw, const float* dy, const float* x, const float* rstd,
                                 Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,
                                 Py_ssize_t c1) noexcept nogil:
    """dw[c0:c1] += sum_n dy[n, c] * x[n, c] * rstd[n]: one thread owns these channels."""
    cdef float acc[CBLOCK]
    cdef Py_ssize_t n, c
    cdef Py_ssize_t w = c1 - c0
    cdef float r
    for c in range(CBLOCK):
        acc[c] = 0.0
    for n in range(N):
        r = rstd[n]
        for c in range(w):
            acc[c] = acc[c] + dy[n * C + c0 + c] * x[n * C + c0 + c] * r
    for c in range(w):
        dw[c0 + c] = dw[c0 + c] + acc[c]


def rmsnorm_backward(float[:, :, ::1] dinp, float[::1] dweight, const float[:, :, ::1] dout,
                     const float[:, :, ::1] inp, const float[::1] weight,
                     const float[:, ::1] rstd) -> None:
    """dinp += rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * weight. Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); rstd (B, T).
    dinp is parallel over rows, dweight over channel blocks.
    """
    cdef Py_ssize_t B = inp.shape[0], T = inp.shape[1], C = inp.shape[2]
    cdef Py_ssize_t N = B * T
    cdef Py_ssize_t n, blk
    cdef Py_ssize_t nblocks = (C + CBLOCK - 1) // CBLOCK
    cdef float* pdx = &dinp[0, 0, 0]
    cdef float* pdw = &dweight[0]
    cdef const float* pdy = &dout[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    cdef const float* pw = &weight[0]
    cdef const float* pr = &rstd[0, 0]
    # one parallel region, two work-sharing loops (one fork/join instead of two)
    with nogil, parallel():
        for n in prange(N, schedule="static"):
            _rmsnorm_backward_row(pdx + n * C, pdy + n * C, px + n * C, pw, pr[n], C)
        for blk in prange(nblocks, schedule="static"):
            _rmsnorm_dweight_block(pdw, pdy, px, pr, N, C, blk * CBLOCK,
                                   min((blk + 1) * CBLOCK, C))


# ---------------------------------------------------------------------------------------------
# layernorm (a gain, no bias)
# ---------------------------------------------------------------------------------------------

cdef inline void _layernorm_row(float* out, float* mean, float* rstd, const float* x, const float* w,
                                Py_ssize_t C, float eps) noexcept nogil:
    """Two reductions over C (the mean, then the centred squares), then a pass."""
    cdef Py_ssize_t c
    cdef float m = _vsum(x, C) / C
    cdef float ss = 0.0
    cdef float d, r
    for c in range(C):
        d = x[c] - m
        ss = ss + d * d
    r = 1.0 / sqrtf(ss / C + eps)
    mean[0] = m
    rstd[0] = r
    for c in range(C):
        out[c] = (x[c] - m) * r * w[c]


def layernorm_forward(float[:, :, ::1] out, float[:, ::1] mean, float[:, ::1] rstd,
                      const float[:, :, ::1] inp, const float[::1] weight, float eps) -> None:
    """out = (inp - mean(inp)) / sqrt(var(inp) + eps) * weight over the last axis (biased variance).

    out (B, T, C); mean, rstd (B, T) saved; inp (B, T, C); weight (C,).
    """
    cdef Py_ssize_t B = inp.shape[0], T = inp.shape[1], C = inp.shape[2]
    cdef Py_ssize_t n
    cdef float* po = &out[0, 0, 0]
    cdef float* pm = &mean[0, 0]
    cdef float* pr = &rstd[0, 0]
    cdef const float* px = &inp[0, 0, 0]
    cdef const float* pw = &weight[0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _layernorm_row(po + n * C, pm + n, pr + n, px + n * C, pw, C, eps)


cdef inline void _layernorm_backward_row(float* dx, const float* dy, const float* x, const float* w,
                                         float m, float r, Py_ssize_t C) noexcept nogil:
    """dx += r * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); two reductions, then a pass."""
    cdef Py_ssize_t c
    cdef float sd = 0.0, sdx = 0.0, d
    for c in range(C):
        d = dy[c] * w[c]
        sd = sd + d
        sdx = sdx + d * (x[c] - m) * r
    sd = sd / C
    sdx = sdx / C
    for c in range(C):
        dx[c] = dx[c] + r * (dy[c] * w[c] - sd - (x[c] - m) * r * sdx)


cdef void _layernorm_dweight_block(float* dw, const float* dy, const float* x, const float* mean,
                                   const float* rstd, Py_ssize_t N, Py_ssize_t C, Py_ssize_t c0,
                                   Py_ssize_t c1) noexcept nogil:
    """dw[c0:c1] += sum_n dy[n, c] * (x[n, c] - mean[n]) * rstd[n]: one thread owns these channels."""
    cdef float acc[CBLOCK]
    cdef Py_ssize_t n, c
    cdef Py_ssize_t w = c1 - c0
    cdef float m, r
    for c in range(CBLOCK):
        acc[c] = 0.0
    for n in range(N):
        m = mean[n]
        r = rstd[n]
        for c in range(w):
            acc[c] = acc[c] + dy[n * C + c0 + c] * (x[n * C + c0 + c] - m) * r
    for c in range(w):
        dw[c0 + c] = dw[c0 + c] + acc[c]


def layernorm_backward(float[:, :, ::1] dinp, float[::1] dweight, const float[:, :, ::1] dout,
                       const float[:, :, ::1] inp, const float[::1] weight, const float[:, ::1] mean,
                       const float[:, ::1] rstd) -> None:
    """dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * weight;
    dweight += sum(dout * xhat). Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); mean, rstd (B, T).
    dinp is parallel over rows, dweight over channel blocks.
    """
    cdef Py_ssize_t B = inp.shape[0], T = inp.shape[1], C = inp.shape[2]
    cdef Py_ssize_t N = B * T
    cdef Py_ssize_t n, blk
    cdef Py_ssize_t nblocks = (C + CBLOCK - 1) // CBLOCK
    cdef float* pdx = &dinp[0, 0, 0]
    cdef float* pdw = &dweight[0]
    cdef const float* pdy = &dout[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    cdef const float* pw = &weight[0]
    cdef const float* pm = &mean[0, 0]
    cdef const float* pr = &rstd[0, 0]
    with nogil, parallel():
        for n in prange(N, schedule="static"):
            _layernorm_backward_row(pdx + n * C, pdy + n * C, px + n * C, pw, pm[n], pr[n], C)
        for blk in prange(nblocks, schedule="static"):
            _layernorm_dweight_block(pdw, pdy, px, pm, pr, N, C, blk * CBLOCK, min((blk + 1) * CBLOCK, C))


# ---------------------------------------------------------------------------------------------
# matmul (BLAS)
# ---------------------------------------------------------------------------------------------

cdef void _sgemm_rowmajor(char transa, char transb, int M, int Nn, int K, float alpha,
                          const float* A, int lda, const float* B_, int ldb, float beta,
                          float* Cm, int ldc) noexcept nogil:
    """Row-major C (M, Nn) = alpha * op(A) @ op(B) + beta * C, as column-major C^T = op(B)^T op(A)^T."""
    sgemm(&transb, &transa, &Nn, &M, &K, &alpha, <float*>B_, &ldb, <float*>A, &lda, &beta, Cm, &ldc)


cdef void _matmul_forward(float* out, const float* inp, const float* weight, int N, int IC,
                          int OC, int nthreads) noexcept nogil:
    """out (N, OC) = inp (N, IC) @ weight (IC, OC): one single-threaded sgemm per row block."""
    cdef int blk, r0, r1
    cdef int rows = (N + nthreads - 1) // nthreads
    if nthreads <= 1:
        _sgemm_rowmajor(b'N', b'N', N, OC, IC, 1.0, inp, IC, weight, OC, 0.0, out, OC)
        return
    for blk in prange(nthreads, schedule="static", num_threads=nthreads):
        r0 = blk * rows
        r1 = min(r0 + rows, N)
        if r1 > r0:
            _sgemm_rowmajor(b'N', b'N', r1 - r0, OC, IC, 1.0, inp + <Py_ssize_t>r0 * IC, IC,
                            weight, OC, 0.0, out + <Py_ssize_t>r0 * OC, OC)


def matmul_forward(float[:, ::1] out, const float[:, ::1] inp, const float[:, ::1] weight) -> None:
    """out = inp @ weight (weights are stored [in, out]).

    out (N, OC); inp (N, IC); weight (IC, OC).
    Row blocks of N run in parallel, each one single-threaded sgemm (see _gemm_threads).
    """
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef int nthreads = _gemm_threads()
    with nogil:
        _matmul_forward(&out[0, 0], &inp[0, 0], &weight[0, 0], N, IC, OC, nthreads)


cdef void _matmul_backward_item(float* dinp, float* dweight, const float* dout, const float* inp,
                                const float* weight, int N, int IC, int OC, int item,
                                int half) noexcept nogil:
    """Work item < half: a row block of dinp; otherwise a column block of dweight."""
    cdef int rows = (N + half - 1) // half
    cdef int cols = (OC + half - 1) // half
    cdef int r0, r1, c0, c1
    if item < half:
        # dinp[r0:r1] (rows, IC) += dout[r0:r1] (rows, OC) @ weight^T (OC, IC)
        r0 = item * rows
        r1 = min(r0 + rows, N)
        if r1 > r0:
            _sgemm_rowmajor(b'N', b'T', r1 - r0, IC, OC, 1.0, dout + <Py_ssize_t>r0 * OC, OC,
                            weight, OC, 1.0, dinp + <Py_ssize_t>r0 * IC, IC)
    else:
        # dweight[:, c0:c1] (IC, cols) += inp^T (IC, N) @ dout[:, c0:c1] (N, cols)
        c0 = (item - half) * cols
        c1 = min(c0 + cols, OC)
        if c1 > c0:
            _sgemm_rowmajor(b'T', b'N', IC, c1 - c0, N, 1.0, inp, IC, dout + c0, OC, 1.0,
                            dweight + c0, OC)


cdef void _matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                           const float* weight, int N, int IC, int OC,
                           int nthreads) noexcept nogil:
    """dinp and dweight cost the same N*IC*OC: half the threads take row blocks of dinp, the
    other half column blocks of dweight, so each output element has exactly one writer."""
    cdef int half = (nthreads + 1) // 2
    cdef int item
    if nthreads <= 1:
        _matmul_backward_item(dinp, dweight, dout, inp, weight, N, IC, OC, 0, 1)
        _matmul_backward_item(dinp, dweight, dout, inp, weight, N, IC, OC, 1, 1)
        return
    for item in prange(2 * half, schedule="static", num_threads=nthreads):
        _matmul_backward_item(dinp, dweight, dout, inp, weight, N, IC, OC, item, half)


def matmul_backward(float[:, ::1] dinp, float[:, ::1] dweight, const float[:, ::1] dout,
                    const float[:, ::1] inp, const float[:, ::1] weight) -> None:
    """dinp += dout @ weight.T; dweight += inp.T @ dout. Accumulates (BLAS beta = 1).

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC).
    """
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef int nthreads = _gemm_threads()
    with nogil:
        _matmul_backward(&dinp[0, 0], &dweight[0, 0], &dout[0, 0], &inp[0, 0], &weight[0, 0],
                         N, IC, OC, nthreads)


def matmul_t_forward(float[:, ::1] out, const float[:, ::1] inp, const float[:, ::1] weight) -> None:
    """out = inp @ weight.T (weight stored [out, in]: the tied lm_head reads wte).

    out (N, OC); inp (N, IC); weight (OC, IC). Row blocks of N in parallel, one sgemm each.
    """
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[0]
    cdef int nthreads = _gemm_threads()
    cdef int blk, r0, r1
    cdef int rows = (N + nthreads - 1) // nthreads
    cdef const float* px = &inp[0, 0]
    cdef const float* pw = &weight[0, 0]
    cdef float* po = &out[0, 0]
    with nogil:
        if nthreads <= 1:
            _sgemm_rowmajor(b'N', b'T', N, OC, IC, 1.0, px, IC, pw, IC, 0.0, po, OC)
        else:
            for blk in prange(nthreads, schedule="static", num_threads=nthreads):
                r0 = blk * rows
                r1 = min(r0 + rows, N)
                if r1 > r0:
                    _sgemm_rowmajor(b'N', b'T', r1 - r0, OC, IC, 1.0, px + <Py_ssize_t>r0 * IC, IC, pw, IC, 0.0,
                                    po + <Py_ssize_t>r0 * OC, OC)


cdef void _matmul_t_backward_item(float* dinp, float* dweight, const float* dout, const float* inp,
                                  const float* weight, int N, int IC, int OC, int item, int half) noexcept nogil:
    """Work item < half: a row block of dinp; otherwise a row block of dweight (output channels)."""
    cdef int rows = (N + half - 1) // half
    cdef int orows = (OC + half - 1) // half
    cdef int r0, r1
    if item < half:
        # dinp[r0:r1] (rows, IC) += dout[r0:r1] (rows, OC) @ weight (OC, IC)
        r0 = item * rows
        r1 = min(r0 + rows, N)
        if r1 > r0:
            _sgemm_rowmajor(b'N', b'N', r1 - r0, IC, OC, 1.0, dout + <Py_ssize_t>r0 * OC, OC, weight, IC, 1.0,
                            dinp + <Py_ssize_t>r0 * IC, IC)
    else:
        # dweight[r0:r1] (rows, IC) += dout[:, r0:r1]^T (rows, N) @ inp (N, IC)
        r0 = (item - half) * orows
        r1 = min(r0 + orows, OC)
        if r1 > r0:
            _sgemm_rowmajor(b'T', b'N', r1 - r0, IC, N, 1.0, dout + r0, OC, inp, IC, 1.0,
                            dweight + <Py_ssize_t>r0 * IC, IC)


def matmul_t_backward(float[:, ::1] dinp, float[:, ::1] dweight, const float[:, ::1] dout,
                      const float[:, ::1] inp, const float[:, ::1] weight) -> None:
    """dinp += dout @ weight; dweight += dout.T @ inp. Accumulates (BLAS beta = 1).

    dinp (N, IC); dweight (OC, IC); dout (N, OC); inp (N, IC); weight (OC, IC).
    """
    cdef int N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[0]
    cdef int nthreads = _gemm_threads()
    cdef int half = (nthreads + 1) // 2
    cdef int item
    with nogil:
        if nthreads <= 1:
            _matmul_t_backward_item(&dinp[0, 0], &dweight[0, 0], &dout[0, 0], &inp[0, 0], &weight[0, 0],
                                    N, IC, OC, 0, 1)
            _matmul_t_backward_item(&dinp[0, 0], &dweight[0, 0], &dout[0, 0], &inp[0, 0], &weight[0, 0],
                                    N, IC, OC, 1, 1)
        else:
            for item in prange(2 * half, schedule="static", num_threads=nthreads):
                _matmul_t_backward_item(&dinp[0, 0], &dweight[0, 0], &dout[0, 0], &inp[0, 0], &weight[0, 0],
                                        N, IC, OC, item, half)


# ---------------------------------------------------------------------------------------------
# attention: one (batch, head) pair per work item; its q, k, v columns and its dq, dk, dv
# columns belong to it alone.
# ---------------------------------------------------------------------------------------------

cdef void _attention_forward_bh(float* out, float* att, const float* qkv, Py_ssize_t T,
                                Py_ssize_t C, Py_ssize_t HS, float scale, bint drop,
                                Py_ssize_t base, unsigned int key, unsigned int thr,
                                float dscale) noexcept nogil:
    """One head: out (T, ld C) at its columns; att (T, T); qkv (T, ld 3C) at its q column.

    K is first transposed to kt (HS, Tp) on the stack (Tp = T rounded up to 8, zero-padded), so
    a score row is blocks of 8 keys accumulated in registers; then max, exp and sum, normalise,
    and out[t] = sum_t2 att[t, t2] v[t2] with HS columns held in registers. With drop, out uses
    att * mask (a row in pd scratch; base = att's flat index of this head's [0, 0]).
    """
    cdef float kt[ATT_SCRATCH]
    cdef float pd[ATT_SCRATCH]  # T <= Tp <= ATT_SCRATCH / HS
    cdef const float* w
    cdef Py_ssize_t C3 = 3 * C
    cdef Py_ssize_t Tp = (T + 7) // 8 * 8
    cdef Py_ssize_t t, t2, d, n
    cdef const float* k = qkv + C
    cdef const float* v = qkv + 2 * C
    cdef float* a
    cdef float mx, inv
    for d in range(HS):
        for t2 in range(T):
            kt[d * Tp + t2] = k[t2 * C3 + d]
        for t2 in range(T, Tp):
            kt[d * Tp + t2] = 0.0
    for t in range(T):
        a = att + t * T
        n = t + 1
        _row_times_t(a, qkv + t * C3, kt, Tp, n, HS, scale)
        mx = _vmax(a, n)
        for t2 in range(n):
            a[t2] = fc_expf(a[t2] - mx)
        inv = 1.0 / _vsum(a, n)
        for t2 in range(n):
            a[t2] = a[t2] * inv
        for t2 in range(n, T):
            a[t2] = 0.0
        w = a
        if drop:
            for t2 in range(n):
                pd[t2] = a[t2] * _dropout_scale(base + t * T + t2, key, thr, dscale)
            w = pd
        for d in range(HS):
            out[t * C + d] = 0.0
        _weighted_rows(out + t * C, w, v, C3, n, HS)


cdef void _attention_forward_bh_small(float* out, float* att, const float* qkv, Py_ssize_t T,
                                      Py_ssize_t C, Py_ssize_t HS, float scale, bint drop,
                                      Py_ssize_t base, unsigned int key, unsigned int thr,
                                      float dscale) noexcept nogil:
    """Fallback when HS * T exceeds the stack scratch: the same math with per-pair dot products."""
    cdef Py_ssize_t C3 = 3 * C
    cdef Py_ssize_t t, t2, d
    cdef const float* q
    cdef const float* k = qkv + C
    cdef const float* v = qkv + 2 * C
    cdef float* a
    cdef float* o
    cdef float mx, inv, w
    for t in range(T):
        q = qkv + t * C3
        a = att + t * T
        o = out + t * C
        for t2 in range(t + 1):
            a[t2] = _dot(q, k + t2 * C3, HS) * scale
        mx = _vmax(a, t + 1)
        for t2 in range(t + 1):
            a[t2] = fc_expf(a[t2] - mx)
        inv = 1.0 / _vsum(a, t + 1)
        for t2 in range(t + 1):
            a[t2] = a[t2] * inv
        for t2 in range(t + 1, T):
            a[t2] = 0.0
        for d in range(HS):
            o[d] = 0.0
        for t2 in range(t + 1):
            w = a[t2]
            if drop:
                w = w * _dropout_scale(base + t * T + t2, key, thr, dscale)
            _axpy(o, w, v + t2 * C3, HS)


def attention_forward(float[:, :, ::1] out, float[:, :, :, ::1] att,
                      const float[:, :, ::1] qkv) -> None:
    """Causal softmax attention: att = softmax(q k^T / sqrt(HS) + mask); out = att v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities, zero above the diagonal; qkv (B, T, 3C).
    """
    _attention_forward(out, att, qkv, False, 0, 0, 1.0)


def attention_dropout_forward(float[:, :, ::1] out, float[:, :, :, ::1] att,
                              const float[:, :, ::1] qkv, unsigned int key, double p) -> None:
    """attention_forward with dropout on the probabilities: out = (att * mask) v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities BEFORE dropout, zero above the diagonal;
    qkv (B, T, 3C); key uint32 and p in [0, 1): the mask over att's flat index.
    """
    _attention_forward(out, att, qkv, True, key, _threshold(p), 1.0 / (1.0 - p))


cdef _attention_forward(float[:, :, ::1] out, float[:, :, :, ::1] att, const float[:, :, ::1] qkv,
                        bint drop, unsigned int key, unsigned int thr, float dscale):
    cdef Py_ssize_t B = att.shape[0], NH = att.shape[1], T = att.shape[2]
    cdef Py_ssize_t C = out.shape[2]
    cdef Py_ssize_t HS = C // NH
    cdef float scale = 1.0 / sqrt(<double>HS)
    cdef Py_ssize_t bh, b, h
    cdef float* po = &out[0, 0, 0]
    cdef float* pa = &att[0, 0, 0, 0]
    cdef const float* pq = &qkv[0, 0, 0]
    with nogil:
        for bh in prange(B * NH, schedule="static"):
            b = bh // NH
            h = bh % NH
            if HS * ((T + 7) // 8 * 8) <= ATT_SCRATCH:
                _attention_forward_bh(po + b * T * C + h * HS, pa + bh * T * T,
                                      pq + b * T * 3 * C + h * HS, T, C, HS, scale,
                                      drop, bh * T * T, key, thr, dscale)
            else:
                _attention_forward_bh_small(po + b * T * C + h * HS, pa + bh * T * T,
                                            pq + b * T * 3 * C + h * HS, T, C, HS, scale,
                                            drop, bh * T * T, key, thr, dscale)


cdef inline void _add_transposed(float* y, Py_ssize_t ldy, const float* xt, Py_ssize_t Tp,
                                 Py_ssize_t T, Py_ssize_t HS) noexcept nogil:
    """y[t2*ldy + d] += xt[d*Tp + t2] for t2 < T, d < HS: a (HS, Tp) scratch added back as (T, HS)."""
    cdef Py_ssize_t t2, d
    for t2 in range(T):
        for d in range(HS):
            y[t2 * ldy + d] = y[t2 * ldy + d] + xt[d * Tp + t2]


cdef void _attention_backward_bh(float* dqkv, float* datt, const float* dout, const float* qkv,
                                 const float* att, Py_ssize_t T, Py_ssize_t C, Py_ssize_t HS,
                                 float scale, bint drop, Py_ssize_t base, unsigned int key,
                                 unsigned int thr, float dscale) noexcept nogil:
    """One head. Row by row, with v transposed to (HS, Tp) stack scratch (Tp = T rounded up to 8):
    datt = dy v^T, softmax backward in place (datt becomes dscores), dq += dscores k. Then two
    register-blocked passes: dv^T = dy^T att and dk^T = q^T dscores, added back to dqkv.
    With drop, dv^T = dy^T (att * mask) comes first, through datt (scratch until the row loop),
    and the row loop multiplies datt = dy v^T by the mask before the softmax backward."""
    cdef float vt[ATT_SCRATCH]
    cdef float dt[ATT_SCRATCH]
    cdef Py_ssize_t C3 = 3 * C
    cdef Py_ssize_t Tp = (T + 7) // 8 * 8
    cdef Py_ssize_t t, t2, d, n
    cdef const float* v = qkv + 2 * C
    cdef float* dk = dqkv + C
    cdef float* dv = dqkv + 2 * C
    cdef const float* a
    cdef float* da
    cdef float s
    if drop:
        # dv^T (HS, T) = dy^T (att * mask) first, while datt is free to hold att * mask (the
        # product needs zeros above the diagonal, which the copy gets)
        for t in range(T):
            a = att + t * T
            da = datt + t * T
            for t2 in range(t + 1):
                da[t2] = a[t2] * _dropout_scale(base + t * T + t2, key, thr, dscale)
            for t2 in range(t + 1, T):
                da[t2] = 0.0
        _causal_at_b(dt, dout, C, datt, T, Tp, HS)
        _add_transposed(dv, C3, dt, Tp, T, HS)
    for d in range(HS):
        for t2 in range(T):
            vt[d * Tp + t2] = v[t2 * C3 + d]
        for t2 in range(T, Tp):
            vt[d * Tp + t2] = 0.0
    for t in range(T):
        a = att + t * T
        da = datt + t * T
        n = t + 1
        # datt[t, :n] = dy[t] . v^T[:, :n]; with drop, times the mask: the grad before dropout
        _row_times_t(da, dout + t * C, vt, Tp, n, HS, 1.0)
        if drop:
            for t2 in range(n):
                da[t2] = da[t2] * _dropout_scale(base + t * T + t2, key, thr, dscale)
        # dscores = att * (datt - sum(att * datt)) * scale, in place; zero above the diagonal
        s = _dot(a, da, n)
        for t2 in range(n):
            da[t2] = a[t2] * (da[t2] - s) * scale
        for t2 in range(n, T):
            da[t2] = 0.0
        # dq[t] += sum_t2 dscores[t, t2] k[t2]
        _weighted_rows(dqkv + t * C3, da, qkv + C, C3, n, HS)
    # dv^T (HS, T) = dy^T att (done above with drop); dk^T (HS, T) = q^T dscores; through dt scratch
    if not drop:
        _causal_at_b(dt, dout, C, att, T, Tp, HS)
        _add_transposed(dv, C3, dt, Tp, T, HS)
    _causal_at_b(dt, qkv, C3, datt, T, Tp, HS)
    _add_transposed(dk, C3, dt, Tp, T, HS)


cdef void _attention_backward_bh_small(float* dqkv, float* datt, const float* dout,
                                       const float* qkv, const float* att, Py_ssize_t T,
                                       Py_ssize_t C, Py_ssize_t HS, float scale, bint drop,
                                       Py_ssize_t base, unsigned int key, unsigned int thr,
                                       float dscale) noexcept nogil:
    """Fallback when HS * T exceeds the stack scratch: per-pair dot products and axpys."""
    cdef Py_ssize_t C3 = 3 * C
    cdef Py_ssize_t t, t2
    cdef const float* q
    cdef const float* k = qkv + C
    cdef const float* v = qkv + 2 * C
    cdef float* dq
    cdef float* dk = dqkv + C
    cdef float* dv = dqkv + 2 * C
    cdef const float* a
    cdef const float* dy
    cdef float* da
    cdef float s, ds, w, m
    for t in range(T):
        q = qkv + t * C3
        dq = dqkv + t * C3
        a = att + t * T
        da = datt + t * T
        dy = dout + t * C
        for t2 in range(t + 1):
            da[t2] = _dot(dy, v + t2 * C3, HS)
            w = a[t2]
            if drop:  # dv uses att * mask; datt becomes the grad before dropout
                m = _dropout_scale(base + t * T + t2, key, thr, dscale)
                w = w * m
                da[t2] = da[t2] * m
            _axpy(dv + t2 * C3, w, dy, HS)
        s = _dot(a, da, t + 1)
        for t2 in range(t + 1):
            ds = a[t2] * (da[t2] - s) * scale
            _axpy(dq, ds, k + t2 * C3, HS)
            _axpy(dk + t2 * C3, ds, q, HS)


def attention_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt,
                       const float[:, :, ::1] dout, const float[:, :, ::1] qkv,
                       const float[:, :, :, ::1] att) -> None:
    """Backward of attention_forward. Accumulates into dqkv; datt is scratch and is overwritten.

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T).
    """
    _attention_backward(dqkv, datt, dout, qkv, att, False, 0, 0, 1.0)


def attention_dropout_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt,
                               const float[:, :, ::1] dout, const float[:, :, ::1] qkv,
                               const float[:, :, :, ::1] att, unsigned int key, double p) -> None:
    """Backward of attention_dropout_forward. Accumulates into dqkv; datt is scratch (overwritten).

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T)
    the saved probabilities before dropout; key, p as in the forward.
    """
    _attention_backward(dqkv, datt, dout, qkv, att, True, key, _threshold(p), 1.0 / (1.0 - p))


cdef _attention_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt,
                         const float[:, :, ::1] dout, const float[:, :, ::1] qkv,
                         const float[:, :, :, ::1] att, bint drop, unsigned int key,
                         unsigned int thr, float dscale):
    cdef Py_ssize_t B = att.shape[0], NH = att.shape[1], T = att.shape[2]
    cdef Py_ssize_t C = dout.shape[2]
    cdef Py_ssize_t HS = C // NH
    cdef float scale = 1.0 / sqrt(<double>HS)
    cdef Py_ssize_t bh, b, h
    cdef float* pdq = &dqkv[0, 0, 0]
    cdef float* pda = &datt[0, 0, 0, 0]
    cdef const float* pdy = &dout[0, 0, 0]
    cdef const float* pq = &qkv[0, 0, 0]
    cdef const float* pa = &att[0, 0, 0, 0]
    with nogil:
        for bh in prange(B * NH, schedule="static"):
            b = bh // NH
            h = bh % NH
            if HS * ((T + 7) // 8 * 8) <= ATT_SCRATCH:
                _attention_backward_bh(pdq + b * T * 3 * C + h * HS, pda + bh * T * T,
                                       pdy + b * T * C + h * HS, pq + b * T * 3 * C + h * HS,
                                       pa + bh * T * T, T, C, HS, scale,
                                       drop, bh * T * T, key, thr, dscale)
            else:
                _attention_backward_bh_small(pdq + b * T * 3 * C + h * HS, pda + bh * T * T,
                                             pdy + b * T * C + h * HS,
                                             pq + b * T * 3 * C + h * HS, pa + bh * T * T,
                                             T, C, HS, scale, drop, bh * T * T, key, thr, dscale)


cdef void _attention_decode_bh(float* out, const float* q, const float* kc, const float* vc,
                               Py_ssize_t n_ctx, Py_ssize_t C, Py_ssize_t HS,
                               float scale) noexcept nogil:
    """One query head against n_ctx cached rows (ld C): two passes, max then exp-weighted sum."""
    cdef Py_ssize_t t2, d
    cdef float mx = -3.0e38
    cdef float s, p, l = 0.0
    for t2 in range(n_ctx):
        s = _dot(q, kc + t2 * C, HS) * scale
        if s > mx:
            mx = s
    for d in range(HS):
        out[d] = 0.0
    for t2 in range(n_ctx):
        p = fc_expf(_dot(q, kc + t2 * C, HS) * scale - mx)
        l = l + p
        _axpy(out, p, vc + t2 * C, HS)
    p = 1.0 / l
    for d in range(HS):
        out[d] = out[d] * p


def attention_decode(float[:, ::1] out, const float[:, ::1] q, const float[:, :, ::1] kcache,
                     const float[:, :, ::1] vcache, Py_ssize_t n_ctx, Py_ssize_t n_head) -> None:
    """One query per sequence against the first n_ctx cached keys and values (all in the past).

    out (B, C); q (B, C); kcache (B, S, C); vcache (B, S, C), S >= n_ctx; n_ctx, n_head ints.
    """
    cdef Py_ssize_t B = q.shape[0], C = q.shape[1], S = kcache.shape[1]
    cdef Py_ssize_t HS = C // n_head
    cdef float scale = 1.0 / sqrt(<double>HS)
    cdef Py_ssize_t bh, b, h
    cdef float* po = &out[0, 0]
    cdef const float* pq = &q[0, 0]
    cdef const float* pk = &kcache[0, 0, 0]
    cdef const float* pv = &vcache[0, 0, 0]
    if n_ctx < 1 or n_ctx > S:
        raise ValueError(f"n_ctx={n_ctx} must be in [1, S={S}]")
    with nogil:
        if B * n_ctx * C < DECODE_PARALLEL_MIN:
            for bh in range(B * n_head):
                b = bh // n_head
                h = bh % n_head
                _attention_decode_bh(po + b * C + h * HS, pq + b * C + h * HS,
                                     pk + b * S * C + h * HS, pv + b * S * C + h * HS,
                                     n_ctx, C, HS, scale)
        else:
            for bh in prange(B * n_head, schedule="static"):
                b = bh // n_head
                h = bh % n_head
                _attention_decode_bh(po + b * C + h * HS, pq + b * C + h * HS,
                                     pk + b * S * C + h * HS, pv + b * S * C + h * HS,
                                     n_ctx, C, HS, scale)


# ---------------------------------------------------------------------------------------------
# elementwise: dropout, relu2, residual (parallel over CHUNK-sized slices)
# ---------------------------------------------------------------------------------------------

cdef inline void _dropout_forward_chunk(float* out, const float* x, Py_ssize_t n, Py_ssize_t i0,
                                        unsigned int key, unsigned int thr,
                                        float dscale) noexcept nogil:
    """out[i] = x[i] * mask(i0 + i): i0 is the chunk's flat index in the tensor."""
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = x[i] * _dropout_scale(i0 + i, key, thr, dscale)


def dropout_forward(float[:, :, ::1] out, const float[:, :, ::1] inp, unsigned int key,
                    double p) -> None:
    """out = inp * mask, mask = keep(i) / (1 - p) over the flat index i; out may be inp (in place).

    out (B, T, C); inp (B, T, C); key uint32, p in [0, 1).
    """
    cdef Py_ssize_t n = inp.shape[0] * inp.shape[1] * inp.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef unsigned int thr = _threshold(p)
    cdef float dscale = 1.0 / (1.0 - p)
    cdef float* po = &out[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _dropout_forward_chunk(po + i * CHUNK, px + i * CHUNK, min(CHUNK, n - i * CHUNK),
                                   i * CHUNK, key, thr, dscale)


cdef inline void _dropout_backward_chunk(float* dx, const float* dy, Py_ssize_t n, Py_ssize_t i0,
                                         unsigned int key, unsigned int thr,
                                         float dscale) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = dx[i] + dy[i] * _dropout_scale(i0 + i, key, thr, dscale)


def dropout_backward(float[:, :, ::1] dinp, const float[:, :, ::1] dout, unsigned int key,
                     double p) -> None:
    """dinp += dout * mask, the forward's mask for the same key and p. Accumulates.

    dinp (B, T, C); dout (B, T, C); key uint32, p in [0, 1).
    """
    cdef Py_ssize_t n = dout.shape[0] * dout.shape[1] * dout.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef unsigned int thr = _threshold(p)
    cdef float dscale = 1.0 / (1.0 - p)
    cdef float* pdx = &dinp[0, 0, 0]
    cdef const float* pdy = &dout[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _dropout_backward_chunk(pdx + i * CHUNK, pdy + i * CHUNK, min(CHUNK, n - i * CHUNK),
                                    i * CHUNK, key, thr, dscale)


cdef inline void _relu2_forward_chunk(float* out, const float* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float xi, r
    for i in range(n):
        xi = x[i]
        r = xi if xi > <float>0.0 else <float>0.0  # a select, not a branch: the sign is random
        out[i] = r * r


def relu2_forward(float[:, :, ::1] out, const float[:, :, ::1] inp) -> None:
    """out = relu(inp) ** 2.

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    cdef Py_ssize_t n = inp.shape[0] * inp.shape[1] * inp.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* po = &out[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _relu2_forward_chunk(po + i * CHUNK, px + i * CHUNK, min(CHUNK, n - i * CHUNK))


cdef inline void _relu2_backward_chunk(float* dx, const float* dy, const float* x,
                                       Py_ssize_t n, bint overwrite) noexcept nogil:
    cdef Py_ssize_t i
    cdef float xi, r
    if overwrite:
        for i in range(n):
            xi = x[i]
            r = xi if xi > <float>0.0 else <float>0.0
            dx[i] = dy[i] * <float>2.0 * r
        return
    for i in range(n):
        xi = x[i]
        r = xi if xi > <float>0.0 else <float>0.0
        dx[i] = dx[i] + dy[i] * <float>2.0 * r


def relu2_backward(float[:, :, ::1] dinp, const float[:, :, ::1] dout,
                   const float[:, :, ::1] inp, bint overwrite=False) -> None:
    """dinp += dout * 2 * relu(inp). Accumulates (overwrite=True: dinp = ..., for a plan's first writer).

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    cdef Py_ssize_t n = inp.shape[0] * inp.shape[1] * inp.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* pdx = &dinp[0, 0, 0]
    cdef const float* pdy = &dout[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _relu2_backward_chunk(pdx + i * CHUNK, pdy + i * CHUNK, px + i * CHUNK,
                                  min(CHUNK, n - i * CHUNK), overwrite)


cdef inline void _gelu_forward_chunk(float* out, const float* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = fc_gelu(x[i])


def gelu_forward(float[:, :, ::1] out, const float[:, :, ::1] inp) -> None:
    """out = 0.5 * inp * (1 + erf(inp / sqrt(2))), the exact GELU.

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    cdef Py_ssize_t n = inp.shape[0] * inp.shape[1] * inp.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* po = &out[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _gelu_forward_chunk(po + i * CHUNK, px + i * CHUNK, min(CHUNK, n - i * CHUNK))


cdef inline void _gelu_backward_chunk(float* dx, const float* dy, const float* x, Py_ssize_t n,
                                      bint overwrite) noexcept nogil:
    cdef Py_ssize_t i
    if overwrite:
        for i in range(n):
            dx[i] = dy[i] * fc_gelu_grad(x[i])
        return
    for i in range(n):
        dx[i] = dx[i] + dy[i] * fc_gelu_grad(x[i])


def gelu_backward(float[:, :, ::1] dinp, const float[:, :, ::1] dout, const float[:, :, ::1] inp,
                  bint overwrite=False) -> None:
    """dinp += dout * (Phi(inp) + inp * phi(inp)), Phi the normal cdf, phi its density. Accumulates
    (overwrite=True: dinp = ..., for a plan's first writer).

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    cdef Py_ssize_t n = inp.shape[0] * inp.shape[1] * inp.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* pdx = &dinp[0, 0, 0]
    cdef const float* pdy = &dout[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _gelu_backward_chunk(pdx + i * CHUNK, pdy + i * CHUNK, px + i * CHUNK, min(CHUNK, n - i * CHUNK),
                                 overwrite)


cdef inline void _rope_row(float* out, const float* x, const float* cos, const float* sin,
                          Py_ssize_t C, Py_ssize_t half, float sign, bint accumulate) noexcept nogil:
    """One row of 3C: every head of q and k turned by (cos, sign * sin), v copied (or added)."""
    cdef Py_ssize_t h, h0, i, j
    cdef float x0, x1, c, s
    for h in range(C // half):  # the heads of q, then of k
        h0 = h * 2 * half
        for i in range(half):
            x0 = x[h0 + i]
            x1 = x[h0 + half + i]
            c = cos[i]
            s = sign * sin[i]
            if accumulate:
                out[h0 + i] = out[h0 + i] + (x0 * c - x1 * s)
                out[h0 + half + i] = out[h0 + half + i] + (x0 * s + x1 * c)
            else:
                out[h0 + i] = x0 * c - x1 * s
                out[h0 + half + i] = x0 * s + x1 * c
    for j in range(2 * C, 3 * C):
        out[j] = out[j] + x[j] if accumulate else x[j]


def rope_forward(float[:, :, ::1] out, const float[:, :, ::1] inp, const float[:, ::1] cos,
                 const float[:, ::1] sin) -> None:
    """Rotary positions: q and k of every head turned, v copied; out may be inp (in place).

    With a = x[:HS/2], b = x[HS/2:] of a head vector at position t: [a cos - b sin, a sin + b cos].
    out, inp (B, T, 3C); cos, sin (>=T, HS/2), position t reads row t.
    """
    cdef Py_ssize_t B = inp.shape[0], T = inp.shape[1], C = inp.shape[2] // 3, half = cos.shape[1]
    cdef Py_ssize_t n
    cdef float* po = &out[0, 0, 0]
    cdef const float* px = &inp[0, 0, 0]
    cdef const float* pc = &cos[0, 0]
    cdef const float* ps = &sin[0, 0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _rope_row(po + n * 3 * C, px + n * 3 * C, pc + (n % T) * half, ps + (n % T) * half, C, half,
                      1.0, False)


def rope_backward(float[:, :, ::1] dinp, const float[:, :, ::1] dout, const float[:, ::1] cos,
                  const float[:, ::1] sin) -> None:
    """Backward of rope_forward (the rotation transposed): [da cos + db sin, -da sin + db cos]. Accumulates.

    dinp, dout (B, T, 3C); cos, sin (>=T, HS/2).
    """
    cdef Py_ssize_t B = dout.shape[0], T = dout.shape[1], C = dout.shape[2] // 3, half = cos.shape[1]
    cdef Py_ssize_t n
    cdef float* pd = &dinp[0, 0, 0]
    cdef const float* py = &dout[0, 0, 0]
    cdef const float* pc = &cos[0, 0]
    cdef const float* ps = &sin[0, 0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _rope_row(pd + n * 3 * C, py + n * 3 * C, pc + (n % T) * half, ps + (n % T) * half, C, half,
                      -1.0, True)


cdef inline void _add_chunk(float* out, const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = a[i] + b[i]


def residual_forward(float[:, :, ::1] out, const float[:, :, ::1] inp1,
                     const float[:, :, ::1] inp2) -> None:
    """out = inp1 + inp2.

    out, inp1, inp2 (B, T, C).
    """
    cdef Py_ssize_t n = out.shape[0] * out.shape[1] * out.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* po = &out[0, 0, 0]
    cdef const float* pa = &inp1[0, 0, 0]
    cdef const float* pb = &inp2[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _add_chunk(po + i * CHUNK, pa + i * CHUNK, pb + i * CHUNK, min(CHUNK, n - i * CHUNK))


cdef inline void _add2_chunk(float* a, float* b, const float* d, Py_ssize_t n, bint overwrite) noexcept nogil:
    cdef Py_ssize_t i
    if overwrite:
        memcpy(a, d, n * sizeof(float))
        memcpy(b, d, n * sizeof(float))
        return
    for i in range(n):
        a[i] = a[i] + d[i]
        b[i] = b[i] + d[i]


def residual_backward(float[:, :, ::1] dinp1, float[:, :, ::1] dinp2,
                      const float[:, :, ::1] dout, bint overwrite=False) -> None:
    """dinp1 += dout; dinp2 += dout. Accumulates (overwrite=True: dinp1 = dinp2 = dout, for a plan's
    first writer).

    dinp1, dinp2, dout (B, T, C).
    """
    cdef Py_ssize_t n = dout.shape[0] * dout.shape[1] * dout.shape[2]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef float* pa = &dinp1[0, 0, 0]
    cdef float* pb = &dinp2[0, 0, 0]
    cdef const float* pd = &dout[0, 0, 0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _add2_chunk(pa + i * CHUNK, pb + i * CHUNK, pd + i * CHUNK, min(CHUNK, n - i * CHUNK), overwrite)


# ---------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------

cdef inline void _crossentropy_row(float* loss, float* p, const float* z, int target,
                                   Py_ssize_t V) noexcept nogil:
    """Max, then exp and sum, then normalise; loss = log(sum) - (z[target] - max)."""
    cdef Py_ssize_t v
    cdef float mx = z[0]
    cdef float s = 0.0
    cdef float inv
    for v in range(1, V):
        if z[v] > mx:
            mx = z[v]
    for v in range(V):
        p[v] = expf(z[v] - mx)
        s = s + p[v]
    inv = 1.0 / s
    for v in range(V):
        p[v] = p[v] * inv
    loss[0] = logf(s) - (z[target] - mx)


def crossentropy_forward(float[:, ::1] losses, float[:, :, ::1] probs,
                         const float[:, :, ::1] logits, const int[:, ::1] targets) -> None:
    """probs = softmax(logits); losses = -log probs[target], natural log.

    losses (B, T); probs (B, T, V) saved; logits (B, T, V); targets (B, T) int32.
    """
    cdef Py_ssize_t B = logits.shape[0], T = logits.shape[1], V = logits.shape[2]
    cdef Py_ssize_t n
    cdef float* pl = &losses[0, 0]
    cdef float* pp = &probs[0, 0, 0]
    cdef const float* pz = &logits[0, 0, 0]
    cdef const int* pt = &targets[0, 0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _crossentropy_row(pl + n, pp + n * V, pz + n * V, pt[n], V)


cdef inline void _crossentropy_backward_row(float* dz, float dl, const float* p, int target,
                                            Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t v
    for v in range(V):
        dz[v] = dz[v] + dl * p[v]
    dz[target] = dz[target] - dl


def crossentropy_backward(float[:, :, ::1] dlogits, const float[:, ::1] dlosses,
                          const float[:, :, ::1] probs, const int[:, ::1] targets) -> None:
    """Fused softmax + cross-entropy backward: dlogits += dlosses * (probs - onehot). Accumulates.

    dlogits (B, T, V); dlosses (B, T); probs (B, T, V); targets (B, T) int32.
    """
    cdef Py_ssize_t B = probs.shape[0], T = probs.shape[1], V = probs.shape[2]
    cdef Py_ssize_t n
    cdef float* pdz = &dlogits[0, 0, 0]
    cdef const float* pdl = &dlosses[0, 0]
    cdef const float* pp = &probs[0, 0, 0]
    cdef const int* pt = &targets[0, 0]
    with nogil:
        for n in prange(B * T, schedule="static"):
            _crossentropy_backward_row(pdz + n * V, pdl[n], pp + n * V, pt[n], V)


# ---------------------------------------------------------------------------------------------
# optimizer: grad_norm, adamw_update (flat buffers, parallel over CHUNK-sized slices)
# ---------------------------------------------------------------------------------------------

cdef inline double _sumsq_chunk(const float* g, Py_ssize_t n) noexcept nogil:
    """sum g**2 in double, 8 partial sums."""
    cdef double acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t n8 = n - n % 8
    cdef double s
    for j in range(8):
        acc[j] = 0.0
    for i in range(0, n8, 8):
        for j in range(8):
            acc[j] = acc[j] + <double>g[i + j] * <double>g[i + j]
    s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
    for i in range(n8, n):
        s = s + <double>g[i] * <double>g[i]
    return s


def grad_norm(const float[::1] grads) -> float:
    """sqrt(sum(grads**2)), accumulated in float64.

    grads (P,) the flat gradient buffer.
    """
    cdef Py_ssize_t n = grads.shape[0]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    cdef double total = 0.0
    cdef const float* pg = &grads[0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            total += _sumsq_chunk(pg + i * CHUNK, min(CHUNK, n - i * CHUNK))
    return sqrt(total)


cdef inline void _adamw_chunk(float* p, const float* g, float* m, float* v,
                              const unsigned char* decay, Py_ssize_t n, float lr, float beta1,
                              float one_m_beta1, float beta2, float one_m_beta2, float eps,
                              float wd, float bc1, float bc2, float grad_scale) noexcept nogil:
    """One pass: scale the grad, update both moments, bias-correct, decay and step the params."""
    cdef Py_ssize_t i
    cdef float gi, mi, vi
    for i in range(n):
        gi = g[i] * grad_scale
        mi = beta1 * m[i] + one_m_beta1 * gi
        vi = beta2 * v[i] + one_m_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * decay[i] * p[i])


def adamw_update(float[::1] params, const float[::1] grads, float[::1] m, float[::1] v,
                 const unsigned char[::1] decay, double lr, double beta1, double beta2,
                 double eps, double weight_decay, int step, double grad_scale) -> None:
    """AdamW on flat buffers; g = grads * grad_scale (the clip factor), step counts from 1.

    p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * decay * p)
    params, grads, m, v (P,); decay (P,) uint8, 1 where weight decay applies (2-D tensors).
    """
    cdef Py_ssize_t n = params.shape[0]
    cdef Py_ssize_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef Py_ssize_t i
    # scalar constants once per call, in double like the reference's Python scalars
    cdef float bc1 = 1.0 - beta1 ** step
    cdef float bc2 = 1.0 - beta2 ** step
    cdef float* pp = &params[0]
    cdef const float* pg = &grads[0]
    cdef float* pm = &m[0]
    cdef float* pv = &v[0]
    cdef const unsigned char* pdec = &decay[0]
    with nogil:
        for i in prange(nchunks, schedule="static"):
            _adamw_chunk(pp + i * CHUNK, pg + i * CHUNK, pm + i * CHUNK, pv + i * CHUNK,
                         pdec + i * CHUNK, min(CHUNK, n - i * CHUNK), lr, beta1, 1.0 - beta1,
                         beta2, 1.0 - beta2, eps, weight_decay, bc1, bc2, grad_scale)

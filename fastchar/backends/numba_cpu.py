"""The Numba backend: every reference kernel compiled with `@njit(cache=True)`, float32 only.

Conventions are the reference's (fastchar/backends/reference.py): same names, argument order and
shapes; kernels write into preallocated C-contiguous arrays and return None (`grad_norm` returns a
float); backward kernels ACCUMULATE (+=) into every gradient they write.

How it is fast:
- GEMMs go to the BLAS that SciPy ships, through Numba's own `numba_xxgemm` helper (the function
  `np.dot` uses inside njit code), called with beta = 1 so that `matmul_backward` accumulates in
  place with no temporary. Row-major operands are passed as their column-major transposes, so a
  transposed operand is a flag, never a copy.
- Everything else is a loop nest: `parallel=True` with `prange` only over a dimension that splits
  the writes (rows for activations and input grads, (batch, head) pairs for attention, column blocks
  for weight-gradient reductions), so no two threads ever `+=` into the same element.
- `fastmath=True` where reassociating a float32 reduction is acceptable (tests/test_kernels.py
  checks every kernel against the reference within tests/conftest.py's TOL).

Dropout: the mask is a hash of (key, flat index), the reference's `_dropout_threshold` and lowbias32
(fastchar/backends/reference.py), recomputed wherever it is needed; the public dropout kernels are
thin Python wrappers that turn (key, p) into the uint32 threshold and scale, then call njit code.

Left out: float64 (use the reference for gradchecks) and non-contiguous arrays on the fast paths
(matmuls copy such operands; the other kernels index them generically and are only slower).
Numba's thread count is set through the hook `set_threads` (fastchar.threads calls it).
If no writable on-disk cache location exists, the cache goes to a fresh temporary directory with
a warning instead of failing at import.
"""

from __future__ import annotations

import math
import tempfile
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from fastchar.backends.reference import DROPOUT_GOLDEN, LOWBIAS32_MUL1, LOWBIAS32_MUL2, U32, _dropout_threshold

FALLBACK: frozenset[str] = frozenset()


def set_threads(n: int) -> None:
    """Thread hook (fastchar.threads): n threads for the prange loops (at most Numba's pool)."""
    from fastchar.errors import ConfigError

    if n > numba.config.NUMBA_NUM_THREADS:
        raise ConfigError(
            f"--threads {n} exceeds Numba's pool of {numba.config.NUMBA_NUM_THREADS} threads",
            hint=f"use at most {numba.config.NUMBA_NUM_THREADS}, or set NUMBA_NUM_THREADS before starting",
        )
    numba.set_num_threads(n)


def thread_info() -> dict:
    """Thread hook (fastchar.threads): Numba's threads and threading layer."""
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = f"not started yet (config: {numba.config.THREADING_LAYER})"
    return {"numba": {"threads": numba.get_num_threads(), "threading_layer": layer}}


# Width of the column blocks that weight-gradient reductions are split into across threads: 16
# float32 = one 64-byte cache line, so two threads never write the same line.
COL_BLOCK = 16


# --------------------------------------------------------------------------------------------
# On-disk cache: Numba raises at decoration time when no cache location is writable (the package
# directory, NUMBA_CACHE_DIR and ~/.cache all refused). Probe once with a throwaway function and
# fall back to a temporary directory, so a read-only install still runs (compiling every start).


def _cache_probe() -> int:
    return 0


def _ensure_cache_location() -> None:
    try:
        njit(cache=True)(_cache_probe)
    except RuntimeError as exc:
        fallback = tempfile.mkdtemp(prefix="fastchar-numba-cache-")
        numba.config.CACHE_DIR = fallback
        warnings.warn(
            f"fastchar: no writable Numba cache location ({exc}); caching compiled kernels in "
            f"{fallback} for this process only, so every start recompiles (about 1 min). "
            "Set NUMBA_CACHE_DIR to a writable directory to keep them.",
            RuntimeWarning,
            stacklevel=2,
        )
        njit(cache=True)(_cache_probe)


_ensure_cache_location()


# --------------------------------------------------------------------------------------------
# BLAS: Numba's helper `numba_xxgemm` (in numba._helperlib, bound to scipy.linalg.cython_blas)
# is the Fortran sgemm with by-value sizes. It is resolved by symbol name, so functions that call
# it can be cached. A row-major C (M, N) = op(A) op(B) is the column-major C^T = op(B)^T op(A)^T.

_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(
        types.char,  # kind: 's' for float32
        types.char,  # transa
        types.char,  # transb
        types.intp,  # m
        types.intp,  # n
        types.intp,  # k
        types.CPointer(types.float32),  # alpha
        types.CPointer(types.float32),  # a
        types.intp,  # lda
        types.CPointer(types.float32),  # b
        types.intp,  # ldb
        types.CPointer(types.float32),  # beta
        types.CPointer(types.float32),  # c
        types.intp,  # ldc
    ),
)
_KIND_S = ord("s")
_NOTRANS = ord("n")
_TRANS = ord("t")
_ONE = np.ones(1, np.float32)  # frozen into the compiled code as constants; BLAS only reads them
_ZERO = np.zeros(1, np.float32)


@njit(cache=True)
def _gemm(ta, tb, M, N, K, A, lda, B, ldb, beta, Cm, ldc):  # noqa: N803 (BLAS names)
    """Row-major Cm (M, N) = op(A) @ op(B) + beta * Cm, op = transpose when ta/tb == _TRANS.

    A, B, Cm are C-contiguous float32 arrays; lda, ldb, ldc their row lengths; beta a (1,) array.
    """
    status = _xxgemm(
        _KIND_S, tb, ta, N, M, K, _ONE.ctypes, B.ctypes, ldb, A.ctypes, lda, beta.ctypes,
        Cm.ctypes, ldc,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError("BLAS sgemm is unavailable (numba_xxgemm failed)")


# --------------------------------------------------------------------------------------------
# exp: LLVM cannot vectorise calls to libm's expf (no SVML here), so softmaxes use this inlinable
# float32 exp (Cephes expf: Cody-Waite reduction, degree-6 polynomial, about 1 ulp on [-87, 88]).


@intrinsic
def _i32_as_f32(typingctx, i):  # noqa: ARG001 (Numba's intrinsic signature)
    """Reinterpret the bits of an int32 as a float32 (to build 2**n)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def _expf(x):
    """exp(x) for float32 x <= 0 (the softmaxes' shifted scores); below -87 it gives about 1e-38
    instead of a denormal or 0, the clamp of the C twin fc_expf (csrc/fc_math.h)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * _i32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(cache=True, inline="always", fastmath=True)
def _softmax_unnormalised(row, n):
    """row[:n] = exp(row[:n] - max(row[:n])) in place; returns 1 / their sum (the caller scales)."""
    mx = row[0]
    for t in range(1, n):
        mx = max(mx, row[t])
    tot = np.float32(0.0)
    for t in range(n):
        e = _expf(row[t] - mx)
        row[t] = e
        tot += e
    return np.float32(1.0) / tot


# --------------------------------------------------------------------------------------------
# Embedding


@njit(cache=True, parallel=True)
def embedding_forward(out: np.ndarray, idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray) -> None:
    """out[b, t] = wte[idx[b, t]] + wpe[t].

    out (B, T, C); idx (B, T) int; wte (V, C); wpe (>=T, C), position t reads row t.
    """
    B, T, C = out.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        tok = idx[b, t]
        for c in range(C):
            out[b, t, c] = wte[tok, c] + wpe[t, c]


@njit(cache=True, parallel=True)
def embedding_backward(dwte: np.ndarray, dwpe: np.ndarray, dout: np.ndarray, idx: np.ndarray) -> None:
    """dwte[idx[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]. Accumulates.

    dwte (V, C); dwpe (>=T, C); dout (B, T, C); idx (B, T) int.
    """
    B, T, C = dout.shape
    # Tokens repeat, so rows of dwte collide: split the work by column blocks instead, each thread
    # walks every (b, t) for its own columns. dwpe rides along in the same pass.
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(C, c0 + COL_BLOCK)
        for b in range(B):
            for t in range(T):
                tok = idx[b, t]
                for c in range(c0, c1):
                    g = dout[b, t, c]
                    dwte[tok, c] += g
                    dwpe[t, c] += g


# --------------------------------------------------------------------------------------------
# RMSNorm


@njit(cache=True, parallel=True, fastmath=True)
def rmsnorm_forward(out: np.ndarray, rstd: np.ndarray, inp: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out = inp / sqrt(mean(inp**2) + eps) * weight, over the last axis.

    out (B, T, C); rstd (B, T) saved 1/sqrt(mean + eps); inp (B, T, C); weight (C,).
    """
    B, T, C = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        ss = np.float32(0.0)
        for c in range(C):
            x = inp[b, t, c]
            ss += x * x
        s = np.float32(1.0) / np.sqrt(ss / np.float32(C) + np.float32(eps))
        rstd[b, t] = s
        for c in range(C):
            out[b, t, c] = inp[b, t, c] * s * weight[c]


@njit(cache=True, parallel=True, fastmath=True)
def rmsnorm_backward(
    dinp: np.ndarray,
    dweight: np.ndarray,
    dout: np.ndarray,
    inp: np.ndarray,
    weight: np.ndarray,
    rstd: np.ndarray,
) -> None:
    """dinp += rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * weight. Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); rstd (B, T).
    """
    B, T, C = inp.shape
    # dinp: rows are independent; one reduction over C, then the update.
    for r in prange(B * T):
        b, t = r // T, r % T
        s = rstd[b, t]
        dot = np.float32(0.0)
        for c in range(C):
            dot += dout[b, t, c] * weight[c] * inp[b, t, c]
        k = dot * s * s / np.float32(C)  # mean(dxhat * xhat) * rstd, folded
        for c in range(C):
            dinp[b, t, c] += s * (dout[b, t, c] * weight[c] - inp[b, t, c] * k)
    # dweight: a reduction over rows, split across threads by column blocks (race-free).
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(C, c0 + COL_BLOCK)
        for b in range(B):
            for t in range(T):
                s = rstd[b, t]
                for c in range(c0, c1):
                    dweight[c] += dout[b, t, c] * inp[b, t, c] * s


# --------------------------------------------------------------------------------------------
# LayerNorm (a gain, no bias)


@njit(cache=True, parallel=True, fastmath=True)
def layernorm_forward(
    out: np.ndarray, mean: np.ndarray, rstd: np.ndarray, inp: np.ndarray, weight: np.ndarray, eps: float
) -> None:
    """out = (inp - mean(inp)) / sqrt(var(inp) + eps) * weight over the last axis (biased variance).

    out (B, T, C); mean, rstd (B, T) saved; inp (B, T, C); weight (C,).
    """
    B, T, C = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        s = np.float32(0.0)
        for c in range(C):
            s += inp[b, t, c]
        m = s / np.float32(C)
        ss = np.float32(0.0)
        for c in range(C):
            x = inp[b, t, c] - m
            ss += x * x
        rs = np.float32(1.0) / np.sqrt(ss / np.float32(C) + np.float32(eps))
        mean[b, t] = m
        rstd[b, t] = rs
        for c in range(C):
            out[b, t, c] = (inp[b, t, c] - m) * rs * weight[c]


@njit(cache=True, parallel=True, fastmath=True)
def layernorm_backward(
    dinp: np.ndarray,
    dweight: np.ndarray,
    dout: np.ndarray,
    inp: np.ndarray,
    weight: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
) -> None:
    """dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * weight;
    dweight += sum(dout * xhat). Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); mean, rstd (B, T).
    """
    B, T, C = inp.shape
    # dinp: rows are independent; two reductions over C, then the update.
    for r in prange(B * T):
        b, t = r // T, r % T
        m, s = mean[b, t], rstd[b, t]
        sd = np.float32(0.0)
        sdx = np.float32(0.0)
        for c in range(C):
            d = dout[b, t, c] * weight[c]
            sd += d
            sdx += d * (inp[b, t, c] - m) * s
        sd /= np.float32(C)
        sdx /= np.float32(C)
        for c in range(C):
            xhat = (inp[b, t, c] - m) * s
            dinp[b, t, c] += s * (dout[b, t, c] * weight[c] - sd - xhat * sdx)
    # dweight: a reduction over rows, split across threads by column blocks (race-free).
    for blk in prange((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        c1 = min(C, c0 + COL_BLOCK)
        for b in range(B):
            for t in range(T):
                m, s = mean[b, t], rstd[b, t]
                for c in range(c0, c1):
                    dweight[c] += dout[b, t, c] * (inp[b, t, c] - m) * s


# --------------------------------------------------------------------------------------------
# Matmul (BLAS)


# Matmuls are split across the OpenMP threads here, each task one single-threaded sgemm: BLAS
# runs with 1 thread (fastchar.threads), so only one thread pool (libgomp, shared with the Cython
# kernels) is ever awake. Two pools spinning on 2 cores made steps 10-40x slower.
GEMM_TASKS = 8  # row (or column) blocks per matmul; enough to balance 2 to 8 threads


@njit(cache=True, parallel=True)
def matmul_forward(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """out = inp @ weight (weights are stored [in, out]).

    out (N, OC); inp (N, IC); weight (IC, OC). C-contiguous float32.
    """
    N, IC = inp.shape
    OC = weight.shape[1]
    if N == 0 or OC == 0:
        return
    if IC == 0:
        out[:] = 0.0
        return
    rows = (N + GEMM_TASKS - 1) // GEMM_TASKS
    for task in prange(GEMM_TASKS):
        r0 = task * rows
        r1 = min(N, r0 + rows)
        if r1 > r0:
            _gemm(_NOTRANS, _NOTRANS, r1 - r0, OC, IC, inp[r0:], IC, weight, OC, _ZERO, out[r0:], OC)


@njit(cache=True, parallel=True)
def matmul_backward(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """dinp += dout @ weight.T; dweight += inp.T @ dout. Accumulates.

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC). C-contiguous.
    """
    N, IC = inp.shape
    OC = weight.shape[1]
    if N == 0 or OC == 0 or IC == 0:
        return
    # Tasks 0..GEMM_TASKS-1 own row blocks of dinp; the rest own column blocks of dweight (beta = 1:
    # BLAS adds into the gradient in place). No two tasks write the same element.
    rows = (N + GEMM_TASKS - 1) // GEMM_TASKS
    cols = (OC + GEMM_TASKS - 1) // GEMM_TASKS
    for task in prange(2 * GEMM_TASKS):
        if task < GEMM_TASKS:
            r0 = task * rows
            r1 = min(N, r0 + rows)
            if r1 > r0:
                _gemm(_NOTRANS, _TRANS, r1 - r0, IC, OC, dout[r0:], OC, weight, OC, _ONE, dinp[r0:], IC)
        else:
            c0 = (task - GEMM_TASKS) * cols
            c1 = min(OC, c0 + cols)
            if c1 > c0:
                _gemm(_TRANS, _NOTRANS, IC, c1 - c0, N, inp, IC, dout[:, c0:], OC, _ONE, dweight[:, c0:], OC)


@njit(cache=True, parallel=True)
def matmul_t_forward(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """out = inp @ weight.T (weight stored [out, in]: the tied lm_head reads wte).

    out (N, OC); inp (N, IC); weight (OC, IC). C-contiguous float32.
    """
    N, IC = inp.shape
    OC = weight.shape[0]
    if N == 0 or OC == 0:
        return
    if IC == 0:
        out[:] = 0.0
        return
    rows = (N + GEMM_TASKS - 1) // GEMM_TASKS
    for task in prange(GEMM_TASKS):
        r0 = task * rows
        r1 = min(N, r0 + rows)
        if r1 > r0:
            _gemm(_NOTRANS, _TRANS, r1 - r0, OC, IC, inp[r0:], IC, weight, IC, _ZERO, out[r0:], OC)


@njit(cache=True, parallel=True)
def matmul_t_backward(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """dinp += dout @ weight; dweight += dout.T @ inp. Accumulates.

    dinp (N, IC); dweight (OC, IC); dout (N, OC); inp (N, IC); weight (OC, IC). C-contiguous.
    """
    N, IC = inp.shape
    OC = weight.shape[0]
    if N == 0 or OC == 0 or IC == 0:
        return
    # Tasks 0..GEMM_TASKS-1 own row blocks of dinp; the rest own row blocks of dweight (its output
    # channels). No two tasks write the same element.
    rows = (N + GEMM_TASKS - 1) // GEMM_TASKS
    orows = (OC + GEMM_TASKS - 1) // GEMM_TASKS
    for task in prange(2 * GEMM_TASKS):
        if task < GEMM_TASKS:
            r0 = task * rows
            r1 = min(N, r0 + rows)
            if r1 > r0:
                _gemm(_NOTRANS, _NOTRANS, r1 - r0, IC, OC, dout[r0:], OC, weight, IC, _ONE, dinp[r0:], IC)
        else:
            o0 = (task - GEMM_TASKS) * orows
            o1 = min(OC, o0 + orows)
            if o1 > o0:
                _gemm(_TRANS, _NOTRANS, o1 - o0, IC, N, dout[:, o0:], OC, inp, IC, _ONE, dweight[o0:], IC)


# --------------------------------------------------------------------------------------------
# Dropout: keep(i) = lowbias32((i * GOLDEN + key) mod 2**32) >= thr, in uint64 registers masked to
# 32 bits (Numba widens uint32 arithmetic to 64 bits anyway; the masks make it exact mod 2**32).

_M32 = np.uint64(U32)
_GOLDEN = np.uint64(DROPOUT_GOLDEN)
_MUL1 = np.uint64(LOWBIAS32_MUL1)
_MUL2 = np.uint64(LOWBIAS32_MUL2)
_S15 = np.uint64(15)
_S16 = np.uint64(16)


@njit(cache=True, inline="always")
def _dropout_scale(i, key, thr, dscale):
    """dscale if flat index i (int, >= 0) is kept under (key, thr) else 0; key, thr uint64."""
    h = ((np.uint64(i) & _M32) * _GOLDEN + key) & _M32
    h ^= h >> _S16
    h = (h * _MUL1) & _M32
    h ^= h >> _S15
    h = (h * _MUL2) & _M32
    h ^= h >> _S16
    return dscale if h >= thr else np.float32(0.0)


def _dropout_params(key: int, p: float) -> tuple[np.uint64, np.uint64, np.float32]:
    """(key, threshold, 1 / (1 - p)) as the njit kernels take them."""
    if not 0 <= key <= U32:
        raise ValueError(f"dropout key must be in [0, 2**32), got {key}")
    return np.uint64(key), np.uint64(_dropout_threshold(p)), np.float32(1.0 / (1.0 - p))


@njit(cache=True, parallel=True)
def _dropout_forward(out, inp, key, thr, dscale):
    B, T, C = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        base = r * C
        for c in range(C):
            out[b, t, c] = inp[b, t, c] * _dropout_scale(base + c, key, thr, dscale)


@njit(cache=True, parallel=True)
def _dropout_backward(dinp, dout, key, thr, dscale):
    B, T, C = dout.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        base = r * C
        for c in range(C):
            dinp[b, t, c] += dout[b, t, c] * _dropout_scale(base + c, key, thr, dscale)


def dropout_forward(out: np.ndarray, inp: np.ndarray, key: int, p: float) -> None:
    """out = inp * mask, mask = keep(i) / (1 - p) over the flat index i; out may be inp (in place).

    out (B, T, C); inp (B, T, C); key uint32, p in [0, 1).
    """
    _dropout_forward(out, inp, *_dropout_params(key, p))


def dropout_backward(dinp: np.ndarray, dout: np.ndarray, key: int, p: float) -> None:
    """dinp += dout * mask, the forward's mask for the same key and p. Accumulates.

    dinp (B, T, C); dout (B, T, C); key uint32, p in [0, 1).
    """
    _dropout_backward(dinp, dout, *_dropout_params(key, p))


# --------------------------------------------------------------------------------------------
# Attention. One (batch, head) pair per task: its rows of att and its HS columns of out / dqkv
# belong to it alone, so tasks never share a write. Only the causal half (t2 <= t) is computed,
# rounded up to whole blocks of ATTN_PAD keys (the extra entries are masked or multiply a zero).
# Each head's K and V are first copied transposed, (HS, T), into per-thread scratch, so every inner
# loop runs over t2 along contiguous memory: LLVM vectorises those, where loops over HS with a
# strided t2 would become gathers. dk and dv are summed transposed in scratch and added at the end.
# The head helpers take the dropout arguments too; attention_forward/backward pass drop=False, a
# constant after inlining, so the dropout code is compiled out of them.
ATTN_PAD = 16  # one AVX-512 vector of float32
ATTN_CHUNKS = 64  # (batch, head) tasks are grouped into at most this many chunks of scratch reuse


@njit(cache=True, inline="always")
def _head_transposed(dst, src, b, col, T, HS):
    """dst[i, t] = src[b, t, col + i]: one head's columns of a (B, T, X) tensor as (HS, T)."""
    for t in range(T):
        for i in range(HS):
            dst[i, t] = src[b, t, col + i]


@njit(cache=True, inline="always", fastmath=True)
def _attention_forward_head(out, att, qkv, kt, vt, prow, b, h, T, C, HS, scale, drop, base, key, thr, dscale):
    """One head; with drop, out uses att * mask (in prow scratch, (T,)), att keeps the probabilities.

    base = the flat index of att[b, h, 0, 0], where this head's dropout mask starts.
    """
    qo = h * HS
    _head_transposed(kt, qkv, b, C + qo, T, HS)
    _head_transposed(vt, qkv, b, 2 * C + qo, T, HS)
    for t in range(T):
        row = att[b, h, t]
        n = t + 1
        npad = min(T, (t + ATTN_PAD) // ATTN_PAD * ATTN_PAD)
        # scaled scores q[t] . k[t2], as HS passes along the row
        q0 = qkv[b, t, qo] * scale
        for t2 in range(npad):
            row[t2] = q0 * kt[0, t2]
        for i in range(1, HS):
            qi = qkv[b, t, qo + i] * scale
            for t2 in range(npad):
                row[t2] += qi * kt[i, t2]
        # softmax over t2 < n: max, exp and sum, normalise; the mask writes zeros
        inv = _softmax_unnormalised(row, n)
        for t2 in range(n):
            row[t2] *= inv
        for t2 in range(n, T):
            row[t2] = 0.0
        # dropout on a copy of the row (entries past n are 0 and stay 0)
        src = row
        if drop:
            rb = base + t * T
            for t2 in range(npad):
                prow[t2] = row[t2] * _dropout_scale(rb + t2, key, thr, dscale)
            src = prow
        # out[t, i] = att[t] . v[:, i]
        for i in range(HS):
            acc = np.float32(0.0)
            for t2 in range(npad):
                acc += src[t2] * vt[i, t2]
            out[b, t, qo + i] = acc


@njit(cache=True, parallel=True, fastmath=True)
def attention_forward(out: np.ndarray, att: np.ndarray, qkv: np.ndarray) -> None:
    """Causal softmax attention: att = softmax(q k^T / sqrt(HS) + mask); out = att v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities, zero above the diagonal; qkv (B, T, 3C).
    """
    B, NH, T, _ = att.shape
    C = out.shape[2]
    HS = C // NH
    scale = np.float32(1.0 / math.sqrt(HS))
    tasks = B * NH
    nchunks = min(tasks, ATTN_CHUNKS)
    for ch in prange(nchunks):
        kt = np.empty((HS, T), np.float32)  # scratch: this head's K and V, transposed
        vt = np.empty((HS, T), np.float32)
        for bh in range(ch * tasks // nchunks, (ch + 1) * tasks // nchunks):
            _attention_forward_head(
                out, att, qkv, kt, vt, kt[0], bh // NH, bh % NH, T, C, HS, scale, False, 0, _M32, _M32, scale
            )


@njit(cache=True, parallel=True, fastmath=True)
def _attention_dropout_forward(out, att, qkv, key, thr, dscale):
    B, NH, T, _ = att.shape
    C = out.shape[2]
    HS = C // NH
    scale = np.float32(1.0 / math.sqrt(HS))
    tasks = B * NH
    nchunks = min(tasks, ATTN_CHUNKS)
    for ch in prange(nchunks):
        kt = np.empty((HS, T), np.float32)
        vt = np.empty((HS, T), np.float32)
        prow = np.empty(T, np.float32)  # one row of att * mask
        for bh in range(ch * tasks // nchunks, (ch + 1) * tasks // nchunks):
            _attention_forward_head(
                out, att, qkv, kt, vt, prow, bh // NH, bh % NH, T, C, HS, scale, True, bh * T * T, key, thr, dscale
            )


def attention_dropout_forward(out: np.ndarray, att: np.ndarray, qkv: np.ndarray, key: int, p: float) -> None:
    """attention_forward with dropout on the probabilities: out = (att * mask) v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities BEFORE dropout, zero above the diagonal;
    qkv (B, T, 3C); key uint32 and p in [0, 1): the mask over att's flat index.
    """
    _attention_dropout_forward(out, att, qkv, *_dropout_params(key, p))


@njit(cache=True, inline="always", fastmath=True)
def _attention_backward_head(
    dqkv, datt, dout, qkv, att, kt, vt, dkt, dvt, prow, b, h, T, C, HS, scale, drop, base, key, thr, dscale
):
    """One head; with drop, dv uses att * mask (prow scratch) and datt is multiplied by the mask."""
    qo, ko, vo = h * HS, C + h * HS, 2 * C + h * HS
    _head_transposed(kt, qkv, b, ko, T, HS)
    _head_transposed(vt, qkv, b, vo, T, HS)
    dkt[:] = 0.0
    dvt[:] = 0.0
    for t in range(T):
        row = datt[b, h, t]
        arow = att[b, h, t]
        npad = min(T, (t + ATTN_PAD) // ATTN_PAD * ATTN_PAD)
        # datt[t, t2] = dy[t] . v[t2]; beyond t2 = t att is zero, so padding adds nothing below
        d0 = dout[b, t, qo]
        for t2 in range(npad):
            row[t2] = d0 * vt[0, t2]
        for i in range(1, HS):
            di = dout[b, t, qo + i]
            for t2 in range(npad):
                row[t2] += di * vt[i, t2]
        # dropout: dv needs att * mask, the softmax backward datt * mask (the grad before dropout)
        pa = arow
        if drop:
            rb = base + t * T
            for t2 in range(npad):
                m = _dropout_scale(rb + t2, key, thr, dscale)
                prow[t2] = arow[t2] * m
                row[t2] *= m
            pa = prow
        # softmax backward in place: datt[t, t2] <- ds = att * (datt - sum(att * datt)) * scale
        s = np.float32(0.0)
        for t2 in range(npad):
            s += arow[t2] * row[t2]
        for t2 in range(npad):
            row[t2] = arow[t2] * (row[t2] - s) * scale
        # dq[t, i] = ds[t] . k[:, i]; dk[t2] += ds[t, t2] q[t]; dv[t2] += att[t, t2] dy[t]
        for i in range(HS):
            acc = np.float32(0.0)
            qi = qkv[b, t, qo + i]
            di = dout[b, t, qo + i]
            for t2 in range(npad):
                acc += row[t2] * kt[i, t2]
                dkt[i, t2] += row[t2] * qi
                dvt[i, t2] += pa[t2] * di
            dqkv[b, t, qo + i] += acc
    for t in range(T):
        for i in range(HS):
            dqkv[b, t, ko + i] += dkt[i, t]
            dqkv[b, t, vo + i] += dvt[i, t]


@njit(cache=True, parallel=True, fastmath=True)
def attention_backward(dqkv: np.ndarray, datt: np.ndarray, dout: np.ndarray, qkv: np.ndarray, att: np.ndarray) -> None:
    """Backward of attention_forward. Accumulates into dqkv; datt is scratch and is overwritten.

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T).
    """
    B, NH, T, _ = att.shape
    C = dout.shape[2]
    HS = C // NH
    scale = np.float32(1.0 / math.sqrt(HS))
    tasks = B * NH
    nchunks = min(tasks, ATTN_CHUNKS)
    for ch in prange(nchunks):
        kt = np.empty((HS, T), np.float32)  # scratch: K and V transposed, dK and dV sums
        vt = np.empty((HS, T), np.float32)
        dkt = np.empty((HS, T), np.float32)
        dvt = np.empty((HS, T), np.float32)
        for bh in range(ch * tasks // nchunks, (ch + 1) * tasks // nchunks):
            _attention_backward_head(
                dqkv, datt, dout, qkv, att, kt, vt, dkt, dvt, kt[0], bh // NH, bh % NH, T, C, HS, scale,
                False, 0, _M32, _M32, scale,
            )  # fmt: skip


@njit(cache=True, parallel=True, fastmath=True)
def _attention_dropout_backward(dqkv, datt, dout, qkv, att, key, thr, dscale):
    B, NH, T, _ = att.shape
    C = dout.shape[2]
    HS = C // NH
    scale = np.float32(1.0 / math.sqrt(HS))
    tasks = B * NH
    nchunks = min(tasks, ATTN_CHUNKS)
    for ch in prange(nchunks):
        kt = np.empty((HS, T), np.float32)
        vt = np.empty((HS, T), np.float32)
        dkt = np.empty((HS, T), np.float32)
        dvt = np.empty((HS, T), np.float32)
        prow = np.empty(T, np.float32)  # one row of att * mask
        for bh in range(ch * tasks // nchunks, (ch + 1) * tasks // nchunks):
            _attention_backward_head(
                dqkv, datt, dout, qkv, att, kt, vt, dkt, dvt, prow, bh // NH, bh % NH, T, C, HS, scale,
                True, bh * T * T, key, thr, dscale,
            )  # fmt: skip


def attention_dropout_backward(
    dqkv: np.ndarray, datt: np.ndarray, dout: np.ndarray, qkv: np.ndarray, att: np.ndarray, key: int, p: float
) -> None:
    """Backward of attention_dropout_forward. Accumulates into dqkv; datt is scratch (overwritten).

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T)
    the saved probabilities before dropout; key, p as in the forward.
    """
    _attention_dropout_backward(dqkv, datt, dout, qkv, att, *_dropout_params(key, p))


@njit(cache=True, fastmath=True)
def attention_decode(
    out: np.ndarray, q: np.ndarray, kcache: np.ndarray, vcache: np.ndarray, n_ctx: int, n_head: int
) -> None:
    """One query per sequence against the first n_ctx cached keys and values (all in the past).

    out (B, C); q (B, C); kcache (B, S, C); vcache (B, S, C), S >= n_ctx; n_ctx, n_head ints.
    """
    # Serial: a decode step is a few thousand flops, less than a parallel launch costs.
    B, C = q.shape
    HS = C // n_head
    scale = np.float32(1.0 / math.sqrt(HS))
    scores = np.empty(max(n_ctx, 1), np.float32)
    for b in range(B):
        for h in range(n_head):
            o = h * HS
            for t in range(n_ctx):
                s = np.float32(0.0)
                for i in range(HS):
                    s += q[b, o + i] * kcache[b, t, o + i]
                scores[t] = s * scale
            inv = _softmax_unnormalised(scores, n_ctx)
            for i in range(HS):
                out[b, o + i] = 0.0
            for t in range(n_ctx):
                p = scores[t] * inv
                for i in range(HS):
                    out[b, o + i] += p * vcache[b, t, o + i]


# --------------------------------------------------------------------------------------------
# Pointwise


@njit(cache=True, parallel=True, fastmath=True)
def rope_forward(out: np.ndarray, inp: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotary positions: q and k of every head turned, v copied; out may be inp (in place).

    With a = x[:HS/2], b = x[HS/2:] of a head vector at position t: [a cos - b sin, a sin + b cos].
    out, inp (B, T, 3C); cos, sin (>=T, HS/2), position t reads row t.
    """
    B, T, C3 = inp.shape
    half = cos.shape[1]
    C = C3 // 3
    for r in prange(B * T):
        b, t = r // T, r % T
        for h0 in range(0, 2 * C, 2 * half):  # the heads of q, then of k
            for i in range(half):
                x0, x1 = inp[b, t, h0 + i], inp[b, t, h0 + half + i]
                c, s = cos[t, i], sin[t, i]
                out[b, t, h0 + i] = x0 * c - x1 * s
                out[b, t, h0 + half + i] = x0 * s + x1 * c
        for j in range(2 * C, C3):
            out[b, t, j] = inp[b, t, j]


@njit(cache=True, parallel=True, fastmath=True)
def rope_backward(dinp: np.ndarray, dout: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Backward of rope_forward (the rotation transposed): [da cos + db sin, -da sin + db cos]. Accumulates.

    dinp, dout (B, T, 3C); cos, sin (>=T, HS/2).
    """
    B, T, C3 = dout.shape
    half = cos.shape[1]
    C = C3 // 3
    for r in prange(B * T):
        b, t = r // T, r % T
        for h0 in range(0, 2 * C, 2 * half):
            for i in range(half):
                d0, d1 = dout[b, t, h0 + i], dout[b, t, h0 + half + i]
                c, s = cos[t, i], sin[t, i]
                dinp[b, t, h0 + i] += d0 * c + d1 * s
                dinp[b, t, h0 + half + i] += d1 * c - d0 * s
        for j in range(2 * C, C3):
            dinp[b, t, j] += dout[b, t, j]


@njit(cache=True, parallel=True, fastmath=True)
def relu2_forward(out: np.ndarray, inp: np.ndarray) -> None:
    """out = relu(inp) ** 2.

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    B, T, H = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for j in range(H):
            x = max(inp[b, t, j], np.float32(0.0))
            out[b, t, j] = x * x


@njit(cache=True, parallel=True, fastmath=True)
def relu2_backward(dinp: np.ndarray, dout: np.ndarray, inp: np.ndarray) -> None:
    """dinp += dout * 2 * relu(inp). Accumulates.

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    B, T, H = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for j in range(H):
            dinp[b, t, j] += dout[b, t, j] * np.float32(2.0) * max(inp[b, t, j], np.float32(0.0))


@njit(cache=True, inline="always")
def _erff(x):
    """erf(x) within ~1.2e-7 (Numerical Recipes' Chebyshev fit of erfc, through _expf), the C twin
    fc_erff (csrc/fc_math.h): it vectorises, where math.erf is a call per element."""
    z = abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.5) * z)
    p = np.float32(0.17087277)
    p = p * t - np.float32(0.82215223)
    p = p * t + np.float32(1.48851587)
    p = p * t - np.float32(1.13520398)
    p = p * t + np.float32(0.27886807)
    p = p * t - np.float32(0.18628806)
    p = p * t + np.float32(0.09678418)
    p = p * t + np.float32(0.37409196)
    p = p * t + np.float32(1.00002368)
    p = p * t - np.float32(1.26551223)
    e = t * _expf(p - z * z)  # erfc(|x|)
    return e - np.float32(1.0) if x < np.float32(0.0) else np.float32(1.0) - e


@njit(cache=True, inline="always")
def _gelu(x):
    """The exact GELU 0.5 x (1 + erf(x / sqrt 2)) in float32 (fc_gelu)."""
    return np.float32(0.5) * x * (np.float32(1.0) + _erff(x * np.float32(0.70710678118654752)))


@njit(cache=True, inline="always")
def _gelu_grad(x):
    """GELU's derivative Phi(x) + x phi(x) in float32 (fc_gelu_grad)."""
    cdf = np.float32(0.5) * (np.float32(1.0) + _erff(x * np.float32(0.70710678118654752)))
    return cdf + x * np.float32(0.39894228040143268) * _expf(np.float32(-0.5) * x * x)


@njit(cache=True, parallel=True, fastmath=True)
def gelu_forward(out: np.ndarray, inp: np.ndarray) -> None:
    """out = 0.5 * inp * (1 + erf(inp / sqrt(2))), the exact GELU (erf within ~1e-7, see _erff).

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    B, T, H = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for j in range(H):
            out[b, t, j] = _gelu(inp[b, t, j])


@njit(cache=True, parallel=True, fastmath=True)
def gelu_backward(dinp: np.ndarray, dout: np.ndarray, inp: np.ndarray) -> None:
    """dinp += dout * (Phi(inp) + inp * phi(inp)), Phi the normal cdf, phi its density. Accumulates.

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    B, T, H = inp.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for j in range(H):
            dinp[b, t, j] += dout[b, t, j] * _gelu_grad(inp[b, t, j])


@njit(cache=True, parallel=True)
def residual_forward(out: np.ndarray, inp1: np.ndarray, inp2: np.ndarray) -> None:
    """out = inp1 + inp2.

    out, inp1, inp2 (B, T, C).
    """
    B, T, C = out.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for c in range(C):
            out[b, t, c] = inp1[b, t, c] + inp2[b, t, c]


@njit(cache=True, parallel=True)
def residual_backward(dinp1: np.ndarray, dinp2: np.ndarray, dout: np.ndarray) -> None:
    """dinp1 += dout; dinp2 += dout. Accumulates.

    dinp1, dinp2, dout (B, T, C).
    """
    B, T, C = dout.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        for c in range(C):
            g = dout[b, t, c]
            dinp1[b, t, c] += g
            dinp2[b, t, c] += g


# --------------------------------------------------------------------------------------------
# Cross-entropy


@njit(cache=True, parallel=True, fastmath=True)
def crossentropy_forward(losses: np.ndarray, probs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
    """probs = softmax(logits); losses = -log probs[target], natural log.

    losses (B, T); probs (B, T, V) saved; logits (B, T, V); targets (B, T) int.
    """
    B, T, V = logits.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        # max, then sum of exp (float64), then log-sum-exp; probs from the shifted logits
        mx = np.float32(-np.inf)
        for j in range(V):
            mx = max(mx, logits[b, t, j])
        tot = 0.0
        for j in range(V):
            e = np.exp(logits[b, t, j] - mx)
            probs[b, t, j] = e
            tot += e
        log_z = np.log(tot)
        inv = np.float32(1.0 / tot)
        for j in range(V):
            probs[b, t, j] *= inv
        losses[b, t] = log_z - (logits[b, t, targets[b, t]] - mx)


@njit(cache=True, parallel=True, fastmath=True)
def crossentropy_backward(dlogits: np.ndarray, dlosses: np.ndarray, probs: np.ndarray, targets: np.ndarray) -> None:
    """Fused softmax + cross-entropy backward: dlogits += dlosses * (probs - onehot). Accumulates.

    dlogits (B, T, V); dlosses (B, T); probs (B, T, V); targets (B, T) int.
    """
    B, T, V = probs.shape
    for r in prange(B * T):
        b, t = r // T, r % T
        dl = dlosses[b, t]
        for j in range(V):
            dlogits[b, t, j] += dl * probs[b, t, j]
        dlogits[b, t, targets[b, t]] -= dl


# --------------------------------------------------------------------------------------------
# Optimizer


@njit(cache=True, parallel=True, fastmath=True)
def grad_norm(grads: np.ndarray) -> float:
    """sqrt(sum(grads**2)), accumulated in float64.

    grads (P,) the flat gradient buffer.
    """
    total = 0.0
    for i in prange(grads.shape[0]):
        g = np.float64(grads[i])
        total += g * g
    return np.sqrt(total)


@njit(cache=True, parallel=True, fastmath=True)
def adamw_update(
    params: np.ndarray,
    grads: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    decay: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float,
) -> None:
    """AdamW on flat buffers; g = grads * grad_scale (the clip factor), step counts from 1.

    p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * decay * p)
    params, grads, m, v (P,); decay (P,) uint8, 1 where weight decay applies (2-D tensors).
    """
    # One pass over the five buffers; scalars folded in float64 once, applied in float32.
    b1 = np.float32(beta1)
    b2 = np.float32(beta2)
    c1 = np.float32(1.0 - beta1)
    c2 = np.float32(1.0 - beta2)
    inv_bc1 = np.float32(1.0 / (1.0 - beta1**step))
    inv_bc2 = np.float32(1.0 / (1.0 - beta2**step))
    lr32 = np.float32(lr)
    wd = np.float32(weight_decay)
    eps32 = np.float32(eps)
    scale = np.float32(grad_scale)
    for i in prange(params.shape[0]):
        g = grads[i] * scale
        mi = b1 * m[i] + c1 * g
        vi = b2 * v[i] + c2 * g * g
        m[i] = mi
        v[i] = vi
        p = params[i]
        upd = (mi * inv_bc1) / (np.sqrt(vi * inv_bc2) + eps32) + wd * np.float32(decay[i]) * p
        params[i] = p - lr32 * upd

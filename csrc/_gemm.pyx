# cython: language_level=3
"""fastchar._gemm: packed matrix products in bf16 (AVX512_BF16) and fp32 (AVX-512, AVX2 + FMA, NEON), from
csrc/gemm_bf16.c, and causal attention vectorised on the same paths, from csrc/attention.c.

The kernels are compiled for every path and run the one fastchar.isa chose (it is handed to the C
code as this module loads), so this module imports on every CPU; the products raise ConfigError
where the path in use (the generic one, FASTCHAR_DISABLE_BF16=1 for bf16) has none. "bf16" rounds both operands to bfloat16 (round to nearest even) and accumulates in fp32;
"fp32" is an ordinary fp32 product. Outputs are written in place, never allocated.

Letters: N rows (B*T), IC/OC in/out channels; M, K general product sizes.
Threads: each call opens one OpenMP parallel region of `threads` threads (0: OpenMP's current
limit) on the libgomp pool the Cython kernels use, splitting the rows of the output; inside another
parallel region it runs on the calling thread.
Not here: the model's wiring (fastchar.model decides which products use which precision).
"""

from fastchar.backends.reference import _dropout_threshold
from fastchar.errors import ConfigError

from attention cimport fc_att_dropout, fc_attention_backward, fc_attention_forward

from attention cimport fc_attention_available
from fc_isa cimport FC_ISA_AVX2, FC_ISA_AVX512, fc_isa, fc_isa_bf16, fc_isa_compiled, fc_isa_cpu, fc_isa_cpu_bf16, fc_isa_set
from gemm_bf16 cimport (
    FC_BF16,
    FC_F32,
    FC_GEMM_BADARG,
    FC_GEMM_NOMEM,
    FC_GEMM_OK,
    FC_GEMM_UNSUPPORTED,
    fc_gemm,
    fc_gemm_available,
)

PRECISIONS = ("fp32", "bf16")


def has_avx512bf16() -> bool:
    """True when the bf16 products can run: the avx512 path with AVX512_BF16, FASTCHAR_DISABLE_BF16 unset."""
    return bool(fc_gemm_available(FC_BF16))


def has_fp32() -> bool:
    """True when the packed fp32 products run on the path in use (every path but the generic one)."""
    return bool(fc_gemm_available(FC_F32))


def cpu_features() -> dict:
    """What the hardware offers, whatever path is in use."""
    best = fc_isa_cpu()
    return {"avx512f": best == FC_ISA_AVX512, "avx2": best in (FC_ISA_AVX2, FC_ISA_AVX512),
            "avx512_bf16": bool(fc_isa_cpu_bf16())}


def isa_in_use() -> tuple:
    """(path code, bf16) as the C code holds them (fastchar.isa.CODES)."""
    return fc_isa(), bool(fc_isa_bf16())


def _set_isa(int code, bint bf16) -> None:
    fc_isa_set(code, bf16)


def _cpu_probe() -> tuple:
    return fc_isa_cpu(), bool(fc_isa_cpu_bf16()), tuple(c for c in range(4) if fc_isa_compiled(c))


cdef int _precision_code(str precision) except -1:
    if precision == "bf16":
        if not fc_gemm_available(FC_BF16):
            reason = ("turned off (FASTCHAR_DISABLE_BF16, or a path below avx512)" if fc_isa_cpu_bf16()
                      else "this CPU has no AVX512_BF16 (vdpbf16ps)")
            raise ConfigError(f"bf16 matrix products are unavailable: {reason}",
                              hint="use precision='fp32' (run `fastchar info` to see the CPU's features)")
        return FC_BF16
    if precision == "fp32":
        if not fc_gemm_available(FC_F32):
            raise ConfigError("the packed fp32 matrix product does not run on the generic path",
                              hint="use the BLAS-backed kernels (fastchar's cython backend) on this path")
        return FC_F32
    raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


cdef int _check(int rc) except -1:
    if rc == FC_GEMM_OK:
        return 0
    if rc == FC_GEMM_NOMEM:
        raise MemoryError("fastchar._gemm: could not allocate the packing buffers")
    if rc == FC_GEMM_UNSUPPORTED:
        raise ConfigError("this CPU lacks the instructions of the requested matrix product")
    raise ValueError("fastchar._gemm: inconsistent shapes or strides")


def gemm(float[:, ::1] c, const float[:, ::1] a, const float[:, ::1] b, bint trans_a=False, bint trans_b=False,
         float beta=0.0, str precision="bf16", int threads=0) -> None:
    """c = beta * c + op(a) @ op(b), op = transpose when trans_*; beta 0 overwrites (c is not read).

    c (M, N); a (M, K), or (K, M) with trans_a; b (K, N), or (N, K) with trans_b. float32, C-contiguous.
    """
    cdef int code = _precision_code(precision)
    cdef long M = c.shape[0], N = c.shape[1]
    cdef long K = a.shape[0] if trans_a else a.shape[1]
    cdef long am = a.shape[1] if trans_a else a.shape[0]
    cdef long bk = b.shape[1] if trans_b else b.shape[0]
    cdef long bn = b.shape[0] if trans_b else b.shape[1]
    if am != M or bn != N or bk != K:
        raise ConfigError(f"gemm shapes do not match: c ({c.shape[0]}, {c.shape[1]}), a ({a.shape[0]}, {a.shape[1]}) "
                          f"(trans_a={bool(trans_a)}), b ({b.shape[0]}, {b.shape[1]}) (trans_b={bool(trans_b)})")
    cdef int rc
    cdef const float *ap = &a[0, 0] if a.shape[0] * a.shape[1] > 0 else NULL
    cdef const float *bp = &b[0, 0] if b.shape[0] * b.shape[1] > 0 else NULL
    cdef float *cp = &c[0, 0] if M * N > 0 else NULL
    with nogil:
        rc = fc_gemm(code, trans_a, trans_b, M, N, K, ap, a.shape[1], bp, b.shape[1], beta, cp, N, threads)
    _check(rc)


def matmul_forward(float[:, ::1] out, const float[:, ::1] inp, const float[:, ::1] weight, str precision="bf16",
                   int threads=0) -> None:
    """out = inp @ weight (overwrites out).

    out (N, OC); inp (N, IC); weight (IC, OC).
    """
    gemm(out, inp, weight, False, False, 0.0, precision, threads)


def matmul_backward(float[:, ::1] dinp, float[:, ::1] dweight, const float[:, ::1] dout, const float[:, ::1] inp,
                    const float[:, ::1] weight, str precision="bf16", int threads=0, bint overwrite=False) -> None:
    """dinp += dout @ weight.T; dweight += inp.T @ dout. Accumulates into both (overwrite=True: dinp =
    dout @ weight.T, for a plan's first writer of dinp; dweight still accumulates).

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC).
    """
    gemm(dinp, dout, weight, False, True, 0.0 if overwrite else 1.0, precision, threads)
    gemm(dweight, inp, dout, True, False, 1.0, precision, threads)


def attention_supported(int C, int NH) -> bool:
    """True when attention_forward/backward run here: a vector path, and HS = C / NH a multiple of 16, <= 64."""
    return bool(fc_attention_available(C, NH))


cdef int _check_attention(int rc, long C, long NH) except -1:
    if rc == FC_GEMM_UNSUPPORTED:
        raise ConfigError(f"the vectorised attention kernel does not handle C={C}, NH={NH} on this path",
                          hint="it needs a vector path (not generic) and a head size C/NH that is a multiple of 16 and at most 64; "
                          "use the backend's attention kernel (see attention_supported)")
    return _check(rc)


def attention_forward(float[:, :, ::1] out, float[:, :, :, ::1] att, const float[:, :, ::1] qkv,
                      int threads=0) -> None:
    """Causal softmax attention: att = softmax(q k^T / sqrt(HS) + mask); out = att v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities, zero above the diagonal; qkv (B, T, 3C).
    """
    _attention_forward(out, att, qkv, NULL, threads)


def attention_dropout_forward(float[:, :, ::1] out, float[:, :, :, ::1] att, const float[:, :, ::1] qkv,
                              unsigned int key, double p, int threads=0) -> None:
    """attention_forward with dropout on the probabilities: out = (att * mask) v, heads merged.

    att keeps the probabilities BEFORE dropout; key (uint32) and p in [0, 1) give the mask over
    att's flat index, the same as every backend's attention_dropout_forward.
    """
    cdef fc_att_dropout drop = _dropout(key, p)
    _attention_forward(out, att, qkv, &drop, threads)


cdef fc_att_dropout _dropout(unsigned int key, double p) except *:
    cdef fc_att_dropout drop
    drop.key, drop.thr, drop.dscale = key, _dropout_threshold(p), 1.0 / (1.0 - p)
    return drop


cdef _attention_forward(float[:, :, ::1] out, float[:, :, :, ::1] att, const float[:, :, ::1] qkv,
                        const fc_att_dropout* drop, int threads):
    cdef long B = att.shape[0], NH = att.shape[1], T = att.shape[2], C = out.shape[2]
    if (out.shape[0], out.shape[1], att.shape[3], qkv.shape[0], qkv.shape[1], qkv.shape[2]) != (B, T, T, B, T, 3 * C):
        raise ConfigError("attention_forward: shapes of out, att and qkv do not agree")
    cdef int rc
    if B * T == 0:
        return
    with nogil:
        rc = fc_attention_forward(&out[0, 0, 0], &att[0, 0, 0, 0], &qkv[0, 0, 0], B, T, C, NH, drop, threads)
    _check_attention(rc, C, NH)


def attention_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt, const float[:, :, ::1] dout,
                       const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, int threads=0,
                       bint overwrite=False) -> None:
    """Backward of attention_forward. Accumulates into dqkv (overwrite=True: writes it, for a plan's
    first writer); datt is scratch (left untouched here).

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T).
    """
    _attention_backward(dqkv, datt, dout, qkv, att, NULL, threads, overwrite)


def attention_dropout_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt, const float[:, :, ::1] dout,
                               const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, unsigned int key,
                               double p, int threads=0, bint overwrite=False) -> None:
    """Backward of attention_dropout_forward (att: the probabilities before dropout; key, p as there)."""
    cdef fc_att_dropout drop = _dropout(key, p)
    _attention_backward(dqkv, datt, dout, qkv, att, &drop, threads, overwrite)


cdef _attention_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt, const float[:, :, ::1] dout,
                         const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, const fc_att_dropout* drop,
                         int threads, bint overwrite):
    cdef long B = att.shape[0], NH = att.shape[1], T = att.shape[2], C = dout.shape[2]
    if ((dqkv.shape[0], dqkv.shape[1], dqkv.shape[2]) != (B, T, 3 * C)
            or (datt.shape[0], datt.shape[1], datt.shape[2], datt.shape[3]) != (B, NH, T, T)
            or (dout.shape[0], dout.shape[1], att.shape[3]) != (B, T, T)
            or (qkv.shape[0], qkv.shape[1], qkv.shape[2]) != (B, T, 3 * C)):
        raise ConfigError("attention_backward: shapes of dqkv, datt, dout, qkv and att do not agree")
    cdef int rc
    if B * T == 0:
        return
    with nogil:
        rc = fc_attention_backward(&dqkv[0, 0, 0], &datt[0, 0, 0, 0], &dout[0, 0, 0], &qkv[0, 0, 0],
                                   &att[0, 0, 0, 0], B, T, C, NH, drop, threads, overwrite)
    _check_attention(rc, C, NH)


from fastchar import isa as _isa  # noqa: E402  (last: the module is complete when the path is set)

_isa.attach(_set_isa, _cpu_probe())

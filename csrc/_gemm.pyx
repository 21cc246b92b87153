# cython: language_level=3
"""fastchar._gemm: packed matrix products in bf16 (AVX512_BF16) and fp32 (AVX-512F), from csrc/gemm_bf16.c,
and causal attention vectorised for AVX-512F, from csrc/attention.c.

The C engine picks its ISA at run time (cpuid), so this module imports on every CPU; the products
raise ConfigError where the CPU (or FASTCHAR_DISABLE_BF16=1 / FASTCHAR_DISABLE_AVX512=1) rules
them out. "bf16" rounds both operands to bfloat16 (round to nearest even) and accumulates in fp32;
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

from gemm_bf16 cimport (
    FC_BF16,
    FC_F32,
    FC_GEMM_BADARG,
    FC_GEMM_NOMEM,
    FC_GEMM_OK,
    FC_GEMM_UNSUPPORTED,
    fc_gemm,
    fc_gemm_cpu_has_avx512bf16,
    fc_gemm_cpu_has_avx512f,
    fc_gemm_has_avx512bf16,
    fc_gemm_has_avx512f,
)

PRECISIONS = ("fp32", "bf16")


def has_avx512bf16() -> bool:
    """True when the bf16 products can run: the CPU has AVX512_BF16 and FASTCHAR_DISABLE_BF16 is unset."""
    return bool(fc_gemm_has_avx512bf16())


def has_avx512f() -> bool:
    """True when the fp32 products can run: the CPU has AVX-512 F/VL/BW/DQ and FMA."""
    return bool(fc_gemm_has_avx512f())


def cpu_features() -> dict:
    """What the hardware offers, ignoring the FASTCHAR_DISABLE_* switches."""
    return {"avx512f": bool(fc_gemm_cpu_has_avx512f()), "avx512_bf16": bool(fc_gemm_cpu_has_avx512bf16())}


cdef int _precision_code(str precision) except -1:
    if precision == "bf16":
        if not fc_gemm_has_avx512bf16():
            reason = ("disabled by FASTCHAR_DISABLE_BF16/FASTCHAR_DISABLE_AVX512" if fc_gemm_cpu_has_avx512bf16()
                      else "this CPU has no AVX512_BF16 (vdpbf16ps)")
            raise ConfigError(f"bf16 matrix products are unavailable: {reason}",
                              hint="use precision='fp32' (run `fastchar info` to see the CPU's features)")
        return FC_BF16
    if precision == "fp32":
        if not fc_gemm_has_avx512f():
            raise ConfigError("the packed fp32 matrix product needs AVX-512 (F, VL, BW, DQ) and FMA",
                              hint="use the BLAS-backed kernels (fastchar's cython backend) on this CPU")
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
                    const float[:, ::1] weight, str precision="bf16", int threads=0) -> None:
    """dinp += dout @ weight.T; dweight += inp.T @ dout. Accumulates into both.

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC).
    """
    gemm(dinp, dout, weight, False, True, 1.0, precision, threads)
    gemm(dweight, inp, dout, True, False, 1.0, precision, threads)


def attention_supported(int C, int NH) -> bool:
    """True when attention_forward/backward run here: AVX-512F, and HS = C / NH a multiple of 16, <= 64."""
    return bool(fc_gemm_has_avx512f()) and C % NH == 0 and (C // NH) % 16 == 0 and C // NH <= 64


cdef int _check_attention(int rc, long C, long NH) except -1:
    if rc == FC_GEMM_UNSUPPORTED:
        raise ConfigError(f"the AVX-512 attention kernel does not handle C={C}, NH={NH} on this CPU",
                          hint="it needs AVX-512F and a head size C/NH that is a multiple of 16 and at most 64; "
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
                       const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, int threads=0) -> None:
    """Backward of attention_forward. Accumulates into dqkv; datt is scratch (left untouched here).

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T).
    """
    _attention_backward(dqkv, datt, dout, qkv, att, NULL, threads)


def attention_dropout_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt, const float[:, :, ::1] dout,
                               const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, unsigned int key,
                               double p, int threads=0) -> None:
    """Backward of attention_dropout_forward (att: the probabilities before dropout; key, p as there)."""
    cdef fc_att_dropout drop = _dropout(key, p)
    _attention_backward(dqkv, datt, dout, qkv, att, &drop, threads)


cdef _attention_backward(float[:, :, ::1] dqkv, float[:, :, :, ::1] datt, const float[:, :, ::1] dout,
                         const float[:, :, ::1] qkv, const float[:, :, :, ::1] att, const fc_att_dropout* drop,
                         int threads):
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
                                   &att[0, 0, 0, 0], B, T, C, NH, drop, threads)
    _check_attention(rc, C, NH)

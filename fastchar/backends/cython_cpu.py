"""The Cython backend: re-exports the compiled kernels of fastchar._cykernels (built from csrc/).

Same names and signatures as fastchar.backends.reference. Loops run in OpenMP-parallel `nogil`
C code and matrix products in scipy's BLAS (sgemm); see csrc/_kernels.pyx. Nothing is implemented
here: if the extension was not built, importing this module raises ImportError, which the backend
loader reports as "backend 'cython' is not available".

Threads: the kernels' OpenMP threads also split every matrix product into single-threaded sgemm
calls; fastchar.threads sizes them through the hooks below and pins BLAS to one thread
(get_backend applies it before any kernel runs).
"""

from __future__ import annotations

from types import ModuleType

try:
    from fastchar._cykernels import *  # noqa: F403  (every name of fastchar.backends.KERNELS)
    from fastchar._cykernels import openmp_enabled, openmp_max_threads, set_openmp_threads
except ImportError as exc:
    raise ImportError(
        "the Cython extension fastchar._cykernels is missing or stale; build it with "
        f"`pip install -e .` (or `python setup.py build_ext --inplace`) ({exc})"
    ) from exc


def set_threads(n: int) -> None:
    """Thread hook (fastchar.threads): n OpenMP threads for the kernels' parallel loops."""
    set_openmp_threads(n)


def thread_info() -> dict:
    """Thread hook (fastchar.threads): what the kernels run on."""
    # without OpenMP (a compiler that has none, see setup.py) the kernels run on 1 thread
    return {"openmp": {"threads": openmp_max_threads(), "enabled": bool(openmp_enabled())}}


def plan_kernels(precision: str, cfg: object) -> dict:
    """Plan hook (fastchar.backends.plan_kernels): the packed products and attention of fastchar._gemm.

    They run on the instruction-set path fastchar.isa chose (avx512, avx2 or neon; FASTCHAR_ISA
    forces a lower one). bf16: every matrix product (forward and both backward products) on
    AVX512_BF16; a clear ConfigError where the path lacks it. fp32: the packed fp32 products (they
    need no OpenBLAS, so OPENBLAS_CORETYPE and import order no longer matter) and the vectorised
    attention where the head size suits it; on the generic path the sgemm kernels stay.
    FASTCHAR_GEMM=blas keeps the sgemm kernels for fp32 (for comparisons). On the avx2 and avx512
    paths every other kernel of the plan comes from fastchar._cykernels_avx2 (isa_kernels).
    """
    import os

    from fastchar import isa
    from fastchar.errors import ConfigError

    try:
        from fastchar import _gemm
    except ImportError as exc:
        if precision == "bf16":
            raise ConfigError(
                f"bf16 needs the extension fastchar._gemm, which is missing here ({exc})",
                hint="rebuild fastchar (`pip install -e .`), or use precision='fp32'",
            ) from exc
        return {}
    chosen = isa.selection()
    blas = os.environ.get("FASTCHAR_GEMM", "") == "blas"
    if precision == "bf16":
        if not _gemm.has_avx512bf16():
            if not chosen.bf16_cpu:
                reason = "this CPU has no AVX512_BF16 (vdpbf16ps)"
            elif chosen.path != "avx512":
                forced = f" (FASTCHAR_ISA={chosen.forced})" if chosen.forced else ""
                reason = f"the {chosen.path} path has no bf16 products{forced}"
            else:
                reason = "FASTCHAR_DISABLE_BF16 is set"
            raise ConfigError(
                f"precision 'bf16' is unavailable: {reason}",
                hint="use precision='fp32' (`fastchar info` shows the CPU's paths and AVX512_BF16)",
            )
        kernels = _gemm_products("bf16", "precision bf16: AVX512_BF16 packed products (vdpbf16ps), fp32 accumulation")
    elif _gemm.has_fp32() and not blas:
        kernels = _gemm_products("fp32", f"fp32 packed products on the {chosen.path} path (no BLAS)")
    else:
        kernels = {}
    from fastchar._blas_env import openblas_warning

    if "matmul_forward" not in kernels and openblas_warning():  # the sgemm products stay: say they are slow
        import warnings

        warnings.warn(openblas_warning(), RuntimeWarning, stacklevel=3)
    if _gemm.attention_supported(cfg.d_model, cfg.n_head) and not blas:
        why = f"vector attention on the {chosen.path} path, head size {cfg.d_model // cfg.n_head}"
        for kind in ("attention", "attention_dropout"):
            for name in (kind + "_forward", kind + "_backward"):
                kernels[name] = (getattr(_gemm, name), why)
    own = isa_kernels(chosen.path)
    variants = _overwrite_variants(kernels, own)  # of fastchar._gemm's kernels and cython's element-wise ones
    if own.__name__ != "fastchar._cykernels":
        from fastchar.backends import KERNELS

        why = f"cython's own kernel compiled for AVX2 + FMA ({own.__name__}, the {chosen.path} path)"
        for name in KERNELS:
            if name not in kernels and hasattr(own, name):
                kernels[name] = (getattr(own, name), why)
    return {**kernels, **variants}


def isa_kernels(path: str) -> ModuleType:
    """The module of the Cython kernels for instruction-set path `path`: fastchar._cykernels_avx2 (the
    same source compiled with AVX2 + FMA, setup.py) on the avx2 and avx512 paths where it was built,
    else fastchar._cykernels. Imported only there: its code would not run on a CPU without AVX2."""
    from fastchar import _cykernels

    if path not in ("avx2", "avx512"):
        return _cykernels
    try:
        from fastchar import _cykernels_avx2
    except ImportError:  # not x86-64, or its build failed: the baseline kernels
        return _cykernels
    return _cykernels_avx2


def _overwrite_variants(kernels: dict, own: ModuleType) -> dict:
    """The "<kernel>@overwrite" plan entries (fastchar.graph.OVERWRITE): the backward kernels that write
    the gradients of their activation inputs instead of accumulating into them, bound where the op is
    the first of the backward to write them, so that those slots need no zeroing (nor reading back).
    own: the module of the Cython kernels on this path (isa_kernels)."""
    from functools import partial

    from fastchar.graph import OVERWRITE

    why = "first writer of its input gradients: writes them (the model does not zero those slots)"
    out = {}
    for name in ("matmul_backward", "matmul_t_backward", "attention_backward", "attention_dropout_backward"):
        if name in kernels:
            fn, reason = kernels[name]
            out[name + OVERWRITE] = (partial(fn, overwrite=True), f"{reason}; {why}")
    for name in ("relu2_backward", "gelu_backward", "residual_backward"):
        out[name + OVERWRITE] = (partial(getattr(own, name), overwrite=True), f"cython's own kernel; {why}")
    return out


def _gemm_products(precision: str, why: str) -> dict:
    """The matrix products (x @ W and the tied head's x @ W.T, forward and backward) of fastchar._gemm."""
    from functools import partial

    from fastchar import _gemm

    return {
        "matmul_forward": (partial(_gemm.matmul_forward, precision=precision), why),
        "matmul_backward": (partial(_gemm.matmul_backward, precision=precision), why),
        "matmul_t_forward": (partial(matmul_t_forward_gemm, precision=precision), why),
        "matmul_t_backward": (partial(matmul_t_backward_gemm, precision=precision), why),
    }


def matmul_t_forward_gemm(out, inp, weight, precision: str = "fp32") -> None:
    """out = inp @ weight.T through fastchar._gemm. out (N, OC); inp (N, IC); weight (OC, IC)."""
    from fastchar import _gemm

    _gemm.gemm(out, inp, weight, False, True, 0.0, precision)


def matmul_t_backward_gemm(dinp, dweight, dout, inp, weight, precision: str = "fp32", overwrite: bool = False) -> None:
    """dinp += dout @ weight; dweight += dout.T @ inp through fastchar._gemm. Accumulates (overwrite:
    dinp = dout @ weight, for a plan's first writer of dinp).

    dinp (N, IC); dweight (OC, IC); dout (N, OC); inp (N, IC); weight (OC, IC)."""
    from fastchar import _gemm

    _gemm.gemm(dinp, dout, weight, False, False, 0.0 if overwrite else 1.0, precision)
    _gemm.gemm(dweight, dout, inp, True, False, 1.0, precision)

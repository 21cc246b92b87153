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
    FASTCHAR_GEMM=blas keeps the sgemm kernels for fp32 (for comparisons).
    """
    import os
    from functools import partial

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
                reason = f"the {chosen.path} path has no bf16 products (FASTCHAR_ISA={chosen.forced})"
            else:
                reason = "FASTCHAR_DISABLE_BF16 is set"
            raise ConfigError(
                f"precision 'bf16' is unavailable: {reason}",
                hint="use precision='fp32' (`fastchar info` shows the CPU's paths and AVX512_BF16)",
            )
        kernels = {
            "matmul_forward": partial(_gemm.matmul_forward, precision="bf16"),
            "matmul_backward": partial(_gemm.matmul_backward, precision="bf16"),
        }
    elif _gemm.has_fp32() and not blas:
        kernels = {
            "matmul_forward": partial(_gemm.matmul_forward, precision="fp32"),
            "matmul_backward": partial(_gemm.matmul_backward, precision="fp32"),
        }
    else:
        kernels = {}
    from fastchar._blas_env import openblas_warning

    if "matmul_forward" not in kernels and openblas_warning():  # the sgemm products stay: say they are slow
        import warnings

        warnings.warn(openblas_warning(), RuntimeWarning, stacklevel=3)
    if _gemm.attention_supported(cfg.d_model, cfg.n_head) and not blas:
        for kind in ("attention", "attention_dropout"):
            for name in (kind + "_forward", kind + "_backward"):
                kernels[name] = getattr(_gemm, name)
    return kernels

"""The Cython backend: re-exports the compiled kernels of fastchar._cykernels (built from csrc/).

Same names and signatures as fastchar.backends.reference. Loops run in OpenMP-parallel `nogil`
C code and matrix products in scipy's BLAS (sgemm); see csrc/_kernels.pyx. Nothing is implemented
here: if the extension was not built, importing this module raises ImportError, which the backend
loader reports as "backend 'cython' is not available".

Threads: the kernels' OpenMP threads also split every matrix product into single-threaded sgemm
calls; fastchar.threads pins BLAS to one thread (get_backend applies it before any kernel runs).
"""

from __future__ import annotations

try:
    from fastchar._cykernels import (
        adamw_update,
        attention_backward,
        attention_decode,
        attention_dropout_backward,
        attention_dropout_forward,
        attention_forward,
        crossentropy_backward,
        crossentropy_forward,
        dropout_backward,
        dropout_forward,
        embedding_backward,
        embedding_forward,
        grad_norm,
        matmul_backward,
        matmul_forward,
        openmp_enabled,
        openmp_max_threads,
        relu2_backward,
        relu2_forward,
        residual_backward,
        residual_forward,
        rmsnorm_backward,
        rmsnorm_forward,
        set_gemm_mode,
        set_openmp_threads,
    )
except ImportError as exc:
    raise ImportError(
        "the Cython extension fastchar._cykernels is missing or stale; build it with "
        f"`pip install -e .` (or `python setup.py build_ext --inplace`) ({exc})"
    ) from exc


set_gemm_mode(0)

__all__ = [
    "adamw_update",
    "attention_backward",
    "attention_decode",
    "attention_dropout_backward",
    "attention_dropout_forward",
    "attention_forward",
    "crossentropy_backward",
    "crossentropy_forward",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "grad_norm",
    "matmul_backward",
    "matmul_forward",
    "openmp_enabled",
    "openmp_max_threads",
    "relu2_backward",
    "relu2_forward",
    "residual_backward",
    "residual_forward",
    "rmsnorm_backward",
    "rmsnorm_forward",
    "set_gemm_mode",
    "set_openmp_threads",
]

"""The Cython backend: re-exports the compiled kernels of fastchar._cykernels (built from csrc/).

Same names and signatures as fastchar.backends.reference. Loops run in OpenMP-parallel `nogil`
C code and matrix products in scipy's BLAS (sgemm); see csrc/_kernels.pyx. Nothing is implemented
here: if the extension was not built, importing this module raises ImportError, which the backend
loader reports as "backend 'cython' is not available".

Threads: the kernels' OpenMP threads also split every matrix product into single-threaded sgemm
calls, so importing this module sets scipy's own OpenBLAS (not NumPy's) to one thread. Two thread
pools spinning on 2 cores (OpenMP's and OpenBLAS's) made a training step 10-40x slower.
"""

from __future__ import annotations

import os

from threadpoolctl import ThreadpoolController

try:
    from fastchar._cykernels import (
        adamw_update,
        attention_backward,
        attention_decode,
        attention_forward,
        crossentropy_backward,
        crossentropy_forward,
        embedding_backward,
        embedding_forward,
        grad_norm,
        matmul_backward,
        matmul_forward,
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


def _single_thread_scipy_blas() -> None:
    """One thread for scipy's BLAS, the one the extension links through scipy.linalg.cython_blas."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS so threadpoolctl can see it)

    blas = ThreadpoolController().select(user_api="blas")
    for lib in blas.lib_controllers:
        if "scipy" in os.path.basename(os.path.dirname(lib.filepath)):  # e.g. scipy.libs/
            lib.set_num_threads(1)


_single_thread_scipy_blas()
set_gemm_mode(0)

__all__ = [
    "adamw_update",
    "attention_backward",
    "attention_decode",
    "attention_forward",
    "crossentropy_backward",
    "crossentropy_forward",
    "embedding_backward",
    "embedding_forward",
    "grad_norm",
    "matmul_backward",
    "matmul_forward",
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

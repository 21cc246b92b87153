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

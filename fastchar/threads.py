"""One thread pool, sized on purpose: OpenMP runs N threads, BLAS runs 1.

The Numba kernels (threading layer "omp") and the Cython kernels share one libgomp pool of N
threads, and both split every matrix product into single-threaded sgemm calls. BLAS is therefore
pinned to 1 thread (threadpoolctl): on 2 cores a second pool of spinning OpenBLAS threads made a
training step 10-40x slower. The NumPy reference backend follows the same rule (it is the ground
truth, not the fast path). `thread_report` says what is active.

Known interaction: once Numba's "omp" pool has started, PyTorch in the same process runs ~50x
slower (measured: a 35 ms step took 2 s). The benchmarks therefore run PyTorch in a child process;
NUMBA_THREADING_LAYER=workqueue avoids it at a cost to the Numba backend (29k -> 18k tok/s, B=12).
"""

from __future__ import annotations

import os

from fastchar.errors import ConfigError

_blas_limit = None  # keeps threadpoolctl's limit alive
_configured: int | None = None


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The cores, shared out among the ranks on this host under mpiexec (see distributed.py)."""
    from fastchar.distributed import world

    return world().default_threads(cores())


def set_threads(n: int | None = None) -> int:
    """n OpenMP threads for Numba and the Cython kernels (default_threads()), BLAS 1; returns n."""
    global _blas_limit, _configured
    n = default_threads() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--threads must be a positive integer, got {n!r}", hint=f"this machine has {cores()} cores")
    os.environ["OMP_NUM_THREADS"] = str(n)
    from fastchar.backends import thread_hooks

    for backend in thread_hooks():  # numba's prange pool, the Cython kernels' OpenMP loops
        backend.set_threads(n)
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, the one the kernels call, so it is limited too)
    from threadpoolctl import threadpool_limits

    _blas_limit = threadpool_limits(limits=1, user_api="blas")
    _configured = n
    return n


def ensure_threads() -> int:
    """Apply the default thread policy once, unless set_threads already ran."""
    return _configured if _configured is not None else set_threads()


def thread_report() -> dict:
    """What is active: Numba's threading layer and threads, OpenMP's threads, and each BLAS."""
    report: dict = {
        "cores": cores(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "replaced_OPENBLAS_CORETYPE": os.environ.get("FASTCHAR_REPLACED_OPENBLAS_CORETYPE"),
    }
    from fastchar.backends import thread_hooks

    report["openmp"] = None
    for backend in thread_hooks():
        report.update(backend.thread_info())
    from threadpoolctl import threadpool_info

    report["blas"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    report["openmp_runtimes"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "openmp"
    ]
    return report

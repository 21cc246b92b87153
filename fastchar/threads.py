"""One thread count for every pool: Numba's, OpenMP's (the Cython kernels) and BLAS's.

On a 2-core machine two pools of 2 spinning threads each would oversubscribe the cores, so fastchar
sizes them together (BLAS through threadpoolctl) and reports what is active.
"""

from __future__ import annotations

import importlib.util
import os

from fastchar.errors import ConfigError

_blas_limit = None  # keeps threadpoolctl's limit alive


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Size Numba, OpenMP and BLAS to n threads each (default: the machine's cores); returns n."""
    global _blas_limit
    n = cores() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--threads must be a positive integer, got {n!r}")
    os.environ["OMP_NUM_THREADS"] = str(n)
    if importlib.util.find_spec("numba") is not None:
        import numba

        if n > numba.config.NUMBA_NUM_THREADS:
            raise ConfigError(
                f"--threads {n} exceeds Numba's pool of {numba.config.NUMBA_NUM_THREADS} threads",
                hint=f"use at most {numba.config.NUMBA_NUM_THREADS} (this machine has {cores()} cores), "
                "or set NUMBA_NUM_THREADS before starting",
            )
        numba.set_num_threads(n)
    try:
        from fastchar import _cykernels

        _cykernels.set_openmp_threads(n)
    except ImportError:
        pass
    from threadpoolctl import threadpool_limits

    _blas_limit = threadpool_limits(limits=n, user_api="blas")
    return n


def thread_report() -> dict:
    """What is active: Numba's threading layer and threads, OpenMP's threads, and each BLAS."""
    report: dict = {"cores": cores()}
    if importlib.util.find_spec("numba") is not None:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:
            layer = f"not started yet (config: {numba.config.THREADING_LAYER})"
        report["numba"] = {"threads": numba.get_num_threads(), "threading_layer": layer}
    try:
        from fastchar import _cykernels

        report["openmp"] = {"threads": _cykernels.openmp_max_threads()}
    except ImportError:
        report["openmp"] = None
    from threadpoolctl import threadpool_info

    report["blas"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "version", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    report["openmp_runtimes"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "openmp"
    ]
    return report

# cython: language_level=3
"""fastchar._cykernels: the Cython kernels (see fastchar/backends/cython_cpu.py)."""

cimport openmp


def openmp_max_threads() -> int:
    """OpenMP's current thread limit for this module's parallel loops."""
    return openmp.omp_get_max_threads()


def set_openmp_threads(int n) -> None:
    """Set OpenMP's thread count for this module's parallel loops."""
    openmp.omp_set_num_threads(n)

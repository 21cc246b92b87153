"""Environment fastchar sets before native libraries load: OpenBLAS's core type and libgomp's spinning.

Undo an OPENBLAS_CORETYPE that forces pre-AVX-512 kernels on an AVX-512 CPU.

Some machines export OPENBLAS_CORETYPE=Haswell (AVX2). On a CPU with AVX-512 that halves sgemm
throughput (measured here: ~105 against ~205 GFLOP/s per core), and sgemm is most of a training
step. OpenBLAS reads the variable once, when NumPy or SciPy first loads it, so this runs before
fastchar imports NumPy, and only helps when nothing imported NumPy earlier (the `fastchar` command).
The CPU's flags are checked first; FASTCHAR_KEEP_OPENBLAS_CORETYPE=1 keeps the variable as it is.
(The cython backend's fp32 products no longer use OpenBLAS on AVX-512 CPUs, see fastchar._gemm.)

libgomp's waiting threads spin for GOMP_SPINCOUNT iterations (300,000 by default) before they sleep.
On a quiet machine that saves a wake-up per parallel region; when another process holds one of the
cores, the spinning thread steals the time slice its partner needs and a 2-thread step collapses
(measured on a loaded 2-core machine: ~1,000 tokens/s fwd+bwd with the default against ~21,000 with
GOMP_SPINCOUNT=200). Too short a spin costs on a quiet machine (base model, B = 12, one quiet run:
default 46,000 tokens/s, 20,000 spins 45,300, 200 spins 40,500), so fastchar sets
GOMP_SPINCOUNT=20000 (a few microseconds) unless the user set GOMP_SPINCOUNT or
OMP_WAIT_POLICY (or FASTCHAR_KEEP_OMP_WAIT=1); libgomp reads it once, when it loads, which is
after this module (the compiled kernels load it) unless something imported torch or numba first.
"""

from __future__ import annotations

import os
import sys

AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
PRE_AVX512 = {"haswell", "zen", "sandybridge", "nehalem", "prescott", "core2", "atom"}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


UNFIXED: str | None = None  # a pre-AVX-512 OPENBLAS_CORETYPE that NumPy loaded before fastchar could fix it


def openblas_warning() -> str | None:
    """One line for users whose sgemm runs slow kernels because NumPy was imported first, else None."""
    if UNFIXED is None:
        return None
    return (
        f"fastchar: OPENBLAS_CORETYPE={UNFIXED} forces OpenBLAS's pre-AVX-512 sgemm (about half speed) because "
        "NumPy was imported before fastchar; import fastchar first or unset OPENBLAS_CORETYPE"
    )


def fix_openblas_coretype() -> str | None:
    """Replace a pre-AVX-512 OPENBLAS_CORETYPE with SkylakeX on an AVX-512 CPU; returns the old value."""
    global UNFIXED
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced or os.environ.get("FASTCHAR_KEEP_OPENBLAS_CORETYPE") == "1":
        return None
    if os.environ.get("FASTCHAR_ISA", "").strip().lower() in ("avx2", "generic"):
        return None  # a path below AVX-512 was asked for: OpenBLAS may stay below it too
    if forced.lower() not in PRE_AVX512 or not AVX512 <= cpu_flags():
        return None
    if "numpy" in sys.modules:  # too late: OpenBLAS already chose its kernels
        UNFIXED = forced
        return None
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    os.environ["FASTCHAR_REPLACED_OPENBLAS_CORETYPE"] = forced
    return forced


SPINCOUNT = "20000"  # iterations a waiting OpenMP thread spins before it sleeps (see the docstring)


def limit_omp_spinning() -> str | None:
    """Set GOMP_SPINCOUNT unless the user chose a wait policy; returns the value set, or None."""
    if os.environ.get("FASTCHAR_SET_GOMP_SPINCOUNT"):  # inherited from a parent fastchar process
        return None
    if any(os.environ.get(k) for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        return None
    if os.environ.get("FASTCHAR_KEEP_OMP_WAIT") == "1":
        return None
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    os.environ["FASTCHAR_SET_GOMP_SPINCOUNT"] = SPINCOUNT  # so child processes know it was not the user
    return SPINCOUNT


fix_openblas_coretype()
limit_omp_spinning()

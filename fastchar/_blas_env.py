"""Undo an OPENBLAS_CORETYPE that forces pre-AVX-512 kernels on an AVX-512 CPU.

Some machines export OPENBLAS_CORETYPE=Haswell (AVX2). On a CPU with AVX-512 that halves sgemm
throughput (measured here: ~105 against ~205 GFLOP/s per core), and sgemm is most of a training
step. OpenBLAS reads the variable once, when NumPy or SciPy first loads it, so this runs before
fastchar imports NumPy, and only helps when nothing imported NumPy earlier (the `fastchar` command).
The CPU's flags are checked first; FASTCHAR_KEEP_OPENBLAS_CORETYPE=1 keeps the variable as it is.
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


def fix_openblas_coretype() -> str | None:
    """Replace a pre-AVX-512 OPENBLAS_CORETYPE with SkylakeX on an AVX-512 CPU; returns the old value."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if not forced or os.environ.get("FASTCHAR_KEEP_OPENBLAS_CORETYPE") == "1" or "numpy" in sys.modules:
        return None
    if forced.lower() not in PRE_AVX512 or not AVX512 <= cpu_flags():
        return None
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    os.environ["FASTCHAR_REPLACED_OPENBLAS_CORETYPE"] = forced
    return forced


fix_openblas_coretype()

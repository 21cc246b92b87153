"""What setup.py recorded about the C build: the compiler, its flags, OpenMP, and why an extension is missing.

setup.py writes fastchar/_build_info.json next to the extensions it builds (see its docstring). This
module reads it for `fastchar info`, for the error of `--backend cython` when the Cython extensions
were not built, and for the warning of a build without OpenMP. A source checkout that was never
built has no such file; every function then answers from what imports.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

BUILD_INFO = Path(__file__).with_name("_build_info.json")
KERNELS_MODULE = "fastchar._cykernels"
# builds of a module for an instruction set, and the module that serves when one is missing
BASELINE = {"fastchar._cykernels_avx2": KERNELS_MODULE}
BUILD_HINT = (
    "install a C compiler and reinstall (`pip install -v -e .` shows the compiler's output), or use --backend numba"
)
OPENMP_HINT = {
    "apple-clang": "`brew install libomp`, then reinstall",
    "clang": "install the LLVM OpenMP runtime (Debian/Ubuntu: libomp-dev), then reinstall",
}


@cache
def read_build_info() -> dict | None:
    """The recorded build, or None when there is none (a checkout that was never built) or it is unreadable."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return None


def extension_error(module: str, info: dict | None = None) -> str | None:
    """Why setup.py did not build `module` (e.g. "fastchar._cykernels"), or None if it did or no build is recorded."""
    info = read_build_info() if info is None else info
    return (info or {}).get("extensions", {}).get(module)


def cython_openmp() -> bool | None:
    """Whether the built Cython kernels run OpenMP threads; None when they are not importable."""
    try:
        from fastchar._cykernels import openmp_enabled
    except ImportError:  # not built, or a stale build
        return None
    return bool(openmp_enabled())


def build_notes(info: dict | None = None, openmp: bool | None = None) -> list[str]:
    """One line per thing a user should know about the C build: an extension not built, no OpenMP.

    info: the recorded build (default: read it); openmp: whether the kernels have OpenMP (default: ask them).
    """
    info = read_build_info() if info is None else info
    openmp = cython_openmp() if openmp is None else openmp
    notes = []
    failed = {name: why for name, why in (info or {}).get("extensions", {}).items() if why}
    if KERNELS_MODULE in failed:  # the Cython backend is out; the other extensions serve only it
        return [
            f"the Cython kernels were not built at install ({failed[KERNELS_MODULE]}): "
            f"fastchar runs on numba and numpy; to get them: {BUILD_HINT}"
        ]
    for name, why in failed.items():
        instead = f"its baseline build {BASELINE[name]}" if name in BASELINE else "its Python fallback"
        notes.append(f"{name} was not built at install ({why}); {instead} is used")
    if openmp is False:
        family = (info or {}).get("family", "")
        detail = (info or {}).get("openmp_note") or "no OpenMP"
        hint = OPENMP_HINT.get(family, "use a compiler with OpenMP and reinstall")
        notes.append(f"the Cython kernels run on one thread ({family or 'compiler'}: {detail}); for threads: {hint}")
    return notes


def cython_unavailable(exc: Exception) -> tuple[str, str]:
    """(message, hint) for a Cython backend that does not load: the recorded build failure, else the ImportError."""
    why = extension_error(KERNELS_MODULE)
    if why:
        return f"the Cython extensions were not built at install: {why}", BUILD_HINT
    return str(exc), BUILD_HINT

"""The instruction-set path of fastchar's compiled kernels: chosen once here, handed to the C code.

The vector kernels of csrc/ (the packed products, the attention, the decode products) are written
once and compiled for every path: "avx512" (AVX-512 F/VL/BW/DQ + FMA, with AVX512_BF16 the bf16
products too), "avx2" (AVX2 + FMA) and "neon" (ARM64). "generic" runs none of them: the Cython
loops with BLAS's sgemm and the plain-C decode loop, the path of a compiler without vector
extensions (MSVC). By default the best path of this CPU runs; FASTCHAR_ISA=avx512|avx2|neon|generic
forces a lower one (for tests and side-by-side figures: the avx2 path runs on an AVX-512 machine
too). FASTCHAR_ISA is read once, when the first compiled module loads; a path this CPU cannot run,
or a name that is not a path, is a ConfigError. FASTCHAR_DISABLE_BF16=1 turns the bf16 products off
on a CPU that has them. The C code reads no environment variable: each extension module (fastchar._gemm,
fastchar._cydecode) calls `attach` as it loads, and `attach` passes it the path.

Not here: which kernels a model uses (fastchar.backends.cython_cpu.plan_kernels asks `selection()`).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastchar.errors import ConfigError

ENV = "FASTCHAR_ISA"
CODES = {"generic": 0, "avx2": 1, "avx512": 2, "neon": 3}
NAMES = {code: name for name, code in CODES.items()}
# Each machine's paths, lowest first: a path runs on a CPU that has it or any later one in its list.
ORDER = {"x86_64": ("generic", "avx2", "avx512"), "aarch64": ("generic", "neon")}


@dataclass(frozen=True)
class Selection:
    """The path in use and what this CPU (and this build) offers."""

    path: str  # the path the kernels run: "avx512", "avx2", "neon" or "generic"
    best: str  # the best path this CPU runs with this build
    runnable: tuple[str, ...]  # every path this CPU runs, best first
    bf16_cpu: bool  # the CPU has AVX512_BF16
    bf16: bool  # the bf16 products run (bf16_cpu, the avx512 path, FASTCHAR_DISABLE_BF16 unset)
    forced: str | None  # FASTCHAR_ISA's value, if set

    def describe(self) -> str:
        """One line for `fastchar info`."""
        how = f"forced by {ENV}={self.forced}" if self.forced else "the best of this CPU"
        bf16 = "yes" if self.bf16 else ("no (FASTCHAR_DISABLE_BF16 or a lower path)" if self.bf16_cpu else "no")
        return (
            f"kernel path: {self.path} ({how}); this CPU runs {', '.join(self.runnable)}; AVX512_BF16 products: {bf16}"
        )


_setters: list[Callable[[int, bool], None]] = []
_cpu: tuple[int, bool, tuple[int, ...]] | None = None  # (best code, bf16, compiled codes) from the C probe
_selection: Selection | None = None
_override: tuple[str, bool] | None = None  # force() in tests


def _machine_paths() -> tuple[str, ...]:
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return ORDER.get(machine, ("generic",))


def _switch(name: str) -> bool:
    value = os.environ.get(name, "")
    return value not in ("", "0")


def _select(cpu: tuple[int, bool, tuple[int, ...]] | None) -> Selection:
    order = _machine_paths()
    if cpu is None:  # no compiled module: nothing to dispatch
        runnable, bf16_cpu = ("generic",), False
    else:
        best_code, bf16_cpu, compiled = cpu
        best_index = order.index(NAMES[best_code]) if NAMES[best_code] in order else 0
        runnable = tuple(p for p in reversed(order[: best_index + 1]) if CODES[p] in compiled)
    forced = os.environ.get(ENV, "").strip().lower() or None
    if forced is None:
        path = runnable[0]
    elif forced not in CODES:
        raise ConfigError(
            f"{ENV}={os.environ[ENV]!r} is not an instruction-set path",
            hint=f"use one of {', '.join(runnable)} (the paths this CPU runs), or unset {ENV}",
        )
    elif forced not in runnable:
        raise ConfigError(
            f"{ENV}={forced}: this CPU (or this build) cannot run the {forced} path",
            hint=f"it runs {', '.join(runnable)}; unset {ENV} for the best of them",
        )
    else:
        path = forced
    bf16 = bf16_cpu and path == "avx512" and not _switch("FASTCHAR_DISABLE_BF16")
    return Selection(path, runnable[0], runnable, bool(bf16_cpu), bool(bf16), forced)


def attach(set_isa: Callable[[int, bool], None], cpu: tuple[int, bool, tuple[int, ...]]) -> None:
    """Called by each compiled module as it loads: set_isa(code, bf16) sets its C state; cpu is its
    probe's (best path code, AVX512_BF16, compiled path codes). Raises ConfigError for a bad FASTCHAR_ISA."""
    global _cpu, _selection
    if _cpu is None:
        _cpu = cpu
    _selection = None
    sel = selection()
    _setters.append(set_isa)
    set_isa(CODES[sel.path], sel.bf16)


def selection() -> Selection:
    """The path in use (FASTCHAR_ISA read the first time), loading a compiled module to probe the CPU."""
    global _selection
    if _cpu is None:
        for module in ("fastchar._gemm", "fastchar._cydecode"):
            with contextlib.suppress(ImportError):
                __import__(module)  # its import calls attach()
                break
    if _override is not None:
        base = _select(_cpu) if _selection is None else _selection
        path, bf16 = _override
        return Selection(path, base.best, base.runnable, base.bf16_cpu, bf16, base.forced)
    if _selection is None:
        _selection = _select(_cpu)
    return _selection


def path() -> str:
    """The path the kernels run: "avx512", "avx2", "neon" or "generic"."""
    return selection().path


@contextlib.contextmanager
def force(name: str) -> Iterator[Selection]:
    """Run the compiled kernels on path `name` inside the block (tests); it must be one this CPU runs."""
    global _override
    base = selection()
    if name not in base.runnable:
        raise ConfigError(f"this CPU cannot run the {name} path", hint=f"it runs {', '.join(base.runnable)}")
    saved = _override
    _override = (name, base.bf16_cpu and name == "avx512" and not _switch("FASTCHAR_DISABLE_BF16"))
    try:
        for set_isa in _setters:
            set_isa(CODES[name], _override[1])
        yield selection()
    finally:
        _override = saved
        now = selection()
        for set_isa in _setters:
            set_isa(CODES[now.path], now.bf16)


def runnable() -> tuple[str, ...]:
    """Every path this CPU runs with this build, best first (tests parametrize over it)."""
    return selection().runnable


def torch_env(name: str) -> dict[str, str]:
    """The environment that holds PyTorch (ATen, oneDNN, MKL) to the same instruction set as path `name`."""
    if name == "avx2":
        return {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    if name == "generic":
        return {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    return {}

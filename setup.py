"""Build the Cython extensions (fastchar._cykernels, fastchar._cydecode, fastchar._gemm) from csrc/, on whatever
compiler is here.

The build detects rather than assumes, and never strands an install:
- the compiler family (gcc, clang, Apple clang, MSVC) is read from the compiler setuptools will use
  (CC=clang picks clang), and each optimisation flag is kept only if that compiler accepts it;
- OpenMP only when a test program including <omp.h> compiles and links (Apple clang: Homebrew's
  libomp, found through `brew --prefix libomp` or FASTCHAR_LIBOMP_PREFIX); without it the kernels
  build anyway and run on one thread, with a warning here and in `fastchar info`;
- the vector kernels are compiled once per instruction set inside their own .c files (AVX-512, AVX2 +
  FMA, NEON: csrc/fc_each_isa.h switches each on for those functions only) and chosen at run time,
  so no -march flag is needed and the build runs on any CPU of its architecture;
- an extension that does not compile is left out with a one-line warning: fastchar then runs on
  Numba and the NumPy reference. fastchar/_build_info.json records the compiler, the flags and each
  failure's reason, for `fastchar info` and for the error of `--backend cython`.

Environment: CC (the compiler); FASTCHAR_NO_OPENMP=1 (build without OpenMP); FASTCHAR_NATIVE=1
(-march=native); FASTCHAR_CYTHON_DEBUG=1 (bounds checks); FASTCHAR_FORCE_BUILD_FAILURE=1 (make every
C compile fail, to test the fallback); FASTCHAR_REQUIRE_BACKENDS naming "cython" (CI: a failed build
is an error, as it is for the tests). Everything else lives in pyproject.toml.

Importing this file defines the detection functions without building (tests/test_build.py uses them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The extensions, one line each: (module, sources). Headers and .pxd files live in csrc/.
EXTENSIONS = [
    ("fastchar._cykernels", ["csrc/_kernels.pyx"]),
    ("fastchar._cydecode", ["csrc/_decode.pyx", "csrc/fc_decode.c", "csrc/fc_sample.c", "csrc/fc_isa.c"]),
    # packed bf16/fp32 products and attention, compiled per instruction-set path (csrc/fc_each_isa.h)
    ("fastchar._gemm", ["csrc/_gemm.pyx", "csrc/gemm_bf16.c", "csrc/attention.c", "csrc/fc_isa.c"]),
]
# x86-64: the Cython kernels once more, compiled with AVX2 + FMA (imported on the avx2 and avx512 paths
# only, see fastchar/backends/cython_cpu.py); ISA_FLAGS names each such module's extra flags.
ISA_FLAGS = {"fastchar._cykernels_avx2": ["-mavx2", "-mfma"]}
if platform.machine().lower() in ("x86_64", "amd64"):
    EXTENSIONS.append(("fastchar._cykernels_avx2", ["csrc/_kernels_avx2.pyx"]))
INCLUDE_DIRS = ["csrc"]
BUILD_INFO = "_build_info.json"  # written into the fastchar package, next to the extensions

# gcc-style optimisation flags. The kernels never read errno or FP exception flags; without the last
# two, sqrtf (AdamW) and compare-selects (relu, max) stay scalar. Neither changes a computed value.
GNU_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
# MSVC only warns about options it does not know, so a probe cannot tell; these exist since VS 2005.
MSVC_FLAGS = ["/O2"]
# Where Homebrew puts libomp (Apple silicon, Intel).
HOMEBREW_LIBOMP = ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]

PLAIN_PROGRAM = "int main(void) { return 0; }\n"
# Compiles and links only when OpenMP is really on: the flag defines _OPENMP and the runtime links.
OPENMP_PROGRAM = """#include <omp.h>
#ifndef _OPENMP
#error "_OPENMP is not defined: this flag does not enable OpenMP"
#endif
int main(void) {
    int n = 0;
#pragma omp parallel reduction(+ : n)
    n += omp_get_thread_num() >= 0;
    return n > 0 ? 0 : 1;
}
"""

# probe(source, compile_args, link_args) -> True when the program compiles and links.
Probe = Callable[[str, list, list], bool]


@dataclass
class Flags:
    """What the build passes to one compiler, and why."""

    family: str  # "gcc", "clang", "apple-clang", "msvc" or "unknown" (treated like gcc)
    version: str = ""  # the first line of `CC --version`
    compile_args: list[str] = field(default_factory=list)
    link_args: list[str] = field(default_factory=list)
    openmp: bool = False
    openmp_note: str = ""  # the flags that gave OpenMP, or why there is none


def compiler_family(compiler_type: str, version_text: str) -> str:
    """The family of a compiler from setuptools' compiler_type and the output of `CC --version`."""
    if compiler_type == "msvc":
        return "msvc"
    text = version_text.lower()
    if "apple clang" in text or "apple llvm" in text:  # also what macOS's `gcc` prints
        return "apple-clang"
    if "clang" in text:
        return "clang"
    if "free software foundation" in text or "gcc" in text:
        return "gcc"
    return "unknown"


def libomp_prefixes(env: Mapping[str, str]) -> list[str]:
    """Folders holding libomp's include/omp.h (FASTCHAR_LIBOMP_PREFIX, `brew --prefix libomp`, Homebrew's defaults)."""
    candidates = [env.get("FASTCHAR_LIBOMP_PREFIX", "")]
    brew = shutil.which("brew", path=env.get("PATH"))
    if brew:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run = subprocess.run([brew, "--prefix", "libomp"], capture_output=True, text=True, timeout=60)
            candidates.append(run.stdout.strip() if run.returncode == 0 else "")
    candidates += HOMEBREW_LIBOMP
    found = []
    for prefix in candidates:
        if prefix and prefix not in found and os.path.isfile(os.path.join(prefix, "include", "omp.h")):
            found.append(prefix)
    return found


def openmp_candidates(family: str, env: Mapping[str, str]) -> list[tuple[list[str], list[str]]]:
    """(compile_args, link_args) to try in order for OpenMP with this compiler family."""
    if family == "msvc":
        # /openmp links vcomp140.dll, part of the Visual C++ runtime that Python itself needs.
        return [(["/openmp"], []), (["/openmp:llvm"], [])]
    candidates = [(["-fopenmp"], ["-fopenmp"])]
    if family in ("clang", "apple-clang"):
        # Apple's clang has no -fopenmp driver flag, but passes it to its front end and links a
        # separately installed libomp (Homebrew: `brew install libomp`).
        for prefix in libomp_prefixes(env):
            inc, lib = os.path.join(prefix, "include"), os.path.join(prefix, "lib")
            candidates.append((["-Xpreprocessor", "-fopenmp", f"-I{inc}"], [f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]))
        candidates.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"]))  # libomp in the default paths
    return candidates


def choose_flags(family: str, probe: Probe, env: Mapping[str, str], version: str = "") -> Flags:
    """The optimisation and OpenMP flags this compiler accepts; probe() tries a program with given flags."""
    flags = Flags(family, version)
    if family == "msvc":
        flags.compile_args = list(MSVC_FLAGS)
    else:
        wanted = GNU_FLAGS + (["-march=native"] if env.get("FASTCHAR_NATIVE") == "1" else [])
        flags.compile_args = [flag for flag in wanted if probe(PLAIN_PROGRAM, [flag], [])]
    if env.get("FASTCHAR_NO_OPENMP") == "1":
        flags.openmp_note = "turned off by FASTCHAR_NO_OPENMP=1"
        return flags
    candidates = openmp_candidates(family, env)
    for compile_args, link_args in candidates:
        if probe(OPENMP_PROGRAM, compile_args, link_args):
            flags.compile_args += compile_args
            flags.link_args += link_args
            flags.openmp = True
            flags.openmp_note = f"compile {' '.join(compile_args)}, link {' '.join(link_args) or '(nothing)'}"
            return flags
    tried = "; ".join(f"{' '.join(c)} (link {' '.join(link) or 'nothing'})" for c, link in candidates)
    flags.openmp_note = f"a test program with omp.h did not compile and link with: {tried}"
    return flags


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Send the compiler's output to /dev/null (a failed probe is an answer, not an error)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def compiler_probe(compiler, workdir: str) -> Probe:
    """probe() for a setuptools compiler object: compile and link a program in workdir."""
    counter = itertools.count()

    def probe(source: str, compile_args: list, link_args: list) -> bool:
        name = f"probe{next(counter)}"
        path = os.path.join(workdir, name + ".c")
        with open(path, "w") as f:
            f.write(source)
        try:
            with _silenced():
                objects = compiler.compile([path], output_dir=workdir, extra_postargs=compile_args)
                compiler.link_executable(objects, name, output_dir=workdir, extra_postargs=link_args)
        except Exception:  # a CompileError, a LinkError or a missing tool: these flags are not usable here
            return False
        return True

    return probe


def compiler_identity(compiler) -> tuple[str, str]:
    """(family, first line of `--version`) of a setuptools compiler object."""
    if compiler.compiler_type == "msvc":
        return "msvc", ""
    command = list(getattr(compiler, "compiler_so", None) or ["cc"])
    while len(command) > 1 and os.path.basename(command[0]) in ("ccache", "sccache", "distcc"):
        command.pop(0)
    try:
        run = subprocess.run([command[0], "--version"], capture_output=True, text=True, timeout=60)
        text = (run.stdout + run.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        text = ""
    return compiler_family(compiler.compiler_type, text), text.splitlines()[0] if text else command[0]


def _requires_cython(env: Mapping[str, str]) -> bool:
    return "cython" in env.get("FASTCHAR_REQUIRE_BACKENDS", "").split(",")


def _say(message: str) -> None:
    print(f"fastchar: {message}", file=sys.stderr, flush=True)


class BuildExt(build_ext):
    """build_ext that picks flags for the compiler at hand and survives an extension that fails."""

    def initialize_options(self) -> None:
        super().initialize_options()
        self.flags: Flags | None = None
        self.failures: dict[str, str] = {}  # extension -> why it was not built
        self.forced = ""

    def build_extensions(self) -> None:
        family, version = compiler_identity(self.compiler)
        with tempfile.TemporaryDirectory() as workdir:
            self.flags = choose_flags(family, compiler_probe(self.compiler, workdir), os.environ, version)
        _say(
            f"compiler {family} ({version}); compile {' '.join(self.flags.compile_args)}; "
            f"link {' '.join(self.flags.link_args) or '(nothing)'}"
        )
        if not self.flags.openmp:
            hint = "; on macOS: `brew install libomp`, then reinstall" if family == "apple-clang" else ""
            note = self.flags.openmp_note
            _say(f"WARNING: building without OpenMP, the Cython kernels will run on one thread ({note}){hint}")
        # "1": every extension fails to compile; a module's name: that one only (for the tests)
        self.forced = os.environ.get("FASTCHAR_FORCE_BUILD_FAILURE", "")
        if self._flags_changed():
            self.force = True
        for ext in self.extensions:
            ext.optional = not _requires_cython(os.environ)
            # gcc and clang only (MSVC has no -mavx2): elsewhere the module is the plain kernels again
            isa = ISA_FLAGS.get(ext.name, []) if self.flags.family != "msvc" else []
            ext.extra_compile_args = self.flags.compile_args + isa + list(ext.extra_compile_args)
            ext.extra_link_args = self.flags.link_args + list(ext.extra_link_args)
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        forced = self.forced in ("1", ext.name)
        if forced:
            # A real compiler failure, so the fallback path is the one a broken install takes.
            os.makedirs(self.build_temp, exist_ok=True)
            failing = os.path.join(self.build_temp, "fastchar_forced_failure.c")
            with open(failing, "w") as f:
                f.write('#error "the C build was made to fail (FASTCHAR_FORCE_BUILD_FAILURE=1)"\n')
            ext.sources = [failing, *ext.sources]
        try:
            if importlib.util.find_spec("Cython") is None:
                raise RuntimeError("Cython is not installed here, so the .pyx sources cannot become C")
            super().build_extension(ext)
        except Exception as exc:  # any failure of an optional extension must leave the install working
            reason = f"{type(exc).__name__}: {exc}".strip()
            if forced:
                reason = f"forced by FASTCHAR_FORCE_BUILD_FAILURE={self.forced}"
            self.failures[ext.name] = reason
            with contextlib.suppress(OSError):
                os.remove(self.get_ext_fullpath(ext.name))  # never ship a stale build of it
            if _requires_cython(os.environ):
                raise

    def run(self) -> None:
        super().run()
        if self.failures:
            reasons = "; ".join(dict.fromkeys(self.failures.values()))
            if all(name in ISA_FLAGS for name in self.failures):  # builds for an instruction set only
                instead = "the cython backend uses its baseline build of those kernels (fastchar._cykernels)"
            else:
                instead = "fastchar will run on the numba and numpy backends"
            _say(
                f"WARNING: {', '.join(self.failures)} not built ({reasons}): {instead} "
                "(`pip install -v` shows the compiler's output)"
            )
        info = self._build_info()
        targets = [os.path.join(self.build_lib, "fastchar")]
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            targets.append(build_py.get_package_dir("fastchar"))
            for ext in self.extensions:  # a failed one: remove what an earlier build left in the source tree
                if ext.name not in self.failures:
                    continue
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                with contextlib.suppress(OSError):
                    os.remove(inplace_file)
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, BUILD_INFO), "w") as f:
                json.dump(info, f, indent=1)

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), os.path.join(self.build_lib, "fastchar", BUILD_INFO)]

    def _build_info(self) -> dict:
        flags = self.flags or Flags("none")
        return {
            "machine": platform.machine(),
            "system": platform.system(),
            "python": platform.python_version(),
            **asdict(flags),
            "cython_debug": os.environ.get("FASTCHAR_CYTHON_DEBUG") == "1",
            "extensions": {ext.name: self.failures.get(ext.name) for ext in self.extensions},
        }

    def _flags_changed(self) -> bool:
        """Whether the last build in build_lib used other flags (then every extension is rebuilt)."""
        try:
            with open(os.path.join(self.build_lib, "fastchar", BUILD_INFO)) as f:
                old = json.load(f)
        except (OSError, ValueError):
            return False
        return [old.get(k) for k in ("family", "compile_args", "link_args")] != [
            self.flags.family,
            self.flags.compile_args,
            self.flags.link_args,
        ]


def extensions() -> list[Extension]:
    """EXTENSIONS as setuptools Extensions; optional, so a failed one does not fail the install."""
    import numpy as np

    debug = os.environ.get("FASTCHAR_CYTHON_DEBUG") == "1"
    directives = {
        "language_level": 3,
        "boundscheck": debug,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": debug,
    }
    built = []
    for name, sources in EXTENSIONS:
        ext = Extension(
            name,
            sources,
            include_dirs=[*INCLUDE_DIRS, np.get_include()],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            depends=[os.path.join(d, f) for d in INCLUDE_DIRS for f in sorted(os.listdir(d)) if f.endswith(".h")],
            optional=True,
        )
        ext.cython_directives = directives  # read by Cython's build_ext, which setuptools' extends
        built.append(ext)
    return built


if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})

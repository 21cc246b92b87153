"""The C build: compiler and flag detection (fake and real compilers), a failed build that still installs,
and what the package says about its build at run time (`fastchar info`, `--backend cython`)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_setup():
    """setup.py as a module: importing it defines the detection functions and builds nothing."""
    spec = importlib.util.spec_from_file_location("fastchar_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


setup_py = _load_setup()

VERSIONS = {
    "gcc (Debian 12.2.0-14+deb12u1) 12.2.0\nCopyright (C) 2022 Free Software Foundation, Inc.": "gcc",
    "cc (Ubuntu 11.4.0-1ubuntu1~22.04) 11.4.0\nCopyright (C) 2021 Free Software Foundation, Inc.": "gcc",
    "gcc (GCC) 13.2.1 20231205 (Red Hat 13.2.1-6)": "gcc",
    "Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu": "clang",
    "Homebrew clang version 18.1.8\nTarget: arm64-apple-darwin23.5.0": "clang",
    "Apple clang version 15.0.0 (clang-1500.3.9.4)\nTarget: arm64-apple-darwin23.5.0": "apple-clang",
    # what macOS's `gcc` prints
    "Configured with: --prefix=/Library/Developer/CommandLineTools/usr\nApple LLVM version 10.0.0": "apple-clang",
    "Intel(R) oneAPI DPC++/C++ Compiler 2024.0.0 (2024.0.0.20231017)": "unknown",
    "": "unknown",
}


@pytest.mark.parametrize("text", list(VERSIONS))
def test_compiler_family_from_version_text(text):
    assert setup_py.compiler_family("unix", text) == VERSIONS[text]


def test_compiler_family_msvc_by_type():
    assert setup_py.compiler_family("msvc", "") == "msvc"


class FakeProbe:
    """A compiler that accepts a flag set when accept(compile_args, link_args, source) says so; records every call."""

    def __init__(self, accept):
        self.accept = accept
        self.calls = []

    def __call__(self, source, compile_args, link_args):
        self.calls.append((source, list(compile_args), list(link_args)))
        return self.accept(list(compile_args), list(link_args), source)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An environment with no brew and no Homebrew folders, so only what a test sets is found."""
    monkeypatch.setattr(setup_py, "HOMEBREW_LIBOMP", [])
    empty = tmp_path / "empty-path"
    empty.mkdir()
    return {"PATH": str(empty)}


def _libomp(tmp_path: Path) -> Path:
    prefix = tmp_path / "libomp"
    (prefix / "include").mkdir(parents=True)
    (prefix / "include" / "omp.h").write_text("/* fake */\n")
    (prefix / "lib").mkdir()
    return prefix


def test_gcc_gets_every_flag_and_openmp(env):
    probe = FakeProbe(lambda c, link, src: True)
    flags = setup_py.choose_flags("gcc", probe, env)
    assert flags.compile_args == [*setup_py.GNU_FLAGS, "-fopenmp"]
    assert flags.link_args == ["-fopenmp"] and flags.openmp
    assert probe.calls[-1][0] == setup_py.OPENMP_PROGRAM


def test_a_flag_the_compiler_rejects_is_dropped(env):
    flags = setup_py.choose_flags("gcc", FakeProbe(lambda c, link, src: "-fno-trapping-math" not in c), env)
    assert "-fno-trapping-math" not in flags.compile_args
    assert "-O3" in flags.compile_args and "-fno-math-errno" in flags.compile_args and flags.openmp


def test_clang_without_libomp_builds_without_openmp(env):
    # Debian's clang without libomp-dev: every OpenMP attempt fails, the optimisation flags stay
    probe = FakeProbe(lambda c, link, src: src == setup_py.PLAIN_PROGRAM)
    flags = setup_py.choose_flags("clang", probe, env)
    assert not flags.openmp and flags.link_args == []
    assert flags.compile_args == setup_py.GNU_FLAGS
    assert "-fopenmp" in flags.openmp_note and "did not compile and link" in flags.openmp_note


def _apple_clang(prefix: Path | None):
    """Apple clang: no -fopenmp driver flag; -Xpreprocessor -fopenmp works given libomp's header and library."""

    def accept(c, link, src):
        if src == setup_py.PLAIN_PROGRAM:
            return True
        if "-Xpreprocessor" not in c:
            return False
        return prefix is not None and f"-I{prefix / 'include'}" in c and "-lomp" in link

    return accept


def test_apple_clang_finds_homebrew_libomp(env, tmp_path):
    prefix = _libomp(tmp_path)
    env["FASTCHAR_LIBOMP_PREFIX"] = str(prefix)
    flags = setup_py.choose_flags("apple-clang", FakeProbe(_apple_clang(prefix)), env)
    assert flags.openmp
    assert flags.compile_args == [*setup_py.GNU_FLAGS, "-Xpreprocessor", "-fopenmp", f"-I{prefix / 'include'}"]
    assert flags.link_args == [f"-L{prefix / 'lib'}", "-lomp", f"-Wl,-rpath,{prefix / 'lib'}"]


def test_apple_clang_finds_libomp_through_brew(env, tmp_path):
    prefix = _libomp(tmp_path)
    brew = Path(env["PATH"]) / "brew"
    brew.write_text(f'#!/bin/sh\n[ "$1 $2" = "--prefix libomp" ] && echo {prefix}\n')
    brew.chmod(brew.stat().st_mode | stat.S_IEXEC)
    assert setup_py.libomp_prefixes(env) == [str(prefix)]
    assert setup_py.choose_flags("apple-clang", FakeProbe(_apple_clang(prefix)), env).openmp


def test_apple_clang_without_libomp(env):
    flags = setup_py.choose_flags("apple-clang", FakeProbe(_apple_clang(None)), env)
    assert not flags.openmp and flags.compile_args == setup_py.GNU_FLAGS and flags.link_args == []


def test_msvc_flags(env):
    # an MSVC whose /openmp is missing (e.g. a toolset without vcomp): /openmp:llvm is next
    probe = FakeProbe(lambda c, link, src: c == ["/openmp:llvm"])
    flags = setup_py.choose_flags("msvc", probe, env)
    assert flags.compile_args == ["/O2", "/openmp:llvm"] and flags.link_args == [] and flags.openmp
    # MSVC only warns about unknown options, so gcc's flags are never tried on it
    assert all(not any(a.startswith("-") for a in c) for _, c, _ in probe.calls)
    assert [c for _, c, _ in probe.calls] == [["/openmp"], ["/openmp:llvm"]]


def test_no_openmp_and_native_switches(env):
    probe = FakeProbe(lambda c, link, src: True)
    flags = setup_py.choose_flags("gcc", probe, {**env, "FASTCHAR_NO_OPENMP": "1", "FASTCHAR_NATIVE": "1"})
    assert not flags.openmp and "FASTCHAR_NO_OPENMP" in flags.openmp_note
    assert flags.compile_args == [*setup_py.GNU_FLAGS, "-march=native"]
    assert all(src == setup_py.PLAIN_PROGRAM for src, _, _ in probe.calls)


# -- real compiler objects: setuptools' own, pointed at real or fake compilers with CC ---------


def _compiler(monkeypatch, cc: str):
    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    monkeypatch.setenv("CC", cc)
    monkeypatch.delenv("LDSHARED", raising=False)
    compiler = new_compiler()
    customize_compiler(compiler)
    return compiler


def _compiles_with_openmp(cc: str, tmp_path: Path) -> bool:
    """The oracle: does `cc -fopenmp` build the OpenMP program here?"""
    src = tmp_path / "oracle.c"
    src.write_text(setup_py.OPENMP_PROGRAM)
    run = subprocess.run([cc, "-fopenmp", str(src), "-o", str(tmp_path / "oracle")], capture_output=True)
    return run.returncode == 0


REAL = [cc for cc in ("gcc", "clang") if shutil.which(cc)]


@pytest.mark.parametrize("cc", REAL)
def test_real_compiler(cc, monkeypatch, tmp_path, env):
    compiler = _compiler(monkeypatch, cc)
    family, version = setup_py.compiler_identity(compiler)
    assert family == cc and version
    flags = setup_py.choose_flags(family, setup_py.compiler_probe(compiler, str(tmp_path)), env, version)
    assert flags.compile_args[:3] == setup_py.GNU_FLAGS
    assert flags.openmp == _compiles_with_openmp(cc, tmp_path)
    assert ("-fopenmp" in flags.compile_args) == flags.openmp


FAKE_APPLE_CLANG = """#!/bin/sh
# Apple clang, played by gcc: no bare -fopenmp; -Xpreprocessor -fopenmp needs libomp's header
# (-I.../libomp/include) and -lomp its library (-L.../libomp/lib).
case " $* " in *" --version "*) echo "Apple clang version 15.0.0 (clang-1500.3.9.4)"; exit 0;; esac
inc=""; lib=""
for a in "$@"; do
  case "$a" in -I*/libomp/include) inc=1;; -L*/libomp/lib) lib=1;; esac
done
prev=""; args=""
for a in "$@"; do
  case "$a" in
    -fopenmp)
      if [ "$prev" != "-Xpreprocessor" ]; then echo "clang: error: unsupported option '-fopenmp'" >&2; exit 1; fi
      if [ -z "$inc" ]; then echo "fatal error: 'omp.h' file not found" >&2; exit 1; fi
      args="$args -fopenmp";;
    -lomp)
      if [ -z "$lib" ]; then echo "ld: library 'omp' not found" >&2; exit 1; fi
      args="$args -fopenmp";;
    -Xpreprocessor) ;;
    *) args="$args $a";;
  esac
  prev="$a"
done
exec gcc $args
"""

FAKE_CLANG_NO_OPENMP = """#!/bin/sh
case " $* " in *" --version "*) echo "clang version 17.0.6"; exit 0;; esac
for a in "$@"; do
  case "$a" in -fopenmp|-lomp) echo "fatal error: 'omp.h' file not found" >&2; exit 1;; esac
done
exec gcc "$@"
"""


def _script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(not shutil.which("gcc"), reason="the fake compilers delegate to gcc")
def test_fake_apple_clang_through_setuptools(monkeypatch, tmp_path, env):
    prefix = _libomp(tmp_path)
    compiler = _compiler(monkeypatch, _script(tmp_path, "clang", FAKE_APPLE_CLANG))
    family, version = setup_py.compiler_identity(compiler)
    assert family == "apple-clang" and version.startswith("Apple clang")
    work = tmp_path / "work"
    work.mkdir()
    probe = setup_py.compiler_probe(compiler, str(work))
    without = setup_py.choose_flags(family, probe, env, version)
    assert not without.openmp and without.compile_args == setup_py.GNU_FLAGS
    with_libomp = setup_py.choose_flags(family, probe, {**env, "FASTCHAR_LIBOMP_PREFIX": str(prefix)}, version)
    assert with_libomp.openmp and with_libomp.compile_args[-3:] == ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"]


@pytest.mark.skipif(not shutil.which("gcc"), reason="the fake compilers delegate to gcc")
def test_fake_clang_without_openmp_through_setuptools(monkeypatch, tmp_path, env):
    compiler = _compiler(monkeypatch, _script(tmp_path, "clang", FAKE_CLANG_NO_OPENMP))
    family, version = setup_py.compiler_identity(compiler)
    assert (family, version) == ("clang", "clang version 17.0.6")
    flags = setup_py.choose_flags(family, setup_py.compiler_probe(compiler, str(tmp_path)), env, version)
    assert not flags.openmp and flags.compile_args == setup_py.GNU_FLAGS


# -- a failed C build: the install goes on, and says why ------------------------------------------


def _build(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    lib = tmp_path / "lib"
    run_env = {k: v for k, v in os.environ.items() if k != "FASTCHAR_REQUIRE_BACKENDS"} | env
    cmd = [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp_path / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True), lib


def test_forced_build_failure_still_installs(tmp_path):
    run, lib = _build(tmp_path, FASTCHAR_FORCE_BUILD_FAILURE="1")
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((lib / "fastchar" / "_build_info.json").read_text())
    assert set(info["extensions"]) == {name for name, _ in setup_py.EXTENSIONS}
    assert all("FASTCHAR_FORCE_BUILD_FAILURE" in why for why in info["extensions"].values())
    assert not list((lib / "fastchar").glob("_cy*"))
    warnings = [line for line in run.stderr.splitlines() if "not built" in line]
    assert len(warnings) == 1 and "numba" in warnings[0]  # one line at install


@pytest.mark.slow  # compiles the other extensions
@pytest.mark.skipif("fastchar._cykernels_avx2" not in setup_py.ISA_FLAGS, reason="x86-64 only: no AVX2 build here")
def test_a_failed_avx2_build_keeps_the_cython_backend_and_says_so(tmp_path):
    run, lib = _build(tmp_path, FASTCHAR_FORCE_BUILD_FAILURE="fastchar._cykernels_avx2")
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((lib / "fastchar" / "_build_info.json").read_text())
    failed = {name for name, why in info["extensions"].items() if why}
    assert failed == {"fastchar._cykernels_avx2"}
    (warning,) = [line for line in run.stderr.splitlines() if "not built" in line]
    assert "baseline build" in warning and "numba" not in warning


def test_forced_build_failure_fails_when_cython_is_required(tmp_path):
    run, _ = _build(tmp_path, FASTCHAR_FORCE_BUILD_FAILURE="1", FASTCHAR_REQUIRE_BACKENDS="numba,cython")
    assert run.returncode != 0


# -- at run time -----------------------------------------------------------------------------------


def test_build_notes():
    from fastchar.build_info import build_notes

    failed = {"family": "gcc", "extensions": {"fastchar._cykernels": "CompileError: boom", "fastchar._cydecode": "x"}}
    (note,) = build_notes(failed, openmp=None)
    assert "CompileError: boom" in note and "numba" in note
    avx2 = {"family": "gcc", "extensions": {"fastchar._cykernels": None, "fastchar._cykernels_avx2": "boom"}}
    (note,) = build_notes(avx2, openmp=True)
    assert "baseline build fastchar._cykernels is used" in note and "Python" not in note
    decode_only = {"family": "msvc", "extensions": {"fastchar._cykernels": None, "fastchar._cydecode": "C2065"}}
    (note,) = build_notes(decode_only, openmp=True)
    assert "fastchar._cydecode" in note and "C2065" in note
    apple = {"family": "apple-clang", "openmp_note": "no omp.h", "extensions": {"fastchar._cykernels": None}}
    (note,) = build_notes(apple, openmp=False)
    assert "one thread" in note and "brew install libomp" in note
    assert build_notes({"family": "gcc", "extensions": {"fastchar._cykernels": None}}, openmp=True) == []


@pytest.fixture
def cython_not_built(monkeypatch):
    """The package as a failed C build leaves it: no _cykernels, and the reason recorded."""
    import fastchar.backends as backends
    import fastchar.build_info as build_info

    record = {"family": "gcc", "extensions": {"fastchar._cykernels": "CompileError: no compiler here"}}
    monkeypatch.setattr(build_info, "read_build_info", lambda: record)
    monkeypatch.setitem(sys.modules, "fastchar._cykernels", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "fastchar.backends.cython_cpu", raising=False)
    backends._load.cache_clear()
    yield
    backends._load.cache_clear()


def test_backend_cython_names_the_build_failure(cython_not_built):
    from fastchar.backends import BackendError, available_backends, default_backend, get_backend

    with pytest.raises(BackendError, match="not built at install: CompileError: no compiler here") as err:
        get_backend("cython")
    assert "--backend numba" in err.value.hint
    assert "cython" not in available_backends() and default_backend() == "numba"


def test_cli_reports_the_build_failure(cython_not_built, capsys, corpus, tmp_path):
    from fastchar.cli import main

    assert main(["train", "--backend", "cython", "--data", str(corpus), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "error: backend 'cython' is not available" in err and "CompileError: no compiler here" in err
    assert "hint:" in err
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "openmp (cython kernels): not built" in out
    assert "warning: the Cython kernels were not built at install (CompileError: no compiler here)" in out


def test_openmp_threads_follow_the_build():
    """A build with OpenMP takes the thread count; one without stays on one thread and says so."""
    kernels = pytest.importorskip("fastchar._cykernels", reason="the Cython kernels are not built")
    from fastchar.threads import set_threads, thread_report

    try:
        set_threads(2)
        expected = 2 if kernels.openmp_enabled() else 1
        assert kernels.openmp_max_threads() == expected
        assert thread_report()["openmp"] == {"threads": expected, "enabled": kernels.openmp_enabled()}
    finally:
        set_threads()  # the default policy again


def test_auto_prefers_numba_over_a_single_threaded_cython_build(monkeypatch):
    import fastchar.build_info as build_info
    from fastchar.backends import available_backends, default_backend
    from fastchar.threads import set_threads

    monkeypatch.setattr(build_info, "cython_openmp", lambda: False)  # as a build without OpenMP reports
    try:
        set_threads(2)
        assert default_backend() == "numba"
        set_threads(1)  # one thread either way: the measured order stands
        assert default_backend() == ("cython" if "cython" in available_backends() else "numba")
    finally:
        set_threads()

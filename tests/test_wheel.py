"""A wheel built from this checkout, installed into a fresh venv, trains from another folder with no
network and no FASTCHAR_DATA_DIR: the shipped corpus is package data.

Building the wheel compiles both Cython extensions (about 15 s on 2 cores) and the README's first
command trains 2000 steps of the base model, so the whole file is marked slow (`pytest -m slow`).
Nothing is downloaded: the wheel is built with --no-build-isolation from this environment,
installed with --no-deps --no-index, and the venv reaches this environment's packages (numpy,
numba, ...) through a .pth file written after the install, so pip never sees this environment's
own fastchar.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # builds a wheel and installs it into a fresh venv


def _run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def offline_env() -> dict[str, str]:
    """This environment minus FASTCHAR_DATA_DIR and PYTHONPATH, with any download failing at once."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCHAR_DATA_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    env["https_proxy"] = env["http_proxy"] = env["HTTPS_PROXY"] = env["HTTP_PROXY"] = "http://127.0.0.1:9"
    env.pop("no_proxy", None), env.pop("NO_PROXY", None)
    # 2 spinning OpenMP threads on a busy 2-core machine made 30 steps take 50 s instead of 2 s;
    # sleeping waiters keep this test's time about the work it does.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def fresh_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone would have them (tracked and new, nothing ignored)."""
    listed = _run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with a wheel of this checkout installed; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = fresh_copy(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
          "-w", tmp / "dist", src])  # fmt: skip
    (wheel,) = (tmp / "dist").glob("fastchar-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"])
    python = tmp / "venv" / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "_fastchar_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return tmp / "venv" / "bin"


def test_wheel_ships_the_corpus_and_trains_outside_the_checkout(venv, tmp_path):
    env = offline_env()
    where = _run([venv / "python", "-c", "import fastchar.data as d; print(d.__file__); print(d.SHIPPED_CORPUS)"],
                 cwd=tmp_path, env=env).stdout.split()  # fmt: skip
    assert Path(where[0]).is_relative_to(venv.parent), f"fastchar imported from {where[0]}, not the venv"
    assert Path(where[1]).is_file() and Path(where[1]).stat().st_size < 400_000
    result = _run([venv / "fastchar", "train", "--steps", "20", "--eval-every", "10", "--sample-chars", "60"],
                  cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == f"data: {where[1]} (the copy shipped with fastchar, md5 checked)"
    assert "done: step 20" in result.stdout and "--- sample (temperature 0.8, seed 0) ---" in result.stdout
    assert "downloading" not in result.stderr
    run = tmp_path / "runs" / "base"
    assert (run / "best" / "meta.json").is_file() and (run / "curves.png").is_file()
    sample = _run([venv / "fastchar", "sample", "--checkpoint", "runs/base", "--max-new-tokens", "40", "--seed", "0"],
                  cwd=tmp_path, env=env)  # fmt: skip
    assert "runs/base is a run folder; using its best checkpoint runs/base/best" in sample.stderr
    assert len(sample.stdout) >= 40
    info = _run([venv / "fastchar", "info", "runs/base"], cwd=tmp_path, env=env)
    assert "checkpoint: runs/base/best" in info.stdout and "cython" in info.stdout


@pytest.mark.slow
def test_readme_first_command_offline(venv, tmp_path):
    """The README's first command, after its install step, as written: default model, 2000 steps."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1).strip()
    install, command = first.rsplit(" && ", 1)
    assert 'pip install -e ".[dev]"' in install and command == "fastchar train"
    result = _run([venv / "fastchar", *command.split()[1:]], cwd=tmp_path, env=offline_env(), timeout=1800)
    assert "(the copy shipped with fastchar, md5 checked)" in result.stdout.splitlines()[0]
    assert "done: step 2000" in result.stdout
    sample = result.stdout.split("--- sample (temperature 0.8, seed 0) ---\n", 1)[1]
    assert len(sample.strip()) > 200
    val = float(re.search(r"\| val (\d+\.\d+) \|", result.stdout.split("done:")[1]).group(1))
    assert val < 2.2, f"the base model reaches val loss {val} after 2000 steps"
    print(result.stdout[-1500:])  # the figures for the README's "What to expect" (pytest -s)


def test_the_installed_wheel_knows_its_version_and_licence(venv, tmp_path):
    project = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    version = re.search(r'(?m)^version = "([^"]+)"', project)[1]
    shown = _run([venv / "fastchar", "--version"], cwd=tmp_path).stdout.strip()
    assert shown == f"fastchar {version}"  # from the installed metadata: no pyproject.toml beside it
    code = "import importlib.metadata as m; print(m.metadata('fastchar')['License-Expression'], m.version('fastchar'))"
    assert _run([venv / "python", "-c", code], cwd=tmp_path).stdout.split() == ["MIT", version]

"""The package as users see it from outside: its licence, its metadata and its one version string."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import fastchar

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_mit_and_named_in_the_metadata():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "the fastchar authors" in text
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert project["requires-python"].startswith(">=3.")
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])
    assert "version" in project and "dynamic" not in project  # written once, here
    assert any(d.startswith("filelock") for d in project["dependencies"])


def test_the_version_is_written_once():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert fastchar.__version__ == project["version"]
    sources = [p for p in (ROOT / "fastchar").rglob("*.py") if re.search(r"__version__\s*=\s*['\"]", p.read_text())]
    assert sources == [], f"a second version string in {sources}"


def test_the_version_of_a_source_tree_that_is_not_installed(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert fastchar._version() == project["version"]


def test_fastchar_version_flag():
    done = subprocess.run([sys.executable, "-m", "fastchar", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fastchar {fastchar.__version__}"

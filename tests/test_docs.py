"""The README and docs/: the README stays short, every file they link to or name exists, and every
command they name is one the package or the repository has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastchar.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LINES = 300
# the project's working notes live outside the repository: no file here may cite them
NOT_HERE = tuple(name + ".md" for name in ("SPEC", "ANCHORS", "STYLE", "COMMON")) + ("SPEC" + "'s", "(" + "SPEC)")


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to files the repository lacks: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_files_and_modules_exist(doc):
    text = doc.read_text(encoding="utf-8")
    missing = [
        m
        for m in re.findall(r"python -m (benchmarks\.\w+)", text)
        if not (ROOT / (m.replace(".", "/") + ".py")).exists()
    ]
    for name in re.findall(r"`((?:fastchar|csrc|tests|benchmarks|scripts|data)/[\w./-]+\.(?:py|pyx|c|h|md))`", text):
        if not (ROOT / name).exists():
            missing.append(name)
    assert not missing, f"{doc.name} names what the repository lacks: {missing}"
    assert not [name for name in NOT_HERE if name in text]


def test_named_commands_exist():
    text = "\n".join(d.read_text(encoding="utf-8") for d in DOCS)
    commands = set(build_parser()._subparsers._group_actions[0].choices)
    code = "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))
    # at the start of a line of code, or after mpiexec or a shell operator
    named = set(re.findall(r"(?:^[\s`]*|[&|;] |mpiexec -n \d+ )fastchar ([a-z]+)", code, re.M))
    assert "train" in named and named <= commands, f"commands the CLI lacks: {sorted(named - commands)}"


LISTS_THEM = {"tests/test_adversarial2.py"}  # its check names the strings it looks for


def test_no_file_cites_a_file_outside_the_repository():
    skip = {".git", "build", "__pycache__", ".pytest_cache", "results", ".venv", "venv", "runs"}
    citing = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if not path.is_file() or skip.intersection(path.parts[len(ROOT.parts) :]) or rel in LISTS_THEM:
            continue
        if path.suffix not in {".py", ".pyx", ".pxd", ".c", ".h", ".md", ".toml", ".html", ".sh", ".txt", ""}:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        citing += [f"{rel}: {name}" for name in NOT_HERE if name in text]
    assert not citing, f"files cite what the repository does not hold: {citing}"

"""Windows-ready code paths, run on Linux: a training run, a resume, a sample, a checkpoint load and
the run lock with `fcntl` unimportable and O_NOFOLLOW, O_DIRECTORY, O_CLOEXEC, dir_fd, pread and
pwrite hidden (tests/posix_free.py), plus the link refusals of fastchar/portable.py's fallback.

What this does not test: Windows itself (its LockFileEx lock, its file index as st_ino, O_BINARY,
the process query behind portable.pid_alive); no Windows machine runs these tests.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastchar import CheckpointError, load, portable
from fastchar.checkpoint import read

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--backend", "numpy"]  # fmt: skip
PRELUDE = (
    "import sys, warnings; sys.path[:0] = [{tests!r}, {root!r}]; import posix_free; posix_free.hide(); "
    "warnings.simplefilter('ignore'); "
)


def posix_free_python(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter that sees os as Windows does (then checks it still does)."""
    prelude = PRELUDE.format(tests=str(ROOT / "tests"), root=str(ROOT))
    script = prelude + code + "\nposix_free.check_hidden()"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)


CLI = "from fastchar.cli import main; code = main(sys.argv[1:]); posix_free.check_hidden(); sys.exit(code)"


def test_train_resume_sample_and_load_without_posix(corpus, tmp_path):
    out = tmp_path / "run"
    done = posix_free_python(CLI, "train", "--data", str(corpus), "--out", str(out), "--steps", "10",
                             "--eval-every", "5", "--sample-chars", "20", *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "done: step 10" in done.stdout
    assert (out / "best" / "meta.json").is_file() and (out / "latest" / "meta.json").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    resumed = posix_free_python(CLI, "train", "--resume", str(out), "--steps", "15", "--sample-chars", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 10" in resumed.stdout and "done: step 15" in resumed.stdout
    sampled = posix_free_python(CLI, "sample", "--checkpoint", str(out), "--prompt", "the ", "--max-new-tokens",
                                "10", "--seed", "1", "--backend", "numpy")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("the ")
    loaded = posix_free_python(
        "import numpy as np; from fastchar import load; m = load(sys.argv[1], backend='numpy'); "
        "print(m.train_state['step'], float(np.abs(m.params.flat).sum()))",
        str(out / "latest"),
    )
    assert loaded.returncode == 0, loaded.stderr
    step, total = loaded.stdout.split()
    here = load(out / "latest", backend="numpy")  # the same checkpoint through folder handles
    assert int(step) == 15 == here.train_state["step"]
    assert float(total) == pytest.approx(float(abs(here.params.flat).sum()), rel=1e-12)


def test_run_lock_without_fcntl_names_the_holder(corpus, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    hold = PRELUDE.format(tests=str(ROOT / "tests"), root=str(ROOT)) + (
        "import time; from pathlib import Path; from fastchar.runfolder import RunLock; "
        "RunLock(Path(sys.argv[1])).acquire(); posix_free.check_hidden(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = posix_free_python(CLI, "train", "--data", str(corpus), "--out", str(out), "--steps", "5", *TINY)
        assert second.returncode == 1, second.stderr
        assert f"in use by another fastchar run (process {holder.pid})" in second.stderr
        assert not (out / "latest").exists()
    finally:
        holder.kill()
        holder.wait()
    after = posix_free_python(CLI, "train", "--data", str(corpus), "--out", str(out), "--steps", "5",
                              "--eval-every", "5", "--sample-chars", "0", *TINY)  # fmt: skip
    assert after.returncode == 0, after.stderr  # a dead holder's lock is broken


def test_links_are_refused_without_posix(corpus, tmp_path):
    out = tmp_path / "run"
    done = posix_free_python(CLI, "train", "--data", str(corpus), "--out", str(out), "--steps", "5",
                             "--eval-every", "5", "--sample-chars", "0", *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    tok = out / "best" / "tokenizer.json"
    tok.rename(tmp_path / "tokenizer.json")
    tok.symlink_to(tmp_path / "tokenizer.json")
    linked = posix_free_python(CLI, "sample", "--checkpoint", str(out / "best"), "--max-new-tokens", "5")
    assert linked.returncode == 1 and "is a symbolic link" in linked.stderr, linked.stderr
    tok.unlink()  # best/ is a checkpoint again (a run refuses to replace one that is not)
    (tmp_path / "tokenizer.json").rename(tok)
    (out / ".lock").unlink(missing_ok=True)
    (out / ".lock").symlink_to(victim)
    locked = posix_free_python(CLI, "train", "--resume", str(out / "latest"), "--steps", "8", "--sample-chars", "0")
    assert locked.returncode == 1 and "cannot lock the run folder" in locked.stderr, locked.stderr
    (out / ".lock").unlink()
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    metrics = posix_free_python(CLI, "train", "--resume", str(out / "latest"), "--steps", "8", "--sample-chars", "0")
    assert metrics.returncode == 1 and "metrics.jsonl" in metrics.stderr and "symbolic link" in metrics.stderr
    assert victim.read_text() == "another user's file"


@pytest.fixture
def windows_like_os(monkeypatch):
    """This process's os without O_NOFOLLOW, O_DIRECTORY and dir_fd (portable's fallbacks)."""
    monkeypatch.delattr(os, "O_NOFOLLOW")
    monkeypatch.delattr(os, "O_DIRECTORY")
    monkeypatch.setattr(os, "supports_dir_fd", set())
    assert not portable.has_nofollow() and not portable.has_folder_handles()


def test_open_nofollow_fallback(windows_like_os, tmp_path):
    target = tmp_path / "target"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        portable.open_nofollow(link, os.O_RDONLY)
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        portable.open_nofollow(link, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    assert info.value.errno == errno.ELOOP and target.read_text() == "x"
    os.close(portable.open_nofollow(target, os.O_RDONLY))
    fresh = tmp_path / "fresh"
    os.close(portable.open_nofollow(fresh, os.O_WRONLY | os.O_CREAT))
    assert fresh.is_file()
    fresh.write_text("old contents")
    os.close(portable.open_nofollow(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
    assert fresh.read_text() == ""


def test_open_nofollow_fallback_refuses_a_file_swapped_after_the_check(windows_like_os, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    b.write_text("b")
    real_lstat = os.lstat
    monkeypatch.setattr(os, "lstat", lambda p: real_lstat(b) if Path(p) == a else real_lstat(p))
    with pytest.raises(OSError) as info:  # what lstat saw is not what open opened: a swap in between
        portable.open_nofollow(a, os.O_RDONLY)
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        portable.open_nofollow(a, os.O_WRONLY | os.O_TRUNC)
    assert info.value.errno == errno.ELOOP and a.read_text() == "a", "nothing truncated before the check"


def test_checkpoint_reads_without_folder_handles(windows_like_os, capsys, corpus, tmp_path):
    from fastchar.cli import main

    out = tmp_path / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), "--steps", "5", "--eval-every", "5",
                 "--sample-chars", "0", *TINY]) == 0  # fmt: skip
    stored = read(out / "best")
    assert stored.cfg.d_model == 32 and stored.tokenizer is not None
    meta = json.loads((out / "best" / "meta.json").read_text())
    weights = out / "best" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-4])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        read(out / "best")
    weights.write_bytes(raw[:-4] + b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        read(out / "best")
    weights.unlink()
    (tmp_path / "elsewhere.safetensors").write_bytes(raw)
    weights.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        read(out / "best")
    assert meta["files"]["model.safetensors"]["bytes"] == len(raw)
    with pytest.raises(CheckpointError, match="is not a folder"):
        read(out / "metrics.jsonl")

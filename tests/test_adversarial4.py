"""Adversarial round 4 (run folders, checkpoints, export): each test failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastchar.train as train_module
from fastchar.cli import main
from fastchar.plot import read_metrics

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--sample-chars", "0", "--backend", "numpy",
        "--lr", "1e-2", "--warmup", "1"]  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(capsys, corpus, out, *extra):
    return run(capsys, "train", "--data", corpus, "--out", out, "--steps", 10, "--eval-every", 5, *TINY, *extra)


class Kill(BaseException):
    """Stands for a kill -9 (nothing after it runs in the training loop)."""


def meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "meta.json").read_text())


@pytest.mark.parametrize("step", [5, 10])
def test_a_kill_right_after_a_checkpoint_save_loses_neither_best_nor_the_evaluation(
    capsys, corpus, tmp_path, monkeypatch, step
):
    """A kill after the first checkpoint an evaluation saves (it was latest, then best) left latest
    claiming a best validation loss that best/ did not hold, for good (the resume never evaluates that
    step again), and left metrics.jsonl without that evaluation."""
    code, _, err = train(capsys, corpus, tmp_path / "whole")
    assert code == 0, err
    whole = tmp_path / "whole"
    assert meta(whole / "best")["state"]["step"] == 10, "the test needs an improving final evaluation"

    real_save = train_module.save

    def save_then_die(model, path, *args, **kwargs):
        written = real_save(model, path, *args, **kwargs)
        if kwargs.get("state", args[2] if len(args) > 2 else {})["step"] == step:
            raise Kill
        return written

    monkeypatch.setattr(train_module, "save", save_then_die)
    with pytest.raises(Kill):
        train(capsys, corpus, tmp_path / "cut")
    monkeypatch.setattr(train_module, "save", real_save)
    cut = tmp_path / "cut"
    best = meta(cut / "best")
    latest = meta(cut / "latest") if (cut / "latest").exists() else best  # a resume takes best without it
    assert best["state"]["best_val"] <= latest["state"]["best_val"], "latest names a best that best/ lacks"
    if latest["state"]["step"] < 10:
        code, _, err = run(capsys, "train", "--resume", cut)
        assert code == 0, err
    for name in ("best", "latest"):
        assert (cut / name / "model.safetensors").read_bytes() == (whole / name / "model.safetensors").read_bytes()
    assert [p[0] for p in read_metrics(cut)["val"]] == [p[0] for p in read_metrics(whole)["val"]]


@pytest.mark.parametrize("resume", [False, True])
def test_a_fifo_named_metrics_jsonl_is_refused_before_work(capsys, corpus, tmp_path, resume):
    """A FIFO planted as metrics.jsonl made the run block forever opening it (and a single Ctrl-C or
    SIGTERM could not stop it); a link made a resumed run fail after its first steps."""
    out = tmp_path / "run"
    if resume:
        code, _, err = train(capsys, corpus, out)
        assert code == 0, err
        (out / "metrics.jsonl").unlink()
    else:
        out.mkdir()
    os.mkfifo(out / "metrics.jsonl")
    argv = (
        ["train", "--resume", str(out), "--steps", "20"]
        if resume
        else ["train", "--data", str(corpus), "--out", str(out), "--steps", "10", "--eval-every", "5", *TINY]
    )
    proc = subprocess.run([sys.executable, "-m", "fastchar", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "metrics.jsonl is not a regular file" in proc.stderr and "hint:" in proc.stderr
    assert "step     5" not in proc.stdout  # refused before any step


@pytest.mark.parametrize("flag", ["--seed", "--warmup", "--log-every", "--eval-every"])
def test_an_integer_too_large_for_a_checkpoint_is_refused_at_once(capsys, corpus, tmp_path, flag):
    """--seed 10**20 (or --warmup, ...) trained a run whose every checkpoint was then refused as
    'altered' (meta.json's integers are checked to 2**62): the run's work could never be loaded."""
    code, _, err = train(capsys, corpus, tmp_path / "run", flag, 10**20)
    assert code == 1, err
    assert err.startswith("error: ") and "hint:" in err
    assert not (tmp_path / "run").exists()


def test_a_failed_export_keeps_the_previous_file(capsys, corpus, tmp_path):
    """export wrote the ONNX file in place: a full disk (or a kill) left a truncated model instead of
    the previous one."""
    pytest.importorskip("onnx")
    code, _, err = train(capsys, corpus, tmp_path / "run")
    assert code == 0, err
    target = tmp_path / "model.onnx"
    code, _, err = run(capsys, "export", tmp_path / "run", "--format", "onnx", "-o", target)
    assert code == 0, err
    before = target.read_bytes()
    script = (
        "import resource, sys; from fastchar.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        f"sys.exit(main(['export', {str(tmp_path / 'run')!r}, '--format', 'onnx', '-o', {str(target)!r}]))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "error: cannot write" in proc.stderr
    assert target.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]

"""Run folders that never collide: `fastchar train` without --out takes runs/base, then runs/base-2,
... and says which; an explicit --out that holds a run still needs --resume or --overwrite."""

from __future__ import annotations

import json

from fastchar import runfolder
from fastchar.cli import main

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4", "--steps", "6",
        "--eval-every", "3", "--eval-batches", "2", "--log-every", "3", "--backend", "numpy",
        "--sample-chars", "0"]  # fmt: skip


def test_two_plain_runs_in_a_row_go_to_two_folders(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(corpus), *TINY]) == 0
    first = capsys.readouterr().out
    assert main(["train", "--data", str(corpus), *TINY]) == 0
    second = capsys.readouterr().out
    assert "run folder: runs/base (new;" in first
    assert "run folder: runs/base-2 (new; runs/base holds another run" in second
    for name in ("base", "base-2"):
        assert (tmp_path / "runs" / name / "best" / "meta.json").is_file()
        assert (tmp_path / "runs" / name / "latest" / "meta.json").is_file()
    first_metrics = (tmp_path / "runs" / "base" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(first_metrics[-1])["step"] == 6  # the second run left the first alone
    assert main(["train", "--data", str(corpus), *TINY]) == 0
    assert "run folder: runs/base-3" in capsys.readouterr().out


def test_an_explicit_out_that_holds_a_run_keeps_the_rule(capsys, corpus, tmp_path):
    out = tmp_path / "mine"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert main(["train", "--data", str(corpus), "--out", str(out), "--overwrite", *TINY]) == 0


def test_an_explicit_out_with_only_a_failed_run_s_metrics_keeps_the_rule(capsys, corpus, tmp_path):
    """A run that ended before its first checkpoint leaves metrics.jsonl (its step-0 evaluation): a fresh
    run there appended its own records to them (two step 0s of two models in one file)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY]) == 1
    err = capsys.readouterr().err
    assert "already holds a run's metrics.jsonl" in err and "--overwrite" in err
    assert main(["train", "--data", str(corpus), "--out", str(out), "--overwrite", *TINY]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r].count(0) == 1 and records[0]["val_loss"] != 4.2


def test_a_plot_s_temporary_left_by_a_kill_is_removed(tmp_path):
    """A kill during the end-of-run plot left .curves.png.tmp-PID.png in the run folder for good; the
    next run there removes it (never one of a process still running, nor a folder of that name)."""
    import os

    dead = tmp_path / ".curves.png.tmp-999999999.png"
    dead.write_bytes(b"\x89PNG")
    mine = tmp_path / f".curves.png.tmp-{os.getpid()}.png"
    mine.write_bytes(b"\x89PNG")
    folder = tmp_path / ".curves.png.tmp-999999998.png"
    folder.mkdir()
    assert runfolder.clean_stale(tmp_path) == [dead]
    assert not dead.exists() and mine.exists() and folder.is_dir()


def test_next_free_skips_folders_with_a_run_or_one_starting(tmp_path):
    base = tmp_path / "base"
    assert runfolder.next_free(base) == base
    base.mkdir()
    assert runfolder.next_free(base) == base  # an empty folder holds no run
    (base / runfolder.OWNER_NAME).write_text("123\n")  # a run has just locked it
    assert runfolder.next_free(base) == tmp_path / "base-2"
    (tmp_path / "base-2").write_text("a file, not a folder")
    (tmp_path / "base-3").mkdir()
    (tmp_path / "base-3" / "metrics.jsonl").write_text("{}\n")
    assert runfolder.next_free(base) == tmp_path / "base-4"

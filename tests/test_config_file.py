"""`fastchar train --config FILE.toml`: the flags' keys in either spelling, flags over the file, errors
that name the key, and the config.toml every run writes, which repeats the run bit for bit."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from fastchar import config_file, load
from fastchar.cli import build_parser, main

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4", "--eval-batches", "2",
        "--log-every", "2", "--sample-chars", "0"]  # fmt: skip


def curve(folder):
    """Every loss, accuracy, lr and grad norm of a run (not its timings)."""
    keep = ("step", "loss", "lr", "grad_norm", "train_loss", "val_loss", "train_acc", "val_acc")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (folder / "metrics.jsonl").open())]


def assert_same_run(a, b):
    assert curve(a) == curve(b)
    for name in ("best", "latest"):
        x, y = load(a / name, backend="numpy"), load(b / name, backend="numpy")
        for role in ("params", "adam_m", "adam_v"):
            assert np.array_equal(getattr(x, role).flat, getattr(y, role).flat), (name, role)
        assert x.train_state["rng"] == y.train_state["rng"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "\nhint: " in err, err
    return err.strip().splitlines()[0]


@pytest.mark.parametrize("backend", ["numpy", "auto"])
def test_a_runs_config_toml_repeats_it_bit_for_bit(capsys, corpus, tmp_path, backend):
    first = tmp_path / "first"
    argv = ["train", "--data", str(corpus), "--out", str(first), "--steps", "12", "--eval-every", "6", "--seed", "7",
            "--dropout", "0.1", "--position", "rope", "--betas", "0.8", "0.95", "--lr", "3e-3", "--warmup", "3",
            "--backend", backend, *TINY]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    written = tomllib.loads((first / "config.toml").read_text(encoding="utf-8"))
    assert written["data"] == str(corpus.resolve()) and "out" not in written and "vocab_size" not in written
    assert written["seed"] == 7 and written["betas"] == [0.8, 0.95] and written["position"] == "rope"
    assert written["backend"] == (
        backend if backend == "numpy" else json.loads((first / "best" / "meta.json").read_text())["backend"]
    )
    assert written["backend"] != "auto"
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.toml"), "--out", str(again)]) == 0
    capsys.readouterr()
    assert_same_run(first, again)
    assert (again / "config.toml").read_text() == (first / "config.toml").read_text()


def test_a_repeat_without_out_goes_to_a_new_folder(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", str(corpus), "--steps", "4", "--eval-every", "4", "--backend", "numpy", *TINY]) == 0
    assert main(["train", "--config", "runs/base/config.toml"]) == 0
    assert "run folder: runs/base-2" in capsys.readouterr().out
    assert_same_run(tmp_path / "runs" / "base", tmp_path / "runs" / "base-2")


def test_a_fine_tuning_runs_config_names_its_weights(capsys, corpus, tmp_path):
    base = tmp_path / "base"
    assert main(["train", "--data", str(corpus), "--out", str(base), "--steps", "4", "--eval-every", "4",
                 "--backend", "numpy", *TINY]) == 0  # fmt: skip
    tuned = tmp_path / "tuned"
    assert main(["train", "--init-from", str(base), "--data", str(corpus), "--out", str(tuned), "--steps", "4",
                 "--eval-every", "4", "--backend", "numpy", "--sample-chars", "0",
                 "--eval-batches", "2"]) == 0  # fmt: skip
    assert tomllib.loads((tuned / "config.toml").read_text())["init_from"] == str((base / "best").resolve())
    assert main(["train", "--config", str(tuned / "config.toml"), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert_same_run(tuned, tmp_path / "again")


def test_either_spelling_and_flags_override_the_file(capsys, corpus, tmp_path):
    settings = tmp_path / "s.toml"
    settings.write_text(
        f'data = "{corpus}"\nd-model = 32\nn_layer = 1\nn-head = 4\nctx = 16\nbatch = 4\nsteps = 4\n'
        'eval-every = 4\neval_batches = 2\nlr = 0.5\nbackend = "numpy"\nsample-chars = 0\n'
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(settings), "--out", str(out), "--lr", "0.002", "--steps", "6"]) == 0
    capsys.readouterr()
    model = load(out / "latest")
    assert model.cfg.d_model == 32 and model.cfg.n_head == 4 and model.train_cfg["eval_every"] == 4
    assert model.train_cfg["lr"] == 0.002 and model.train_cfg["steps"] == 6  # the flags won
    assert tomllib.loads((out / "config.toml").read_text())["lr"] == 0.002


def test_a_recipe_named_in_the_file_is_overridden_by_the_file(capsys, corpus, tmp_path):
    settings = tmp_path / "s.toml"
    settings.write_text(
        f'recipe = "one-minute"\ndata = "{corpus}"\ntime_budget = 0\nsteps = 2\neval_every = 2\n'
        'eval_batches = 2\nd_model = 32\nbackend = "numpy"\nsample_chars = 0\n'
    )
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    model = load(tmp_path / "r" / "latest")
    assert model.cfg.position == "rope" and model.cfg.n_head == 4  # the recipe's
    assert model.cfg.d_model == 32 and model.train_cfg["steps"] == 2  # the file's


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("d_modle = 64", "unknown key 'd_modle' (did you mean 'd_model'?)"),
        ("vocab_size = 65", "unknown key 'vocab_size' (the vocabulary is the text's"),
        ("steps = 'ten'", "steps must be an integer, got 'ten'"),
        ("steps = 1.5", "steps must be an integer, got 1.5"),
        ("lr = 'fast'", "lr must be a finite number, got 'fast'"),
        ("lr = true", "lr must be a finite number, got True"),
        ("lr = nan", "lr must be a finite number, got nan"),
        ("betas = [0.9]", "betas must be a list of two numbers"),
        ("tensorboard = 'yes'", "tensorboard must be true or false"),
        ("position = 'spiral'", "position must be one of learned, rope"),
        ("data = 3", "data must be a string, got 3"),
        ("[model]\nd_model = 64", "unknown key 'model'"),
        ("d-model = 64\nd_model = 64", "'d_model' is given twice (as d-model and d_model)"),
        ("steps = ", "is not valid TOML"),
    ],
)
def test_bad_files_are_refused_naming_the_key(capsys, tmp_path, text, pattern):
    settings = tmp_path / "bad.toml"
    settings.write_text(text + "\n")
    assert main(["train", "--config", str(settings), "--out", str(tmp_path / "r")]) == 1
    line = error_line(capsys)
    assert line.startswith(f"error: --config {settings}") and pattern in line, line
    assert not (tmp_path / "r").exists()


def test_a_missing_file_is_a_clean_error(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 1
    assert "cannot read it" in error_line(capsys)


def test_python_310_without_tomli_is_refused_clearly(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10 ...
    monkeypatch.setitem(sys.modules, "tomli", None)  # ... without the tomli package
    (tmp_path / "s.toml").write_text("steps = 2\n")
    assert main(["train", "--config", str(tmp_path / "s.toml")]) == 1
    assert "needs Python 3.11's tomllib or, on Python 3.10, the tomli package" in error_line(capsys)


def test_written_values_read_back_as_written():
    settings = {"data": 'C:\\runs\\"q"\t\x7fé\U0001f600', "lr": 1e-08, "min_lr": 0.0001, "steps": 10**9,
                "time_budget": 60.0, "betas": [0.9, 0.99], "tensorboard": True, "rope_base": 1e20}  # fmt: skip
    text = config_file.dumps(settings, "a comment\nover two lines")
    assert tomllib.loads(text) == settings
    parser = build_parser()._subparsers._group_actions[0].choices["train"]
    path = "x.toml"
    checked = {k: config_file._checked(path, k, v, config_file.flag_actions(parser)[k]) for k, v in settings.items()}
    assert checked == settings


def test_a_flag_given_as_zero_wins_over_the_file(capsys, corpus, tmp_path):
    """--seed 0, --warmup 0, --grad-clip 0, --dropout 0 and --sample-chars 0 are given values (0 == False in
    Python, but a flag given as 0 is still given): the file's values must not replace them."""
    settings = tmp_path / "s.toml"
    settings.write_text(
        f'data = "{corpus}"\nd_model = 32\nn_layer = 1\nn_head = 4\nctx = 16\nbatch = 4\nsteps = 2\neval_batches = 2\n'
        'backend = "numpy"\nseed = 5\nwarmup = 50\ngrad_clip = 0.5\ndropout = 0.1\nweight_decay = 0.2\n'
        "sample_chars = 20\n"
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(settings), "--out", str(out), "--seed", "0", "--warmup", "0", "--grad-clip", "0",
            "--dropout", "0", "--weight-decay", "0", "--sample-chars", "0"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model = load(out / "latest")
    t = model.train_cfg
    assert (t["seed"], t["warmup"], t["grad_clip"], t["weight_decay"]) == (0, 0, 0.0, 0.0), t
    assert model.cfg.dropout == 0.0
    assert "--- sample" not in printed  # --sample-chars 0: no sample
    written = tomllib.loads((out / "config.toml").read_text())
    assert written["seed"] == 0 and written["sample_chars"] == 0

"""`fastchar train --init-from RUN_OR_CHECKPOINT`: a trained model's weights, a fresh optimizer and
schedule from step 0, on new text whose characters the model knows; the architecture is the
checkpoint's."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastchar import TextDataset, TrainConfig, Trainer, load
from fastchar.cli import main
from fastchar.optim import lr_at

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16"]
RUN = ["--batch", "4", "--eval-batches", "3", "--log-every", "1", "--backend", "numpy", "--sample-chars", "0"]
NEW_TEXT = "a quick zebra jumps over the lazy fox.\nfive dozen jugs of liquor packed in my box!\n" * 60


def records(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def trained(capsys, corpus, tmp_path):
    """A tiny run trained 60 steps on the pangrams: tmp_path/base."""
    out = tmp_path / "base"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--steps", "60", "--eval-every", "30", "--lr", "1e-2",
            "--warmup", "5", *TINY, *RUN]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    return out


def test_fine_tuning_starts_from_the_trained_weights_at_step_0(capsys, trained, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(NEW_TEXT)
    out = tmp_path / "tuned"
    code = main(["train", "--init-from", str(trained), "--data", str(new), "--out", str(out), "--steps", "8",
                 "--eval-every", "4", "--warmup", "4", "--lr", "3e-3", *RUN])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "init from:" in stdout and "step 60" in stdout and "resuming" not in stdout
    # what the trained model scores on the new text, evaluated the way the run evaluates
    base = load(trained, backend="numpy")  # the run folder's best: what --init-from takes
    data = TextDataset(new, tokenizer=base.tokenizer)
    cfg = TrainConfig(batch=4, eval_batches=3, out=str(tmp_path / "unused"))
    expected = Trainer(base, data, cfg, log=lambda line: None, progress=False).evaluate()
    first = records(out)[0]
    assert first["step"] == 0
    assert first["val_loss"] == expected["val"] and first["train_loss"] == expected["train"]
    assert first["val_acc"] == expected["val_acc"]
    assert first["val_loss"] < 0.75 * math.log(base.cfg.vocab_size), "not a random model's ~ln V"
    steps = [r for r in records(out) if "lr" in r]
    tuned_cfg = TrainConfig(steps=8, warmup=4, lr=3e-3, out=str(out))
    assert steps[0]["step"] == 1 and steps[0]["lr"] == lr_at(0, tuned_cfg)  # the schedule starts over
    tuned = load(out / "latest", backend="numpy")
    assert tuned.train_state["step"] == 8 and tuned.cfg == base.cfg
    assert tuned.tokenizer.chars == base.tokenizer.chars
    assert tuned.train_cfg["steps"] == 8 and tuned.train_cfg["lr"] == 3e-3  # its own config, not the base run's
    assert not np.array_equal(tuned.params.flat, base.params.flat)
    # fresh Adam moments: after 8 steps from zero, the second moment is far below the base run's
    assert np.abs(tuned.adam_v.flat).sum() < np.abs(load(trained / "latest").adam_v.flat).sum()
    assert records(trained)[-1]["step"] == 60, "the base run is left alone"


def test_characters_outside_the_vocabulary_are_listed(capsys, trained, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(NEW_TEXT + "ZEBRA ÉTÉ\n")
    code = main(["train", "--init-from", str(trained / "best"), "--data", str(new), "--out", str(tmp_path / "t"),
                 "--steps", "2", *RUN])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and "not in the vocabulary" in first
    for c in "ZEBRAÉT":
        assert repr(c) in first, c
    assert "hint: " in err and not (tmp_path / "t" / "latest").exists()


def test_the_architecture_is_the_checkpoints(capsys, trained, tmp_path):
    new = tmp_path / "new.txt"
    new.write_text(NEW_TEXT)
    code = main(["train", "--init-from", str(trained), "--data", str(new), "--out", str(tmp_path / "t"),
                 "--d-model", "64", "--steps", "2", *RUN])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "d_model=64 but the checkpoint has 32" in err
    code = main(["train", "--init-from", str(trained), "--data", str(new), "--out", str(tmp_path / "d"),
                 "--dropout", "0.1", "--steps", "2", "--eval-every", "2", *RUN])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert load(tmp_path / "d" / "latest").cfg.dropout == 0.1  # dropout shapes no weight: it may change
    code = main(["train", "--init-from", str(trained), "--resume", str(trained), *RUN])
    assert code == 1 and "--init-from starts a new run" in capsys.readouterr().err

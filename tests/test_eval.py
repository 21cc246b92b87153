"""fastchar.evaluate and `fastchar eval`: every character predicted once, the figures the training
loop reports for the same windows, the split, and clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import PANGRAMS
from test_cli import TINY, assert_clean_error, run

import fastchar
from fastchar import CharTokenizer, DataError, InputError, Model, ModelConfig


@pytest.fixture
def model_and_text():
    text = PANGRAMS * 3 + "the end.\n"  # 378 characters: 23 whole windows of 16 and a last one of 9
    tok = CharTokenizer.from_text(text)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=64)
    model = Model(cfg, backend="numpy", seed=3)
    model.tokenizer = tok
    return model, text


def expected(model: Model, ids: np.ndarray) -> tuple[float, float, int]:
    """Loss and accuracy, one target at a time: character i (i >= 1) predicted from the window it
    falls in, window w reading characters wT .. wT + T - 1 (log-softmax written out here)."""
    T, losses, hits = model.cfg.ctx, [], 0
    for s in range(0, len(ids) - 1, T):
        x = ids[s : s + T][None, : len(ids) - 1 - s]
        model.forward(x)
        logits = model.logits[0].astype(np.float64)
        for j in range(x.shape[1]):
            target = ids[s + j + 1]
            row = logits[j] - logits[j].max()
            losses.append(math.log(np.exp(row).sum()) - row[target])
            hits += int(np.argmax(logits[j]) == target)
    return float(np.mean(losses)), hits / len(losses), len(losses)


def test_every_character_is_a_target_once(model_and_text):
    model, text = model_and_text
    ids = model.tokenizer.encode(text)
    loss, acc, n = expected(model, ids)
    result = fastchar.evaluate(model, text)
    assert result["chars"] == n == len(text) - 1 == 377 and result["windows"] == 24
    assert result["loss"] == pytest.approx(loss, rel=1e-5) and result["accuracy"] == pytest.approx(acc)
    assert result["bits_per_char"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert math.log(model.cfg.vocab_size) * 0.8 < result["loss"] < math.log(model.cfg.vocab_size) * 1.2  # untrained


@pytest.mark.parametrize("batch", [1, 5, 23, 24, 500])
def test_the_batch_changes_nothing(model_and_text, batch):
    model, text = model_and_text
    base = fastchar.evaluate(model, text, batch=7)
    result = fastchar.evaluate(model, text, batch=batch)
    assert result["loss"] == pytest.approx(base["loss"], rel=1e-6) and result["accuracy"] == base["accuracy"]


def test_ids_and_short_texts(model_and_text):
    model, text = model_and_text
    ids = model.tokenizer.encode(text)
    assert fastchar.evaluate(model, ids)["loss"] == pytest.approx(fastchar.evaluate(model, text)["loss"], rel=1e-6)
    two = fastchar.evaluate(model, text[:2])  # one target, one window of one position
    assert two["chars"] == 1 and two["windows"] == 1
    assert two["loss"] == pytest.approx(expected(model, ids[:2])[0], rel=1e-5)
    exact = fastchar.evaluate(model, text[:17])  # exactly one whole window, no shorter last one
    assert exact["chars"] == 16 and exact["windows"] == 1


def test_dropout_is_off_and_the_mode_comes_back(model_and_text):
    model, text = model_and_text
    cfg = ModelConfig(**{**model.cfg.to_dict(), "dropout": 0.5})
    noisy = Model(cfg, backend="numpy", seed=3)
    noisy.tokenizer = model.tokenizer
    assert noisy.training
    first, second = fastchar.evaluate(noisy, text), fastchar.evaluate(noisy, text)
    assert first == second and noisy.training  # no dropout masks drawn; training mode restored
    assert first["loss"] == pytest.approx(fastchar.evaluate(model, text)["loss"], rel=1e-6)  # same weights
    model.eval()
    fastchar.evaluate(model, text)
    assert not model.training


@pytest.mark.parametrize(
    "text, batch, error, pattern",
    [
        ("the Quick €", 32, InputError, "vocabulary lacks: 'Q', '€'"),
        ("t", 32, DataError, "at least 2 are needed"),
        ("", 32, DataError, "at least 2 are needed"),
        (np.array([0, 1, 99]), 32, InputError, "token ids must be in [0,"),
        (np.array([[0, 1]]), 32, InputError, "token ids (N,)"),
        ("the", 0, InputError, "batch must be a positive integer"),
        ("the", True, InputError, "batch must be a positive integer"),
    ],
)
def test_bad_input(model_and_text, text, batch, error, pattern):
    model, _ = model_and_text
    with pytest.raises(error) as info:
        fastchar.evaluate(model, text, batch=batch)
    assert pattern in str(info.value)


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture
def trained(capsys, corpus, tmp_path):
    code, _, err = run(capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "30",
                       "--eval-every", "30", "--sample-chars", "0", "--lr", "3e-3", *TINY)  # fmt: skip
    assert code == 0, err
    return tmp_path / "run"


def test_eval_command(capsys, trained, corpus):
    code, out, err = run(capsys, "eval", str(trained), "--backend", "numpy")
    assert code == 0, err
    assert f"data: {corpus.resolve()} (the text the run trained on, recorded in its checkpoint)" in out
    n_val = len(corpus.read_text(encoding="utf-8")) - int(len(corpus.read_text(encoding="utf-8")) * 0.9) - 1
    assert f"val split (the last 10 %): {n_val:,} characters predicted" in out
    loss = float(out.split("loss ")[1].split()[0])
    assert 0 < loss < math.log(31)  # 30 steps on a text of 31 characters: below the uniform guess
    assert "bits), perplexity" in out and "next-character accuracy" in out

    code, out, err = run(capsys, "eval", str(trained), "--backend", "numpy", "--split", "all", "--json", "--batch", "3")
    assert code == 0, err
    report = json.loads(out)  # nothing but the JSON on stdout
    text = corpus.read_text(encoding="utf-8")
    assert report["chars"] == len(text) - 1 and report["split"] == "all" and report["context"] == 16
    model = fastchar.load(trained, backend="numpy")
    direct = fastchar.evaluate(model, text)
    assert report["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert report["accuracy"] == direct["accuracy"]
    assert report["bits_per_char"] == pytest.approx(report["loss"] / math.log(2))
    assert "data: " in err  # the data line goes to stderr with --json


def test_eval_on_another_file_and_its_errors(capsys, trained, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("the lazy dog jumps.\n" * 20, encoding="utf-8")
    code, out, err = run(capsys, "eval", str(trained), "--backend", "numpy", "--data", str(other), "--split", "all")
    assert code == 0, err
    assert f"data: {other} (--data)" in out and "all split (the whole text): 399 characters" in out

    bad = tmp_path / "bad.txt"
    bad.write_text("the QUICK fox\n" * 5, encoding="utf-8")
    best = trained / "best"  # a checkpoint folder: no note on stderr before the error
    code, out, err = run(capsys, "eval", str(best), "--backend", "numpy", "--data", str(bad), "--split", "all")
    assert_clean_error(code, err, "vocabulary lacks: 'C', 'I', 'K', 'Q', 'U'")
    code, out, err = run(capsys, "eval", str(best), "--backend", "numpy", "--data", str(bad))  # "CK fox\n"
    assert_clean_error(code, err, "vocabulary lacks: 'C', 'K'")
    short = tmp_path / "short.txt"
    short.write_text("the dog", encoding="utf-8")
    code, out, err = run(capsys, "eval", str(best), "--backend", "numpy", "--data", str(short))
    assert_clean_error(code, err, "the val split of")
    code, out, err = run(capsys, "eval", str(best), "--data", str(tmp_path / "missing.txt"))
    assert_clean_error(code, err, "missing.txt")
    code, out, err = run(capsys, "eval", str(tmp_path / "nothing"))
    assert_clean_error(code, err, "does not exist")
    code, out, err = run(capsys, "eval", str(best), "--batch", "0")
    assert_clean_error(code, err, "--batch must be >= 1")


def test_eval_says_when_the_training_text_is_gone(capsys, corpus, tmp_path):
    moved = tmp_path / "moved.txt"
    moved.write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    code, _, err = run(capsys, "train", "--data", str(moved), "--out", str(tmp_path / "run"), "--steps", "2",
                       "--eval-every", "2", "--sample-chars", "0", *TINY)  # fmt: skip
    assert code == 0, err
    moved.unlink()
    code, out, err = run(capsys, "eval", str(tmp_path / "run" / "best"))
    assert_clean_error(code, err, f"the run trained on {moved.resolve()}, which no longer exists")
    assert "--data FILE" in err


def test_eval_notes_a_changed_training_text(capsys, trained, corpus):
    corpus.write_text(corpus.read_text(encoding="utf-8") + "the end.\n", encoding="utf-8")
    code, out, err = run(capsys, "eval", str(trained), "--backend", "numpy")
    assert code == 0, err
    assert "changed since the run trained on it" in err and "loss " in out


def test_eval_help():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fastchar", "eval", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: fastchar eval" in result.stdout
    for flag in ["--data", "--split", "--batch", "--json", "--precision", "--backend", "--threads", "--debug"]:
        assert flag in result.stdout, flag
    top = subprocess.run([sys.executable, "-m", "fastchar", "--help"], capture_output=True, text=True).stdout
    assert "eval" in top and "measure a checkpoint's loss" in top


def test_progress_lines(model_and_text):
    from fastchar.evaluation import Progress

    model, text = model_and_text
    lines: list[str] = []
    fastchar.evaluate(model, text, batch=4, progress=Progress(lines.append, every=0.0))
    assert len(lines) == 7 and lines[-1].startswith("eval: 377 of 377 characters (100%)")  # 6 batches, the tail
    assert lines[0].startswith("eval: 64 of 377 characters (17%)") and lines[5].startswith("eval: 368 of 377")
    quiet: list[str] = []
    fastchar.evaluate(model, text, progress=Progress(quiet.append, every=3600.0))
    assert quiet == []  # a job shorter than `every` prints nothing

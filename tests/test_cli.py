"""The `fastchar` command: help, a train -> sample -> info session, and clear errors for bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fastchar.cli import main

TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--backend", "numpy"]  # fmt: skip


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, pattern):
    assert code == 1, err
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and pattern in first, err


@pytest.mark.parametrize("command", ["train", "sample", "info"])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "fastchar", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: fastchar " + command in result.stdout
    if command == "train":
        for flag in ["--recipe", "--data", "--out", "--resume", "--batch", "--steps", "--lr", "--min-lr", "--warmup",
                     "--weight-decay", "--betas", "--eps", "--grad-clip", "--eval-every", "--eval-batches",
                     "--seed", "--time-budget", "--d-model", "--n-layer", "--n-head", "--ctx",
                     "--mlp-hidden", "--dropout", "--backend", "--threads", "--init-from"]:  # fmt: skip
            assert flag in result.stdout, flag
        assert "--vocab-size" not in result.stdout, "the vocabulary is the text's, never a flag"


def test_train_sample_info_session(capsys, corpus, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", "--data", str(corpus), "--out", str(out_dir), "--steps", "20",
                         "--eval-every", "10", "--sample-chars", "30", *TINY)  # fmt: skip
    assert code == 0, err
    assert "done: step 20" in out and "--- sample" in out
    code, out, err = run(capsys, "sample", "--checkpoint", str(out_dir / "best"), "--prompt", "the ",
                         "--max-new-tokens", "25", "--top-p", "0.9", "--seed", "3", "--backend", "numpy")  # fmt: skip
    assert code == 0, err
    assert out.startswith("the ") and len(out.rstrip("\n")) >= 4 + 20
    again = run(capsys, "sample", "--checkpoint", str(out_dir / "best"), "--prompt", "the ",
                "--max-new-tokens", "25", "--top-p", "0.9", "--seed", "3", "--backend", "numpy")[1]  # fmt: skip
    assert again == out, "the same seed gives the same text"
    code, out, err = run(capsys, "info", str(out_dir / "latest"))
    assert code == 0, err
    assert "parameters:" in out and "blocks.0.attn.qkv" in out and "backends:" in out and "blas:" in out


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--lr", "-1"], "lr must be > 0"),
        (["--batch", "0"], "batch must be a positive integer"),
        (["--n-head", "5"], "divisible by n_head"),
        (["--threads", "0"], "threads"),
        (["--backend", "gpu"], "unknown backend"),
    ],
)
def test_train_rejects_bad_options_before_work(capsys, corpus, tmp_path, argv, pattern):
    code, out, err = run(capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "r"), *TINY, *argv)
    assert_clean_error(code, err, pattern)
    assert not (tmp_path / "r" / "latest").exists()


def test_train_data_errors(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(capsys, "train", "--data", str(empty), "--out", str(tmp_path / "r"), *TINY)
    assert_clean_error(code, err, "is empty")
    short = tmp_path / "short.txt"
    short.write_text("abc" * 5)
    code, _, err = run(capsys, "train", "--data", str(short), "--out", str(tmp_path / "r"), *TINY)
    assert_clean_error(code, err, "too short")
    assert "hint:" in err


def test_unwritable_out_fails_first(capsys, corpus, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "file" / "run"), *TINY)
    assert_clean_error(code, err, "not writable")


@pytest.fixture
def checkpoint(capsys, corpus, tmp_path):
    run(capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "5", "--eval-every", "5",
        "--sample-chars", "0", *TINY)  # fmt: skip
    return tmp_path / "run" / "latest"


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-k", "0"], "top_k must be an integer >= 1"),
        (["--ctx", "17"], "larger than the model's context of 16"),
        (["--prompt", "QQ€"], "vocabulary lacks: 'Q', '€'"),
    ],
)
def test_sample_rejects_bad_input(capsys, checkpoint, argv, pattern):
    code, out, err = run(capsys, "sample", "--checkpoint", str(checkpoint), "--backend", "numpy", *argv)
    assert_clean_error(code, err, pattern)
    assert out == ""


def test_sample_bad_checkpoints(capsys, checkpoint, tmp_path):
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "missing"))
    assert_clean_error(code, err, "does not exist")
    (checkpoint / "model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "sample", "--checkpoint", str(checkpoint))
    assert_clean_error(code, err, "model.safetensors is truncated")


def test_resume_with_incompatible_model_options(capsys, checkpoint, corpus):
    code, _, err = run(capsys, "train", "--data", str(corpus), "--resume", str(checkpoint), "--d-model", "64",
                       "--backend", "numpy")  # fmt: skip
    assert_clean_error(code, err, "d_model=64 but the checkpoint has 32")


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "sample", "--checkpoint", str(tmp_path / "missing"), "--debug")
    assert code == 1 and "Traceback" in err and "error: " in err


def test_ctrl_c_saves_and_exits_130(corpus, tmp_path):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "fastchar", "train", "--data", str(corpus), "--out", str(out_dir),
           "--steps", "100000", "--eval-every", "100000", *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("step") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "fastchar train --resume" in err
    assert (out_dir / "latest" / "meta.json").is_file()


def test_resume_on_another_kernel_path_says_it_is_not_bitwise(capsys, corpus, tmp_path):
    """The checkpoint records the instruction-set path its kernels ran (meta.json "isa"); a resume on
    another one (FASTCHAR_ISA, or another CPU) continues with a note, as a change of backend does."""
    import json

    from fastchar import isa

    native = isa.path()
    if native == "generic":
        pytest.skip("this machine runs only the generic path: there is no other to resume on")
    out = tmp_path / "run"
    with isa.force("generic"):
        code, _, err = run(capsys, "train", "--data", str(corpus), "--out", str(out), "--steps", "2",
                           "--eval-every", "2", *TINY)  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "latest" / "meta.json").read_text())["isa"] == "generic"
    code, _, err = run(capsys, "train", "--data", str(corpus), "--resume", str(out), "--steps", "3", *TINY)
    assert code == 0, err
    assert f"the run trained on the generic kernel path; continuing on {native} (not bitwise)" in err
    assert json.loads((out / "latest" / "meta.json").read_text())["isa"] == native
    code, _, err = run(capsys, "train", "--data", str(corpus), "--resume", str(out), "--steps", "4", *TINY)
    assert code == 0 and "kernel path" not in err

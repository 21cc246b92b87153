"""What a second adversarial run found (issue 23), one test per numbered case, plus a fuzz test of
the command line and of generate/stream.

Every test here failed before the fix it is named after.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastchar import CharTokenizer, ConfigError, Model, ModelConfig, TextDataset, generate, load, runfolder, stream
from fastchar.cli import main
from fastchar.errors import FastcharError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--sample-chars", "0"]  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, pattern, status=1):
    assert code == status, err
    assert "Traceback" not in err, err
    lines = [
        line for line in err.strip().splitlines() if not line.startswith(("usage:", "note:", "warning:", "checkpoint:"))
    ]
    assert lines[0].startswith("error: ") and pattern in lines[0], err
    assert any(line.startswith("hint: ") for line in lines[1:]), f"no hint line in: {err}"


def train(capsys, corpus, out, *extra, steps=10, eval_every=5, backend="numpy"):
    return run(capsys, "train", "--data", corpus, "--out", out, "--steps", steps, "--eval-every", eval_every,
               "--backend", backend, *TINY, *extra)  # fmt: skip


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def cli_env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def run_dir(capsys, corpus, tmp_path):
    """A finished tiny run: tmp_path/run/{best,latest} at step 10."""
    code, _, err = train(capsys, corpus, tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


# -- 1. a resume never replaces another run's checkpoints -----------------------------------------


def test_01_resume_never_replaces_another_runs_best(capsys, corpus, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(capsys, corpus, a)[0] == 0
    assert train(capsys, corpus, b, "--seed", "1")[0] == 0
    shutil.copytree(b / "latest", a / "other")  # run B's checkpoint copied beside run A's
    before = tree(a / "best") | {"metrics": (a / "metrics.jsonl").read_bytes()}
    code, _, err = run(capsys, "train", "--resume", a / "other", "--steps", "15", "--backend", "numpy",
                       "--sample-chars", "0")  # fmt: skip
    assert_clean_error(code, err, "another run")
    assert "--out" in err
    assert tree(a / "best") | {"metrics": (a / "metrics.jsonl").read_bytes()} == before
    # pointed elsewhere, it continues
    code, _, err = run(capsys, "train", "--resume", a / "other", "--steps", "15", "--backend", "numpy",
                       "--sample-chars", "0", "--out", tmp_path / "b2")  # fmt: skip
    assert code == 0, err
    assert tree(a / "best") == {k: v for k, v in before.items() if k != "metrics"}


def test_01_resume_through_a_symlink_writes_where_the_user_pointed(capsys, corpus, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    assert train(capsys, corpus, elsewhere)[0] == 0
    shutil.copytree(elsewhere / "latest", tmp_path / "x")
    kept = tree(elsewhere)
    r = tmp_path / "r"
    r.mkdir()
    (r / "latest").symlink_to(tmp_path / "x")
    code, _, err = run(capsys, "train", "--resume", r, "--steps", "15", "--backend", "numpy", "--sample-chars", "0")
    assert code == 0, err
    assert tree(elsewhere) == kept, "nothing is written where the link leads"
    assert (r / "latest" / "meta.json").is_file() and not (r / "latest").is_symlink()
    assert json.loads((r / "latest" / "meta.json").read_text())["state"]["step"] == 15
    assert (tmp_path / "x" / "meta.json").is_file(), "the link's target is left as it was"
    assert not (r / "latest.old").exists() and not (r / "latest.old").is_symlink()


# -- 2. clearing leftovers removes only what fastchar made --------------------------------------


def test_02_clearing_leftovers_keeps_user_files_and_survives_impossible_pids(capsys, corpus, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    pid = dead_pid()
    mine = out / f".notes.tmp-{pid}"  # a user's file that merely looks like a temporary
    mine.write_text("precious")
    user_dir = out / f".latest.tmp-{pid}"  # the right name, but not what a save writes
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("precious")
    huge = out / ".best.tmp-99999999999999999999"
    huge.mkdir()
    (huge / "model.safetensors").write_bytes(b"x")
    stale = out / f".best.tmp-{pid}"  # what an interrupted save leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    code, _, err = train(capsys, corpus, out)
    assert code == 0, err
    assert "Traceback" not in err
    assert mine.read_text() == "precious" and (user_dir / "thesis.tex").read_text() == "precious"
    assert not stale.exists() and not huge.exists()
    for name in ("best", "latest.old"):  # a user's folder under a name a run saves to is never replaced
        other = tmp_path / f"other-{name}"
        (other / name).mkdir(parents=True)
        (other / name / "notes.txt").write_text("precious")
        code, _, err = train(capsys, corpus, other)
        assert_clean_error(code, err, "not a fastchar checkpoint")
        assert (other / name / "notes.txt").read_text() == "precious"


# -- 3. validate first, create the folder after -------------------------------------------------


@pytest.mark.parametrize(
    "extra, text, pattern",
    [
        (["--dropout", "1.5"], None, "dropout"),
        ([], "ab" * 10, "too short"),
        (["--n-head", "5"], None, "divisible"),
    ],
)
def test_03_an_error_leaves_no_out_folder_and_data_errors_come_first(capsys, corpus, tmp_path, extra, text, pattern):
    if text is not None:
        corpus = tmp_path / "short.txt"
        corpus.write_text(text)
    out = tmp_path / "new" / "run"
    code, stdout, err = train(capsys, corpus, out, *extra)
    assert_clean_error(code, err, pattern)
    assert not out.exists() and not out.parent.exists()
    assert "model:" not in stdout and "train:" not in stdout


# -- 4. absurd model sizes are refused at once ------------------------------------------------------


@pytest.mark.parametrize("layers", ["1000000000", "3000000"])
def test_04_huge_layer_counts_are_refused_at_once(capsys, corpus, tmp_path, layers):
    t0 = time.perf_counter()
    code, _, err = train(capsys, corpus, tmp_path / "run", "--n-layer", layers)
    assert_clean_error(code, err, "needs about")
    assert time.perf_counter() - t0 < 5


def test_04_the_memory_estimate_is_arithmetic_and_exact():
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layer=3, n_head=4, ctx=16, mlp_hidden=128)
    model = Model(cfg, backend="numpy")
    assert runfolder.param_count(cfg) == model.params.flat.size
    from fastchar.arena import act_specs

    per_seq = sum(math.prod(s) for _, s in act_specs(cfg, 1, cfg.ctx)) * 4
    assert runfolder.training_bytes(cfg, 4)[1] == int(per_seq * (2 + runfolder.TEMPORARY_FRACTION))


# -- 5. a FIFO in a checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize("name, argv", [("meta.json", ["info"]), ("tokenizer.json", ["sample", "--checkpoint"])])
def test_05_a_fifo_in_a_checkpoint_is_refused_without_hanging(run_dir, name, argv):
    best = run_dir / "best"
    (best / name).unlink()
    os.mkfifo(best / name)
    # in its own process: a hang ends in the timeout, not in a stuck suite
    proc = subprocess.run([sys.executable, "-m", "fastchar", *argv, str(best)], capture_output=True, text=True,
                          env=cli_env(), timeout=60)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


# -- 6. a stop signal during an evaluation ----------------------------------------------------------


def test_06_sigterm_during_an_evaluation_stops_between_batches(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "fastchar", "train", "--data", str(corpus), "--out", str(out), "--steps", "50",
           "--backend", "numpy", *TINY, "--batch", "64", "--eval-batches", "10000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    for line in proc.stdout:
        if line.startswith("training"):  # the step-0 evaluation (about a minute here) starts now
            break
    time.sleep(1.0)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert time.perf_counter() - t0 < 15, "the evaluation was not cut short"
    assert "by SIGTERM" in err and "Traceback" not in err
    assert load(out / "latest").train_state["step"] == 0


def test_06_eval_batches_are_bounded(capsys, corpus, tmp_path):
    code, _, err = train(capsys, corpus, tmp_path / "run", "--eval-batches", "10000000")
    assert_clean_error(code, err, "eval_batches")
    assert not (tmp_path / "run").exists()


# -- 7. time budgets and runs that trained nothing ---------------------------------------------------


def test_07_an_evaluation_longer_than_the_budget_is_refused_at_once(capsys, corpus, tmp_path):
    t0 = time.perf_counter()
    code, _, err = train(capsys, corpus, tmp_path / "run", "--time-budget", "2", "--batch", "64",
                         "--eval-batches", "5000")  # fmt: skip
    assert_clean_error(code, err, "--time-budget")
    assert "--eval-batches" in err
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "run" / "latest").exists()


def test_07_a_run_that_trains_nothing_does_not_report_success(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    code, _, err = train(capsys, corpus, out, "--time-budget", "1", steps=100000, eval_every=100000)
    assert code == 0, err
    before = tree(out)
    used = load(out / "latest").train_state["elapsed"]
    code, stdout, err = run(capsys, "train", "--resume", out, "--time-budget", used / 2, "--backend", "numpy",
                            "--sample-chars", "0")  # fmt: skip
    assert_clean_error(code, err, "time budget")
    assert "done:" not in stdout and "eval step" not in stdout
    assert tree(out) == before, "nothing re-evaluated, saved or appended"


# -- 15. --until before the run's step --------------------------------------------------------------


def test_15_until_before_the_runs_step_changes_nothing(capsys, run_dir):
    before = tree(run_dir)
    code, stdout, err = run(capsys, "train", "--resume", run_dir, "--until", "3", "--backend", "numpy",
                            "--sample-chars", "0")  # fmt: skip
    assert_clean_error(code, err, "already at step 10")
    assert "eval step" not in stdout and "done:" not in stdout
    assert tree(run_dir) == before
    code, _, err = run(capsys, "train", "--resume", run_dir, "--backend", "numpy", "--sample-chars", "0")
    assert_clean_error(code, err, "step 10 of 10")  # a finished run has nothing left to train either
    assert tree(run_dir) == before


# -- 8. sizes that scale with the corpus or the request -----------------------------------------------


def test_08_the_corpus_is_held_compactly(tmp_path):
    import tracemalloc

    path = tmp_path / "big.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40_000)  # 1.8 MB
    size = path.stat().st_size
    tracemalloc.start()
    try:
        ds = TextDataset(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ds.splits["train"].dtype == np.uint8
    assert peak < 6 * size, f"{peak / size:.1f} bytes per character"


def test_08_a_corpus_too_large_for_memory_is_refused_before_reading(capsys, tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 40_000)
    monkeypatch.setattr(runfolder, "available_bytes", lambda: 2 * runfolder.MIB)
    code, _, err = train(capsys, path, tmp_path / "run")
    assert_clean_error(code, err, "big.txt")
    assert "--batch" not in err and "shorter text" in err


def test_08_num_samples_is_bounded_and_estimated(capsys, run_dir, monkeypatch):
    t0 = time.perf_counter()
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--num-samples", "1000000", "--max-new-tokens", "5")
    assert_clean_error(code, err, "--num-samples")
    assert time.perf_counter() - t0 < 5
    monkeypatch.setattr(runfolder, "available_bytes", lambda: runfolder.MIB)
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--num-samples", "5000", "--max-new-tokens", "5",
                       "--backend", "cython")  # fmt: skip
    assert_clean_error(code, err, "need about")
    assert "--num-samples" in err and "--batch" not in err
    # texts held until all are done: --max-new-tokens 10**15 ran on with no output until killed
    monkeypatch.setattr(runfolder, "available_bytes", lambda: 64 * runfolder.MIB)
    t0 = time.perf_counter()
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--num-samples", "2", "--max-new-tokens",
                       str(10**15))  # fmt: skip
    assert_clean_error(code, err, "2 samples of up to 1,000,000,000,000,0")
    assert "lower --max-new-tokens" in err and time.perf_counter() - t0 < 5


# -- 9. a lone surrogate in tokenizer.json --------------------------------------------------------------


def rewrite_file(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a checkpoint file and record its new size and sha256 in meta.json (a forged checkpoint)."""
    import hashlib

    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_09_a_lone_surrogate_in_the_tokenizer_is_refused(capsys, run_dir):
    best = run_dir / "best"
    chars = json.loads((best / "tokenizer.json").read_text())["chars"]
    forged = json.dumps({"type": "char", "chars": "\ud800" + chars[1:]})  # ascii-escaped: \\ud800
    rewrite_file(best, "tokenizer.json", forged.encode())
    code, out, err = run(capsys, "sample", "--checkpoint", best, "--max-new-tokens", "50", "--temperature", "2",
                         "--prompt", chars[1])  # fmt: skip
    assert_clean_error(code, err, "surrogate")
    with pytest.raises(ValueError):
        CharTokenizer("a\ud800")


# -- 10. one distinct character ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_10_a_text_with_one_distinct_character(capsys, tmp_path, backend):
    path = tmp_path / "a.txt"
    path.write_text("a" * 5000)
    code, _, err = train(capsys, path, tmp_path / "run", backend=backend)
    assert_clean_error(code, err, "one distinct character")
    with pytest.raises(ConfigError):
        ModelConfig(vocab_size=1)


# -- 11. fastchar plot ----------------------------------------------------------------------------------


def test_11_plot_survives_odd_metrics_and_names(capsys, run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    metrics = run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 11, "loss": Infinity, "elapsed": 1.0}\n{"step": 1e999, "loss": 2.0, "elapsed": 1.0}\n')
        f.write('{"step": 12, "loss": 2.0, "elapsed": 1e999}\n')
    f = tmp_path / "noext"
    code, _, err = run(capsys, "plot", run_dir, "-o", f)
    assert code == 0, err
    assert f.read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    code, _, err = run(capsys, "plot", run_dir, "-o", tmp_path / "out.txt")
    assert_clean_error(code, err, "out.txt")
    assert not (tmp_path / "out.txt").exists()
    metrics.write_bytes(b"\xff\xfe garbage \x80\n")
    code, _, err = run(capsys, "plot", run_dir, "-o", tmp_path / "x.png")
    assert_clean_error(code, err, "no loss records")
    metrics.write_bytes(b"")
    code, _, err = run(capsys, "plot", run_dir, "-o", tmp_path / "y.png")
    assert_clean_error(code, err, "no loss records")
    assert not (tmp_path / "y.png").exists()


# -- 14. prompt files and data paths -----------------------------------------------------------------


def test_14_prompt_file_and_data_path_messages(capsys, run_dir, tmp_path):
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--prompt-file", tmp_path / "nope.txt")
    assert_clean_error(code, err, "prompt file")
    assert "training text" not in err and "--data" not in err
    r, w = os.pipe()
    os.write(w, b"th")
    os.close(w)
    try:
        code, out, err = run(capsys, "sample", "--checkpoint", run_dir, "--prompt-file", f"/dev/fd/{r}",
                             "--max-new-tokens", "5", "--seed", "0")  # fmt: skip
    finally:
        os.close(r)
    assert code == 0, err
    assert out.startswith("th")
    code, _, err = train(capsys, tmp_path, tmp_path / "run2")
    assert_clean_error(code, err, "is a folder")
    os.mkfifo(tmp_path / "fifo")
    code, _, err = train(capsys, tmp_path / "fifo", tmp_path / "run2")
    assert_clean_error(code, err, "not a regular file")


# -- 16. smaller ones ---------------------------------------------------------------------------------


def test_16_empty_stop_is_refused_before_loading(capsys, tmp_path):
    code, _, err = run(capsys, "sample", "--checkpoint", tmp_path / "missing", "--stop", "")
    assert_clean_error(code, err, "stop strings must be non-empty")
    assert "--stop" in err
    assert "COMMAND" not in err


def test_16_a_stop_string_outside_the_vocabulary_is_warned_about(capsys, run_dir):
    code, _, err = run(capsys, "sample", "--checkpoint", run_dir, "--stop", "\u00e9t\u00e9", "--max-new-tokens", "5")
    assert code == 0, err
    assert any(line.startswith("warning:") and "--stop" in line for line in err.splitlines()), err


def test_16_the_bf16_hint_speaks_command_line(capsys, corpus, tmp_path):
    from fastchar import isa

    runnable = isa.selection().runnable
    with isa.force("avx2" if "avx2" in runnable else runnable[-1]):  # a path without bf16 products
        code, _, err = train(capsys, corpus, tmp_path / "run", "--precision", "bf16", backend="cython")
    assert_clean_error(code, err, "bf16")
    assert "precision='fp32'" not in err and "--precision fp32" in err
    assert not (tmp_path / "run").exists()


def test_16_a_bom_is_not_a_vocabulary_character(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeff".encode() + b"abcabc" * 50)
    assert TextDataset(path).tokenizer.chars == ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny_model():
    tok = CharTokenizer("abcdefgh\n")
    return Model(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2, ctx=8, mlp_hidden=32),
                 backend="numpy"), tok  # fmt: skip


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": "0.8"},
        {"ctx": 1.5},
        {"prompt": None},
        {"max_new_tokens": True},
        {"stop": {"a": 1}},
        {"top_k": True},
        {"top_p": "0.5"},
        {"num_samples": True},
    ],
)
def test_16_python_api_types_are_checked_at_the_call(tiny_model, kwargs):
    model, tok = tiny_model
    args = {"prompt": "ab", "max_new_tokens": 3} | kwargs
    with pytest.raises(ConfigError):
        generate(model, tok, **args)
    with pytest.raises(ConfigError):
        stream(model, tok, **args)  # not at the first next()


# -- 12, 13, 16. MPI -------------------------------------------------------------------------------


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _mpiexec() is not None


needs_mpi = pytest.mark.skipif(not _have_mpi() and os.environ.get("FASTCHAR_REQUIRE_MPI") != "1",
                               reason="mpi4py or mpiexec missing")  # fmt: skip


def mpi_env() -> dict:
    return {**cli_env(), "FASTCHAR_MPI_TIMEOUT": "10"}


@needs_mpi
def test_12_ranks_started_with_different_options_are_named(corpus, tmp_path):
    train_ = [sys.executable, "-m", "fastchar", "train", "--data", str(corpus), "--out", str(tmp_path / "run"),
              "--backend", "numpy", *TINY, "--steps", "10"]  # fmt: skip
    cmd = [_mpiexec(), "-n", "1", *train_, "--until", "3", ":", "-n", "1", *train_, "--until", "5"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=120)
    assert proc.returncode != 0
    assert "differ in" in proc.stderr and "until" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "out of memory" not in proc.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "latest").exists()


@needs_mpi
@pytest.mark.slow
def test_13_validation_loss_does_not_depend_on_the_number_of_ranks(corpus, tmp_path):
    script = ROOT / "tests" / "mpi_train.py"
    common = [str(script), "--corpus", str(corpus), "--backend", "numpy", "--dtype", "float64", "--steps", "2"]
    two = subprocess.run([_mpiexec(), "-n", "2", sys.executable, *common, "--batch", "4", "--out",
                          str(tmp_path / "o2"), "--dump", str(tmp_path / "d2")], capture_output=True, text=True,
                         env=mpi_env(), timeout=180)  # fmt: skip
    assert two.returncode == 0, two.stderr
    one = subprocess.run([sys.executable, *common, "--batch", "8", "--out", str(tmp_path / "o1"), "--dump",
                          str(tmp_path / "d1")], capture_output=True, text=True, env=mpi_env(),
                         timeout=180)  # fmt: skip
    assert one.returncode == 0, one.stderr

    def vals(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r}

    a, b = vals(tmp_path / "o2"), vals(tmp_path / "o1")
    assert sorted(a) == sorted(b) == [0, 2]
    for step in a:
        np.testing.assert_allclose(a[step], b[step], rtol=1e-12, err_msg=f"step {step}")


@needs_mpi
def test_16_one_checkpoint_note_under_mpiexec(capsys, run_dir):
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "fastchar", "train", "--resume", str(run_dir), "--steps", "12",
           "--sample-chars", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mpi_env(), timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("checkpoint:") == 1, proc.stderr


# -- 17. no citation of files the repository does not hold ------------------------------------------


def test_17_help_and_docstrings_cite_no_missing_file(capsys):
    for command in ([], ["train"], ["sample"], ["info"], ["plot"], ["bench"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert "SPEC" not in out and "ANCHORS" not in out, command
    missing = ("SPEC.md", "ANCHORS.md", "SPEC's", "(SPEC)")
    for path in [*ROOT.glob("fastchar/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("csrc/*.p*")]:
        text = path.read_text(encoding="utf-8")
        assert not [m for m in missing if m in text], path


# -- fuzz: the command line, generate and stream -----------------------------------------------------

INTS = ["0", "1", "2", "3", "-1", "7", "1000000000", "99999999999999999999999", "1.5", "abc", "", "1e3", "0x10",
        "nan", "\u0663"]  # fmt: skip
FLOATS = ["0", "0.5", "1", "-1", "1e-300", "1e300", "nan", "inf", "-inf", "1e999", "-0", "abc", "", "0.1", "2"]
TEXTS = ["", "th", "a", "\n", "zz\u00e9", "\ud800", "\x00", "-x", "--help", "\\n", "x" * 300]
MODEL_FLAGS = {"--d-model": ["8", "16", "12", "0", "-8", "1000000000", "abc"],
               "--n-layer": ["1", "2", "0", "1000000000", "3000000", "-1"],
               "--n-head": ["1", "2", "4", "3", "0", "-2", "1000000"],
               "--ctx": ["4", "8", "16", "0", "100000000", "-1"],
               "--mlp-hidden": ["8", "32", "0", "1000000000000"],
               "--dropout": ["0", "0.1", "1", "1.5", "-0.1", "nan"],
               "--position": ["learned", "rope", "bogus"],
               "--rope-base": ["10000", "1", "0", "-1", "1e308", "inf"]}  # fmt: skip
TRAIN_FLAGS = {"--batch": INTS, "--grad-accum": INTS, "--steps": INTS, "--lr": FLOATS, "--min-lr": FLOATS,
               "--warmup": INTS, "--weight-decay": FLOATS, "--eps": FLOATS, "--grad-clip": FLOATS,
               "--eval-every": INTS, "--eval-batches": INTS, "--seed": INTS, "--time-budget": FLOATS,
               "--log-every": INTS, "--until": INTS, "--sample-chars": INTS, "--ranks": INTS,
               "--recipe": ["one-minute", "ten-minutes", "bogus", ""], "--precision": ["fp32", "bf16", "fp16"],
               "--backend": ["numpy", "cython", "auto", "bogus", ""],
               "--threads": ["1", "2", "0", "-1", "1000000000"],
               "--vocab-size": INTS, "--betas": None}  # fmt: skip
SAMPLE_FLAGS = {"--max-new-tokens": ["0", "1", "5", "20", "-1", "abc", "1.5"], "--temperature": FLOATS,
                "--top-k": INTS, "--top-p": FLOATS, "--seed": INTS, "--num-samples": ["1", "2", "3", *INTS[3:]],
                "--ctx": INTS, "--stop": TEXTS, "--prompt": TEXTS, "--precision": ["fp32", "bf16", "x"],
                "--backend": ["numpy", "cython", "numba", "bogus"],
                "--threads": ["1", "2", "0", "-1", "1000000000"]}  # fmt: skip


class Reached(Exception):
    """Training would start: every check of the command line passed."""


def _fuzz_argv(rnd: random.Random, corpus: Path, ckpt: Path, tmp: Path) -> list[str]:
    command = rnd.choice(["train", "train", "train", "sample", "sample", "info", "plot", "bogus"])
    if command == "train":
        argv = ["train", "--out", str(tmp / rnd.choice(["a", "b", "run/x", "."]))]
        argv += rnd.choice([["--data", str(corpus)], ["--data", str(tmp / "nope")], ["--data", str(tmp)],
                            ["--resume", str(ckpt)], ["--resume", str(tmp / "nope")], []])  # fmt: skip
        flags = {**MODEL_FLAGS, **TRAIN_FLAGS}
        for flag in rnd.sample(sorted(flags), rnd.randint(0, 6)):
            if flag == "--betas":
                argv += [flag, rnd.choice(FLOATS), rnd.choice(FLOATS)]
            else:
                argv += [flag, rnd.choice(flags[flag])]
        argv += rnd.choice([[], ["--overwrite"], ["--tensorboard"]])
        if "--steps" not in argv and "--recipe" not in argv and "--time-budget" not in argv:
            argv += ["--steps", "3"]
        return argv
    if command == "sample":
        argv = ["sample", "--checkpoint", rnd.choice([str(ckpt), str(ckpt.parent), str(tmp / "nope")])]
        for flag in rnd.sample(sorted(SAMPLE_FLAGS), rnd.randint(0, 6)):
            argv += [flag, rnd.choice(SAMPLE_FLAGS[flag])]
        if "--max-new-tokens" not in argv:
            argv += ["--max-new-tokens", "10"]
        return argv
    if command == "info":
        return [
            "info",
            *rnd.choice([[], [str(ckpt)], [str(tmp / "nope")], [str(corpus)]]),
            *rnd.choice([[], ["--json"]]),
        ]
    if command == "plot":
        return ["plot", rnd.choice([str(ckpt.parent), str(tmp / "nope"), str(corpus)]), "-o",
                str(tmp / rnd.choice(["c.png", "c", "c.txt", "c.PDF", "sub/c.svg", ".hidden"]))]  # fmt: skip
    return [rnd.choice(["bogus", "", "--version", "-x", "train"]), *rnd.choice([[], ["--bogus"], ["x"]])]


@pytest.mark.parametrize("n, seed", [(120, 23), pytest.param(1000, 2323, marks=pytest.mark.slow)])
def test_fuzz_the_command_line_finds_no_traceback(capsys, run_dir, corpus, tmp_path, monkeypatch, n, seed):
    """n seeded random command lines, in-process: each ends in a status (0, 1, 2, via SystemExit or a
    return) or reaches the start of training; none raises anything else or prints a traceback."""
    import fastchar.train
    from fastchar.threads import set_threads

    def reached(self, until=None):
        raise Reached

    monkeypatch.setattr(fastchar.train.Trainer, "train", reached)
    monkeypatch.setattr(runfolder, "available_bytes", lambda: 400 * runfolder.MIB)  # big models are refused
    rnd = random.Random(seed)
    counts = {"ok": 0, "error": 0, "usage": 0, "training": 0}
    failures = []
    for _ in range(n):
        argv = _fuzz_argv(rnd, corpus, run_dir / "best", tmp_path)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except Reached:
            code = "training"
        except Exception as exc:  # noqa: BLE001 (what the fuzz looks for)
            failures.append(f"{argv}: {type(exc).__name__}: {exc}")
            continue
        finally:
            out, err = capsys.readouterr()
        if "Traceback" in err:
            failures.append(f"{argv}: traceback in {err}")
        key = {0: "ok", 1: "error", 2: "usage", None: "ok", "training": "training"}.get(code)
        if key is None:
            failures.append(f"{argv}: status {code!r}")
        else:
            counts[key] += 1
    set_threads(None)
    print(f"fuzz: {counts}")
    assert not failures, "\n".join(failures[:10])
    assert all(counts.values()), counts  # every outcome was reached at least once


API_VALUES = {
    "prompt": ["ab", "", "zz\u00e9", None, 5, ["ab", "c"], [], ["a", 3], b"ab", ("a", "b"), "a" * 100],
    "max_new_tokens": [0, 1, 5, -1, True, 2.5, "5", None, np.int64(3)],
    "temperature": [0, 0.8, -1, math.nan, math.inf, "0.8", None, True, 1e308, 1e-308, np.float32(0.5)],
    "top_k": [None, 0, 1, 5, 10**30, -1, True, 2.5, "3"],
    "top_p": [None, 0, 1, 0.5, 1.5, math.nan, "0.5", True, 1e-300],
    "seed": [None, 0, -1, 2**64, 2**200, True, 1.5, "0"],
    "ctx": [None, 0, 1, 8, 9, 10**9, 1.5, True, "8"],
    "num_samples": [None, 1, 3, 0, -1, True, 10**30, 2.5],
    "stop": [None, "", "a", ["a", ""], {"a": 1}, ["ab"], 5, ("a",), [None], "\ud800"],
}


API_VALID = {"prompt": ["ab", "", ["ab", "c"], "a" * 100], "max_new_tokens": [0, 1, 5, np.int64(3)],
             "temperature": [0, 0.8, 1e308, 1e-308, np.float32(0.5)], "top_k": [None, 1, 5, 10**30],
             "top_p": [None, 1, 0.5, 1e-300], "seed": [None, 0, 2**64, 2**200], "ctx": [None, 1, 8],
             "num_samples": [None, 1, 3], "stop": [None, "a", ["ab"], ("a",)]}  # fmt: skip


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_fuzz_generate_and_stream_raise_only_fastchar_errors(backend):
    """400 seeded random calls per backend with wrong types and extreme values: each returns text or
    raises a FastcharError (ConfigError, InputError), at the call, never anything else."""
    tok = CharTokenizer("abcdefgh\n")
    model = Model(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layer=1, n_head=2, ctx=8, mlp_hidden=32),
                  backend=backend)  # fmt: skip
    rnd = random.Random(2323)
    counts = {"text": 0, "error": 0}
    failures = []
    for i in range(400):
        kwargs = {k: rnd.choice(v if rnd.random() < 0.15 else API_VALID[k]) for k, v in API_VALUES.items()
                  if k == "prompt" or rnd.random() < 0.5}  # fmt: skip
        kwargs.setdefault("max_new_tokens", 4)
        use_stream = i % 2 == 1
        try:
            if use_stream:
                it = stream(model, tok, **kwargs)
                pieces = list(it)
                assert all(isinstance(p, str | tuple) for p in pieces)
            else:
                text = generate(model, tok, **kwargs)
                assert isinstance(text, str | list)
            counts["text"] += 1
        except FastcharError:
            counts["error"] += 1
        except Exception as exc:  # noqa: BLE001 (what the fuzz looks for)
            failures.append(f"{'stream' if use_stream else 'generate'}({kwargs}): {type(exc).__name__}: {exc}")
    print(f"fuzz {backend}: {counts}")
    assert not failures, "\n".join(failures[:10])
    assert counts["text"] and counts["error"]

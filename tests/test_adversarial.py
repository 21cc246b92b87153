"""What an adversarial user found (issue 14), one test per numbered case, plus a fuzz test of
meta.json / tokenizer.json and a kill -9 loop (slow; scripts/kill_loop.py runs the long version).

Every test here failed before the fix it is named after.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastchar.checkpoint as ckpt
from fastchar import (
    CharTokenizer,
    CheckpointError,
    ConfigError,
    Model,
    ModelConfig,
    TextDataset,
    TrainConfig,
    Trainer,
    load,
    runfolder,
    stream,
)
from fastchar.cli import main
from fastchar.train import Interrupted, check_writable

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--sample-chars", "0"]  # fmt: skip
SMALL = dict(d_model=32, n_layer=1, n_head=4, ctx=16, mlp_hidden=128)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, pattern, status=1):
    assert code == status, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("usage:")]
    assert lines[0].startswith("error: ") and pattern in lines[0], err
    assert any(line.startswith("hint: ") for line in lines[1:]), f"no hint line in: {err}"


def train(capsys, corpus, out, *extra, steps=10, eval_every=5, backend="numpy"):
    return run(capsys, "train", "--data", corpus, "--out", out, "--steps", steps, "--eval-every", eval_every,
               "--backend", backend, *TINY, *extra)  # fmt: skip


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under folder (following nothing) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.endswith(".old"))


def rewrite_meta(path: Path, edit) -> None:
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def run_dir(capsys, corpus, tmp_path):
    """A finished tiny run: tmp_path/run/{best,latest} at step 10."""
    code, _, err = train(capsys, corpus, tmp_path / "run")
    assert code == 0, err
    return tmp_path / "run"


# -- work lost ------------------------------------------------------------------------------------


def test_01_fresh_run_into_a_run_folder_stops_before_work(capsys, corpus, run_dir):
    before = tree(run_dir / "best")
    code, out, err = train(capsys, corpus, run_dir, "--batch", "2", steps=4, eval_every=2)
    assert_clean_error(code, err, "already holds a run")
    assert "--resume" in err and "--overwrite" in err
    assert tree(run_dir / "best") == before, "the first run's best is untouched"
    assert "training" not in out
    with pytest.raises(ConfigError, match="already holds a run"):  # the Python API too
        ds = TextDataset(corpus)
        model = Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend="numpy")
        Trainer(model, ds, TrainConfig(steps=2, out=str(run_dir)), log=lambda s: None, progress=False).train()
    assert tree(run_dir / "best") == before
    code, _, err = train(capsys, corpus, run_dir, "--overwrite", steps=4, eval_every=2)
    assert code == 0, err
    assert load(run_dir / "latest").train_state["step"] == 4
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4, "--overwrite starts the metrics afresh"


def test_02_non_finite_weights_are_never_saved(capsys, corpus, run_dir):
    before = tree(run_dir / "latest")
    code, _, err = run(capsys, "train", "--resume", run_dir / "latest", "--lr", "1e300", "--steps", "20",
                       "--eval-every", "1", "--backend", "numpy", "--sample-chars", "0")  # fmt: skip
    assert_clean_error(code, err, "finite")
    assert f"the last good checkpoint is {run_dir / 'latest'}" in err
    assert tree(run_dir / "latest") == before
    kept = load(run_dir / "latest")
    assert kept.train_state["step"] == 10 and np.isfinite(kept.params.flat).all()
    kept.params["lm_head"][0, 0] = np.inf
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        ckpt.save(kept, run_dir / "bad")
    assert not (run_dir / "bad").exists() and not leftovers(run_dir)


def test_02_non_finite_checkpoint_is_refused_on_load(run_dir):
    path = run_dir / "latest"
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-4:] = np.array([np.nan], np.float32).tobytes()
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    rewrite_meta(path, lambda m: m["files"]["optimizer.safetensors"].update(sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(CheckpointError, match="NaN or infinite values in adam_v"):
        load(path)


def test_03_resume_keeps_the_runs_data_and_backend(capsys, tmp_path, corpus):
    text = corpus.read_text()
    data = tmp_path / "d.txt"
    data.write_text(text)
    code, _, err = train(capsys, data, tmp_path / "run", "--until", "5", backend="numba")
    assert code == 0, err
    meta = json.loads((tmp_path / "run" / "latest" / "meta.json").read_text())
    assert meta["data"] == {"path": str(data.resolve()), "bytes": len(text.encode()),
                            "sha256": hashlib.sha256(text.encode()).hexdigest()}  # fmt: skip
    assert meta["backend"] == "numba" and meta["precision"] == "fp32"
    # --steps 30: a run at its last step has nothing left to train (issue 23, case 15)
    resume = ["train", "--resume", tmp_path / "run" / "latest", "--steps", "30", "--until", "10", "--sample-chars", "0"]
    code, out, err = run(capsys, *resume)  # no --data, no --backend
    assert code == 0, err
    assert f"data: {data.resolve()}" in out and "backend numba" in out
    lines = text.splitlines(keepends=True)
    data.write_text("".join(reversed(lines)))  # same characters, other content
    code, _, err = run(capsys, *resume[:-2], "--until", "15")
    assert_clean_error(code, err, "changed since the run trained on it")
    code, _, err = run(capsys, *resume[:-2], "--until", "15", "--data", data)
    assert code == 0 and "note: " in err, err
    other = tmp_path / "other.txt"
    other.write_text(text.replace("q", "Q"))
    code, _, err = run(capsys, *resume[:-2], "--until", "20", "--data", other)
    assert_clean_error(code, err, "another vocabulary than the checkpoint")


def test_04_two_trainers_on_one_folder(capsys, corpus, tmp_path):
    out = tmp_path / "same"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from fastchar.runfolder import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = train(capsys, corpus, out)
        assert_clean_error(code, err, f"in use by another fastchar run (process {holder.pid})")
        assert not (out / "latest").exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = train(capsys, corpus, out)  # the kernel dropped the dead holder's lock
    assert code == 0, err


def test_05_stale_temporaries_are_cleared_at_start(capsys, corpus, run_dir):
    stale = run_dir / f".latest.tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = run_dir / f".best.tmp-{live.pid}"
        busy.mkdir()
        (run_dir / "best").rename(run_dir / "best.old")  # a kill between a save's two renames
        code, _, err = run(capsys, "train", "--resume", run_dir / "latest", "--steps", "12", "--backend", "numpy",
                           "--sample-chars", "0")  # fmt: skip
        assert code == 0, err
        assert not stale.exists(), "a dead process's temporary is removed"
        assert busy.exists(), "a live process's temporary is left alone"
        assert (run_dir / "best" / "meta.json").is_file() and not (run_dir / "best.old").exists()
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_06_sigterm_and_sighup_save_and_exit_128_plus_signal(corpus, tmp_path, signum):
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-u", "-m", "fastchar", "train", "--data", str(corpus), "--out", str(out_dir),
           "--steps", "100000", "--eval-every", "100000", "--backend", "numpy", *TINY]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step"):
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"by {signal.Signals(signum).name}" in err and "fastchar train --resume" in err
    assert load(out_dir / "latest").train_state["step"] >= 5
    assert not leftovers(out_dir)


def test_06_ctrl_c_during_the_final_evaluation_exits_130(corpus, tmp_path):
    ds = TextDataset(corpus)
    cfg = TrainConfig(batch=4, steps=6, eval_every=100, eval_batches=1, out=str(tmp_path / "run"))
    trainer = Trainer(Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend="numpy"), ds, cfg,
                      log=lambda s: None, progress=False)  # fmt: skip
    evaluate = trainer.evaluate

    def interrupted_evaluate():
        if trainer.step == cfg.steps:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the final evaluation
        return evaluate()

    trainer.evaluate = interrupted_evaluate
    with pytest.raises(Interrupted, match="interrupted at step 6;.*by SIGINT") as info:
        trainer.train()
    assert info.value.signum == signal.SIGINT
    assert load(tmp_path / "run" / "latest").train_state["step"] == 6


def test_06_an_ignored_sighup_stays_ignored(corpus, tmp_path):
    """Under nohup SIGHUP is ignored: the trainer must not turn it back into a stop."""
    ds = TextDataset(corpus)
    cfg = TrainConfig(batch=4, steps=6, eval_every=100, eval_batches=1, log_every=2, out=str(tmp_path / "run"))
    trainer = Trainer(Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend="numpy"), ds, cfg,
                      log=lambda line: line.startswith("step") and os.kill(os.getpid(), signal.SIGHUP),
                      progress=False)  # fmt: skip
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert trainer.train()["step"] == 6
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_07_readers_never_see_a_checkpoint_mid_swap(tmp_path):
    cfg = ModelConfig(vocab_size=11, d_model=128, n_layer=2, n_head=4, ctx=64, mlp_hidden=512)
    path = tmp_path / "latest"
    ckpt.save(Model(cfg, backend="numpy"), path, CharTokenizer("abcdefghijk"))
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from fastchar import Model, ModelConfig, CharTokenizer\nfrom fastchar.checkpoint import save\n"
         f"m = Model(ModelConfig(**{cfg.to_dict()!r}), backend='numpy')\nprint('go', flush=True)\n"
         "for i in range(100000):\n    m.params.flat[0] = i\n    save(m, sys.argv[1], CharTokenizer('abcdefghijk'))\n",
         str(path)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "go"
        failures, seen = [], set()
        deadline = time.time() + 6
        loads = 0
        while time.time() < deadline or loads < 30:
            try:
                seen.add(float(load(path, backend="numpy").params.flat[0]))
            except CheckpointError as exc:
                failures.append(str(exc))
            loads += 1
    finally:
        writer.kill()
        writer.wait()
    assert not failures, f"{len(failures)} of {loads} loads failed: {failures[:3]}"
    assert len(seen) > 3, "the writer replaced the checkpoint during the reads"


def test_07b_a_folder_with_the_old_inode_number_is_still_a_swap(tmp_path):
    """A save deletes the old folder, and the next save's folder may get its inode number (test_07 saw
    "tokenizer.json is missing" once in 164 loads): a read that failed on the old folder must still
    see a swap and start over. Renaming the folder away and back keeps its inode and changes its
    ctime, the same shape."""
    path = tmp_path / "latest"
    ckpt.save(Model(ModelConfig(vocab_size=11, **SMALL), backend="numpy"), path, CharTokenizer("abcdefghijk"))
    identity = os.stat(path)
    time.sleep(0.05)  # past the coarse clock's tick, whatever its size
    os.rename(path, tmp_path / "away")
    os.rename(tmp_path / "away", path)
    assert os.stat(path).st_ino == identity.st_ino
    assert ckpt._swapped(path, path, identity)
    assert not ckpt._swapped(path, path, os.stat(path))  # the folder as it is: no swap


def test_07c_a_save_that_finishes_between_the_two_looks_is_found(tmp_path, monkeypatch):
    """A reader that finds neither latest/ (mid-swap) nor latest.old/ (the save has just finished and
    removed it) looks for latest/ once more instead of calling the checkpoint missing."""
    path = tmp_path / "latest"
    ckpt.save(
        Model(ModelConfig(vocab_size=11, **SMALL), backend="numpy"), tmp_path / "new", CharTokenizer("abcdefghijk")
    )
    real = Path.is_dir

    def save_finishes(self: Path) -> bool:
        if self.name == "latest.old":
            os.rename(tmp_path / "new", path)
            return False
        return real(self)

    monkeypatch.setattr(Path, "is_dir", save_finishes)
    assert ckpt._locate(path) == path


# -- crafted checkpoints ------------------------------------------------------------------------


def test_08_resume_never_writes_where_meta_json_says(capsys, run_dir, tmp_path):
    victim = tmp_path / "victim"
    (victim / "latest").mkdir(parents=True)
    (victim / "latest" / "precious.txt").write_text("mine")
    evil = tmp_path / "evil"
    evil.mkdir()
    (run_dir / "latest").rename(evil / "latest")
    rewrite_meta(evil / "latest", lambda m: m["train"].update(out=str(victim)))
    before = tree(victim)
    code, _, err = run(capsys, "train", "--resume", evil / "latest", "--steps", "12", "--backend", "numpy",
                       "--sample-chars", "0")  # fmt: skip
    assert code == 0, err
    assert tree(victim) == before, "nothing outside the resumed run's folder is touched"
    assert load(evil / "latest").train_state["step"] == 12


@pytest.mark.parametrize("name", ["/etc/passwd", "../../x", "..", "sub/model.safetensors", ".hidden", "a\\b", ""])
def test_09_files_entries_are_plain_names_only(run_dir, name):
    path = run_dir / "latest"
    rewrite_meta(path, lambda m: m["files"].update({name: {"bytes": 1, "sha256": "0" * 64}}))
    with pytest.raises(CheckpointError, match="not a plain file name") as info:
        load(path)
    assert "bytes" not in str(info.value).split("files lists")[1], "nothing about the named file leaks"


def test_09_links_inside_the_folder_are_not_followed(run_dir, tmp_path):
    path = run_dir / "latest"
    outside = tmp_path / "outside.bin"
    outside.write_bytes((path / "model.safetensors").read_bytes())
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load(path)


# -- fuzz: every field of meta.json and tokenizer.json ------------------------------------------

MUTANTS = [None, True, False, -5, 0, 7.9, -1e308, 10**9, 2**70, float("nan"), float("inf"), "", "x" * 5000,
           "/etc/passwd", "../../outside", [], [1, 2], {}, {"a": 1}]  # fmt: skip
DEEP = "[" * 100000 + "]" * 100000


def field_paths(value, prefix=()):
    """Every path (tuple of keys / indices) into a JSON value, containers included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from field_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from field_paths(item, (*prefix, i))


def mutated(doc, path, mutant):
    doc = json.loads(json.dumps(doc))
    if not path:
        return mutant
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if mutant is KeyError:
        del parent[path[-1]]
    else:
        parent[path[-1]] = mutant
    return doc


def check_load(path: Path, outside: Path, before: dict) -> str:
    """load() either works or raises a one-line CheckpointError; nothing outside path changes."""
    try:
        load(path, backend="numpy")
        result = "ok"
    except CheckpointError as exc:
        assert "\n" not in str(exc) and exc.hint, str(exc)
        result = "error"
    assert tree(outside) == before
    return result


def test_10_fuzz_meta_json_every_field(run_dir, tmp_path):
    path = run_dir / "latest"
    original = json.loads((path / "meta.json").read_text())
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("keep")
    before = tree(tmp_path / "victim")
    results = {"ok": 0, "error": 0}
    for field in list(field_paths(original)):
        for mutant in [*MUTANTS, KeyError] if field else MUTANTS:
            doc = mutated(original, field, mutant)
            (path / "meta.json").write_text(json.dumps(doc))
            results[check_load(path, tmp_path / "victim", before)] += 1
    (path / "meta.json").write_text(DEEP)
    results[check_load(path, tmp_path / "victim", before)] += 1
    (path / "meta.json").write_bytes(b"\xff\xfe{}")
    results[check_load(path, tmp_path / "victim", before)] += 1
    assert results["error"] > 500 and results["ok"] > 0, results


def test_10_fuzz_tokenizer_json_every_field(run_dir, tmp_path):
    path = run_dir / "latest"
    original = json.loads((path / "tokenizer.json").read_text())
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("keep")
    before = tree(tmp_path / "victim")
    results = {"ok": 0, "error": 0}
    chars = original["chars"]
    extra = [chars[:-1], chars + "Z", chars[:-1] + chars[0], chars[::-1], DEEP]
    for field in list(field_paths(original)):
        for mutant in [*MUTANTS, *extra, KeyError] if field else [*MUTANTS, *extra]:
            raw = (
                json.dumps(mutated(original, field, mutant)).encode() if mutant is not DEEP or field else DEEP.encode()
            )
            (path / "tokenizer.json").write_bytes(raw)
            sha = hashlib.sha256(raw).hexdigest()
            rewrite_meta(
                path, lambda m, raw=raw, sha=sha: m["files"]["tokenizer.json"].update(bytes=len(raw), sha256=sha)
            )
            results[check_load(path, tmp_path / "victim", before)] += 1
    assert results["error"] > 40 and results["ok"] > 0, results


def test_10_forged_sizes_are_refused_before_allocation(run_dir):
    import tracemalloc

    path = run_dir / "latest"
    original = json.loads((path / "meta.json").read_text())["model"]
    for field, value in [("n_layer", 10**9), ("d_model", 2**20), ("vocab_size", 10**6), ("ctx", 10**7),
                         ("mlp_hidden", 10**8), ("n_layer", 1e9)]:  # fmt: skip
        rewrite_meta(path, lambda m, f=field, v=value: m["model"].update({f: v}))
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError):
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 2 and peak < 50 * 2**20, (field, peak)
        rewrite_meta(path, lambda m, f=field: m["model"].update({f: original[f]}))
    for step in (-5, 7.9, "3", True):
        rewrite_meta(path, lambda m, s=step: m["state"].update(step=s))
        with pytest.raises(CheckpointError, match="state.step must be an integer"):
            load(path)


def test_10_malformed_checkpoints_give_one_line_errors_in_the_cli(capsys, run_dir):
    path = run_dir / "latest"
    edits = [
        lambda m: m.update(model=[1]),
        lambda m: m["state"].update(rng="x"),
        lambda m: m.update(files={"model.safetensors": []}),
        lambda m: m["model"].update(n_layer=10**9),
    ]
    for edit in edits:
        original = (path / "meta.json").read_text()
        rewrite_meta(path, edit)
        for argv in (["info", path], ["sample", "--checkpoint", path, "--max-new-tokens", "3"],
                     ["train", "--resume", path, "--until", "12"]):  # fmt: skip
            code, _, err = run(capsys, *argv)
            assert_clean_error(code, err, str(path))
        (path / "meta.json").write_text(original)


def test_11_the_write_probe_never_follows_a_planted_link(corpus, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    out = tmp_path / "run"
    out.mkdir()
    (out / f".write-test-{os.getpid()}").symlink_to(victim)
    check_writable(out)  # what `fastchar train` and Trainer.train call first
    assert victim.read_text() == "another user's file"
    (out / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="cannot lock the run folder"):
        runfolder.RunLock(out).acquire()
    assert victim.read_text() == "another user's file"


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [("--weight-decay", "nan"), ("--weight-decay", "inf"), ("--eps", "inf"), ("--grad-clip", "nan"),
     ("--time-budget", "nan"), ("--lr", "inf"), ("--min-lr", "-inf"), ("--dropout", "nan"), ("--betas", "nan")],
)  # fmt: skip
def test_12_non_finite_options_are_refused_at_parse_time(capsys, corpus, tmp_path, flag, value):
    extra = [flag, value, "0.9"] if flag == "--betas" else [f"{flag}={value}"]
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "2", "--backend", "numpy",
              *TINY, *extra])  # fmt: skip
    err = capsys.readouterr().err
    assert info.value.code == 2 and "expected a finite number" in err and "hint: " in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "field, value",
    [("weight_decay", math.nan), ("weight_decay", math.inf), ("eps", math.inf), ("grad_clip", math.nan),
     ("time_budget", math.nan), ("lr", math.inf), ("lr", "0.1"), ("betas", (math.nan, 0.9)), ("batch", 4.0),
     ("seed", True), ("out", None)],
)  # fmt: skip
def test_12_train_config_refuses_non_finite_and_mistyped_values(field, value):
    with pytest.raises(ConfigError, match=field) as info:
        TrainConfig(**{field: value})
    assert info.value.hint


def test_13_sample_with_a_negative_seed(capsys, run_dir):
    code, out, err = run(capsys, "sample", "--checkpoint", run_dir / "best", "--seed", "-1", "--backend", "numpy")
    assert_clean_error(code, err, "seed must be an integer >= 0")
    assert out == ""
    model = load(run_dir / "best")
    with pytest.raises(ConfigError, match="seed"):
        "".join(stream(model, model.tokenizer, "the", 5, seed=-1))


def test_13_full_disk_during_a_save(capsys, corpus, run_dir, monkeypatch):
    from safetensors import SafetensorError

    before = tree(run_dir / "latest")

    def disk_full(*args, **kwargs):
        msg = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        raise SafetensorError(msg)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    code, _, err = run(capsys, "train", "--resume", run_dir / "latest", "--steps", "15", "--backend", "numpy",
                       "--sample-chars", "0")  # fmt: skip
    assert_clean_error(code, err, "No space left on device")
    assert "was left as it was" in err
    assert tree(run_dir / "latest") == before and not leftovers(run_dir)


@pytest.mark.parametrize("argv", [["--batch", "1000000"], ["--d-model", "100000", "--n-head", "4"]])
def test_13_huge_runs_are_refused_with_a_figure(capsys, corpus, tmp_path, argv):
    code, _, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "r", "--backend", "numpy", *argv)
    assert_clean_error(code, err, "MiB")
    assert "is available" in err


def test_13_memory_error_is_reported_not_raised(capsys, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(runfolder, "available_bytes", lambda: None)  # no estimate: the allocation fails
    import fastchar.model

    def oom(*args, **kwargs):
        raise MemoryError("Unable to allocate 120. GiB for an array with shape (32212254720,)")

    monkeypatch.setattr(fastchar.model, "Arena", oom)
    code, _, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "r", "--backend", "numpy", *TINY)
    assert_clean_error(code, err, "out of memory: Unable to allocate 120. GiB")


def test_14_memory_estimate_covers_the_arenas_and_refuses_what_does_not_fit(corpus, tmp_path):
    cfg = ModelConfig(vocab_size=65)
    fixed, per_seq = runfolder.training_bytes(cfg, 12)
    model = Model(cfg, backend="numpy")
    model.forward(np.zeros((12, 64), np.int32), np.zeros((12, 64), np.int32))
    arenas = sum(a.nbytes for a in (model.params, model.grads, model.adam_m, model.adam_v, model.acts, model.dacts))
    assert arenas <= fixed + 12 * per_seq <= 2 * arenas + runfolder.BASE_BYTES
    available = 8 * 2**30
    with pytest.raises(ConfigError, match=r"needs about [\d,]+ MiB .* only 8,192 MiB is available") as info:
        runfolder.check_memory(cfg, 4400, available=available)
    fits = int(info.value.hint.split("--batch ")[1].split()[0])
    assert fixed + fits * per_seq <= available < fixed + (fits + 1) * per_seq
    runfolder.check_memory(cfg, fits, available=available)


def test_15_trainer_refuses_a_dataset_with_other_characters(corpus, tmp_path):
    ds = TextDataset(corpus)
    model = Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend="numpy")
    model.tokenizer = ds.tokenizer
    shifted = "".join(chr(ord(c) + 1) if c.isalpha() else c for c in corpus.read_text())
    other = TextDataset.from_text(shifted)
    assert other.vocab_size == ds.vocab_size
    with pytest.raises(ConfigError, match="characters differ from the model's vocabulary"):
        Trainer(model, other, TrainConfig(out=str(tmp_path / "r")), log=lambda s: None)
    assert model.tokenizer is ds.tokenizer


def test_16_a_corpus_without_newlines_trains_and_samples(capsys, tmp_path):
    data = tmp_path / "flat.txt"
    data.write_text("abc def ghi jkl. " * 300)
    code, out, err = run(capsys, "train", "--data", data, "--out", tmp_path / "r", "--steps", "5", "--eval-every",
                         "5", "--backend", "numpy", *TINY[:-2], "--sample-chars", "20")  # fmt: skip
    assert code == 0, err
    assert "--- sample" in out
    code, out, err = run(capsys, "sample", "--checkpoint", tmp_path / "r" / "best", "--max-new-tokens", "5",
                         "--seed", "0", "--backend", "numpy")  # fmt: skip
    assert code == 0, err


def test_17_prompt_and_prompt_file_are_exclusive(capsys, run_dir, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("the")
    with pytest.raises(SystemExit) as info:
        main(["sample", "--checkpoint", str(run_dir / "best"), "--prompt", "a", "--prompt-file", str(prompt)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "not allowed with argument" in err and "hint: " in err, err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--lr", "-1"], ["train", "--batch", "0"], ["train", "--n-head", "5"], ["train", "--threads", "0"],
        ["train", "--backend", "gpu"], ["train", "--until", "0"], ["train", "--sample-chars", "-1"],
        ["train", "--warmup", "-1"], ["train", "--min-lr", "1"], ["train", "--dropout", "1"],
        ["train", "--betas", "1", "0.9"], ["train", "--data", "/nonexistent.txt"],
        ["train", "--resume", "/nonexistent"], ["sample", "--checkpoint", "/nonexistent"],
        ["sample", "--top-p", "1.5"], ["sample", "--top-k", "0"], ["sample", "--num-samples", "0"],
        ["sample", "--ctx", "0"], ["sample", "--ctx", "17"], ["sample", "--temperature", "-1"],
        ["sample", "--prompt", "QQ€"], ["sample", "--prompt-file", "/nonexistent"], ["info", "/nonexistent"],
    ],
)  # fmt: skip
def test_18_every_user_error_has_a_hint(capsys, corpus, run_dir, tmp_path, argv):
    if argv[0] == "train" and "--resume" not in argv and "--data" not in argv:
        argv = [*argv, "--data", str(corpus)]
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "fresh")]
    if argv[0] == "sample" and "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", str(run_dir / "best")]
    code, _, err = run(capsys, *argv)
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), err


@pytest.mark.parametrize("argv", [["train", "--no-such-flag"], ["train", "--lr", "abc"], ["sample"], []])
def test_18_usage_errors_exit_2_with_a_hint(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error: " in err and "hint: " in err, err


# -- kill -9 during saves -----------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_saves_leaves_loadable_checkpoints(tmp_path):
    """20 kills while a save is in progress (scripts/kill_loop.py; about a minute on 2 busy cores)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kill_loop.py"), "--kills", "20", "--workdir", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["kills_during_save"] >= 20
    assert summary["loads_ok"] == summary["loads"] and summary["temporaries_after_start"] == 0

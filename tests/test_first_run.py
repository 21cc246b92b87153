"""A new user's first hour: training offline on the shipped corpus, run folders accepted wherever a
checkpoint is, loss curves (`fastchar plot`, curves.png, --tensorboard) and the README's quickstart."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastchar
from fastchar import data as data_module
from fastchar import plot as plot_module
from fastchar.checkpoint import resolve
from fastchar.cli import main
from fastchar.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "2", "--log-every", "5", "--backend", "numpy"]  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def offline(monkeypatch):
    """No FASTCHAR_DATA_DIR, and any download attempt fails at once (and is counted)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")

    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module.urllib.request, "urlopen", refuse)
    return attempts


def train_run(folder: Path, *extra: str) -> None:
    code = main(["train", "--data", str(data_module.SHIPPED_CORPUS), "--out", str(folder), "--steps", "20",
                 "--eval-every", "10", "--sample-chars", "0", *TINY, *extra])  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("runs") / "tiny"
    train_run(folder)
    return folder


# -- offline first run ------------------------------------------------------------------------


def test_first_command_trains_offline_from_another_folder(capsys, tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)  # no data/ here, and no FASTCHAR_DATA_DIR
    code, out, err = run(capsys, "train", "--steps", "20", "--eval-every", "10", "--sample-chars", "40", *TINY)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first == f"data: {data_module.SHIPPED_CORPUS} (the copy shipped with fastchar, md5 checked)"
    assert "text: 1,115,394 characters, vocabulary 65" in out
    sample = out.split("--- sample (temperature 0.8, seed 0) ---\n", 1)[1]
    assert len(sample.strip("\n")) >= 30
    assert (tmp_path / "runs" / "base" / "best" / "meta.json").is_file()
    assert not offline, "nothing was downloaded"


def test_first_line_names_each_source(capsys, tmp_path, monkeypatch, offline, corpus):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "r", "--steps", "2",
                         "--sample-chars", "0", *TINY)  # fmt: skip
    assert code == 0, err
    assert out.splitlines()[0] == f"data: {corpus} (--data)"
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    shutil.copy(corpus, env_dir / "tinyshakespeare.txt")
    monkeypatch.setenv("FASTCHAR_DATA_DIR", str(env_dir))
    code, out, err = run(capsys, "train", "--out", tmp_path / "r2", "--steps", "2", "--sample-chars", "0", *TINY)
    assert code == 0, err
    assert out.splitlines()[0] == f"data: {env_dir / 'tinyshakespeare.txt'} ($FASTCHAR_DATA_DIR)"


# -- run folders are checkpoints too ----------------------------------------------------------


def test_load_run_folder_says_which(run_dir):
    model = fastchar.load(run_dir, backend="numpy")
    assert model.checkpoint_path == run_dir / "best"
    assert model.checkpoint_note == f"{run_dir} is a run folder; using its best checkpoint {run_dir / 'best'}"
    direct = fastchar.load(run_dir / "best", backend="numpy")
    assert direct.checkpoint_note is None and np.array_equal(direct.params.flat, model.params.flat)
    latest = fastchar.load(run_dir, backend="numpy", which="latest")
    assert latest.checkpoint_path == run_dir / "latest" and "latest checkpoint" in latest.checkpoint_note
    assert latest.train_state["step"] == 20


def test_run_folder_falls_back_to_the_other_checkpoint(run_dir, tmp_path):
    only_latest = tmp_path / "only-latest"
    shutil.copytree(run_dir / "latest", only_latest / "latest")
    path, note = resolve(only_latest, "best")
    assert path == only_latest / "latest" and note.endswith("; it has no best/")


def test_neither_checkpoint_nor_run_folder(capsys, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"neither a checkpoint nor a run folder: meta.json is missing") as info:
        fastchar.load(tmp_path / "stuff")
    assert "best/" in str(info.value) and "latest/" in str(info.value) and "runs/base" in info.value.hint
    code, out, err = run(capsys, "sample", "--checkpoint", tmp_path / "stuff")
    assert code == 1 and err.startswith("error: ") and "no best/ or latest/" in err and "Traceback" not in err


def test_sample_and_info_accept_a_run_folder(capsys, run_dir):
    argv = ["--prompt", "the ", "--max-new-tokens", "30", "--seed", "2", "--backend", "numpy"]
    code, out, err = run(capsys, "sample", "--checkpoint", run_dir, *argv)
    assert code == 0, err
    assert err.strip() == f"checkpoint: {run_dir} is a run folder; using its best checkpoint {run_dir / 'best'}"
    code, direct, _ = run(capsys, "sample", "--checkpoint", run_dir / "best", *argv)
    assert code == 0 and direct == out, "the run folder samples from its best checkpoint"
    code, out, err = run(capsys, "info", run_dir, "--json")
    assert code == 0, err
    report = json.loads(out)["checkpoint"]
    assert report["path"] == str(run_dir / "best") and "using its best checkpoint" in report["picked"]
    assert "using its best checkpoint" in err


def test_resume_from_a_run_folder_takes_latest(capsys, tmp_path, run_dir):
    run_copy = tmp_path / "tiny"
    shutil.copytree(run_dir, run_copy)
    code, out, err = run(capsys, "train", "--resume", run_copy, "--steps", "25", "--out", run_copy,
                         "--sample-chars", "0", "--backend", "numpy")  # fmt: skip
    assert code == 0, err
    assert f"using its latest checkpoint {run_copy / 'latest'}" in err
    assert "resuming at step 20" in out and "done: step 25" in out


# -- curves -----------------------------------------------------------------------------------


def _colour_pixels(png: Path, hex_colour: str) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    target = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb.astype(int) - target).sum(axis=1) < 10).sum())


def test_plot_two_runs(capsys, tmp_path, run_dir):
    from PIL import Image

    other = tmp_path / "faster"
    train_run(other, "--lr", "3e-3", "--warmup", "5")
    capsys.readouterr()
    out_png = tmp_path / "figs" / "both.png"
    code, out, err = run(capsys, "plot", run_dir, other, "-o", out_png)
    assert code == 0, err
    assert out.strip() == f"wrote {out_png} (2 runs)"
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.size == (1200, 450)
    # matplotlib's first two cycle colours: one per run, both drawn
    assert _colour_pixels(out_png, "#1f77b4") > 500 and _colour_pixels(out_png, "#ff7f0e") > 500


def test_training_writes_curves_png(run_dir):
    from PIL import Image

    with Image.open(run_dir / "curves.png") as image:
        assert image.size == (1200, 450)
    assert _colour_pixels(run_dir / "curves.png", "#1f77b4") > 500


def test_read_metrics_replays_a_resumed_run(tmp_path):
    lines = [
        {"step": 0, "train_loss": 4.2, "val_loss": 4.2, "elapsed": 0.1},
        {"step": 10, "loss": 3.0, "lr": 1e-3, "elapsed": 1.0},
        {"step": 10, "train_loss": 3.1, "val_loss": 3.2, "elapsed": 1.2},  # latest saved here
        {"step": 20, "loss": 2.5, "lr": 1e-3, "elapsed": 2.0},  # then Ctrl-C before step 20's eval
        {"step": 20, "loss": 2.6, "lr": 1e-3, "elapsed": 2.1},  # resumed from step 10
        {"step": 20, "train_loss": 2.7, "val_loss": 2.8, "elapsed": 2.3},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 30, "loss": 2.'  # a torn last line
    (tmp_path / "metrics.jsonl").write_text(text)
    curves = plot_module.read_metrics(tmp_path)
    assert curves["train"] == [(10, 1.0, 3.0), (20, 2.1, 2.6)]
    assert curves["val"] == [(0, 0.1, 4.2), (10, 1.2, 3.2), (20, 2.3, 2.8)]


def test_read_metrics_reads_line_by_line(tmp_path):
    """A 40 MB metrics.jsonl (a 6 MB line and 34 MB of 64 KB unreadable ones) is read in pieces of at
    most plot.MAX_LINE bytes: the memory it takes stays a few MB, and its records still count."""
    import tracemalloc

    with open(tmp_path / "metrics.jsonl", "wb") as f:
        f.write(json.dumps({"step": 0, "train_loss": 4.0, "val_loss": 4.1, "elapsed": 0.5}).encode() + b"\n")
        f.write(b"x" * (6 << 20) + b"\n")
        f.write((b"y" * 65535 + b"\n") * 544)
        f.write(json.dumps({"step": 5, "loss": 3.0, "elapsed": 1.0}).encode() + b"\n")
    tracemalloc.start()
    try:
        curves = plot_module.read_metrics(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert curves == {"train": [(5, 1.0, 3.0)], "val": [(0, 0.5, 4.1)]}
    assert peak < 4 * plot_module.MAX_LINE


def test_plot_errors(capsys, tmp_path, monkeypatch, run_dir):
    code, out, err = run(capsys, "plot", tmp_path / "nothing")
    assert code == 1 and "error: run folder" in err and "does not exist" in err
    code, out, err = run(capsys, "plot", run_dir, "-o", tmp_path)  # a folder: it named a temporary file
    assert code == 1 and f"error: cannot write the image {tmp_path}: it is a folder" in err and ".tmp-" not in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code, out, err = run(capsys, "plot", run_dir, "-o", tmp_path / "x.png")
    assert code == 1 and "needs matplotlib" in err and 'pip install "fastchar[plot]"' in err
    assert not (tmp_path / "x.png").exists()


def test_training_without_matplotlib_or_with_a_broken_plot(capsys, tmp_path, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "a", "--steps", "5",
                         "--sample-chars", "0", *TINY)  # fmt: skip
    assert code == 0 and not (tmp_path / "a" / "curves.png").exists()
    monkeypatch.delitem(sys.modules, "matplotlib")

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plot_module, "plot_runs", broken)
    code, out, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "b", "--steps", "5",
                         "--sample-chars", "0", *TINY)  # fmt: skip
    assert code == 0 and "done: step 5" in out
    assert f"warning: could not write {tmp_path / 'b' / 'curves.png'}: no fonts" in err


def read_event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in folder's TensorBoard event files, read back with tensorboardX's own proto and
    record checksums (TFRecord framing: length, masked crc32c, payload, masked crc32c)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for file in files:
        raw, pos = file.read_bytes(), 0
        while pos < len(raw):
            header = raw[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", raw[pos + 8 : pos + 12])[0] == masked_crc32c(header)
            body = raw[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", raw[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
            pos += 16 + length
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_files_hold_the_metrics(capsys, tmp_path, corpus):
    out_dir = tmp_path / "tb"
    code, out, err = run(capsys, "train", "--data", corpus, "--out", out_dir, "--steps", "20", "--eval-every",
                         "10", "--sample-chars", "0", "--tensorboard", *TINY)  # fmt: skip
    assert code == 0, err
    scalars = read_event_scalars(out_dir)
    assert set(scalars) == {"loss/train", "loss/val", "loss/train_eval", "lr", "grad_norm", "tok_per_s",
                            "accuracy/val", "accuracy/train_eval"}  # fmt: skip
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    for field, tag in [("loss", "loss/train"), ("val_loss", "loss/val"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                       ("tok_per_s", "tok_per_s")]:  # fmt: skip
        expected = [(r["step"], r[field]) for r in records if field in r]
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6, err_msg=tag)
    assert [s for s, _ in scalars["loss/val"]] == [0, 10, 20]


def test_tensorboard_missing_is_an_error_before_training(capsys, tmp_path, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    code, out, err = run(capsys, "train", "--data", corpus, "--out", tmp_path / "r", "--tensorboard", *TINY)
    assert code == 1 and "needs tensorboardX" in err and 'pip install "fastchar[tensorboard]"' in err
    assert not (tmp_path / "r").exists(), "nothing was started"
    with pytest.raises(fastchar.ConfigError, match="tensorboardX"):
        fastchar.Trainer(fastchar.Model(fastchar.ModelConfig(vocab_size=3, d_model=8, n_head=2, n_layer=1, ctx=4),
                                        backend="numpy"),
                         fastchar.TextDataset.from_text("abc" * 40), fastchar.TrainConfig(out=str(tmp_path / "p")),
                         tensorboard=True)  # fmt: skip


# -- the README's Python quickstart -----------------------------------------------------------

QUICK_STEPS = 30


def readme_quickstart() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python quickstart has a ```python block"
    return match.group(1)


def test_readme_quickstart_runs(tmp_path):
    code = readme_quickstart()
    code, n = re.subn(r"\bsteps=\d+", f"steps={QUICK_STEPS}", code)
    assert n == 1, "the quickstart sets TrainConfig(steps=...) once"
    (tmp_path / "quickstart.py").write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "FASTCHAR_DATA_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    env["https_proxy"] = env["http_proxy"] = "http://127.0.0.1:9"  # no network: a download fails at once
    # 2 spinning OpenMP threads on a busy 2-core machine made 30 steps take 50 s instead of 2 s;
    # sleeping waiters keep this test's time about the work it does.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    result = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"step {QUICK_STEPS:>6}" in out
    assert re.search(r"^\d+\.\d+$", out, re.M), "summary['val_loss'] was printed"
    assert "ROMEO:" in out
    note = "runs/quick is a run folder; using its best checkpoint runs/quick/best\n"
    assert note in out, "fastchar.load(run folder) says which checkpoint it took"
    assert len(out.split(note, 1)[1]) == 100, "stream printed 100 characters"
    assert (tmp_path / "runs" / "quick" / "mine" / "meta.json").is_file()
    assert (tmp_path / "runs" / "quick" / "curves.png").is_file()

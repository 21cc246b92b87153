"""Next-character accuracy beside every loss: computed in evaluation (argmax of the logits equals the
target), in every backend, summed over ranks under MPI, and shown in the evaluation log line,
metrics.jsonl, the done line, checkpoints and `fastchar info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastchar import Model, ModelConfig, TextDataset, TrainConfig, Trainer, load
from fastchar.cli import main
from fastchar.distributed import World
from fastchar.train import EVAL_SEED

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(d_model=32, n_layer=1, n_head=4, ctx=16, mlp_hidden=128)
TINY = ["--d-model", "32", "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4",
        "--eval-batches", "3", "--log-every", "5", "--sample-chars", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained 60 steps (numpy backend): its predictions are far better than chance."""
    from conftest import PANGRAMS

    folder = tmp_path_factory.mktemp("acc")
    (folder / "corpus.txt").write_text(PANGRAMS * 100, encoding="utf-8")
    data = TextDataset(folder / "corpus.txt")
    model = Model(ModelConfig(vocab_size=data.vocab_size, **SMALL), backend="numpy", seed=0)
    cfg = TrainConfig(batch=8, steps=60, warmup=5, lr=1e-2, eval_every=60, eval_batches=2, out=str(folder / "run"))
    Trainer(model, data, cfg, log=lambda line: None, progress=False, curves=False).train()
    return folder / "run" / "latest", data


def expected_accuracy(model: Model, data: TextDataset, cfg: TrainConfig, split: str) -> float:
    """The fraction of positions whose argmax logit is the target, counted one position at a time."""
    rng = np.random.default_rng([EVAL_SEED, cfg.seed])
    hits = total = 0
    model.eval()
    for _ in range(cfg.eval_batches):
        x, y = data.get_batch(split, cfg.batch, model.cfg.ctx, rng)
        model.forward(x)  # logits only, no loss
        logits = model.logits
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                hits += int(max(range(logits.shape[2]), key=lambda v: (logits[b, t, v], -v)) == y[b, t])
                total += 1
    model.train()
    return hits / total


def test_evaluation_accuracy_in_every_backend(backend, trained, tmp_path):
    path, data = trained
    model = load(path, backend=backend)
    cfg = TrainConfig(batch=8, eval_batches=5, out=str(tmp_path / "x"))
    result = Trainer(model, data, cfg, log=lambda line: None, progress=False, curves=False).evaluate()
    for split in ("train", "val"):
        assert result[f"{split}_acc"] == expected_accuracy(model, data, cfg, split)
        assert result[f"{split}_acc"] > 3 / data.vocab_size, "a trained model beats chance by far"
    reference = Trainer(load(path, backend="numpy"), data, cfg, log=lambda line: None, progress=False).evaluate()
    positions = cfg.eval_batches * cfg.batch * model.cfg.ctx
    for split in ("train_acc", "val_acc"):  # a near tie may flip between backends, rarely
        assert abs(result[split] - reference[split]) <= 2 / positions


class HalfWorld(World):
    """Rank `rank` of two, whose sum over the ranks is recorded (the other rank adds its share)."""

    size = 2

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.is_root, self.sent = rank, rank == 0, []

    def sum_scalars(self, values: list[float]) -> list[float]:
        self.sent.append(list(values))
        return [float(v) for v in values]


def test_accuracy_is_summed_over_ranks_like_the_loss(trained, tmp_path):
    path, data = trained
    cfg = TrainConfig(batch=8, eval_batches=5, out=str(tmp_path / "x"))
    # two ranks of batch 8 evaluate the sequences one process of batch 16 does (rank r: rows r*8..r*8+7)
    one = TrainConfig(batch=16, eval_batches=5, out=str(tmp_path / "y"))
    whole = Trainer(load(path, backend="numpy"), data, one, log=lambda line: None, progress=False).evaluate()
    worlds = [HalfWorld(0), HalfWorld(1)]
    for dist in worlds:
        model = load(path, backend="numpy")
        trainer = Trainer(model, data, cfg, log=lambda line: None, progress=False, dist=dist)
        trainer.evaluate()
    summed = np.sum([w.sent[-1] for w in worlds], axis=0)  # what an Allreduce of both ranks gives
    positions = cfg.eval_batches * one.batch * SMALL["ctx"]
    assert summed[2] / positions == whole["train_acc"] and summed[3] / positions == whole["val_acc"]
    assert summed[1] / (2 * cfg.eval_batches) == pytest.approx(whole["val"], rel=1e-6)
    shares = [w.sent[-1][3] for w in worlds]
    assert all(0 < s < summed[3] for s in shares), "each rank counted its own batches"


def test_accuracy_in_the_log_metrics_checkpoint_and_info(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    code = main(["train", "--data", str(corpus), "--out", str(out), "--steps", "10", "--eval-every", "5",
                 "--backend", "numpy", *TINY])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    evals = [line for line in stdout.splitlines() if line.startswith("eval step")]
    assert len(evals) == 3 and all("(acc " in line and line.count(" %)") == 2 for line in evals)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluated] == [0, 5, 10]
    assert all(0 <= r["train_acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in evaluated)
    last = evaluated[-1]
    assert f"(acc {100 * last['val_acc']:.1f} %)" in evals[-1]
    assert f"val acc {100 * last['val_acc']:.1f} %" in stdout.split("done:")[1]
    state = load(out / "latest").train_state
    assert state["last_eval"]["val_acc"] == last["val_acc"] and state["last_eval"]["train_loss"] == last["train_loss"]
    assert main(["info", str(out / "latest")]) == 0
    info = capsys.readouterr().out
    assert f"val {last['val_loss']:.4f} (next-character accuracy {100 * last['val_acc']:.1f} %)" in info
    assert main(["info", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    best = report["checkpoint"]
    assert best["best_val_acc"] == best["last_eval"]["val_acc"]  # best/ was saved by the evaluation that made it best


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpi_missing() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    return "" if _mpiexec() else "no mpiexec on PATH"


@pytest.mark.skipif(bool(_mpi_missing()) and os.environ.get("FASTCHAR_REQUIRE_MPI") != "1", reason=_mpi_missing())
def test_two_ranks_report_the_accuracy_of_one_process(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTCHAR_MPI_TIMEOUT": "30"}
    argv = ["-m", "fastchar", "train", "--data", str(corpus), "--steps", "4", "--eval-every", "4", "--backend",
            "numpy", "--threads", "1", *TINY]  # fmt: skip
    two = subprocess.run([_mpiexec(), "-n", "2", sys.executable, *argv, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr
    # two ranks of --batch 4 evaluate the sequences of one process of --batch 8
    one = subprocess.run([sys.executable, *argv, "--batch", "8", "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr

    def step0(folder: str) -> dict:
        return json.loads((tmp_path / folder / "metrics.jsonl").read_text().splitlines()[0])

    a, b = step0("two"), step0("one")
    assert a["step"] == b["step"] == 0
    assert a["val_acc"] == b["val_acc"] and a["train_acc"] == b["train_acc"]  # counts: exact
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)

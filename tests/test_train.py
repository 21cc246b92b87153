"""The training loop: it learns, it is deterministic, it resumes exactly, and it fails safely."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from conftest import reference_fast_compiled_slow

from fastchar import ConfigError, Model, ModelConfig, TextDataset, TrainConfig, Trainer, TrainingDiverged, load
from fastchar.optim import lr_at

SMALL = dict(d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=128)


def make(corpus, tmp_path, backend="numpy", name="run", **train):
    ds = TextDataset(corpus)
    cfg = ModelConfig(vocab_size=ds.vocab_size, **SMALL)
    defaults = dict(batch=8, steps=60, warmup=10, eval_every=20, eval_batches=2, log_every=20, out=str(tmp_path / name))
    tcfg = TrainConfig(**{**defaults, **train})
    model = Model(cfg, backend=backend, seed=tcfg.seed)
    return Trainer(model, ds, tcfg, log=lambda line: None, progress=False)


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(999, cfg) == pytest.approx(1e-4)
    mid = lr_at(100 + (999 - 100) // 2, cfg)
    assert 5e-4 < mid < 6.1e-4
    assert lr_at(500, cfg, progress=1.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("backend", reference_fast_compiled_slow())
def test_short_run_learns(corpus, tmp_path, backend):
    trainer = make(corpus, tmp_path, backend=backend, steps=150, lr=3e-3, eval_every=150)
    summary = trainer.train()
    start = np.mean(trainer.losses[:5])
    end = np.mean(trainer.losses[-10:])
    assert start > 2.5, f"an untrained model starts near ln(V), got {start:.3f}"
    assert end < 0.6 * start, f"loss fell only from {start:.3f} to {end:.3f}"
    assert summary["val_loss"] < 0.6 * start
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert any('"val_loss"' in line for line in lines) and any('"tok_per_s"' in line for line in lines)


@pytest.mark.parametrize("backend", reference_fast_compiled_slow())
def test_same_seed_bitwise_identical(corpus, tmp_path, backend):
    a = make(corpus, tmp_path, backend=backend, name="a", steps=30)
    b = make(corpus, tmp_path, backend=backend, name="b", steps=30)
    a.train()
    b.train()
    assert a.losses == b.losses
    assert np.array_equal(a.model.params.flat, b.model.params.flat)


@pytest.mark.parametrize("backend", reference_fast_compiled_slow())
def test_resume_is_bitwise_identical(corpus, tmp_path, backend):
    whole = make(corpus, tmp_path, backend=backend, name="whole", steps=200, eval_every=50)
    whole.train()
    first = make(corpus, tmp_path, backend=backend, name="split", steps=200, eval_every=50)
    first.train(until=100)
    model = load(tmp_path / "split" / "latest", backend=backend)
    assert model.train_state["step"] == 100
    second = Trainer(
        model, TextDataset(corpus), TrainConfig.from_dict(model.train_cfg), log=lambda s: None, progress=False
    )
    second.train()
    assert first.losses + second.losses == whole.losses
    assert np.array_equal(second.model.params.flat, whole.model.params.flat)
    assert np.array_equal(second.model.adam_v.flat, whole.model.adam_v.flat)


def test_keeps_best_and_latest(corpus, tmp_path):
    trainer = make(corpus, tmp_path, steps=40, eval_every=20)
    trainer.train()
    best, latest = load(tmp_path / "run" / "best"), load(tmp_path / "run" / "latest")
    assert latest.train_state["step"] == 40
    assert best.train_state["best_val"] == pytest.approx(trainer.best_val)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    trainer = make(corpus, tmp_path, steps=60, eval_every=20)
    trainer.train(until=20)
    good = load(tmp_path / "run" / "latest")
    resumed = Trainer(good, TextDataset(corpus), trainer.cfg, log=lambda s: None, progress=False)
    resumed.model.params["lm_head"][0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match="at step 21") as info:
        resumed.train()
    assert "latest" in info.value.hint
    kept = load(tmp_path / "run" / "latest")
    assert kept.train_state["step"] == 20
    assert np.all(np.isfinite(kept.params.flat))


def test_ctrl_c_saves_a_checkpoint(corpus, tmp_path):
    from fastchar.train import Interrupted

    trainer = make(corpus, tmp_path, steps=60, eval_every=50)
    trainer.log = lambda line: line.startswith("step") and trainer._request_stop(2, None)  # Ctrl-C at step 20
    with pytest.raises(Interrupted, match="interrupted at step 20"):
        trainer.train()
    assert load(tmp_path / "run" / "latest").train_state["step"] == 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_fails_before_training(corpus, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    trainer = make(corpus, tmp_path, name="locked/run")
    with pytest.raises(ConfigError, match="not writable"):
        trainer.train()
    assert trainer.step == 0


def test_unwritable_out_as_a_file_fails_before_training(corpus, tmp_path):
    (tmp_path / "afile").write_text("x")
    trainer = make(corpus, tmp_path, name="afile/run")
    with pytest.raises(ConfigError, match="not writable"):
        trainer.train()
    assert trainer.step == 0 and math.isinf(trainer.best_val)


def test_time_budget_stops_on_wall_clock_and_stretches_the_schedule(corpus, tmp_path):
    trainer = make(corpus, tmp_path, steps=10**6, warmup=2, eval_every=10**6, time_budget=1.5)
    lrs = []
    trainer.log = lambda line: lrs.append(line)
    summary = trainer.train()
    assert 1.2 <= summary["elapsed"] < 10, summary["elapsed"]  # the final evaluation fits inside the budget
    assert 10 < trainer.step < 10**6
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lr" in r]
    assert steps[-1]["lr"] < 0.5 * trainer.cfg.lr, "the cosine decays over the budget, not over `steps`"
    assert load(tmp_path / "run" / "best").train_state["step"] == trainer.step

"""Gradient accumulation: K micro-batches of B sequences make the same step as one batch of K*B.

The global batch is drawn in one call whatever K is, so both runs train on the same sequences; only
the order of the sums differs (K partial gradients added, against one matmul over K*B rows).
Tolerances: float64 (numpy backend) agrees to ~1e-15, so 1e-12 catches any wrong scale or slice;
float32 agrees to ~1e-8 relative in the loss and ~1e-7 in the weights after 50 AdamW steps, tested
at 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastchar import ConfigError, Model, ModelConfig, TextDataset, TrainConfig, Trainer

SMALL = dict(d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=128)


def train(corpus, tmp_path, backend, dtype=np.float32, **train_cfg):
    ds = TextDataset(corpus)
    cfg = TrainConfig(steps=50, warmup=5, eval_every=1000, eval_batches=2, log_every=1000,
                      out=str(tmp_path / "run"), **train_cfg)  # fmt: skip
    model = Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend=backend, seed=cfg.seed, dtype=dtype)
    trainer = Trainer(model, ds, cfg, log=lambda line: None, progress=False, overwrite=True)  # runs reuse one folder
    trainer.train()
    return np.array(trainer.losses), model


def test_micro_batches_equal_one_batch_float64(corpus, tmp_path):
    whole, a = train(corpus, tmp_path, "numpy", np.float64, batch=8)
    micro, b = train(corpus, tmp_path, "numpy", np.float64, batch=2, grad_accum=4)
    np.testing.assert_allclose(micro, whole, rtol=1e-12)
    np.testing.assert_allclose(b.params.flat, a.params.flat, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b.adam_v.flat, a.adam_v.flat, rtol=1e-9, atol=1e-20)


def test_micro_batches_equal_one_batch(corpus, tmp_path, backend):
    whole, a = train(corpus, tmp_path, backend, batch=8)
    micro, b = train(corpus, tmp_path, backend, batch=4, grad_accum=2)
    np.testing.assert_allclose(micro, whole, rtol=1e-5)
    np.testing.assert_allclose(b.params.flat, a.params.flat, rtol=0, atol=1e-5)


def test_micro_batches_are_not_one_micro_batch(corpus, tmp_path):
    """The comparison above can fail: dropping the accumulation (batch 4 alone) gives another curve."""
    whole, _ = train(corpus, tmp_path, "numpy", batch=8)
    alone, _ = train(corpus, tmp_path, "numpy", batch=4)
    assert np.abs(alone - whole).max() > 1e-3


def test_resume_with_grad_accum_is_exact(corpus, tmp_path):
    from fastchar import load

    whole, a = train(corpus, tmp_path / "a", "numpy", batch=2, grad_accum=3)
    ds = TextDataset(corpus)
    cfg = TrainConfig(batch=2, grad_accum=3, steps=50, warmup=5, eval_every=25, eval_batches=2, log_every=1000,
                      out=str(tmp_path / "b"))  # fmt: skip
    first = Trainer(Model(ModelConfig(vocab_size=ds.vocab_size, **SMALL), backend="numpy", seed=0), ds, cfg,
                    log=lambda line: None, progress=False)  # fmt: skip
    first.train(until=25)
    model = load(tmp_path / "b" / "latest", backend="numpy")
    assert model.train_cfg["grad_accum"] == 3
    second = Trainer(model, ds, TrainConfig.from_dict(model.train_cfg), log=lambda line: None, progress=False)
    second.train()
    assert first.losses + second.losses == whole.tolist()
    assert np.array_equal(model.params.flat, a.params.flat)


def test_grad_accum_must_be_positive():
    with pytest.raises(ConfigError, match="grad_accum"):
        TrainConfig(grad_accum=0)

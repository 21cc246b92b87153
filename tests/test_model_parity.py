"""Whole-model parity: every backend from the same weights gives the reference's loss, logits and
every named gradient, and the same loss curve over 10 AdamW steps. Optional: PyTorch as an oracle.

Tolerances: float32 kernels that sum in another order (BLAS blocking, threads, fastmath) differ from
the reference by a few ulps per op; over 4 layers that stays near 1e-5 relative for the loss and
logits. Gradients are compared relative to each tensor's largest entry (1e-3), since entries near
zero have no meaningful relative error. Over 10 Adam steps the normalised update amplifies such
differences where |g| is tiny, so the loss curves agree to 1e-4 relative.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import compiled_backends

from fastchar import Model, ModelConfig, TrainConfig
from fastchar.arena import param_specs
from fastchar.optim import AdamW, lr_at

CFG = ModelConfig(vocab_size=13, d_model=36, n_layer=2, n_head=6, ctx=11, mlp_hidden=144)
BASE = ModelConfig()


def batch(cfg, B, seed):
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, cfg.ctx)), r.integers(0, cfg.vocab_size, (B, cfg.ctx))


def assert_same_model_step(cfg, backend_name, B):
    ref = Model(cfg, backend="numpy", seed=0)
    other = Model(cfg, backend=backend_name, seed=0)
    assert np.array_equal(ref.params.flat, other.params.flat)
    x, y = batch(cfg, B, 1)
    loss_ref, loss = ref.forward(x, y), other.forward(x, y)
    assert loss == pytest.approx(loss_ref, rel=1e-5), f"{backend_name}: loss {loss} vs {loss_ref}"
    np.testing.assert_allclose(other.logits, ref.logits, rtol=1e-4, atol=1e-4, err_msg=f"{backend_name}: logits")
    ref.backward()
    other.backward()
    for name, _ in param_specs(cfg):
        want, got = ref.grads[name], other.grads[name]
        scale = float(np.max(np.abs(want)))
        diff = float(np.max(np.abs(got - want)))
        assert diff <= 1e-3 * scale + 1e-7, f"{backend_name}: grad {name} max abs diff {diff:.3g} (max |g| {scale:.3g})"


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_parity_small(backend_name):
    assert_same_model_step(CFG, backend_name, B=3)


# Head size 16: the vectorised attention kernels run (CFG's head size 6 keeps the Cython ones).
CFG16 = ModelConfig(vocab_size=13, d_model=32, n_layer=2, n_head=2, ctx=21, mlp_hidden=80)


@pytest.mark.skipif("cython" not in compiled_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("cfg", [CFG, CFG16, ModelConfig(**{**CFG16.to_dict(), "dropout": 0.2})], ids=str)
def test_parity_on_every_isa_path(isa_path, cfg):
    """The cython backend on each instruction-set path (its products and attention) against the
    reference, with the tolerances above: the paths differ only in the order of fp32 sums."""
    plan = Model(cfg, backend="cython", seed=0)._plan_kernels
    home = {name: getattr(getattr(fn, "func", fn), "__module__", "") for name, (fn, _) in plan.items()}
    planned = {name for name, module in home.items() if module == "fastchar._gemm"}  # fastchar._gemm's kernels
    vector = isa_path != "generic"
    assert ("matmul_forward" in planned) == vector, planned
    assert ("attention_dropout_backward" in planned) == (vector and cfg.d_model // cfg.n_head == 16), planned
    # x86-64: the element-wise kernels compiled for AVX2 + FMA on the vector paths only
    avx2_module = vector and importlib.util.find_spec("fastchar._cykernels_avx2") is not None
    assert (home.get("relu2_forward") == "fastchar._cykernels_avx2") == avx2_module, home
    assert_same_model_step(cfg, "cython", B=3)


OVERWRITE_CFGS = [
    CFG16,
    ModelConfig(**{**CFG16.to_dict(), "dropout": 0.2}),
    ModelConfig(**{**CFG16.to_dict(), "activation": "gelu", "tie_embeddings": True, "position": "rope",
                   "norm": "layernorm"}),
]  # fmt: skip


@pytest.mark.skipif("cython" not in compiled_backends(), reason="the cython backend is not built")
@pytest.mark.parametrize("cfg", OVERWRITE_CFGS, ids=str)
def test_first_writers_overwrite_unzeroed_gradients(isa_path, cfg):
    """The plan binds "@overwrite" variants where a backward op writes its input gradients first, and
    the model leaves those slots unzeroed: with every activation gradient poisoned (NaN) before the
    backward, the gradients still match the reference's, so each such slot is written before it is
    read and no zeroed slot was skipped."""
    from fastchar.graph import OVERWRITE

    model = Model(cfg, backend="cython", seed=0)
    model.train()
    plan = model.plan(3, dropout=cfg.dropout > 0)
    assert plan.overwritten, "no backward op of the cython plan overwrites its input gradients"
    assert any(s.kernel.endswith(OVERWRITE) for s in plan.steps)
    ref = Model(cfg, backend="numpy", seed=0)
    ref.train()
    x, y = batch(cfg, 3, 1)
    for m in (ref, model):
        m.forward(x, y)
        m.dacts.flat[:] = np.nan
        m.backward()
    for name, _ in param_specs(cfg):
        want, got = ref.grads[name], model.grads[name]
        scale = float(np.max(np.abs(want)))
        assert np.all(np.isfinite(got)), f"grad {name}: an unzeroed slot was read before it was written"
        assert float(np.max(np.abs(got - want))) <= 1e-3 * scale + 1e-7, f"grad {name}"


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_parity_base_model(backend_name):
    assert_same_model_step(BASE, backend_name, B=4)


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_ten_adamw_steps_match(backend_name):
    tcfg = TrainConfig(steps=10, warmup=2, lr=3e-3)
    curves = {}
    for name in ("numpy", backend_name):
        model = Model(CFG, backend=name, seed=0)
        opt = AdamW(model, tcfg)
        losses = []
        x, y = batch(CFG, 4, 100)  # one batch, so the loss must fall
        for step in range(10):
            losses.append(model.forward(x, y))
            model.backward()
            opt.step(lr_at(step, tcfg))
        curves[name] = losses
    np.testing.assert_allclose(curves[backend_name], curves["numpy"], rtol=1e-4, err_msg=f"{backend_name} loss curve")
    assert curves["numpy"][-1] < curves["numpy"][0], "the loss falls over 10 steps"


def test_torch_oracle():
    torch = pytest.importorskip("torch")
    from fastchar.torch_model import TorchGPT

    model = Model(CFG, backend="numpy", seed=0, dtype=np.float64)
    x, y = batch(CFG, 3, 2)
    loss = model.forward(x, y)
    model.backward()
    ref = TorchGPT(CFG).double()
    with torch.no_grad():
        for name in ref.names:
            ref.p(name).copy_(torch.from_numpy(model.params[name]))
    logits, tloss = ref(torch.from_numpy(x), torch.from_numpy(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-10)
    np.testing.assert_allclose(model.logits, logits.detach().numpy(), rtol=1e-9, atol=1e-10)
    for name in ref.names:
        np.testing.assert_allclose(model.grads[name], ref.p(name).grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=name)


DROP = ModelConfig(vocab_size=13, d_model=36, n_layer=2, n_head=6, ctx=11, mlp_hidden=144, dropout=0.25)


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_dropout_matches_reference(backend_name):
    """Same seed, same masks: loss and every gradient equal the reference's, over two steps."""
    ref, other = Model(DROP, backend="numpy", seed=5), Model(DROP, backend=backend_name, seed=5)
    for step in range(2):
        x, y = batch(DROP, 3, 10 + step)
        assert other.forward(x, y) == pytest.approx(ref.forward(x, y), rel=1e-5), f"{backend_name} step {step}"
        ref.backward()
        other.backward()
        for name, _ in param_specs(DROP):
            scale = float(np.max(np.abs(ref.grads[name])))
            diff = float(np.max(np.abs(other.grads[name] - ref.grads[name])))
            assert diff <= 1e-3 * scale + 1e-7, f"{backend_name}: grad {name} max abs diff {diff:.3g}"


def test_dropout_changes_training_but_not_evaluation(backend):
    plain = Model(ModelConfig(**{**DROP.to_dict(), "dropout": 0.0}), backend=backend, seed=5)
    dropped = Model(DROP, backend=backend, seed=5)
    x, y = batch(DROP, 3, 1)
    train_losses = {dropped.forward(x, y) for _ in range(3)}
    assert len(train_losses) == 3, "each training forward draws new masks"
    assert plain.forward(x, y) not in train_losses
    dropped.eval()
    assert dropped.forward(x, y) == pytest.approx(plain.forward(x, y), rel=1e-6)
    assert dropped.dropout_counter == 3, "evaluation does not advance the mask counter"


def test_dropout_gradient_matches_finite_differences():
    """The whole model with dropout in float64: the masks are fixed by the key, so the gradient is
    exact. Checked along random directions per tensor (an element-wise check would trip over the
    squared ReLU's kink at 0, whose second derivative the finite difference straddles)."""
    cfg = ModelConfig(vocab_size=7, d_model=12, n_layer=1, n_head=3, ctx=5, mlp_hidden=20, dropout=0.3)
    model = Model(cfg, backend="numpy", seed=3, dtype=np.float64)
    r = np.random.default_rng(5)
    model.params.flat[:] += r.normal(0, 0.3, model.params.flat.size)
    x, y = r.integers(0, 7, (2, 5)), r.integers(0, 7, (2, 5))

    def loss() -> float:
        model.dropout_counter = 0  # the same masks at every evaluation
        return model.forward(x, y)

    loss()
    model.backward()
    h = 1e-5
    for name, param in model.params.items():
        for _ in range(2):
            v = r.standard_normal(param.shape)
            param += h * v
            up = loss()
            param -= 2 * h * v
            down = loss()
            param += h * v
            numeric, analytic = (up - down) / (2 * h), float(np.sum(model.grads[name] * v))
            assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9), name

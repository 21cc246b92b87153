"""The reference kernels against central finite differences in float64: the only test of the math.

Every other test compares against the reference. Each kernel's loss is sum(out * g) for a random g;
each analytic grad is checked, element by element, against a 4th-order central difference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from fastchar import Model
from fastchar.backends import reference as ref
from fastchar.config import ModelConfig

B, T, C, NH, V = 2, 5, 12, 3, 7
H = 4 * C
EPS = 1e-5
STEP = 1e-3


def numeric_grad(loss: Callable[[], float], x: np.ndarray) -> np.ndarray:
    """4th-order central difference of loss() with respect to every element of x (in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        orig = flat[i]
        values = []
        for k in (2, 1, -1, -2):
            flat[i] = orig + k * STEP
            values.append(loss())
        flat[i] = orig
        gflat[i] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * STEP)
    return grad


def assert_grad(name: str, analytic: np.ndarray, numeric: np.ndarray) -> None:
    err = np.max(np.abs(analytic - numeric))
    assert np.allclose(analytic, numeric, rtol=1e-6, atol=1e-7), f"{name}: max abs diff {err:.3g}"


@pytest.fixture
def r() -> np.random.Generator:
    return np.random.default_rng(7)


def test_embedding(r):
    idx = r.integers(0, V, (B, T))
    idx[0, :2] = 3  # a repeated token must accumulate
    wte, wpe = r.standard_normal((V, C)), r.standard_normal((T + 2, C))
    g = r.standard_normal((B, T, C))
    out = np.zeros((B, T, C))

    def loss() -> float:
        ref.embedding_forward(out, idx, wte, wpe)
        return float(np.sum(out * g))

    dwte, dwpe = np.ones_like(wte), np.ones_like(wpe)  # nonzero: backward accumulates
    ref.embedding_backward(dwte, dwpe, g, idx)
    assert_grad("dwte", dwte - 1, numeric_grad(loss, wte))
    assert_grad("dwpe", dwpe - 1, numeric_grad(loss, wpe))


def test_rmsnorm(r):
    inp, weight = r.standard_normal((B, T, C)), r.standard_normal(C)
    g = r.standard_normal((B, T, C))
    out, rstd = np.zeros((B, T, C)), np.zeros((B, T))

    def loss() -> float:
        ref.rmsnorm_forward(out, rstd, inp, weight, EPS)
        return float(np.sum(out * g))

    loss()
    expected = inp / np.sqrt(np.mean(inp**2, axis=-1, keepdims=True) + EPS) * weight
    np.testing.assert_allclose(out, expected)
    dinp, dweight = np.zeros_like(inp), np.zeros_like(weight)
    ref.rmsnorm_backward(dinp, dweight, g, inp, weight, rstd)
    assert_grad("dinp", dinp, numeric_grad(loss, inp))
    assert_grad("dweight", dweight, numeric_grad(loss, weight))


def test_matmul(r):
    inp, weight = r.standard_normal((B * T, C)), r.standard_normal((C, 3 * C))
    g = r.standard_normal((B * T, 3 * C))
    out = np.zeros((B * T, 3 * C))

    def loss() -> float:
        ref.matmul_forward(out, inp, weight)
        return float(np.sum(out * g))

    dinp, dweight = np.zeros_like(inp), np.zeros_like(weight)
    ref.matmul_backward(dinp, dweight, g, inp, weight)
    assert_grad("dinp", dinp, numeric_grad(loss, inp))
    assert_grad("dweight", dweight, numeric_grad(loss, weight))


def naive_attention(qkv: np.ndarray) -> np.ndarray:
    """Loop-by-loop causal attention, independent of the reference's vectorised form."""
    out = np.zeros((B, T, C))
    HS = C // NH
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                q = qkv[b, t, h * HS : (h + 1) * HS]
                scores = np.array([q @ qkv[b, s, C + h * HS : C + (h + 1) * HS] / np.sqrt(HS) for s in range(t + 1)])
                p = np.exp(scores - scores.max())
                p /= p.sum()
                for s in range(t + 1):
                    out[b, t, h * HS : (h + 1) * HS] += p[s] * qkv[b, s, 2 * C + h * HS : 2 * C + (h + 1) * HS]
    return out


def test_attention(r):
    qkv = r.standard_normal((B, T, 3 * C))
    g = r.standard_normal((B, T, C))
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))

    def loss() -> float:
        ref.attention_forward(out, att, qkv)
        return float(np.sum(out * g))

    loss()
    np.testing.assert_allclose(out, naive_attention(qkv), rtol=1e-12, atol=1e-12)
    assert np.all(np.triu(att, k=1) == 0), "att must be zero above the diagonal"
    np.testing.assert_allclose(att.sum(-1), 1.0)
    dqkv, datt = np.ones_like(qkv), np.zeros_like(att)
    ref.attention_backward(dqkv, datt, g, qkv, att)
    assert_grad("dqkv", dqkv - 1, numeric_grad(loss, qkv))


def test_attention_decode_matches_last_row(r):
    qkv = r.standard_normal((B, T, 3 * C))
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))
    ref.attention_forward(out, att, qkv)
    for t in range(T):
        dec = np.zeros((B, C))
        ref.attention_decode(
            dec, qkv[:, t, :C].copy(), qkv[:, :, C : 2 * C].copy(), qkv[:, :, 2 * C :].copy(), t + 1, NH
        )
        np.testing.assert_allclose(dec, out[:, t], rtol=1e-12, atol=1e-12)


def test_relu2(r):
    inp = r.standard_normal((B, T, H))
    inp[np.abs(inp) < 0.01] = 0.5  # keep finite differences away from the kink at 0
    g = r.standard_normal((B, T, H))
    out = np.zeros_like(inp)

    def loss() -> float:
        ref.relu2_forward(out, inp)
        return float(np.sum(out * g))

    dinp = np.zeros_like(inp)
    ref.relu2_backward(dinp, g, inp)
    assert_grad("dinp", dinp, numeric_grad(loss, inp))


def test_residual(r):
    a, b = r.standard_normal((B, T, C)), r.standard_normal((B, T, C))
    g = r.standard_normal((B, T, C))
    out = np.zeros_like(a)

    def loss() -> float:
        ref.residual_forward(out, a, b)
        return float(np.sum(out * g))

    da, db = np.zeros_like(a), np.zeros_like(b)
    ref.residual_backward(da, db, g)
    assert_grad("dinp1", da, numeric_grad(loss, a))
    assert_grad("dinp2", db, numeric_grad(loss, b))


def test_crossentropy(r):
    logits = r.standard_normal((B, T, V)) * 3
    targets = r.integers(0, V, (B, T))
    g = r.standard_normal((B, T))
    losses, probs = np.zeros((B, T)), np.zeros((B, T, V))

    def loss() -> float:
        ref.crossentropy_forward(losses, probs, logits, targets)
        return float(np.sum(losses * g))

    loss()
    expected = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses, expected)
    dlogits = np.zeros_like(logits)
    ref.crossentropy_backward(dlogits, g, probs, targets)
    assert_grad("dlogits", dlogits, numeric_grad(loss, logits))


def test_adamw_matches_formula(r):
    P = 9
    params, grads = r.standard_normal(P), r.standard_normal(P)
    m, v = r.standard_normal(P), r.random(P)
    decay = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0], np.uint8)
    lr, b1, b2, eps, wd, step, scale = 1e-2, 0.9, 0.99, 1e-8, 0.1, 3, 0.5
    p0, m0, v0 = params.copy(), m.copy(), v.copy()
    ref.adamw_update(params, grads, m, v, decay, lr, b1, b2, eps, wd, step, scale)
    gs = grads * scale
    m1 = b1 * m0 + (1 - b1) * gs
    v1 = b2 * v0 + (1 - b2) * gs**2
    update = (m1 / (1 - b1**step)) / (np.sqrt(v1 / (1 - b2**step)) + eps)
    np.testing.assert_allclose(params, p0 - lr * update - lr * wd * decay * p0)
    np.testing.assert_allclose(m, m1)
    np.testing.assert_allclose(v, v1)


def test_grad_norm(r):
    g = r.standard_normal(101)
    assert ref.grad_norm(g) == pytest.approx(np.linalg.norm(g), rel=1e-12)


def test_whole_model_gradients():
    """Every parameter tensor of a tiny model, float64, against finite differences of the loss."""
    cfg = ModelConfig(vocab_size=7, d_model=12, n_layer=2, n_head=3, ctx=5, mlp_hidden=20)
    model = Model(cfg, backend="numpy", seed=3, dtype=np.float64)
    r = np.random.default_rng(5)
    for _, view in model.params.items():  # larger weights than the init, so every path matters
        view += r.normal(0, 0.3, view.shape)
    x, y = r.integers(0, 7, (2, 5)), r.integers(0, 7, (2, 5))
    model.forward(x, y)
    model.backward()
    for name, param in model.params.items():
        numeric = numeric_grad(lambda: model.forward(x, y), param)
        assert_grad(name, model.grads[name], numeric)

"""The reference kernels against central finite differences in float64: the only test of the math.

Every other test compares against the reference. Each kernel's loss is sum(out * g) for a random g;
each analytic grad is checked, element by element, against a 4th-order central difference.
Dropout kernels are checked with a fixed (key, p), which makes them deterministic functions; their
mask is also checked against its definition in plain Python integers.
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


def naive_attention(qkv: np.ndarray, keep: Callable[[int], float] = lambda i: 1.0) -> np.ndarray:
    """Loop-by-loop causal attention, independent of the reference's vectorised form.

    keep(i) multiplies the probability at att's flat index i (dropout), 1 by default.
    """
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
                    w = p[s] * keep(((b * NH + h) * T + t) * T + s)
                    out[b, t, h * HS : (h + 1) * HS] += w * qkv[b, s, 2 * C + h * HS : 2 * C + (h + 1) * HS]
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


def rope_tables(n: int, HS: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    angles = np.array([[p * base ** (-2 * i / HS) for i in range(HS // 2)] for p in range(n)])
    return np.cos(angles), np.sin(angles)


def test_rope(r):
    """The rotate-half rule element by element, then the backward against finite differences."""
    HS = C // NH
    inp = r.standard_normal((B, T, 3 * C))
    cos, sin = rope_tables(T + 2, HS)
    g = r.standard_normal((B, T, 3 * C))
    out = np.zeros_like(inp)

    def loss() -> float:
        ref.rope_forward(out, inp, cos, sin)
        return float(np.sum(out * g))

    loss()
    expected = inp.copy()
    for b in range(B):
        for t in range(T):
            for head in range(2 * NH):  # q's heads, then k's; v (the last C columns) unchanged
                o = head * HS
                for i in range(HS // 2):
                    a, bb = inp[b, t, o + i], inp[b, t, o + HS // 2 + i]
                    angle = t * 10000.0 ** (-2 * i / HS)
                    expected[b, t, o + i] = a * np.cos(angle) - bb * np.sin(angle)
                    expected[b, t, o + HS // 2 + i] = a * np.sin(angle) + bb * np.cos(angle)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    dinp = np.ones_like(inp)  # nonzero: backward accumulates
    ref.rope_backward(dinp, g, cos, sin)
    assert_grad("dinp", dinp - 1, numeric_grad(loss, inp))
    in_place = inp.copy()
    ref.rope_forward(in_place, in_place, cos, sin)
    loss()
    np.testing.assert_array_equal(in_place, out)


def test_rope_scores_are_relative(r):
    """q.k after rotation depends on the positions' difference only: shifting both changes nothing."""
    HS = C // NH
    cos, sin = rope_tables(40, HS)
    x = r.standard_normal((1, 2, 3 * C))
    for shift in (0, 7, 31):
        pair = np.zeros_like(x)
        for t, p in enumerate((shift + 3, shift)):  # q at p+3, k at p
            out = np.zeros((1, 1, 3 * C))
            ref.rope_forward(out, x[:, t : t + 1], cos[p : p + 1], sin[p : p + 1])
            pair[:, t] = out[:, 0]
        score = pair[0, 0, :HS] @ pair[0, 1, C : C + HS]
        if shift == 0:
            first = score
        assert score == pytest.approx(first, rel=1e-12)


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


KEY, P = 12345, 0.3  # a fixed mask: the dropout kernels are then deterministic functions


def lowbias32_keep(i: int, key: int, p: float) -> bool:
    """The dropout rule in plain Python integers, straight from its definition."""
    h = (i % 2**32 * 0x9E3779B9 + key) % 2**32
    h ^= h >> 16
    h = h * 0x7FEB352D % 2**32
    h ^= h >> 15
    h = h * 0x846CA68B % 2**32
    h ^= h >> 16
    return h >= min(round(p * 2**32), 2**32 - 1)


def test_dropout_mask_matches_definition():
    for key in (0, KEY, 2**32 - 1):
        mask = ref._dropout_mask((3, 7, 11), key, P, np.float64).reshape(-1)
        expected = [1 / (1 - P) if lowbias32_keep(i, key, P) else 0.0 for i in range(mask.size)]
        np.testing.assert_array_equal(mask, expected)
    assert ref._dropout_threshold(0.0) == 0
    assert ref._dropout_threshold(np.nextafter(1.0, 0.0)) == 2**32 - 1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout p"):
            ref._dropout_threshold(bad)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_kept_fraction(p):
    mask = ref._dropout_mask((16, 256, 256), KEY, p, np.float32)  # 1 M elements
    kept = np.count_nonzero(mask) / mask.size
    assert abs(kept - (1 - p)) <= 0.01 * (1 - p), f"p={p}: kept fraction {kept:.4f}, expected {1 - p}"
    np.testing.assert_allclose(mask.mean(), 1.0, rtol=0.01)  # the 1/(1-p) scale keeps the mean


def test_dropout_keys_differ():
    masks = [ref._dropout_mask((B, T, C), key, P, np.float64) != 0 for key in (0, 1, KEY, 2**32 - 1)]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            differ = np.mean(masks[i] != masks[j])
            assert differ > 0.25, f"keys {i} and {j}: masks differ in only {differ:.1%} of elements"


def test_dropout(r):
    inp = r.standard_normal((B, T, C))
    g = r.standard_normal((B, T, C))
    out = np.zeros_like(inp)

    def loss() -> float:
        ref.dropout_forward(out, inp, KEY, P)
        return float(np.sum(out * g))

    loss()
    keep = np.array([lowbias32_keep(i, KEY, P) for i in range(inp.size)]).reshape(inp.shape)
    np.testing.assert_allclose(out, np.where(keep, inp / (1 - P), 0.0), rtol=1e-15)
    dinp = np.ones_like(inp)  # nonzero: backward accumulates
    ref.dropout_backward(dinp, g, KEY, P)
    assert_grad("dinp", dinp - 1, numeric_grad(loss, inp))


def test_dropout_in_place(r):
    inp = r.standard_normal((B, T, C))
    expected = np.zeros_like(inp)
    ref.dropout_forward(expected, inp, KEY, P)
    ref.dropout_forward(inp, inp, KEY, P)
    np.testing.assert_array_equal(inp, expected)


def test_attention_dropout(r):
    qkv = r.standard_normal((B, T, 3 * C))
    g = r.standard_normal((B, T, C))
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))

    def loss() -> float:
        ref.attention_dropout_forward(out, att, qkv, KEY, P)
        return float(np.sum(out * g))

    loss()
    expected = naive_attention(qkv, lambda i: lowbias32_keep(i, KEY, P) / (1 - P))
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    plain_out, plain_att = np.zeros_like(out), np.zeros_like(att)
    ref.attention_forward(plain_out, plain_att, qkv)
    np.testing.assert_array_equal(att, plain_att)  # att is saved before dropout
    dqkv, datt = np.ones_like(qkv), np.zeros_like(att)
    ref.attention_dropout_backward(dqkv, datt, g, qkv, att, KEY, P)
    assert_grad("dqkv", dqkv - 1, numeric_grad(loss, qkv))


def test_dropout_p0_is_identity(r):
    """p = 0 keeps everything: the dropout kernels equal the plain ones exactly."""
    qkv, g = r.standard_normal((B, T, 3 * C)), r.standard_normal((B, T, C))
    out, att, dqkv, datt = np.zeros((B, T, C)), np.zeros((B, NH, T, T)), np.ones_like(qkv), np.zeros((B, NH, T, T))
    ref.attention_forward(out, att, qkv)
    ref.attention_backward(dqkv, datt, g, qkv, att)
    out0, att0, dqkv0, datt0 = np.zeros_like(out), np.zeros_like(att), np.ones_like(qkv), np.zeros_like(datt)
    ref.attention_dropout_forward(out0, att0, qkv, KEY, 0.0)
    ref.attention_dropout_backward(dqkv0, datt0, g, qkv, att0, KEY, 0.0)
    for name, a, b in [("out", out0, out), ("att", att0, att), ("dqkv", dqkv0, dqkv), ("datt", datt0, datt)]:
        np.testing.assert_array_equal(a, b, err_msg=name)
    drop, dinp = np.zeros_like(g), np.ones_like(g)
    ref.dropout_forward(drop, g, KEY, 0.0)
    ref.dropout_backward(dinp, g, KEY, 0.0)
    np.testing.assert_array_equal(drop, g)
    np.testing.assert_array_equal(dinp, 1 + g)


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

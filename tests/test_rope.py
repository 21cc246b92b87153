"""Rotary positions and the one description: model parity across backends, decoding that slides the
cache, weights found by name, the compiled sampler against the Python one, and the command line.

A sliding rope cache is sliding-window attention: its logits are compared with a float64 forward
over the whole text whose attention is limited to the last `window` positions (sliding_logits);
before the window is full, and for one-layer models always, that is the plain full forward.

Tolerances: rope adds one elementwise rotation per layer, so the model-parity bounds are those of
tests/test_model_parity.py. Decode logits are float32 paths against a float64 forward (other
summation orders, the sliding ring's other key order): rtol 1e-4, atol 1e-5 as in test_sampler.py.
The two samplers compute probabilities in float64 with other summation orders: they agree to 1e-12
relative, so a seeded token stream can only differ where a uniform falls within ~1e-12 of a cdf
boundary (never for the seeds below).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import compiled_backends

from fastchar import KVCache, Model, ModelConfig, graph
from fastchar.arena import param_specs
from fastchar.cli import main
from fastchar.sampler import compiled_loop, compiled_tokens, python_tokens, token_probs

ROPE = ModelConfig(vocab_size=13, d_model=36, n_layer=2, n_head=6, ctx=11, mlp_hidden=144, position="rope")
SMALL = ModelConfig(vocab_size=11, d_model=24, n_layer=2, n_head=3, ctx=12, mlp_hidden=48, position="rope")


def sharp(model: Model) -> Model:
    """Weights with sharper logits than the init, so decoding differences would show."""
    r = np.random.default_rng(0)
    model.params.flat[:] += r.normal(0, 0.2, model.params.flat.size).astype(model.params.flat.dtype)
    return model


def full_logits(model: Model, tokens: list[int]) -> np.ndarray:
    model.forward(np.array([tokens]))
    return model.logits[0].copy()


def banded_attention(window: int):
    """Causal attention in which position t sees positions t-window+1..t only (float64 reference)."""

    def attention_forward(out, att, qkv):
        B, NH, T, _ = att.shape
        q, k, v = qkv.reshape(B, T, 3, NH, -1).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        t = np.arange(T)
        scores[..., (t[None, :] > t[:, None]) | (t[None, :] <= t[:, None] - window)] = -np.inf
        att[...] = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out[...] = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)

    return attention_forward


def sliding_logits(model: Model, tokens: list[int], window: int) -> np.ndarray:
    """What a sliding rope cache must give: logits (len(tokens), V) of a float64 forward over the
    whole sequence in which every layer attends to the last `window` positions (sliding-window
    attention). Not a fresh forward over the window's characters alone: a cached key of a deeper
    layer still carries what characters older than the window contributed when it was computed."""
    cfg = ModelConfig(**{**model.cfg.to_dict(), "ctx": len(tokens)})  # rope: ctx sizes no parameter
    oracle = Model(cfg, backend="numpy", dtype=np.float64)
    oracle.params.flat[:] = model.params.flat
    oracle.kernels = SimpleNamespace(**{**vars(oracle.kernels), "attention_forward": banded_attention(window)})
    return full_logits(oracle, tokens)


def test_rope_has_no_wpe_and_old_configs_load_as_learned():
    assert "wpe" not in dict(param_specs(ROPE))
    assert "wpe" in dict(param_specs(ModelConfig()))
    old = {k: v for k, v in ModelConfig().to_dict().items() if k not in ("position", "rope_base")}
    assert ModelConfig.from_dict(old).position == "learned"


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_rope_model_parity(backend_name):
    ref, other = Model(ROPE, backend="numpy", seed=0), Model(ROPE, backend=backend_name, seed=0)
    r = np.random.default_rng(1)
    x, y = r.integers(0, 13, (3, ROPE.ctx)), r.integers(0, 13, (3, ROPE.ctx))
    assert other.forward(x, y) == pytest.approx(ref.forward(x, y), rel=1e-5)
    np.testing.assert_allclose(other.logits, ref.logits, rtol=1e-4, atol=1e-4, err_msg=f"{backend_name}: logits")
    ref.backward()
    other.backward()
    for name, _ in param_specs(ROPE):
        scale = float(np.max(np.abs(ref.grads[name])))
        diff = float(np.max(np.abs(other.grads[name] - ref.grads[name])))
        assert diff <= 1e-3 * scale + 1e-7, f"{backend_name}: grad {name} max abs diff {diff:.3g}"


def test_rope_model_gradient_matches_finite_differences():
    """The whole rope model in float64 along random directions: rope's backward in place."""
    cfg = ModelConfig(vocab_size=7, d_model=12, n_layer=1, n_head=3, ctx=5, mlp_hidden=20, position="rope")
    model = Model(cfg, backend="numpy", seed=3, dtype=np.float64)
    r = np.random.default_rng(5)
    model.params.flat[:] += r.normal(0, 0.3, model.params.flat.size)
    x, y = r.integers(0, 7, (2, 5)), r.integers(0, 7, (2, 5))
    model.forward(x, y)
    model.backward()
    h = 1e-5
    for name, param in model.params.items():
        v = r.standard_normal(param.shape)
        param += h * v
        up = model.forward(x, y)
        param -= 2 * h * v
        down = model.forward(x, y)
        param += h * v
        numeric, analytic = (up - down) / (2 * h), float(np.sum(model.grads[name] * v))
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-9), name


@pytest.fixture(params=["numpy", *compiled_backends()])
def rope_model(request):
    return sharp(Model(SMALL, backend=request.param, seed=4))


def test_rope_cache_slides_and_matches_full_forward(rope_model):
    """Python KVCache: once the window is full it slides one position per token (no refill); every
    step's logits equal the sliding-window forward over everything fed, and, until the window is
    full, the plain full forward."""
    r = np.random.default_rng(3)
    fed = [int(t) for t in r.integers(0, 11, 4)]
    cache = KVCache(rope_model)
    got = [cache.feed(fed).copy()]
    for i in range(3 * SMALL.ctx):
        fed.append(int(r.integers(0, 11)))
        got.append(cache.advance(fed[-1]).copy())
        assert cache.length == min(5 + i, SMALL.ctx) and cache.tokens == fed[-SMALL.ctx :]
    assert cache.pos == len(fed)
    expected = sliding_logits(rope_model, fed, SMALL.ctx)[3:]
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[SMALL.ctx - 4], full_logits(rope_model, fed[: SMALL.ctx])[-1], rtol=1e-4, atol=1e-5)


def test_one_layer_rope_cache_equals_a_forward_over_the_window():
    """With one layer the cached keys depend on their own character only, so a slid window gives
    exactly the logits of a fresh forward over the window's characters (up to rounding)."""
    cfg = ModelConfig(**{**SMALL.to_dict(), "n_layer": 1})
    model = sharp(Model(cfg, backend="numpy", seed=2, dtype=np.float64))
    r = np.random.default_rng(4)
    cache = KVCache(model)
    cache.feed([1, 2])
    for _ in range(2 * cfg.ctx):
        logits = cache.advance(int(r.integers(0, 11)))
        np.testing.assert_allclose(logits, full_logits(model, cache.tokens)[-1], rtol=1e-9, atol=1e-12)


@pytest.fixture(params=compiled_backends())
def compiled_rope(request):
    m = sharp(Model(SMALL, backend=request.param, seed=4))
    assert compiled_loop(m) is not None
    return m


@pytest.mark.parametrize("window", [SMALL.ctx, 5, 1])
def test_compiled_rope_logits_equal_sliding_forward(compiled_rope, window):
    n = 4 * SMALL.ctx + 3
    prompt = [3, 1, 4, 1, 5, 9, 2][-window:]
    logits = np.zeros((n, SMALL.vocab_size), np.float32)
    rng = np.random.default_rng(3)
    ids = [
        int(t) for b in compiled_tokens(compiled_rope, prompt, n, 1.0, None, None, rng, window, 7, logits) for t in b
    ]
    expected = sliding_logits(compiled_rope, prompt + ids, window)[len(prompt) - 1 : -1]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5, err_msg=f"window {window}")


def test_compiled_rope_text_equals_python_loop(compiled_rope):
    for temperature, top_k, top_p in [(0.0, None, None), (1.0, None, None), (0.9, 4, 0.9)]:
        a = compiled_tokens(
            compiled_rope, [1, 2], 3 * SMALL.ctx, temperature, top_k, top_p, np.random.default_rng(5), 12
        )
        b = python_tokens(compiled_rope, [1, 2], 3 * SMALL.ctx, temperature, top_k, top_p, np.random.default_rng(5), 12)
        assert [int(t) for blk in a for t in blk] == [int(t) for t in b], (temperature, top_k, top_p)


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_an_added_tensor_cannot_shift_the_decoders_weights(monkeypatch, backend_name, position):
    """Insert extra tensors into the parameter table (first, and inside a block): the compiled loop
    finds every weight by name, so its logits still equal a full forward."""
    real = graph.param_specs

    def padded(cfg):
        specs = real(cfg)
        return [("extra.first", (5, 7)), *specs[:3], ("blocks.0.extra", (3,)), *specs[3:]]

    monkeypatch.setattr("fastchar.model.param_specs", padded)
    cfg = ModelConfig(**{**SMALL.to_dict(), "position": position})
    model = sharp(Model(cfg, backend=backend_name, seed=2))
    assert model.params.offsets["wte"][0] == 35, "the extra tensor comes first in the buffer"
    n, prompt = 2 * cfg.ctx, [2, 7, 1]
    logits = np.zeros((n, cfg.vocab_size), np.float32)
    rng = np.random.default_rng(1)
    ids = [int(t) for b in compiled_tokens(model, prompt, n, 1.0, None, None, rng, cfg.ctx, 5, logits) for t in b]
    if position == "rope":
        expected = sliding_logits(model, prompt + ids, cfg.ctx)[len(prompt) - 1 : -1]
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
        return
    held = prompt
    for i, token in enumerate(ids):
        np.testing.assert_allclose(logits[i], full_logits(model, held)[-1], rtol=1e-4, atol=1e-5, err_msg=f"draw {i}")
        if len(held) >= cfg.ctx:  # KVCache.advance's refill
            held = held[len(held) - (cfg.ctx // 2 - 1) :]
        held = [*held, token]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 3, 0.5)])
def test_compiled_sampler_probabilities_match_python(temperature, top_k, top_p):
    """The compiled samplers (fc_sample.c for Cython, its Numba port) against the Python one; the two
    compiled ones agree exactly (the same float64 operations in the same order)."""
    from fastchar.backends import numba_decode

    cydecode = pytest.importorskip("fastchar._cydecode")
    r = np.random.default_rng(9)
    V = 65
    tmp, order = np.zeros(V), np.zeros(V, np.int32)
    for _ in range(50):
        logits = (3 * r.standard_normal(V)).astype(np.float32)
        logits[r.integers(0, V, 4)] = logits[0]  # ties
        want = token_probs(logits, temperature, top_k or None, top_p)
        got = cydecode.token_probs(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        numba_probs = np.zeros(V)
        numba_decode.token_probs(logits, V, temperature, top_k, top_p, numba_probs, tmp, order)
        np.testing.assert_array_equal(numba_probs, got)
        work = np.zeros(3 * V)
        for u in (0.0, 0.3, 0.999):
            cdf = np.cumsum(got)  # sequential, as the compiled samplers sum
            want_id = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), V - 1)
            assert numba_decode.sample(logits, V, temperature, top_k, top_p, u, work, order) == want_id


@pytest.mark.parametrize("temperature", [1e-300, 1e-308, 5e-324])
def test_a_tiny_temperature_is_greedy_in_every_sampler(temperature):
    """logits / 1e-308 overflowed to inf, and inf - inf made every probability NaN: the samplers drew
    the last id. Subtracting the maximum first leaves the largest logit's ids (ties share)."""
    from fastchar.backends import numba_decode

    cydecode = pytest.importorskip("fastchar._cydecode")
    V = 65
    logits = np.random.default_rng(4).normal(0, 3, V).astype(np.float32)
    logits[[7, 40]] = logits.max() + 1  # a tie at the top
    want = np.zeros(V)
    want[[7, 40]] = 0.5
    tmp, order, numba_probs = np.zeros(V), np.zeros(V, np.int32), np.zeros(V)
    numba_decode.token_probs(logits, V, temperature, 0, 1.0, numba_probs, tmp, order)
    for got in (token_probs(logits, temperature, None, None), cydecode.token_probs(logits, temperature, 0, 1.0),
                numba_probs):  # fmt: skip
        np.testing.assert_array_equal(got, want)
    work = np.zeros(3 * V)
    for u, want_id in ((0.0, 7), (0.7, 40)):
        assert numba_decode.sample(logits, V, temperature, 0, 0.4, u, work, order) == 7  # top-p keeps the first
        assert numba_decode.sample(logits, V, temperature, 0, 1.0, u, work, order) == want_id


def test_cli_trains_and_samples_a_rope_model(capsys, corpus, tmp_path):
    out_dir = tmp_path / "rope"
    code = main(["train", "--data", str(corpus), "--out", str(out_dir), "--steps", "50", "--eval-every", "25",
                 "--sample-chars", "0", "--position", "rope", "--d-model", "32", "--n-layer", "1", "--n-head", "4",
                 "--ctx", "16", "--batch", "4", "--eval-batches", "2", "--log-every", "25"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert '"position": "rope"' in out and "done: step 50" in out
    code = main(["sample", "--checkpoint", str(out_dir / "best"), "--prompt", "the ", "--max-new-tokens", "2000",
                 "--seed", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("the ") and len(out) == len("the ") + 2000 + 1


def test_torch_oracle_rope():
    """fastchar/torch_model.py walks the same op list with PyTorch's functions: same logits and
    gradients as the reference on a rope model (float64)."""
    torch = pytest.importorskip("torch")
    from fastchar.torch_model import TorchGPT

    model = sharp(Model(ROPE, backend="numpy", seed=0, dtype=np.float64))
    r = np.random.default_rng(2)
    x, y = r.integers(0, 13, (3, ROPE.ctx)), r.integers(0, 13, (3, ROPE.ctx))
    loss = model.forward(x, y)
    model.backward()
    oracle = TorchGPT(ROPE).double()
    oracle.rope_cos, oracle.rope_sin = (torch.from_numpy(t) for t in graph.rope_tables(ROPE, np.arange(ROPE.ctx)))
    with torch.no_grad():
        for name in oracle.names:
            oracle.p(name).copy_(torch.from_numpy(model.params[name]))
    logits, tloss = oracle(torch.from_numpy(x), torch.from_numpy(y))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-10)
    np.testing.assert_allclose(model.logits, logits.detach().numpy(), rtol=1e-9, atol=1e-10)
    for name in oracle.names:
        np.testing.assert_allclose(model.grads[name], oracle.p(name).grad.numpy(), rtol=1e-7, atol=1e-10, err_msg=name)

"""Sampling: KV-cache logits equal a full forward, the window refill, filters, and seeds."""

from __future__ import annotations

import numpy as np
import pytest

from fastchar import CharTokenizer, ConfigError, InputError, KVCache, Model, ModelConfig, generate, stream
from fastchar.sampler import sample_token, top_k_filter, top_p_filter

CFG = ModelConfig(vocab_size=11, d_model=24, n_layer=2, n_head=3, ctx=12, mlp_hidden=48)
TOK = CharTokenizer("abcdefghij\n")


@pytest.fixture
def model(backend):
    m = Model(CFG, backend=backend, seed=4)
    r = np.random.default_rng(0)
    m.params.flat[:] += r.normal(0, 0.2, m.params.flat.size).astype(np.float32)  # sharper logits
    return m


def full_logits(model, tokens):
    model.forward(np.array([tokens]))
    return model.logits[0].copy()


def test_cache_matches_full_forward_at_every_position(model):
    tokens = list(np.random.default_rng(1).integers(0, CFG.vocab_size, CFG.ctx))
    cache = KVCache(model)
    expected = full_logits(model, tokens)
    for t, token in enumerate(tokens):
        got = cache.step(token)
        np.testing.assert_allclose(got, expected[t], rtol=1e-4, atol=1e-5, err_msg=f"position {t}")


def test_cache_refill_matches_forward_over_cached_tokens(model):
    r = np.random.default_rng(2)
    cache = KVCache(model)
    cache.feed([int(t) for t in r.integers(0, CFG.vocab_size, 5)])
    refills = 0
    for _ in range(3 * CFG.ctx):
        before = cache.length
        logits = cache.advance(int(r.integers(0, CFG.vocab_size)))
        refills += cache.length < before
        assert CFG.ctx // 2 <= cache.length <= CFG.ctx or cache.length == before + 1
        np.testing.assert_allclose(logits, full_logits(model, cache.tokens)[-1], rtol=1e-4, atol=1e-5)
    assert refills >= 4, "the window was refilled once per ctx/2 new characters"


def test_top_p():
    probs = np.array([0.1, 0.4, 0.2, 0.3])
    np.testing.assert_allclose(top_p_filter(probs, 0.65), [0, 4 / 7, 0, 3 / 7])
    np.testing.assert_allclose(top_p_filter(probs, 0.7), [0, 4 / 7, 0, 3 / 7])  # mass reaches p exactly
    np.testing.assert_allclose(top_p_filter(probs, 1.0), probs)
    assert top_p_filter(probs, 1e-9).argmax() == 1 and np.count_nonzero(top_p_filter(probs, 1e-9)) == 1


def test_top_p_ties_keep_lower_ids_first():
    probs = np.array([0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(top_p_filter(probs, 0.5), [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(top_p_filter(probs, 0.01), [1, 0, 0, 0])


def test_tiny_top_p_equals_greedy():
    r = np.random.default_rng(3)
    for _ in range(20):
        logits = r.normal(size=11)
        assert sample_token(logits, 1.0, None, 1e-9, r) == int(np.argmax(logits))
        assert sample_token(logits, 0.0, None, None, r) == int(np.argmax(logits))


def test_top_k():
    logits = np.array([1.0, 5.0, 3.0, 4.0])
    assert list(np.isfinite(top_k_filter(logits, 2))) == [False, True, False, True]
    r = np.random.default_rng(0)
    draws = {sample_token(logits, 1.0, 2, None, r) for _ in range(200)}
    assert draws == {1, 3}


def test_same_seed_same_text(model):
    a = generate(model, TOK, "abc", 40, temperature=1.0, top_p=0.9, seed=7)
    b = generate(model, TOK, "abc", 40, temperature=1.0, top_p=0.9, seed=7)
    c = generate(model, TOK, "abc", 40, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c and a.startswith("abc") and len(a) == 43
    assert "".join(stream(model, TOK, "abc", 40, temperature=1.0, top_p=0.9, seed=7)) == a[3:]


def test_greedy_generation_matches_full_forward(model):
    text = generate(model, TOK, "ab", CFG.ctx - 2, temperature=0)
    ids = TOK.encode(text)
    logits = full_logits(model, list(ids[:-1]))
    assert list(ids[2:]) == list(np.argmax(logits[1:], axis=-1))


def test_prompt_with_unknown_characters_is_named(model):
    with pytest.raises(InputError, match="'X', 'Y'"):
        generate(model, TOK, "abXY", 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"ctx": CFG.ctx + 1}, "context window"),
    ],
)
def test_bad_sampling_options(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(model, TOK, "ab", 5, **kwargs)

"""Sampling: KV-cache logits equal a full forward, the window refill, filters, and seeds.

The compiled generation loops (numba, cython: `generate_tokens`) are checked against the Python loop
(KVCache + sample_token): same greedy text across several refills, the logits of every draw equal a
full forward over the tokens held in the cache, the same seeded text, and chunking changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compiled_backends

from fastchar import CharTokenizer, ConfigError, InputError, KVCache, Model, ModelConfig, generate, stream
from fastchar.sampler import (
    compiled_loop,
    compiled_tokens,
    python_tokens,
    sample_token,
    top_k_filter,
    top_p_filter,
)

CFG = ModelConfig(vocab_size=11, d_model=24, n_layer=2, n_head=3, ctx=12, mlp_hidden=48)
TOK = CharTokenizer("abcdefghij\n")


def make_model(backend: str) -> Model:
    m = Model(CFG, backend=backend, seed=4)
    r = np.random.default_rng(0)
    m.params.flat[:] += r.normal(0, 0.2, m.params.flat.size).astype(np.float32)  # sharper logits
    return m


@pytest.fixture
def model(backend):
    return make_model(backend)


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
    # generate calls the compiled loop GENERATE_CHUNK characters at a time, stream DECODE_CHUNK: same text
    long = generate(model, TOK, "abc", 600, temperature=1.0, top_p=0.9, seed=7)
    assert "".join(stream(model, TOK, "abc", 600, temperature=1.0, top_p=0.9, seed=7)) == long[3:]
    assert long[:43] == a


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


# --------------------------------------------------------------------------------------------
# The compiled generation loop against the Python loop


def loop_backends() -> list[str]:
    """The compiled backends: each has a compiled generation loop (numba's needs no C build)."""
    return compiled_backends()


@pytest.fixture(params=loop_backends())
def compiled_model(request):
    """The model fixture's weights on each backend that has a compiled generation loop."""
    m = make_model(request.param)
    assert compiled_loop(m) is not None, f"backend {request.param} has no compiled generation loop"
    return m


def python_ids(model, ids, n, window=CFG.ctx, temperature=0.0, top_k=None, top_p=None, seed=0):
    rng = np.random.default_rng(seed)
    return [int(t) for t in python_tokens(model, ids, n, temperature, top_k, top_p, rng, window)]


def compiled_ids(model, ids, n, window=CFG.ctx, temperature=0.0, top_k=None, top_p=None, seed=0, **kw):
    rng = np.random.default_rng(seed)
    blocks = compiled_tokens(model, ids, n, temperature, top_k, top_p, rng, window, **kw)
    return [int(t) for block in blocks for t in block]


def advance(tokens, token, window):
    """KVCache.advance's rule on a token list."""
    if len(tokens) >= window:
        return [*tokens[len(tokens) - max(window // 2 - 1, 0) :], token]
    return [*tokens, token]


def test_compiled_greedy_equals_python_loop(compiled_model):
    n = 4 * CFG.ctx  # crosses the window refill several times
    for prompt in ([0], [1, 2, 3], list(range(10)) * 2):
        assert compiled_ids(compiled_model, prompt, n) == python_ids(compiled_model, prompt, n), prompt


@pytest.mark.parametrize("window", [CFG.ctx, 7, 1])
def test_compiled_logits_equal_full_forward_over_cached_tokens(isa_path, compiled_model, window):
    """On every instruction-set path (isa_path: the decode products and attention it runs)."""
    n = 3 * CFG.ctx + 5
    prompt = [3, 1, 4, 1, 5]
    logits = np.zeros((n, CFG.vocab_size), np.float32)
    ids = compiled_ids(compiled_model, prompt, n, window, temperature=1.0, seed=3, chunk=7, logits=logits)
    cached = prompt[-window:]
    for i, token in enumerate(ids):
        expected = full_logits(compiled_model, cached)[-1]
        np.testing.assert_allclose(logits[i], expected, rtol=1e-4, atol=1e-5, err_msg=f"draw {i}, cache {cached}")
        cached = advance(cached, token, window)


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, None, None), (1.0, 3, 0.9)]  # plain sampling; top-k and top-p together
    + [pytest.param(*kw, marks=pytest.mark.slow) for kw in [(0.8, 4, None), (1.3, None, 0.8), (0.5, 50, 1.0)]],
)
def test_compiled_seeded_text_equals_python_loop(compiled_model, temperature, top_k, top_p):
    # Exact in practice: the logits agree to float32 rounding and the sampling is the same float64
    # arithmetic in the same order on the same uniforms, so a draw could only differ if a uniform
    # fell within ~1e-7 of a cdf boundary.
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": 11}
    n = 3 * CFG.ctx
    assert compiled_ids(compiled_model, [1, 2], n, **kw) == python_ids(compiled_model, [1, 2], n, **kw)
    text = generate(compiled_model, TOK, "abc", n, temperature, top_k, top_p, seed=11)
    prompt = [int(i) for i in TOK.encode("abc")]
    assert text[3:] == "".join(TOK.chars[t] for t in python_ids(compiled_model, prompt, n, **kw))


def test_compiled_chunking_does_not_change_the_text(compiled_model):
    n = 3 * CFG.ctx + 1
    kw = {"temperature": 1.0, "top_p": 0.95, "seed": 5}
    reference = compiled_ids(compiled_model, [4, 2], n, **kw)
    for chunk in (1, 2, 5, 13, n, 4 * n):
        assert compiled_ids(compiled_model, [4, 2], n, chunk=chunk, **kw) == reference, chunk
    assert compiled_ids(compiled_model, [4, 2], 0, **kw) == []


def test_compiled_loop_only_for_float32_compiled_backends(model):
    has_loop = compiled_loop(model) is not None
    assert has_loop == (model.backend in ("cython", "numba"))


def test_numba_loop_needs_no_c_build():
    """With the C extensions unavailable, numba still has its compiled loop (its sampler is Numba's)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('fastchar._cydecode', 'fastchar._cykernels', 'fastchar._gemm'):\n"
        "    sys.modules[name] = None  # import fails, as without a C build\n"
        "import numpy as np, fastchar\n"
        "from fastchar.sampler import compiled_loop\n"
        "m = fastchar.Model(fastchar.ModelConfig(vocab_size=11, d_model=24, n_layer=2, n_head=3, ctx=12,\n"
        "                   mlp_hidden=48), backend='numba', seed=4)\n"
        "assert compiled_loop(m) is not None\n"
        "print(fastchar.generate(m, fastchar.CharTokenizer('abcdefghij\\n'), 'abc', 40, seed=1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    want = generate(Model(CFG, backend="numpy", seed=4), TOK, "abc", 40, seed=1)  # the Python loop
    assert out.stdout.strip() == want.strip()

"""The batched decode's attention step (fc_attention_rows in csrc/fc_decode.c, through
_cydecode.attention_rows) on every path this CPU runs (forced in turn): each row's key and value land
in its stream's cache slot, and its output is softmax(q k^T / sqrt(HS)) v over the slots the cache
then holds, within float32 rounding of float64; a split of the heads (the threads' tasks) changes no
bit."""

from __future__ import annotations

import numpy as np
import pytest

cydecode = pytest.importorskip("fastchar._cydecode", reason="the Cython extension is part of the product: build it")

L, C, NH, S = 2, 64, 4, 40  # HS = 16: a multiple of every vector width, so the vector kernels run
HS = C // NH


def caches(B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kall = rng.standard_normal((B, L, C, S), dtype=np.float32)
    vall = rng.standard_normal((B, L, NH, S, HS), dtype=np.float32)
    return kall, vall


def expected(qkv: np.ndarray, kall: np.ndarray, vall: np.ndarray, stream, n, layer: int) -> np.ndarray:
    """float64 attention of each row over the first n[m] slots of its stream's (already appended) cache."""
    out = np.zeros((len(stream), C))
    for m, (b, nm) in enumerate(zip(stream, n, strict=True)):
        for h in range(NH):
            q = qkv[m, h * HS : (h + 1) * HS].astype(np.float64)
            k = kall[b, layer, h * HS : (h + 1) * HS, :nm].astype(np.float64)  # (HS, n)
            v = vall[b, layer, h, :nm].astype(np.float64)  # (n, HS)
            s = q @ k / np.sqrt(HS)
            p = np.exp(s - s.max())
            out[m, h * HS : (h + 1) * HS] = (p / p.sum()) @ v
    return out


# rows: (stream, slot, n): a new stream, ragged lengths around the vector widths, a full ring whose
# newest row is in the middle (rotary positions attend to the whole window, in slot order)
ROWS = [(2, 0, 1), (0, 4, 5), (3, 16, 17), (1, S - 1, S), (4, 7, S), (5, 32, 33)]


def test_rows_append_their_key_and_value_and_attend_over_their_own_cache(isa_path):
    B, layer = 6, 1
    kall, vall = caches(B, 0)
    stream, slot, n = (np.array(c, np.int64) for c in zip(*ROWS, strict=True))
    qkv = np.random.default_rng(1).standard_normal((len(ROWS), 3 * C), dtype=np.float32)
    out = np.full((len(ROWS), C), np.nan, np.float32)
    k0, v0 = kall.copy(), vall.copy()
    cydecode.attention_rows(out, qkv, kall, vall, stream, slot, n, layer, 0, NH)
    for m, (b, t, _) in enumerate(ROWS):
        k0[b, layer, :, t] = qkv[m, C : 2 * C]
        v0[b, layer, :, t] = qkv[m, 2 * C :].reshape(NH, HS)
    np.testing.assert_array_equal(kall, k0)  # the appends, and nothing else written
    np.testing.assert_array_equal(vall, v0)
    np.testing.assert_allclose(out, expected(qkv, kall, vall, stream, n, layer), rtol=1e-5, atol=2e-6)


def test_a_split_of_the_heads_changes_no_bit(isa_path):
    """The threads each take a range of heads: the columns of each range are those of all heads at once,
    and the other columns of out are left alone."""
    B, layer = 6, 0
    stream, slot, n = (np.array(c, np.int64) for c in zip(*ROWS, strict=True))
    qkv = np.random.default_rng(2).standard_normal((len(ROWS), 3 * C), dtype=np.float32)
    kall, vall = caches(B, 3)
    whole = np.zeros((len(ROWS), C), np.float32)
    cydecode.attention_rows(whole, qkv, kall, vall, stream, slot, n, layer, 0, NH)
    split = np.full((len(ROWS), C), np.nan, np.float32)
    for h0, h1 in [(0, 1), (1, 3), (3, 4)]:
        kall, vall = caches(B, 3)
        cydecode.attention_rows(split, qkv, kall, vall, stream, slot, n, layer, h0, h1)
        assert np.isnan(split[:, h1 * HS :]).all()
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize(
    "bad",
    [
        {"layer": L},
        {"h0": 2, "h1": 2},
        {"h1": NH + 1},
        {"stream": 6},
        {"slot": S},
        {"n": S + 1},
        {"slot": 3, "n": 3},  # the new row must be among the slots attended
    ],
)
def test_bad_arguments_are_refused(bad):
    kall, vall = caches(6, 0)
    args = {"layer": 0, "h0": 0, "h1": NH, "stream": 0, "slot": 0, "n": 1} | bad
    one = lambda key: np.array([args[key]], np.int64)  # noqa: E731
    out, qkv = np.zeros((1, C), np.float32), np.zeros((1, 3 * C), np.float32)
    with pytest.raises(ValueError):
        cydecode.attention_rows(out, qkv, kall, vall, one("stream"), one("slot"), one("n"), args["layer"], args["h0"],
                                args["h1"])  # fmt: skip

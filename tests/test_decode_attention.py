"""The batched decode's attention step (fc_attention_rows in csrc/fc_decode.c, through
_cydecode.attention_rows) on every path this CPU runs (forced in turn): each row's key and value land
in its stream's cache slot, and its output is softmax(q k^T / sqrt(HS)) v over the slots the cache
then holds, within float32 rounding of float64; a split of the heads (the threads' tasks) changes no
bit. bf16 caches (uint16, fc_decode.h's layouts; the avx512 path with AVX512_BF16 only): the appends
are the rows rounded to bf16, and the output is float64 attention over the rounded q * scale, keys
and values, with the weights rounded to bf16 in the numerator, within float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest

from fastchar.backends.reference import round_bf16

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


def to_kv16(kall: np.ndarray, vall: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 caches in fc_decode.h's bf16 layouts: keys (B, L, C/2, S, 2) pairs of channels, values
    (B, L, NH, S/2, HS, 2) pairs of positions, as the (B, L, C, S) and (B, L, NH, S, HS) uint16 the
    decode allocates."""
    bits = lambda a: (round_bf16(a).view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    B = kall.shape[0]
    k16 = bits(kall).reshape(B, L, C // 2, 2, S).transpose(0, 1, 2, 4, 3)
    v16 = bits(vall).reshape(B, L, NH, S // 2, 2, HS).transpose(0, 1, 2, 3, 5, 4)
    return k16.reshape(B, L, C, S).copy(), v16.reshape(B, L, NH, S, HS).copy()


def from_kv16(k16: np.ndarray, v16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """to_kv16's inverse: the float32 values of bf16 caches, in the float32 layouts."""
    f = lambda a: (a.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    B = k16.shape[0]
    kall = f(k16).reshape(B, L, C // 2, S, 2).transpose(0, 1, 2, 4, 3).reshape(B, L, C, S)
    vall = f(v16).reshape(B, L, NH, S // 2, HS, 2).transpose(0, 1, 2, 3, 5, 4).reshape(B, L, NH, S, HS)
    return kall, vall


def expected_bf16(qkv: np.ndarray, kall: np.ndarray, vall: np.ndarray, stream, n, layer: int) -> np.ndarray:
    """As expected, over bf16 caches (their float values): q * scale rounded to bf16, and the weights
    exp(s - max) rounded to bf16 in p.v, divided by the sum of the unrounded weights."""
    out = np.zeros((len(stream), C))
    for m, (b, nm) in enumerate(zip(stream, n, strict=True)):
        for h in range(NH):
            q = round_bf16(qkv[m, h * HS : (h + 1) * HS] / np.float32(np.sqrt(HS))).astype(np.float64)
            s = q @ kall[b, layer, h * HS : (h + 1) * HS, :nm].astype(np.float64)
            p = np.exp(s - s.max())
            pr = round_bf16(p.astype(np.float32)).astype(np.float64)
            out[m, h * HS : (h + 1) * HS] = pr @ vall[b, layer, h, :nm].astype(np.float64) / p.sum()
    return out


def test_bf16_caches_append_rounded_rows_and_attend_in_bf16(isa_path):
    """Rows with an odd count attend to a last pair whose partner slot holds NaN (every slot a new
    stream has not written does): it is masked, never multiplied."""
    B, layer = 6, 1
    kf, vf = caches(B, 4)
    k16, v16 = to_kv16(kf, vf)
    k16[2], v16[2] = 0x7FC0, 0x7FC0  # stream 2 (n = 1) has written nothing: NaN everywhere
    stream, slot, n = (np.array(c, np.int64) for c in zip(*ROWS, strict=True))
    qkv = np.random.default_rng(5).standard_normal((len(ROWS), 3 * C), dtype=np.float32)
    out = np.full((len(ROWS), C), np.nan, np.float32)
    if not cydecode.kv16_ok(C, S, NH):  # another path than avx512 with AVX512_BF16: refused, not run
        with pytest.raises(ValueError, match="bf16 caches"):
            cydecode.attention_rows(out, qkv, k16, v16, stream, slot, n, layer, 0, NH)
        return
    k0, v0 = k16.copy(), v16.copy()
    cydecode.attention_rows(out, qkv, k16, v16, stream, slot, n, layer, 0, NH)
    kall, vall = from_kv16(k0, v0)
    for m, (b, t, _) in enumerate(ROWS):
        kall[b, layer, :, t] = round_bf16(qkv[m, C : 2 * C])
        vall[b, layer, :, t] = round_bf16(qkv[m, 2 * C :]).reshape(NH, HS)
    got_k, got_v = from_kv16(k16, v16)
    np.testing.assert_array_equal(got_k.view(np.uint32), kall.view(np.uint32))  # the appends, nothing else
    np.testing.assert_array_equal(got_v.view(np.uint32), vall.view(np.uint32))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, expected_bf16(qkv, kall, vall, stream, n, layer), rtol=1e-5, atol=2e-6)
    # within bf16's rounding of the float32 attention over the unrounded caches
    kf[2], vf[2] = 0.0, 0.0
    for m, (b, t, _) in enumerate(ROWS):
        kf[b, layer, :, t], vf[b, layer, :, t] = qkv[m, C : 2 * C], qkv[m, 2 * C :].reshape(NH, HS)
    assert np.abs(out - expected(qkv, kf, vf, stream, n, layer)).max() < 2**-6


def test_bf16_caches_a_split_of_the_heads_changes_no_bit():
    if not cydecode.kv16_ok(C, S, NH):
        pytest.skip("bf16 caches need the avx512 path with AVX512_BF16 (the refusal is tested above)")
    B, layer = 6, 0
    stream, slot, n = (np.array(c, np.int64) for c in zip(*ROWS, strict=True))
    qkv = np.random.default_rng(6).standard_normal((len(ROWS), 3 * C), dtype=np.float32)
    whole = np.zeros((len(ROWS), C), np.float32)
    cydecode.attention_rows(whole, qkv, *to_kv16(*caches(B, 7)), stream, slot, n, layer, 0, NH)
    split = np.full((len(ROWS), C), np.nan, np.float32)
    for h0, h1 in [(0, 1), (1, 3), (3, 4)]:
        cydecode.attention_rows(split, qkv, *to_kv16(*caches(B, 7)), stream, slot, n, layer, h0, h1)
        assert np.isnan(split[:, h1 * HS :]).all()
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize("shape", [(C, S + 1, NH), (C, S, 8), (48, S, 2)])  # odd window, HS 8, HS 24
def test_bf16_caches_need_an_even_window_and_heads_of_16(shape):
    assert not cydecode.kv16_ok(*shape)
    Cs, Ss, NHs = shape
    k16, v16 = np.zeros((1, 1, Cs, Ss), np.uint16), np.zeros((1, 1, NHs, Ss, Cs // NHs), np.uint16)
    one = np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="bf16 caches"):
        cydecode.attention_rows(np.zeros((1, Cs), np.float32), np.zeros((1, 3 * Cs), np.float32), k16, v16, one,
                                one, one + 1, 0, 0, NHs)  # fmt: skip

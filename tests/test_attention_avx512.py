"""fastchar._gemm.attention_forward / attention_backward (csrc/attention.c) against the reference, on
every vector path this CPU runs (avx512 and avx2 on an AVX-512 machine, neon on ARM64: the
`vector_path` fixture forces each in turn).

Tolerances are the table's (tests/conftest.py TOL) for the backends' attention kernels, the same on
every path: the scores are the same fp32 dot products summed in a different order (the vector
width changes the order), exp is fc_expf's polynomial within 2 ulp.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastchar import _gemm, isa
from fastchar.backends import reference as ref
from fastchar.errors import ConfigError
from tests.conftest import tol

# (B, T, C, NH): head sizes 16, 32, 48, 64; T = 1, below, across and above the 16-key blocks and the
# 4-row tiles; from T = 128 on the avx512 path runs the portable kernels instead of its intrinsics.
SHAPES = [(1, 1, 16, 1), (2, 5, 32, 2), (3, 17, 64, 4), (2, 33, 96, 2), (2, 64, 128, 8), (1, 100, 256, 4),
          (1, 70, 384, 6), (1, 131, 128, 2), (2, 130, 64, 4)]  # fmt: skip


def _close(got: np.ndarray, want: np.ndarray, kernel: str, name: str) -> None:
    rtol, atol = tol(kernel)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{kernel} {name}")


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_attention_matches_reference(vector_path, rng, B, T, C, NH):
    assert _gemm.attention_supported(C, NH)
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    out = np.full((B, T, C), np.nan, np.float32)
    att = np.full((B, NH, T, T), np.nan, np.float32)  # overwritten entirely, zeros above the diagonal
    _gemm.attention_forward(out, att, qkv)
    want_out, want_att = np.zeros_like(out), np.zeros_like(att)
    ref.attention_forward(want_out, want_att, qkv)
    _close(out, want_out, "attention_forward", "out")
    _close(att, want_att, "attention_forward", "att")
    assert not np.triu(att, k=1).any()

    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dqkv0 = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dqkv, want = dqkv0.copy(), dqkv0.copy()
    datt, want_datt = np.full_like(att, np.nan), np.zeros_like(att)
    for _ in range(2):  # accumulates into dqkv
        _gemm.attention_backward(dqkv, datt, dout, qkv, want_att)
        ref.attention_backward(want, want_datt, dout, qkv, want_att)
    _close(dqkv, want, "attention_backward", "dqkv")


@pytest.mark.parametrize("offset", [0, 1])
def test_streamed_att_matches_reference(vector_path, rng, offset):
    """att of 16 MB and more (here 33.5 MB, the long shape) is written with streaming stores when its
    rows are aligned to the vector (offset 0) and with ordinary ones otherwise (offset 1: att starts
    one float into its buffer); both agree with the reference, on 1 and 2 threads alike."""
    B, T, C, NH = 16, 256, 128, 8
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    buf = np.full(B * NH * T * T + 16, np.nan, np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    att = buf[start : start + B * NH * T * T].reshape(B, NH, T, T)
    out = np.full((B, T, C), np.nan, np.float32)
    want_out, want_att = np.zeros_like(out), np.zeros((B, NH, T, T), np.float32)
    ref.attention_forward(want_out, want_att, qkv)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    want = np.zeros_like(qkv)
    ref.attention_backward(want, np.zeros_like(want_att), dout, qkv, want_att)
    got = []
    for threads in (1, 2):
        att[...] = np.nan
        _gemm.attention_forward(out, att, qkv, threads)
        _close(out, want_out, "attention_forward", "out")
        _close(att, want_att, "attention_forward", "att")
        assert not np.triu(att, k=1).any()
        dqkv = np.full_like(qkv, np.nan)
        _gemm.attention_backward(dqkv, np.empty_like(want_att), dout, qkv, att, threads, True)
        _close(dqkv, want, "attention_backward", "dqkv")
        got.append((out.copy(), att.copy(), dqkv))
    for a, b in zip(*got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_split_heads_without_changing_results(vector_path, rng):
    B, T, C, NH = 3, 40, 64, 4
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    outs = []
    for threads in (1, 2):
        out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
        _gemm.attention_forward(out, att, qkv, threads)
        dqkv, datt = np.zeros_like(qkv), np.empty_like(att)
        _gemm.attention_backward(dqkv, datt, out, qkv, att, threads)
        outs.append((out, att, dqkv))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unsupported_head_size_is_a_clear_error():
    assert not _gemm.attention_supported(24, 3)  # HS = 8
    assert not _gemm.attention_supported(160, 2)  # HS = 80 > 64
    out, att, qkv = (
        np.zeros((1, 4, 24), np.float32),
        np.zeros((1, 3, 4, 4), np.float32),
        np.zeros((1, 4, 72), np.float32),
    )
    with pytest.raises(ConfigError, match="does not handle C=24, NH=3") as e:
        _gemm.attention_forward(out, att, qkv)
    assert "attention_supported" in e.value.hint


def test_generic_path_has_no_vector_attention():
    out, att, qkv = (
        np.zeros((1, 4, 32), np.float32),
        np.zeros((1, 2, 4, 4), np.float32),
        np.zeros((1, 4, 96), np.float32),
    )
    with isa.force("generic"):
        assert not _gemm.attention_supported(32, 2)
        with pytest.raises(ConfigError, match="on this path") as e:
            _gemm.attention_forward(out, att, qkv)
        assert "vector path" in e.value.hint


def test_mismatched_shapes():
    out, att, qkv = (
        np.zeros((1, 4, 32), np.float32),
        np.zeros((1, 2, 5, 5), np.float32),
        np.zeros((1, 4, 96), np.float32),
    )
    with pytest.raises(ConfigError, match="do not agree"):
        _gemm.attention_forward(out, att, qkv)


@pytest.mark.parametrize("B,T,C,NH", [(1, 1, 16, 1), (2, 17, 32, 2), (3, 33, 64, 4), (2, 64, 128, 8), (1, 129, 96, 2)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_dropout_matches_reference(vector_path, rng, B, T, C, NH, p):
    key = 0xDEADBEEF
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    out, att = np.full((B, T, C), np.nan, np.float32), np.full((B, NH, T, T), np.nan, np.float32)
    _gemm.attention_dropout_forward(out, att, qkv, key, p)
    want_out, want_att = np.zeros_like(out), np.zeros_like(att)
    ref.attention_dropout_forward(want_out, want_att, qkv, key, p)
    _close(out, want_out, "attention_forward", "out")
    _close(att, want_att, "attention_forward", "att (before dropout)")

    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dqkv0 = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dqkv, want = dqkv0.copy(), dqkv0.copy()
    datt, want_datt = np.full_like(att, np.nan), np.zeros_like(att)
    _gemm.attention_dropout_backward(dqkv, datt, dout, qkv, want_att, key, p)
    ref.attention_dropout_backward(want, want_datt, dout, qkv, want_att, key, p)
    _close(dqkv, want, "attention_backward", "dqkv")


def test_attention_dropout_masks_differ_by_key_and_p0_is_plain(vector_path, rng):
    B, T, C, NH = 2, 40, 64, 4
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    outs = []
    for key, p in ((1, 0.3), (2, 0.3), (1, 0.0)):
        out, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
        _gemm.attention_dropout_forward(out, att, qkv, key, p)
        outs.append(out)
    plain, att = np.empty((B, T, C), np.float32), np.empty((B, NH, T, T), np.float32)
    _gemm.attention_forward(plain, att, qkv)
    assert not np.allclose(outs[0], outs[1])
    np.testing.assert_array_equal(outs[2], plain)
    with pytest.raises(ValueError, match="dropout p"):
        _gemm.attention_dropout_forward(plain, att, qkv, 1, 1.0)

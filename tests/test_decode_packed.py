"""The packed products of the compiled decode loops (fc_matmul_packed in csrc/fc_decode.c), fp32 on every
vector path this CPU runs (forced in turn: avx512 and avx2 on an AVX-512 machine), bf16 on AVX512_BF16.

Every output element is one fused multiply-add chain over k from zero, so a row's values do not
depend on the other rows of the batch nor on how the columns are split between threads: the tests
check that bit for bit, the masked edges (columns outside j0:j1 untouched, widths that are not a
multiple of 16), and agreement with float64 products to float32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastchar import isa
from fastchar.backends.reference import round_bf16
from tests.conftest import VECTOR_PATHS

cydecode = pytest.importorskip("fastchar._cydecode", reason="the Cython extension is part of the product: build it")

# (precision, path); the tolerances below are the same on every path (only the fp32 summation differs:
# each element is one FMA chain over k, whatever the vector width)
ENGINES = [pytest.param(("fp32", p), id=f"fp32-{p}") for p in VECTOR_PATHS] + [
    pytest.param(
        ("bf16", "avx512"),
        id="bf16-avx512",
        marks=pytest.mark.skipif(not cydecode.packed_available("bf16"), reason="no AVX512_BF16"),
    )
]


@pytest.fixture(params=ENGINES)
def precision(request: pytest.FixtureRequest):
    prec, path = request.param
    with isa.force(path):
        yield prec


def product(x: np.ndarray, w: np.ndarray, j0: int, j1: int, precision: str) -> np.ndarray:
    y = np.full((x.shape[0], w.shape[1]), np.nan, np.float32)
    cydecode.matmul_packed(y, x, w, j0, j1, precision)
    return y


@pytest.mark.parametrize("M, K, N", [(1, 128, 384), (3, 24, 72), (64, 128, 65), (13, 7, 1), (9, 33, 49), (8, 512, 128)])
def test_packed_product_equals_float64_and_leaves_other_columns(M, K, N, precision):
    # bf16: the products of bf16 inputs are exact in fp32, so against float64 on the rounded inputs
    # only the fp32 accumulation differs, as in fp32 (K terms: rtol 1e-5, atol 1e-5 sqrt(K))
    r = np.random.default_rng(M * 1000 + N)
    x = r.normal(size=(M, K)).astype(np.float32)
    w = r.normal(size=(K, N)).astype(np.float32)
    if precision == "bf16":
        exact = round_bf16(x).astype(np.float64) @ round_bf16(w).astype(np.float64)
    else:
        exact = x.astype(np.float64) @ w.astype(np.float64)
    for j0, j1 in [(0, N), (N // 3, N - N // 4), (min(5, N), min(21, N)), (N, N)]:
        y = product(x, w, j0, j1, precision)
        np.testing.assert_allclose(y[:, j0:j1], exact[:, j0:j1], rtol=1e-5, atol=1e-5 * np.sqrt(K))
        assert np.isnan(y[:, :j0]).all() and np.isnan(y[:, j1:]).all(), "wrote outside the column range"


def test_a_rows_values_do_not_depend_on_the_batch_or_the_column_split(precision):
    r = np.random.default_rng(1)
    x = r.normal(size=(64, 128)).astype(np.float32)
    w = r.normal(size=(128, 200)).astype(np.float32)
    whole = product(x, w, 0, 200, precision)
    # every batch of 4 to 16 rows: each path's mix of tiles (avx2: 6, 4 and 3 rows; 7 and 8 are 4 + 3 and 4 + 4)
    for rows in ([0], [5, 6], [7, 8, 9], *(list(range(m)) for m in range(4, 17)), list(range(3, 64))):
        np.testing.assert_array_equal(product(x[rows], w, 0, 200, precision), whole[rows])
    split = np.full_like(whole, np.nan)
    for j0, j1 in [(0, 40), (40, 77), (77, 160), (160, 200)]:
        cydecode.matmul_packed(split, x, w, j0, j1, precision)
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize("M", [1, 3, 17])
def test_a_part_of_k_is_its_own_chain_and_the_parts_sum_to_the_product(M, precision):
    """x[:, k0:k1] @ w[k0:k1] (a fused stage's part): float64 agreement, nothing written outside the
    columns, and parts of 16-column blocks add up to the whole product to float32 rounding."""
    r = np.random.default_rng(M)
    K, N = 96, 72
    x = r.normal(size=(M, K)).astype(np.float32)
    w = r.normal(size=(K, N)).astype(np.float32)
    xr, wr = (round_bf16(x), round_bf16(w)) if precision == "bf16" else (x, w)
    parts = []
    for k0, k1 in [(0, 32), (32, 80), (80, 96)]:
        exact = xr[:, k0:k1].astype(np.float64) @ wr[k0:k1].astype(np.float64)
        y = np.full((M, N), np.nan, np.float32)
        cydecode.matmul_packed(y, x, w, 5, 70, precision, k0, k1)
        np.testing.assert_allclose(y[:, 5:70], exact[:, 5:70], rtol=1e-5, atol=1e-5 * np.sqrt(K))
        assert np.isnan(y[:, :5]).all() and np.isnan(y[:, 70:]).all()
        one = np.full((1, N), np.nan, np.float32)
        cydecode.matmul_packed(one, x[M - 1 :], w, 5, 70, precision, k0, k1)
        np.testing.assert_array_equal(one[0, 5:70], y[M - 1, 5:70])  # the batch does not matter
        parts.append(y[:, 5:70])
    whole = product(x, w, 0, N, precision)[:, 5:70]
    np.testing.assert_allclose(parts[0] + parts[1] + parts[2], whole, rtol=1e-5, atol=1e-5 * np.sqrt(K))
    with pytest.raises(ValueError, match="k0"):
        cydecode.matmul_packed(y, x, w, 0, N, precision, 40, 40)


def test_pack_weights_follows_the_path():
    """Every vector path packs the same weights (16-column panels on every vector width); generic packs none."""
    code = (
        "import numpy as np; from fastchar import Model, ModelConfig; from fastchar.graph import decode_table;"
        "import fastchar._cydecode as d; m = Model(ModelConfig(), backend='cython');"
        "p, o, *_ = d.pack_weights(m.params.flat, decode_table(m.cfg, m.params.offsets, 64).table);"
        "print(p.size, int((o >= 0).sum()), p.ctypes.data % 64)"
    )
    for path in isa.runnable():
        env = {**os.environ, "FASTCHAR_ISA": path}
        size, products, align = map(
            int, subprocess.check_output([sys.executable, "-c", code], text=True, env=env).split()
        )
        if path != "generic":
            assert products == 4 * 4 + 1 and align == 0, path  # qkv (with attention), proj, fc, fc2 per layer; head
            assert size == 4 * (128 * (384 + 128 + 512) + 512 * 128) + 128 * 80, path  # the head: 65 columns -> 80
        else:
            assert size == 0


@pytest.mark.skipif(not cydecode.packed_available("bf16"), reason="no AVX512_BF16")
def test_bf16_rounding_of_inputs_matches_round_bf16_on_edge_values():
    # ties to even, subnormals (to zero), signed zeros, values near the rounding boundary
    edge = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1e-40, -1e-39, -0.0, 3.0e38, -65504.0, 1.00390625, 0.1, -2.5e-38],
                    np.float32)  # fmt: skip
    x = np.ascontiguousarray(np.tile(edge, (3, 4))[:, :37])  # K = 37: a ragged last group and an odd depth
    w = np.zeros((37, 5), np.float32)
    np.fill_diagonal(w, 1.0)  # picks x's first 5 values (rounded) exactly
    y = np.full((3, 5), np.nan, np.float32)
    cydecode.matmul_packed(y, x, w, 0, 5, "bf16")
    np.testing.assert_array_equal(y, round_bf16(x[:, :5]))
    w2 = np.zeros((37, 5), np.float32)
    w2[32:37, :] = np.eye(5, dtype=np.float32)  # the ragged tail, past the first 32 inputs
    cydecode.matmul_packed(y, x, w2, 0, 5, "bf16")
    np.testing.assert_array_equal(y, round_bf16(x[:, 32:37]))

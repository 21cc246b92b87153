"""fastchar._gemm (csrc/gemm_bf16.c): the packed bf16 and fp32 matrix products against NumPy.

Tolerance. Each product is compared with a float64 NumPy product of the same inputs (for bf16: of
`round_bf16` of the inputs, which is exactly what the kernel multiplies; the test of round_bf16
below checks that bit for bit). A product of two bf16 values is exact in fp32 (8 + 8 significant
bits < 24), so the only difference left is the order and precision of the fp32 summation:
recursive fp32 sums of K terms err by about sqrt(K) ulps of sum_k |a_ik b_kj| in practice and at
most K ulps. We allow RTOL = 1e-5 of sum_k |a_ik||b_kj| (~170 ulps): loose enough for K in the
thousands, yet a single missing, doubled or wrongly rounded term among K <= 1100 moves an output by
more than 1/K ~ 1e-3 of that sum, 100x the tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastchar import _gemm, isa
from fastchar.backends import reference as ref
from fastchar.backends.reference import round_bf16
from fastchar.errors import ConfigError
from tests.conftest import VECTOR_PATHS

RTOL = 1e-5  # of sum_k |a_ik| |b_kj|, see the module docstring

needs_bf16 = pytest.mark.skipif(
    not _gemm.cpu_features()["avx512_bf16"], reason="this CPU has no AVX512_BF16 (vdpbf16ps)"
)

# (M, N, K): ones, odd sizes below and across the 8 x 48 / 8 x 32 register tiles, the model's
# shapes (N = 768 rows, C = 128, V = 65), K above one packed depth block (512 bf16 / 256 fp32)
# and N above one packed column block (768); K = 1024 makes A's rows 4 KiB apart (copied, not read in
# place, by the fp32 engines), K = 512 2 KiB apart (read in place by the AVX2 engine, but for the
# ragged last panel of M = 31; copied by the AVX-512 one).
SHAPES = [
    (1, 1, 1),
    (1, 17, 2),
    (5, 7, 3),
    (9, 33, 31),
    (13, 65, 129),
    (100, 50, 33),
    (130, 97, 600),
    (9, 50, 1100),
    (20, 800, 40),
    (768, 384, 128),
    (50, 40, 1024),
    (31, 40, 512),
]
# (precision, path): bf16 where the CPU has AVX512_BF16, fp32 on every vector path this CPU runs (AVX-512
# machines test the AVX2 engine too). Same tolerance on every path: the engines differ only in the
# order of the fp32 sums (tile shapes), which RTOL covers.
ENGINES = [pytest.param(("bf16", "avx512"), id="bf16-avx512", marks=needs_bf16)] + [
    pytest.param(("fp32", p), id=f"fp32-{p}") for p in VECTOR_PATHS
]


@pytest.fixture(params=ENGINES)
def precision(request: pytest.FixtureRequest):
    """The precision of the products under test, with the kernels forced onto its path."""
    prec, path = request.param
    with isa.force(path):
        yield prec


def _want(a: np.ndarray, b: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(exact product in float64, sum |a||b|) of the values the kernel multiplies."""
    if precision == "bf16":
        a, b = round_bf16(a), round_bf16(b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return a64 @ b64, np.abs(a64) @ np.abs(b64)


def _assert_close(got: np.ndarray, want: np.ndarray, scale: np.ndarray, what: str) -> None:
    err = np.abs(got.astype(np.float64) - want)
    bound = RTOL * scale + 1e-30
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: max |diff| {err.max():.3g}, worst at {worst}: diff {err[worst]:.3g} > {bound[worst]:.3g}"
    )


def _operands(rng: np.random.Generator, M: int, N: int, K: int, ta: bool, tb: bool):
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    return a, b, (a.T if ta else a), (b.T if tb else b)


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_gemm_matches_numpy(rng, precision, ta, tb, M, N, K):
    a, b, A, B = _operands(rng, M, N, K, ta, tb)
    c = np.full((M, N), np.nan, np.float32)  # beta = 0 must overwrite, never read, the output
    _gemm.gemm(c, a, b, ta, tb, 0.0, precision)
    want, scale = _want(A, B, precision)
    _assert_close(c, want, scale, f"{precision} gemm M,N,K={M},{N},{K} trans={ta},{tb}")


@pytest.mark.parametrize("beta", [1.0, 0.5, -2.0])
@pytest.mark.parametrize("M,N,K", [(13, 65, 129), (9, 50, 1100)])
def test_gemm_beta_accumulates(rng, precision, beta, M, N, K):
    a, b, A, B = _operands(rng, M, N, K, False, False)
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    c = c0.copy()
    _gemm.gemm(c, a, b, False, False, beta, precision)
    want, scale = _want(A, B, precision)
    _assert_close(c, beta * c0.astype(np.float64) + want, scale + abs(beta) * np.abs(c0), f"beta={beta}")


@pytest.mark.parametrize("N,IC,OC", [(1, 1, 1), (7, 5, 3), (768, 128, 65), (50, 128, 384), (33, 512, 128)])
def test_linear_layer_products(rng, precision, N, IC, OC):
    """matmul_forward / matmul_backward: the reference's kernels on the rounded inputs, backward twice
    into nonzero gradients (they accumulate)."""
    inp = rng.standard_normal((N, IC)).astype(np.float32)
    w = (rng.standard_normal((IC, OC)) * IC**-0.5).astype(np.float32)
    dout = rng.standard_normal((N, OC)).astype(np.float32)
    r = round_bf16 if precision == "bf16" else (lambda x: x)

    out = np.full((N, OC), np.nan, np.float32)
    _gemm.matmul_forward(out, inp, w, precision=precision)
    want, scale = _want(inp, w, precision)
    _assert_close(out, want, scale, f"{precision} matmul_forward out")

    dinp0 = rng.standard_normal((N, IC)).astype(np.float32)
    dw0 = rng.standard_normal((IC, OC)).astype(np.float32)
    dinp, dw = dinp0.copy(), dw0.copy()
    _gemm.matmul_backward(dinp, dw, dout, inp, w, precision=precision)
    _gemm.matmul_backward(dinp, dw, dout, inp, w, precision=precision)
    want_dinp, want_dw = dinp0.astype(np.float64), dw0.astype(np.float64)
    for _ in range(2):
        ref.matmul_backward(
            want_dinp, want_dw, r(dout).astype(np.float64), r(inp).astype(np.float64), r(w).astype(np.float64)
        )
    s_dinp = np.abs(dinp0) + 2 * (np.abs(r(dout)).astype(np.float64) @ np.abs(r(w)).T)
    s_dw = np.abs(dw0) + 2 * (np.abs(r(inp)).astype(np.float64).T @ np.abs(r(dout)))
    _assert_close(dinp, want_dinp, s_dinp, f"{precision} matmul_backward dinp")
    _assert_close(dw, want_dw, s_dw, f"{precision} matmul_backward dweight")


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize(
    "M,N,K",
    [(203, 130, 700), (130, 203, 700), (768, 65, 128), (128, 384, 768), (40, 1000, 50), (14, 9, 700), (96, 96, 300)],
    ids=["rows-ragged", "columns-ragged", "lm-head", "base-dW", "two-column-blocks", "few-row-panels", "square"],
)
def test_threads_do_not_change_the_result(rng, precision, threads, ta, tb, M, N, K):
    """Threads take slices of C's rows where M > N, else of its columns, whole panels each (fewer
    threads where there are fewer panels); every element is summed in the same order, so every thread
    count gives the same bits, with beta = 0 (the NaN output never read) and beta = 1 (accumulating),
    and the slices cover C exactly."""
    a, b, A, B = _operands(rng, M, N, K, ta, tb)
    start = rng.standard_normal((M, N)).astype(np.float32)
    for beta in (0.0, 1.0):
        one = np.full((M, N), np.nan, np.float32) if beta == 0.0 else start.copy()
        many = one.copy()
        _gemm.gemm(one, a, b, ta, tb, beta, precision, 1)
        _gemm.gemm(many, a, b, ta, tb, beta, precision, threads)
        np.testing.assert_array_equal(many, one)
        want, scale = _want(A, B, precision)
        if beta:
            want, scale = want + start, scale + np.abs(start)
        _assert_close(many, want, scale, f"{precision} M,N,K={M},{N},{K} beta={beta} threads={threads}")


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "M,N,K",
    [(768, 1024, 256), (256, 1024, 768), (37, 1000, 333), (50, 97, 1100), (9, 1, 17)],
    ids=["wide-fc-fwd", "wide-fc-dW", "odd-two-column-blocks", "ragged-two-depth-blocks", "one-column"],
)
def test_bf16_k_major_b_in_depth_slices(rng, threads, M, N, K):
    """The bf16 k-major B (the forward's weights, dW's dout) is packed in depth slices shared out
    between the threads: wide's N = 1024 products, an odd depth whose last slice ends in half a
    pair, ragged panels across two column blocks, two depth blocks; every thread count the same sums."""
    for ta in (False, True):
        a, b, A, B = _operands(rng, M, N, K, ta, False)
        c = np.full((M, N), np.nan, np.float32)
        with isa.force("avx512"):
            _gemm.gemm(c, a, b, ta, False, 0.0, "bf16", threads)
        want, scale = _want(A, B, "bf16")
        _assert_close(c, want, scale, f"bf16 M,N,K={M},{N},{K} trans_a={ta} threads={threads}")
        if threads > 1:
            one = np.empty_like(c)
            with isa.force("avx512"):
                _gemm.gemm(one, a, b, ta, False, 0.0, "bf16", 1)
            np.testing.assert_array_equal(c, one)


@needs_bf16
def test_bf16_keeps_nan_and_inf(rng):
    a = rng.standard_normal((9, 20)).astype(np.float32)
    b = rng.standard_normal((20, 40)).astype(np.float32)
    a[3, 5], a[6, 7] = np.nan, np.inf
    c = np.zeros((9, 40), np.float32)
    with isa.force("avx512"):  # the bf16 products' path, also when FASTCHAR_ISA chose a lower one
        _gemm.gemm(c, a, b, precision="bf16")
    assert np.isnan(c[3]).all() and not np.isfinite(c[6]).any()
    assert np.isfinite(np.delete(c, [3, 6], axis=0)).all()


def test_round_bf16():
    x = np.array(
        [1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8), 1.0 + 2.0**-8 + 2.0**-20, 3.4e38, 1e-39, -1e-39, 0.0],
        np.float32,
    )
    want = np.array([1.0, 1.0 + 2.0**-6, -1.0, 1.0 + 2.0**-7, np.inf, 0.0, -0.0, 0.0], np.float32)
    np.testing.assert_array_equal(round_bf16(x), want)
    assert np.signbit(round_bf16(np.float32(-1e-39)))
    assert np.isnan(round_bf16(np.array([np.nan], np.float32))).all()
    y = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    r = round_bf16(y)
    assert r.shape == y.shape and not (r.view(np.uint32) & 0xFFFF).any()
    assert np.all(np.abs(r - y) <= 2.0**-8 * np.abs(y))  # half an ulp of an 8-bit significand


@needs_bf16
def test_round_bf16_is_what_the_kernel_multiplies(rng):
    """Every input value times 1.0, over 120 binades: the kernel's rounding, bit for bit."""
    x = (rng.standard_normal(4000) * np.exp(rng.uniform(-80, 80, 4000))).astype(np.float32)
    c = np.zeros((x.size, 1), np.float32)
    with isa.force("avx512"):
        _gemm.gemm(c, x[:, None].copy(), np.ones((1, 1), np.float32), precision="bf16")
    np.testing.assert_array_equal(c[:, 0], round_bf16(x))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """python -c code in a fresh process (FASTCHAR_ISA and FASTCHAR_DISABLE_BF16 are read once per process)."""
    full = {k: v for k, v in os.environ.items() if k not in ("FASTCHAR_ISA", "FASTCHAR_DISABLE_BF16")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**full, **env})


@needs_bf16
def test_bf16_off_below_avx512_is_a_clear_error():
    """On the avx2 path (or with FASTCHAR_DISABLE_BF16=1) the bf16 products refuse with a hint."""
    c, a, b = np.zeros((2, 3), np.float32), np.ones((2, 4), np.float32), np.ones((4, 3), np.float32)
    before = _gemm.has_avx512bf16()  # False when FASTCHAR_ISA chose avx2 for the whole run
    with isa.force("avx2"):
        assert _gemm.has_avx512bf16() is False
        with pytest.raises(ConfigError, match="bf16 matrix products are unavailable") as e:
            _gemm.gemm(c, a, b, precision="bf16")
        assert "fp32" in e.value.hint
        with pytest.raises(ConfigError, match="unavailable"):
            _gemm.matmul_forward(c, a, b)
        _gemm.gemm(c, a, b, precision="fp32")  # fp32 is unaffected
        np.testing.assert_array_equal(c, np.full((2, 3), 4.0, np.float32))
    assert _gemm.has_avx512bf16() is before  # back on the path in use before


def test_disable_bf16_switch_is_read_by_python():
    code = "from fastchar import _gemm, isa; print(_gemm.has_avx512bf16(), _gemm.has_fp32(), isa.selection().bf16)"
    out = _run(code, FASTCHAR_DISABLE_BF16="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", str(bool(VECTOR_PATHS)), "False"]


def test_generic_path_has_no_packed_products():
    c = np.zeros((2, 2), np.float32)
    with isa.force("generic"):
        assert not _gemm.has_avx512bf16() and not _gemm.has_fp32()
        assert _gemm.isa_in_use() == (isa.CODES["generic"], False)
        for precision in ("bf16", "fp32"):
            with pytest.raises(ConfigError):
                _gemm.gemm(c, c, c, precision=precision)


def test_cpu_report_matches_the_path():
    sel = isa.selection()
    assert sel.best == sel.runnable[0] and sel.path == (sel.forced or sel.best)
    assert _gemm.isa_in_use() == (isa.CODES[sel.path], sel.bf16)
    assert sel.bf16 == _gemm.has_avx512bf16() == (_gemm.cpu_features()["avx512_bf16"] and sel.path == "avx512")
    assert _gemm.has_fp32() == (sel.path != "generic")
    assert ("avx512" in sel.runnable) == _gemm.cpu_features()["avx512f"]
    assert ("avx2" in sel.runnable) == _gemm.cpu_features()["avx2"]


def test_forced_path_from_the_environment():
    """FASTCHAR_ISA picks a lower path; a higher or unknown one is a one-line error with a hint."""
    for path in isa.runnable():
        out = _run("from fastchar import _gemm; print(*_gemm.isa_in_use())", FASTCHAR_ISA=path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(isa.CODES[path]), str(path == "avx512" and isa.selection().bf16_cpu)]
    higher = "neon" if "neon" not in isa.runnable() else "avx512"
    for bad, message in ((higher, f"cannot run the {higher} path"), ("sse9", "not an instruction-set path")):
        out = _run("from fastchar.cli import main; raise SystemExit(main(['info']))", FASTCHAR_ISA=bad)
        assert out.returncode != 0
        lines = out.stderr.strip().splitlines()
        assert lines[0].startswith("error: FASTCHAR_ISA") and message in lines[0], out.stderr
        assert lines[1].startswith("hint:") and "Traceback" not in out.stderr


def test_bad_arguments(vector_path):
    c = np.zeros((3, 4), np.float32)
    with pytest.raises(ConfigError, match="shapes do not match"):
        _gemm.gemm(c, np.zeros((3, 5), np.float32), np.zeros((6, 4), np.float32), precision="fp32")
    with pytest.raises(ConfigError, match="precision"):
        _gemm.gemm(c, np.zeros((3, 5), np.float32), np.zeros((5, 4), np.float32), precision="fp16")
    # K = 0: the product is empty, C = beta * C
    c[:] = 2.0
    _gemm.gemm(c, np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32), beta=0.5, precision="fp32")
    np.testing.assert_array_equal(c, np.ones((3, 4), np.float32))


@pytest.mark.parametrize("disable", [False, True])
def test_info_says_whether_bf16_is_there(disable):
    code = "from fastchar.cli import main; raise SystemExit(main(['info']))"
    out = _run(code, **({"FASTCHAR_DISABLE_BF16": "1"} if disable else {}))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    line = next(x for x in lines if x.startswith("cpu AVX512_BF16"))
    has = _gemm.cpu_features()["avx512_bf16"]
    assert line.split(": ")[1].startswith("yes;" if has else "no;")
    assert line.endswith("products available") == (has and not disable)
    assert ("unavailable" in line) == (disable or not has)
    path = next(x for x in lines if x.startswith("kernel path: "))
    assert path.startswith(f"kernel path: {isa.selection().best} (the best of this CPU)")
    assert f"this CPU runs {', '.join(isa.runnable())}" in path

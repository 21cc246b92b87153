"""Every kernel of every compiled backend against the NumPy reference, in float32.

Shapes cover T = 1, C not a multiple of 8 or 16, B*T not a multiple of common tile sizes, the base
model's real shape, and one head of 128 channels (the Cython attention's fallback path). Outputs,
saved buffers and every gradient are compared; backward kernels start from non-zero gradients, so
accumulation (+=) is tested too. Dropout kernels run with the (key, p) of
fastchar/backends/cases.py; with p = 0 they must equal the plain kernels bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import compiled_backends, tol

from fastchar.backends import KERNELS, get_backend
from fastchar.backends import reference as ref
from fastchar.backends.cases import make_args

# (B, T, C, NH, V)
SHAPES = [
    (2, 5, 12, 3, 7),
    (1, 1, 16, 2, 5),
    (3, 7, 20, 4, 11),
    (2, 13, 36, 6, 65),
    (2, 64, 128, 8, 65),
    (1, 33, 128, 1, 5),  # HS * T beyond the Cython attention's stack scratch: its fallback path
]

SCRATCH = {"attention_backward": {"datt"}, "attention_dropout_backward": {"datt"}}


def copy_args(args: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}C{}NH{}V{}".format(*s))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_kernel_matches_reference(backend_name: str, kernel: str, shape: tuple) -> None:
    check_kernel(backend_name, getattr(get_backend(backend_name), kernel), kernel, shape)


def _avx2_kernels():
    """fastchar._cykernels_avx2 where the avx2 or avx512 path runs and it is built (x86-64), else None."""
    from fastchar import isa
    from fastchar.backends.cython_cpu import isa_kernels

    try:
        module = isa_kernels(isa.selection().path)
    except ImportError:
        return None
    return module if module.__name__ == "fastchar._cykernels_avx2" else None


@pytest.mark.skipif(
    "cython" not in compiled_backends() or _avx2_kernels() is None,
    reason="fastchar._cykernels_avx2 runs on x86-64 CPUs with AVX2 + FMA only (and FASTCHAR_ISA above generic)",
)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}C{}NH{}V{}".format(*s))
@pytest.mark.parametrize("kernel", KERNELS)
def test_avx2_build_of_cython_kernels_matches_reference(kernel: str, shape: tuple) -> None:
    """The Cython kernels compiled with AVX2 + FMA (the avx2 and avx512 paths' element-wise kernels),
    against the reference with the same tolerances."""
    check_kernel("cython (AVX2 + FMA)", getattr(_avx2_kernels(), kernel), kernel, shape)


def check_kernel(backend_name: str, fn, kernel: str, shape: tuple) -> None:
    """fn (backend_name's `kernel`) against the reference at one shape: outputs, saved buffers, gradients."""
    r = np.random.default_rng(zlib.crc32(repr((kernel, shape)).encode()))
    args = make_args(kernel, shape, r)
    expected, actual = copy_args(args), copy_args(args)
    for name in SCRATCH.get(kernel, ()):  # scratch holds garbage: a kernel must write before it reads
        actual[name].fill(np.nan)
    want = getattr(ref, kernel)(*expected.values())
    got = fn(*actual.values())
    rtol, atol = tol(kernel)
    if kernel == "grad_norm":
        assert got == pytest.approx(want, rel=rtol), f"{backend_name}.{kernel}: {got} != {want}"
        return
    assert got is None, f"{backend_name}.{kernel} must return None"
    for name, value in expected.items():
        if not isinstance(value, np.ndarray) or name in SCRATCH.get(kernel, ()):
            continue
        diff = float(np.max(np.abs(actual[name] - value))) if value.size else 0.0
        assert np.all(np.isfinite(actual[name])), f"{backend_name}.{kernel}: {name} has non-finite values"
        assert np.allclose(actual[name], value, rtol=rtol, atol=atol), (
            f"{backend_name}.{kernel}: {name} differs from the reference, max abs diff {diff:.3g}"
        )


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_backend_defines_every_kernel(backend_name: str) -> None:
    """Every kernel of every op record is the backend's own, unless the backend declares it in its
    FALLBACK set (then it must be the reference's, and `fastchar info` names it)."""
    backend = get_backend(backend_name)
    for kernel in KERNELS:
        if kernel in backend.fallback:
            assert getattr(backend, kernel) is getattr(ref, kernel), f"{backend_name}.{kernel}: declared fallback"
        else:
            assert getattr(backend, kernel) is not getattr(ref, kernel), f"{backend_name}.{kernel} is the reference"


def test_kernels_come_from_the_op_records() -> None:
    """KERNELS is derived from fastchar/ops.py: each record's pair, every record with a test case."""
    from fastchar.ops import RECORDS

    assert KERNELS == tuple(k for rec in RECORDS.values() for k in rec.kernel_names)
    for name in ("layernorm", "gelu", "matmul_t"):
        assert {name + "_forward", name + "_backward"} <= set(KERNELS), name
    assert all(rec.case is not None for rec in RECORDS.values())


def test_a_declared_fallback_is_the_reference(monkeypatch) -> None:
    """A backend may land a new op as the reference plus nothing: listing the kernel in FALLBACK."""
    import fastchar.backends as backends
    from fastchar.backends import numba_cpu

    monkeypatch.setattr(numba_cpu, "FALLBACK", frozenset({"gelu_forward", "gelu_backward"}))
    backends._load.cache_clear()
    try:
        backend = backends._load("numba")
        assert backend.fallback == {"gelu_forward", "gelu_backward"}
        assert backend.gelu_forward is ref.gelu_forward and backend.layernorm_forward is numba_cpu.layernorm_forward
    finally:
        backends._load.cache_clear()


@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[5]], ids=lambda s: "B{}T{}C{}NH{}V{}".format(*s))
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_attention_dropout_p0_is_attention(backend_name: str, shape: tuple) -> None:
    """p = 0 keeps every probability: the dropout kernels give the plain kernels' results exactly."""
    backend = get_backend(backend_name)
    r = np.random.default_rng(11)
    fwd = make_args("attention_forward", shape, r)
    plain, drop = copy_args(fwd), copy_args(fwd)
    backend.attention_forward(*plain.values())
    backend.attention_dropout_forward(*drop.values(), 12345, 0.0)
    bwd = make_args("attention_backward", shape, r)
    plain_b, drop_b = copy_args(bwd), copy_args(bwd)
    backend.attention_backward(*plain_b.values())
    backend.attention_dropout_backward(*drop_b.values(), 12345, 0.0)
    for name, got, want in [
        ("out", drop["out"], plain["out"]),
        ("att", drop["att"], plain["att"]),
        ("dqkv", drop_b["dqkv"], plain_b["dqkv"]),
    ]:
        diff = float(np.max(np.abs(got - want)))
        assert np.array_equal(got, want), f"{backend_name}: p=0 {name} differs, max abs diff {diff:.3g}"


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_dropout_in_place(backend_name: str) -> None:
    r = np.random.default_rng(12)
    inp = r.standard_normal((3, 7, 20)).astype(np.float32)
    expected = np.zeros_like(inp)
    ref.dropout_forward(expected, inp, 12345, 0.3)
    get_backend(backend_name).dropout_forward(inp, inp, 12345, 0.3)
    assert np.array_equal(inp, expected), f"{backend_name}.dropout_forward in place differs from the reference"

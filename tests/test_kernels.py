"""Every kernel of every compiled backend against the NumPy reference, in float32.

Shapes cover T = 1, C not a multiple of 8 or 16, B*T not a multiple of common tile sizes, and the
base model's real shape. Outputs, saved buffers and every gradient are compared; backward kernels
start from non-zero gradients, so accumulation (+=) is tested too.
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
]

SCRATCH = {"attention_backward": {"datt"}}


def copy_args(args: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}C{}NH{}V{}".format(*s))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_kernel_matches_reference(backend_name: str, kernel: str, shape: tuple) -> None:
    r = np.random.default_rng(zlib.crc32(repr((kernel, shape)).encode()))
    args = make_args(kernel, shape, r)
    expected, actual = copy_args(args), copy_args(args)
    want = getattr(ref, kernel)(*expected.values())
    got = getattr(get_backend(backend_name), kernel)(*actual.values())
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
    backend = get_backend(backend_name)
    assert not backend.fallback, f"{backend_name} falls back to the reference for {sorted(backend.fallback)}"
    for kernel in KERNELS:
        assert getattr(backend, kernel) is not getattr(ref, kernel), f"{backend_name}.{kernel} is the reference"

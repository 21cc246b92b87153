"""Every kernel of every compiled backend against the NumPy reference, in float32.

Shapes cover T = 1, C not a multiple of 8 or 16, B*T not a multiple of common tile sizes, and the
base model's real shape. Outputs, saved buffers and every gradient are compared; backward kernels
start from non-zero gradients, so accumulation (+=) is tested too.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compiled_backends, tol

from fastchar.backends import KERNELS, get_backend
from fastchar.backends import reference as ref

# (B, T, C, NH, V)
SHAPES = [
    (2, 5, 12, 3, 7),
    (1, 1, 16, 2, 5),
    (3, 7, 20, 4, 11),
    (2, 13, 36, 6, 65),
    (2, 64, 128, 8, 65),
]

SCRATCH = {"attention_backward": {"datt"}}


def f32(r: np.random.Generator, *shape: int) -> np.ndarray:
    return r.standard_normal(shape).astype(np.float32)


def make_args(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    """Arguments of `kernel` in signature order: arrays (grads pre-filled non-zero) and scalars."""
    B, T, C, NH, V = shape
    H = 4 * C
    N = B * T
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    if kernel == "embedding_forward":
        return {"out": f32(r, B, T, C), "idx": idx, "wte": f32(r, V, C), "wpe": f32(r, T + 3, C)}
    if kernel == "embedding_backward":
        idx[0, : min(T, 3)] = 1  # repeated tokens accumulate into one row
        return {"dwte": f32(r, V, C), "dwpe": f32(r, T + 3, C), "dout": f32(r, B, T, C), "idx": idx}
    if kernel == "rmsnorm_forward":
        return {"out": f32(r, B, T, C), "rstd": f32(r, B, T), "inp": f32(r, B, T, C), "weight": f32(r, C), "eps": 1e-5}
    if kernel == "rmsnorm_backward":
        inp, weight = f32(r, B, T, C), f32(r, C)
        rstd = (1 / np.sqrt(np.mean(inp * inp, -1) + 1e-5)).astype(np.float32)
        return {
            "dinp": f32(r, B, T, C),
            "dweight": f32(r, C),
            "dout": f32(r, B, T, C),
            "inp": inp,
            "weight": weight,
            "rstd": rstd,
        }
    if kernel == "matmul_forward":
        return {"out": f32(r, N, H), "inp": f32(r, N, C), "weight": f32(r, C, H)}
    if kernel == "matmul_backward":
        return {
            "dinp": f32(r, N, C),
            "dweight": f32(r, C, H),
            "dout": f32(r, N, H),
            "inp": f32(r, N, C),
            "weight": f32(r, C, H),
        }
    if kernel == "attention_forward":
        return {"out": f32(r, B, T, C), "att": f32(r, B, NH, T, T), "qkv": f32(r, B, T, 3 * C)}
    if kernel == "attention_backward":
        qkv = f32(r, B, T, 3 * C)
        att = np.zeros((B, NH, T, T), np.float32)
        ref.attention_forward(np.zeros((B, T, C), np.float32), att, qkv)
        return {
            "dqkv": f32(r, B, T, 3 * C),
            "datt": f32(r, B, NH, T, T),
            "dout": f32(r, B, T, C),
            "qkv": qkv,
            "att": att,
        }
    if kernel == "attention_decode":
        S = T + 2
        return {
            "out": f32(r, B, C),
            "q": f32(r, B, C),
            "kcache": f32(r, B, S, C),
            "vcache": f32(r, B, S, C),
            "n_ctx": T,
            "n_head": NH,
        }
    if kernel == "relu2_forward":
        return {"out": f32(r, B, T, H), "inp": f32(r, B, T, H)}
    if kernel == "relu2_backward":
        return {"dinp": f32(r, B, T, H), "dout": f32(r, B, T, H), "inp": f32(r, B, T, H)}
    if kernel == "residual_forward":
        return {"out": f32(r, B, T, C), "inp1": f32(r, B, T, C), "inp2": f32(r, B, T, C)}
    if kernel == "residual_backward":
        return {"dinp1": f32(r, B, T, C), "dinp2": f32(r, B, T, C), "dout": f32(r, B, T, C)}
    if kernel == "crossentropy_forward":
        return {"losses": f32(r, B, T), "probs": f32(r, B, T, V), "logits": 3 * f32(r, B, T, V), "targets": idx}
    if kernel == "crossentropy_backward":
        logits = 3 * f32(r, B, T, V)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return {
            "dlogits": f32(r, B, T, V),
            "dlosses": np.full((B, T), 1 / N, np.float32),
            "probs": probs,
            "targets": idx,
        }
    if kernel == "grad_norm":
        return {"grads": f32(r, N * C + 3)}
    if kernel == "adamw_update":
        P = N * C + 3
        return {
            "params": f32(r, P), "grads": f32(r, P), "m": f32(r, P), "v": np.abs(f32(r, P)),
            "decay": (r.random(P) < 0.7).astype(np.uint8),
            "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1, "step": 3, "grad_scale": 0.7,
        }  # fmt: skip
    raise AssertionError(f"no test case for kernel {kernel}")


def copy_args(args: dict) -> dict:
    return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}C{}NH{}V{}".format(*s))
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_kernel_matches_reference(backend_name: str, kernel: str, shape: tuple) -> None:
    r = np.random.default_rng(hash((kernel, shape)) % 2**32)
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

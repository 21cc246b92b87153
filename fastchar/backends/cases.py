"""Example arguments for every kernel at a given shape: shared by tests/test_kernels.py and
benchmarks/bench_kernels.py, so the kernels are tested and timed on the same inputs.

Backward kernels get non-zero gradients to start from, so accumulation is exercised; saved buffers
(rstd, att, probs) are consistent with their inputs.
"""

from __future__ import annotations

import numpy as np

from fastchar.backends import reference as ref
from fastchar.graph import RMSNORM_EPS

DROPOUT_KEY = 12345  # the dropout kernels' (key, p): any fixed pair makes them deterministic
DROPOUT_P = 0.3


def f32(r: np.random.Generator, *shape: int) -> np.ndarray:
    return r.standard_normal(shape).astype(np.float32)


def make_args(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    """Arguments of `kernel` in signature order for shape (B, T, C, NH, V): arrays and scalars."""
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
        return {
            "out": f32(r, B, T, C),
            "rstd": f32(r, B, T),
            "inp": f32(r, B, T, C),
            "weight": f32(r, C),
            "eps": RMSNORM_EPS,
        }
    if kernel == "rmsnorm_backward":
        inp, weight = f32(r, B, T, C), f32(r, C)
        rstd = (1 / np.sqrt(np.mean(inp * inp, -1) + RMSNORM_EPS)).astype(np.float32)
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
    if kernel in ("rope_forward", "rope_backward"):
        HS = C // NH
        if HS % 2:  # rotary pairs need an even head size: use half as many, twice as wide heads
            HS = 2 * HS if C % (2 * HS) == 0 else C
        angles = np.arange(T + 2)[:, None] * 10000.0 ** (-2.0 * np.arange(HS // 2) / HS)
        tables = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
        if kernel == "rope_forward":
            return {"out": f32(r, B, T, 3 * C), "inp": f32(r, B, T, 3 * C), **tables}
        return {"dinp": f32(r, B, T, 3 * C), "dout": f32(r, B, T, 3 * C), **tables}
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
    if kernel == "attention_dropout_forward":
        return {
            "out": f32(r, B, T, C),
            "att": f32(r, B, NH, T, T),
            "qkv": f32(r, B, T, 3 * C),
            "key": DROPOUT_KEY,
            "p": DROPOUT_P,
        }
    if kernel == "attention_dropout_backward":
        qkv = f32(r, B, T, 3 * C)
        att = np.zeros((B, NH, T, T), np.float32)
        ref.attention_dropout_forward(np.zeros((B, T, C), np.float32), att, qkv, DROPOUT_KEY, DROPOUT_P)
        return {
            "dqkv": f32(r, B, T, 3 * C),
            "datt": f32(r, B, NH, T, T),
            "dout": f32(r, B, T, C),
            "qkv": qkv,
            "att": att,
            "key": DROPOUT_KEY,
            "p": DROPOUT_P,
        }
    if kernel == "dropout_forward":
        return {"out": f32(r, B, T, C), "inp": f32(r, B, T, C), "key": DROPOUT_KEY, "p": DROPOUT_P}
    if kernel == "dropout_backward":
        return {"dinp": f32(r, B, T, C), "dout": f32(r, B, T, C), "key": DROPOUT_KEY, "p": DROPOUT_P}
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

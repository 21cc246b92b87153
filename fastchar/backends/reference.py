"""The NumPy reference backend: every kernel written for clarity, the ground truth for the others.

Conventions (shared by every backend):
- Forward: outputs, then buffers saved for backward, then inputs, then weights; scalars last.
- Backward: input grads, weight grads, dout, saved tensors; scalars last.
- Kernels write into preallocated C-contiguous arrays and return None (`grad_norm` returns a float).
- Backward kernels ACCUMULATE (+=) into every gradient they write, activation grads included.
- dtype-generic: float32 in training, float64 for finite-difference checks.

Letters in shapes: B batch, T time, C channels, NH heads, HS head size, V vocabulary, N = B*T rows,
IC/OC matmul in/out channels, P the flat parameter count, S the cache length.
"""

from __future__ import annotations

import numpy as np


def embedding_forward(out: np.ndarray, idx: np.ndarray, wte: np.ndarray, wpe: np.ndarray) -> None:
    """out[b, t] = wte[idx[b, t]] + wpe[t].

    out (B, T, C); idx (B, T) int; wte (V, C); wpe (>=T, C), position t reads row t.
    """
    T = idx.shape[1]
    out[...] = wte[idx] + wpe[:T]


def embedding_backward(dwte: np.ndarray, dwpe: np.ndarray, dout: np.ndarray, idx: np.ndarray) -> None:
    """dwte[idx[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t]. Accumulates.

    dwte (V, C); dwpe (>=T, C); dout (B, T, C); idx (B, T) int.
    """
    T = idx.shape[1]
    np.add.at(dwte, idx, dout)
    dwpe[:T] += dout.sum(axis=0)


def rmsnorm_forward(out: np.ndarray, rstd: np.ndarray, inp: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out = inp / sqrt(mean(inp**2) + eps) * weight, over the last axis.

    out (B, T, C); rstd (B, T) saved 1/sqrt(mean + eps); inp (B, T, C); weight (C,).
    """
    rstd[...] = 1.0 / np.sqrt(np.mean(inp * inp, axis=-1) + eps)
    out[...] = inp * rstd[..., None] * weight


def rmsnorm_backward(
    dinp: np.ndarray,
    dweight: np.ndarray,
    dout: np.ndarray,
    inp: np.ndarray,
    weight: np.ndarray,
    rstd: np.ndarray,
) -> None:
    """dinp += rstd * (dxhat - xhat * mean(dxhat * xhat)), dxhat = dout * weight. Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); rstd (B, T).
    """
    xhat = inp * rstd[..., None]
    dweight += np.sum(dout * xhat, axis=(0, 1))
    dxhat = dout * weight
    dinp += rstd[..., None] * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))


def matmul_forward(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """out = inp @ weight (weights are stored [in, out]).

    out (N, OC); inp (N, IC); weight (IC, OC).
    """
    np.matmul(inp, weight, out=out)


def matmul_backward(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """dinp += dout @ weight.T; dweight += inp.T @ dout. Accumulates.

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC).
    """
    dinp += dout @ weight.T
    dweight += inp.T @ dout


def _split_heads(qkv: np.ndarray, NH: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qkv (B, T, 3C) -> q, k, v each (B, NH, T, HS); columns are q | k | v, head h owns h*HS.."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // NH
    heads = qkv.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def attention_forward(out: np.ndarray, att: np.ndarray, qkv: np.ndarray) -> None:
    """Causal softmax attention: att = softmax(q k^T / sqrt(HS) + mask); out = att v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities, zero above the diagonal; qkv (B, T, 3C).
    """
    B, NH, T, _ = att.shape
    q, k, v = _split_heads(qkv, NH)
    scale = 1.0 / np.sqrt(q.shape[-1])
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    scores[..., future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    att[...] = scores / scores.sum(axis=-1, keepdims=True)
    out[...] = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention_backward(dqkv: np.ndarray, datt: np.ndarray, dout: np.ndarray, qkv: np.ndarray, att: np.ndarray) -> None:
    """Backward of attention_forward. Accumulates into dqkv; datt is scratch and is overwritten.

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T).
    """
    B, NH, T, _ = att.shape
    q, k, v = _split_heads(qkv, NH)
    HS = q.shape[-1]
    scale = 1.0 / np.sqrt(HS)
    dy = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    datt[...] = dy @ v.transpose(0, 1, 3, 2)
    dv = att.transpose(0, 1, 3, 2) @ dy
    # softmax backward, row by row; the mask needs nothing since att is zero there
    dscores = att * (datt - np.sum(att * datt, axis=-1, keepdims=True)) * scale
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    grads = np.stack([dq, dk, dv])  # (3, B, NH, T, HS)
    dqkv += grads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * HS)


def attention_decode(
    out: np.ndarray, q: np.ndarray, kcache: np.ndarray, vcache: np.ndarray, n_ctx: int, n_head: int
) -> None:
    """One query per sequence against the first n_ctx cached keys and values (all in the past).

    out (B, C); q (B, C); kcache (B, S, C); vcache (B, S, C), S >= n_ctx; n_ctx, n_head ints.
    """
    B, C = q.shape
    HS = C // n_head
    qh = q.reshape(B, n_head, 1, HS)
    k = kcache[:, :n_ctx].reshape(B, n_ctx, n_head, HS).transpose(0, 2, 3, 1)
    v = vcache[:, :n_ctx].reshape(B, n_ctx, n_head, HS).transpose(0, 2, 1, 3)
    scores = (qh @ k) / np.sqrt(HS)  # (B, NH, 1, n_ctx)
    scores -= scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    out[...] = (p @ v).reshape(B, C)


def relu2_forward(out: np.ndarray, inp: np.ndarray) -> None:
    """out = relu(inp) ** 2.

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    r = np.maximum(inp, 0)
    out[...] = r * r


def relu2_backward(dinp: np.ndarray, dout: np.ndarray, inp: np.ndarray) -> None:
    """dinp += dout * 2 * relu(inp). Accumulates.

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    dinp += dout * 2 * np.maximum(inp, 0)


def residual_forward(out: np.ndarray, inp1: np.ndarray, inp2: np.ndarray) -> None:
    """out = inp1 + inp2.

    out, inp1, inp2 (B, T, C).
    """
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1: np.ndarray, dinp2: np.ndarray, dout: np.ndarray) -> None:
    """dinp1 += dout; dinp2 += dout. Accumulates.

    dinp1, dinp2, dout (B, T, C).
    """
    dinp1 += dout
    dinp2 += dout


def crossentropy_forward(losses: np.ndarray, probs: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
    """probs = softmax(logits); losses = -log probs[target], natural log.

    losses (B, T); probs (B, T, V) saved; logits (B, T, V); targets (B, T) int.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    log_probs = shifted - log_z
    probs[...] = np.exp(log_probs)
    losses[...] = -np.take_along_axis(log_probs, targets[..., None].astype(np.intp), -1)[..., 0]


def crossentropy_backward(dlogits: np.ndarray, dlosses: np.ndarray, probs: np.ndarray, targets: np.ndarray) -> None:
    """Fused softmax + cross-entropy backward: dlogits += dlosses * (probs - onehot). Accumulates.

    dlogits (B, T, V); dlosses (B, T); probs (B, T, V); targets (B, T) int.
    """
    V = probs.shape[-1]
    onehot = np.eye(V, dtype=probs.dtype)[targets]
    dlogits += dlosses[..., None] * (probs - onehot)


def grad_norm(grads: np.ndarray) -> float:
    """sqrt(sum(grads**2)), accumulated in float64.

    grads (P,) the flat gradient buffer.
    """
    return float(np.sqrt(np.sum(np.square(grads, dtype=np.float64))))


def adamw_update(
    params: np.ndarray,
    grads: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    decay: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    grad_scale: float,
) -> None:
    """AdamW on flat buffers; g = grads * grad_scale (the clip factor), step counts from 1.

    p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * decay * p)
    params, grads, m, v (P,); decay (P,) uint8, 1 where weight decay applies (2-D tensors).
    """
    g = grads * grad_scale
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * g * g
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    params -= lr * (mhat / (np.sqrt(vhat) + eps) + weight_decay * decay * params)

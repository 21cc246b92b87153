"""The NumPy reference backend: every kernel written for clarity, the ground truth for the others.

Conventions (shared by every backend):
- Forward: outputs, then buffers saved for backward, then inputs, then weights; scalars last.
- Backward: input grads, weight grads, dout, saved tensors; scalars last.
- Kernels write into preallocated C-contiguous arrays and return None (`grad_norm` returns a float).
- Backward kernels ACCUMULATE (+=) into every gradient they write, activation grads included.
- dtype-generic: float32 in training, float64 for finite-difference checks.

Letters in shapes: B batch, T time, C channels, NH heads, HS head size, V vocabulary, N = B*T rows,
IC/OC matmul in/out channels, P the flat parameter count, S the cache length.

Dropout masks are never stored or drawn from an RNG: element i (flat C-order index) of a tensor is
kept when lowbias32(i * 0x9E3779B9 + key) >= _dropout_threshold(p), all mod 2**32. Every backend
computes the same hash, so one (key, p) gives the same mask everywhere, in forward and backward.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from fastchar.graph import DROPOUT_GOLDEN, LOWBIAS32_MUL1, LOWBIAS32_MUL2, U32


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


def layernorm_forward(
    out: np.ndarray, mean: np.ndarray, rstd: np.ndarray, inp: np.ndarray, weight: np.ndarray, eps: float
) -> None:
    """out = (inp - mean(inp)) / sqrt(var(inp) + eps) * weight over the last axis (biased variance, no bias).

    out (B, T, C); mean, rstd (B, T) saved (mean and 1/sqrt(var + eps)); inp (B, T, C); weight (C,).
    """
    mean[...] = np.mean(inp, axis=-1)
    xc = inp - mean[..., None]
    rstd[...] = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1) + eps)
    out[...] = xc * rstd[..., None] * weight


def layernorm_backward(
    dinp: np.ndarray,
    dweight: np.ndarray,
    dout: np.ndarray,
    inp: np.ndarray,
    weight: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
) -> None:
    """dinp += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * weight,
    xhat = (inp - mean) * rstd; dweight += sum(dout * xhat). Accumulates.

    dinp (B, T, C); dweight (C,); dout (B, T, C); inp (B, T, C); weight (C,); mean, rstd (B, T).
    """
    xhat = (inp - mean[..., None]) * rstd[..., None]
    dweight += np.sum(dout * xhat, axis=(0, 1))
    dxhat = dout * weight
    dinp += rstd[..., None] * (
        dxhat - np.mean(dxhat, axis=-1, keepdims=True) - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True)
    )


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


def matmul_t_forward(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """out = inp @ weight.T (weight stored [out, in]: the tied lm_head reads wte).

    out (N, OC); inp (N, IC); weight (OC, IC).
    """
    np.matmul(inp, weight.T, out=out)


def matmul_t_backward(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """dinp += dout @ weight; dweight += dout.T @ inp. Accumulates.

    dinp (N, IC); dweight (OC, IC); dout (N, OC); inp (N, IC); weight (OC, IC).
    """
    dinp += dout @ weight
    dweight += dout.T @ inp


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 and returned as float32: what the bf16 matrix products multiply.

    Round to nearest, ties to even, on the top 16 bits of the float32 pattern; NaN stays NaN (quiet),
    too-large values become inf, and float32 subnormals become signed zero, as the AVX512_BF16
    instructions treat them (vcvtne2ps2bf16 / vdpbf16ps take subnormal inputs as zero).
    x: any shape, float32 (other float dtypes are converted to float32 first).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    exponent = bits & 0x7F800000
    rounded = np.where(exponent == 0, bits & 0x80000000, rounded)  # subnormal -> signed zero
    nan = (exponent == 0x7F800000) & ((bits & 0x007FFFFF) != 0)
    rounded = np.where(nan, (bits & 0xFFFF0000) | 0x00400000, rounded)  # keep NaN, make it quiet
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def _bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16, in x's dtype (so a float64 model still accumulates in float64)."""
    return round_bf16(x).astype(x.dtype, copy=False)


def matmul_forward_bf16(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """matmul_forward on bf16-rounded inputs, accumulated in out's precision: the bf16 reference.

    out (N, OC); inp (N, IC); weight (IC, OC).
    """
    np.matmul(_bf16(inp), _bf16(weight), out=out)


def matmul_backward_bf16(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """matmul_backward with every operand of both products rounded to bf16. Accumulates.

    dinp (N, IC); dweight (IC, OC); dout (N, OC); inp (N, IC); weight (IC, OC).
    """
    dout = _bf16(dout)
    dinp += dout @ _bf16(weight).T
    dweight += _bf16(inp).T @ dout


def matmul_t_forward_bf16(out: np.ndarray, inp: np.ndarray, weight: np.ndarray) -> None:
    """matmul_t_forward on bf16-rounded inputs, accumulated in out's precision.

    out (N, OC); inp (N, IC); weight (OC, IC).
    """
    np.matmul(_bf16(inp), _bf16(weight).T, out=out)


def matmul_t_backward_bf16(
    dinp: np.ndarray, dweight: np.ndarray, dout: np.ndarray, inp: np.ndarray, weight: np.ndarray
) -> None:
    """matmul_t_backward with every operand of both products rounded to bf16. Accumulates.

    dinp (N, IC); dweight (OC, IC); dout (N, OC); inp (N, IC); weight (OC, IC).
    """
    dout = _bf16(dout)
    dinp += dout @ _bf16(weight)
    dweight += dout.T @ _bf16(inp)


def plan_kernels(precision: str, cfg: object) -> dict:
    """Plan hook (fastchar.backends.plan_kernels): bf16 matrix products by rounding their inputs."""
    if precision == "bf16":
        why = "precision bf16: products of bf16-rounded inputs (the reference)"
        return {
            "matmul_forward": (matmul_forward_bf16, why),
            "matmul_backward": (matmul_backward_bf16, why),
            "matmul_t_forward": (matmul_t_forward_bf16, why),
            "matmul_t_backward": (matmul_t_backward_bf16, why),
        }
    return {}


def _split_heads(qkv: np.ndarray, NH: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """qkv (B, T, 3C) -> q, k, v each (B, NH, T, HS); columns are q | k | v, head h owns h*HS.."""
    B, T, C3 = qkv.shape
    HS = C3 // 3 // NH
    heads = qkv.reshape(B, T, 3, NH, HS).transpose(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def _rope_pairs(x: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Views a, b (B, T, 2*NH, half) of the q and k columns of x (B, T, 3C): each head's halves."""
    B, T, C3 = x.shape
    NH = C3 // 3 // (2 * half)
    heads = x.reshape(B, T, 3 * NH, 2, half)[:, :, : 2 * NH]  # a view: x is contiguous
    return heads[..., 0, :], heads[..., 1, :]


def rope_forward(out: np.ndarray, inp: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotary positions: q and k of every head turned, v copied; out may be inp (in place).

    With a = x[:HS/2], b = x[HS/2:] of a head vector at position t: [a cos - b sin, a sin + b cos].
    out, inp (B, T, 3C); cos, sin (>=T, HS/2), position t reads row t.
    """
    T, half = inp.shape[1], cos.shape[1]
    C = inp.shape[2] // 3
    a, b = _rope_pairs(inp, half)
    c, s = cos[:T, None, :], sin[:T, None, :]
    ra, rb = a * c - b * s, a * s + b * c
    oa, ob = _rope_pairs(out, half)
    oa[...], ob[...] = ra, rb
    out[..., 2 * C :] = inp[..., 2 * C :]


def rope_backward(dinp: np.ndarray, dout: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Backward of rope_forward (the rotation transposed): [da cos + db sin, -da sin + db cos]. Accumulates.

    dinp, dout (B, T, 3C); cos, sin (>=T, HS/2).
    """
    T, half = dout.shape[1], cos.shape[1]
    C = dout.shape[2] // 3
    da, db = _rope_pairs(dout, half)
    c, s = cos[:T, None, :], sin[:T, None, :]
    ia, ib = _rope_pairs(dinp, half)
    ia += da * c + db * s
    ib += db * c - da * s
    dinp[..., 2 * C :] += dout[..., 2 * C :]


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
    _attention_backward(dqkv, datt, dout, qkv, att, None)


def _attention_backward(
    dqkv: np.ndarray, datt: np.ndarray, dout: np.ndarray, qkv: np.ndarray, att: np.ndarray, mask: np.ndarray | None
) -> None:
    """attention_backward when out = (att * mask) v; mask (B, NH, T, T) or None for no dropout."""
    B, NH, T, _ = att.shape
    q, k, v = _split_heads(qkv, NH)
    HS = q.shape[-1]
    scale = 1.0 / np.sqrt(HS)
    dy = dout.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    datt[...] = dy @ v.transpose(0, 1, 3, 2)
    dv = (att if mask is None else att * mask).transpose(0, 1, 3, 2) @ dy
    if mask is not None:
        datt *= mask  # gradient w.r.t. the probabilities before dropout
    # softmax backward, row by row; the mask needs nothing since att is zero there
    dscores = att * (datt - np.sum(att * datt, axis=-1, keepdims=True)) * scale
    dq = dscores @ k
    dk = dscores.transpose(0, 1, 3, 2) @ q
    grads = np.stack([dq, dk, dv])  # (3, B, NH, T, HS)
    dqkv += grads.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * HS)


def attention_dropout_forward(out: np.ndarray, att: np.ndarray, qkv: np.ndarray, key: int, p: float) -> None:
    """attention_forward with dropout on the probabilities: out = (att * mask) v, heads merged.

    out (B, T, C); att (B, NH, T, T) saved probabilities BEFORE dropout, zero above the diagonal;
    qkv (B, T, 3C); key uint32 and p in [0, 1): the mask over att's flat index (see _dropout_mask).
    """
    B, NH, T, _ = att.shape
    attention_forward(out, att, qkv)  # fills att; out is recomputed below from the dropped att
    v = _split_heads(qkv, NH)[2]
    dropped = att * _dropout_mask(att.shape, key, p, att.dtype)
    out[...] = (dropped @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention_dropout_backward(
    dqkv: np.ndarray, datt: np.ndarray, dout: np.ndarray, qkv: np.ndarray, att: np.ndarray, key: int, p: float
) -> None:
    """Backward of attention_dropout_forward. Accumulates into dqkv; datt is scratch (overwritten).

    dqkv (B, T, 3C); datt (B, NH, T, T) scratch; dout (B, T, C); qkv (B, T, 3C); att (B, NH, T, T)
    the saved probabilities before dropout; key, p as in the forward.
    """
    _attention_backward(dqkv, datt, dout, qkv, att, _dropout_mask(att.shape, key, p, att.dtype))


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


def _dropout_threshold(p: float) -> int:
    """The uint32 threshold of dropout probability p: an element is kept when its hash >= it.

    round(p * 2**32), capped at 2**32 - 1; p = 0 gives 0, so every element is kept.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return min(round(p * 2.0**32), U32)


def _dropout_hash(n: int, key: int) -> np.ndarray:
    """lowbias32((i * 0x9E3779B9 + key) mod 2**32) for i in range(n), as uint32 (wraps mod 2**32)."""
    i = np.arange(n, dtype=np.uint64) & np.uint64(U32)  # 64-bit index, truncated to 32 bits
    h = ((i * np.uint64(DROPOUT_GOLDEN) + np.uint64(key)) & np.uint64(U32)).astype(np.uint32)
    h ^= h >> np.uint32(16)
    h *= np.uint32(LOWBIAS32_MUL1)  # uint32 * uint32 wraps mod 2**32
    h ^= h >> np.uint32(15)
    h *= np.uint32(LOWBIAS32_MUL2)
    h ^= h >> np.uint32(16)
    return h


def _dropout_mask(shape: tuple[int, ...], key: int, p: float, dtype: np.dtype) -> np.ndarray:
    """scale = 1 / (1 - p) where element i (flat C order) is kept, else 0; shape `shape`."""
    keep = _dropout_hash(int(np.prod(shape)), key) >= np.uint32(_dropout_threshold(p))
    return (keep * np.asarray(1.0 / (1.0 - p), dtype=dtype)).reshape(shape)


def dropout_forward(out: np.ndarray, inp: np.ndarray, key: int, p: float) -> None:
    """out = inp * mask, mask = keep(i) / (1 - p) over the flat index i; out may be inp (in place).

    out (B, T, C); inp (B, T, C); key uint32, p in [0, 1).
    """
    np.multiply(inp, _dropout_mask(inp.shape, key, p, inp.dtype), out=out)


def dropout_backward(dinp: np.ndarray, dout: np.ndarray, key: int, p: float) -> None:
    """dinp += dout * mask, the forward's mask for the same key and p. Accumulates.

    dinp (B, T, C); dout (B, T, C); key uint32, p in [0, 1).
    """
    dinp += dout * _dropout_mask(dout.shape, key, p, dout.dtype)


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


_SQRT_HALF = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def gelu_forward(out: np.ndarray, inp: np.ndarray) -> None:
    """out = 0.5 * inp * (1 + erf(inp / sqrt(2))), the exact GELU (PyTorch's nn.GELU()).

    out (B, T, H); inp (B, T, H), H the MLP width.
    """
    out[...] = 0.5 * inp * (1.0 + erf(inp * _SQRT_HALF))


def gelu_backward(dinp: np.ndarray, dout: np.ndarray, inp: np.ndarray) -> None:
    """dinp += dout * (Phi(inp) + inp * phi(inp)), Phi the normal cdf, phi its density. Accumulates.

    dinp (B, T, H); dout (B, T, H); inp (B, T, H).
    """
    cdf = 0.5 * (1.0 + erf(inp * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * np.exp(-0.5 * inp * inp)
    dinp += dout * (cdf + inp * pdf)


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

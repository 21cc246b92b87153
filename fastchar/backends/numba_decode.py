"""Numba's compiled generation loop: many new characters per call, no Python between them.

`generate_tokens` runs the sampler of fastchar/sampler.py (KVCache.advance's window refill and
sample_token's temperature / top-k / top-p) entirely in one `@njit` call, so `stream` pays one
Python-level call per chunk of characters instead of ~55 kernel calls per character. The Cython
twin is csrc/_decode.pyx (fastchar._cydecode), with the same name, signature and loop structure.

How it is fast:
- Every position goes through `_forward_rows`, which runs n positions at once (n = 1 for a decode
  step, n = window/2 for a refill, n = len(prompt) for the prompt). Matrix products stream each
  weight row once per call and reuse it for all n rows, so a refill costs one pass over the weights,
  not window/2 of them. The sum over the input channels is sequential for each output element, so
  one position gives the same float32 result whether it was decoded alone or in a refill.
- Single-threaded: a decode step is ~0.8 M multiply-adds, fewer than a parallel launch per matmul
  would pay for (measured; see the report in the sampler tests' docstring).
- exp in the attention softmax is the vectorisable Cephes expf (a copy of numba_cpu's, so editing
  that module does not silently leave a stale cached copy here).

Left out: batch > 1 and float64 (the Python loop in fastchar/sampler.py covers both).
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["generate_tokens"]

RMSNORM_EPS = 1e-5  # = fastchar.model.RMSNORM_EPS (not imported: numba_cpu must not import the model)

# Index of each tensor in the `offsets` table (param_specs order): wte, wpe, 6 per layer, ln_f, lm_head.
_WTE, _WPE = 0, 1
_LN1, _QKV, _PROJ, _LN2, _FC, _MPROJ = 0, 1, 2, 3, 4, 5
_PER_LAYER = 6


@intrinsic
def _i32_as_f32(typingctx, i):  # noqa: ARG001 (Numba's intrinsic signature)
    """Reinterpret the bits of an int32 as a float32 (to build 2**n)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def _expf(x):
    """exp(x) for float32 x (Cephes expf, ~1 ulp); x below -87.3 gives about 1e-38."""
    x = min(max(x, np.float32(-87.33)), np.float32(88.37))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    return y * _i32_as_f32((np.int32(n) + np.int32(127)) << np.int32(23))


# --------------------------------------------------------------------------------------------
# The forward pass over n new positions


@njit(cache=True, fastmath=True)
def _matmul(y, x, w, M, K, N):
    """y[:M] = x[:M] @ w, four input channels per pass over an output row; four rows at a time.

    y (>=M, N); x (>=M, K); w (K, N). Rows are taken as 1-D views so the loops over N vectorise
    (2-D indexing in the inner loop defeats LLVM's vectoriser).
    """
    K4 = K - K % 4
    m = 0
    while m + 4 <= M:
        # a 4 x 4 register block: each weight element loaded once feeds four output rows
        y0, y1, y2, y3 = y[m], y[m + 1], y[m + 2], y[m + 3]
        x0, x1, x2, x3 = x[m], x[m + 1], x[m + 2], x[m + 3]
        for j in range(N):
            y0[j] = 0.0
            y1[j] = 0.0
            y2[j] = 0.0
            y3[j] = 0.0
        for i in range(0, K4, 4):
            w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
            a0, a1, a2, a3 = x0[i], x0[i + 1], x0[i + 2], x0[i + 3]
            b0, b1, b2, b3 = x1[i], x1[i + 1], x1[i + 2], x1[i + 3]
            c0, c1, c2, c3 = x2[i], x2[i + 1], x2[i + 2], x2[i + 3]
            d0, d1, d2, d3 = x3[i], x3[i + 1], x3[i + 2], x3[i + 3]
            for j in range(N):
                v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
                y0[j] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                y1[j] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3
                y2[j] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
                y3[j] += d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3
        for i in range(K4, K):
            wi = w[i]
            a0, b0, c0, d0 = x0[i], x1[i], x2[i], x3[i]
            for j in range(N):
                y0[j] += a0 * wi[j]
                y1[j] += b0 * wi[j]
                y2[j] += c0 * wi[j]
                y3[j] += d0 * wi[j]
        m += 4
    for r in range(m, M):
        yr, xr = y[r], x[r]
        for j in range(N):
            yr[j] = 0.0
        for i in range(0, K4, 4):
            w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
            a0, a1, a2, a3 = xr[i], xr[i + 1], xr[i + 2], xr[i + 3]
            for j in range(N):
                yr[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j]
        for i in range(K4, K):
            wi = w[i]
            a0 = xr[i]
            for j in range(N):
                yr[j] += a0 * wi[j]


@njit(cache=True, fastmath=True)
def _rmsnorm(out, x, g, M, C):
    """out[:M] = x / sqrt(mean(x**2) + eps) * g over the last axis. out, x (>=M, C); g (C,)."""
    for m in range(M):
        ss = np.float32(0.0)
        for c in range(C):
            ss += x[m, c] * x[m, c]
        s = np.float32(1.0) / np.sqrt(ss / np.float32(C) + np.float32(RMSNORM_EPS))
        for c in range(C):
            out[m, c] = x[m, c] * s * g[c]


@njit(cache=True, fastmath=True)
def _attention(out, qkv, kt, vt, p0, M, n_head, scores):
    """out[m] = softmax(q[m] K[:p0+m+1]^T / sqrt(HS)) V[:p0+m+1] per head (keys already cached).

    out (>=M, C); qkv (>=M, 3C) (q in the first C columns); kt, vt (C, S) keys and values with time
    last, so every inner loop runs over contiguous positions and vectorises; scores (S,) scratch.
    """
    C = kt.shape[0]
    HS = C // n_head
    scale = np.float32(1.0 / math.sqrt(HS))
    for m in range(M):
        n = p0 + m + 1
        q = qkv[m]
        orow = out[m]
        for h in range(n_head):
            # scores[t] = q_h . k_h[t] * scale, as HS passes along t
            for t in range(n):
                scores[t] = 0.0
            for c in range(h * HS, h * HS + HS):
                qc = q[c] * scale
                krow = kt[c]
                for t in range(n):
                    scores[t] += qc * krow[t]
            # softmax over t: max, exp and sum, normalise
            mx = scores[0]
            for t in range(1, n):
                mx = max(mx, scores[t])
            tot = np.float32(0.0)
            for t in range(n):
                e = _expf(scores[t] - mx)
                scores[t] = e
                tot += e
            inv = np.float32(1.0) / tot
            # out[c] = p . v[c] for the head's channels
            for c in range(h * HS, h * HS + HS):
                vrow = vt[c]
                acc = np.float32(0.0)
                for t in range(n):
                    acc += scores[t] * vrow[t]
                orow[c] = acc * inv


@njit(cache=True)
def _param(params, offsets, idx, rows, cols):
    """The (rows, cols) view of tensor idx of the flat parameter buffer."""
    return params[offsets[idx, 0] : offsets[idx, 1]].reshape(rows, cols)


@njit(cache=True, fastmath=True)
def _forward_rows(logits, tokens, p0, M, params, offsets, n_head, kcache, vcache, scratch, want_logits):
    """Encode tokens[p0:p0+M] at positions p0..p0+M-1, appending their keys/values to the cache.

    logits (V,) gets the last position's logits when want_logits; tokens (S,) int32;
    params (P,) float32; offsets (n, 2) int64 in param_specs order; kcache, vcache (L, C, S);
    scratch (>= S * (7C + H + 1),) float32.
    """
    L, C, S = kcache.shape
    V = logits.shape[0]
    H = (offsets[2 + _FC, 1] - offsets[2 + _FC, 0]) // C
    # scratch: x, h, proj (S, C), qkv (S, 3C), atty (S, C), fch (S, H), scores (S,)
    o = 0
    x = scratch[o : o + S * C].reshape(S, C)
    o += S * C
    h = scratch[o : o + S * C].reshape(S, C)
    o += S * C
    proj = scratch[o : o + S * C].reshape(S, C)
    o += S * C
    qkv = scratch[o : o + S * 3 * C].reshape(S, 3 * C)
    o += S * 3 * C
    atty = scratch[o : o + S * C].reshape(S, C)
    o += S * C
    fch = scratch[o : o + S * H].reshape(S, H)
    o += S * H
    scores = scratch[o : o + S]
    T = (offsets[_WPE, 1] - offsets[_WPE, 0]) // C
    wte = _param(params, offsets, _WTE, V, C)
    wpe = _param(params, offsets, _WPE, T, C)
    for m in range(M):
        tok = tokens[p0 + m]
        for c in range(C):
            x[m, c] = wte[tok, c] + wpe[p0 + m, c]
    for layer in range(L):
        b = 2 + layer * _PER_LAYER
        ln1 = params[offsets[b + _LN1, 0] : offsets[b + _LN1, 1]]
        ln2 = params[offsets[b + _LN2, 0] : offsets[b + _LN2, 1]]
        kc, vc = kcache[layer], vcache[layer]
        _rmsnorm(h, x, ln1, M, C)
        _matmul(qkv, h, _param(params, offsets, b + _QKV, C, 3 * C), M, C, 3 * C)
        for m in range(M):
            for c in range(C):
                kc[c, p0 + m] = qkv[m, C + c]
                vc[c, p0 + m] = qkv[m, 2 * C + c]
        _attention(atty, qkv, kc, vc, p0, M, n_head, scores)
        _matmul(proj, atty, _param(params, offsets, b + _PROJ, C, C), M, C, C)
        for m in range(M):
            for c in range(C):
                x[m, c] += proj[m, c]
        _rmsnorm(h, x, ln2, M, C)
        _matmul(fch, h, _param(params, offsets, b + _FC, C, H), M, C, H)
        for m in range(M):
            for j in range(H):
                r = max(fch[m, j], np.float32(0.0))
                fch[m, j] = r * r
        _matmul(proj, fch, _param(params, offsets, b + _MPROJ, H, C), M, H, C)
        for m in range(M):
            for c in range(C):
                x[m, c] += proj[m, c]
    if want_logits:
        last = x[M - 1 : M]
        lnf = params[offsets[2 + L * _PER_LAYER, 0] : offsets[2 + L * _PER_LAYER, 1]]
        _rmsnorm(h, last, lnf, 1, C)
        _matmul(logits.reshape(1, V), h, _param(params, offsets, 3 + L * _PER_LAYER, C, V), 1, C, V)


# --------------------------------------------------------------------------------------------
# Sampling: sample_token of fastchar/sampler.py, operation for operation in float64


@njit(cache=True)
def _pairwise_sum(a, n):
    """sum(a[:n]) in NumPy's summation order (8 accumulators up to 128 items, then halves)."""
    if n < 8:
        s = 0.0
        for i in range(n):
            s += a[i]
        return s
    if n <= 128:
        # eight running sums as scalars (a local array would be a heap allocation)
        r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
        i = 8
        while i < n - n % 8:
            r0 += a[i]
            r1 += a[i + 1]
            r2 += a[i + 2]
            r3 += a[i + 3]
            r4 += a[i + 4]
            r5 += a[i + 5]
            r6 += a[i + 6]
            r7 += a[i + 7]
            i += 8
        s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            s += a[i]
            i += 1
        return s
    n2 = n // 2
    n2 -= n2 % 8
    return _pairwise_sum(a, n2) + _pairwise_sum(a[n2:], n - n2)


@njit(cache=True)
def _sample(logits, temperature, top_k, top_p, u, work, order):
    """Token id drawn from logits (V,) with the uniform u: greedy, or temperature/top-k/top-p.

    work (3V,) float64 scratch; order (V,) int32 scratch. top_k <= 0 means no top-k; top_p >= 1 none.
    """
    V = logits.shape[0]
    if temperature == 0:
        best = 0
        for j in range(1, V):
            if logits[j] > logits[best]:
                best = j
        return best
    z, probs, tmp = work[:V], work[V : 2 * V], work[2 * V : 3 * V]
    for j in range(V):
        z[j] = np.float64(logits[j]) / temperature
    if 0 < top_k < V:
        # the k-th largest value (with multiplicity), by insertion sort descending; keep z >= it
        for j in range(V):
            v = z[j]
            i = j
            while i > 0 and tmp[i - 1] < v:
                tmp[i] = tmp[i - 1]
                i -= 1
            tmp[i] = v
        kth = tmp[top_k - 1]
        for j in range(V):
            if not z[j] >= kth:
                z[j] = -np.inf
    mx = z[0]
    for j in range(1, V):
        mx = max(mx, z[j])
    for j in range(V):
        probs[j] = np.exp(z[j] - mx)
    total = _pairwise_sum(probs, V)
    for j in range(V):
        probs[j] /= total
    if top_p < 1:
        # stable descending order by probability (ties: lower id first), cumulative mass
        for j in range(V):
            i = j
            while i > 0 and probs[order[i - 1]] < probs[j]:
                order[i] = order[i - 1]
                i -= 1
            order[i] = j
        mass = 0.0
        for j in range(V):
            mass += probs[order[j]]
            tmp[j] = mass
        target = top_p * tmp[V - 1]
        keep = V
        for j in range(V):
            if tmp[j] >= target:
                keep = j + 1
                break
        for j in range(V):
            z[j] = 0.0
        for j in range(keep):
            z[order[j]] = probs[order[j]]
        total = _pairwise_sum(z, V)
        for j in range(V):
            probs[j] = z[j] / total
    # first index whose cdf exceeds u * cdf[-1] (searchsorted side="right"), clamped to V - 1
    cdf = 0.0
    for j in range(V):
        cdf += probs[j]
        tmp[j] = cdf
    target = u * tmp[V - 1]
    for j in range(V):
        if tmp[j] > target:
            return j
    return V - 1


# --------------------------------------------------------------------------------------------
# The loop


@njit(cache=True)
def generate_tokens(
    out: np.ndarray,
    tokens: np.ndarray,
    n_cache: int,
    n_feed: int,
    params: np.ndarray,
    offsets: np.ndarray,
    n_head: int,
    kcache: np.ndarray,
    vcache: np.ndarray,
    scratch: np.ndarray,
    work: np.ndarray,
    order: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: np.ndarray,
    advance_last: bool,
    logits_out: np.ndarray,
) -> int:
    """Sample out.shape[0] tokens, advancing the KV cache after each (after the last only if advance_last).

    First feeds tokens[n_cache:n_cache+n_feed] (a prompt; n_feed = 0 on later calls). The logits of
    the next draw live in scratch[:V] between calls. Returns the new cache length.
    out (N,) int32; tokens (S,) int32, the cached tokens at positions 0..n_cache-1;
    params (P,) float32; offsets (n, 2) int64 (start, stop) per param_specs entry;
    kcache, vcache (L, C, S) float32, time last, S the window; scratch (decode_scratch_size,) float32;
    work (3V,) float64; order (V,) int32; uniforms (N,) float64 (unused when temperature is 0);
    logits_out (N, V) float32 receives each draw's logits, or (0, V) to skip.
    """
    C, S = kcache.shape[1], kcache.shape[2]
    V = (offsets[_WTE, 1] - offsets[_WTE, 0]) // C
    logits = scratch[:V]
    body = scratch[V:]
    if n_feed > 0:
        _forward_rows(logits, tokens, n_cache, n_feed, params, offsets, n_head, kcache, vcache, body, True)
        n_cache += n_feed
    N = out.shape[0]
    for i in range(N):
        if logits_out.shape[0] > 0:
            logits_out[i, :] = logits
        u = uniforms[i] if temperature > 0 else 0.0
        tok = _sample(logits, temperature, top_k, top_p, u, work, order)
        out[i] = tok
        if i + 1 == N and not advance_last:
            break
        if n_cache >= S:
            # KVCache.advance: keep the newest S//2 - 1 tokens plus this one, re-encoded from 0
            n_keep = max(S // 2 - 1, 0)
            for j in range(n_keep):
                tokens[j] = tokens[n_cache - n_keep + j]
            tokens[n_keep] = tok
            _forward_rows(logits, tokens, 0, n_keep + 1, params, offsets, n_head, kcache, vcache, body, True)
            n_cache = n_keep + 1
        else:
            tokens[n_cache] = tok
            _forward_rows(logits, tokens, n_cache, 1, params, offsets, n_head, kcache, vcache, body, True)
            n_cache += 1
    return n_cache

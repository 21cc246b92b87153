"""Numba's compiled generation loop: many new characters per call, no Python between them.

`generate_tokens` runs the loop of fastchar/sampler.py (KVCache.advance's cache rule, sampling)
entirely in one `@njit` call, so `stream` pays one Python-level call per chunk of characters. The
network is not written here: each position walks the rows of fastchar.graph.decode_table (opcodes,
scratch offsets, weight offsets found by name in the parameter arena), the decode step of the one
description in fastchar/graph.py. The Cython twin is csrc/_decode.pyx, with the same signature
(one fastchar.sampler.DecodeState); the cache rule is fastchar.sampler.refill, compiled here.

How it is fast:
- A forward runs M positions at once (1 for a decode step, window/2 for a refill, the prompt's
  length for the prompt). Matrix products stream each weight row once per call and reuse it for all
  M rows, so a refill costs one pass over the weights. The sum over the input channels is
  sequential for each output element, so a position gives the same float32 result whether it was
  decoded alone or in a refill.
- Single-threaded: a decode step is ~0.8 M multiply-adds, fewer than a parallel launch per matmul
  would pay for.
- the attention softmax is numba_cpu's (its vectorisable expf).

Sampling (`sample`, `token_probs`) is csrc/fc_sample.c, the Cython loop's sampler, line for line in
Numba, so this loop needs no C build and draws what the Cython loop draws.
Left out: batch > 1 and float64 (the Python loop in fastchar/sampler.py covers both).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fastchar import graph
from fastchar.backends.numba_cpu import _gelu, _softmax_unnormalised
from fastchar.sampler import refill

__all__ = ["generate_tokens", "sample", "token_probs"]

# The decode table's vocabulary, defined once in fastchar/graph.py (frozen into the compiled code)
OP_EMBED, OP_RMSNORM, OP_MATMUL = graph.OP_EMBED, graph.OP_RMSNORM, graph.OP_MATMUL
OP_ATTENTION, OP_RESIDUAL, OP_RELU2 = graph.OP_ATTENTION, graph.OP_RESIDUAL, graph.OP_RELU2
OP_LAYERNORM, OP_GELU, OP_MATMUL_T = graph.OP_LAYERNORM, graph.OP_GELU, graph.OP_MATMUL_T
POST_RELU2, POST_RESIDUAL, POST_ROPE = graph.POST_RELU2, graph.POST_RESIDUAL, graph.POST_ROPE
POST_GELU = graph.POST_GELU
ROWS_ALL, ROWS_LAST = graph.ROWS_ALL, graph.ROWS_LAST
OPC, OUT, IN, IN2, W, W2 = graph.OPC, graph.OUT, graph.IN, graph.IN2, graph.W, graph.W2
K, N, POST, LAYER, ROWS = graph.K, graph.N, graph.POST, graph.LAYER, graph.ROWS


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
def _rmsnorm(out, x, g, M, C, eps):
    """out[:M] = x / sqrt(mean(x**2) + eps) * g over the last axis. out, x (>=M, C); g (C,)."""
    for m in range(M):
        ss = np.float32(0.0)
        for c in range(C):
            ss += x[m, c] * x[m, c]
        s = np.float32(1.0) / np.sqrt(ss / np.float32(C) + eps)
        for c in range(C):
            out[m, c] = x[m, c] * s * g[c]


@njit(cache=True, fastmath=True)
def _layernorm(out, x, g, M, C, eps):
    """out[:M] = (x - mean) / sqrt(var + eps) * g over the last axis (biased variance, no bias)."""
    for m in range(M):
        s = np.float32(0.0)
        for c in range(C):
            s += x[m, c]
        mean = s / np.float32(C)
        ss = np.float32(0.0)
        for c in range(C):
            d = x[m, c] - mean
            ss += d * d
        r = np.float32(1.0) / np.sqrt(ss / np.float32(C) + eps)
        for c in range(C):
            out[m, c] = (x[m, c] - mean) * r * g[c]


@njit(cache=True, fastmath=True)
def _matmul_t(y, x, w, M, K, N):
    """y[:M] = x[:M] @ w.T, w (N, K) stored [out, in] (a tied lm_head reading wte)."""
    for m in range(M):
        xr, yr = x[m], y[m]
        for j in range(N):
            wr = w[j]
            acc = np.float32(0.0)
            for k in range(K):
                acc += xr[k] * wr[k]
            yr[j] = acc


@njit(cache=True, fastmath=True)
def _attention(out, qkv, kt, vt, n0, M, n_head, scores):
    """out[m] = softmax(q[m] K^T / sqrt(HS)) V per head over the first min(n0+m+1, S) cache rows
    (keys already cached; a full cache, a rotary ring, is attended whole).

    out (>=M, C); qkv (>=M, 3C) (q in the first C columns); kt (C, S) keys with time last, vt
    (NH, S, HS) values position-major per head, so every inner loop runs over contiguous rows and
    vectorises; scores (S,) scratch.
    """
    C, S = kt.shape
    HS = C // n_head
    scale = np.float32(1.0 / math.sqrt(HS))
    for m in range(M):
        n = min(n0 + m + 1, S)
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
            inv = _softmax_unnormalised(scores, n)
            # out[c] = p . v[:, c] for the head's channels, a row of v at a time
            for c in range(h * HS, h * HS + HS):
                orow[c] = 0.0
            vh = vt[h]
            for t in range(n):
                p, vrow = scores[t], vh[t]
                for i in range(HS):
                    orow[h * HS + i] += p * vrow[i]
            for c in range(h * HS, h * HS + HS):
                orow[c] *= inv


@njit(cache=True)
def _rope(qkv, inv_freq, pos0, M, C):
    """Rotate q and k of every head of rows qkv[:M] by positions pos0.. (rope_forward of the
    reference); angles in float64 as fastchar.graph.rope_tables, then rounded to float32."""
    half = inv_freq.shape[0]
    for m in range(M):
        for i in range(half):
            angle = np.float64(pos0 + m) * inv_freq[i]
            c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            for h0 in range(0, 2 * C, 2 * half):
                a, b = qkv[m, h0 + i], qkv[m, h0 + half + i]
                qkv[m, h0 + i] = a * c - b * s
                qkv[m, h0 + half + i] = a * s + b * c


@njit(cache=True)
def _slot(scratch, row, width, S):
    """The (S, width) rows of a decode-table slot (its scratch offset is row[col])."""
    return scratch[row : row + S * width].reshape(S, width)


@njit(cache=True, fastmath=True)
def _forward_rows(tokens, n0, pos0, M, params, table, eps, inv_freq, n_head, kcache, vcache, scratch, scores):
    """Encode tokens[:M] at positions pos0..pos0+M-1 by walking the decode table, appending their
    keys and values to the cache (which holds n0 rows before); the last row's logits land in the
    table's last output slot. Shapes as in generate_tokens."""
    L, C, S = kcache.shape
    for r in range(table.shape[0]):
        row = table[r]
        Mr = M if row[ROWS] == ROWS_ALL else 1
        Kd, Nd = row[K], row[N]
        out = _slot(scratch, row[OUT], Nd, S)
        op = row[OPC]
        if op == OP_EMBED:
            wte = params[row[W] :]
            for m in range(M):
                for c in range(Nd):
                    v = wte[tokens[m] * Nd + c]
                    if row[W2] >= 0:
                        v += params[row[W2] + (pos0 + m) * Nd + c]
                    out[m, c] = v
            continue
        xin = _slot(scratch, row[IN], Kd, S)
        if row[ROWS] == ROWS_LAST:
            xin = xin[M - 1 :]
        if op == OP_RMSNORM:
            _rmsnorm(out, xin, params[row[W] : row[W] + Nd], Mr, Nd, np.float32(eps[r]))
        elif op == OP_LAYERNORM:
            _layernorm(out, xin, params[row[W] : row[W] + Nd], Mr, Nd, np.float32(eps[r]))
        elif op == OP_MATMUL_T:
            _matmul_t(out, xin, params[row[W] : row[W] + Kd * Nd].reshape(Nd, Kd), Mr, Kd, Nd)
        elif op == OP_MATMUL:
            w = params[row[W] : row[W] + Kd * Nd].reshape(Kd, Nd)
            _matmul(out, xin, w, Mr, Kd, Nd)
            if row[POST] == POST_RELU2:
                for m in range(Mr):
                    for j in range(Nd):
                        v = max(out[m, j], np.float32(0.0))
                        out[m, j] = v * v
            elif row[POST] == POST_GELU:
                for m in range(Mr):
                    for j in range(Nd):
                        out[m, j] = _gelu(out[m, j])
            elif row[POST] == POST_RESIDUAL:
                x2 = _slot(scratch, row[IN2], Nd, S)
                for m in range(Mr):
                    for j in range(Nd):
                        out[m, j] += x2[m, j]
        elif op == OP_ATTENTION:
            qkv = _slot(scratch, row[IN2], 3 * C, S)
            _matmul(qkv, xin, params[row[W] : row[W] + Kd * 3 * C].reshape(Kd, 3 * C), Mr, Kd, 3 * C)
            if row[POST] == POST_ROPE:
                _rope(qkv, inv_freq, pos0, Mr, C)
            kc, vc = kcache[row[LAYER]], vcache[row[LAYER]]
            HS = C // n_head
            for m in range(Mr):
                slot = (pos0 + m) % S
                for c in range(C):
                    kc[c, slot] = qkv[m, C + c]
                    vc[c // HS, slot, c % HS] = qkv[m, 2 * C + c]
            _attention(out, qkv, kc, vc, n0, Mr, n_head, scores)
        elif op == OP_RESIDUAL:
            x2 = _slot(scratch, row[IN2], Nd, S)
            for m in range(Mr):
                for j in range(Nd):
                    out[m, j] = xin[m, j] + x2[m, j]
        elif op == OP_RELU2:
            for m in range(Mr):
                for j in range(Nd):
                    v = max(xin[m, j], np.float32(0.0))
                    out[m, j] = v * v
        elif op == OP_GELU:
            for m in range(Mr):
                for j in range(Nd):
                    out[m, j] = _gelu(xin[m, j])


# --------------------------------------------------------------------------------------------
# Sampling: csrc/fc_sample.c line for line (the Cython loop's sampler), in float64 with the same
# sequential sums, so both compiled loops draw the same ids from the same uniforms.

EXTRACT_MAX = 12  # top-p takes the most likely remaining id this many times at most, then sorts the rest


@njit(cache=True)
def _kth_largest(a, n, k):
    """The k-th largest (k from 0) of a[:n], with multiplicity (Hoare's selection; reorders a)."""
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[lo + (hi - lo) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@njit(cache=True)
def token_probs(logits, V, temperature, top_k, top_p, probs, tmp, order):
    """probs (V,) float64 = softmax(logits / temperature), then top-k (top_k <= 0 or >= V: off),
    then top-p (top_p >= 1: off), as fc_token_probs; tmp (V,) float64 and order (V,) int32 scratch."""
    mx = np.float64(logits[0])  # (logit - max) / temperature: a tiny temperature gives -inf and 0, not inf - inf
    for j in range(1, V):
        mx = max(mx, np.float64(logits[j]))
    for j in range(V):
        probs[j] = (np.float64(logits[j]) - mx) / temperature
    if 0 < top_k < V:
        for j in range(V):
            tmp[j] = probs[j]
        kth = _kth_largest(tmp, V, top_k - 1)
        for j in range(V):
            if not probs[j] >= kth:
                probs[j] = -np.inf
    mx = probs[0]
    for j in range(1, V):
        mx = probs[j] if probs[j] > mx else mx
    total = 0.0
    for j in range(V):
        probs[j] = math.exp(probs[j] - mx)
        total += probs[j]
    for j in range(V):
        probs[j] /= total
    if top_p >= 1.0:
        return
    total = 0.0
    for j in range(V):
        tmp[j] = probs[j]  # -1 marks an id already taken
        total += probs[j]
    target = top_p * total
    mass = 0.0
    keep = V
    i = 0
    while i < V:
        if i == EXTRACT_MAX:
            # a flat distribution: sort the ids not taken yet (stable, descending) and go on
            n = i
            for j in range(V):
                if tmp[j] < 0.0:
                    continue
                c = n
                while c > i and probs[order[c - 1]] < probs[j]:
                    order[c] = order[c - 1]
                    c -= 1
                order[c] = j
                n += 1
            while i < V:
                mass += probs[order[i]]
                if mass >= target:
                    keep = i + 1
                    break
                i += 1
            break
        best, b = -1, -1.0
        for j in range(V):
            if tmp[j] > b:
                b = tmp[j]
                best = j
        if best < 0:
            break
        order[i] = best
        tmp[best] = -1.0
        mass += probs[best]
        if mass >= target:
            keep = i + 1
            break
        i += 1
    if keep == V:
        return
    total = 0.0
    for j in range(keep):
        total += probs[order[j]]
    for j in range(V):
        tmp[j] = 0.0
    for j in range(keep):
        tmp[order[j]] = probs[order[j]] / total
    for j in range(V):
        probs[j] = tmp[j]


@njit(cache=True)
def sample(logits, V, temperature, top_k, top_p, u, work, order):
    """A token id from logits (V,), as fc_sample: greedy (lowest id on ties) at temperature 0, else
    the first id whose cumulative probability exceeds u * total. work (3V,) float64, order (V,) int32."""
    if temperature == 0.0:
        best = 0
        for j in range(1, V):
            if logits[j] > logits[best]:
                best = j
        return best
    probs, cdf, tmp = work[:V], work[V : 2 * V], work[2 * V : 3 * V]
    token_probs(logits, V, temperature, top_k, top_p, probs, tmp, order)
    cum = 0.0
    for j in range(V):
        cum += probs[j]
        cdf[j] = cum
    target = u * cdf[V - 1]
    for j in range(V):
        if cdf[j] > target:
            return j
    return V - 1


# the refill rule of a full learned-position cache, the Python reference's own function compiled
_refill = njit(cache=True)(refill)


def generate_tokens(st, out: np.ndarray, uniforms: np.ndarray, advance_last: bool, logits_out: np.ndarray) -> None:
    """Sample out.shape[1] tokens for the one stream of st (a fastchar.sampler.DecodeState with B = 1),
    advancing its cache after each (after the last only if advance_last): the arguments of the Cython
    loop's generate_batch (csrc/_decode.pyx, whose docstring lists them), one stream, single-threaded.
    out (1, N) int32; uniforms (1, N) float64; logits_out (1, N, V) or (1, 0, V) float32. The next
    draw's logits stay in st.scratch (the table's logits slot) between calls, not in st.logits."""
    if st.tokens.shape[0] != 1:
        raise ValueError("the Numba loop runs one stream (B = 1); many run one after another")
    if not st.active[0]:
        return
    V = st.logits.shape[1]
    _generate(
        out[0], st.tokens[0], st.state[0], int(st.n_feed[0]), st.params, st.table, st.eps, st.inv_freq, st.slides,
        st.n_head, st.kcache[0], st.vcache[0], st.scratch, st.scratch[st.logits_at : st.logits_at + V],
        float(st.temperature[0]), int(st.top_k[0]), float(st.top_p[0]), uniforms[0], advance_last, logits_out[0],
        np.zeros(3 * V), np.zeros(V, np.int32),
    )  # fmt: skip


@njit(cache=True)
def _generate(
    out: np.ndarray,
    tokens: np.ndarray,
    state: np.ndarray,
    n_feed: int,
    params: np.ndarray,
    table: np.ndarray,
    eps: np.ndarray,
    inv_freq: np.ndarray,
    slides: bool,
    n_head: int,
    kcache: np.ndarray,
    vcache: np.ndarray,
    scratch: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    uniforms: np.ndarray,
    advance_last: bool,
    logits_out: np.ndarray,
    work: np.ndarray,
    order: np.ndarray,
) -> None:
    """generate_tokens' loop: shapes of one stream (out (N,), tokens (S,), state (2,), kcache (L, C, S),
    vcache (L, NH, S, HS), logits (V,) the table's logits slot of scratch: the next draw's logits, kept
    between calls, logits_out (N, V) or (0, V))."""
    S = kcache.shape[2]
    V = logits.shape[0]
    scores = np.zeros(S, np.float32)
    one = np.zeros(1, np.int32)
    n_cache, pos = state[0], state[1]
    if n_feed > 0:
        _forward_rows(tokens[n_cache:], n_cache, pos, n_feed, params, table, eps, inv_freq, n_head,
                      kcache, vcache, scratch, scores)  # fmt: skip
        n_cache += n_feed
        pos += n_feed
    N = out.shape[0]
    for i in range(N):
        if logits_out.shape[0] > 0:
            logits_out[i, :] = logits
        u = uniforms[i] if temperature > 0 else 0.0
        tok = sample(logits, V, temperature, top_k, top_p, u, work, order)
        out[i] = tok
        if i + 1 == N and not advance_last:
            break
        if n_cache >= S and not slides:
            # learned positions, full: the refill rule, re-encoded from position 0
            n_cache = _refill(tokens, n_cache, S, tok)
            _forward_rows(tokens, 0, 0, n_cache, params, table, eps, inv_freq, n_head,
                          kcache, vcache, scratch, scores)  # fmt: skip
            pos = n_cache
        else:
            # one position; a full rotary cache slides (the new row overwrites the oldest)
            if n_cache < S:
                tokens[n_cache] = tok
            one[0] = tok
            _forward_rows(one, n_cache, pos, 1, params, table, eps, inv_freq, n_head,
                          kcache, vcache, scratch, scores)  # fmt: skip
            n_cache = min(n_cache + 1, S)
            pos += 1
    state[0] = n_cache
    state[1] = pos

"""Sampling: a KV cache, one-position decode steps, temperature / top-k / top-p, a seeded RNG.

Each new character costs one position's work: the network's ops (fastchar/graph.py) run on one row,
its key and value are appended to the cache and its query attends to everything cached. How the
cache is kept once the window (ctx) is full depends on the positions:
- learned (absolute: wpe has ctx rows): the cache cannot slide, so the newest window/2 characters
  are kept and re-encoded from position 0 (one prefill per window/2 new characters); the model
  always conditions on the last window/2 to window characters.
- rope (relative): the cache slides by one position per character. It is a ring of `window` rows;
  the new key overwrites the oldest, rotated by its absolute position p (angles in float64 from the
  integer position, so they stay exact in long generations). Scores depend on p - j only, so this is
  sliding-window attention: every layer attends to the last `window` positions, and the logits equal
  a full forward over the whole text with attention limited to that band (tests/test_rope.py). They
  are not those of a fresh forward over the window's characters alone once the window has slid:
  a cached key of layer 2 and up was computed while older characters were still visible (with one
  layer the two agree). No character is ever re-encoded.

`stream` runs the whole per-character loop in compiled code when the model's backend provides
`generate_tokens` (numba: fastchar/backends/numba_decode.py, cython: csrc/_decode.pyx, where one
stream is the batched loop with one row) and the model is float32: they walk graph.decode_table
(opcodes, scratch offsets, weights by name), one call per chunk of DECODE_CHUNK characters, with the
same cache rule (`refill`) and the same uniforms drawn from the same Generator in the same order.
A loop takes one DecodeState (the model's table, the caches, each stream's tokens and options).
Both compiled loops sample alike (csrc/fc_sample.c, and its Numba port
in numba_decode, so the Numba loop needs no C build); otherwise (the numpy reference, float64) the
Python loop below (KVCache + sample_token) runs.
Many streams (`stream_many`; `generate`/`stream` with a list of prompts or num_samples): the Cython
backend's `generate_batch` (batch_tokens) advances every running stream in one walk of the same
table on one row per stream, each row attending to its own stream's cache; each stream keeps its own
cache rule and its own generator (stream_rngs), and its values are computed exactly as alone, so
its text does not depend on the others. Other backends run the streams in turn. Stop strings cut a
stream's text (StopScan) and stop advancing it.
On CPUs with AVX-512 the Cython loops multiply with weights packed once per generation
(packed_weights: 16-column panels, bf16 pairs for a bf16 model), packed when a stream starts (its
other weights are read as it goes); every product output is one fused multiply-add chain, the same
whatever the batch or the thread split.
The compiled sampler selects rather than sorts (top-k: a selection of the k-th value; top-p: the
most likely ids taken one at a time until the mass is reached).
The two samplers agree on the probabilities to ~1e-12 relative (float64, other summation order), so a
seeded text is the same unless a uniform lands within that of a cdf boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from fastchar.arena import Arena, aligned_zeros
from fastchar.errors import ConfigError, InputError
from fastchar.graph import (
    TOKENS,
    DecodeTable,
    Views,
    act_specs,
    decode_table,
    forward_args,
    forward_ops,
    rope_tables,
)
from fastchar.model import Model
from fastchar.ops import record
from fastchar.tokenizer import CharTokenizer

# Characters per call of a compiled generation loop: big enough that the Python call (~10 us) is
# noise, small enough that `stream` still hands out text as it is made.
DECODE_CHUNK = 32
# generate() hands out nothing before the end: without stop strings it calls the loop this many
# characters at a time. A call costs ~40 us (Python, and caches the Python work left cold): 3 % of
# a one-stream character at 32 a call, measured on a Zen 4.
GENERATE_CHUNK = 256
# Streams whose caches together fit this are stepped together (cache_groups; 8 streams of the base
# model). Measured on a Zen 4 (1 MB L2 per core), base model, 64 streams, one thread: 43.6 -> 26.8
# CPU us per char with groups of 1 to 4 MB; two threads side by side (1 MB, 2 MB): 1.8-1.9x one.
CACHE_GROUP_BYTES = 2 << 20


@dataclass
class DecodeStep:
    """Where one decode step writes: the token's absolute position, its cache slot, the cache rows
    it attends to, and the layer whose cache the next attention op uses."""

    pos: int
    slot: int
    n_ctx: int
    layer: int = 0


def default_decode_step(kernels, op, args: list, cache: KVCache, step: DecodeStep) -> None:
    """An op's decode step unless its record says otherwise: its forward kernel on one row."""
    getattr(kernels, record(op.kind).forward)(*args)


HUGE_PAGE = 2 << 20  # caches on 2 MB boundaries: the kernel can back them with huge pages (fewer TLB misses)
MAX_STREAMS = 10_000  # samples generated together (num_samples x prompts); each keeps its own KV cache


def _is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    """A finite real number (Python or NumPy), not a bool or a string."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and (bool(np.isfinite(value)))
    )


def check_window(model: Model, window: int | None) -> int:
    """The context window (default: the model's ctx), checked to be in [1, ctx]."""
    window = model.cfg.ctx if window is None else window
    if not _is_int(window):
        raise ConfigError(f"the context window (ctx) must be an integer, got {window!r}")
    if not 1 <= window <= model.cfg.ctx:
        raise ConfigError(f"the context window must be in [1, {model.cfg.ctx}], got {window}")
    return window


class KVCache:
    """Cached keys and values of the tokens in `tokens` (the window, oldest first).

    The decode step runs graph.forward_ops on one row (an activation arena of B = T = 1); the
    attention op becomes "append k, v to the cache, then attend to all of it" (attention_decode).
    `slides` (rope): a full cache takes a new token by dropping the oldest (a ring of rows).
    """

    def __init__(self, model: Model, window: int | None = None) -> None:
        window = check_window(model, window)
        cfg = model.cfg
        self.model = model
        self.window = window
        self.slides = cfg.position == "rope"
        cache = [("k", (cfg.n_layer, 1, window, cfg.d_model)), ("v", (cfg.n_layer, 1, window, cfg.d_model))]
        self.arena = Arena(act_specs(cfg, 1, 1, dropout=False) + cache, model.dtype)
        self._idx = np.zeros((1, 1), np.int32)
        views = Views(model.params, None, self.arena, None, {TOKENS: self._idx})
        self.ops = [(op, forward_args(op, views)) for op in forward_ops(cfg)]
        self.steps = {op.kind: record(op.kind).decode_step or default_decode_step for op, _ in self.ops}
        self.tokens: list[int] = []
        self.pos = 0  # absolute position of the next token (rope keeps counting as the window slides)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []
        self.pos = 0

    def step(self, token: int) -> np.ndarray:
        """Append token at the next position and return its logits (V,), a view valid until the next step."""
        model, a = self.model, self.arena
        k, cfg = model.kernels, model.cfg
        if self.length >= self.window and not self.slides:
            raise InputError(f"the KV cache is full ({self.window} positions); reset or refill it")
        pos, slot = self.pos, self.pos % self.window
        n_ctx = min(self.length + 1, self.window)
        self._idx[0, 0] = token
        if self.slides:
            cos, sin = rope_tables(cfg, np.array([pos]))
            a["rope.cos"][...], a["rope.sin"][...] = cos, sin
        step = DecodeStep(pos, slot, n_ctx)
        for op, args in self.ops:  # each op's record runs its decode step (fastchar/ops.py)
            self.steps[op.kind](k, op, args, self, step)
        self.tokens = [*self.tokens[len(self.tokens) + 1 - n_ctx :], int(token)]
        self.pos += 1
        return a["logits"][0, 0]

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Step through tokens (a prefill); returns the logits after the last one."""
        if not tokens:
            raise InputError("feed() needs at least one token")
        for token in tokens:
            logits = self.step(token)
        return logits

    def advance(self, token: int) -> np.ndarray:
        """Append token; a full cache slides (rope) or re-encodes its newest window/2 tokens from
        position 0 (learned positions)."""
        if self.length >= self.window and not self.slides:
            keep = list(self.tokens)
            n = refill(keep, self.length, self.window, token)
            self.reset()
            return self.feed(keep[:n])
        return self.step(token)


def refill(tokens, n_cache: int, window: int, token: int) -> int:
    """The refill rule of a full learned-position cache (KVCache.advance; the Numba loop compiles this
    function, the Cython loop has its own copy): the newest window//2 - 1 of tokens[:n_cache], then
    token, moved to the front of tokens (a list or an int array of n_cache >= 1 entries), to be
    re-encoded from position 0. Returns how many that is (window//2 in all)."""
    n_keep = max(window // 2 - 1, 0)
    for j in range(n_keep):
        tokens[j] = tokens[n_cache - n_keep + j]
    tokens[n_keep] = token
    return n_keep + 1


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised.

    probs (V,). Ties are broken by token id (lower first), so a tiny top_p equals greedy (argmax).
    """
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(mass, top_p * mass[-1])) + 1, probs.size)
    filtered = np.zeros_like(probs)
    filtered[order[:keep]] = probs[order[:keep]]
    return filtered / filtered.sum()


def top_k_filter(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Logits (V,) with all but the top_k largest set to -inf (ties at the k-th value are kept)."""
    if top_k >= logits.size:
        return logits
    kth = np.partition(logits, -top_k)[-top_k]
    return np.where(logits >= kth, logits, -np.inf)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    """Reject sampling options outside their ranges before any work starts."""
    if not _is_real(temperature) or not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy) and a finite number, got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1] (a number), got {top_p!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def check_seed(seed: object) -> None:
    """A sampling seed is None (fresh entropy) or an integer >= 0 (NumPy's generators refuse less)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0):
        raise ConfigError(
            f"the seed must be an integer >= 0 or None, got {seed!r}", hint="pass --seed 0 (or any n >= 0)"
        )


def token_probs(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The distribution a draw samples from (V,) float64: softmax(logits / temperature), then top-k,
    then top-p. temperature > 0 (0 is greedy: see sample_token). The logits' maximum is subtracted
    before the division, so a tiny temperature (1e-308) gives the greedy distribution, not inf - inf."""
    z = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # a tiny temperature: -inf, as meant
        z = (z - z.max()) / temperature
    if top_k is not None:
        z = top_k_filter(z, top_k)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        probs = top_p_filter(probs, top_p)
    return probs


def sample_token(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> int:
    """Draw a token id from logits (V,): temperature 0 is greedy, then top-k, then top-p.

    The draw is the first id whose cumulative probability exceeds u * total, u = rng.random().
    """
    if temperature == 0:
        return int(np.argmax(logits))
    probs = token_probs(logits, temperature, top_k, top_p)
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), probs.size - 1))


def compiled_loop(model: Model) -> Callable | None:
    """The backend's compiled `generate_tokens` if it has one and the model is float32, else None."""
    fn = getattr(model.kernels, "generate_tokens", None)
    return fn if fn is not None and model.dtype == np.float32 else None


def python_tokens(
    model: Model,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
    window: int,
) -> Iterator[int]:
    """The reference loop: token ids one at a time (KVCache.advance, then sample_token)."""
    cache = KVCache(model, window)
    logits = cache.feed(ids[-cache.window :])
    for i in range(max_new_tokens):
        token = sample_token(logits, temperature, top_k, top_p, rng)
        yield token
        if i + 1 < max_new_tokens:
            logits = cache.advance(token)


def packed_weights(model: Model, plan: DecodeTable) -> tuple | None:
    """The products' weights packed once for this generation in the model's precision (the backend's
    pack_decode_weights, with the first layer's lookup where it applies), or None. Changes to those
    weights (and, with the lookup, to the embedding and first norm) after this call do not reach the
    stream (the other embeddings and norms are read as it goes)."""
    pack = getattr(model.kernels, "pack_decode_weights", None)
    if pack is None:
        return None
    return pack(model.params.flat, plan.table, model.precision, plan.eps, model.cfg.vocab_size)


@dataclass
class DecodeState:
    """Everything a compiled decode loop reads and updates for B streams, in one object (the loops
    take it, the draws' outputs and uniforms): built by decode_state.

    The model: params (P,) float32; table, eps, inv_freq, slides, logits_at: graph.decode_table's
    (its scratch slots hold max(S, B) rows); n_head; packed: pack_decode_weights' (packed, offsets,
    precision, lookup) or None. Per stream b (S the window, L layers, C channels, V the vocabulary):
    tokens (B, S) int32 the cached tokens; state (B, 2) int64 rows in the cache and the absolute
    position of the next token; n_feed (B,) int64 tokens[b, n_cache:n_cache+n_feed] still to encode
    (a prompt); active (B,) int32 (0: left alone); kcache (B, L, C, S) float32 the keys, time last
    (the scores run along positions), vcache (B, L, NH, S, HS) the values, position-major per head (a
    new row is one contiguous append per head, p.v runs along channels); or, for a model whose
    products run in bf16 where the backend's kv16_ok allows it, both uint16: bf16 keys and values in
    pairs (csrc/fc_decode.h), half the bytes;
    logits (B, V) float32 the next draw's logits, kept between calls; temperature (B,) float64,
    top_k (B,) int64 (0: off), top_p (B,) float64 (1: off), each stream's own sampling options.
    scratch: the table's activations (scratch_size,) float32, 64-byte aligned; side: the buffers
    of the threads that run groups side by side (generate_batch), kept between calls; tile_rows: the
    rows of the backend's product tile (cache_groups makes groups of a multiple of it).
    """

    params: np.ndarray
    table: np.ndarray
    eps: np.ndarray
    inv_freq: np.ndarray
    slides: bool
    n_head: int
    logits_at: int
    packed: tuple | None
    tokens: np.ndarray
    state: np.ndarray
    n_feed: np.ndarray
    active: np.ndarray
    kcache: np.ndarray
    vcache: np.ndarray
    scratch: np.ndarray
    logits: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    side: dict = field(default_factory=dict)
    tile_rows: int = 1

    def start(self, b: int, ids: list[int], temperature: float, top_k: int | None, top_p: float | None) -> None:
        """Stream b continues ids (its last S tokens, encoded at the next call) with these options."""
        S, V = self.tokens.shape[1], self.logits.shape[1]
        prompt = ids[-S:]
        self.tokens[b, : len(prompt)] = prompt
        self.state[b] = 0
        self.n_feed[b] = len(prompt)
        self.active[b] = 1
        self.temperature[b] = temperature
        self.top_k[b] = 0 if top_k is None else min(int(top_k), V)
        self.top_p[b] = 1.0 if top_p is None else float(top_p)


def cache_dtype(model: Model, window: int) -> type:
    """The keys' and values' type in a compiled decode over `window` rows: np.uint16 (bf16) for a bf16
    model where the backend's kv16_ok allows it (its products then run in bf16 too: AVX512_BF16),
    else np.float32."""
    kv16_ok = getattr(model.kernels, "kv16_ok", None)
    cfg = model.cfg
    bf16 = model.precision == "bf16" and kv16_ok is not None and kv16_ok(cfg.d_model, window, cfg.n_head)
    return np.uint16 if bf16 else np.float32


def decode_state(model: Model, streams: int, window: int) -> DecodeState:
    """A DecodeState of `streams` idle streams (activate each with DecodeState.start) over a window of
    `window` cache rows, its weights packed now (packed_weights)."""
    cfg = model.cfg
    B, S, V = streams, window, cfg.vocab_size
    plan = decode_table(cfg, model.params.offsets, max(S, B))  # scratch slots hold B rows too
    dtype = cache_dtype(model, S)
    size = B * cfg.n_layer * cfg.d_model * S
    align = HUGE_PAGE if np.dtype(dtype).itemsize * size >= HUGE_PAGE else 64  # one small cache: no 2 MB page
    kcache = aligned_zeros(size, align, dtype).reshape(B, cfg.n_layer, cfg.d_model, S)
    vcache = aligned_zeros(size, align, dtype).reshape(B, cfg.n_layer, cfg.n_head, S, cfg.head_size)
    return DecodeState(
        model.params.flat, plan.table, plan.eps, plan.inv_freq, plan.slides, cfg.n_head, plan.logits,
        packed_weights(model, plan), np.zeros((B, S), np.int32), np.zeros((B, 2), np.int64), np.zeros(B, np.int64),
        np.zeros(B, np.int32), kcache, vcache, aligned_zeros(plan.scratch_size),
        np.zeros((B, V), np.float32), np.zeros(B, np.float64), np.zeros(B, np.int64), np.ones(B, np.float64),
        tile_rows=rows() if (rows := getattr(model.kernels, "decode_tile_rows", None)) else 1,
    )  # fmt: skip


def batch_loop(model: Model) -> Callable | None:
    """The backend's compiled `generate_batch` (many streams per step) if it has one and the model is
    float32, else None."""
    fn = getattr(model.kernels, "generate_batch", None)
    return fn if fn is not None and model.dtype == np.float32 else None


def _uniforms(rngs: list, st: DecodeState, n: int) -> np.ndarray:
    """(B, n) uniforms: stream b's next n from rngs[b] if it is running and draws (temperature > 0),
    one per token as sample_token."""
    u = np.zeros((len(rngs), n), np.float64)
    for b in np.flatnonzero(st.active):
        if st.temperature[b] > 0:
            u[b] = rngs[b].random(n)
    return u


def cache_groups(st: DecodeState) -> np.ndarray:
    """Each stream's group (B,) int32: the running streams in order, in as few groups as keep a group's
    caches within CACHE_GROUP_BYTES, of whole tiles of the product (tile_rows; else of about equal
    size), and two at least from tile_rows streams on (the idle streams: 0). generate_batch runs
    a group's steps together (its caches stay in the cores' caches instead of every stream's caches
    streaming through them each step), and, with two threads or more, groups side by side. Streams
    are independent: the grouping changes no result."""
    per_stream = st.kcache[0].nbytes + st.vcache[0].nbytes
    running = st.active != 0
    n = int(running.sum())
    size = max(1, CACHE_GROUP_BYTES // per_stream)
    groups = np.zeros(len(running), np.int32)
    if st.tile_rows <= n <= size:  # two groups at least (two threads side by side), of half tiles or more
        size = -(-n // 2)
    if 1 < st.tile_rows < size:  # whole tiles, the last group the rest (on avx2, 8 rows run as 4 + 4,
        size -= size % st.tile_rows  # whose 8 accumulators keep the FMAs less busy than a 6-row tile's 12)
        groups[running] = np.arange(n) // size
    else:  # about equal sizes
        groups[running] = np.arange(n) * max(1, -(-n // size)) // max(n, 1)
    return groups


def _run_chunks(fn: Callable, st: DecodeState, rngs: list, max_new_tokens: int, chunk: int,
                logits: np.ndarray | None) -> Iterator[np.ndarray]:  # fmt: skip
    """Call the compiled loop fn on st chunk by chunk: token ids (B, n) per chunk of n <= chunk."""
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    B, V = st.logits.shape
    done = 0
    while done < max_new_tokens and st.active.any():
        n = min(chunk, max_new_tokens - done)
        out = np.zeros((B, n), np.int32)
        rows = np.zeros((B, n if logits is not None else 0, V), np.float32)
        groups = (cache_groups(st),) if B > 1 else ()  # (numba's one-stream loop takes none)
        fn(st, out, _uniforms(rngs, st, n), done + n < max_new_tokens, rows, *groups)
        if logits is not None:
            logits[:, done : done + n] = rows
        st.n_feed[:] = 0
        done += n
        yield out


def batch_tokens(
    model: Model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rngs: list[np.random.Generator],
    window: int,
    chunk: int = DECODE_CHUNK,
    active: np.ndarray | None = None,
    logits: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """B streams in one batched decode step: token ids (B, n) int32 per chunk of n <= chunk.

    Stream b continues prompts[b] and draws its uniforms from rngs[b] only, as compiled_tokens
    does for one stream, so its text does not depend on the other streams. active (B,) int32, if
    given, may be set to 0 between chunks to stop a stream (its later ids are meaningless).
    logits, if given, (B, max_new_tokens, V) float32 receives the logits of every draw.
    """
    fn = batch_loop(model)
    if fn is None:
        raise InputError(f"backend {model.backend!r} has no batched generation loop for {model.dtype} models")
    st = decode_state(model, len(prompts), window)
    for b, ids in enumerate(prompts):
        st.start(b, ids, temperature, top_k, top_p)
    if active is not None:
        st.active = active  # the caller's: it may stop streams between chunks
    yield from _run_chunks(fn, st, rngs, max_new_tokens, chunk, logits)


def compiled_tokens(
    model: Model,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
    window: int,
    chunk: int = DECODE_CHUNK,
    logits: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """The compiled loop: token ids (n,) int32 per chunk of n <= chunk; same semantics as python_tokens.

    logits, if given, is a (max_new_tokens, V) float32 array that receives the logits of every draw
    (for tests: they must equal a full forward over the tokens held in the cache at that step).
    The cython backend runs its batched loop with one row; numba its own one-stream loop.
    """
    fn = compiled_loop(model)
    if fn is None:
        raise InputError(f"backend {model.backend!r} has no compiled generation loop for {model.dtype} models")
    st = decode_state(model, 1, window)
    st.start(0, ids, temperature, top_k, top_p)
    rows = None if logits is None else logits[None]
    for out in _run_chunks(fn, st, [rng], max_new_tokens, chunk, rows):
        yield out[0]


def describe_decode(model: Model, window: int | None = None) -> list[str]:
    """One line per call of a decode step of `model`: the compiled loop's table rows (opcode, fused
    post-op, the function that runs it and why; in the Cython loop also the stage it runs in, see
    `_cydecode.row_stages`), or the Python loop's kernel calls (KVCache)."""
    from fastchar.graph import function_name
    from fastchar.ops import OPCODE_NAMES, POST_NAMES, POST_RECORD

    if compiled_loop(model) is None:
        return [
            f"decode   {op.kind:<17} {op.out:<20} "
            f"{function_name(getattr(model.kernels, record(op.kind).forward)):<52} Python loop (KVCache)"
            for op in forward_ops(model.cfg)
        ]
    from fastchar.ops import MATMUL, OPC, OPCODE_RECORD, POST, K, N

    plan = decode_table(model.cfg, model.params.offsets, check_window(model, window))
    column = 0 if model.backend == "cython" else 1
    packed, why = False, "compiled loop"
    stages = ["compiled loop"] * len(plan.table)
    if model.backend == "cython":
        from fastchar import _cydecode, isa

        packed = _cydecode.packed_available(model.precision)
        path = "AVX-512F+BF16" if model.precision == "bf16" else isa.path()
        why = f"{model.precision} weights packed in 16-column panels ({path})" if packed else "fp32, unpacked"
        stages = _cydecode.row_stages(plan.table, model.cfg.d_model, model.cfg.n_head)
    looked_up = packed and _cydecode.first_layer_lookup(plan.table, model.cfg.vocab_size)
    lines = []
    for r, (row, stage) in enumerate(zip(plan.table, stages, strict=True)):
        rec = OPCODE_RECORD[int(row[OPC])]
        fn = rec.decode_functions[column] if rec.decode_functions else "inline"
        post = POST_NAMES[int(row[POST])]
        if post:
            fn += " + " + POST_RECORD[int(row[POST])].decode_functions[column]
        name = OPCODE_NAMES[int(row[OPC])] + (f"+{post}" if post else "")
        product = rec.rows or rec.absorbs_product  # the products (x @ W, x @ W.T, the qkv stage)
        if product:
            chosen = "fc_matmul_packed" + ("_bf16" if model.precision == "bf16" else "") if packed else None
            if rec.absorbs_product and looked_up and r == _cydecode.LOOKUP_ROW:
                fn = f"qkv from a table of the {model.cfg.vocab_size} tokens + {fn}"
            elif rec.absorbs_product:
                fn = f"{chosen or MATMUL.decode_functions[column]} (qkv) + {fn}"
            elif chosen:
                fn = chosen + (" + " + fn.split(" + ", 1)[1] if " + " in fn else "")
        lines.append(f"decode   {name:<17} K={int(row[K]):<4} N={int(row[N]):<5} {model.backend}: {fn:<44} "
                     f"{stage:<28} {why if product else ''}".rstrip())  # fmt: skip
    return lines


class DecodeBatch:
    """Streams that join and leave one running batched decode between steps (continuous batching).

    `capacity` rows, each a stream: add_row starts one (its prompt is encoded alone at the next
    step, then it takes part in every step), step() draws one character for every row and advances
    all their caches together, remove_row ends one and frees its row for the next add_row. A row's
    tokens equal compiled_tokens' (so generate's) for the same prompt, options and generator: it
    takes its uniforms from its own generator in the same order (a block of DECODE_CHUNK at a time:
    the same values as one draw per token), and the batched loop computes a row's values as alone.
    Rows may use different temperatures, top-k and top-p. The weights are packed once, here.
    Backends without a batched loop (numba, numpy) run each row's own loop (compiled_tokens or
    python_tokens, one character a call): the same tokens, one row after another.
    """

    def __init__(self, model: Model, capacity: int, window: int | None = None) -> None:
        if not isinstance(capacity, int | np.integer) or capacity < 1:
            raise ConfigError(f"the batch needs a capacity >= 1, got {capacity}")
        cfg = model.cfg
        self.model, self.capacity, self.window = model, int(capacity), check_window(model, window)
        self._fn = batch_loop(model)
        B, S, V = self.capacity, self.window, cfg.vocab_size
        self._free = list(range(B - 1, -1, -1))
        self.active = np.zeros(B, np.int32)  # (B,) 1 for the rows running
        self._serial: list[Iterator | None] = [None] * B
        self._rngs: list[np.random.Generator | None] = [None] * B
        self._temperature = np.zeros(B, np.float64)
        self._top_k = np.zeros(B, np.int64)
        self._top_p = np.ones(B, np.float64)
        self._ubuf: list[list[float]] = [[] for _ in range(B)]  # each row's next uniforms
        self._unext = [0] * B
        if self._fn is None:
            return
        self._st = decode_state(model, B, S)
        self.active = self._st.active
        self._temperature, self._top_k, self._top_p = self._st.temperature, self._st.top_k, self._st.top_p
        self._out = np.zeros((B, 1), np.int32)
        self._uniforms = np.zeros((B, 1), np.float64)
        self._no_logits = np.zeros((B, 0, V), np.float32)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    @property
    def rows(self) -> np.ndarray:
        """The running rows (n,) int64, in row order."""
        return np.flatnonzero(self.active)

    def add_row(self, ids: list[int], temperature: float, top_k: int | None, top_p: float | None,
                rng: np.random.Generator) -> int:  # fmt: skip
        """Start a stream that continues ids (its last `window` tokens) and samples with these
        options from rng; returns its row. Raises InputError when no row is free."""
        check_sampling(temperature, top_k, top_p, 0)
        V = self.model.cfg.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise InputError(f"a row needs at least one token id in [0, {V})")
        if not self._free:
            raise InputError(f"all {self.capacity} rows of the batch are running")
        row = self._free.pop()
        prompt = [int(t) for t in ids[-self.window :]]
        self._rngs[row] = rng
        self._temperature[row] = temperature
        self._top_k[row] = 0 if top_k is None else min(int(top_k), V)
        self._top_p[row] = 1.0 if top_p is None else float(top_p)
        self._unext[row] = DECODE_CHUNK  # drawn at the first step that needs one
        if self._fn is None:
            many = 1 << 62  # never the last token: every draw advances the cache, as in the batch
            loop = compiled_tokens if compiled_loop(self.model) is not None else python_tokens
            kw = {"chunk": 1} if loop is compiled_tokens else {}
            self._serial[row] = iter(loop(self.model, prompt, many, temperature, top_k, top_p, rng, self.window, **kw))
        else:
            self._st.start(row, prompt, temperature, top_k, top_p)
        self.active[row] = 1
        return row

    def remove_row(self, row: int) -> None:
        """End the stream in row (its row is free for the next add_row)."""
        if not 0 <= row < self.capacity or not self.active[row]:
            raise InputError(f"row {row} is not running")
        self.active[row] = 0
        self._serial[row] = None
        self._rngs[row] = None
        self._free.append(row)

    def _next_uniforms(self, rows: list[int], n: int) -> np.ndarray:
        """(B, n) uniforms: row r's next n values from its generator for each row that samples
        (temperature > 0), drawn DECODE_CHUNK at a time. Plain Python on purpose: at a few rows,
        NumPy's fancy indexing costs more than the decode step."""
        u = self._uniforms if n == 1 else np.zeros((self.capacity, n), np.float64)
        for row in rows:
            if self._temperature[row] > 0:
                got: list[float] = []
                while len(got) < n:
                    i = self._unext[row]
                    if i == DECODE_CHUNK:
                        self._ubuf[row] = self._rngs[row].random(DECODE_CHUNK).tolist()
                        i = 0
                    take = min(n - len(got), DECODE_CHUNK - i)
                    got += self._ubuf[row][i : i + take]
                    self._unext[row] = i + take
                u[row] = got
        return u

    def step(self, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """n characters for every running row: (rows (r,) int64, token ids (r, n) int32 with n > 1,
        (r,) with n = 1). A row's characters are the same whatever n: n > 1 only saves the calls."""
        rows = self.rows
        if rows.size == 0:
            return rows, np.zeros((0, n) if n > 1 else 0, np.int32)
        if self._fn is None:
            made = [[int(np.ravel(next(self._serial[r]))[0]) for _ in range(n)] for r in rows]
            out = np.array(made, np.int32).reshape(rows.size, n)
            return rows, out if n > 1 else out[:, 0]
        uniforms = self._next_uniforms(rows.tolist(), n)
        out = self._out if n == 1 else np.zeros((self.capacity, n), np.int32)
        self._fn(self._st, out, uniforms, True, self._no_logits, cache_groups(self._st))
        self._st.n_feed[rows] = 0
        return rows, out[rows, 0].copy() if n == 1 else out[rows]


class StopScan:
    """Cut one stream's new text at the first of the stop strings: feed() returns the text that is
    safe to hand out (nothing that could still turn out to start a stop string is released)."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = stop
        self.hold = max((len(t) for t in stop), default=1) - 1
        self.text = ""  # the text not released yet (at most hold characters between two feeds)
        self.done = False

    def feed(self, piece: str) -> str:
        """Append piece; the newly releasable text (everything before a stop string once found).
        Only the held-back tail is kept: a long stream's cost stays linear in its length."""
        if self.done:
            return ""
        self.text += piece
        hits = [i for i in (self.text.find(t) for t in self.stop) if i >= 0]
        if hits:
            self.done = True
            end = min(hits)
        else:
            end = max(len(self.text) - self.hold, 0)
        out, self.text = self.text[:end], self.text[end:]
        return out

    def flush(self) -> str:
        """The held-back tail at the end of the stream (no stop string was produced)."""
        if self.done:
            return ""
        out, self.text = self.text, ""
        return out


def check_stop(stop: str | list[str] | None) -> list[str]:
    """The stop strings as a list, each non-empty."""
    if stop is not None and not isinstance(stop, str | list | tuple):
        raise ConfigError(f"stop must be a string or a list of strings, got {type(stop).__name__}",
                          hint="pass stop='\\n\\n' or stop=['.', '!']")  # fmt: skip
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for t in stops:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"stop strings must be non-empty strings, got {t!r}",
                              hint="pass a non-empty --stop TEXT")  # fmt: skip
    return stops


def _prompt_ids(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    ids = [int(i) for i in tokenizer.encode(prompt)] if prompt else []
    return ids or [tokenizer.stoi.get("\n", 0)]  # nothing to condition on: start from a newline


def _check(model: Model, tokenizer: CharTokenizer, temperature: float, top_k: int | None, top_p: float | None,
           max_new_tokens: int, seed: object) -> None:  # fmt: skip
    if not isinstance(model, Model) or not isinstance(tokenizer, CharTokenizer):
        kinds = f"{type(model).__name__} and {type(tokenizer).__name__}"
        raise ConfigError(f"expected a Model and a CharTokenizer, got {kinds}",
                          hint="pass model and model.tokenizer (fastchar.load)")  # fmt: skip
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_seed(seed)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is {model.cfg.vocab_size}"
        )


def _one_stream(
    model: Model,
    tokenizer: CharTokenizer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
    window: int,
    chunk: int = DECODE_CHUNK,
) -> Iterator[str]:
    """One stream's new text, a chunk (compiled loop) or a character (Python loop) at a time."""
    chars = tokenizer.chars
    if compiled_loop(model) is not None:
        for block in compiled_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng, window, chunk):
            yield "".join([chars[t] for t in block])
    else:
        for token in python_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng, window):
            yield chars[token]


def prompt_list(prompt: str | list[str], num_samples: int | None) -> list[str] | None:
    """The streams' prompts (each prompt num_samples times), or None for the single-prompt API."""
    if num_samples is not None and (not _is_int(num_samples) or not 1 <= num_samples <= MAX_STREAMS):
        raise ConfigError(f"num_samples must be an integer in [1, {MAX_STREAMS:,}], got {num_samples!r}",
                          hint=f"pass --num-samples {MAX_STREAMS} or less (run several times for more)")  # fmt: skip
    if isinstance(prompt, str):
        return None if num_samples is None else [prompt] * int(num_samples)
    if not isinstance(prompt, list | tuple) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ConfigError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    if len(prompt) * (1 if num_samples is None else int(num_samples)) > MAX_STREAMS:
        raise ConfigError(f"at most {MAX_STREAMS:,} streams (prompts x num_samples) are generated together",
                          hint="split the prompts into several calls")  # fmt: skip
    return [p for p in prompt for _ in range(1 if num_samples is None else int(num_samples))]


def check_streams_memory(
    model: Model, n: int, window: int, available: int | None = None, flag: str = "--num-samples"
) -> None:
    """Refuse n streams in one batched decode whose caches exceed the memory available now (flag: the
    option that set n, for the hint)."""
    from fastchar.runfolder import MIB, available_bytes

    cfg = model.cfg
    kv = np.dtype(cache_dtype(model, window)).itemsize * 2 * cfg.n_layer * cfg.d_model * window
    per_stream = kv + 4 * (2 * cfg.vocab_size + window) + 64
    need = n * per_stream
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        fits = available // per_stream
        raise ConfigError(
            f"{n:,} streams together need about {need / MIB:,.0f} MiB (a KV cache each) but only "
            f"{available / MIB:,.0f} MiB is available",
            hint=f"lower {flag} to {fits:,} or less" if fits >= 1 else "free some memory (`free -m`)",
        )


def stream_rngs(seed: int | None, n: int) -> list[np.random.Generator]:
    """Stream i's generator: child i of SeedSequence(seed), the same whatever n is."""
    return [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(n)]


def stream_many(
    model: Model,
    tokenizer: CharTokenizer,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ctx: int | None = None,
    stop: str | list[str] | None = None,
) -> Iterator[tuple[int, str]]:
    """(i, new text) pieces of len(prompts) streams as they are made; stream i continues prompts[i]
    with its own generator (stream_rngs). With a batched loop (cython) every step advances all
    running streams at once; otherwise the streams run one after another. The options are checked
    at the call, before the first piece is asked for."""
    _check(model, tokenizer, temperature, top_k, top_p, max_new_tokens, seed)
    stops = check_stop(stop)
    window = check_window(model, ctx)
    if batch_loop(model) is not None:
        check_streams_memory(model, len(prompts), window)
    ids = [_prompt_ids(tokenizer, p) for p in prompts]
    return _stream_many(model, tokenizer, prompts, ids, max_new_tokens, temperature, top_k, top_p, seed, window,
                        stops)  # fmt: skip


def _stream_many(
    model: Model,
    tokenizer: CharTokenizer,
    prompts: list[str],
    ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    window: int,
    stops: list[str],
) -> Iterator[tuple[int, str]]:
    rngs = stream_rngs(seed, len(prompts))
    scans = [StopScan(stops) for _ in prompts]
    if batch_loop(model) is None:
        for i, (one, rng) in enumerate(zip(ids, rngs, strict=True)):
            for piece in _one_stream(model, tokenizer, one, max_new_tokens, temperature, top_k, top_p, rng, window):
                text = scans[i].feed(piece)
                if text:
                    yield i, text
                if scans[i].done:
                    break
            if tail := scans[i].flush():
                yield i, tail
        return
    chars = np.array(tokenizer.chars)
    active = np.ones(len(prompts), np.int32)
    for block in batch_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rngs, window, active=active):
        for i in np.flatnonzero(active):
            text = scans[i].feed("".join(chars[block[i]]))
            if text:
                yield int(i), text
            if scans[i].done:
                active[i] = 0
    for i, scan in enumerate(scans):
        if tail := scan.flush():
            yield i, tail


def stream(
    model: Model,
    tokenizer: CharTokenizer,
    prompt: str | list[str],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ctx: int | None = None,
    num_samples: int | None = None,
    stop: str | list[str] | None = None,
) -> Iterator[str] | Iterator[tuple[int, str]]:
    """Yield max_new_tokens characters, one at a time as they are made, continuing prompt.

    ctx limits the context window (default and maximum: the model's ctx). With a compiled loop
    (see the module docstring) characters are made DECODE_CHUNK at a time, then yielded one by one.
    stop: a stream ends at the first of these strings it produces (the string is not yielded).
    Several streams (prompt a list, or num_samples given: each prompt num_samples times): yields
    (stream index, new text) pieces instead, see stream_many.
    """
    prompts = prompt_list(prompt, num_samples)
    if prompts is not None:
        return stream_many(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, ctx, stop)
    return _stream_one(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, ctx, stop)


def _stream_one(
    model: Model,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    ctx: int | None,
    stop: str | list[str] | None,
    chunk: int = DECODE_CHUNK,
) -> Iterator[str]:
    """One stream's characters; the options are checked here, at the call, not at the first next()."""
    _check(model, tokenizer, temperature, top_k, top_p, max_new_tokens, seed)
    stops = check_stop(stop)
    ids = _prompt_ids(tokenizer, prompt)
    window = check_window(model, ctx)
    return _one_text(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, seed, window, stops, chunk)


def _one_text(
    model: Model,
    tokenizer: CharTokenizer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    window: int,
    stops: list[str],
    chunk: int = DECODE_CHUNK,
) -> Iterator[str]:
    rng = np.random.default_rng(seed)
    scan = StopScan(stops) if stops else None
    for piece in _one_stream(model, tokenizer, ids, max_new_tokens, temperature, top_k, top_p, rng, window, chunk):
        if scan is not None:
            piece = scan.feed(piece)
        yield from piece
        if scan is not None and scan.done:
            return
    if scan is not None:
        yield from scan.flush()


def generate(
    model: Model,
    tokenizer: CharTokenizer,
    prompt: str | list[str],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ctx: int | None = None,
    num_samples: int | None = None,
    stop: str | list[str] | None = None,
) -> str | list[str]:
    """The prompt followed by max_new_tokens sampled characters (see `stream` for the options); for
    several streams (a list of prompts or num_samples) a list, stream i's text at i."""
    prompts = prompt_list(prompt, num_samples)
    if prompts is None:
        chunk = DECODE_CHUNK if stop else GENERATE_CHUNK  # (a stop string ends a stream within its chunk)
        return prompt + "".join(_stream_one(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p,
                                            seed, ctx, stop, chunk))  # fmt: skip
    pieces: list[list[str]] = [[p] for p in prompts]  # joined once at the end (+= copied each text every step)
    for i, piece in stream_many(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, ctx, stop):
        pieces[i].append(piece)
    return ["".join(p) for p in pieces]

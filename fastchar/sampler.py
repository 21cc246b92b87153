"""Sampling: a KV cache, one-position decode steps, temperature / top-k / top-p, a seeded RNG.

Each new character costs one position's work: its key and value are appended to the cache and its
query attends to everything cached. Positions are learned and absolute (wpe has ctx rows), so the
cache cannot slide: when it is full, the newest ctx/2 characters are kept and re-encoded from
position 0 (one prefill per ctx/2 new characters). The model therefore always conditions on the
last ctx/2 to ctx characters, never on fewer (once that many exist).

`stream` runs the whole per-character loop in compiled code when the model's backend provides
`generate_tokens` (numba: fastchar/backends/numba_decode.py, cython: csrc/_decode.pyx) and the model
is float32: one call per chunk of DECODE_CHUNK characters, same cache rule, same sampling, the same
uniforms drawn from the same Generator in the same order. Otherwise (the numpy reference, float64)
it runs the Python loop below (KVCache + sample_token), which is the reference for the compiled one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from fastchar.arena import Arena
from fastchar.config import ModelConfig
from fastchar.errors import ConfigError, InputError
from fastchar.model import RMSNORM_EPS, Model
from fastchar.tokenizer import CharTokenizer


def cache_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and values of every layer (one sequence) plus the scratch of one decode step."""
    L, S, C, H, V = cfg.n_layer, cfg.ctx, cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    return [
        ("k", (L, 1, S, C)),
        ("v", (L, 1, S, C)),
        ("x", (1, 1, C)),
        ("h", (1, 1, C)),
        ("rstd", (1, 1)),
        ("qkv", (1, 3 * C)),
        ("atty", (1, C)),
        ("proj", (1, 1, C)),
        ("fch", (1, 1, H)),
        ("fch_act", (1, 1, H)),
        ("logits", (1, V)),
    ]


# Characters per call of a compiled generation loop: big enough that the Python call (~10 us) is
# noise, small enough that `stream` still hands out text as it is made.
DECODE_CHUNK = 32


def check_window(model: Model, window: int | None) -> int:
    """The context window (default: the model's ctx), checked to be in [1, ctx]."""
    window = model.cfg.ctx if window is None else window
    if not 1 <= window <= model.cfg.ctx:
        raise ConfigError(f"the context window must be in [1, {model.cfg.ctx}], got {window}")
    return window


def decode_scratch_size(cfg: ModelConfig, window: int) -> int:
    """float32 scratch of a compiled generation loop: logits (V) + S rows of x, h, proj, qkv, atty
    (7C), fch (H) and attention scores (1), S = window."""
    return cfg.vocab_size + window * (7 * cfg.d_model + cfg.mlp_hidden + 1)


class KVCache:
    """Cached keys and values of the tokens in `tokens`, which sit at positions 0..len-1."""

    def __init__(self, model: Model, window: int | None = None) -> None:
        window = check_window(model, window)
        self.model = model
        self.window = window
        self.arena = Arena(cache_specs(model.cfg), model.dtype)
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []

    def step(self, token: int) -> np.ndarray:
        """Append token at the next position and return its logits (V,), a view valid until the next step."""
        model, a = self.model, self.arena
        cfg, k, p = model.cfg, model.kernels, model.params
        pos = self.length
        if pos >= self.window:
            raise InputError(f"the KV cache is full ({self.window} positions); reset or refill it")
        C = cfg.d_model
        x, h, qkv, proj = a["x"], a["h"], a["qkv"], a["proj"]
        k.embedding_forward(x, np.array([[token]], np.int32), p["wte"], p["wpe"][pos : pos + 1])
        for i in range(cfg.n_layer):
            s = f"blocks.{i}."
            k.rmsnorm_forward(h, a["rstd"], x, p[s + "ln1.weight"], RMSNORM_EPS)
            k.matmul_forward(qkv, h[0], p[s + "attn.qkv"])
            a["k"][i, 0, pos] = qkv[0, C : 2 * C]
            a["v"][i, 0, pos] = qkv[0, 2 * C :]
            k.attention_decode(a["atty"], qkv[:, :C], a["k"][i], a["v"][i], pos + 1, cfg.n_head)
            k.matmul_forward(proj[0], a["atty"], p[s + "attn.proj"])
            k.residual_forward(x, x, proj)
            k.rmsnorm_forward(h, a["rstd"], x, p[s + "ln2.weight"], RMSNORM_EPS)
            k.matmul_forward(a["fch"][0], h[0], p[s + "mlp.fc"])
            k.relu2_forward(a["fch_act"], a["fch"])
            k.matmul_forward(proj[0], a["fch_act"][0], p[s + "mlp.proj"])
            k.residual_forward(x, x, proj)
        k.rmsnorm_forward(h, a["rstd"], x, p["ln_f.weight"], RMSNORM_EPS)
        k.matmul_forward(a["logits"], h[0], p["lm_head"])
        self.tokens.append(int(token))
        return a["logits"][0]

    def feed(self, tokens: list[int]) -> np.ndarray:
        """Step through tokens (a prefill); returns the logits after the last one."""
        if not tokens:
            raise InputError("feed() needs at least one token")
        for token in tokens:
            logits = self.step(token)
        return logits

    def advance(self, token: int) -> np.ndarray:
        """Append token, re-encoding the newest window/2 tokens from position 0 when the cache is full."""
        if self.length >= self.window:
            n_keep = max(self.window // 2 - 1, 0)  # plus the new token: window/2 in all
            keep = self.tokens[len(self.tokens) - n_keep :]
            self.reset()
            return self.feed([*keep, token])
        return self.step(token)


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
    if not temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int | np.integer) or top_k < 1):
        raise ConfigError(f"top_k must be an integer >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")


def check_seed(seed: object) -> None:
    """A sampling seed is None (fresh entropy) or an integer >= 0 (NumPy's generators refuse less)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0):
        raise ConfigError(
            f"the seed must be an integer >= 0 or None, got {seed!r}", hint="pass --seed 0 (or any n >= 0)"
        )


def sample_token(
    logits: np.ndarray,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    rng: np.random.Generator,
) -> int:
    """Draw a token id from logits (V,): temperature 0 is greedy, then top-k, then top-p."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if top_k is not None:
        z = top_k_filter(z, top_k)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        probs = top_p_filter(probs, top_p)
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
    """
    fn = compiled_loop(model)
    if fn is None:
        raise InputError(f"backend {model.backend!r} has no compiled generation loop for {model.dtype} models")
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    cfg = model.cfg
    V = cfg.vocab_size
    params = model.params
    offsets = np.array([params.offsets[name] for name, _ in params.specs], np.int64)
    kcache = np.zeros((cfg.n_layer, cfg.d_model, window), np.float32)  # time last (see the kernels)
    vcache = np.zeros_like(kcache)
    scratch = np.zeros(decode_scratch_size(cfg, window), np.float32)
    work = np.zeros(3 * V, np.float64)
    order = np.zeros(V, np.int32)
    tokens = np.zeros(window, np.int32)
    prompt = ids[-window:]
    tokens[: len(prompt)] = prompt
    n_cache, n_feed = 0, len(prompt)
    out = np.zeros(chunk, np.int32)
    no_uniforms = np.zeros(chunk, np.float64)
    no_logits = np.zeros((0, V), np.float32)
    k = 0 if top_k is None else int(min(top_k, V))
    p = 1.0 if top_p is None else float(top_p)
    done = 0
    while done < max_new_tokens:
        n = min(chunk, max_new_tokens - done)
        uniforms = rng.random(n) if temperature > 0 else no_uniforms[:n]  # one draw per token, as sample_token
        rows = no_logits if logits is None else logits[done : done + n]
        n_cache = fn(
            out[:n], tokens, n_cache, n_feed, params.flat, offsets, cfg.n_head, kcache, vcache,
            scratch, work, order, float(temperature), k, p, uniforms, done + n < max_new_tokens, rows,
        )  # fmt: skip
        n_feed = 0
        done += n
        yield out[:n].copy()


def stream(
    model: Model,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ctx: int | None = None,
) -> Iterator[str]:
    """Yield max_new_tokens characters, one at a time as they are made, continuing prompt.

    ctx limits the context window (default and maximum: the model's ctx). With a compiled loop
    (see the module docstring) characters are made DECODE_CHUNK at a time, then yielded one by one.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    check_seed(seed)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise InputError(
            f"the tokenizer has {tokenizer.vocab_size} characters but the model's vocab_size is {model.cfg.vocab_size}"
        )
    ids = [int(i) for i in tokenizer.encode(prompt)] if prompt else []
    if not ids:  # nothing to condition on: start from a newline if the vocabulary has one
        ids = [tokenizer.stoi.get("\n", 0)]
    rng = np.random.default_rng(seed)
    window = check_window(model, ctx)
    chars = tokenizer.chars
    if compiled_loop(model) is not None:
        for block in compiled_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng, window):
            for token in block:
                yield chars[token]
    else:
        for token in python_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, rng, window):
            yield chars[token]


def generate(
    model: Model,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    ctx: int | None = None,
) -> str:
    """The prompt followed by max_new_tokens sampled characters (see `stream` for the options)."""
    new = stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, ctx)
    return prompt + "".join(new)

"""The network, once: ModelConfig -> an ordered list of ops, and every path built from that list.

`forward_ops(cfg)` is the architecture (docs/architecture.md), one op per kernel call: each op names
its kind, the activation slot it writes, the slots it reads, the parameters it uses and its scalars.
What a *kind* is (its kernels, saved buffers, bindings, parameter init, decode lowering, test case,
PyTorch reference) lives in its record in fastchar/ops.py; this module never branches on an op's
kind. From the one op list come
- the parameter table (`param_specs`: each op's weights in first-use order, shapes and init from
  their records) and the activation arena (`act_specs`), with the constant buffers some ops read
  (`fill_constants`);
- the training plans: `training_plan` binds every op to an arena's views, in order for the forward
  and in reverse order for the backward (llm.c's gpt2_backward is gpt2_forward reversed);
  `Plan.describe()` prints what runs and why, `Plan.timed()` wraps its own callables with a timer;
- the one-position decode step of the Python KV cache (fastchar/sampler.py walks the same ops);
- the compiled decode table (`decode_table`): opcodes, scratch offsets and parameter offsets found by
  name, which the compiled generation loops walk (fastchar/backends/numba_decode.py, csrc/_decode.pyx).
A change to the architecture edits `block_ops` / `head_ops`; a new kind of op is a record in
fastchar/ops.py and its kernels. Nothing here computes; it only describes and binds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fastchar.config import ModelConfig
from fastchar.ops import (  # noqa: F401  (the decode table's vocabulary, re-exported for the compiled loops)
    CACHE_LINE,
    IN,
    IN2,
    INIT_STD,
    KEY,
    LAYER,
    NCOL,
    NORM_EPS,
    ONES,
    OP_ATTENTION,
    OP_EMBED,
    OP_GELU,
    OP_LAYERNORM,
    OP_MATMUL,
    OP_MATMUL_T,
    OP_RELU2,
    OP_RESIDUAL,
    OP_RMSNORM,
    OPC,
    OPCODE_NAMES,
    OUT,
    POST,
    POST_GELU,
    POST_NAMES,
    POST_NONE,
    POST_RELU2,
    POST_RESIDUAL,
    POST_ROPE,
    RECORDS,
    ROWS,
    ROWS_ALL,
    ROWS_LAST,
    ROWS_ONE,
    TARGETS,
    TOKENS,
    W2,
    K,
    Lowering,
    N,
    Op,
    W,
    record,
    saved_names,
)

Spec = list[tuple[str, tuple[int, ...]]]

RMSNORM_EPS = NORM_EPS  # the norms' eps (RMSNorm and LayerNorm); compiled paths get it from the ops
DROPOUT_SITES = 3  # dropout sites per block: attention probabilities, the two residual branches
# Dropout masks and keys hash with Chris Wellons' lowbias32 (every backend, fastchar/backends/reference.py)
DROPOUT_GOLDEN = 0x9E3779B9  # spreads consecutive indices over the 32-bit range before hashing
LOWBIAS32_MUL1 = 0x7FEB352D  # the two multipliers of lowbias32
LOWBIAS32_MUL2 = 0x846CA68B
U32 = 0xFFFFFFFF


def lowbias32(x: int) -> int:
    """The lowbias32 integer hash of x mod 2**32 (dropout keys per step and site)."""
    x &= U32
    x ^= x >> 16
    x = (x * LOWBIAS32_MUL1) & U32
    x ^= x >> 15
    x = (x * LOWBIAS32_MUL2) & U32
    return x ^ (x >> 16)


# --------------------------------------------------------------------------------------------
# The architecture


def norm_op(cfg: ModelConfig, out: str, x: str, gain: str) -> Op:
    """A norm of the model's kind (cfg.norm: "rmsnorm" or "layernorm") over x, with gain `gain`."""
    return Op(cfg.norm, out, cfg.d_model, (x,), (gain,), saved_names(cfg.norm, out), (NORM_EPS,))


def embedding_op(cfg: ModelConfig) -> Op:
    """Token plus position embedding; with rotary positions the position table is a constant zero."""
    positions = "wpe" if cfg.position == "learned" else "pos.zero"
    return Op("embedding", "encoded", cfg.d_model, (TOKENS,), ("wte", positions))


def block_ops(cfg: ModelConfig, i: int, x: str, dropout: bool) -> list[Op]:
    """Block i on the residual stream x: x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""
    s, C, H, p = f"blocks.{i}.", cfg.d_model, cfg.mlp_hidden, cfg.dropout
    out_std = INIT_STD / math.sqrt(2 * cfg.n_layer)  # the two output projections of a block
    rope = cfg.position == "rope"
    qkv = s + ("qkv_raw" if rope else "qkv")
    ops = [norm_op(cfg, s + "ln1", x, s + "ln1.weight"), Op("matmul", qkv, 3 * C, (s + "ln1",), (s + "attn.qkv",))]
    if rope:  # q and k of every head turned by their position; v copied
        ops.append(Op("rope", s + "qkv", 3 * C, (qkv,), ("rope.cos", "rope.sin")))
    if dropout:
        ops.append(Op("attention_dropout", s + "atty", C, (s + "qkv",), (), (s + "att",), (KEY, p), 3 * i))
    else:
        ops.append(Op("attention", s + "atty", C, (s + "qkv",), (), (s + "att",)))
    ops.append(Op("matmul", s + "attproj", C, (s + "atty",), (s + "attn.proj",), std=out_std))
    branch = s + "attproj"
    if dropout:
        ops.append(Op("dropout", s + "attproj_drop", C, (branch,), (), (), (KEY, p), 3 * i + 1))
        branch = s + "attproj_drop"
    ops += [
        Op("residual", s + "res1", C, (x, branch)),
        norm_op(cfg, s + "ln2", s + "res1", s + "ln2.weight"),
        Op("matmul", s + "fch", H, (s + "ln2",), (s + "mlp.fc",)),
        Op(cfg.activation, s + "fch_act", H, (s + "fch",)),
        Op("matmul", s + "fcproj", C, (s + "fch_act",), (s + "mlp.proj",), std=out_std),
    ]
    branch = s + "fcproj"
    if dropout:
        ops.append(Op("dropout", s + "fcproj_drop", C, (branch,), (), (), (KEY, p), 3 * i + 2))
        branch = s + "fcproj_drop"
    ops.append(Op("residual", s + "res2", C, (s + "res1", branch)))
    return ops


def head_ops(cfg: ModelConfig, x: str) -> list[Op]:
    """The final norm and the lm_head: its own [C, V] matrix, or (tied) wte read transposed."""
    head = (
        Op("matmul_t", "logits", cfg.vocab_size, ("lnf",), ("wte",))
        if cfg.tie_embeddings
        else Op("matmul", "logits", cfg.vocab_size, ("lnf",), ("lm_head",))
    )
    return [norm_op(cfg, "lnf", x, "ln_f.weight"), head]


def forward_ops(cfg: ModelConfig, dropout: bool = False) -> list[Op]:
    """The whole network, token ids to logits, in execution order (dropout ops only if asked)."""
    dropout = dropout and cfg.dropout > 0
    ops = [embedding_op(cfg)]
    x = "encoded"
    for i in range(cfg.n_layer):
        ops += block_ops(cfg, i, x, dropout)
        x = f"blocks.{i}.res2"
    return ops + head_ops(cfg, x)


def loss_op(cfg: ModelConfig) -> Op:
    """Cross-entropy of the logits against the targets (probs saved for the fused backward)."""
    return Op("crossentropy", "losses", 1, ("logits", TARGETS), (), ("probs",))


def _widths(ops: list[Op]) -> dict[str, int]:
    widths = {op.out: op.width for op in ops}
    widths[TOKENS] = 1
    return widths


def param_inits(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], float | str]]:
    """name -> (shape, init) of every parameter, in buffer order: each op's weights in first-use
    order (a tied lm_head reuses wte), shapes and init ("ones", or the normal's std) from the ops'
    records. Constant slots (graph.constant_specs) are not parameters."""
    ops = forward_ops(cfg)
    widths, constants = _widths(ops), {name for name, _ in constant_specs(cfg, cfg.ctx)}
    table: dict[str, tuple[tuple[int, ...], float | str]] = {}
    for op in ops:
        for name, (shape, init) in zip(op.weights, record(op.kind).weights(op, cfg, widths), strict=True):
            if name in table:
                if table[name][0] != tuple(shape):
                    raise AssertionError(f"{op.kind} reads {name} as {shape}, declared {table[name][0]}")
            elif name not in constants:
                table[name] = (tuple(shape), init)
    return table


def param_specs(cfg: ModelConfig) -> Spec:
    """The parameter table (docs/architecture.md), in buffer order (also the checkpoint layout)."""
    return [(name, shape) for name, (shape, _) in param_inits(cfg).items()]


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """A parameter's init: None for ones (the norm gains), else the normal's std."""
    init = param_inits(cfg)[name][1]
    return None if init == ONES else float(init)


# --------------------------------------------------------------------------------------------
# Arenas


def saved_shape(op: Op, cfg: ModelConfig, B: int, T: int, k: int = 0) -> tuple[int, ...]:
    """Shape of the k-th buffer an op saves for its backward (its record's `saved`)."""
    return tuple(record(op.kind).saved(cfg, B, T)[k])


def constant_specs(cfg: ModelConfig, T: int) -> Spec:
    """Constant buffers ops read like weights: the zero position table and the rotary tables."""
    if cfg.position == "learned":
        return []
    half = cfg.head_size // 2
    return [("pos.zero", (T, cfg.d_model)), ("rope.cos", (T, half)), ("rope.sin", (T, half))]


def act_specs(cfg: ModelConfig, B: int, T: int, dropout: bool | None = None) -> Spec:
    """Every activation of one forward pass over a [B, T] batch (with the loss), saved buffers and
    constants included, in execution order. The gradient arena uses the same table; `datt` doubles
    as attention backward's scratch. dropout defaults to cfg.dropout > 0."""
    dropout = cfg.dropout > 0 if dropout is None else dropout
    specs: Spec = []
    for op in [*forward_ops(cfg, dropout), loss_op(cfg)]:
        specs.append((op.out, (B, T) if op.width == 1 else (B, T, op.width)))
        shapes = record(op.kind).saved(cfg, B, T)
        if len(shapes) != len(op.saved):
            raise AssertionError(f"{op.kind} saves {len(shapes)} buffers, the op names {len(op.saved)}")
        specs += [(name, tuple(shape)) for name, shape in zip(op.saved, shapes, strict=True)]
    return specs + constant_specs(cfg, T)


def saved_slots(cfg: ModelConfig) -> set[str]:
    """Slots the forward saves for the backward (rstd, att, probs). No backward accumulates into
    their gradient slots (attention's backward uses its own as scratch, written before it is read),
    so zeroing the gradient arena skips them: at context 128 they are most of its bytes."""
    return {name for op in [*forward_ops(cfg, True), loss_op(cfg)] for name in op.saved}


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """(HS/2,) float64: pair i of a head turns by p * rope_base**(-2i/HS) at position p."""
    HS = cfg.head_size
    return cfg.rope_base ** (-2.0 * np.arange(HS // 2, dtype=np.float64) / HS)


def rope_tables(cfg: ModelConfig, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n, HS/2) float64 of the angles positions[:, None] * inv_freq (in float64, so
    large absolute positions keep their precision before the tables are rounded to the arena's type)."""
    angles = np.outer(np.asarray(positions, dtype=np.float64), rope_inv_freq(cfg))
    return np.cos(angles), np.sin(angles)


def fill_constants(acts: dict, cfg: ModelConfig, T: int) -> None:
    """Write the constant buffers of `constant_specs` into an arena (positions 0..T-1)."""
    if cfg.position == "rope":
        acts["pos.zero"][...] = 0
        cos, sin = rope_tables(cfg, np.arange(T))
        acts["rope.cos"][...] = cos
        acts["rope.sin"][...] = sin


# --------------------------------------------------------------------------------------------
# Binding ops to kernels: forward arguments in the kernels' order (outputs, saved, inputs,
# weights, scalars), backward arguments as each record binds them (input grads, weight grads,
# dout, saved).


class Views:
    """Where an op's names point: acts / dacts slots, params / grads tensors, int inputs."""

    def __init__(self, params, grads, acts, dacts, ints: dict[str, np.ndarray]) -> None:
        self.params, self.grads, self.acts, self.dacts, self.ints = params, grads, acts, dacts, ints

    def a(self, name: str) -> np.ndarray:
        if name in self.ints:
            return self.ints[name]
        return self.acts[name]

    def d(self, name: str) -> np.ndarray:
        return self.dacts[name]

    def p(self, name: str) -> np.ndarray:
        return self.params[name] if name in self.params else self.acts[name]

    def g(self, name: str) -> np.ndarray:
        return self.grads[name] if name in self.grads else self.dacts[name]


def forward_args(op: Op, v: Views) -> list:
    return record(op.kind).bind_forward(op, v)


def backward_args(op: Op, v: Views) -> list:
    rec = record(op.kind)
    if rec.bind_backward is None:
        raise AssertionError(f"the record of op kind {op.kind!r} binds no backward")
    return rec.bind_backward(op, v)


Call = tuple[Callable, list]
KeySlot = tuple[list, int, int]  # (args, index of the KEY scalar, dropout site)
Choice = Callable | tuple[Callable, str]  # a plan override: the kernel, or (kernel, why it was chosen)
# Suffix of a plan override "<backward kernel>@overwrite": a variant that writes (=) the gradients of
# the op's activation inputs instead of accumulating (+=) into them, bound where the op is the first
# of the backward to write all of them, so that the model need not zero those slots beforehand.
OVERWRITE = "@overwrite"


@dataclass
class Step:
    """What one call of a plan is: its phase, op, kernel name, function and why it was chosen."""

    phase: str  # "forward", "loss" or "backward"
    op: Op
    kernel: str
    fn: Callable
    why: str


@dataclass
class Plan:
    """Kernel calls over fixed views: `forward` (token ids to logits), `loss`, and `backward` (the
    loss's backward, then the forward reversed). `keys` lists the dropout-key slots to patch;
    `steps` says what every call is (forward, loss, then backward order), for describe() and timed()."""

    forward: list[Call]
    loss: list[Call]
    backward: list[Call]
    keys: list[KeySlot]
    steps: list[Step] = field(default_factory=list)
    overwritten: frozenset[str] = frozenset()  # gradient slots an OVERWRITE variant writes first: not zeroed

    def describe(self) -> list[str]:
        """One line per call of a training step: phase, op (kind, output), kernel module.function, why."""
        return [f"{s.phase:<8} {s.op.kind:<17} {s.op.out:<20} {function_name(s.fn):<52} {s.why}" for s in self.steps]

    def timed(self, spent: dict[str, float], key: Callable[[Step], str] | None = None) -> None:
        """Wrap every call of this plan (its own callables, in place) with a timer adding its
        seconds to spent[key(step)] (default: the kernel's name)."""
        key = key or (lambda s: s.kernel)
        calls = [*self.forward, *self.loss, *self.backward]
        wrapped = [(_timer(fn, key(s), spent), args) for (fn, args), s in zip(calls, self.steps, strict=True)]
        nf, nl = len(self.forward), len(self.loss)
        self.forward[:], self.loss[:], self.backward[:] = wrapped[:nf], wrapped[nf : nf + nl], wrapped[nf + nl :]


def _timer(fn: Callable, name: str, spent: dict[str, float]) -> Callable:
    clock = time.perf_counter

    def call(*args):
        t0 = clock()
        fn(*args)
        spent[name] = spent.get(name, 0.0) + clock() - t0

    call.__wrapped__ = fn
    return call


def function_name(fn: Callable) -> str:
    """module.function of a kernel (through functools.partial, with its keywords)."""
    keywords = ""
    while hasattr(fn, "func"):  # functools.partial
        keywords = ", ".join(f"{k}={v!r}" for k, v in fn.keywords.items())
        fn = fn.func
    fn = getattr(fn, "__wrapped__", fn)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"
    return f"{name}({keywords})" if keywords else name


def _bind(fn: Callable, args: list, site: int, keys: list[KeySlot]) -> Call:
    if site >= 0:
        keys.append((args, next(k for k, x in enumerate(args) if x is KEY), site))
    return fn, args


def training_plan(
    cfg: ModelConfig,
    kernels: object,
    views: Views,
    dropout: bool,
    overrides: dict[str, Choice] | None = None,
) -> Plan:
    """The forward and backward of `forward_ops(cfg, dropout)` bound to one backend and one arena.

    overrides: kernel name -> function replacing the backend's, or (function, why it was chosen)
    (the precision's matrix products, see fastchar.backends.plan_kernels); every op of that kind
    calls it. A "<backward kernel>@overwrite" entry (OVERWRITE) is bound instead where the op's
    backward is the first to write the gradients of its activation inputs; `Plan.overwritten` names
    those slots, which the model then does not zero."""
    ops, loss = forward_ops(cfg, dropout), loss_op(cfg)
    overrides = overrides or {}
    fallback = getattr(kernels, "fallback", frozenset())
    backend = getattr(kernels, "name", "?")
    steps: list[Step] = []

    def kernel(phase: str, op: Op, name: str) -> Callable:
        choice = overrides.get(name)
        if isinstance(choice, tuple):
            fn, why = choice
        elif choice is not None:
            fn, why = choice, "plan override"
        else:
            fn = getattr(kernels, name)
            why = f"{backend} declares no {name}: the reference's" if name in fallback else f"{backend}'s own kernel"
        steps.append(Step(phase, op, name, fn, why))
        return fn

    written: set[str] = set()  # activation gradients some backward call before this one writes
    overwritten: set[str] = set()

    def backward_kernel(op: Op) -> Callable:
        """The op's backward kernel, or its OVERWRITE variant where the op writes the gradients of
        its activation inputs first (the backward of an op writes exactly those, see ops.py)."""
        name = record(op.kind).backward
        grads = [s for s in op.inputs if s not in (TOKENS, TARGETS)]
        first = bool(grads) and len(set(grads)) == len(grads) and written.isdisjoint(grads)
        written.update(grads)
        if first and name + OVERWRITE in overrides:
            overwritten.update(grads)
            return kernel("backward", op, name + OVERWRITE)
        return kernel("backward", op, name)

    keys: list[KeySlot] = []
    fwd = [_bind(kernel("forward", op, record(op.kind).forward), forward_args(op, views), op.site, keys) for op in ops]
    lss = [(kernel("loss", loss, record(loss.kind).forward), forward_args(loss, views))]
    bwd = [_bind(backward_kernel(op), backward_args(op, views), op.site, keys) for op in reversed([*ops, loss])]
    return Plan(fwd, lss, bwd, keys, steps, frozenset(overwritten))


# --------------------------------------------------------------------------------------------
# The compiled decode table: the decode step of forward_ops as rows of int64 a native driver walks.
# Each op's record lowers it (fastchar/ops.py): matrix products absorb the op after them where that
# saves a pass (an activation, the residual add), and the qkv product, rope and attention form one
# stage (per head, q, k, v need no other head's columns). Activation slots become rows of one
# float32 scratch (one buffer per slot name, shared by the layers: S rows of the slot's width, each
# padded to a 64-byte line); weights are offsets into the flat parameter buffer, looked up by name.


@dataclass
class DecodeTable:
    """What a compiled generation loop needs besides the weights and the cache.

    table (n, NCOL) int64; eps (n,) float64 (the norms' eps per row); scratch_size floats;
    logits: scratch offset of the (V,) logits; inv_freq (HS/2,) float64 (empty without rope);
    slides: the cache slides one position per token (rope) instead of being refilled (learned).
    """

    table: np.ndarray
    eps: np.ndarray
    scratch_size: int
    logits: int
    inv_freq: np.ndarray
    slides: bool
    slots: dict[str, tuple[int, int]]

    def describe(self) -> list[str]:
        """One line per row of a decode step: opcode (+ fused post-op), weights, K x N."""
        lines = []
        for r in self.table:
            post = POST_NAMES[r[POST]]
            name = OPCODE_NAMES[r[OPC]] + (f" + {post}" if post else "")
            rows = ("all rows", "last row", "one row")[r[ROWS]]
            lines.append(f"decode   {name:<24} K={r[K]:<5} N={r[N]:<5} {rows}")
        return lines


def decode_table(cfg: ModelConfig, offsets: dict[str, tuple[int, int]], window: int) -> DecodeTable:
    """Lower forward_ops(cfg) (no dropout) to the compiled decode table; offsets: the parameter
    arena's (start, stop) by name, so weights are found by name, never by position."""
    ops = forward_ops(cfg, dropout=False)
    low = Lowering(offsets, window, _widths(ops), {op.out for op in head_ops(cfg, "x")})
    j = 0
    while j < len(ops):
        rec = record(ops[j].kind)
        if rec.lower is None:
            raise AssertionError(f"op kind {ops[j].kind!r} has no decode lowering")
        j += rec.lower(ops[j], j, ops, low)
    logits = low.slots[ops[-1].out][0]
    inv_freq = rope_inv_freq(cfg) if cfg.position == "rope" else np.zeros(0)
    return DecodeTable(
        np.array(low.rows, np.int64), np.array(low.eps, np.float64), low.size, logits, inv_freq,
        cfg.position == "rope", low.slots,
    )  # fmt: skip

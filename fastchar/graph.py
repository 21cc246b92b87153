"""The network, once: ModelConfig -> an ordered list of ops, and every path built from that list.

`forward_ops(cfg)` is the architecture (docs/architecture.md), one op per kernel call: each op names its kernel
pair (`<kind>_forward` / `<kind>_backward`), the activation slot it writes, the slots it reads, the
parameters it uses and its scalars. From that one list come
- the parameter table (`param_specs`) and the activation arena (`act_specs`), with the constant
  buffers some ops read (`fill_constants`);
- the training plans: `training_plan` binds every op to an arena's views, in order for the forward
  and in reverse order for the backward (llm.c's gpt2_backward is gpt2_forward reversed);
- the one-position decode step of the Python KV cache (fastchar/sampler.py walks the same ops);
- the compiled decode table (`decode_table`): opcodes, scratch offsets and parameter offsets found by
  name, which the compiled generation loops walk (fastchar/backends/numba_decode.py, csrc/_decode.pyx).
A change to the architecture edits `block_ops` / `head_ops` and, for a new kind of op, adds a kernel
pair (and a decode opcode). Nothing here computes; it only describes and binds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fastchar.config import ModelConfig

Spec = list[tuple[str, tuple[int, ...]]]

RMSNORM_EPS = 1e-5  # every RMSNorm of the model; the only definition, compiled paths get it from here
INIT_STD = 0.02  # the base model's init: normal(0, 0.02), output projections 0.02 / sqrt(2L)
DROPOUT_SITES = 3  # dropout sites per block: attention probabilities, the two residual branches
KEY = "dropout-key"  # placeholder scalar of a dropout op, patched with the step's key before each call
TOKENS, TARGETS = "tokens", "targets"  # the int32 (B, T) inputs
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


@dataclass(frozen=True)
class Op:
    """One kernel call: `kind` names the pair `<kind>_forward` / `<kind>_backward`.

    out: the activation slot written, width its last axis; inputs: slots read (or TOKENS/TARGETS);
    weights: parameter names (or constant slots, see `act_specs`); saved: further slots the forward
    fills for the backward (rstd, att, probs); scalars: trailing arguments (eps, dropout key and p);
    site: the dropout site whose key goes into the KEY scalar (-1: none).
    """

    kind: str
    out: str
    width: int
    inputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    saved: tuple[str, ...] = ()
    scalars: tuple = ()
    site: int = -1


# --------------------------------------------------------------------------------------------
# The architecture


def param_specs(cfg: ModelConfig) -> Spec:
    """The parameter table (docs/architecture.md), in buffer order (also the checkpoint layout)."""
    V, C, T, H = cfg.vocab_size, cfg.d_model, cfg.ctx, cfg.mlp_hidden
    specs: Spec = [("wte", (V, C))]
    if cfg.position == "learned":
        specs.append(("wpe", (T, C)))
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        specs += [
            (p + "ln1.weight", (C,)),
            (p + "attn.qkv", (C, 3 * C)),
            (p + "attn.proj", (C, C)),
            (p + "ln2.weight", (C,)),
            (p + "mlp.fc", (C, H)),
            (p + "mlp.proj", (H, C)),
        ]
    specs += [("ln_f.weight", (C,)), ("lm_head", (C, V))]
    return specs


def embedding_op(cfg: ModelConfig) -> Op:
    """Token plus position embedding; with rotary positions the position table is a constant zero."""
    positions = "wpe" if cfg.position == "learned" else "pos.zero"
    return Op("embedding", "encoded", cfg.d_model, (TOKENS,), ("wte", positions))


def block_ops(cfg: ModelConfig, i: int, x: str, dropout: bool) -> list[Op]:
    """Block i on the residual stream x: x = x + attn(rmsnorm1(x)); x = x + mlp(rmsnorm2(x))."""
    s, C, H, p = f"blocks.{i}.", cfg.d_model, cfg.mlp_hidden, cfg.dropout
    rope = cfg.position == "rope"
    qkv = s + ("qkv_raw" if rope else "qkv")
    ops = [
        Op("rmsnorm", s + "ln1", C, (x,), (s + "ln1.weight",), (s + "ln1_rstd",), (RMSNORM_EPS,)),
        Op("matmul", qkv, 3 * C, (s + "ln1",), (s + "attn.qkv",)),
    ]
    if rope:  # q and k of every head turned by their position; v copied
        ops.append(Op("rope", s + "qkv", 3 * C, (qkv,), ("rope.cos", "rope.sin")))
    if dropout:
        ops.append(Op("attention_dropout", s + "atty", C, (s + "qkv",), (), (s + "att",), (KEY, p), 3 * i))
    else:
        ops.append(Op("attention", s + "atty", C, (s + "qkv",), (), (s + "att",)))
    ops.append(Op("matmul", s + "attproj", C, (s + "atty",), (s + "attn.proj",)))
    branch = s + "attproj"
    if dropout:
        ops.append(Op("dropout", s + "attproj_drop", C, (branch,), (), (), (KEY, p), 3 * i + 1))
        branch = s + "attproj_drop"
    ops += [
        Op("residual", s + "res1", C, (x, branch)),
        Op("rmsnorm", s + "ln2", C, (s + "res1",), (s + "ln2.weight",), (s + "ln2_rstd",), (RMSNORM_EPS,)),
        Op("matmul", s + "fch", H, (s + "ln2",), (s + "mlp.fc",)),
        Op("relu2", s + "fch_act", H, (s + "fch",)),
        Op("matmul", s + "fcproj", C, (s + "fch_act",), (s + "mlp.proj",)),
    ]
    branch = s + "fcproj"
    if dropout:
        ops.append(Op("dropout", s + "fcproj_drop", C, (branch,), (), (), (KEY, p), 3 * i + 2))
        branch = s + "fcproj_drop"
    ops.append(Op("residual", s + "res2", C, (s + "res1", branch)))
    return ops


def head_ops(cfg: ModelConfig, x: str) -> list[Op]:
    """The final RMSNorm and the untied lm_head."""
    return [
        Op("rmsnorm", "lnf", cfg.d_model, (x,), ("ln_f.weight",), ("lnf_rstd",), (RMSNORM_EPS,)),
        Op("matmul", "logits", cfg.vocab_size, ("lnf",), ("lm_head",)),
    ]


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


# --------------------------------------------------------------------------------------------
# Arenas


def saved_shape(op: Op, cfg: ModelConfig, B: int, T: int) -> tuple[int, ...]:
    """Shape of the buffers an op saves for its backward."""
    if op.kind in ("rmsnorm",):
        return (B, T)
    if op.kind in ("attention", "attention_dropout"):
        return (B, cfg.n_head, T, T)
    if op.kind == "crossentropy":
        return (B, T, cfg.vocab_size)
    raise AssertionError(f"op kind {op.kind!r} saves nothing")


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
        specs += [(name, saved_shape(op, cfg, B, T)) for name in op.saved]
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
# weights, scalars), backward arguments per kind (input grads, weight grads, dout, saved).


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


def _rows(a: np.ndarray) -> np.ndarray:
    """(B, T, X) -> (B*T, X) view for the matmul kernels."""
    return a.reshape(-1, a.shape[-1])


def forward_args(op: Op, v: Views) -> list:
    rows = _rows if op.kind == "matmul" else (lambda x: x)
    return [
        rows(v.a(op.out)),
        *[v.a(s) for s in op.saved],
        *[rows(v.a(i)) for i in op.inputs],
        *[v.p(w) for w in op.weights],
        *op.scalars,
    ]


def backward_args(op: Op, v: Views) -> list:
    a, d, p, g, i, w = v.a, v.d, v.p, v.g, op.inputs, op.weights
    if op.kind == "embedding":
        return [g(w[0]), g(w[1]), d(op.out), a(i[0])]
    if op.kind == "rmsnorm":
        return [d(i[0]), g(w[0]), d(op.out), a(i[0]), p(w[0]), a(op.saved[0])]
    if op.kind == "matmul":
        return [_rows(d(i[0])), g(w[0]), _rows(d(op.out)), _rows(a(i[0])), p(w[0])]
    if op.kind == "rope":
        return [d(i[0]), d(op.out), p(w[0]), p(w[1])]
    if op.kind in ("attention", "attention_dropout"):
        return [d(i[0]), d(op.saved[0]), d(op.out), a(i[0]), a(op.saved[0]), *op.scalars]
    if op.kind == "dropout":
        return [d(i[0]), d(op.out), *op.scalars]
    if op.kind == "relu2":
        return [d(i[0]), d(op.out), a(i[0])]
    if op.kind == "residual":
        return [d(i[0]), d(i[1]), d(op.out)]
    if op.kind == "crossentropy":
        return [d(i[0]), d(op.out), a(op.saved[0]), a(i[1])]
    raise AssertionError(f"no backward binding for op kind {op.kind!r}")


Call = tuple[Callable, list]
KeySlot = tuple[list, int, int]  # (args, index of the KEY scalar, dropout site)


@dataclass
class Plan:
    """Kernel calls over fixed views: `forward` (token ids to logits), `loss`, and `backward` (the
    loss's backward, then the forward reversed). `keys` lists the dropout-key slots to patch."""

    forward: list[Call]
    loss: list[Call]
    backward: list[Call]
    keys: list[KeySlot]


def _bind(fn: Callable, args: list, site: int, keys: list[KeySlot]) -> Call:
    if site >= 0:
        keys.append((args, next(k for k, x in enumerate(args) if x is KEY), site))
    return fn, args


def training_plan(
    cfg: ModelConfig, kernels: object, views: Views, dropout: bool, overrides: dict[str, Callable] | None = None
) -> Plan:
    """The forward and backward of `forward_ops(cfg, dropout)` bound to one backend and one arena.

    overrides: kernel name -> function replacing the backend's (the precision's matrix products,
    see fastchar.backends.plan_kernels); every op of that kind calls it."""
    ops, loss = forward_ops(cfg, dropout), loss_op(cfg)
    overrides = overrides or {}

    def kernel(name: str) -> Callable:
        return overrides.get(name) or getattr(kernels, name)

    keys: list[KeySlot] = []
    fwd = [_bind(kernel(op.kind + "_forward"), forward_args(op, views), op.site, keys) for op in ops]
    bwd = [
        _bind(kernel(op.kind + "_backward"), backward_args(op, views), op.site, keys) for op in reversed([*ops, loss])
    ]
    return Plan(fwd, [(kernel("crossentropy_forward"), forward_args(loss, views))], bwd, keys)


# --------------------------------------------------------------------------------------------
# The compiled decode table: the decode step of forward_ops as rows of int64 a native driver walks.
# Matrix products absorb the op after them where that saves a pass (relu2, the residual add), and
# the qkv product, rope and attention form one stage (per head, q, k, v need no other head's
# columns). Activation slots become rows of one float32 scratch (one buffer per slot name, shared by
# the layers: S rows of the slot's width, each padded to a 64-byte line); weights are offsets into
# the flat parameter buffer, looked up by name in the arena.

OP_EMBED, OP_RMSNORM, OP_MATMUL, OP_ATTENTION, OP_RESIDUAL, OP_RELU2 = range(6)
POST_NONE, POST_RELU2, POST_RESIDUAL, POST_ROPE = range(4)
ROWS_ALL, ROWS_LAST, ROWS_ONE = range(3)  # every new row; only the last (read row M-1); one row (row 0)
# columns of a table row
OPC, OUT, IN, IN2, W, W2, K, N, POST, LAYER, ROWS = range(11)
NCOL = 11
CACHE_LINE = 16  # floats


@dataclass
class DecodeTable:
    """What a compiled generation loop needs besides the weights and the cache.

    table (n, NCOL) int64; eps (n,) float64 (RMSNorm's eps per row); scratch_size floats;
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


def _base(name: str) -> str:
    """blocks.3.ln1 -> ln1: the layers share one decode buffer per slot name."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def decode_table(cfg: ModelConfig, offsets: dict[str, tuple[int, int]], window: int) -> DecodeTable:
    """Lower forward_ops(cfg) (no dropout) to the compiled decode table; offsets: the parameter
    arena's (start, stop) by name, so weights are found by name, never by position."""
    ops = forward_ops(cfg, dropout=False)
    slots: dict[str, tuple[int, int]] = {}  # base name -> (scratch offset, width)
    size = 0

    def slot(name: str, width: int) -> int:
        nonlocal size
        base = _base(name)
        if base not in slots:
            slots[base] = (size, width)
            size += -(-window * width // CACHE_LINE) * CACHE_LINE
        return slots[base][0]

    def weight(name: str) -> int:
        return int(offsets[name][0]) if name in offsets else -1

    rows: list[list[int]] = []
    eps: list[float] = []
    head = {op.out for op in head_ops(cfg, "x")}
    last_rows: set[str] = set()  # slots that hold one row (the head's)
    widths = {op.out: op.width for op in ops}
    widths[TOKENS] = 1
    consumed: set[int] = set()
    layer = -1
    for j, op in enumerate(ops):
        if j in consumed:
            continue
        row = [0] * NCOL
        row[OUT] = slot(op.out, op.width)
        row[N] = op.width
        row[W] = row[W2] = row[IN2] = -1
        if op.inputs[0] != TOKENS:
            row[IN] = slot(op.inputs[0], widths[op.inputs[0]])
            row[K] = widths[op.inputs[0]]
        if op.out in head:
            row[ROWS] = ROWS_ONE if op.inputs[0] in last_rows else ROWS_LAST
            last_rows.add(op.out)
        nxt = ops[j + 1] if j + 1 < len(ops) else None
        value = 0.0
        if op.kind == "embedding":
            row[OPC], row[W], row[W2] = OP_EMBED, weight(op.weights[0]), weight(op.weights[1])
        elif op.kind == "rmsnorm":
            row[OPC], row[W], value = OP_RMSNORM, weight(op.weights[0]), float(op.scalars[0])
        elif op.kind == "matmul" and nxt is not None and nxt.inputs == (op.out,) and nxt.kind in ("rope", "attention"):
            # qkv product [+ rope] + cache append + attention: one stage, split by heads
            att = ops[j + 2] if nxt.kind == "rope" else nxt
            consumed.update({j + 1, j + 2} if nxt.kind == "rope" else {j + 1})
            layer += 1
            row[OPC], row[W], row[LAYER] = OP_ATTENTION, weight(op.weights[0]), layer
            row[IN2] = slot(att.inputs[0], 3 * cfg.d_model)  # the (rotated) q, k, v rows
            row[OUT], row[N] = slot(att.out, att.width), att.width
            row[POST] = POST_ROPE if nxt.kind == "rope" else POST_NONE
        elif op.kind == "matmul":
            row[OPC], row[W] = OP_MATMUL, weight(op.weights[0])
            if nxt is not None and nxt.kind == "relu2" and nxt.inputs == (op.out,):
                row[POST], row[OUT] = POST_RELU2, slot(nxt.out, nxt.width)
                consumed.add(j + 1)
            elif nxt is not None and nxt.kind == "residual" and nxt.inputs[1] == op.out:
                row[POST], row[OUT] = POST_RESIDUAL, slot(nxt.out, nxt.width)
                row[IN2] = slot(nxt.inputs[0], nxt.width)
                consumed.add(j + 1)
        elif op.kind == "residual":
            row[OPC], row[IN2], row[K] = OP_RESIDUAL, slot(op.inputs[1], op.width), op.width
        elif op.kind == "relu2":
            row[OPC] = OP_RELU2
        else:
            raise AssertionError(f"op kind {op.kind!r} has no decode opcode")
        rows.append(row)
        eps.append(value)
    logits = slots[_base(ops[-1].out)][0]
    inv_freq = rope_inv_freq(cfg) if cfg.position == "rope" else np.zeros(0)
    return DecodeTable(
        np.array(rows, np.int64), np.array(eps, np.float64), size, logits, inv_freq, cfg.position == "rope", slots
    )


def init_std(name: str, cfg: ModelConfig) -> float | None:
    """The base model's init of a parameter: None for the norm gains (ones), else the normal's std."""
    if name.endswith(".weight"):
        return None
    return INIT_STD / math.sqrt(2 * cfg.n_layer) if name.endswith(("attn.proj", "mlp.proj")) else INIT_STD

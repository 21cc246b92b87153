"""One record per op kind: everything about a kind of kernel call, in one place.

fastchar/graph.py describes the network as a list of `Op`s (kind, output slot, inputs, weights,
scalars); this module says what each *kind* is. A record (`OpKind`) holds
- its kernels: the names it adds to `fastchar.backends.KERNELS` (`<kind>_forward`, `<kind>_backward`,
  extras such as `attention_decode`), found by name in every backend module; a backend that lacks
  one lists it in its `FALLBACK` set and gets the reference's;
- what its forward saves for the backward (`saved`: a shape per saved slot) and how its forward and
  backward are bound to an arena's views (`bind_forward`, `bind_backward`);
- its parameters' shapes and initialisation (`weights`: a (shape, init) per weight, init "ones" or
  the normal's std);
- its decode lowering (`lower`: rows of the compiled decode table, with its opcode; `post`: the
  post-op code when a matrix product absorbs it) and its step in the Python KV cache (`decode_step`);
- its kernel test case (`case`: arguments for tests/test_kernels.py and benchmarks/bench_kernels.py);
- its float64 / PyTorch reference (`torch`: the op in PyTorch, for fastchar.torch_model).
`KERNELS`, graph.py's bindings and lowering, the kernel test cases and the PyTorch model are all
derived from `RECORDS`; nothing outside this module branches on an op's kind. Adding an op kind is
one record here plus its kernels (reference, numba, Cython) and their tests.

Kernel conventions (every backend): forward arguments are outputs, then the buffers saved for the
backward, then inputs, then weights, scalars last; backward arguments are input grads, weight
grads, dout, then saved tensors, scalars last. Backward kernels accumulate (+=) into every gradient
they write. Shapes use B, T, C, NH, HS, V, H (MLP width), N = B*T rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

NORM_EPS = 1e-5  # eps of every RMSNorm and LayerNorm of the model; the only definition
INIT_STD = 0.02  # normal(0, 0.02); output projections 0.02 / sqrt(2L) (their Op's `std`)
KEY = "dropout-key"  # placeholder scalar of a dropout op, patched with the step's key before each call
TOKENS, TARGETS = "tokens", "targets"  # the int32 (B, T) inputs
ONES = "ones"  # a weight initialised to ones (norm gains)


@dataclass(frozen=True)
class Op:
    """One kernel call: `kind` names its record in RECORDS (and the pair `<kind>_forward` / `_backward`).

    out: the activation slot written, width its last axis; inputs: slots read (or TOKENS/TARGETS);
    weights: parameter names (or constant slots, see graph.constant_specs); saved: further slots the
    forward fills for the backward (rstd, att, probs); scalars: trailing arguments (eps, dropout key
    and p); site: the dropout site whose key goes into the KEY scalar (-1: none); std: the init std
    of the op's matrices (products only).
    """

    kind: str
    out: str
    width: int
    inputs: tuple[str, ...]
    weights: tuple[str, ...] = ()
    saved: tuple[str, ...] = ()
    scalars: tuple = ()
    site: int = -1
    std: float = INIT_STD


# --------------------------------------------------------------------------------------------
# The compiled decode table's vocabulary (read by csrc/_decode.pyx and fastchar/backends/numba_decode.py)

OP_EMBED, OP_RMSNORM, OP_MATMUL, OP_ATTENTION, OP_RESIDUAL, OP_RELU2, OP_LAYERNORM, OP_GELU, OP_MATMUL_T = range(9)
OPCODE_NAMES = ("embed", "rmsnorm", "matmul", "attention", "residual", "relu2", "layernorm", "gelu", "matmul_t")
POST_NONE, POST_RELU2, POST_RESIDUAL, POST_ROPE, POST_GELU = range(5)
POST_NAMES = ("", "relu2", "residual", "rope", "gelu")
ROWS_ALL, ROWS_LAST, ROWS_ONE = range(3)  # every new row; only the last (read row M-1); one row (row 0)
# columns of a table row
OPC, OUT, IN, IN2, W, W2, K, N, POST, LAYER, ROWS = range(11)
NCOL = 11
CACHE_LINE = 16  # floats


class Lowering:
    """decode_table's state while it walks the ops: scratch slots (one buffer per slot name, shared
    by the layers: `window` rows of the slot's width, each slot padded to a cache line), weight
    offsets by name, and the rows emitted so far."""

    def __init__(self, offsets: dict[str, tuple[int, int]], window: int, widths: dict[str, int], head: set[str]):
        self.offsets, self.window, self.widths, self.head = offsets, window, widths, head
        self.slots: dict[str, tuple[int, int]] = {}
        self.size = 0
        self.rows: list[list[int]] = []
        self.eps: list[float] = []
        self.layer = -1
        self.last_rows: set[str] = set()  # slots that hold one row (the head's)

    def slot(self, name: str, width: int) -> int:
        base = name.split(".", 2)[2] if name.startswith("blocks.") else name  # blocks.3.ln1 -> ln1
        if base not in self.slots:
            self.slots[base] = (self.size, width)
            self.size += -(-self.window * width // CACHE_LINE) * CACHE_LINE
        return self.slots[base][0]

    def weight(self, name: str) -> int:
        return int(self.offsets[name][0]) if name in self.offsets else -1

    def row(self, opc: int, op: Op) -> list[int]:
        """A row for op: its output slot and width, its first input (slot and width), the head's
        one-row rule; weights and IN2 unset (-1)."""
        row = [0] * NCOL
        row[OPC], row[OUT], row[N] = opc, self.slot(op.out, op.width), op.width
        row[W] = row[W2] = row[IN2] = -1
        if op.inputs[0] != TOKENS:
            row[IN] = self.slot(op.inputs[0], self.widths[op.inputs[0]])
            row[K] = self.widths[op.inputs[0]]
        if op.out in self.head:
            row[ROWS] = ROWS_ONE if op.inputs[0] in self.last_rows else ROWS_LAST
            self.last_rows.add(op.out)
        return row

    def emit(self, row: list[int], eps: float = 0.0) -> None:
        self.rows.append(row)
        self.eps.append(eps)


@dataclass(frozen=True)
class OpKind:
    """Everything about one kind of op (see the module docstring)."""

    name: str
    math: str  # one line of math, for Plan.describe and the docs
    kernels: tuple[str, ...] = ()  # names in KERNELS; default (name_forward, name_backward)
    in_graph: bool = True  # False: kernels called outside the network's ops (the optimizer's)
    saved: Callable[[object, int, int], tuple[tuple[int, ...], ...]] = lambda cfg, B, T: ()
    rows: bool = False  # the kernels take (B*T, X) views instead of (B, T, X)
    bind_backward: Callable | None = None  # (op, views) -> backward arguments
    weights: Callable = lambda op, cfg, widths: []  # (op, cfg, widths) -> [(shape, init)] per weight
    lower: Callable | None = None  # (op, j, ops, lowering) -> ops consumed (>= 1)
    post: int | None = None  # POST_* code when a preceding product absorbs this op in decoding
    absorbs_product: bool = False  # decoding: the product before it (qkv), [rope] and it form one stage
    decode_step: Callable | None = None  # (kernels, op, args, cache, step) for the Python KV cache
    case: Callable | None = None  # (kernel, shape, r) -> test arguments in signature order
    torch: Callable | None = None  # (torch model, op, args, T, pos0, drop, cache) -> tensor
    decode_functions: tuple[str, ...] = ()  # the compiled decode loops' functions for its rows
    extra: dict = field(default_factory=dict)

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return self.kernels or (self.name + "_forward", self.name + "_backward")

    @property
    def forward(self) -> str:
        return self.kernel_names[0]

    @property
    def backward(self) -> str:
        return self.kernel_names[1]

    def bind_forward(self, op: Op, v) -> list:
        """Forward arguments: outputs, saved, inputs, weights, scalars."""
        rows = _rows if self.rows else (lambda x: x)
        return [
            rows(v.a(op.out)),
            *[v.a(s) for s in op.saved],
            *[rows(v.a(i)) for i in op.inputs],
            *[v.p(w) for w in op.weights],
            *op.scalars,
        ]


def _rows(a: np.ndarray) -> np.ndarray:
    """(B, T, X) -> (B*T, X) view for the matmul kernels."""
    return a.reshape(-1, a.shape[-1])


def _f32(r: np.random.Generator, *shape: int) -> np.ndarray:
    return r.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# embedding


def _embedding_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    if kernel == "embedding_forward":
        return {"out": _f32(r, B, T, C), "idx": idx, "wte": _f32(r, V, C), "wpe": _f32(r, T + 3, C)}
    idx[0, : min(T, 3)] = 1  # repeated tokens accumulate into one row
    return {"dwte": _f32(r, V, C), "dwpe": _f32(r, T + 3, C), "dout": _f32(r, B, T, C), "idx": idx}


def _embedding_lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
    row = low.row(OP_EMBED, op)
    row[W], row[W2] = low.weight(op.weights[0]), low.weight(op.weights[1])
    low.emit(row)
    return 1


def _embedding_step(k, op: Op, args: list, cache, step) -> None:
    if op.weights[1] == "wpe":  # learned positions: the row of the token's position
        k.embedding_forward(args[0], args[1], args[2], cache.model.params["wpe"][step.pos : step.pos + 1])
    else:
        k.embedding_forward(*args)


def _embedding_torch(m, op, args, T, pos0, drop, cache):
    x = m.p(op.weights[0])[args[0]]
    return x + m.p("wpe")[pos0 : pos0 + T] if op.weights[1] == "wpe" else x


EMBEDDING = OpKind(
    "embedding",
    "out[b, t] = wte[idx[b, t]] + wpe[t]",
    bind_backward=lambda op, v: [v.g(op.weights[0]), v.g(op.weights[1]), v.d(op.out), v.a(op.inputs[0])],
    weights=lambda op, cfg, widths: [((cfg.vocab_size, cfg.d_model), INIT_STD), ((cfg.ctx, cfg.d_model), INIT_STD)],
    lower=_embedding_lower,
    decode_step=_embedding_step,
    case=_embedding_case,
    decode_functions=("_forward_rows (inline)", "numba_decode._forward_rows (inline)"),
    torch=_embedding_torch,
)


# --------------------------------------------------------------------------------------------
# norms: RMSNorm and LayerNorm (a gain, no bias)


def _norm_weights(op: Op, cfg, widths) -> list:
    return [((op.width,), ONES)]


def _norm_lower(opcode: int) -> Callable:
    def lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
        row = low.row(opcode, op)
        row[W] = low.weight(op.weights[0])
        low.emit(row, float(op.scalars[0]))
        return 1

    return lower


def _rmsnorm_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    if kernel == "rmsnorm_forward":
        return {"out": _f32(r, B, T, C), "rstd": _f32(r, B, T), "inp": _f32(r, B, T, C), "weight": _f32(r, C),
                "eps": NORM_EPS}  # fmt: skip
    inp, weight = _f32(r, B, T, C), _f32(r, C)
    rstd = (1 / np.sqrt(np.mean(inp * inp, -1) + NORM_EPS)).astype(np.float32)
    return {"dinp": _f32(r, B, T, C), "dweight": _f32(r, C), "dout": _f32(r, B, T, C), "inp": inp, "weight": weight,
            "rstd": rstd}  # fmt: skip


def _rmsnorm_torch(m, op, args, *_):
    import torch

    x = args[0]
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + op.scalars[0]) * m.p(op.weights[0])


RMSNORM = OpKind(
    "rmsnorm",
    "out = x / sqrt(mean(x**2) + eps) * g",
    saved=lambda cfg, B, T: ((B, T),),
    bind_backward=lambda op, v: [
        v.d(op.inputs[0]),
        v.g(op.weights[0]),
        v.d(op.out),
        v.a(op.inputs[0]),
        v.p(op.weights[0]),
        v.a(op.saved[0]),
    ],  # fmt: skip
    weights=_norm_weights,
    lower=_norm_lower(OP_RMSNORM),
    case=_rmsnorm_case,
    torch=_rmsnorm_torch,
    decode_functions=("fc_rmsnorm", "numba_decode._rmsnorm"),
    extra={"saved_names": ("_rstd",)},
)


def _layernorm_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    if kernel == "layernorm_forward":
        return {"out": _f32(r, B, T, C), "mean": _f32(r, B, T), "rstd": _f32(r, B, T), "inp": _f32(r, B, T, C) + 0.5,
                "weight": _f32(r, C), "eps": NORM_EPS}  # fmt: skip
    inp, weight = _f32(r, B, T, C) + 0.5, _f32(r, C)
    mean = np.mean(inp, -1).astype(np.float32)
    rstd = (1 / np.sqrt(np.var(inp, -1) + NORM_EPS)).astype(np.float32)
    return {"dinp": _f32(r, B, T, C), "dweight": _f32(r, C), "dout": _f32(r, B, T, C), "inp": inp, "weight": weight,
            "mean": mean, "rstd": rstd}  # fmt: skip


def _layernorm_torch(m, op, args, *_):
    import torch

    x = args[0]
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), m.p(op.weights[0]), None, op.scalars[0])


LAYERNORM = OpKind(
    "layernorm",
    "out = (x - mean(x)) / sqrt(var(x) + eps) * g  (biased variance, no bias)",
    saved=lambda cfg, B, T: ((B, T), (B, T)),
    bind_backward=lambda op, v: [
        v.d(op.inputs[0]),
        v.g(op.weights[0]),
        v.d(op.out),
        v.a(op.inputs[0]),
        v.p(op.weights[0]),
        v.a(op.saved[0]),
        v.a(op.saved[1]),
    ],  # fmt: skip
    weights=_norm_weights,
    lower=_norm_lower(OP_LAYERNORM),
    case=_layernorm_case,
    torch=_layernorm_torch,
    decode_functions=("fc_layernorm", "numba_decode._layernorm"),
    extra={"saved_names": ("_mean", "_rstd")},
)


# --------------------------------------------------------------------------------------------
# matrix products: x @ W (W stored [in, out]) and x @ W.T (W stored [out, in]: a tied lm_head)


def _matmul_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    H, Nr = 4 * C, B * T
    if kernel == "matmul_forward":
        return {"out": _f32(r, Nr, H), "inp": _f32(r, Nr, C), "weight": _f32(r, C, H)}
    return {"dinp": _f32(r, Nr, C), "dweight": _f32(r, C, H), "dout": _f32(r, Nr, H), "inp": _f32(r, Nr, C),
            "weight": _f32(r, C, H)}  # fmt: skip


def _matmul_lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
    """A product; it absorbs the op after it where that saves a pass: an elementwise activation or
    the residual add (a POST code), or, for the qkv product, [rope and] attention: one stage, split
    by heads (q, k, v of a head need no other head's columns)."""
    nxt = ops[j + 1] if j + 1 < len(ops) else None
    nrec = RECORDS[nxt.kind] if nxt is not None else None
    after = ops[j + 2] if j + 2 < len(ops) else None
    row = low.row(OP_MATMUL, op)
    row[W] = low.weight(op.weights[0])
    if nxt is not None and nxt.inputs == (op.out,):
        rope = nrec.post == POST_ROPE and after is not None and RECORDS[after.kind].absorbs_product
        if nrec.absorbs_product or rope:
            att = after if rope else nxt
            low.layer += 1
            row[OPC], row[LAYER], row[POST] = OP_ATTENTION, low.layer, POST_ROPE if rope else POST_NONE
            row[IN2] = low.slot(att.inputs[0], nxt.width)  # the (rotated) q, k, v rows
            row[OUT], row[N] = low.slot(att.out, att.width), att.width
            low.emit(row)
            return 3 if rope else 2
        if nrec.post is not None and nrec.post not in (POST_ROPE, POST_RESIDUAL):
            row[POST], row[OUT] = nrec.post, low.slot(nxt.out, nxt.width)
            low.emit(row)
            return 2
    if nxt is not None and nrec.post == POST_RESIDUAL and nxt.inputs[1] == op.out:
        row[POST], row[OUT] = POST_RESIDUAL, low.slot(nxt.out, nxt.width)
        row[IN2] = low.slot(nxt.inputs[0], nxt.width)
        low.emit(row)
        return 2
    low.emit(row)
    return 1


MATMUL = OpKind(
    "matmul",
    "out = x @ W  (W stored [in, out])",
    rows=True,
    bind_backward=lambda op, v: [
        _rows(v.d(op.inputs[0])),
        v.g(op.weights[0]),
        _rows(v.d(op.out)),
        _rows(v.a(op.inputs[0])),
        v.p(op.weights[0]),
    ],  # fmt: skip
    weights=lambda op, cfg, widths: [((widths[op.inputs[0]], op.width), op.std)],
    lower=_matmul_lower,
    case=_matmul_case,
    torch=lambda m, op, args, *_: args[0] @ m.p(op.weights[0]),
    decode_functions=("fc_matmul", "numba_decode._matmul"),
)


def _matmul_t_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    Nr = B * T
    if kernel == "matmul_t_forward":
        return {"out": _f32(r, Nr, V), "inp": _f32(r, Nr, C), "weight": _f32(r, V, C)}
    return {"dinp": _f32(r, Nr, C), "dweight": _f32(r, V, C), "dout": _f32(r, Nr, V), "inp": _f32(r, Nr, C),
            "weight": _f32(r, V, C)}  # fmt: skip


def _matmul_t_lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
    row = low.row(OP_MATMUL_T, op)
    row[W] = low.weight(op.weights[0])
    low.emit(row)
    return 1


MATMUL_T = OpKind(
    "matmul_t",
    "out = x @ W.T  (W stored [out, in]: the tied lm_head reads wte)",
    rows=True,
    bind_backward=lambda op, v: [
        _rows(v.d(op.inputs[0])),
        v.g(op.weights[0]),
        _rows(v.d(op.out)),
        _rows(v.a(op.inputs[0])),
        v.p(op.weights[0]),
    ],  # fmt: skip
    weights=lambda op, cfg, widths: [((op.width, widths[op.inputs[0]]), op.std)],
    lower=_matmul_t_lower,
    case=_matmul_t_case,
    torch=lambda m, op, args, *_: args[0] @ m.p(op.weights[0]).T,
    decode_functions=("fc_matmul_t", "numba_decode._matmul_t"),
)


# --------------------------------------------------------------------------------------------
# rotary positions


def _rope_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    HS = C // NH
    if HS % 2:  # rotary pairs need an even head size: use half as many, twice as wide heads
        HS = 2 * HS if C % (2 * HS) == 0 else C
    angles = np.arange(T + 2)[:, None] * 10000.0 ** (-2.0 * np.arange(HS // 2) / HS)
    tables = {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}
    if kernel == "rope_forward":
        return {"out": _f32(r, B, T, 3 * C), "inp": _f32(r, B, T, 3 * C), **tables}
    return {"dinp": _f32(r, B, T, 3 * C), "dout": _f32(r, B, T, 3 * C), **tables}


def _rope_torch(m, op, args, T, pos0, drop, cache):
    import torch

    if pos0 + T > m.rope_cos.shape[0]:
        cos, sin = (torch.from_numpy(t).to(m.rope_cos.dtype) for t in m.rope_tables(np.arange(pos0, pos0 + T)))
    else:
        cos, sin = m.rope_cos[pos0 : pos0 + T], m.rope_sin[pos0 : pos0 + T]
    qkv = args[0]
    B, T, C3 = qkv.shape
    half = cos.shape[-1]
    qk, v = qkv[..., : 2 * C3 // 3], qkv[..., 2 * C3 // 3 :]
    heads = qk.reshape(B, T, -1, 2, half)
    a, b = heads[..., 0, :], heads[..., 1, :]
    c, s = cos[:, None, :], sin[:, None, :]
    turned = torch.stack([a * c - b * s, a * s + b * c], dim=-2).reshape(B, T, -1)
    return torch.cat([turned, v], dim=-1)


ROPE = OpKind(
    "rope",
    "q, k of every head: [a cos - b sin, a sin + b cos] (rotate-half), v copied",
    bind_backward=lambda op, v: [v.d(op.inputs[0]), v.d(op.out), v.p(op.weights[0]), v.p(op.weights[1])],
    weights=lambda op, cfg, widths: [((cfg.ctx, cfg.head_size // 2), None)] * 2,  # constant tables, not parameters
    post=POST_ROPE,
    case=_rope_case,
    torch=_rope_torch,
    decode_functions=("fc_rope_heads", "numba_decode._rope"),
)


# --------------------------------------------------------------------------------------------
# causal attention (and with dropout on its probabilities)


def _attention_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    from fastchar.backends import reference as ref

    B, T, C, NH, V = shape
    drop = {"key": DROPOUT_KEY, "p": DROPOUT_P} if "dropout" in kernel else {}
    if kernel == "attention_decode":
        S = T + 2
        return {"out": _f32(r, B, C), "q": _f32(r, B, C), "kcache": _f32(r, B, S, C), "vcache": _f32(r, B, S, C),
                "n_ctx": T, "n_head": NH}  # fmt: skip
    if kernel.endswith("_forward"):
        return {"out": _f32(r, B, T, C), "att": _f32(r, B, NH, T, T), "qkv": _f32(r, B, T, 3 * C), **drop}
    qkv = _f32(r, B, T, 3 * C)
    att = np.zeros((B, NH, T, T), np.float32)
    getattr(ref, kernel.replace("_backward", "_forward"))(np.zeros((B, T, C), np.float32), att, qkv, *drop.values())
    return {"dqkv": _f32(r, B, T, 3 * C), "datt": _f32(r, B, NH, T, T), "dout": _f32(r, B, T, C), "qkv": qkv,
            "att": att, **drop}  # fmt: skip


def _attention_step(k, op: Op, args: list, cache, step) -> None:
    """Append the new position's k, v to the cache, then attend to all of it (attention_decode)."""
    a, C = cache.arena, cache.model.cfg.d_model
    qkv = a[op.inputs[0]][0]  # (1, 3C): q | k | v of the new position
    a["k"][step.layer, 0, step.slot] = qkv[0, C : 2 * C]
    a["v"][step.layer, 0, step.slot] = qkv[0, 2 * C :]
    k.attention_decode(a[op.out][0], qkv[:, :C], a["k"][step.layer], a["v"][step.layer], step.n_ctx,
                       cache.model.cfg.n_head)  # fmt: skip
    step.layer += 1


def _attention_torch(m, op, args, T, pos0, drop, cache, dropout: bool = False):
    """Causal attention over (B, T, 3C) (with dropout p = drop on the probabilities if `dropout`);
    with a cache {"k", "v", "length", "layer"}, the new rows are appended to it and attend to
    everything cached."""
    import torch

    qkv = args[0]
    n_head = m.cfg.n_head
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if cache is None:
        p = drop if dropout else 0.0
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
    else:
        n = cache["length"]
        cache["k"][cache["layer"], :, :, n : n + T] = k
        cache["v"][cache["layer"], :, :, n : n + T] = v
        keys, values = cache["k"][cache["layer"], :, :, : n + T], cache["v"][cache["layer"], :, :, : n + T]
        scores = q @ keys.transpose(-1, -2) / math.sqrt(C // n_head)
        scores = scores.masked_fill(torch.ones(T, n + T, dtype=torch.bool).triu(n + 1), float("-inf"))
        y = torch.softmax(scores, -1) @ values
        cache["layer"] += 1
    return y.transpose(1, 2).reshape(B, T, C)


def _attention_saved(cfg, B: int, T: int) -> tuple:
    return ((B, cfg.n_head, T, T),)


def _attention_backward(op: Op, v) -> list:
    return [v.d(op.inputs[0]), v.d(op.saved[0]), v.d(op.out), v.a(op.inputs[0]), v.a(op.saved[0]), *op.scalars]


ATTENTION = OpKind(
    "attention",
    "softmax(q k^T / sqrt(HS) + causal mask) v, per head",
    kernels=("attention_forward", "attention_backward", "attention_decode"),
    saved=_attention_saved,
    bind_backward=_attention_backward,
    absorbs_product=True,
    decode_step=_attention_step,
    case=_attention_case,
    torch=_attention_torch,
    decode_functions=("fc_attention", "numba_decode._attention"),
)
ATTENTION_DROPOUT = OpKind(
    "attention_dropout",
    "attention with dropout on the probabilities (hash mask of key, p)",
    saved=_attention_saved,
    bind_backward=_attention_backward,
    case=_attention_case,
    torch=lambda *a: _attention_torch(*a, dropout=True),
)


# --------------------------------------------------------------------------------------------
# dropout, activations, the residual add

DROPOUT_KEY = 12345  # the dropout kernels' test (key, p): any fixed pair makes them deterministic
DROPOUT_P = 0.3


def _dropout_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    if kernel == "dropout_forward":
        return {"out": _f32(r, B, T, C), "inp": _f32(r, B, T, C), "key": DROPOUT_KEY, "p": DROPOUT_P}
    return {"dinp": _f32(r, B, T, C), "dout": _f32(r, B, T, C), "key": DROPOUT_KEY, "p": DROPOUT_P}


def _dropout_torch(m, op, args, T, pos0, drop, cache):
    import torch

    return torch.nn.functional.dropout(args[0], drop, m.training)


DROPOUT = OpKind(
    "dropout",
    "out = x * keep(i) / (1 - p), keep from the hash of (i, key)",
    bind_backward=lambda op, v: [v.d(op.inputs[0]), v.d(op.out), *op.scalars],
    case=_dropout_case,
    torch=_dropout_torch,
)


def _elementwise_case(name: str) -> Callable:
    def case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
        B, T, C, NH, V = shape
        H = 4 * C
        if kernel == name + "_forward":
            return {"out": _f32(r, B, T, H), "inp": _f32(r, B, T, H)}
        return {"dinp": _f32(r, B, T, H), "dout": _f32(r, B, T, H), "inp": _f32(r, B, T, H)}

    return case


def _elementwise_lower(opcode: int) -> Callable:
    def lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
        low.emit(low.row(opcode, op))
        return 1

    return lower


def _activation_backward(op: Op, v) -> list:
    return [v.d(op.inputs[0]), v.d(op.out), v.a(op.inputs[0])]


def _relu2_torch(m, op, args, *_):
    import torch

    return torch.relu(args[0]).square()


RELU2 = OpKind(
    "relu2",
    "out = relu(x) ** 2",
    bind_backward=_activation_backward,
    lower=_elementwise_lower(OP_RELU2),
    post=POST_RELU2,
    case=_elementwise_case("relu2"),
    torch=_relu2_torch,
    decode_functions=("inline", "inline"),
)


def _gelu_torch(m, op, args, *_):
    import torch

    return torch.nn.functional.gelu(args[0])


GELU = OpKind(
    "gelu",
    "out = 0.5 x (1 + erf(x / sqrt(2)))  (exact GELU, PyTorch's nn.GELU())",
    bind_backward=_activation_backward,
    lower=_elementwise_lower(OP_GELU),
    post=POST_GELU,
    case=_elementwise_case("gelu"),
    torch=_gelu_torch,
    decode_functions=("erff (libm)", "math.erf"),
)


def _residual_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    if kernel == "residual_forward":
        return {"out": _f32(r, B, T, C), "inp1": _f32(r, B, T, C), "inp2": _f32(r, B, T, C)}
    return {"dinp1": _f32(r, B, T, C), "dinp2": _f32(r, B, T, C), "dout": _f32(r, B, T, C)}


def _residual_lower(op: Op, j: int, ops: list[Op], low: Lowering) -> int:
    row = low.row(OP_RESIDUAL, op)
    row[IN2], row[K] = low.slot(op.inputs[1], op.width), op.width
    low.emit(row)
    return 1


RESIDUAL = OpKind(
    "residual",
    "out = x1 + x2",
    bind_backward=lambda op, v: [v.d(op.inputs[0]), v.d(op.inputs[1]), v.d(op.out)],
    lower=_residual_lower,
    post=POST_RESIDUAL,
    case=_residual_case,
    decode_functions=("inline", "inline"),
    torch=lambda m, op, args, *_: args[0] + args[1],
)


# --------------------------------------------------------------------------------------------
# the loss and the optimizer's kernels


def _crossentropy_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    idx = r.integers(0, V, (B, T)).astype(np.int32)
    logits = 3 * _f32(r, B, T, V)
    if kernel == "crossentropy_forward":
        return {"losses": _f32(r, B, T), "probs": _f32(r, B, T, V), "logits": logits, "targets": idx}
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return {"dlogits": _f32(r, B, T, V), "dlosses": np.full((B, T), 1 / (B * T), np.float32), "probs": probs,
            "targets": idx}  # fmt: skip


CROSSENTROPY = OpKind(
    "crossentropy",
    "losses = -log softmax(logits)[target]; fused softmax backward",
    saved=lambda cfg, B, T: ((B, T, cfg.vocab_size),),
    bind_backward=lambda op, v: [v.d(op.inputs[0]), v.d(op.out), v.a(op.saved[0]), v.a(op.inputs[1])],
    case=_crossentropy_case,
)


def _optimizer_case(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    B, T, C, NH, V = shape
    P = B * T * C + 3
    if kernel == "grad_norm":
        return {"grads": _f32(r, P)}
    return {
        "params": _f32(r, P), "grads": _f32(r, P), "m": _f32(r, P), "v": np.abs(_f32(r, P)),
        "decay": (r.random(P) < 0.7).astype(np.uint8),
        "lr": 1e-3, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1, "step": 3, "grad_scale": 0.7,
    }  # fmt: skip


OPTIMIZER = OpKind(
    "optimizer",
    "global gradient norm; AdamW on the flat buffers",
    kernels=("grad_norm", "adamw_update"),
    in_graph=False,
    case=_optimizer_case,
)


RECORDS: dict[str, OpKind] = {
    rec.name: rec
    for rec in (
        EMBEDDING,
        RMSNORM,
        LAYERNORM,
        MATMUL,
        MATMUL_T,
        ROPE,
        ATTENTION,
        ATTENTION_DROPOUT,
        DROPOUT,
        RELU2,
        GELU,
        RESIDUAL,
        CROSSENTROPY,
        OPTIMIZER,
    )  # fmt: skip
}
# which record a decode-table row runs (for describing a decode step)
OPCODE_RECORD = {OP_EMBED: EMBEDDING, OP_RMSNORM: RMSNORM, OP_LAYERNORM: LAYERNORM, OP_MATMUL: MATMUL,
                 OP_ATTENTION: ATTENTION, OP_RESIDUAL: RESIDUAL, OP_RELU2: RELU2, OP_GELU: GELU,
                 OP_MATMUL_T: MATMUL_T}  # fmt: skip
POST_RECORD = {POST_RELU2: RELU2, POST_GELU: GELU, POST_RESIDUAL: RESIDUAL, POST_ROPE: ROPE}
NORMS = ("rmsnorm", "layernorm")  # ModelConfig.norm: the record of every norm of the model
ACTIVATIONS = ("relu2", "gelu")  # ModelConfig.activation: the MLP's record
KERNELS: tuple[str, ...] = tuple(name for rec in RECORDS.values() for name in rec.kernel_names)
KERNEL_RECORD: dict[str, OpKind] = {name: rec for rec in RECORDS.values() for name in rec.kernel_names}


def record(kind: str) -> OpKind:
    """The record of an op kind; a clear error names the kinds there are."""
    try:
        return RECORDS[kind]
    except KeyError:
        raise KeyError(f"no op record for kind {kind!r}; fastchar/ops.py has {', '.join(RECORDS)}") from None


def saved_names(kind: str, out: str) -> tuple[str, ...]:
    """Slot names of what an op of this kind saves, for ops that name them after their output
    (the norms: ln1 -> ln1_rstd, or ln1_mean and ln1_rstd)."""
    return tuple(out + suffix for suffix in record(kind).extra.get("saved_names", ()))


def make_args(kernel: str, shape: tuple, r: np.random.Generator) -> dict:
    """Arguments of `kernel` in signature order for shape (B, T, C, NH, V): its record's test case."""
    if kernel not in KERNEL_RECORD:
        raise AssertionError(f"no test case for kernel {kernel}")
    return KERNEL_RECORD[kernel].case(kernel, shape, r)

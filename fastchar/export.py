"""ONNX export: the forward pass of fastchar/graph.py's op list as an ONNX graph.

`export_onnx(model, path)` walks `forward_ops(cfg)` (no dropout: an exported model evaluates) and
lowers each op with the function registered for its kind in `LOWERINGS` (one small function per
kind: embedding, rmsnorm, layernorm, matmul, matmul_t (the tied head), rope, attention, relu2, gelu, residual,
dropout). The graph has one input, `tokens` int64 [batch, T], and one output, `logits` float32
[batch, T, V]; batch and T are dynamic, T at most the model's context. The weights go in as float32
initializers (a model that computes with bf16 products exports its fp32 weights, and the graph
computes in fp32); the vocabulary, the tokenizer's characters in id order, is in the model's
metadata under `fastchar.vocabulary`. Only standard ONNX operators of opset 17 are used, so any ONNX
runtime runs the file. The `onnx` package is an optional extra: pip install "fastchar[export]".
Nothing here computes the network itself; onnxruntime is only needed to run the result.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastchar import runfolder
from fastchar.config import ModelConfig
from fastchar.errors import ConfigError, FastcharError
from fastchar.graph import TOKENS, Op, constant_specs, fill_constants, forward_ops

OPSET = 17  # LayerNormalization needs 17; everything else is older
IR_VERSION = 8  # the IR that opset 17 shipped with: readable by runtimes from 2022 on
VOCAB_KEY = "fastchar.vocabulary"  # metadata: the tokenizer's characters in id order
CONFIG_KEY = "fastchar.model_config"  # metadata: the ModelConfig as JSON
LAYERNORM_EPS = 1e-5  # used when a layernorm op carries no eps of its own
EXPORT_HINT = 'pip install "fastchar[export]" (the onnx package)'
FORMATS = ("onnx",)


def require_onnx() -> Any:
    """The onnx module, or a FastcharError naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise FastcharError(
            "exporting to ONNX needs the onnx package, which is not installed", hint=EXPORT_HINT
        ) from None
    return onnx


class Builder:
    """Nodes and initializers of the graph being built; an op's output slot names its ONNX tensor.

    params: parameter name -> float32 array; consts: constant slot (rope tables, zero positions) ->
    (ctx, X) float32 array, whose first T rows an op reads.
    """

    def __init__(self, onnx: Any, cfg: ModelConfig, params: dict[str, np.ndarray], consts: dict[str, np.ndarray]):
        self.onnx, self.cfg, self.params, self.consts = onnx, cfg, params, consts
        self.nodes: list = []
        self.initializers: dict[str, Any] = {}
        self._count = 0
        self._T: str | None = None
        self._positions: str | None = None
        self._rows: dict[str, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def node(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        """Append one node; returns its (single) output's name."""
        out = out or self.fresh(op_type)
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        """Split x into len(sizes) parts along axis; returns their names."""
        outs = [self.fresh("part") for _ in sizes]
        self.nodes.append(self.onnx.helper.make_node("Split", [x, self.ints(sizes)], outs, axis=axis))
        return outs

    def initializer(self, name: str, value: np.ndarray) -> str:
        if name not in self.initializers:
            self.initializers[name] = self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def scalar(self, value: float, dtype: type = np.float32) -> str:
        """A 0-d constant (shared by every node that uses the same value)."""
        array = np.array(value, dtype=dtype)
        return self.initializer(f"const/{array.dtype}/{value!r}", array)

    def ints(self, values: list[int]) -> str:
        return self.initializer(f"const/int64/{values}", np.array(values, np.int64))

    def weight(self, name: str) -> str:
        """A parameter by name (never by position)."""
        return self.initializer(name, self.params[name])

    def T(self) -> str:
        """The dynamic sequence length as a [1] int64 tensor (computed once)."""
        if self._T is None:
            shape = self.node("Shape", [TOKENS])
            self._T = self.node("Slice", [shape, self.ints([1]), self.ints([2])], out="T")
        return self._T

    def positions(self) -> str:
        """0, 1, .., T-1 as an int64 [T] tensor (computed once), as a cumulative sum of ones: onnxruntime
        1.23 rewrites a Gather of a Range into a Slice, which stops at the table's end silently."""
        if self._positions is None:
            ones = self.node("ConstantOfShape", [self.T()], value=self.onnx.helper.make_tensor("one", 7, [1], [1]))
            self._positions = self.node("Sub", [self.node("CumSum", [ones, self.scalar(0, np.int64)]),
                                                self.scalar(1, np.int64)])  # fmt: skip
        return self._positions

    def rows(self, name: str) -> str:
        """The first T rows of a (ctx, X) table: a position embedding, the rope tables. A Gather: an input
        longer than ctx fails here (a Slice would stop at ctx rows, and a ctx of 1 would then broadcast
        its one row over every position)."""
        if name not in self._rows:
            table = self.initializer(name, self.params[name] if name in self.params else self.consts[name])
            self._rows[name] = self.node("Gather", [table, self.positions()], axis=0)
        return self._rows[name]


Lowering = Callable[[Builder, Op], None]
LOWERINGS: dict[str, Lowering] = {}


def lowers(*kinds: str) -> Callable[[Lowering], Lowering]:
    """Register the decorated function as the ONNX lowering of these op kinds."""

    def register(fn: Lowering) -> Lowering:
        for kind in kinds:
            LOWERINGS[kind] = fn
        return fn

    return register


@lowers("embedding")
def lower_embedding(b: Builder, op: Op) -> None:
    """wte[tokens] + positions[:T]: (B, T) int64 -> (B, T, C)."""
    tokens = b.node("Gather", [b.weight(op.weights[0]), op.inputs[0]], axis=0)
    b.node("Add", [tokens, b.rows(op.weights[1])], out=op.out)


@lowers("rmsnorm")
def lower_rmsnorm(b: Builder, op: Op) -> None:
    """x / sqrt(mean(x**2) + eps) * g over the last axis."""
    x = op.inputs[0]
    mean_sq = b.node("ReduceMean", [b.node("Mul", [x, x])], axes=[-1], keepdims=1)
    rstd = b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [mean_sq, b.scalar(op.scalars[0])])])])
    b.node("Mul", [b.node("Mul", [x, rstd]), b.weight(op.weights[0])], out=op.out)


@lowers("layernorm")
def lower_layernorm(b: Builder, op: Op) -> None:
    """(x - mean(x)) / sqrt(var(x) + eps) * g, biased variance, no bias: ONNX's LayerNormalization."""
    eps = float(op.scalars[0]) if op.scalars else LAYERNORM_EPS
    b.node("LayerNormalization", [op.inputs[0], b.weight(op.weights[0])], out=op.out, axis=-1, epsilon=eps)


@lowers("matmul")
def lower_matmul(b: Builder, op: Op) -> None:
    """x @ W, W stored [in, out]: (B, T, K) -> (B, T, N)."""
    b.node("MatMul", [op.inputs[0], b.weight(op.weights[0])], out=op.out)


@lowers("matmul_t")
def lower_matmul_t(b: Builder, op: Op) -> None:
    """x @ W.T, W stored [out, in]: the tied head, logits = x @ wte.T (no lm_head parameter)."""
    w_t = b.node("Transpose", [b.weight(op.weights[0])], perm=[1, 0])
    b.node("MatMul", [op.inputs[0], w_t], out=op.out)


def _heads(b: Builder, x: str) -> str:
    """(B, T, C) -> (B, T, NH, HS)."""
    return b.node("Reshape", [x, b.ints([0, 0, b.cfg.n_head, b.cfg.head_size])])


@lowers("rope")
def lower_rope(b: Builder, op: Op) -> None:
    """q and k of every head turned by their position ([a cos - b sin, a sin + b cos]), v unchanged."""
    C, half = b.cfg.d_model, b.cfg.head_size // 2
    q, k, v = b.split(op.inputs[0], [C, C, C], axis=2)
    cos = b.node("Unsqueeze", [b.rows(op.weights[0]), b.ints([1])])  # (T, 1, HS/2): broadcast over heads
    sin = b.node("Unsqueeze", [b.rows(op.weights[1]), b.ints([1])])
    turned = []
    for x in (q, k):
        first, second = b.split(_heads(b, x), [half, half], axis=3)
        ra = b.node("Sub", [b.node("Mul", [first, cos]), b.node("Mul", [second, sin])])
        rb = b.node("Add", [b.node("Mul", [first, sin]), b.node("Mul", [second, cos])])
        turned.append(b.node("Reshape", [b.node("Concat", [ra, rb], axis=3), b.ints([0, 0, C])]))
    b.node("Concat", [*turned, v], out=op.out, axis=2)


@lowers("attention", "attention_dropout")
def lower_attention(b: Builder, op: Op) -> None:
    """Causal softmax attention, scale 1/sqrt(HS), heads merged: (B, T, 3C) -> (B, T, C). Dropout
    on the probabilities is training only, so the dropout kind lowers the same way."""
    cfg = b.cfg
    C = cfg.d_model
    q, k, v = b.split(op.inputs[0], [C, C, C], axis=2)
    q, v = (b.node("Transpose", [_heads(b, x)], perm=[0, 2, 1, 3]) for x in (q, v))  # (B, NH, T, HS)
    kt = b.node("Transpose", [_heads(b, k)], perm=[0, 2, 3, 1])  # (B, NH, HS, T)
    scores = b.node("Mul", [b.node("MatMul", [q, kt]), b.scalar(1.0 / math.sqrt(cfg.head_size))])
    causal = b.initializer("causal", np.tril(np.ones((cfg.ctx, cfg.ctx), dtype=bool)))
    T = b.T()
    mask = b.node("Slice", [causal, b.ints([0, 0]), b.node("Concat", [T, T], axis=0), b.ints([0, 1])])
    scores = b.node("Where", [mask, scores, b.scalar(-np.inf)])
    att = b.node("Softmax", [scores], axis=-1)
    out = b.node("Transpose", [b.node("MatMul", [att, v])], perm=[0, 2, 1, 3])  # (B, T, NH, HS)
    b.node("Reshape", [out, b.ints([0, 0, C])], out=op.out)


@lowers("relu2")
def lower_relu2(b: Builder, op: Op) -> None:
    """relu(x) ** 2."""
    r = b.node("Relu", [op.inputs[0]])
    b.node("Mul", [r, r], out=op.out)


@lowers("gelu")
def lower_gelu(b: Builder, op: Op) -> None:
    """GELU, exact: 0.5 x (1 + erf(x / sqrt(2)))."""
    x = op.inputs[0]
    erf = b.node("Erf", [b.node("Mul", [x, b.scalar(1.0 / math.sqrt(2.0))])])
    half_x = b.node("Mul", [x, b.scalar(0.5)])
    b.node("Mul", [half_x, b.node("Add", [erf, b.scalar(1.0)])], out=op.out)


@lowers("residual")
def lower_residual(b: Builder, op: Op) -> None:
    b.node("Add", list(op.inputs), out=op.out)


@lowers("dropout")
def lower_dropout(b: Builder, op: Op) -> None:
    """Training only: the identity in an exported (evaluating) model."""
    b.node("Identity", [op.inputs[0]], out=op.out)


def vocabulary_of(model: Any, tokenizer: Any = None) -> str:
    """The tokenizer's characters in id order (the argument's, else the model's run's)."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ConfigError(
            "the model has no tokenizer, so the export would carry no vocabulary",
            hint="pass tokenizer=data.tokenizer (or export a model from fastchar.load(RUN))",
        )
    if len(tokenizer.chars) != model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer.chars)} characters but the model's vocabulary is {model.cfg.vocab_size}",
            hint="pass the tokenizer of the data the model was trained on",
        )
    return "".join(tokenizer.chars)


def build_onnx(model: Any, tokenizer: Any = None, ops: list[Op] | None = None) -> Any:
    """The ONNX ModelProto of model's forward pass (checked by onnx.checker).

    ops: the op list to lower (default `forward_ops(model.cfg)`); an op kind without a lowering is a
    FastcharError that names it."""
    onnx = require_onnx()
    helper = onnx.helper
    cfg: ModelConfig = model.cfg
    vocabulary = vocabulary_of(model, tokenizer)
    params = {name: np.asarray(view, np.float32) for name, view in model.params.items()}
    consts = {name: np.zeros(shape, np.float32) for name, shape in constant_specs(cfg, cfg.ctx)}
    fill_constants(consts, cfg, cfg.ctx)
    b = Builder(onnx, cfg, params, consts)
    ops = forward_ops(cfg, dropout=False) if ops is None else ops
    for op in ops:
        lower = LOWERINGS.get(op.kind)
        if lower is None:
            raise FastcharError(
                f"op kind {op.kind!r} has no ONNX lowering", hint="export a model of the default architecture options"
            )
        lower(b, op)
    if ops[-1].out != "logits":
        b.node("Identity", [ops[-1].out], out="logits")
    graph = helper.make_graph(
        b.nodes,
        "fastchar",
        [helper.make_tensor_value_info(TOKENS, onnx.TensorProto.INT64, ["batch", "T"])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", "T", cfg.vocab_size])],
        list(b.initializers.values()),
        doc_string=f"character-level GPT: tokens int64 [batch, T <= {cfg.ctx}] -> logits float32 [batch, T, V]",
    )
    proto = helper.make_model(
        graph, producer_name="fastchar", opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    helper.set_model_props(proto, {VOCAB_KEY: vocabulary, CONFIG_KEY: json.dumps(cfg.to_dict())})
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model: Any, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write model's forward pass to path as ONNX; returns the path.

    The file's input is `tokens` int64 [batch, T] (T <= cfg.ctx), its output `logits` float32
    [batch, T, V]; metadata `fastchar.vocabulary` holds the tokenizer's characters in id order
    (tokenizer: default the model's own, as fastchar.load sets it). The fp32 weights are exported
    whatever the model's precision."""
    proto = build_onnx(model, tokenizer)
    path = Path(path)
    data = proto.SerializeToString()
    try:
        if path.exists() and not path.is_file():  # a device or FIFO is written to
            path.write_bytes(data)
        else:  # a full disk or a kill never leaves a truncated model in place of the previous file
            runfolder.write_bytes(path, data, sync=True)
    except OSError as exc:
        raise FastcharError(
            f"cannot write {path}: {exc.strerror or exc}", hint="choose a writable file with -o (its folder must exist)"
        ) from None
    return path


def export(model: Any, path: str | os.PathLike, format: str = "onnx", tokenizer: Any = None) -> Path:
    """Export model to path in format (only "onnx" today); a ConfigError names an unknown format."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    return export_onnx(model, path, tokenizer)

"""ONNX export: onnxruntime's logits equal fastchar's (rtol 1e-4) for the default model, rotary
positions, every architecture option ModelConfig has, and the lowerings of layernorm, gelu and the
tied head on a hand-edited op list; dynamic batch and T; the metadata; the CLI and its errors."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from scipy.special import erf

from fastchar import CharTokenizer, Model, ModelConfig, export_onnx
from fastchar.backends import reference
from fastchar.cli import main
from fastchar.errors import ConfigError, FastcharError
from fastchar.export import LOWERINGS, VOCAB_KEY, build_onnx, export
from fastchar.graph import Op, constant_specs, fill_constants, forward_ops
from fastchar.model import load

RTOL, ATOL = 1e-4, 1e-5  # float32 against float32: reductions over C and T in another order
TINY = dict(d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=128)
VOCAB = "\n !',-.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # 62 characters


def lively(model: Model, seed: int = 0) -> Model:
    """Weights of std 0.1 and gains around 1, so attention and the head are far from uniform."""
    rng = np.random.default_rng(seed)
    for name, view in model.params.items():
        view[...] = (
            (1.0 + rng.normal(0, 0.1, view.shape)) if name.endswith(".weight") else rng.normal(0, 0.1, view.shape)
        )
    return model.eval()


def tokenizer(cfg: ModelConfig) -> CharTokenizer:
    return CharTokenizer(VOCAB[: cfg.vocab_size])


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def ort_logits(sess: ort.InferenceSession, tokens: np.ndarray) -> np.ndarray:
    return sess.run(["logits"], {"tokens": tokens.astype(np.int64)})[0]


def fastchar_logits(model: Model, tokens: np.ndarray) -> np.ndarray:
    model.forward(tokens)
    return model.logits.copy()


def option_configs() -> list[dict]:
    """The default model, rotary positions, and each architecture option ModelConfig defines."""
    cases = [{}, {"position": "rope"}]
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    options = {"norm": "layernorm", "activation": "gelu", "tie_embeddings": True}
    cases += [{name: value} for name, value in options.items() if name in fields]
    if set(options) <= fields:  # nanoGPT's block (learned positions), and with rotary positions
        cases += [dict(options), {**options, "position": "rope"}]
    return cases


@pytest.mark.parametrize(
    "options", option_configs(), ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "base"
)
def test_onnxruntime_logits_equal_fastchar(tmp_path, options):
    cfg = ModelConfig(vocab_size=62, **options)  # full size: C 128, L 4, T 64
    model = lively(Model(cfg, backend="numpy", seed=0))
    path = export_onnx(model, tmp_path / "m.onnx", tokenizer(cfg))
    sess = session(path)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, cfg.ctx))
    want = fastchar_logits(model, tokens)
    got = ort_logits(sess, tokens)
    assert got.dtype == np.float32 and got.shape == (2, cfg.ctx, cfg.vocab_size)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"logits of {options or 'base'}")


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_batch_and_length_are_dynamic(tmp_path, position):
    cfg = ModelConfig(vocab_size=40, position=position, **TINY)
    model = lively(Model(cfg, backend="numpy", seed=2))
    sess = session(export_onnx(model, tmp_path / "m.onnx", tokenizer(cfg)))
    rng = np.random.default_rng(3)
    for B, T in [(1, 1), (3, 5), (1, cfg.ctx), (5, cfg.ctx - 1)]:
        tokens = rng.integers(0, cfg.vocab_size, (B, T))
        np.testing.assert_allclose(ort_logits(sess, tokens), fastchar_logits(model, tokens), rtol=RTOL, atol=ATOL,
                                   err_msg=f"B={B} T={T}")  # fmt: skip
    # causal: the logits at position t do not depend on later tokens
    tokens = rng.integers(0, cfg.vocab_size, (1, cfg.ctx))
    changed = tokens.copy()
    changed[0, 9:] = (changed[0, 9:] + 1) % cfg.vocab_size
    np.testing.assert_array_equal(ort_logits(sess, tokens)[0, :9], ort_logits(sess, changed)[0, :9])


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("ctx", [1, 4])
def test_an_input_longer_than_ctx_is_an_error(tmp_path, position, ctx):
    """T <= ctx is the file's contract: T = ctx runs, T = ctx + 1 fails in the runtime (a window of
    one row once broadcast its row over every position and returned logits)."""
    cfg = ModelConfig(vocab_size=40, position=position, **{**TINY, "ctx": ctx})
    model = lively(Model(cfg, backend="numpy", seed=2))
    sess = session(export_onnx(model, tmp_path / "m.onnx", tokenizer(cfg)))
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, ctx + 1))
    np.testing.assert_allclose(ort_logits(sess, tokens[:, :ctx]), fastchar_logits(model, tokens[:, :ctx]),
                               rtol=RTOL, atol=ATOL)  # fmt: skip
    with pytest.raises(Exception, match="(?i)out of bounds|indices"):
        ort_logits(sess, tokens)


def test_inputs_outputs_and_metadata(tmp_path):
    cfg = ModelConfig(vocab_size=30, **TINY)
    model = lively(Model(cfg, backend="numpy"))
    proto = onnx.load(str(export_onnx(model, tmp_path / "m.onnx", tokenizer(cfg))))
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == "tokens" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "T"]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "T", 30]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[VOCAB_KEY] == VOCAB[:30] and len(meta[VOCAB_KEY]) == cfg.vocab_size
    assert json.loads(meta["fastchar.model_config"]) == cfg.to_dict()
    assert {i.name for i in proto.graph.initializer} >= {name for name, _ in model.params.items()}


# -- lowerings of op kinds graph.py may emit: a float64 interpreter of an op list as the oracle ---------


def interpret(ops: list[Op], cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """Run an op list in float64 with NumPy: the reference kernels, and docs/architecture.md's formulas
    for layernorm, gelu and the tied head. Returns the last op's output (B, T, V)."""
    consts = {name: np.zeros(shape) for name, shape in constant_specs(cfg, cfg.ctx)}
    fill_constants(consts, cfg, cfg.ctx)
    table = {**{k: np.asarray(v, np.float64) for k, v in params.items()}, **consts}
    env: dict[str, np.ndarray] = {"tokens": tokens}
    B, T = tokens.shape
    for op in ops:
        x = env[op.inputs[0]]
        if op.kind == "embedding":
            y = table[op.weights[0]][x] + table[op.weights[1]][:T]
        elif op.kind == "rmsnorm":
            y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + op.scalars[0]) * table[op.weights[0]]
        elif op.kind == "layernorm":  # biased variance, no bias, eps 1e-5
            mean, var = x.mean(axis=-1, keepdims=True), x.var(axis=-1, keepdims=True)
            y = (x - mean) / np.sqrt(var + 1e-5) * table[op.weights[0]]
        elif op.kind == "matmul":
            y = x @ table[op.weights[0]]
        elif op.kind == "matmul_t":  # the tied head: x @ wte.T
            y = x @ table[op.weights[0]].T
        elif op.kind == "rope":
            y = np.empty_like(x)
            reference.rope_forward(y, x, table[op.weights[0]], table[op.weights[1]])
        elif op.kind == "attention":
            y = np.empty((B, T, cfg.d_model))
            reference.attention_forward(y, np.empty((B, cfg.n_head, T, T)), x)
        elif op.kind == "relu2":
            y = np.maximum(x, 0) ** 2
        elif op.kind == "gelu":
            y = 0.5 * x * (1 + erf(x / np.sqrt(2)))
        elif op.kind == "residual":
            y = x + env[op.inputs[1]]
        else:
            raise AssertionError(op.kind)
        env[op.out] = y
    return env[ops[-1].out]


def variant(ops: list[Op], norm: bool, gelu: bool, tied: bool) -> list[Op]:
    """The op list with layernorm for rmsnorm, gelu for relu2, and/or the head reading wte transposed
    (the kinds and names fastchar/graph.py gives these options)."""
    out = []
    for op in ops:
        if norm and op.kind == "rmsnorm":
            op = dataclasses.replace(op, kind="layernorm")
        if gelu and op.kind == "relu2":
            op = dataclasses.replace(op, kind="gelu")
        if tied and op.weights == ("lm_head",):
            op = dataclasses.replace(op, kind="matmul_t", weights=("wte",))
        out.append(op)
    return out


@pytest.mark.parametrize(
    "norm,gelu,tied", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)], ids=["layernorm", "gelu", "tied", "all"]
)
def test_lowerings_of_new_kinds(norm, gelu, tied):
    cfg = ModelConfig(vocab_size=25, **TINY)
    model = lively(Model(cfg, backend="numpy", seed=4))
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (3, cfg.ctx))
    base = forward_ops(cfg)
    params = dict(model.params.items())
    # the oracle agrees with the model on the op list graph.py emits ...
    np.testing.assert_allclose(
        interpret(base, cfg, params, tokens), fastchar_logits(model, tokens), rtol=1e-5, atol=1e-6
    )
    ops = variant(base, norm, gelu, tied)
    want = interpret(ops, cfg, params, tokens)
    assert not np.allclose(want, fastchar_logits(model, tokens), atol=1e-3), "the variant changes the logits"
    # ... and onnxruntime agrees with the oracle on the edited list
    sess = ort.InferenceSession(
        build_onnx(model, tokenizer(cfg), ops).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(ort_logits(sess, tokens), want, rtol=RTOL, atol=ATOL)


def test_every_kind_graph_emits_has_a_lowering():
    kinds = {op.kind for options in option_configs() for op in forward_ops(ModelConfig(**options), dropout=True)}
    assert kinds <= set(LOWERINGS), sorted(kinds - set(LOWERINGS))


def test_dropout_is_the_identity(tmp_path):
    cfg = ModelConfig(vocab_size=20, dropout=0.3, **TINY)
    model = lively(Model(cfg, backend="numpy", seed=6))
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 9))
    sess = ort.InferenceSession(build_onnx(model, tokenizer(cfg), forward_ops(cfg, dropout=True)).SerializeToString(),
                                providers=["CPUExecutionProvider"])  # fmt: skip
    np.testing.assert_allclose(ort_logits(sess, tokens), fastchar_logits(model, tokens), rtol=RTOL, atol=ATOL)


def test_bf16_model_exports_its_fp32_weights(tmp_path):
    cfg = ModelConfig(vocab_size=20, **TINY)
    fp32 = lively(Model(cfg, backend="numpy", seed=8))
    bf16 = lively(Model(cfg, backend="numpy", seed=8, precision="bf16"))
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, (2, cfg.ctx))
    got = ort_logits(session(export_onnx(bf16, tmp_path / "m.onnx", tokenizer(cfg))), tokens)
    np.testing.assert_allclose(got, fastchar_logits(fp32, tokens), rtol=RTOL, atol=ATOL)


# -- the command and its errors --------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    cfg = ModelConfig(vocab_size=33, position="rope", **TINY)
    model = lively(Model(cfg, backend="numpy", seed=10))
    model.tokenizer = tokenizer(cfg)
    return model.save(tmp_path / "ckpt")


def test_cli_export(capsys, checkpoint, tmp_path):
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "[batch, T <= 16]" in printed
    model = load(checkpoint, backend="numpy")
    tokens = np.random.default_rng(11).integers(0, 33, (4, 12))
    np.testing.assert_allclose(ort_logits(session(out), tokens), fastchar_logits(model, tokens), rtol=RTOL, atol=ATOL)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta[VOCAB_KEY] == "".join(model.tokenizer.chars)


def assert_clean_error(code: int, err: str, pattern: str, status: int = 1) -> None:
    assert code == status, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith(("error: ", "hint: "))]
    assert lines[0].startswith("error: ") and pattern in lines[0], err
    assert lines[1].startswith("hint: "), err


def test_cli_unwritable_output(capsys, checkpoint, tmp_path):
    for target in (tmp_path / "no" / "such" / "m.onnx", tmp_path):  # a missing folder; a folder
        code = main(["export", str(checkpoint), "-o", str(target)])
        assert_clean_error(code, capsys.readouterr().err, "cannot write")


def test_bad_format(capsys, checkpoint, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["export", str(checkpoint), "--format", "tflite", "-o", str(tmp_path / "m")])
    assert_clean_error(exc.value.code, capsys.readouterr().err, "invalid choice: 'tflite'", status=2)
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export(load(checkpoint, backend="numpy"), tmp_path / "m", format="tflite")
    assert not (tmp_path / "m").exists()


def test_missing_onnx_package(capsys, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    code = main(["export", str(checkpoint), "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert_clean_error(code, err, "needs the onnx package")
    assert 'pip install "fastchar[export]"' in err
    with pytest.raises(FastcharError, match="needs the onnx package"):
        export_onnx(load(checkpoint, backend="numpy"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_model_without_tokenizer(tmp_path):
    model = Model(ModelConfig(vocab_size=20, **TINY), backend="numpy")
    with pytest.raises(ConfigError, match="no tokenizer"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="the tokenizer has 5 characters"):
        export_onnx(model, tmp_path / "m.onnx", CharTokenizer("abcde"))

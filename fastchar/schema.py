"""The schema of a checkpoint's meta.json, tokenizer.json and safetensors headers, checked before use.

A checkpoint folder may come from anywhere, so nothing in it is trusted until checked: every field
of meta.json and tokenizer.json has a type and a range, `files` names only plain files inside the
folder, and the model's sizes must agree with the safetensors headers (whose offsets must agree
with the file sizes) before a single parameter buffer is allocated. Each failure is a one-line
CheckpointError naming the file and the field. Leaves out reading files (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from fastchar.config import ModelConfig, TrainConfig
from fastchar.errors import CheckpointError, ConfigError

FORMAT = "fastchar-checkpoint"
VERSION = 1
REQUIRED_FILES = ("model.safetensors", "optimizer.safetensors")
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
BACKEND_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
PRECISIONS = ("fp32", "bf16")
DTYPES = ("float32", "float64")
MAX_INT = 2**62  # steps, counters and sizes beyond this are not from a real run
MAX_DIM = 2**24  # a single model dimension (vocabulary: Unicode has 1,114,112 code points)
MAX_CTX = 2**16  # context length: the KV cache and attention are sized by it, not by the weights
MAX_TEXT = 4096  # a path or name stored in meta.json
MAX_JSON_BYTES = 64 * 2**20  # meta.json / tokenizer.json larger than this are refused unread
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors JSON header
HINT = "the checkpoint's files were altered or come from another program; use another checkpoint"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: Path | str, field: str, what: str, value: Any) -> CheckpointError:
    return CheckpointError(f"{where}: {field} must be {what}, got {_short(value)}", hint=HINT)


def _int(where: Path | str, field: str, value: Any, lo: int = 0, hi: int = MAX_INT) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(where, field, f"an integer in [{lo}, {hi}]", value)
    return value


def _number(where: Path | str, field: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise _fail(where, field, f"a finite number in [{lo:g}, {hi:g}]", value)
    return float(value)


def _text(where: Path | str, field: str, value: Any, pattern: re.Pattern | None = None) -> str:
    if type(value) is not str or len(value) > MAX_TEXT or "\x00" in value:
        raise _fail(where, field, f"a string of at most {MAX_TEXT} characters", value)
    if pattern is not None and not pattern.match(value):
        raise _fail(where, field, f"a string matching {pattern.pattern}", value)
    return value


def _object(where: Path | str, field: str, value: Any) -> dict:
    if type(value) is not dict:
        raise _fail(where, field, "an object", value)
    return value


def parse_json(raw: bytes, where: Path | str) -> Any:
    """JSON from bytes; malformed, non-UTF-8, too deep or too large input is a CheckpointError."""
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{where} is {len(raw):,} bytes, more than any checkpoint writes", hint=HINT)
    try:
        return json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where} is corrupt: {exc}", hint="use another checkpoint") from None
    except RecursionError:
        raise CheckpointError(f"{where} is corrupt: nested too deeply", hint=HINT) from None


def _dataclass_fields(cls: type, where: Path | str, section: str, data: Any) -> dict:
    """Check data's keys and value types against dataclass cls, then build it to check ranges."""
    data = _object(where, section, data)
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in data.items():
        field = f"{section}.{key}"
        if key not in fields:
            raise CheckpointError(f"{where}: unknown field {_short(field)}", hint=HINT)
        kind = fields[key]
        if kind == "int":
            _int(where, field, value, -MAX_INT, MAX_INT)
        elif kind == "float":
            _number(where, field, value)
        elif kind == "str":
            _text(where, field, value)
        elif kind == "bool":
            if type(value) is not bool:
                raise _fail(where, field, "true or false", value)
        elif key == "betas":
            if type(value) is not list or len(value) != 2:
                raise _fail(where, field, "a list of two numbers", value)
            for i, b in enumerate(value):
                _number(where, f"{field}[{i}]", b)
        elif value is not None and type(value) not in (int, float, str, bool):
            raise _fail(where, field, "a number, a string or null", value)
    return data


def _config(cls: type, where: Path | str, section: str, data: Any) -> Any:
    data = _dataclass_fields(cls, where, section, data)
    try:
        return cls.from_dict(data)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} holds an invalid {section} config: {exc}", hint=HINT) from None


def validate_state(where: Path | str, state: Any) -> dict:
    """meta.json's `state`: step, best_val, elapsed, dropout_counter and the batch RNG's state."""
    state = _object(where, "state", state)
    if "step" in state:
        _int(where, "state.step", state["step"])
    if state.get("best_val") is not None:
        _number(where, "state.best_val", state["best_val"])
    if "elapsed" in state:
        _number(where, "state.elapsed", state["elapsed"], 0.0)
    if state.get("best_val_acc") is not None:
        _number(where, "state.best_val_acc", state["best_val_acc"], 0.0, 1.0)
    if state.get("last_eval") is not None:
        last = _object(where, "state.last_eval", state["last_eval"])
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            _number(where, f"state.last_eval.{key}", last.get(key), 0.0, 1.0 if key.endswith("_acc") else math.inf)
    if "run_id" in state:
        _text(where, "state.run_id", state["run_id"])
    if "dropout_counter" in state:
        _int(where, "state.dropout_counter", state["dropout_counter"], 0, 2**64 - 1)
    if "rng" in state:
        rng = _object(where, "state.rng", state["rng"])
        if rng.get("bit_generator") != "PCG64":
            raise _fail(where, "state.rng.bit_generator", "'PCG64'", rng.get("bit_generator"))
        inner = _object(where, "state.rng.state", rng.get("state"))
        for key in ("state", "inc"):
            _int(where, f"state.rng.state.{key}", inner.get(key), 0, 2**128 - 1)
        _int(where, "state.rng.has_uint32", rng.get("has_uint32"), 0, 1)
        _int(where, "state.rng.uinteger", rng.get("uinteger"), 0, 2**32 - 1)
        try:
            np.random.PCG64().state = rng
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: state.rng is not a PCG64 state: {exc}", hint=HINT) from None
    return state


def validate_files(where: Path | str, files: Any) -> dict:
    """meta.json's `files`: plain names in the folder, each with bytes and a sha256."""
    files = _object(where, "files", files)
    for name, entry in files.items():
        if not PLAIN_NAME.match(name) or name in (".", ".."):
            raise CheckpointError(
                f"{where}: files lists {_short(name)}, which is not a plain file name inside the checkpoint folder",
                hint=HINT,
            )
        entry = _object(where, f"files[{name!r}]", entry)
        _int(where, f"files[{name!r}].bytes", entry.get("bytes"))
        _text(where, f"files[{name!r}].sha256", entry.get("sha256"), SHA256)
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{where}: files does not list {name}", hint=HINT)
    return files


def validate_meta(meta: Any, where: Path | str) -> dict:
    """Check every field meta.json may hold; returns meta with `model` and `train` as configs checked.

    Unknown top-level keys are ignored (later versions may add some); unknown config fields are not.
    """
    meta = _object(where, "the top level", meta)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a fastchar checkpoint's meta.json", hint=HINT)
    if meta.get("version") != VERSION or type(meta.get("version")) is not int:
        raise CheckpointError(
            f"{where} has format version {_short(meta.get('version'))}, this fastchar reads {VERSION}",
            hint="upgrade fastchar or retrain",
        )
    cfg = _config(ModelConfig, where, "model", meta.get("model"))
    if cfg.ctx > MAX_CTX:
        raise _fail(where, "model.ctx", f"at most {MAX_CTX}", cfg.ctx)
    for name in ("vocab_size", "d_model", "mlp_hidden", "n_layer"):
        if getattr(cfg, name) > MAX_DIM:
            raise _fail(where, f"model.{name}", f"at most {MAX_DIM}", getattr(cfg, name))
    if meta.get("train") is not None:
        _config(TrainConfig, where, "train", meta["train"])
    validate_state(where, meta.get("state", {}) or {})
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise _fail(where, "dtype", f"one of {DTYPES}", meta["dtype"])
    validate_files(where, meta.get("files"))
    if meta.get("data") is not None:
        data = _object(where, "data", meta["data"])
        _text(where, "data.path", data.get("path"))
        _int(where, "data.bytes", data.get("bytes"))
        _text(where, "data.sha256", data.get("sha256"), SHA256)
    if meta.get("backend") is not None:
        _text(where, "backend", meta["backend"], BACKEND_NAME)
    if meta.get("precision") is not None and meta["precision"] not in PRECISIONS:
        raise _fail(where, "precision", f"one of {PRECISIONS}", meta["precision"])
    return meta


def validate_tokenizer(data: Any, where: Path | str, vocab_size: int) -> list[str]:
    """tokenizer.json: {"type": "char", "chars": "..."} with vocab_size distinct characters."""
    data = _object(where, "the top level", data)
    if data.get("type", "char") != "char":
        raise _fail(where, "type", "'char'", data.get("type"))
    chars = data.get("chars")
    if type(chars) is not str:
        raise _fail(where, "chars", "a string", chars)
    if len(chars) != vocab_size:
        raise CheckpointError(
            f"{where} has {len(chars)} characters but the model's vocab_size is {vocab_size}", hint=HINT
        )
    if len(set(chars)) != len(chars):
        raise CheckpointError(f"{where}: chars holds a character more than once", hint=HINT)
    if any(0xD800 <= ord(c) <= 0xDFFF for c in chars):
        raise CheckpointError(f"{where}: chars holds a lone surrogate, which is not a character", hint=HINT)
    return list(chars)


# -- safetensors headers ------------------------------------------------------------------------


def safetensors_header(raw: bytes, where: Path | str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors file's bytes, with every offset checked against
    the data that follows (so shapes can size allocations safely)."""
    if len(raw) < 8:
        raise CheckpointError(f"{where} is too short to be a safetensors file", hint=HINT)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > min(MAX_HEADER_BYTES, len(raw) - 8):
        raise CheckpointError(f"{where}: its header claims {n:,} bytes, more than the file holds", hint=HINT)
    header = _object(where, "the header", parse_json(raw[8 : 8 + n], where))
    data_bytes = len(raw) - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = _object(where, f"tensor {name!r}", entry)
        if entry.get("dtype") not in ("F32", "F64"):
            raise _fail(where, f"tensor {name!r} dtype", "F32 or F64", entry.get("dtype"))
        shape = entry.get("shape")
        if type(shape) is not list or len(shape) > 4:
            raise _fail(where, f"tensor {name!r} shape", "a list of up to 4 sizes", shape)
        dims = tuple(_int(where, f"tensor {name!r} shape", d, 0, MAX_INT) for d in shape)
        offsets = entry.get("data_offsets")
        if type(offsets) is not list or len(offsets) != 2:
            raise _fail(where, f"tensor {name!r} data_offsets", "two offsets", offsets)
        begin, end = (_int(where, f"tensor {name!r} data_offsets", o, 0, data_bytes) for o in offsets)
        itemsize = 4 if entry["dtype"] == "F32" else 8
        if end - begin != math.prod(dims) * itemsize:
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {dims} but {end - begin:,} bytes of data", hint=HINT
            )
        tensors[name] = (entry["dtype"], dims)
    return tensors


def check_model_header(
    tensors: dict[str, tuple[str, tuple[int, ...]]], cfg: ModelConfig, where: Path | str
) -> list[tuple[str, tuple[int, ...]]]:
    """The weights' header must hold every tensor of cfg's parameter table, float32, with its shape.

    Returns the parameter table. The table is built only once n_layer is known to be no larger than
    the header allows, so a forged n_layer cannot make it (or the model) huge.
    """
    from fastchar.arena import param_specs

    if cfg.n_layer > len(tensors):
        raise CheckpointError(
            f"{where} holds {len(tensors)} tensors, too few for n_layer={cfg.n_layer} in meta.json",
            hint="the weights and the config come from different models",
        )
    specs = param_specs(cfg)
    for name, shape in specs:
        if name not in tensors:
            raise CheckpointError(
                f"{where} lacks tensor {name!r}", hint="the weights and the config come from different models"
            )
        dtype, found = tensors[name]
        if found != tuple(shape):
            raise CheckpointError(
                f"{where}: tensor {name!r} has shape {found} but the config in meta.json needs {tuple(shape)}",
                hint="the weights and the config come from different models",
            )
        if dtype not in ("F32", "F64"):  # float64 models (the numpy reference) save F64
            raise _fail(where, f"tensor {name!r} dtype", "F32 or F64", dtype)
    return specs


def check_optimizer_header(tensors: dict[str, tuple[str, tuple[int, ...]]], size: int, where: Path | str) -> None:
    """adam_m and adam_v: float32, one entry per parameter."""
    for role in ("adam_m", "adam_v"):
        if tensors.get(role) not in (("F32", (size,)), ("F64", (size,))):
            raise CheckpointError(
                f"{where}: {role} is missing or has the wrong size (expected {size:,} floats)", hint=HINT
            )

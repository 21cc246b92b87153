"""Checkpoint folders: tensors in safetensors (NumPy API), everything else in JSON.

A folder holds model.safetensors (the parameters by SPEC name), optimizer.safetensors (Adam's m and
v as flat buffers), tokenizer.json and meta.json (configs, training state, and the size and sha256
of every other file, so truncation and corruption are caught and named).

Writes are atomic: the whole folder is written beside the target under a temporary name, then
swapped in by two renames. A crash or a full disk while writing leaves the last good folder as it
was; a crash between the two renames leaves it as DIR.old, which `load` finds.

A run folder (what `fastchar train --out DIR` writes: best/, latest/, metrics.jsonl) is accepted
wherever a checkpoint folder is: `resolve` picks best/ for sampling and loading, latest/ for resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fastchar.arena import param_specs
from fastchar.config import ModelConfig
from fastchar.errors import CheckpointError, ConfigError
from fastchar.model import Model
from fastchar.tokenizer import CharTokenizer

FORMAT = "fastchar-checkpoint"
VERSION = 1
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
RUN_CHECKPOINTS = ("best", "latest")  # the checkpoint folders a training run keeps


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    model: Model,
    path: str | Path,
    tokenizer: CharTokenizer | None = None,
    train_cfg: Any = None,
    state: dict | None = None,
) -> Path:
    """Write model (weights, Adam moments, config, tokenizer, training state) to folder path."""
    path = Path(path)
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({name: np.ascontiguousarray(v) for name, v in model.params.items()}, tmp / "model.safetensors")
        save_file({"adam_m": model.adam_m.flat, "adam_v": model.adam_v.flat}, tmp / "optimizer.safetensors")
        files = list(TENSOR_FILES)
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            files.append("tokenizer.json")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.cfg.to_dict(),
            "train": train_cfg.to_dict() if train_cfg is not None else None,
            "state": state or {},
            "dtype": str(model.dtype),
            "precision": getattr(model, "precision", "fp32"),  # of the run's products; information only
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """Locate a checkpoint folder (or its .old twin) and return it with its verified meta.json."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(path.name + ".old")
        if old.is_dir():
            warnings.warn(f"{path} is missing; using {old}, left by an interrupted save", stacklevel=2)
            path = old
        else:
            raise CheckpointError(
                f"checkpoint folder {path} does not exist",
                hint="pass the folder a training run wrote, e.g. runs/base/best or runs/base/latest",
            )
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder", hint="a checkpoint is a folder with meta.json")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} is not a fastchar checkpoint: {meta_path.name} is missing",
            hint="pass the folder a training run wrote, e.g. runs/base/best or runs/base/latest",
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is corrupt: {exc}", hint="use another checkpoint") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a fastchar checkpoint's meta.json")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {meta.get('version')}, this fastchar reads {VERSION}",
            hint="upgrade fastchar or retrain",
        )
    for name, expected in meta.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing", hint="the checkpoint is incomplete; use another one")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{file} is truncated or altered: {size} bytes, expected {expected['bytes']}",
                hint="the checkpoint is damaged; use another one (e.g. latest instead of best)",
            )
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"{file} is corrupt: its sha256 does not match meta.json",
                hint="the checkpoint is damaged; use another one (e.g. latest instead of best)",
            )
    return path, meta


def resolve(path: str | Path, want: str = "best") -> tuple[Path, str | None]:
    """The checkpoint folder that path names, and a note when path was a run folder.

    A folder with meta.json (or a missing one, left to read_meta's .old recovery) is itself the
    checkpoint: (path, None). A run folder holding best/ and latest/ gives its `want` checkpoint, or
    the other one if that is missing, with a note saying which was taken.
    """
    if want not in RUN_CHECKPOINTS:
        raise ValueError(f"want must be one of {RUN_CHECKPOINTS}, got {want!r}")
    path = Path(path)
    if not path.is_dir() or (path / "meta.json").is_file():
        return path, None
    other = next(name for name in RUN_CHECKPOINTS if name != want)
    for name in (want, other):
        if (path / name).is_dir() or (path / (name + ".old")).is_dir():
            missing = "" if name == want else f"; it has no {want}/"
            return path / name, f"{path} is a run folder; using its {name} checkpoint {path / name}{missing}"
    raise CheckpointError(
        f"{path} is neither a checkpoint nor a run folder: meta.json is missing and it holds no best/ or latest/",
        hint="pass a checkpoint folder (one with meta.json, e.g. runs/base/best) "
        "or the run folder a training run wrote (one holding best/ and latest/, e.g. runs/base)",
    )


def _load_tensors(file: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} cannot be read: {exc}", hint="use another checkpoint") from None


def load(path: str | Path, backend: str = "auto", which: str = "best", precision: str = "fp32") -> Model:
    """A Model from a checkpoint folder, or from a run folder's `which` checkpoint ("best" or "latest").

    Sets `.tokenizer`, `.train_cfg`, `.train_state`, `.checkpoint_path` (the folder read) and
    `.checkpoint_note` (which checkpoint of a run folder was taken; None for a checkpoint folder).
    """
    path, note = resolve(path, which)
    path, meta = read_meta(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path / 'meta.json'} holds an invalid model config: {exc}") from None
    model = Model(cfg, backend=backend, seed=0, precision=precision)  # precision: not in the files
    tensors = _load_tensors(path / "model.safetensors")
    for name, shape in param_specs(cfg):
        if name not in tensors:
            raise CheckpointError(f"{path / 'model.safetensors'} lacks tensor {name!r}")
        if tensors[name].shape != shape:
            raise CheckpointError(
                f"{path / 'model.safetensors'}: tensor {name!r} has shape {tensors[name].shape} "
                f"but the config in meta.json needs {shape}",
                hint="the weights and the config come from different models",
            )
        model.params[name][...] = tensors[name]
    moments = _load_tensors(path / "optimizer.safetensors")
    for role, arena in (("adam_m", model.adam_m), ("adam_v", model.adam_v)):
        if moments.get(role) is None or moments[role].shape != arena.flat.shape:
            raise CheckpointError(f"{path / 'optimizer.safetensors'}: {role} is missing or has the wrong size")
        arena.flat[...] = moments[role]
    model.tokenizer = None
    if (path / "tokenizer.json").is_file():
        try:
            model.tokenizer = CharTokenizer.load(path / "tokenizer.json")
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path / 'tokenizer.json'} is corrupt: {exc}") from None
        if model.tokenizer.vocab_size != cfg.vocab_size:
            raise CheckpointError(
                f"{path / 'tokenizer.json'} has {model.tokenizer.vocab_size} characters "
                f"but the model's vocab_size is {cfg.vocab_size}"
            )
    model.train_cfg = meta.get("train")
    model.train_state = meta.get("state") or {}
    model.checkpoint_path = path
    model.checkpoint_note = note
    return model

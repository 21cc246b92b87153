"""Checkpoint folders: tensors in safetensors (NumPy API), everything else in JSON.

A folder holds model.safetensors (the parameters by name, docs/architecture.md), optimizer.safetensors (Adam's m and
v as flat buffers), tokenizer.json and meta.json (configs, training state, the backend, precision
and training text of the run, and the size and sha256 of every other file, so truncation and
corruption are caught and named).

Writes are atomic: the whole folder is written beside the target under a temporary name, then
swapped in by two renames. A crash or a full disk while writing leaves the last good folder as it
was; a crash between the two renames leaves it as DIR.old, which `read` finds. Weights or Adam
moments that are not finite are never written.

Reads trust nothing: meta.json and tokenizer.json are checked against the schema of
fastchar/schema.py and the sizes in the safetensors headers before anything is allocated, every
file is opened through one handle on the folder without following links, and its bytes are hashed
and parsed from the same read. A save that swaps the folder during a read makes the read start over.

A run folder (what `fastchar train --out DIR` writes: best/, latest/, metrics.jsonl) is accepted
wherever a checkpoint folder is: `resolve` picks best/ for sampling and loading, latest/ for resuming.

This module reads and writes files only; it builds no Model (fastchar.model.load does, from `read`),
so fastchar.model imports it and not the other way round.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_bytes
from safetensors.numpy import save_file

from fastchar.config import ModelConfig
from fastchar.errors import CheckpointError
from fastchar.portable import has_folder_handles, open_nofollow
from fastchar.schema import (
    FORMAT,
    MAX_JSON_BYTES,
    VERSION,
    check_model_header,
    check_optimizer_header,
    parse_json,
    safetensors_header,
    validate_meta,
    validate_tokenizer,
)
from fastchar.tokenizer import CharTokenizer

if TYPE_CHECKING:  # checkpoint.py reads and writes files; fastchar.model builds Models from them
    from fastchar.model import Model

__all__ = [
    "FORMAT", "VERSION", "CheckpointWriteError", "Stored", "read", "read_checkpoint", "read_meta", "resolve", "save",
]  # fmt: skip

TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
READ_ATTEMPTS = 6  # reads restarted because a save swapped the folder meanwhile
SWAP_WAIT = 0.05  # seconds; a save's two renames take microseconds
RUN_CHECKPOINTS = ("best", "latest")  # the checkpoint folders a training run keeps


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (a full disk, a permission); the previous one is intact."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows opens no folder as a file; its renames need no fsync
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite(model: Model) -> list[str]:
    """Names of the buffers (params, adam_m, adam_v) holding a NaN or an infinity."""
    arenas = (("params", model.params), ("adam_m", model.adam_m), ("adam_v", model.adam_v))
    return [name for name, arena in arenas if not np.isfinite(arena.flat).all()]


def _write_failure(path: Path, exc: BaseException) -> CheckpointWriteError:
    text = str(exc).replace("\n", " ")
    full = getattr(exc, "errno", None) == errno.ENOSPC or "code: 28" in text or "No space left" in text
    reason = "No space left on device" if full else text
    kept = f"; the previous {path.name} was left as it was" if path.exists() else ""
    hint = "free some disk space or pass another --out DIR" if full else "check the folder's permissions and space"
    return CheckpointWriteError(f"could not write the checkpoint {path}: {reason}", hint=hint + kept)


def _kernel_path() -> str:
    """The instruction-set path the compiled kernels ran (fastchar.isa.path): a resume on another one
    continues, but not bit for bit."""
    from fastchar.isa import path

    return path()


def save(
    model: Model,
    path: str | Path,
    tokenizer: CharTokenizer | None = None,
    train_cfg: Any = None,
    state: dict | None = None,
    data: dict | None = None,
) -> Path:
    """Write model (weights, Adam moments, config, tokenizer, training state) to folder path.

    data: what the run trained on (see runfolder.data_record), recorded so a resume can check it.
    Refuses (CheckpointError) to write non-finite weights or moments.
    """
    path = Path(path)
    bad = non_finite(model)
    if bad:
        raise CheckpointError(
            f"refusing to save {path}: {' and '.join(bad)} hold NaN or infinite values",
            hint="training diverged; lower the learning rate and resume from an earlier checkpoint",
        )
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
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
            "backend": model.backend,
            "precision": getattr(model, "precision", "fp32"),
            "isa": _kernel_path(),
            "data": data,
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256((tmp / f).read_bytes())} for f in files},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb+") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(tmp)
    except (SafetensorError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(path, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    try:
        if path.exists() or path.is_symlink():  # a link is replaced by the folder, never written through
            _discard(old)
            os.rename(path, old)
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failure(path, exc) from None
    _discard(old)
    return path


def _discard(path: Path) -> None:
    """Remove path: a link or file itself (never what a link points to), or a folder and its contents."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


# -- reading ------------------------------------------------------------------------------------


def _locate(path: Path, quiet: bool = False) -> Path:
    """path, or its .old twin when a save was interrupted between its two renames."""
    if path.exists():
        return path
    old = path.with_name(path.name + ".old")
    if old.is_dir():
        time.sleep(SWAP_WAIT)  # a save in progress puts path back within microseconds
        if path.exists():
            return path
        if not quiet:
            warnings.warn(f"{path} is missing; using {old}, left by an interrupted save", stacklevel=4)
        return old
    if path.exists():  # a save put it back, and removed the .old twin, between the two looks above
        return path
    raise CheckpointError(
        f"checkpoint folder {path} does not exist",
        hint="pass the folder a training run wrote, e.g. runs/base/best or runs/base/latest",
    )


def _open_in(dfd: int | None, name: str, folder: Path) -> int:
    """folder/name opened through the folder handle dfd, never through a link; where the system has
    no folder handles (dfd None: Windows), by path with portable.open_nofollow's checks."""
    try:
        # O_NONBLOCK: a FIFO planted in the folder opens at once (and is refused as not a regular
        # file) instead of waiting forever for a writer; reads of regular files do not change
        nonblock = getattr(os, "O_NONBLOCK", 0)  # Windows has no FIFOs and no flag
        if dfd is None:
            return open_nofollow(folder / name, os.O_RDONLY | nonblock)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | nonblock | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder / name} is missing", hint="the checkpoint is incomplete; use another one"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(
                f"{folder / name} is a symbolic link; a checkpoint holds only plain files",
                hint="copy the checkpoint with its files (cp -rL), not links to them",
            ) from None
        raise CheckpointError(
            f"{folder / name} cannot be read: {exc.strerror or exc}", hint="check its permissions"
        ) from None


def _damaged_hint(folder: Path) -> str:
    """Which checkpoint of the run to try instead of the damaged one in folder."""
    other = {"best": "latest instead of best", "latest": "best instead of latest"}.get(Path(folder).name)
    return "the checkpoint is damaged; use another one" + (f" (e.g. {other})" if other else "")


def _read_in(dfd: int | None, name: str, folder: Path, expected: int | None = None) -> bytes:
    """The bytes of folder/name, opened through the folder handle dfd, never through a link."""
    fd = _open_in(dfd, name, folder)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{folder / name} is not a regular file", hint="use another checkpoint")
        limit = MAX_JSON_BYTES if expected is None else expected
        if expected is not None and info.st_size != expected:
            raise CheckpointError(
                f"{folder / name} is truncated or altered: {info.st_size} bytes, expected {expected}",
                hint=_damaged_hint(folder),
            )
        if info.st_size > limit:
            raise CheckpointError(f"{folder / name} is {info.st_size:,} bytes, more than any checkpoint writes")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if expected is not None and len(data) != expected:
        raise CheckpointError(f"{folder / name} changed size while being read", hint="use another checkpoint")
    return data


def _open_folder(folder: Path) -> tuple[int | None, os.stat_result]:
    """A handle on the folder and its identity; without folder handles (Windows), None and its stat."""
    try:
        if not has_folder_handles():
            identity = os.stat(folder)
            if not stat.S_ISDIR(identity.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
            return None, identity
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise CheckpointError(f"{folder} is not a folder", hint="a checkpoint is a folder with meta.json") from None
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint folder {folder} does not exist") from None
    return dfd, os.fstat(dfd)


def _read_once(folder: Path) -> tuple[dict, dict[str, bytes], os.stat_result]:
    dfd, identity = _open_folder(folder)
    try:
        try:
            raw = _read_in(dfd, "meta.json", folder)
        except CheckpointError as exc:
            if str(exc).endswith("is missing"):
                exc.args = (f"{folder} is not a fastchar checkpoint: meta.json is missing",)
                exc.hint = "pass the folder a training run wrote, e.g. runs/base/best or runs/base/latest"
            raise
        meta = validate_meta(parse_json(raw, folder / "meta.json"), folder / "meta.json")
        blobs = {}
        for name, expected in meta["files"].items():
            data = _read_in(dfd, name, folder, expected["bytes"])
            if _sha256(data) != expected["sha256"]:
                raise CheckpointError(
                    f"{folder / name} is corrupt: its sha256 does not match meta.json",
                    hint=_damaged_hint(folder),
                )
            blobs[name] = data
        if dfd is None and not _same_folder(folder, identity):  # files opened by path: all from one folder
            raise CheckpointError(f"{folder} was replaced while being read")
        return meta, blobs, identity
    finally:
        if dfd is not None:
            os.close(dfd)


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stats are of one folder, unchanged: its inode, and its change and modification
    times (a save deletes the old folder, and its next folder may get the same inode number; a
    rename changes the ctime, a file added or removed the mtime)."""
    return (a.st_ino, a.st_dev, a.st_ctime_ns, a.st_mtime_ns) == (b.st_ino, b.st_dev, b.st_ctime_ns, b.st_mtime_ns)


def _same_folder(folder: Path, identity: os.stat_result) -> bool:
    try:
        now = os.stat(folder)
    except OSError:
        return False
    return _same(now, identity)


def _swapped(requested: Path, folder: Path, identity: os.stat_result | None) -> bool:
    """Whether a save replaced the folder since it was opened (then a read starts over)."""
    try:
        now = _locate(requested, quiet=True)
        info = os.stat(now)
    except (CheckpointError, OSError):
        return identity is not None
    return identity is None or now != folder or not _same(info, identity)


def read_checkpoint(path: str | Path) -> tuple[Path, dict, dict[str, bytes]]:
    """The folder used (path or its .old twin), its checked meta.json and the verified bytes of
    every file it lists. Restarts when a concurrent save swaps the folder in the middle."""
    requested = Path(path)
    for attempt in range(READ_ATTEMPTS):
        folder = _locate(requested)
        identity = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                identity = os.stat(folder)
            meta, blobs, opened = _read_once(folder)
            if not _same(opened, identity):
                raise CheckpointError(f"{folder} was replaced while being opened")
            return folder, meta, blobs
        except (CheckpointError, OSError):
            if attempt + 1 == READ_ATTEMPTS or not _swapped(requested, folder, identity):
                raise
            # again at once: a save just put a new folder in place, the next one is a whole save away
    raise AssertionError("unreachable")


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """Locate a checkpoint folder (or its .old twin) and return it with its verified meta.json."""
    folder, meta, _ = read_checkpoint(path)
    return folder, meta


def resolve(path: str | Path, want: str = "best") -> tuple[Path, str | None]:
    """The checkpoint folder that path names, and a note when path was a run folder.

    A folder with meta.json (or a missing one, left to read_meta's .old recovery) is itself the
    checkpoint: (path, None). A run folder holding best/ and latest/ gives its `want` checkpoint, or
    the other one if that is missing, with a note saying which was taken.
    """
    if want not in RUN_CHECKPOINTS:
        raise ValueError(f"want must be one of {RUN_CHECKPOINTS}, got {want!r}")
    path = Path(path)
    meta = os.path.lexists(path / "meta.json")  # of any type: read_checkpoint names what is wrong with it
    if not path.is_dir() or meta or path.with_name(path.name + ".old").is_dir():
        return path, None  # a checkpoint, or one a concurrent save is swapping (read_checkpoint waits)
    other = next(name for name in RUN_CHECKPOINTS if name != want)
    for name in (want, other):
        if (path / name).is_dir() or (path / (name + ".old")).is_dir():
            missing = "" if name == want else f"; it has no {want}/"
            return path / name, f"{path} is a run folder; using its {name} checkpoint {path / name}{missing}"
    time.sleep(SWAP_WAIT)  # a save may have swapped path between the checks above: look once more
    if not path.is_dir() or (path / "meta.json").is_file():
        return path, None
    raise CheckpointError(
        f"{path} is neither a checkpoint nor a run folder: meta.json is missing and it holds no best/ or latest/",
        hint="pass a checkpoint folder (one with meta.json, e.g. runs/base/best) "
        "or the run folder a training run wrote (one holding best/ and latest/, e.g. runs/base)",
    )


def _tensors(data: bytes, where: Path) -> dict[str, np.ndarray]:
    try:
        return load_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{where} cannot be read: {exc}", hint="use another checkpoint") from None


@dataclass
class Stored:
    """A checkpoint as read from disk and checked, before any Model exists (fastchar.model.load builds
    one from it). weights: name -> array in param_specs order; adam_m, adam_v: flat (P,) float32."""

    path: Path  # the checkpoint folder read
    note: str | None  # which checkpoint of a run folder was taken; None for a checkpoint folder
    meta: dict  # the whole checked meta.json (configs, state, backend, precision, data)
    cfg: ModelConfig
    weights: dict[str, np.ndarray]
    adam_m: np.ndarray
    adam_v: np.ndarray
    tokenizer: CharTokenizer | None


def read(path: str | Path, which: str = "best") -> Stored:
    """Read and check a checkpoint folder, or a run folder's `which` checkpoint ("best" or "latest")."""
    path, note = resolve(path, which)
    path, meta, blobs = read_checkpoint(path)
    cfg = ModelConfig.from_dict(meta["model"])
    weights_file, moments_file = path / "model.safetensors", path / "optimizer.safetensors"
    specs = check_model_header(safetensors_header(blobs["model.safetensors"], weights_file), cfg, weights_file)
    size = sum(int(np.prod(shape)) for _, shape in specs)
    check_optimizer_header(safetensors_header(blobs["optimizer.safetensors"], moments_file), size, moments_file)
    chars = None
    if "tokenizer.json" in blobs:
        where = path / "tokenizer.json"
        chars = validate_tokenizer(parse_json(blobs["tokenizer.json"], where), where, cfg.vocab_size)
    tensors = _tensors(blobs.pop("model.safetensors"), weights_file)
    weights = {name: tensors.pop(name) for name, _ in specs}
    moments = _tensors(blobs.pop("optimizer.safetensors"), moments_file)
    arrays = {"params": list(weights.values()), "adam_m": [moments["adam_m"]], "adam_v": [moments["adam_v"]]}
    bad = [role for role, found in arrays.items() if not all(np.isfinite(a).all() for a in found)]
    if bad:
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {' and '.join(bad)}",
            hint="it was saved after training diverged; use another checkpoint",
        )
    tokenizer = CharTokenizer(chars) if chars is not None else None
    return Stored(path, note, meta, cfg, weights, moments["adam_m"], moments["adam_v"], tokenizer)

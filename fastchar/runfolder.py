"""The run folder (`--out`): its lock, its leftovers, its write probe, and what a run will need.

A training run owns its folder for as long as it runs: an advisory lock on `.lock` through the
`filelock` package (flock on POSIX, LockFileEx on Windows, a marker file where neither exists), with
the owner's pid in `.lock.pid`, so a second trainer can name it. Once the lock is held, leftovers of
interrupted saves are cleared: `.NAME.tmp-PID` folders whose process is gone, and `NAME.old` twins
(restored as NAME when NAME itself is missing). Leaves out: checkpoint contents (checkpoint.py) and
the training loop (train.py).

Also here, because they decide whether a run may start at all: the write probe (exclusive,
no-follow), the fingerprint of the training text recorded in checkpoints, and the memory estimate
that refuses a run the machine cannot hold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from fastchar import portable
from fastchar.arena import act_specs, param_specs
from fastchar.config import ModelConfig
from fastchar.errors import ConfigError

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.pid"  # the lock holder's pid: a lock file itself is unreadable to others on Windows
CHECKPOINT_NAMES = ("best", "latest")
# what an interrupted checkpoint save leaves (checkpoint.save): .best.tmp-PID or .latest.tmp-PID, a folder
TEMP_PATTERN = re.compile(r"^\.(?P<name>best|latest)\.tmp-(?P<pid>\d+)$")
CURVES_TEMP = re.compile(r"^\.curves\.png\.tmp-(?P<pid>\d+)\.png$")  # plot.plot_runs' temporary
# the files a save writes into it; a folder holding anything else is not fastchar's and stays
SAVE_FILES = frozenset({"model.safetensors", "optimizer.safetensors", "tokenizer.json", "meta.json"})
# safetensors writes a tensor file through a temporary beside it (Rust's tempfile crate: ".tmp" and six
# random characters), which a kill during that write leaves in the save folder
SAFETENSORS_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")
MIB = 2**20
MAX_META_BYTES = 64 * MIB  # as checkpoint reads: a meta.json larger than this is not one a run wrote


def check_writable(folder: Path, keep: bool = True) -> None:
    """Fail early, before any work, if folder cannot be created or written.

    The probe is a `tempfile.mkstemp` file: a fresh random name created with O_EXCL, so a planted
    file or symlink is never opened, truncated or followed. keep=False removes again the folders the
    probe created, so that a check made before the run's other checks leaves nothing behind.
    """
    folder = Path(folder)
    created = []  # the folders this probe makes, outermost last
    for parent in (folder, *folder.parents):
        if parent.exists() or parent.is_symlink():
            break
        created.append(parent)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"the output folder {folder} is not writable ({exc.strerror or exc})",
            hint="pass a folder you can write to with --out DIR",
        ) from None
    finally:
        if not keep:
            for made in created:
                with contextlib.suppress(OSError):
                    made.rmdir()


def existing_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints (best, latest, or their .old twins) a run folder already holds."""
    found = []
    for name in CHECKPOINT_NAMES:
        for candidate in (folder / name, folder / f"{name}.old"):
            if (candidate / "meta.json").is_file():
                found.append(candidate)
                break
    return found


def recorded_run_id(checkpoint: Path) -> str | None:
    """The run id a checkpoint's meta.json records (None: none, or unreadable). Read without
    following a link to meta.json and without blocking on anything but a regular file."""
    try:
        fd = portable.open_nofollow(checkpoint / "meta.json", os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_META_BYTES:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            run_id = json.loads(f.read()).get("state", {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(fd)
    return run_id if isinstance(run_id, str) else None


def check_fresh(folder: Path, overwrite: bool = False) -> None:
    """A fresh run may not replace another run's checkpoints unless told to (--overwrite)."""
    found = existing_checkpoints(folder)
    if found and not overwrite:
        names = " and ".join(p.name for p in found)
        raise ConfigError(
            f"{folder} already holds a run ({names}); a fresh run would replace it",
            hint=f"continue it with `fastchar train --resume {found[-1]}`, pass --overwrite to start over "
            f"there, or choose another --out DIR",
        )
    metrics = folder / "metrics.jsonl"
    if not found and not overwrite and (metrics.is_symlink() or (metrics.is_file() and metrics.stat().st_size)):
        raise ConfigError(
            f"{folder} already holds a run's metrics.jsonl (a run that ended before its first checkpoint); "
            "a fresh run would add its records to them",
            hint="pass --overwrite to start over there, or choose another --out DIR",
        )


def check_metrics_file(folder: Path) -> None:
    """Refuse, before any work, a metrics.jsonl that a run could not append to: a FIFO (opening it
    would wait forever for a reader), a device, a folder or a link (never written through)."""
    metrics = Path(folder) / "metrics.jsonl"
    try:
        info = os.lstat(metrics)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        raise ConfigError(
            f"{metrics} is {kind}; a run appends its records to a plain file of that name",
            hint="move it elsewhere, or pass another --out DIR",
        )


def holds_run(folder: Path) -> bool:
    """Whether folder holds a run (its checkpoints, metrics or config) or one is starting there (the
    lock's pid file), or is not a folder at all: a run without --out goes elsewhere."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return False
    if not folder.is_dir():
        return True
    marks = ("metrics.jsonl", "config.toml", OWNER_NAME)
    return bool(existing_checkpoints(folder)) or any((folder / m).exists() or (folder / m).is_symlink() for m in marks)


def next_free(base: Path) -> Path:
    """base if it holds no run, else the first of base-2, base-3, ... that holds none (runs without
    --out never collide: the README's first command can be run twice)."""
    base = Path(base)
    candidate, n = base, 1
    while holds_run(candidate):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def clear_run(folder: Path) -> None:
    """Remove a previous run's checkpoints, metrics, curves and TensorBoard events (--overwrite).

    Called under the run's lock."""
    for name in CHECKPOINT_NAMES:
        for candidate in (folder / name, folder / f"{name}.old"):
            if candidate.is_symlink() or candidate.is_file():
                candidate.unlink()
            elif candidate.is_dir():
                shutil.rmtree(candidate)
    for stale in [folder / "metrics.jsonl", folder / "curves.png", *folder.glob("events.out.tfevents.*")]:
        if stale.is_symlink() or stale.is_file():
            stale.unlink()


def _pid_alive(pid: int) -> bool:
    return portable.pid_alive(pid)


def clean_stale(folder: Path) -> list[Path]:
    """Remove what interrupted saves left in folder; returns the paths removed or restored.

    `.best.tmp-PID` / `.latest.tmp-PID` folders of a process that no longer runs, holding nothing but
    the files a save writes, are removed; anything else is left alone. `NAME.old` is restored as NAME
    when NAME is missing (a kill between the two renames of a save) and removed otherwise.
    """
    touched = []
    if not folder.is_dir():
        return touched
    for entry in sorted(folder.iterdir()):
        match = TEMP_PATTERN.match(entry.name)
        if match and _save_leftover(entry) and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
        match = CURVES_TEMP.match(entry.name)
        if match and entry.is_file() and not entry.is_symlink() and not _pid_alive(int(match["pid"])):
            entry.unlink()  # a plot killed before its rename
            touched.append(entry)
    for name in CHECKPOINT_NAMES:
        path, old = folder / name, folder / f"{name}.old"
        if _save_leftover(old):  # a folder of checkpoint files, not a user's folder of that name
            if path.exists() or path.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, path)
            touched.append(old)
    return touched


def check_names_free(folder: Path) -> None:
    """Refuse a run folder where best/, latest/ or their .old twins are something other than fastchar
    checkpoints (a save would replace them): a user's folder of that name is never touched."""
    for name in CHECKPOINT_NAMES:
        for path in (folder / name, folder / f"{name}.old"):
            linked = path.is_symlink() and (path / "meta.json").is_file()  # replaced by a save, never followed
            if (path.exists() or path.is_symlink()) and not linked and not _save_leftover(path):
                raise ConfigError(
                    f"{path} is not a fastchar checkpoint, but a run saves its checkpoints under that name",
                    hint="move it elsewhere, or pass another --out DIR",
                )


def _save_leftover(entry: Path) -> bool:
    """Whether entry is a folder (not a link) holding only files a checkpoint save writes."""
    if entry.is_symlink() or not entry.is_dir():
        return False
    try:
        return all(
            (p.name in SAVE_FILES or SAFETENSORS_TEMP.match(p.name)) and p.is_file() and not p.is_symlink()
            for p in entry.iterdir()
        )
    except OSError:
        return False


_HELD: set[RunLock] = set()  # held locks stay alive (and held) until released or the process exits


class RunLock:
    """An advisory lock on a run folder, held while a run trains in it (`with RunLock(folder):`).

    `.lock` is the lock file (filelock.FileLock: flock on POSIX, LockFileEx on Windows, a soft marker
    file where neither exists); `.lock.pid` names the owner's pid. Advisory: it stops a second
    fastchar trainer, not other programs. The system drops the lock when the process dies, so a
    killed run never leaves it held (the soft marker of a dead process is broken by filelock).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.lock: object | None = None  # the held filelock.FileLock (None: not held)

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        path = self.folder / LOCK_NAME
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ConfigError(
                f"cannot lock the run folder {self.folder}: {path} is not a regular file",
                hint=f"remove {path} if it is not a regular file, or pass another --out DIR",
            )
        lock = FileLock(str(path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            holder = self.holder() or "unknown"
            raise ConfigError(
                f"the run folder {self.folder} is in use by another fastchar run (process {holder})",
                hint=f"wait for process {holder} to finish or stop it, or pass another --out DIR",
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"cannot lock the run folder {self.folder}: {path} cannot be opened ({exc.strerror or exc})",
                hint=f"remove {path} if it is not a regular file, or pass another --out DIR",
            ) from None
        self.lock = lock
        _HELD.add(self)
        with contextlib.suppress(OSError):  # the pid is a courtesy to the next trainer; the lock is what counts
            write_text(self.folder / OWNER_NAME, f"{os.getpid()}\n")
        return self

    def holder(self) -> str | None:
        """The pid .lock.pid names (None if unreadable)."""
        try:
            fd = portable.open_nofollow(self.folder / OWNER_NAME, os.O_RDONLY)
        except OSError:
            return None
        with open(fd, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
        return text if text.isdigit() else None

    def release(self) -> None:
        if self.lock is not None:
            with contextlib.suppress(OSError):
                if self.holder() == str(os.getpid()):
                    os.unlink(self.folder / OWNER_NAME)
            self.lock.release()
            _HELD.discard(self)
            self.lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def write_text(path: Path, text: str) -> None:
    """Write a small UTF-8 file atomically (write_bytes)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes, sync: bool = False) -> None:
    """Write a file atomically: a temporary beside it, then a rename that replaces a planted link
    itself, never its target (sync: on disk before the rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = portable.open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with open(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def data_record(path: Path, text: str) -> dict:
    """What a checkpoint records of its training text: absolute path, size in bytes, sha256."""
    raw = text.encode("utf-8")
    return {"path": str(Path(path).resolve()), "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


# -- memory -------------------------------------------------------------------------------------

# Beyond the arenas: the interpreter, NumPy/Numba/BLAS and the corpus (about 50 MiB measured for
# Tiny Shakespeare), plus room for the temporaries of the NumPy reference kernels (a fraction of
# the activations).
BASE_BYTES = 200 * MIB
TEMPORARY_FRACTION = 0.25


def _per_layer(size_of, cfg: ModelConfig) -> int:
    """size_of(cfg) computed from one- and two-layer tables: every block has the same entries, so the
    size is linear in n_layer; no table of n_layer entries is ever built (an absurd --n-layer is
    refused at once, not after building millions of entries)."""
    one = size_of(dataclasses.replace(cfg, n_layer=1))
    two = size_of(dataclasses.replace(cfg, n_layer=2))
    return one + (cfg.n_layer - 1) * (two - one)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of cfg, from the parameter table (nothing is allocated)."""
    return _per_layer(lambda c: sum(math.prod(shape) for _, shape in param_specs(c)), cfg)


def training_bytes(cfg: ModelConfig, batch: int, itemsize: int = 4) -> tuple[int, int]:
    """(fixed, per sequence) bytes a training run needs: 4 parameter-shaped arenas and the decay
    mask, then activations and their gradients (2 arenas of act_specs) per sequence of the batch."""
    fixed = 4 * param_count(cfg) * itemsize + param_count(cfg) + BASE_BYTES
    per_seq = _per_layer(lambda c: sum(math.prod(shape) for _, shape in act_specs(c, 1, c.ctx)), cfg) * itemsize
    return fixed, int(per_seq * (2 + TEMPORARY_FRACTION))


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(cfg: ModelConfig, batch: int, available: int | None = None) -> int:
    """Refuse a run whose arenas exceed the memory available now; returns the estimate in bytes."""
    fixed, per_seq = training_bytes(cfg, batch)
    need = fixed + batch * per_seq
    available = available_bytes() if available is None else available
    if available is None or need <= available:
        return need
    fits = (available - fixed) // per_seq
    what_fits = (
        f"at most --batch {fits} fits with this model"
        if fits >= 1
        else "even --batch 1 does not fit: choose a smaller model (--d-model, --n-layer, --ctx)"
    )
    raise ConfigError(
        f"this run needs about {need / MIB:,.0f} MiB (parameters and Adam {fixed / MIB:,.0f} MiB, activations "
        f"{batch * per_seq / MIB:,.0f} MiB for batch {batch}) but only {available / MIB:,.0f} MiB is available",
        hint=what_fits,
    )

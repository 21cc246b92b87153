"""Data parallelism across processes and machines, on MPI (mpi4py): one model, N ranks.

`world()` is what the Trainer talks to. Outside an MPI launcher it is a `World`: one process, every
collective the identity, no mpi4py needed. Under `mpiexec -n N` (N > 1) it is an `MPIWorld`:

- rank 0's weights and training state are broadcast at the start, so every rank begins identical;
- the gradient buffer (one flat array) is summed in place by one Allreduce per optimizer step,
  after which every rank runs the same clip and AdamW on the same numbers;
- a checksum of the weights and Adam's moments is compared across ranks at every evaluation;
- every collective is non-blocking and polled against a deadline (FASTCHAR_MPI_TIMEOUT seconds,
  default 120): if a rank dies, hangs or loses its network, the others print an error and end the
  whole job with MPI_Abort instead of waiting forever.

What it leaves out: the data order and the loss scaling (train.py), launching processes (mpiexec
does that), and any MPI other than through mpi4py. Errors every rank raises together are marked
`collective`, so that rank 0 alone reports them; an error only one rank hit ends the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fastchar.errors import ConfigError, FastcharError

# Variables an MPI launcher sets in each process it starts: (size, rank) per launcher family.
LAUNCH_ENV = (
    ("PMI_SIZE", "PMI_RANK"),  # MPICH's hydra, Intel MPI, srun --mpi=pmi2
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI's mpirun
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK"),  # MVAPICH
    (None, "PMIX_RANK"),  # PMIx launchers (Open MPI 5, srun --mpi=pmix)
)
TIMEOUT_ENV = "FASTCHAR_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 120.0  # seconds a rank waits in one collective for the others before ending the job
ABORT_GRACE_SECONDS = 0.5  # between a rank's last words and MPI_Abort
SPIN_SECONDS = 0.01  # poll without pausing this long (an Allreduce of the base model takes ~0.3-1 ms) ...
NAP_SECONDS = 0.0005  # ... then pause this long between polls, leaving the core to the others
EXIT_RANK_FAILURE = 1
INSTALL_HINT = (
    'install the MPI extra in this environment: pip install -e ".[mpi]" (or pip install mpi4py mpich), '
    "then launch with that environment's mpiexec: mpiexec -n N fastchar train ..."
)


def launch_env() -> tuple[int | None, int | None, str | None]:
    """(size, rank, variable) as the launcher announced them, or (None, None, None) outside one."""
    for size_var, rank_var in LAUNCH_ENV:
        if rank_var in os.environ or (size_var and size_var in os.environ):
            size = int(os.environ[size_var]) if size_var and os.environ.get(size_var, "").isdigit() else None
            rank = int(os.environ[rank_var]) if os.environ.get(rank_var, "").isdigit() else None
            return size, rank, size_var or rank_var
    return None, None, None


def launch_rank() -> int:
    """This process's rank as the launcher announced it (0 outside a launcher); needs no MPI."""
    return launch_env()[1] or 0


def mark_collective(exc: BaseException) -> BaseException:
    """Mark exc as raised by every rank at the same point: rank 0 alone reports it."""
    exc.collective = True  # type: ignore[attr-defined]
    return exc


def is_collective(exc: BaseException) -> bool:
    return bool(getattr(exc, "collective", False))


class World:
    """One process: every collective is the identity. The interface the Trainer calls.

    Attributes: rank, size (ranks), local_rank and local_size (ranks on this host), host, is_root,
    comm_seconds (time spent in gradient Allreduces so far; 0 here).
    """

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    is_root = True
    comm_seconds = 0.0

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self.hint = ""  # what to do after a rank failure; the Trainer sets it to name its checkpoint
        self.context = ""  # where the run is ("at step 120"), for that error message

    def default_threads(self, cores: int) -> int:
        """Threads for this rank so that the ranks of one host never exceed its cores."""
        return cores

    def sum_(self, buf: npt.NDArray[np.floating]) -> None:
        """Sum buf (any shape, float32 or float64) over the ranks, in place."""

    def sum_scalars(self, values: list[float]) -> list[float]:
        """Sum each of a few numbers over the ranks (float64)."""
        return [float(v) for v in values]

    def from_root(self, value: float) -> float:
        """Rank 0's value of a number, on every rank."""
        return float(value)

    def bcast_(self, *arrays: np.ndarray) -> None:
        """Overwrite each array with rank 0's contents (same shapes and dtypes on every rank)."""

    def bcast(self, obj: Any) -> Any:
        """Rank 0's obj (anything picklable) on every rank."""
        return obj

    def allgather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        return [obj]

    def root_only(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on rank 0; every rank returns its result or raises its error (collective)."""
        return fn(*args)

    def check_same(self, what: str, facts: dict) -> None:
        """Raise a ConfigError on every rank if facts (a JSON-able dict) differ between ranks."""

    def check_in_sync(self, step: int, *arrays: np.ndarray) -> None:
        """Raise on every rank if the arrays (weights, moments) differ between ranks."""

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def abort(self, code: int) -> None:
        """End every rank of the job now with exit status code (nothing to do in one process)."""

    def describe(self) -> dict:
        return {"mpi": None, "ranks": 1, "hosts": [self.host]}


class MPIWorld(World):
    """N > 1 ranks of one job under an MPI launcher; collectives through mpi4py, with a deadline."""

    def __init__(self, comm: Any, MPI: Any, timeout: float) -> None:  # noqa: N803 (the module's name)
        super().__init__()
        self.MPI = MPI
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self.host = MPI.Get_processor_name()
        self.timeout = timeout
        self.comm_seconds = 0.0
        self.context = "starting"
        self.hosts = self.allgather(self.host)
        # The ranks on this host share its cores. MPI_Comm_split_type(SHARED) finds the ranks that
        # share memory, but not when shared memory is switched off (MPIR_CVAR_NOLOCAL=1, ranks
        # talking TCP on one host): then each rank would take every core. So group by host name,
        # and keep the larger of the two groups.
        shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
        by_name = comm.Split(sorted(set(self.hosts)).index(self.host), self.rank)
        self.local = by_name if by_name.Get_size() >= shared.Get_size() else shared
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        sys.excepthook = self._excepthook

    # -- waiting with a deadline --------------------------------------------------------------

    def _wait(self, request: Any, what: str) -> None:
        """Poll request until it completes; past the deadline, report and end the job."""
        if request.Test():
            return
        start = time.monotonic()
        while not request.Test():
            waited = time.monotonic() - start
            if waited > self.timeout:
                self._give_up(what)
            if waited > SPIN_SECONDS:
                time.sleep(NAP_SECONDS)

    def _give_up(self, what: str) -> None:
        sys.stdout.flush()
        print(
            f"error: rank {self.rank} of {self.size} ({self.host}): no answer from the other ranks within "
            f"{self.timeout:g} s while {what} ({self.context}); a rank died, was stopped or lost its network",
            file=sys.stderr,
        )
        hint = self.hint or "the last checkpoint rank 0 wrote is intact; resume from it with --resume"
        print(f"hint: {hint}; {TIMEOUT_ENV}=SECONDS changes the limit", file=sys.stderr, flush=True)
        self.abort(EXIT_RANK_FAILURE)

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)  # the launcher forwards what this rank printed before it ends the job
        self.comm.Abort(code)

    def _excepthook(self, kind: type, exc: BaseException, tb: Any) -> None:
        """An uncaught exception on one rank ends every rank, instead of leaving them waiting."""
        if not (self.rank and is_collective(exc)):
            sys.__excepthook__(kind, exc, tb)
        if not is_collective(exc):
            # said here, not left to MPI's own abort message, which the launcher may cut off
            print(f"error: rank {self.rank} of {self.size} failed; ending every rank (MPI_Abort)", file=sys.stderr)
            self.abort(EXIT_RANK_FAILURE)

    # -- collectives --------------------------------------------------------------------------

    def sum_(self, buf: npt.NDArray[np.floating]) -> None:
        t0 = time.perf_counter()
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "summing the gradients")
        self.comm_seconds += time.perf_counter() - t0

    def sum_scalars(self, values: list[float]) -> list[float]:
        buf = np.array(values, np.float64)
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "summing the losses")
        return [float(v) for v in buf]

    def from_root(self, value: float) -> float:
        buf = np.array([value], np.float64)
        self._wait(self.comm.Ibcast(buf, root=0), "agreeing on the clock")
        return float(buf[0])

    def bcast_(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            self._wait(self.comm.Ibcast(a, root=0), "broadcasting rank 0's weights")

    def bcast(self, obj: Any) -> Any:
        data = pickle.dumps(obj) if self.is_root else b""
        n = np.array([len(data)], np.int64)
        self._wait(self.comm.Ibcast(n, root=0), "broadcasting from rank 0")
        buf = np.frombuffer(data, np.uint8).copy() if self.is_root else np.empty(int(n[0]), np.uint8)
        self._wait(self.comm.Ibcast(buf, root=0), "broadcasting from rank 0")
        return obj if self.is_root else pickle.loads(buf.tobytes())

    def allgather(self, obj: Any, comm: Any = None) -> list:
        comm = comm or self.comm
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        size, counts = np.array([data.size], np.int64), np.zeros(comm.Get_size(), np.int64)
        self._wait(comm.Iallgather(size, counts), "gathering from every rank")
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty(int(counts.sum()), np.uint8)
        request = comm.Iallgatherv(data, [out, counts.tolist(), offsets.tolist(), self.MPI.BYTE])
        self._wait(request, "gathering from every rank")
        return [pickle.loads(out[o : o + c].tobytes()) for o, c in zip(offsets, counts, strict=True)]

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "waiting for every rank")

    def root_only(self, fn: Callable[..., Any], *args: Any) -> Any:
        error: BaseException | None = None
        outcome: tuple = ("ok", None)
        if self.is_root:
            try:
                outcome = ("ok", fn(*args))
            except (FastcharError, OSError) as exc:
                error, outcome = exc, ("error", str(exc), getattr(exc, "hint", ""))
        outcome = self.bcast(outcome)
        if outcome[0] == "ok":
            return outcome[1]
        if error is not None:
            raise mark_collective(error)
        raise mark_collective(FastcharError(f"rank 0 failed: {outcome[1]}", hint=outcome[2]))

    # -- consistency checks -------------------------------------------------------------------

    def check_same(self, what: str, facts: dict) -> None:
        flat = {}
        for key, value in json.loads(json.dumps(facts, default=str)).items():  # name nested fields: train.lr
            flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
        everyone = self.allgather(flat)
        for rank, theirs in enumerate(everyone):
            differ = sorted(k for k in set(theirs) | set(everyone[0]) if theirs.get(k) != everyone[0].get(k))
            if differ:
                raise mark_collective(
                    ConfigError(
                        f"rank {rank} ({self.hosts[rank]}) and rank 0 ({self.hosts[0]}) differ in {what}: "
                        + ", ".join(f"{k}: {theirs.get(k)!r} against {everyone[0].get(k)!r}" for k in differ)[:800],
                        hint="every rank needs the same fastchar version, Python environment, options and data "
                        "file (see docs/distributed.md)",
                    )
                )

    def check_in_sync(self, step: int, *arrays: np.ndarray) -> None:
        mine = [zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for a in arrays]
        everyone = self.allgather(mine)
        drifted = [r for r, sums in enumerate(everyone) if sums != everyone[0]]
        if drifted:
            raise mark_collective(
                FastcharError(
                    f"after step {step} the weights of rank(s) {drifted} differ from rank 0's: the ranks drifted apart",
                    hint="every rank must run the same backend and fastchar version; hosts with different CPUs "
                    "can round differently. Resume from the last checkpoint (rank 0 wrote it before the drift "
                    "was seen)",
                )
            )

    def default_threads(self, cores: int) -> int:
        """Cores of this host shared out among its ranks; a rank bound to its own cores keeps them."""
        mine = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(cores))
        sets = [set(s) for s in self.allgather(sorted(mine), comm=self.local)]
        disjoint = sum(len(s) for s in sets) == len(set().union(*sets))
        if disjoint:  # mpiexec bound each rank to its own cores (e.g. -bind-to core)
            return max(1, len(mine))
        return max(1, len(set().union(*sets)) // self.local_size)

    def describe(self) -> dict:
        return {
            "mpi": " ".join(self.MPI.Get_library_version().split()[:3]),
            "ranks": self.size,
            "hosts": self.hosts,
            "timeout_s": self.timeout,
        }


_world: World | None = None


def world() -> World:
    """The ranks this process belongs to: an MPIWorld under `mpiexec -n N` (N > 1), else a World."""
    global _world
    if _world is None:
        _world = _connect()
    return _world


def current() -> World | None:
    """The world if world() has been called, else None (no MPI started)."""
    return _world


def _timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise mark_collective(
            ConfigError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}", hint="e.g. 120")
        )
    return value


def _connect() -> World:
    size, _, variable = launch_env()
    if variable is None or size == 1:
        return World()
    timeout = _timeout()
    try:
        import mpi4py

        mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI
        from mpi4py import MPI
    except ImportError:
        raise mark_collective(
            ConfigError(
                f"this process was started by an MPI launcher ({variable}={os.environ[variable]}) "
                "but mpi4py is not installed",
                hint=INSTALL_HINT,
            )
        ) from None
    comm = MPI.COMM_WORLD
    if size is not None and comm.Get_size() != size:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        raise mark_collective(
            ConfigError(
                f"the launcher started {size} processes ({variable}={size}) but mpi4py's MPI "
                f"({' '.join(MPI.Get_library_version().split()[:3])}) sees a world of {comm.Get_size()}: "
                "mpiexec and the MPI library mpi4py uses do not belong together",
                hint=f"launch with the mpiexec of this Python environment: {mpiexec} -n {size} fastchar train ...",
            )
        )
    if comm.Get_size() == 1:
        return World()
    return MPIWorld(comm, MPI, timeout)


def facts_of_run(model: Any, dataset: Any, cfg: Any) -> dict:
    """What must be the same on every rank: versions, configs, backend and the data's digest."""
    from fastchar import __version__

    digest = hashlib.sha256()
    for split in ("train", "val"):
        digest.update(np.ascontiguousarray(dataset.splits[split]).view(np.uint8))
    return {
        "fastchar": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "backend": model.backend,
        "dtype": str(model.dtype),
        "model": model.cfg.to_dict(),
        "train": {k: v for k, v in cfg.to_dict().items() if k != "out"},
        "data_sha256": digest.hexdigest(),
    }

"""One thread pool, sized on purpose: OpenMP runs N threads, BLAS runs 1.

The Numba kernels (threading layer "omp") and the Cython kernels share one libgomp pool of N
threads, and both split every matrix product into single-threaded sgemm calls. BLAS is therefore
pinned to 1 thread (threadpoolctl): on 2 cores a second pool of spinning OpenBLAS threads made a
training step 10-40x slower. The NumPy reference backend follows the same rule (it is the ground
truth, not the fast path). `thread_report` says what is active.

Known interaction: once Numba's "omp" pool has started, PyTorch in the same process runs ~50x
slower (measured: a 35 ms step took 2 s). The benchmarks therefore run PyTorch in a child process;
NUMBA_THREADING_LAYER=workqueue avoids it at a cost to the Numba backend (29k -> 18k tok/s, B=12).
"""

from __future__ import annotations

import os

from fastchar.errors import ConfigError

_blas_limit = None  # keeps threadpoolctl's limit alive
_configured: int | None = None


def cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """The cores, shared out among the ranks on this host under mpiexec (see distributed.py)."""
    from fastchar.distributed import world

    return world().default_threads(cores())


def set_threads(n: int | None = None) -> int:
    """n OpenMP threads for Numba and the Cython kernels (default_threads()), BLAS 1; returns n."""
    global _blas_limit, _configured
    n = default_threads() if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--threads must be a positive integer, got {n!r}", hint=f"this machine has {cores()} cores")
    os.environ["OMP_NUM_THREADS"] = str(n)
    from fastchar.backends import thread_hooks

    for backend in thread_hooks():  # numba's prange pool, the Cython kernels' OpenMP loops
        backend.set_threads(n)
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, the one the kernels call, so it is limited too)
    from threadpoolctl import threadpool_limits

    _blas_limit = threadpool_limits(limits=1, user_api="blas")
    _configured = n
    return n


def ensure_threads() -> int:
    """Apply the default thread policy once, unless set_threads already ran."""
    return _configured if _configured is not None else set_threads()


def thread_report() -> dict:
    """What is active: Numba's threading layer and threads, OpenMP's threads, and each BLAS."""
    report: dict = {
        "cores": cores(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "replaced_OPENBLAS_CORETYPE": os.environ.get("FASTCHAR_REPLACED_OPENBLAS_CORETYPE"),
    }
    from fastchar.backends import thread_hooks

    report["openmp"] = None
    for backend in thread_hooks():
        report.update(backend.thread_info())
    from threadpoolctl import threadpool_info

    report["blas"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "version", "architecture", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    report["openmp_runtimes"] = [
        {k: info.get(k) for k in ("internal_api", "num_threads", "filepath")}
        for info in threadpool_info()
        if info.get("user_api") == "openmp"
    ]
    return report


def _use(n: int) -> None:
    """Switch the kernels' pools to n threads (no checks, no BLAS change: set_threads did those)."""
    from fastchar.backends import thread_hooks

    for backend in thread_hooks():
        backend.set_threads(n)


class StepThreads:
    """Chooses, step by step, between the configured threads and one, by measured step time.

    The kernels' threads meet at barriers many times a step. When another process takes a core, the
    thread that shares it with that process arrives late at every barrier, and a step on 2 threads
    became 5-17x slower (base model, 2-core Zen 4: 21,600 tokens/s quiet, 4,100 beside one busy loop,
    1,500 beside two compiles) while one thread kept its own core (13,400). So now and then (after
    `first` steps, then twice as far apart each time up to `every`) and at once when steps slow down
    by half (against the first steps' pace, then the last decision's), the other thread count runs
    `probe` steps and the faster one is kept.
    The thread count changes no result: every kernel sums the same way on 1 or N threads.

    Use: `before()` ahead of a step, `after(seconds)` once it is done. `switches` counts changes.
    """

    def __init__(self, threads: int, first: int = 40, every: int = 640, probe: int = 3) -> None:
        self.full, self.first, self.every, self.probe = threads, first, every, probe
        self._interval = first
        self.current = threads
        self.switches = 0
        self._times: dict[int, list[float]] = {threads: [], 1: []}
        self._since = 0  # steps since the last decision
        self._probing = 0  # steps of the other count left to run
        self._settled: float | None = None  # median step time at the last decision

    @property
    def active(self) -> bool:
        return self.full > 1

    def _median(self, n: int) -> float:
        times = sorted(self._times[n][-self.probe :])
        return times[len(times) // 2]

    def before(self) -> None:
        if self.active and self._probing == 0 and self._due():
            self._probing = self.probe
            _use(self._other())

    def after(self, seconds: float) -> str | None:
        """Record a step's time; returns a line to log when the thread count changed."""
        if not self.active:
            return None
        if self._probing:
            self._times[self._other()].append(seconds)
            self._probing -= 1
            if self._probing == 0:
                return self._decide()
            return None
        self._times[self.current].append(seconds)
        self._since += 1
        return None

    def _other(self) -> int:
        return 1 if self.current == self.full else self.full

    def _due(self) -> bool:
        if len(self._times[self.current]) < self.probe + 2:  # the first two steps warm up
            return False
        if self._settled is None:  # the pace to compare with until the first probe
            self._settled = self._median(self.current)
        if self._since >= self._interval:
            return True
        return self._settled is not None and self._median(self.current) > 1.5 * self._settled

    def _decide(self) -> str | None:
        other = self._other()
        mine, theirs = self._median(self.current), self._median(other)
        self._since = 0
        line = None
        if theirs < 0.9 * mine:
            line = (
                f"threads: {other} ({self.current} ran {1e3 * mine:.1f} ms/step, {other} "
                f"{1e3 * theirs:.1f} ms/step{'; another process may be using a core' if other == 1 else ''})"
            )
            self.current, mine = other, theirs
            self.switches += 1
            self._interval = self.first
        else:
            self._interval = min(2 * self._interval, self.every)
        _use(self.current)
        self._times[self.current] = self._times[self.current][-self.probe :]
        self._settled = mine
        return line

    def restore(self) -> None:
        """Back to the configured threads (after training: evaluation and sampling use them all)."""
        if self.active and self.current != self.full or self._probing:
            _use(self.full)
        self.current, self._probing = self.full, 0

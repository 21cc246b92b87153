"""Shared benchmark plumbing: timing, machine facts, the JSONL record and markdown tables."""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PEAK_C = Path(__file__).resolve().parent / "peak.c"


class ChildDied(RuntimeError):
    """The child process of `isolated` ended without a result (a crash in native code)."""


def isolated(fn: Callable, *args: object) -> object:
    """fn(*args) in a fresh interpreter (multiprocessing "spawn"), for PyTorch: its OpenMP runtime
    slows down badly next to Numba's started "omp" pool (see fastchar/threads.py). A child that dies
    (an abort in native code) raises ChildDied here instead of leaving the caller waiting forever,
    as multiprocessing.Pool did."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as exc:
            raise ChildDied(f"{getattr(fn, '__name__', fn)}: the child process died") from exc


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over repeats calls, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def machine(threads: int) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
    }


def append_record(name: str, record: dict) -> Path:
    """Append one JSON line to benchmarks/results/NAME.jsonl (commit, machine, config, figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.jsonl"
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": git_sha(), **record}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return path


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table; numbers formatted with thousands separators."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def build_peak(folder: str | Path, compiler: str, *flags: str) -> str:
    """benchmarks/peak.c compiled with `compiler` -O3 -fopenmp and flags into folder: the program's path.
    Raises OSError without the compiler, subprocess.CalledProcessError (its stderr) if the build fails."""
    exe = str(Path(folder) / "peak")
    subprocess.run([compiler, "-O3", "-fopenmp", *flags, str(PEAK_C), "-o", exe], check=True, capture_output=True,
                   text=True)  # fmt: skip
    return exe


def peak_round_trip(exe: str) -> float | None:
    """A cache line's round trip between two threads in ns (`exe --latency`, exe from build_peak), or None."""
    m = re.search(r"([\d.]+) ns", subprocess.run([exe, "--latency"], capture_output=True, text=True).stdout)
    return float(m.group(1)) if m else None

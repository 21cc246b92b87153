"""Training beside another process: `fastchar train` quiet, beside one busy loop, and beside two.

Each row is one `fastchar train` run (base model, cython, --steps, no evaluation but the first and the
last) on the kernel path given by FASTCHAR_ISA (every path this CPU runs, by default); tokens/s is
the trainer's own figure, taken from its last log line ("done: ... tok/s"). The busy loops are
`python -c "while True: pass"`, started before the run and killed after it. With the thread
chooser (fastchar.threads.StepThreads) the trainer moves to one thread when a second one only
waits at barriers; FASTCHAR_FIXED_THREADS=1 turns the chooser off, for the comparison.

    python -m benchmarks.bench_contention [--steps 400] [--isa avx512 avx2] [--busy 0 1 2] [--fixed]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

from benchmarks.common import cpu_model, table
from fastchar import isa


def train(steps: int, path: str, busy: int, fixed: bool) -> tuple[float, int]:
    """tokens/s of one run and how many times it changed its thread count."""
    env = dict(os.environ, FASTCHAR_ISA=path)
    if fixed:
        env["FASTCHAR_FIXED_THREADS"] = "1"
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "fastchar", "train", "--steps", str(steps), "--batch", "12",
                   "--eval-every", str(10 * steps), "--eval-batches", "2", "--log-every", "50",
                   "--sample-chars", "0", "--out", out]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    tok_s = re.findall(r"done: .*\| ([\d,]+) tok/s", done.stdout)
    return float(tok_s[-1].replace(",", "")), done.stdout.count("\nthreads: ")


def main(argv: list[str] | None = None) -> list[list[object]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    p.add_argument("--isa", nargs="+", default=None, help="kernel paths (default: every path this CPU runs)")
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1, 2], help="busy loops beside the run (default 0 1 2)")
    p.add_argument("--fixed", action="store_true", help="also run with the thread chooser off")
    args = p.parse_args(argv)
    paths = args.isa or [name for name in isa.runnable() if name != "generic"]
    print(f"machine: {cpu_model()}; base model, B = 12, {args.steps} steps, 2 threads")
    rows = []
    for path in paths:
        for busy in args.busy:
            for fixed in (False, True) if args.fixed else (False,):
                tok_s, switches = train(args.steps, path, busy, fixed)
                rows.append([path, busy, "fixed 2" if fixed else "chooser", f"{tok_s:,.0f}", switches])
                print(rows[-1], flush=True)
    print(table(["path", "busy loops", "threads", "tok/s", "thread changes"], rows))
    return rows


if __name__ == "__main__":
    main()

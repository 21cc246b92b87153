"""Two source trees of fastchar side by side: training tokens/s and sampling chars/s, alternating.

    python -m benchmarks.compare_trees OLD_TREE NEW_TREE [--rounds 2] [--backend cython]
                                       [--precision fp32 bf16] [--threads N] [--jobs train ...]

Each measurement runs in a fresh process with PYTHONPATH set to one tree (each tree needs its
extensions built in place: `python setup.py build_ext --inplace`), the two trees back to back for
every job (which one first alternates round by round), so both see the same machine. It uses only
the public API that every version has (Model, forward, backward, AdamW, generate), imports fastchar
first (as the `fastchar` command does) and prints the median of the rounds (and their range) and the
ratio NEW / OLD. Training: the base model, synthetic tokens, 45 steps of forward + backward + clip +
AdamW, the median of the last 35 step times.
Sampling: 20,000 characters minus 100 (start-up does not count), temperature 0.8, with and without
top-p 0.9, and 64 streams made together (`num_samples=64`, 400 characters each minus 100), the median
of 3. Every job runs once per --precision (bf16: the matrix products on bf16-rounded inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

JOBS = (("train", 12), ("train", 64), ("sample", 20000), ("sample_p", 20000), ("sample64", 400))


def measure(what: str, n: int, backend: str, precision: str = "fp32", threads: int | None = None) -> float:
    """One figure in this process: training tokens/s at batch n, or sampling chars/s for n characters
    (sample64: n characters in each of 64 streams)."""
    import fastchar  # noqa: I001  (before NumPy, as the `fastchar` command does)
    import numpy as np
    from fastchar.optim import AdamW

    if threads:
        fastchar.set_threads(threads)
    model = fastchar.Model(fastchar.ModelConfig(vocab_size=65), backend=backend, seed=0, precision=precision)
    rng = np.random.default_rng(0)
    if what == "train":
        optimizer = AdamW(model, fastchar.TrainConfig(batch=n))
        batches = [rng.integers(0, 65, (n, 64)).astype(np.int32) for _ in range(8)]
        times = []
        for i in range(45):
            t0 = time.perf_counter()
            model.forward(batches[i % 8], batches[(i + 1) % 8])
            model.backward()
            optimizer.step(1e-3)
            times.append(time.perf_counter() - t0)
        return n * 64 / statistics.median(times[10:])
    tokenizer = fastchar.CharTokenizer([chr(32 + i) for i in range(65)])
    top_p = 0.9 if what == "sample_p" else None
    streams = {"num_samples": 64} if what == "sample64" else {}

    def seconds(chars: int) -> float:
        t0 = time.perf_counter()
        fastchar.generate(model, tokenizer, "ROMEO", chars, temperature=0.8, top_p=top_p, seed=1, **streams)
        return time.perf_counter() - t0

    seconds(200)  # warm-up: JIT, caches
    return (64 if streams else 1) * (n - 100) / statistics.median([seconds(n) - seconds(100) for _ in range(3)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the old tree (e.g. a worktree of the old commit), measured first in even rounds")
    p.add_argument("new", help="the tree to compare with it")
    p.add_argument("--rounds", type=int, default=2, help="alternations (default 2)")
    p.add_argument("--backend", default="cython", help="fastchar backend (default cython)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"], help="(default fp32)")
    p.add_argument("--threads", type=int, default=None, help="threads for every pool (default: all cores)")
    names = sorted({what for what, _ in JOBS})
    p.add_argument("--jobs", nargs="+", choices=names, default=names, help="which measures (default: all)")
    p.add_argument("--one", nargs=3, metavar=("WHAT", "N", "PRECISION"), help=argparse.SUPPRESS)  # a child's job
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.backend, args.one[2], args.threads)))
        return {}
    jobs = [(what, n, precision) for precision in args.precision for what, n in JOBS if what in args.jobs]
    figures: dict = defaultdict(list)
    for r in range(args.rounds):
        for job in jobs:  # the two trees one after the other for every job, the first one alternating
            for tree in (args.old, args.new)[:: 1 if r % 2 == 0 else -1]:
                env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
                # by path: the old tree may not have this file
                cmd = [sys.executable, os.path.abspath(__file__), tree, tree, "--backend", args.backend]
                cmd += ["--one", *map(str, job)] + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree).stdout
                figures[(*job, tree)].append(float(out.strip().splitlines()[-1]))
    print(f"median of {args.rounds} rounds (min-max)\n")
    print(f"| measure | {args.old} | {args.new} | new / old | best new / best old |\n|---|---|---|---|---|")
    result = {}
    for what, n, precision in jobs:
        runs = [figures[(what, n, precision, t)] for t in (args.old, args.new)]
        old, new = (statistics.median(r) for r in runs)
        unit = f"train B={n} tok/s" if what == "train" else f"{what} chars/s"
        unit += f" {precision}"
        spread = [f"{min(r):,.0f}-{max(r):,.0f}" for r in runs]
        print(f"| {unit} | {old:,.0f} ({spread[0]}) | {new:,.0f} ({spread[1]}) | {new / old:.3f} | "
              f"{max(runs[1]) / max(runs[0]):.3f} |")  # fmt: skip
        result[unit] = {"old": runs[0], "new": runs[1]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

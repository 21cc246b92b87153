"""Two source trees of fastchar side by side: training tokens/s and sampling chars/s, alternating.

    python -m benchmarks.compare_trees OLD_TREE NEW_TREE [--rounds 2] [--backend cython]

Each measurement runs in a fresh process with PYTHONPATH set to one tree (each tree needs its
extensions built in place: `python setup.py build_ext --inplace`), alternating between the trees
round by round, so both see the same machine. It uses only the public API that every version has
(Model, forward, backward, AdamW, generate), imports fastchar first (as the `fastchar` command does)
and prints the median of the rounds and the ratio NEW / OLD. Training: the base model, synthetic
tokens, 45 steps of forward + backward + clip + AdamW, the median of the last 35 step times.
Sampling: 20,000 characters minus 100 (start-up does not count), temperature 0.8, with and without
top-p 0.9, the median of 3.
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

JOBS = (("train", 12), ("train", 64), ("sample", 20000), ("sample_p", 20000))


def measure(what: str, n: int, backend: str) -> float:
    """One figure in this process: training tokens/s at batch n, or sampling chars/s for n characters."""
    import fastchar  # noqa: I001  (before NumPy, as the `fastchar` command does)
    import numpy as np
    from fastchar.optim import AdamW

    model = fastchar.Model(fastchar.ModelConfig(vocab_size=65), backend=backend, seed=0)
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

    def seconds(chars: int) -> float:
        t0 = time.perf_counter()
        fastchar.generate(model, tokenizer, "ROMEO", chars, temperature=0.8, top_p=top_p, seed=1)
        return time.perf_counter() - t0

    seconds(200)  # warm-up: JIT, caches
    return (n - 100) / statistics.median([seconds(n) - seconds(100) for _ in range(3)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", help="the tree measured first in every round (e.g. a worktree of the old commit)")
    p.add_argument("new", help="the tree to compare with it")
    p.add_argument("--rounds", type=int, default=2, help="alternations (default 2)")
    p.add_argument("--backend", default="cython", help="fastchar backend (default cython)")
    p.add_argument("--one", nargs=2, metavar=("WHAT", "N"), help=argparse.SUPPRESS)  # a child's job
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.backend)))
        return {}
    figures: dict = defaultdict(list)
    for _ in range(args.rounds):
        for tree in (args.old, args.new):
            for what, n in JOBS:
                env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
                # by path: the old tree may not have this file
                cmd = [sys.executable, os.path.abspath(__file__), tree, tree, "--backend", args.backend]
                cmd += ["--one", what, str(n)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tree).stdout
                figures[(what, n, tree)].append(float(out.strip().splitlines()[-1]))
    print(f"| measure | {args.old} | {args.new} | new / old |\n|---|---|---|---|")
    result = {}
    for what, n in JOBS:
        old, new = (statistics.median(figures[(what, n, t)]) for t in (args.old, args.new))
        unit = f"train B={n} tok/s" if what == "train" else f"{what} chars/s"
        print(f"| {unit} | {old:,.0f} | {new:,.0f} | {new / old:.3f} |")
        result[unit] = (old, new)
    return result


if __name__ == "__main__":
    main()

"""Two or more builds of fastchar._gemm side by side in one process: every product of a model timed in
each build in turn, best of the rounds. On a shared machine this is the fair way to compare a kernel
change with the code before it (the neighbours slow both builds alike).

    cp fastchar/_gemm.*.so /tmp/before.so        # then change csrc/, rebuild
    python -m benchmarks.ab_gemm /tmp/before.so fastchar/_gemm.cpython-311-x86_64-linux-gnu.so \
        --models wide nanogpt --threads 1 --rounds 9
    python -m benchmarks.ab_gemm fastchar/_gemm.*.so@avx2 fastchar/_gemm.*.so@avx512   # two paths

A build may carry "@path" (avx2, avx512, neon) to run on that instruction-set path; without it, the
path fastchar.isa chose (FASTCHAR_ISA). Products as in benchmarks.bench_gemm (fwd, dinp, dW of every
layer), each result checked against NumPy first. Prints GFLOP/s of the whole set (total FLOP of one
training step's products / their total time) and per product. Records nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

import fastchar  # noqa: F401  (sets libgomp's spin count before the extensions load it)
from benchmarks.bench_gemm import MODELS, layers, operands, product_args
from fastchar import isa

LAYERS = {"base": 4, "wide": 4, "long": 4, "nanogpt": 6}


def load(spec: str, index: int, bf16: bool = False):
    """The _gemm module of a built file, switched onto the path named after '@' (else fastchar.isa's)."""
    path, _, forced = spec.partition("@")
    loader = importlib.util.spec_from_file_location(f"fastchar_ab{index}._gemm", path)
    if loader is None:
        raise SystemExit(f"error: {path} is not a loadable extension module (give the _gemm .so file)")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    module._set_isa(isa.CODES[forced or isa.selection().path], bf16)
    return module


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="+", help="_gemm extension files, each optionally with @path")
    p.add_argument("--models", nargs="+", default=["wide", "nanogpt"], choices=list(MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="the products' precision")
    args = p.parse_args(argv)
    bf16 = args.precision == "bf16"
    mods = [load(s, i, bf16) for i, s in enumerate(args.builds)]
    rng = np.random.default_rng(0)
    print(f"builds: {', '.join(args.builds)}; threads {args.threads}; best of {args.rounds} rounds")
    for name in args.models:
        N, C, H = MODELS[name]
        total, flops, rows = np.zeros(len(mods)), 0.0, []
        for layer, IC, OC in layers(C, H):
            count = 1 if layer == "lm_head" else LAYERS[name]
            for prod in ("fwd", "dinp", "dW"):
                M, Nc, K, ta, tb = product_args(prod, N, IC, OC)
                c, a, b = operands(prod, N, IC, OC, rng)
                want = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
                tol = 2e-2 if bf16 else 1e-4  # bf16 operands carry 8 significant bits
                for m in mods:
                    m.gemm(c, a, b, ta, tb, 0.0, args.precision, args.threads)
                    assert np.abs(c - want).max() <= tol * np.abs(want).max(), (layer, prod)
                fl = 2.0 * M * Nc * K
                calls = max(1, int(3e8 / fl))
                best = np.full(len(mods), np.inf)
                for _ in range(args.rounds):
                    for i, m in enumerate(mods):
                        t0 = time.perf_counter()
                        for _ in range(calls):
                            m.gemm(c, a, b, ta, tb, 0.0, args.precision, args.threads)
                        best[i] = min(best[i], (time.perf_counter() - t0) / calls)
                total += best * count
                flops += fl * count
                rows.append(f"{layer}.{prod} " + "/".join(f"{fl / t / 1e9:.0f}" for t in best))
        gflops = " | ".join(f"{flops / t / 1e9:.1f}" for t in total)
        ms = " | ".join(f"{t * 1e3:.1f}" for t in total)
        print(f"{name}: {gflops} GFLOP/s (ms per step's products: {ms})")
        print("   " + ", ".join(rows))


if __name__ == "__main__":
    main()

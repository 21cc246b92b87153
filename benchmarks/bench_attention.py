"""Causal attention forward and backward: the Cython backend's kernels against fastchar._gemm's
vectorised ones (csrc/attention.c) on every instruction-set path this CPU runs (avx512, avx2, neon),
at the four training shapes. Outputs are checked first, on each path.

    flock /tmp/fastchar-bench.lock python -m benchmarks.bench_attention              # 2 threads, wall
    python -m benchmarks.bench_attention --threads 1 --clock cpu                     # 1 thread, CPU time

GFLOP/s count the causal half: forward 2*B*T*T*C (q k^T and att v), backward twice that.
Times are the best of --repeats batches of 5 calls (a shared machine makes medians measure the
neighbours).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

SHAPES = {"base": (12, 64, 128, 8), "wide": (12, 64, 256, 8), "long": (16, 256, 128, 8), "nanogpt": (8, 256, 384, 6)}


def best_time(fn, repeats: int, clock) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for _ in range(5):
            fn()
        best = min(best, (clock() - t0) / 5)
    return best


def measure(name: str, threads: int, repeats: int, clock) -> dict:
    """{kernel: {"ms", "gflops"}} at one shape, after checking each path's forward against the reference."""
    from fastchar import _cykernels as cy
    from fastchar import _gemm, isa
    from fastchar.arena import aligned_zeros
    from fastchar.backends import reference as ref

    B, T, C, NH = SHAPES[name]
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    # the model's activation slots start on 64-byte lines (fastchar/arena.py), and att's streaming stores need it
    out, att = aligned_zeros(B * T * C).reshape(B, T, C), aligned_zeros(B * NH * T * T).reshape(B, NH, T, T)
    dqkv, datt = aligned_zeros(qkv.size).reshape(qkv.shape), np.zeros_like(att)
    want_out, want_att = np.zeros_like(out), np.zeros_like(att)
    ref.attention_forward(want_out, want_att, qkv)
    paths = [p for p in isa.runnable() if p != "generic"]
    for path in paths:
        with isa.force(path):
            _gemm.attention_forward(out, att, qkv, threads)
        if not (np.allclose(out, want_out, rtol=1e-4, atol=1e-5) and np.allclose(att, want_att, atol=1e-6)):
            raise SystemExit(f"{path} attention_forward disagrees with the reference at {name}")
    fl = 2.0 * B * T * T * C
    runs = [("cython fwd", None, lambda: cy.attention_forward(out, att, qkv), fl)]
    runs += [(f"{p} fwd", p, lambda: _gemm.attention_forward(out, att, qkv, threads), fl) for p in paths]
    runs += [("cython bwd", None, lambda: cy.attention_backward(dqkv, datt, dout, qkv, att), 2 * fl)]
    runs += [
        (f"{p} bwd", p, lambda: _gemm.attention_backward(dqkv, datt, dout, qkv, att, threads), 2 * fl) for p in paths
    ]
    row = {}
    for label, path, fn, f in runs:
        with isa.force(path) if path else contextlib.nullcontext():
            t = best_time(fn, repeats, clock)
        row[label] = {"ms": t * 1e3, "gflops": f / t / 1e9}
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--quick", action="store_true", help="base shape, 2 repeats: proves it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.shapes = 2, ["base"]
    from fastchar import _cykernels as cy

    cy.set_openmp_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"threads {args.threads}, clock {args.clock}; GFLOP/s (ms per call)")
    results = {}
    for name in args.shapes:
        results[name] = measure(name, args.threads, args.repeats, clock)
        if len(results) == 1:
            print(f"{'shape':8} " + " ".join(f"{k:>18}" for k in results[name]))
        print(f"{name:8} " + " ".join(f"{v['gflops']:6.0f} ({v['ms']:7.3f} ms)" for v in results[name].values()))
    return results


if __name__ == "__main__":
    main()

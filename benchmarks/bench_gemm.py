"""The three matrix products of a linear layer at the real shapes: fastchar._gemm (bf16, and fp32 on
every instruction-set path this CPU runs: fp32_avx512, fp32_avx2, fp32_neon) against OpenBLAS sgemm
with the CPU's own kernels (SkylakeX on an AVX-512 CPU) and with OPENBLAS_CORETYPE=Haswell (AVX2).

    flock /tmp/fastchar-bench.lock python -m benchmarks.bench_gemm            # all shapes, 2 threads
    python -m benchmarks.bench_gemm --models base --threads 1 --quick

Products, weights stored [in, out]: fwd out(N,OC) = inp(N,IC) @ W(IC,OC); dinp(N,IC) += dout @ W^T;
dW(IC,OC) += inp^T @ dout. Each layer of a model is timed (qkv, attention projection, MLP up and
down, lm_head). Every result is checked against NumPy before it is timed.

OpenBLAS runs in child processes that import only NumPy and SciPy, because OpenBLAS reads
OPENBLAS_CORETYPE once, when it loads: one child with the variable removed (the CPU's own kernels,
"SkylakeX" on an AVX-512 CPU; threadpoolctl's reported architecture is printed), one with
OPENBLAS_CORETYPE=Haswell. Each call is one sgemm threaded by OpenBLAS (threadpoolctl limit).
The percentages are of this machine's peak at the threads used, measured by benchmarks/peak.c
(its widest x86 path; without one, the fraction is left out).

The fastchar side runs under fastchar's own thread policy (fastchar.threads.set_threads: OpenMP at
--threads, BLAS at 1). Before that, NumPy's reference products left OpenBLAS threads spinning beside
the timed calls: fastchar's base-model products read 27 GFLOP/s on 2 threads instead of 123.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

V = 65  # Tiny Shakespeare's character vocabulary

# name -> (N = B*T, C, hidden width); the four training shapes of the issue.
MODELS = {
    "base": (12 * 64, 128, 512),
    "wide": (12 * 64, 256, 1024),
    "long": (16 * 256, 128, 512),
    "nanogpt": (8 * 256, 384, 1536),
}
PRODUCTS = ("fwd", "dinp", "dW")


def layers(C: int, H: int) -> list[tuple[str, int, int]]:
    """(layer, IC, OC) of one model."""
    return [("qkv", C, 3 * C), ("proj", C, C), ("fc", C, H), ("fc_proj", H, C), ("lm_head", C, V)]


def product_args(product: str, N: int, IC: int, OC: int) -> tuple[int, int, int, bool, bool]:
    """(M, Ncols, K, trans_a, trans_b) of a row-major C = op(A) @ op(B)."""
    return {
        "fwd": (N, OC, IC, False, False),
        "dinp": (N, IC, OC, False, True),
        "dW": (IC, OC, N, True, False),
    }[product]


def operands(product: str, N: int, IC: int, OC: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """(c, a, b) float32 arrays of the product, a and b stored as the model stores them."""
    inp = rng.standard_normal((N, IC), dtype=np.float32)
    w = rng.standard_normal((IC, OC), dtype=np.float32) * np.float32(IC**-0.5)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    a, b = {"fwd": (inp, w), "dinp": (dout, w), "dW": (inp, dout)}[product]
    M, Nc, _, _, _ = product_args(product, N, IC, OC)
    return np.zeros((M, Nc), np.float32), a, b


def reference(a: np.ndarray, b: np.ndarray, ta: bool, tb: bool) -> np.ndarray:
    return (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds; 1 thread on a busy machine)


def time_call(fn, min_seconds: float, repeats: int) -> float:
    """Best seconds per call over `repeats` timed batches of calls lasting >= min_seconds each.

    The best batch, not the median: on a shared 2-core machine the median measures the neighbours.
    """
    fn()
    t0 = CLOCK()
    fn()
    once = max(CLOCK() - t0, 1e-6)
    inner = max(1, int(min_seconds / once))
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        for _ in range(inner):
            fn()
        times.append((CLOCK() - t0) / inner)
    return float(np.min(times))


def measured_peak(threads: int) -> dict:
    """{"isa", "fp32", "bf16"} GFLOP/s of benchmarks/peak.c at `threads` threads on the widest x86 path of
    this CPU ({} elsewhere, or if it does not build)."""
    from benchmarks.bench_train import machine_peak
    from fastchar import isa

    runnable = isa.runnable()
    path = "avx512" if "avx512" in runnable else "avx2" if "avx2" in runnable else None
    return machine_peak(threads, path) if path else {}


def cases(models: list[str]) -> list[tuple[str, str, str, int, int, int]]:
    return [
        (m, layer, prod, N, IC, OC)
        for m in models
        for layer, IC, OC in layers(MODELS[m][1], MODELS[m][2])
        for prod in PRODUCTS
        for N in [MODELS[m][0]]
    ]


def run_fastchar(models: list[str], threads: int, min_seconds: float, repeats: int) -> dict:
    from fastchar import _gemm
    from fastchar.threads import set_threads

    set_threads(threads)  # BLAS at 1 thread: the reference products below must not leave a spinning pool
    out = {}
    rng = np.random.default_rng(0)
    from fastchar import isa

    # (column, precision, path): bf16 on the avx512 path, fp32 on every vector path of this CPU
    runs = [("bf16", "bf16", "avx512")] if _gemm.has_avx512bf16() else []
    runs += [(f"fp32_{path}", "fp32", path) for path in isa.runnable() if path != "generic"]
    for m, layer, prod, N, IC, OC in cases(models):
        c, a, b = operands(prod, N, IC, OC, rng)
        _, _, K, ta, tb = product_args(prod, N, IC, OC)
        want = reference(a, b, ta, tb)
        scale = np.abs(a.T if ta else a).astype(np.float64) @ np.abs(b.T if tb else b)
        for col, prec, path in runs:
            with isa.force(path):
                _gemm.gemm(c, a, b, ta, tb, 0.0, prec, threads)
            tol = 1e-2 if prec == "bf16" else 1e-5  # relative to sum |a||b|: bf16 rounds inputs to 8 bits
            err = float(np.max(np.abs(c - want) / (scale + 1e-30)))
            if err > tol:
                raise SystemExit(f"fastchar {col} {m}/{layer}/{prod} disagrees with NumPy: {err:.2e}")
            with isa.force(path):
                t = time_call(
                    lambda c=c, a=a, b=b, ta=ta, tb=tb, p=prec: _gemm.gemm(c, a, b, ta, tb, 0.0, p, threads),
                    min_seconds,
                    repeats,
                )
            out[f"{m}/{layer}/{prod}/{col}"] = t
    return out


def run_openblas(models: list[str], threads: int, min_seconds: float, repeats: int) -> dict:
    """Child process: scipy's sgemm, row-major C = op(A) @ op(B) as column-major C^T = op(B)^T op(A)^T."""
    from scipy.linalg.blas import sgemm
    from threadpoolctl import threadpool_info, threadpool_limits

    out = {}
    rng = np.random.default_rng(0)
    with threadpool_limits(limits=threads, user_api="blas"):
        for m, layer, prod, N, IC, OC in cases(models):
            c, a, b = operands(prod, N, IC, OC, rng)
            _, _, _, ta, tb = product_args(prod, N, IC, OC)

            def call(c=c, a=a, b=b, ta=ta, tb=tb):
                sgemm(1.0, b.T, a.T, trans_a=tb, trans_b=ta, beta=0.0, c=c.T, overwrite_c=True)

            call()
            want = reference(a, b, ta, tb)
            if not np.allclose(c, want, rtol=1e-4, atol=1e-3):
                raise SystemExit(f"openblas {m}/{layer}/{prod} disagrees with NumPy")
            out[f"{m}/{layer}/{prod}/sgemm"] = time_call(call, min_seconds, repeats)
        arch = [i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"times": out, "architecture": arch}


def openblas_child(coretype: str | None, argv: list[str]) -> dict:
    env = dict(os.environ)
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        env.pop(k, None)
    if coretype:  # benchmarks/__init__ imports fastchar, which would replace a pre-AVX-512 coretype
        env["OPENBLAS_CORETYPE"] = coretype
        env["FASTCHAR_KEEP_OPENBLAS_CORETYPE"] = "1"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gemm", "--openblas-child", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise SystemExit(f"OpenBLAS child failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gemm", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--min-seconds", type=float, default=0.005, help="length of one timed batch of calls (s)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, immune to neighbours but only meaningful with --threads 1",
    )
    p.add_argument("--quick", action="store_true", help="1 repeat of ~2 ms: proves it runs")
    p.add_argument("--no-openblas", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/bench_gemm.jsonl")
    p.add_argument("--openblas-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.min_seconds = 1, 0.002
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    child_argv = [
        "--clock",
        args.clock,
        "--models",
        *args.models,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--min-seconds",
        str(args.min_seconds),
    ]
    if args.openblas_child:
        print(json.dumps(run_openblas(args.models, args.threads, args.min_seconds, args.repeats)))
        return {}

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    times = run_fastchar(args.models, args.threads, args.min_seconds, args.repeats)
    arch = {}
    if not args.no_openblas:
        for label, coretype in (("skx", None), ("hsw", "Haswell")):
            res = openblas_child(coretype, child_argv)
            arch[label] = res["architecture"]
            times.update({k.replace("/sgemm", f"/sgemm_{label}"): v for k, v in res["times"].items()})

    peak = measured_peak(args.threads)
    cols = [c for c in ("bf16", "fp32_avx512", "fp32_avx2", "fp32_neon") if any(k.endswith("/" + c) for k in times)]
    cols += ["sgemm_skx", "sgemm_hsw"]
    print(f"threads {args.threads}, clock {args.clock}")
    print(f"OpenBLAS architecture: no coretype {arch.get('skx')}, OPENBLAS_CORETYPE=Haswell {arch.get('hsw')}")
    limits = ", ".join(f"{k} % of {peak[k]:.0f}" for k in ("bf16", "fp32") if peak.get(k))
    print(
        f"GFLOP/s ({limits or 'no peak measured'}; peak: benchmarks/peak.c, {peak.get('isa', '-')}, "
        f"{args.threads} threads)"
    )
    header = f"{'model':8} {'layer':8} {'prod':5} {'M':>5} {'N':>5} {'K':>5} " + " ".join(f"{c:>12}" for c in cols)
    print(header)
    totals = {c: [0.0, 0.0] for c in cols}  # flops, seconds
    for m, layer, prod, N, IC, OC in cases(args.models):
        M, Nc, K, _, _ = product_args(prod, N, IC, OC)
        fl = 2.0 * M * Nc * K
        row = f"{m:8} {layer:8} {prod:5} {M:5d} {Nc:5d} {K:5d} "
        for c in cols:
            t = times.get(f"{m}/{layer}/{prod}/{c}")
            if t is None:
                row += f"{'-':>12} "
                continue
            g = fl / t / 1e9
            pk = peak.get("bf16" if c == "bf16" else "fp32")
            row += (f"{g:7.0f} ({100 * g / pk:2.0f}%)" if pk else f"{g:7.0f}")[:12].rjust(12) + " "
            totals[c][0] += fl
            totals[c][1] += t
        print(row)
    print(
        "all products (total flops / total time): "
        + ", ".join(f"{c} {tot[0] / tot[1] / 1e9:.0f} GFLOP/s" for c, tot in totals.items() if tot[1] > 0)
    )
    gflops = {}
    for m, layer, prod, N, IC, OC in cases(args.models):
        M, Nc, K, _, _ = product_args(prod, N, IC, OC)
        for c in cols:
            t = times.get(f"{m}/{layer}/{prod}/{c}")
            if t is not None:
                gflops[f"{m}/{layer}/{prod}/{c}"] = round(2.0 * M * Nc * K / t / 1e9, 1)
    result = {
        "threads": args.threads,
        "clock": args.clock,
        "openblas_architecture": arch,
        "gflops": gflops,
        "peak_gflops": peak,
    }
    if not (args.quick or args.no_record):
        from benchmarks.common import append_record, machine

        print(f"recorded in {append_record('bench_gemm', {'machine': machine(args.threads), **result})}")
    return result


if __name__ == "__main__":
    main()

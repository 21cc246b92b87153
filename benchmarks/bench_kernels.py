"""Every kernel x backend at the base model's real shapes: median ms per call, GFLOP/s or GB/s, and
the speed-up over the NumPy reference. Each kernel is checked against the reference before it is
timed.

    python -m benchmarks.bench_kernels              # B = 12 and 64, T = 64, C = 128, NH = 8, V = 65
    python -m benchmarks.bench_kernels --quick      # tiny repeat counts: proves it runs
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import append_record, machine, median_time, table
from fastchar.backends import KERNELS, available_backends, get_backend
from fastchar.backends.cases import make_args
from fastchar.threads import set_threads


def flops(kernel: str, shape: tuple) -> float:
    """Floating-point operations of one call (0 where bandwidth, not arithmetic, is the measure)."""
    B, T, C, NH, V = shape
    N, H = B * T, 4 * C
    per = {
        "matmul_forward": 2 * N * C * H,
        "matmul_backward": 4 * N * C * H,
        "attention_forward": 2 * B * T * T * C,  # q k^T and att v over the causal half
        "attention_backward": 4 * B * T * T * C,
        "attention_decode": 4 * B * T * C,
    }
    return float(per.get(kernel, 0))


def check(kernel: str, backend, args: dict) -> None:
    from fastchar.backends import reference as ref

    want = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}
    got = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args.items()}
    a, b = getattr(ref, kernel)(*want.values()), getattr(backend, kernel)(*got.values())
    if kernel == "grad_norm":
        ok = abs(a - b) <= 1e-4 * abs(a)
    else:
        ok = all(
            np.allclose(got[k], want[k], rtol=1e-3, atol=1e-3)
            for k in want
            if isinstance(want[k], np.ndarray) and k != "datt"  # attention backwards' scratch
        )
    if not ok:
        raise SystemExit(f"{backend.name}.{kernel} disagrees with the reference; not timing it")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[12, 64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--backends", nargs="+", default=None)
    p.add_argument("--quick", action="store_true", help="few repeats, B = 4; records nothing")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batch = 2, [4]
    set_threads(args.threads)
    names = args.backends or available_backends()
    backends = {n: get_backend(n) for n in names}
    record: dict = {"machine": machine(args.threads), "kernels": {}}
    print(f"machine: {record['machine']}")
    for B in args.batch:
        shape = (B, 64, 128, 8, 65)
        rows = []
        for kernel in KERNELS:
            args_ = make_args(kernel, shape, np.random.default_rng(0))
            nbytes = sum(v.nbytes for v in args_.values() if isinstance(v, np.ndarray))
            times = {}
            for name, backend in backends.items():
                if name != "numpy":
                    check(kernel, backend, args_)
                fn = getattr(backend, kernel)
                work = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in args_.items()}
                values = list(work.values())
                times[name] = median_time(lambda fn=fn, values=values: fn(*values), args.repeats, warmup=2)
            for name, t in times.items():
                f = flops(kernel, shape)
                rate = f"{f / t / 1e9:.1f} GFLOP/s" if f else f"{nbytes / t / 1e9:.1f} GB/s"
                speedup = f"{times['numpy'] / t:.1f}x" if "numpy" in times else "-"
                rows.append([kernel, name, f"{t * 1e3:.4f}", rate, speedup])
                record["kernels"][f"B{B}/{kernel}/{name}"] = t * 1e3
        print(f"\n## Kernels, B = {B}, T = 64, C = 128, NH = 8, V = 65, {args.threads} threads\n")
        print(table(["kernel", "backend", "ms/call", "rate", "vs numpy"], rows))
    if not (args.quick or args.no_record):
        print(f"\nrecorded in {append_record('bench_kernels', record)}")
    return record


if __name__ == "__main__":
    main()

"""The decode loop's packed products alone (csrc/fc_decode.c), one thread, on every vector path this
CPU runs: a step of the base model's products for M rows, its rate, and its fraction of one core's
peak (benchmarks/peak.c on that path).

    flock /tmp/fastchar-bench.lock python -m benchmarks.bench_decode_products

M rows are M streams of one group (fastchar.sampler.cache_groups): the tiles a count runs show in
its rate (avx2: 6-row tiles, 4 for what is left, 3 and 1 for odd counts). The weights (3.2 MB fp32,
1.6 MB bf16) stream from L3 at every step, as in the decode. Built here with gcc against this
tree's csrc/ (benchmarks/decode_products.c); prints a note and nothing else without gcc.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 64)


def build(tmp: Path) -> Path | None:
    """decode_products built against csrc/ (the extension's compile flags, no -march), or None."""
    gcc = shutil.which("gcc")
    if gcc is None:
        print("note: no gcc; nothing measured")
        return None
    exe = tmp / "decode_products"
    sources = [str(HERE / "decode_products.c"), str(CSRC / "fc_decode.c"), str(CSRC / "fc_isa.c")]
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", f"-I{CSRC}"]
    cmd = [gcc, *flags, *sources, "-o", str(exe), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"note: benchmarks/decode_products.c did not build: {done.stderr.strip()[:300]}")
        return None
    return exe


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode_products", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts M")
    args = p.parse_args(argv)
    try:
        rows = [int(m) for m in args.rows.split(",")]
    except ValueError:
        p.error(f"--rows must be comma-separated integers, got {args.rows!r}")
    if not rows or min(rows) < 1:
        p.error("--rows must be positive")
    from benchmarks.bench_sample import machine_limits
    from benchmarks.common import cpu_model
    from fastchar import _cydecode, isa

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        if exe is None:
            return results
        print(f"# {cpu_model()}, one thread; the base model's products (794,752 weights + the head) for M rows")
        print("| path | precision | M | us a step | us a row | GFLOP/s | of one core's peak |")
        print("|---|---|---|---|---|---|---|")
        for path in isa.runnable():
            if path == "generic":
                continue  # no packed product there
            limits = machine_limits(1, [], path)
            kinds = ["fp32", "bf16"] if path == "avx512" and _cydecode.packed_available("bf16") else ["fp32"]
            for kind in kinds:
                cmd = [str(exe), str(isa.CODES[path]), str(int(kind == "bf16"))] + [str(m) for m in rows]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                peak = limits.get(f"{kind}_gflops")
                for line in out.splitlines():
                    _, m, sec, gflops = line.split()
                    m, sec, gflops = int(m), float(sec), float(gflops)
                    share = f"{gflops / peak:.0%}" if peak else "-"
                    results[(path, kind, m)] = {
                        "seconds": sec,
                        "gflops": gflops,
                        "of_peak": gflops / peak if peak else None,
                    }
                    print(f"| {path} | {kind} | {m} | {sec * 1e6:.1f} | {sec * 1e6 / m:.2f} | {gflops:.1f} | {share} |")
    return results


if __name__ == "__main__":
    main()

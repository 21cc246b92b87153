"""The batched decode's attention step alone (fc_attention_rows: append each row's key and value,
then attend over its stream's cache), one thread, on every path this CPU runs: the time per row and
head, and the rate at which it reads the caches' keys and values.

    flock /tmp/fastchar-bench.lock python -m benchmarks.bench_decode_attention

Two cases at the base model's shape (C 128, 8 heads of 16, a window of 64, 4 layers, caches full):
"resident", 64 rows that are all one stream (its 256 KB of caches stay in this core's L2), and
"streamed", 64 rows of 64 streams (16 MB: every row's keys and values come from L3 or memory, as
in `generate(..., num_samples=64)`). Each step runs the 4 layers' attention of the 64 rows over all
heads, as the decode loop's two threads do between them. Times are the best of --repeats batches of
5 steps (a shared machine makes medians measure the neighbours). Where the path has bf16 caches
(avx512 with AVX512_BF16: a bf16 model's decode), the same cases again with them, half the bytes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

L, C, NH, S, ROWS = 4, 128, 8, 64, 64
HS = C // NH


def step_time(kall: np.ndarray, vall: np.ndarray, stream: np.ndarray, repeats: int) -> float:
    """Best seconds of one step: the L layers' attention of ROWS rows over all heads."""
    from fastchar import _cydecode

    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((ROWS, 3 * C), dtype=np.float32)
    out = np.zeros((ROWS, C), np.float32)
    slot = np.full(ROWS, S - 1, np.int64)
    n = np.full(ROWS, S, np.int64)

    def step() -> None:
        for layer in range(L):
            _cydecode.attention_rows(out, qkv, kall, vall, stream, slot, n, layer, 0, NH)

    step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        best = min(best, (time.perf_counter() - t0) / 5)
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_decode_attention", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="2 repeats: proves it runs")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.quick:
        args.repeats = 2
    from benchmarks.common import cpu_model
    from fastchar import _cydecode, isa

    rng = np.random.default_rng(0)
    cases = {"resident": 1, "streamed": ROWS}
    data = {}
    for case, B in cases.items():
        kall = rng.standard_normal((B, L, C, S), dtype=np.float32)
        vall = rng.standard_normal((B, L, NH, S, HS), dtype=np.float32)
        stream = (np.arange(ROWS) % B).astype(np.int64)
        data[case, "fp32"] = kall, vall, stream
        data[case, "bf16"] = (
            (kall.view(np.uint32) >> 16).astype(np.uint16),
            (vall.view(np.uint32) >> 16).astype(np.uint16),
            stream,
        )  # bf16 bits (truncated: the values do not change the time)
    print(f"# {cpu_model()}, one thread; C {C}, {NH} heads, window {S} (full), {L} layers, {ROWS} rows a step")
    print("| path | case | caches | ns per row and head | keys and values read, GB/s |")
    print("|---|---|---|---|---|")
    results = {}
    for path in isa.runnable():
        with isa.force(path):
            kinds = ["fp32", "bf16"] if _cydecode.kv16_ok(C, S, NH) else ["fp32"]
            for kind in kinds:
                for case in cases:
                    kall, vall, stream = data[case, kind]
                    per = step_time(kall, vall, stream, args.repeats) / (L * ROWS * NH)
                    kv_bytes = 2 * HS * S * kall.itemsize  # the keys and values one row and head read
                    results[(path, case, kind)] = {"ns": per * 1e9, "gbs": kv_bytes / per / 1e9}
                    mb = kall.nbytes * 2 / 2**20
                    print(f"| {path} | {case} | {mb:g} MB {kind} | {per * 1e9:.0f} | {kv_bytes / per / 1e9:.1f} |")
    return results


if __name__ == "__main__":
    main()

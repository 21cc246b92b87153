"""Sampling throughput: one stream, and N = 1, 8, 64 streams made together, each as a fraction of the
machine's limit, beside PyTorch eager.

fastchar: `generate` on the model's backend (compiled loops: cython batches the streams in one decode
step each; numba runs them one after another), temperature 0.8, and top-p 0.9. Each figure is the
long run minus the short run (n and n/4 characters per stream: the prompt, the packing of the
weights and the thread start cancel out), median of --repeats, chars/s counting every stream's
new characters; one stream makes --chars characters, 8 and 64 streams 5 x --chars in all.
PyTorch: eager, the same network (fastchar/torch_model.py) with a KV cache
refilled like fastchar's, batch 1 and 64, temperature only, in a child process (its OpenMP runtime
and Numba's do not mix). Weights: a checkpoint (--checkpoint; a trained model's peaked
distributions are what top-p sees in use) or the untrained base model (--position rope by default:
no window refill).

The machine's limits come from benchmarks/peak.c (compiled here with gcc -march=native, or given
with --peak-fp32 / --peak-bf16 / --bandwidth): a one-stream step reads every product weight once
(3.2 MB in fp32, 1.6 MB in bf16 for the base model), so its limit is the read bandwidth of a buffer
of that size on the threads used divided by that size ("of bandwidth": the Cython loop runs one
stream on one thread or on all by measurement, and the row says which it mostly used); many streams do
matrix-matrix work bound by arithmetic, so their limit is the fp32 (or bf16) FMA peak divided by
the useful FLOP per character, 2 x product weights + 4 L C S for attention over a full cache of S
positions ("of peak").

    python -m benchmarks.bench_sample [--checkpoint runs/base/best] [--backend cython] [--threads 2]
                                      [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from benchmarks.common import append_record, build_peak, cpu_model, isolated, median_time, peak_round_trip
from fastchar import Model, ModelConfig, generate, load, set_threads
from fastchar.config import POSITIONS
from fastchar.threads import cores
from fastchar.tokenizer import CharTokenizer

PROMPT = "ROMEO:"


def _model(
    checkpoint: str | None, backend: str, precision: str = "fp32", position: str = "rope"
) -> tuple[Model, CharTokenizer]:
    if checkpoint:
        model = load(checkpoint, backend=backend, precision=precision)
        return model, model.tokenizer
    tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    cfg = ModelConfig(vocab_size=tok.vocab_size, position=position)
    return Model(cfg, backend=backend, seed=0, precision=precision), tok


def product_weights(cfg: ModelConfig) -> int:
    """Weights of the matrix products one character runs through (every layer's four, and the head)."""
    per_layer = cfg.d_model * 3 * cfg.d_model + cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.mlp_hidden
    return cfg.n_layer * per_layer + cfg.d_model * cfg.vocab_size


def flop_per_char(cfg: ModelConfig) -> float:
    """Useful FLOP of one character: 2 per product weight, plus q.k and p.v over a full cache of ctx positions."""
    return 2.0 * product_weights(cfg) + 4.0 * cfg.n_layer * cfg.d_model * cfg.ctx


def machine_limits(threads: int, buffers_mb: list[float], isa: str | None = None) -> dict:
    """benchmarks/peak.c's fp32 and bf16 GFLOP/s on `threads` threads (on instruction set `isa`,
    "avx512" or "avx2", default the CPU's best: FASTCHAR_ISA=avx2 runs fastchar's AVX2 kernels, whose
    limit is the AVX2 FMA peak), its read GB/s for each buffer size, and with threads > 1 a cache line's
    round trip between two threads in ns; {} without gcc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = build_peak(tmp, gcc, "-march=native")
        except subprocess.CalledProcessError as exc:
            print(f"note: benchmarks/peak.c did not build: {exc.stderr.strip()[:200]}")
            return {}
        limits: dict = {}
        args = [str(exe), str(threads)] + ([isa] if isa in ("avx512", "avx2") else [])
        out = subprocess.run(args, capture_output=True, text=True).stdout
        last = [ln for ln in out.splitlines() if ln.startswith(f"{threads} thread")]
        for key, pattern in (
            ("fp32_gflops", r"fp32[^,]*?([\d.]+) GFLOP/s"),
            ("bf16_gflops", r"bf16[^,]*?([\d.]+) GFLOP/s"),
        ):
            m = re.search(pattern, last[-1]) if last else None
            if m and float(m.group(1)) > 0:
                limits[key] = float(m.group(1))
        for mb in buffers_mb:
            for n, suffix in ((threads, ""), (1, "_1thread")) if threads > 1 else ((threads, ""),):
                out = subprocess.run([str(exe), "--bandwidth", f"{mb:.3f}", str(n)], capture_output=True, text=True)
                m = re.search(r"([\d.]+) GB/s", out.stdout)
                if m:
                    limits[f"read_gbs_{mb:.2f}MB{suffix}"] = float(m.group(1))
        if threads > 1:  # what each hand-over between the threads of a one-stream step costs at least
            trip = peak_round_trip(exe)
            if trip is not None:
                limits["round_trip_ns"] = trip
        return limits


def threads_share_a_core(limits: dict, mb: float) -> bool:
    """Whether machine_limits' figures say the threads run on one core's hyperthreads: a round trip
    under 40 ns (a line that never leaves the core) and the threads together reading mb megabytes at
    most 1.3 times as fast as one thread. A 2-core guest on this project's machines is sometimes
    placed that way for a while: its peak and bandwidth then read half."""
    rt = limits.get("round_trip_ns")
    bw, bw1 = limits.get(f"read_gbs_{mb:.2f}MB"), limits.get(f"read_gbs_{mb:.2f}MB_1thread")
    return rt is not None and bw is not None and bw1 is not None and rt < 40 and bw < 1.3 * bw1


def one_row_chars() -> tuple[int, int, int]:
    """(characters of one-stream calls of the Cython loop run on one thread, on a team, stages it
    ran: meetings of the threads) so far; zeros without it."""
    try:
        from fastchar import _cydecode
    except ImportError:
        return 0, 0, 0
    return (*_cydecode.one_row_chars(), _cydecode.stages_run())


def stream_runs(chars: int) -> list[tuple[str, int, int]]:
    """The table's runs: (name, streams (0: the single-prompt API), characters a stream). One stream
    makes `chars`; 8 and 64 streams make 5 x chars in all, so that their long-minus-short differences
    last alike (about 0.7 s each on a Zen 4), each stream at least min(chars, 1,600). At 400 a stream,
    64 streams' run took a quarter of a second, and at 2,500 a stream (chars split among 8) 8 streams'
    took a seventh of one; in both cases 8 and 64 swapped places from run to run."""
    rows = [("one stream", 0, chars), ("N = 1 streams, aggregate", 1, chars)]
    return rows + [(f"N = {n} streams, aggregate", n, max(5 * chars // n, min(chars, 1600))) for n in (8, 64)]


def time_fastchar(
    model: Model, tok: CharTokenizer, runs: list[tuple[int, int, float | None]], repeats: int
) -> tuple[list[float], list[float | None], list[float]]:
    """Aggregate chars/s of each run (streams, n characters per stream, top_p; streams = 0: the
    single-prompt API): the long run minus the short run (n/4), medians over `repeats` rounds. A
    round times every run once, so a spell of load on the machine falls on all of them alike and
    their ratios (1 < 8 < 64 streams) hold. Also each run's share of one-stream characters that the
    Cython loop ran on one thread (it chooses by measurement; None: no such calls), and each run's
    stages (meetings of the threads) per step of its streams: per character of one stream."""
    longs: list[list[float]] = [[] for _ in runs]
    shorts: list[list[float]] = [[] for _ in runs]
    calls = [[0, 0, 0] for _ in runs]
    steps = [0 for _ in runs]

    def timed(i: int, streams: int, m: int, top_p: float | None) -> float:
        kw = {} if streams == 0 else {"num_samples": streams}
        before = one_row_chars()
        t0 = time.perf_counter()
        generate(model, tok, PROMPT, m, top_p=top_p, seed=0, **kw)
        dt = time.perf_counter() - t0
        for k, (b, a) in enumerate(zip(before, one_row_chars(), strict=True)):
            calls[i][k] += a - b
        steps[i] += m
        return dt

    for i, (streams, n, top_p) in enumerate(runs):
        timed(i, streams, max(n // 4, 1), top_p)  # warm-up: compile, caches, thread pool
    calls = [[0, 0, 0] for _ in runs]
    steps = [0 for _ in runs]
    for _ in range(repeats):
        for i, (streams, n, top_p) in enumerate(runs):
            longs[i].append(timed(i, streams, n, top_p))
            shorts[i].append(timed(i, streams, max(n // 4, 1), top_p))
    rates = [
        max(streams, 1) * (n - max(n // 4, 1)) / max(statistics.median(lo) - statistics.median(sh), 1e-9)
        for (streams, n, _), lo, sh in zip(runs, longs, shorts, strict=True)
    ]
    shares = [c[0] / (c[0] + c[1]) if c[0] + c[1] else None for c in calls]
    return rates, shares, [c[2] / n for c, n in zip(calls, steps, strict=True)]


def time_torch(cfg: ModelConfig, tokens: list[int], batch: int, n: int, repeats: int, threads: int) -> float:
    import torch

    from fastchar.torch_model import TorchGPT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchGPT(cfg)
    model.load_from(Model(cfg, backend="numpy", seed=0).params)
    idx = torch.tensor([tokens])
    model.generate_cache(idx, 10, batch=batch)
    return batch * n / median_time(lambda: model.generate_cache(idx, n, batch=batch), repeats, warmup=0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the untrained base model)")
    p.add_argument(
        "--position", choices=POSITIONS, default="rope", help="the untrained model's positions (default rope)"
    )
    p.add_argument("--backend", default="cython")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--chars", type=int, default=20000, help="characters of one stream (default 20000)")
    p.add_argument("--repeats", type=int, default=5, help="rounds, each every run once (default 5)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32"],
        help="fastchar's decode products, one table each (bf16 needs AVX512_BF16)",
    )
    p.add_argument("--peak-fp32", type=float, default=None, help="fp32 GFLOP/s (default: run benchmarks/peak.c)")
    p.add_argument("--peak-bf16", type=float, default=None, help="bf16 GFLOP/s (default: run benchmarks/peak.c)")
    p.add_argument("--bandwidth", type=float, default=None, help="read GB/s of the weights' size (default: peak.c)")
    p.add_argument("--quick", action="store_true", help="tiny run (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.chars, args.repeats = 400, 1
    threads = set_threads(args.threads if args.threads is not None else cores())
    res: dict = {
        "backend": args.backend,
        "threads": threads,
        "checkpoint": args.checkpoint,
        "cpu": cpu_model(),
        "chars/s": {},
    }
    rows = stream_runs(args.chars)
    models = {
        precision: _model(args.checkpoint, args.backend, precision, args.position) for precision in args.precision
    }
    cfg = next(iter(models.values()))[0].cfg
    weights = product_weights(cfg)
    flop = flop_per_char(cfg)
    sizes = {"fp32": 4 * weights / 1e6, "bf16": 2 * weights / 1e6}  # MB of weights a one-stream step reads
    from fastchar import isa

    path = isa.path()
    limits = {} if args.quick else machine_limits(threads, [sizes[pr] for pr in args.precision], path)
    peak = {"fp32": args.peak_fp32 or limits.get("fp32_gflops"), "bf16": args.peak_bf16 or limits.get("bf16_gflops")}
    res.update(limits=limits, product_weights=weights, flop_per_char=flop, isa=path)
    print(
        f"# Sampling, {args.backend}, {threads} thread(s), {cpu_model()}, kernels on {path}; "
        "chars/s (long run minus short run)"
    )
    print(f"# model: {json.dumps(dataclasses.asdict(cfg))}")
    print(
        f"# useful work {flop / 1e6:.3f} MFLOP/char; weights read per one-stream step: "
        + ", ".join(f"{sizes[pr]:.2f} MB ({pr})" for pr in args.precision)
    )
    for pr in args.precision:
        bw = args.bandwidth or limits.get(f"read_gbs_{sizes[pr]:.2f}MB")
        bw1 = limits.get(f"read_gbs_{sizes[pr]:.2f}MB_1thread")
        if bw1:
            print(f"# read bandwidth of {sizes[pr]:.2f} MB on one thread: {bw1:.1f} GB/s")
        print(
            f"# limits ({pr}): peak {peak[pr] or float('nan'):.0f} GFLOP/s -> {(peak[pr] or 0) * 1e9 / flop:,.0f} "
            f"chars/s; read {bw or float('nan'):.1f} GB/s of {sizes[pr]:.2f} MB -> "
            f"{(bw or 0) * 1e3 / sizes[pr]:,.0f} chars/s"
        )
    if "round_trip_ns" in limits:
        print(f"# a cache line's round trip between two threads: {limits['round_trip_ns']:.0f} ns")
    res["threads_share_a_core"] = one_core = threads_share_a_core(limits, sizes[args.precision[0]])
    if one_core:
        print(
            "# the threads share one core (hyperthreads of it, as the host placed them now): a short round "
            "trip, and two threads read no faster than one; the limits above are that core's"
        )
    print()
    head = f"| {'run':30} | precision | {'temperature 0.8':>16} | {'top-p 0.9':>10} | of bandwidth | of peak |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for precision, (model, tok) in models.items():
        bw = args.bandwidth or limits.get(f"read_gbs_{sizes[precision]:.2f}MB")
        bw_chars = bw * 1e3 / sizes[precision] if bw else None
        peak_chars = peak[precision] * 1e9 / flop if peak[precision] else None
        runs = [(streams, n, top_p) for _, streams, n in rows for top_p in (None, 0.9)]
        rates, one_thread, stages = time_fastchar(model, tok, runs, args.repeats)
        bw1 = args.bandwidth or limits.get(f"read_gbs_{sizes[precision]:.2f}MB_1thread")
        for k, (name, streams, _) in enumerate(rows):
            a, b = rates[2 * k], rates[2 * k + 1]
            share = one_thread[2 * k + 1] if streams <= 1 else None  # of the top-p run's calls
            f_bw = b / bw_chars if bw_chars and streams <= 1 else None  # the bound of one stream only
            f_bw1 = b / (bw1 * 1e3 / sizes[precision]) if bw1 and streams <= 1 else None
            used = f_bw1 if share is not None and share > 0.5 and f_bw1 is not None else f_bw  # the threads used
            f_peak = b / peak_chars if peak_chars else None
            key = name if precision == "fp32" else f"{name}, bf16"
            res["chars/s"][key] = {"temperature": a, "top_p_0.9": b, "of_bandwidth": used, "of_peak": f_peak,
                                   "one_thread_share": share, "of_bandwidth_all_threads": f_bw,
                                   "of_bandwidth_one_thread": f_bw1, "stages_per_step": stages[2 * k + 1]}  # fmt: skip
            fb = f"{used:12.1%}" if used is not None else f"{'n/a' if streams <= 1 else '':>12}"
            fp = f"{f_peak:7.1%}" if f_peak is not None else f"{'n/a':>7}"
            print(f"| {name:30} | {precision:9} | {a:16,.0f} | {b:10,.0f} | {fb} | {fp} |")
            if share is not None and f_bw is not None:
                print(f"#   ran on one thread for {share:.0%} of its characters (chosen by measurement); "
                      f"of {threads} threads' bandwidth {f_bw:.1%}"
                      + (f", of one thread's {f_bw1:.1%}" if f_bw1 is not None else "")
                      + f"; {stages[2 * k + 1]:.1f} stages a character")  # fmt: skip
        many = [rates[2 * k + 1] for k, (_, streams, _) in enumerate(rows) if streams > 0]
        ok = all(a < b for a, b in zip(many, many[1:], strict=False))
        res.setdefault("more_streams_faster", {})[precision] = ok
        print(f"# {precision}, top-p 0.9: more streams, more chars/s in all (1 < 8 < 64): {'yes' if ok else 'NO'}")
    if not args.no_torch:
        model, tok = next(iter(models.values()))
        tokens = [int(t) for t in tok.encode(PROMPT)]
        for batch in (1, 64):
            n = max(200, (args.chars // 10) // batch) if not args.quick else 50
            cps = isolated(time_torch, model.cfg, tokens, batch, n, args.repeats, threads)
            name = f"PyTorch eager + KV cache, batch {batch}"
            res["chars/s"][name] = {"temperature": cps}
            print(f"| {name:30} | fp32      | {cps:16,.0f} | {'':>10} | {'':>12} | {'':>7} |")
    res["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if not args.quick:
        append_record("bench_sample", res)
    print("\n" + json.dumps(res))
    return res


if __name__ == "__main__":
    main()

"""Training and sampling throughput: every fastchar backend, and PyTorch on the identical model.

    python -m benchmarks.bench_train                 # B = 12 and 64, all backends, PyTorch if installed
    python -m benchmarks.bench_train --compile       # also torch.compile (17-19 s to compile)
    python -m benchmarks.bench_train --scaling       # tokens/s against d_model and B, 1 and 2 threads
    python -m benchmarks.bench_train --memory        # peak RSS of B = 64 and its growth over 1,000 steps
    python -m benchmarks.bench_train --quick         # a few steps of everything: proves it runs
    python -m benchmarks.bench_train --breakdown     # only where a step goes, kernel by kernel
    python -m benchmarks.bench_train --shapes all    # issue 10's shapes against every PyTorch contender
    python -m benchmarks.bench_train --shapes all --rounds 3   # the same, 3 rounds: medians, per-round ratios
    python -m benchmarks.bench_train --shapes wide --breakdown   # where a step goes at a shape

A training step is batch + forward + backward + clip + AdamW; tokens/s = B * T / median step time.
Every backend is first checked against the reference (loss of one batch). Appends one JSON line to
benchmarks/results/bench_train.jsonl and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import string
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np

from benchmarks.common import (
    ChildDied,
    append_record,
    build_peak,
    isolated,
    machine,
    median_time,
    peak_round_trip,
    peak_rss_mib,
    rss_mib,
    table,
)
from fastchar import CharTokenizer, Model, ModelConfig, TrainConfig, generate
from fastchar.backends import available_backends, default_backend
from fastchar.data import TextDataset, find_corpus
from fastchar.errors import DataError
from fastchar.graph import function_name
from fastchar.optim import AdamW, lr_at
from fastchar.threads import set_threads

PROMPT = "ROMEO:"


# -- data -------------------------------------------------------------------------------------


def make_batches(cfg: ModelConfig, B: int, n: int, data: TextDataset | None, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if data is None:  # synthetic: keeps data loading out of the timing
        return [(rng.integers(0, cfg.vocab_size, (B, cfg.ctx)).astype(np.int32),) * 2 for _ in range(n)]
    return [data.get_batch("train", B, cfg.ctx, rng) for _ in range(n)]


def load_corpus(synthetic: bool) -> TextDataset | None:
    if synthetic:
        return None
    try:
        return TextDataset(find_corpus(download=False))
    except DataError:
        return None


# -- fastchar ---------------------------------------------------------------------------------


def fastchar_step(model: Model, opt: AdamW, tcfg: TrainConfig, batch: tuple, step: int) -> float:
    x, y = batch
    loss = model.forward(x, y)
    model.backward()
    opt.step(lr_at(step, tcfg))
    return loss


def check_backend(backend: str, cfg: ModelConfig, batch: tuple) -> None:
    """Correctness before timing: the loss of one batch matches the reference."""
    want = Model(cfg, backend="numpy", seed=0).forward(*batch)
    got = Model(cfg, backend=backend, seed=0).forward(*batch)
    if abs(got - want) > 1e-4 * abs(want):
        raise SystemExit(f"{backend}: loss {got} differs from the reference's {want}; not timing it")


def time_fastchar(
    backend: str, cfg: ModelConfig, B: int, steps: int, warmup: int, data, precision: str = "fp32"
) -> dict:
    model = Model(cfg, backend=backend, seed=0, precision=precision)
    tcfg = TrainConfig(batch=B, steps=10**6)
    opt = AdamW(model, tcfg)
    batches = make_batches(cfg, B, steps + warmup, data)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        fastchar_step(model, opt, tcfg, batch, i)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {"step_ms": step * 1e3, "tok_s": B * cfg.ctx / step}


def breakdown(backend: str, cfg: ModelConfig, B: int, steps: int, data, precision: str = "fp32") -> dict[str, float]:
    """ms per step by kernel, timed by wrapping the callables the training plan itself calls
    (graph.Plan.timed), the optimizer's two kernels and zero_grad; 'python + other' is the rest.
    Keys are "kernel  module.function"; the extra key "named %" is the share the kernels account for."""
    model = Model(cfg, backend=backend, seed=0, precision=precision)
    spent: dict[str, float] = defaultdict(float)
    names: dict[str, str] = {}

    def key(step) -> str:
        label = f"{step.kernel:<26} {function_name(step.fn)}"
        names[step.kernel] = label
        return label

    model.plan(B).timed(spent, key)  # the calls a step makes, wrapped in place
    inner = model.kernels

    def timed(label, fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spent[label] += time.perf_counter() - t0
            return out

        return call

    optimizer = {k: timed(f"{k:<26} {function_name(getattr(inner, k))}", getattr(inner, k))
                 for k in ("grad_norm", "adamw_update")}  # fmt: skip
    model.kernels = SimpleNamespace(**{**vars(inner), **optimizer})
    model.zero_grad = timed(f"{'zero_grad':<26} numpy fill of the gradient arenas", model.zero_grad)
    tcfg = TrainConfig(batch=B, steps=10**6)
    opt = AdamW(model, tcfg)
    batches = make_batches(cfg, B, steps + 2, data)
    for i in range(2):
        fastchar_step(model, opt, tcfg, batches[i], i)
    spent.clear()
    t0 = time.perf_counter()
    for i in range(2, steps + 2):
        fastchar_step(model, opt, tcfg, batches[i], i)
    total = time.perf_counter() - t0
    result = {k: v / steps * 1e3 for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    named = sum(result.values())
    result["python + other"] = total / steps * 1e3 - named
    result["total"] = total / steps * 1e3
    result["named %"] = 100 * named / result["total"]
    return result


def breakdown_report(args, cfg: ModelConfig, data, backends: list[str]) -> dict:
    """--breakdown: where a step goes, kernel by kernel, for every backend, batch and precision."""
    record: dict = {}
    for B in args.batch:
        for backend in backends:
            for precision in ["fp32"] + (["bf16"] if _bf16_ok(backend) else []):
                parts = breakdown(backend, cfg, B, max(2, args.steps // 2), data, precision)
                record[f"{backend}/{precision}/B{B}"] = parts
                rows = [[k, v, f"{100 * v / parts['total']:.1f} %"] for k, v in parts.items() if k != "named %"]
                print(f"\n## Where a step goes: {backend}, {precision}, B = {B} (ms per step; "
                      f"{parts['named %']:.1f} % in named kernels)\n")  # fmt: skip
                print(table(["kernel  module.function", "ms", "share"], rows))
    return record


def time_sampling(backend: str, cfg: ModelConfig, tokenizer: CharTokenizer, n: int, repeats: int) -> float:
    model = Model(cfg, backend=backend, seed=0)
    generate(model, tokenizer, PROMPT, n, seed=0)  # warm-up at full length: compile, caches, thread pool
    seconds = median_time(lambda: generate(model, tokenizer, PROMPT, n, seed=0), repeats, warmup=0)
    return n / seconds


# -- PyTorch ----------------------------------------------------------------------------------


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def reference_weights(cfg: ModelConfig) -> dict:
    """The seed-0 weights of the fastchar model, name -> array, made in the parent for time_torch's
    child, so that the child never loads fastchar's compiled kernels (and their libgomp)."""
    params = Model(cfg, backend="numpy", seed=0).params
    return {name: np.array(params[name]) for name, _ in params.specs}


def time_torch(cfg, B, steps, warmup, data, threads, mode="eager", fused=False, autocast=False, weights=None) -> dict:
    """Median step of PyTorch on the same model (weights: reference_weights(cfg), or made here).
    torch.compile gets a fresh inductor cache of its own: kernels cached in the shared
    /tmp/torchinductor_<user> by runs held to another ISA (or another torch) made its child abort
    with heap corruption on Zen 4 (torch 2.13)."""
    if mode == "compile" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import shutil
        from multiprocessing.util import Finalize

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastchar-inductor-")
        # a multiprocessing child runs no atexit handlers, but its finalizers with an exit priority
        Finalize(None, shutil.rmtree, args=(os.environ["TORCHINDUCTOR_CACHE_DIR"], True), exitpriority=0)

    if os.environ.get("FASTCHAR_SET_GOMP_SPINCOUNT"):  # PyTorch gets its own libgomp defaults, not fastchar's
        os.environ.pop("GOMP_SPINCOUNT", None)
    import contextlib

    import torch

    from fastchar.torch_model import TorchGPT

    torch.set_num_threads(threads)
    model = TorchGPT(cfg)
    model.load_from(weights if weights is not None else reference_weights(cfg))
    tcfg = TrainConfig(batch=B, steps=10**6)
    opt = torch.optim.AdamW(
        model.decay_groups(tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps, fused=fused
    )
    forward = torch.compile(model) if mode == "compile" else model
    batches = [
        (torch.from_numpy(x).long(), torch.from_numpy(y).long()) for x, y in make_batches(cfg, B, steps + warmup, data)
    ]
    params = list(model.parameters())

    def step(i, batch):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            _, loss = forward(*batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(i, tcfg)
        opt.step()

    t0 = time.perf_counter()
    step(0, batches[0])
    first = time.perf_counter() - t0
    times = []
    for i, batch in enumerate(batches[1:], start=1):
        t0 = time.perf_counter()
        step(i, batch)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"step_ms": s * 1e3, "tok_s": B * cfg.ctx / s, "first_step_s": first}


def time_torch_sampling(cfg, tokenizer, n, repeats, threads, cache: bool) -> float:
    import torch

    from fastchar.torch_model import TorchGPT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchGPT(cfg)
    model.load_from(Model(cfg, backend="numpy", seed=0).params)
    idx = torch.tensor([tokenizer.encode(PROMPT).tolist()])
    fn = model.generate_cache if cache else model.generate_nocache
    fn(idx, 10)
    return n / median_time(lambda: fn(idx, n), repeats, warmup=0)


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=None, help="fastchar backends (default: all available)")
    p.add_argument("--batch", type=int, nargs="+", default=[12, 64], help="batch sizes B (default 12 64)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads for every pool (default 2)")
    p.add_argument("--synthetic", action="store_true", help="random tokens instead of Tiny Shakespeare")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (always on with --shapes)")
    p.add_argument("--no-compile", action="store_true", help="--shapes without torch.compile (~20 s per shape)")
    p.add_argument("--sample-chars", type=int, default=500, help="characters per sampling run (default 500)")
    p.add_argument("--scaling", action="store_true", help="tokens/s against d_model and B, 1 and 2 threads")
    p.add_argument("--memory", action="store_true", help="peak RSS at B = 64 and growth over --memory-steps")
    p.add_argument("--memory-steps", type=int, default=1000)
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="only where a step goes, kernel by kernel (the plan's own calls timed), every backend and precision",
    )
    p.add_argument("--quick", action="store_true", help="a few steps of everything; records nothing")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fastchar's products (default fp32)")
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=(*SHAPES, "all"),
        default=None,
        help="instead of the usual report: fastchar fp32/bf16 against PyTorch eager and torch.compile, fp32 "
        "and bf16 autocast, at issue 10's shapes (all: " + ", ".join(SHAPES) + "); with --breakdown, where "
        "a step goes at those shapes",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--shapes: time every system this many times, round by round, and give medians and the median "
        "of the rounds' own ratios (default 1); on a machine whose speed drifts, 3 or more",
    )
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.quick:
        args.steps, args.warmup, args.sample_chars, args.memory_steps = 3, 1, 40, 20
        args.batch = args.batch[:1] if args.batch != [12, 64] else [4]
    set_threads(args.threads)
    if args.shapes:
        return shapes_breakdown(args) if args.breakdown else shapes_report(args)
    backends = args.backends or available_backends()
    data = load_corpus(args.synthetic)
    tokenizer = data.tokenizer if data is not None else CharTokenizer(set(string.ascii_letters + " \n:,.!?'-;&$3"))
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size)
    if args.breakdown:
        print(f"machine: {machine(args.threads)}")
        record = {"machine": machine(args.threads), "config": cfg.to_dict(), "steps": args.steps}
        record["breakdown"] = breakdown_report(args, cfg, data, [b for b in backends if b != "numpy"] or backends)
        if not (args.quick or args.no_record):
            print(f"\nrecorded in {append_record('bench_train', record)}")
        return record
    print(f"machine: {machine(args.threads)}")
    print(f"data: {'Tiny Shakespeare' if data is not None else 'synthetic'}; default backend: {default_backend()}")
    record: dict = {"machine": machine(args.threads), "config": cfg.to_dict(), "steps": args.steps, "train": {}}

    # training throughput
    rows = []
    torch_ok = torch_available() and not args.no_torch
    for B in args.batch:
        check_batch = make_batches(cfg, 2, 1, data)[0]
        results = {}
        for backend in backends:
            check_backend(backend, cfg, check_batch) if backend != "numpy" else None
            steps = max(2, args.steps // 6) if backend == "numpy" else args.steps
            results[backend] = time_fastchar(backend, cfg, B, steps, args.warmup, data, args.precision)
        if torch_ok:
            common = (cfg, B, args.steps, args.warmup, data, args.threads)
            weights = reference_weights(cfg)
            results["torch eager"] = isolated(time_torch, *common, "eager", False, False, weights)
            results["torch eager, fused AdamW"] = isolated(time_torch, *common, "eager", True, False, weights)
            if args.compile:
                results["torch.compile"] = isolated(time_torch, *common, "compile", False, False, weights)
        eager = results.get("torch eager", {}).get("tok_s")
        compiled = results.get("torch.compile", {}).get("tok_s")
        for name, r in results.items():
            rows.append([B, name, r["tok_s"], r["step_ms"],
                         f"{r['tok_s'] / eager:.2f}x" if eager else "-",
                         f"{r['tok_s'] / compiled:.2f}x" if compiled else "-"])  # fmt: skip
        record["train"][f"B{B}"] = results
    print("\n## Training throughput (tokens/s, median step)\n")
    print(table(["B", "system", "tok/s", "ms/step", "vs torch eager", "vs torch.compile"], rows))

    # where a step's time goes
    record["breakdown"] = {}
    for B in args.batch:
        rows = []
        for backend in backends:
            if backend == "numpy" and len(backends) > 1:
                continue
            parts = breakdown(backend, cfg, B, max(2, args.steps // 2), data)
            record["breakdown"][f"{backend}/B{B}"] = parts
            rows += [[backend, k, v, f"{100 * v / parts['total']:.0f} %"] for k, v in parts.items() if k != "named %"]
        print(f"\n## Where a step goes, B = {B} (ms per step)\n")
        print(table(["backend", "kernel  module.function", "ms", "share"], rows))

    # sampling
    rows = []
    repeats = 1 if args.quick else 3
    record["sampling"] = {}
    for backend in backends:
        cps = time_sampling(backend, cfg, tokenizer, args.sample_chars, repeats)
        record["sampling"][backend] = cps
        rows.append([backend, cps])
    if torch_ok:
        for cache in (False, True):
            name = f"torch eager, {'KV cache' if cache else 'no cache'}"
            cps = isolated(time_torch_sampling, cfg, tokenizer, args.sample_chars, repeats, args.threads, cache)
            record["sampling"][name] = cps
            rows.append([name, cps])
    print(f"\n## Sampling (batch 1, {args.sample_chars} characters from {PROMPT!r}; chars/s)\n")
    print(table(["system", "chars/s"], rows))

    if args.scaling:
        record["scaling"] = scaling(args, data, backends)
    if args.memory:
        record["memory"] = memory(args, cfg, data, backends)
    if not (args.quick or args.no_record):
        path = append_record("bench_train", record)
        print(f"\nrecorded in {path}")
    return record


# issue 10's table: name -> (B, T, C, L, NH); the MLP is 4C everywhere
SHAPES = {"base": (12, 64, 128, 4, 8), "wide": (12, 64, 256, 4, 8), "long": (16, 256, 128, 4, 8),
          "nanogpt": (8, 256, 384, 6, 6)}  # fmt: skip


def shapes_report(args) -> dict:
    """fastchar fp32 and bf16 against PyTorch eager and torch.compile (unless --no-compile), each in fp32
    and, where the path has AVX512_BF16, bf16 autocast, at the
    shapes of SHAPES, side by side with ratios and each figure's fraction of this machine's measured
    peak (benchmarks/peak.c: fp32 for fp32 figures, bf16 for bf16 ones; FLOP per token as in
    flop_per_token). With FASTCHAR_ISA set, PyTorch is held to the same instruction set
    (fastchar.isa.torch_env: ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) and the peak
    is that instruction set's. Appends one JSON line (unless --no-record/--quick)."""
    from fastchar import isa

    names = list(SHAPES) if "all" in args.shapes else args.shapes
    data = load_corpus(args.synthetic)
    vocab = data.vocab_size if data is not None else 65
    backend = (args.backends or [default_backend()])[0]
    sel = isa.selection()
    if sel.forced:
        os.environ.update(isa.torch_env(sel.path))  # read by the spawned PyTorch processes as they start
    precisions = ["fp32"] + (["bf16"] if _bf16_ok(backend) else [])
    torch_ok = torch_available() and not args.no_torch
    peak = machine_peak(args.threads, sel.path, round_trip=True)
    start_trip = peak.pop("round_trip_ns", None)
    record: dict = {"machine": {**machine(args.threads), **cpu_ids()}, "backend": backend, "steps": args.steps,
                    "rounds": args.rounds, "isa": sel.path, "torch_env": isa.torch_env(sel.path) if sel.forced else {},
                    "peak_gflops": peak, "shapes": {}}  # fmt: skip
    bf16 = sel.bf16_cpu and sel.path == "avx512"  # without AVX512_BF16 autocast emulates bf16 (20-100x slower)
    rows, summary = [], []
    failed: dict[str, str] = {}
    for name in names:
        B, T, C, L, NH = SHAPES[name]
        cfg, _ = shape_config(name, vocab)
        flop = flop_per_token(cfg)
        rounds: list[dict] = []  # one dict per round: system -> {"step_ms", "tok_s"}
        weights = reference_weights(cfg) if torch_ok else None
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"{name}: round {r + 1} of {args.rounds}", flush=True)
            res: dict = {}
            for prec in precisions:
                res[f"fastchar {prec}"] = time_fastchar(backend, cfg, B, args.steps, args.warmup, data, prec)
            if torch_ok:
                common = (cfg, B, args.steps, args.warmup, data, args.threads)
                for mode in ("eager",) if args.no_compile else ("eager", "compile"):
                    label = "torch eager" if mode == "eager" else "torch.compile"
                    for prec in ("fp32", "bf16") if bf16 else ("fp32",):
                        if f"{label} {prec}" in failed:
                            continue
                        try:
                            res[f"{label} {prec}" + (" autocast" if prec == "bf16" else "")] = isolated(
                                time_torch, *common, mode, False, prec == "bf16", weights
                            )
                        except ChildDied as exc:  # PyTorch aborted in native code: say so, time the rest
                            failed[f"{label} {prec}"] = str(exc)
                            print(f"{name}: {label} {prec} did not finish ({exc}); left out of the comparison")
            rounds.append(res)
        res = combine_rounds(rounds)
        for sys_name, r in res.items():
            limit = peak.get("bf16" if "bf16" in sys_name else "fp32")
            r["peak_fraction"] = r["tok_s"] * flop / (limit * 1e9) if limit else None
        record["shapes"][name] = {"shape": [B, T, C, L, NH], "flop_per_token": flop, **res}
        if failed:
            record["shapes"][name]["failed"] = dict(failed)
            failed.clear()
        for sys_name, r in res.items():
            ref = res.get("torch eager bf16 autocast" if "bf16" in sys_name else "torch eager fp32", {}).get("tok_s")
            rows.append([name, f"{B},{T},{C},{L},{NH}", sys_name, r["tok_s"], r["step_ms"], _of_peak(r),
                         f"{r['tok_s'] / ref:.2f}x" if ref else "-"])  # fmt: skip
        ours = [k for k in res if k.startswith("fastchar")]
        theirs = [k for k in res if k.startswith("torch")]
        if theirs:
            best = max(ours, key=lambda k: res[k]["tok_s"])
            rival = max(theirs, key=lambda k: res[k]["tok_s"])
            per_round = round_ratios(rounds)
            ratio = statistics.median(per_round)
            record["shapes"][name]["best_ratio"] = ratio
            record["shapes"][name]["round_ratios"] = per_round
            spread = f" ({min(per_round):.2f}-{max(per_round):.2f})" if len(per_round) > 1 else ""
            summary.append([name, best, res[best]["tok_s"], _of_peak(res[best]), rival, res[rival]["tok_s"],
                            _of_peak(res[rival]), f"{ratio:.2f}x{spread}"])  # fmt: skip
    ids = cpu_ids()
    trip = (start_trip, round_trip_ns() if start_trip is not None else None)
    record["round_trip_ns"] = {"start": trip[0], "end": trip[1]}
    print(f"\n## Training throughput at issue 10's shapes (backend {backend}, tokens/s, median step)\n")
    print(
        f"machine: {record['machine']['cpu']} (family {ids['cpu_family']}, model {ids['cpu_model_number']}), "
        f"{args.threads} threads; kernel path {sel.path}"
        + (
            f" (FASTCHAR_ISA; PyTorch held to it: {' '.join(f'{k}={v}' for k, v in isa.torch_env(sel.path).items())})"
            if sel.forced
            else ""
        )  # fmt: skip
    )
    limits = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items() if v and k in ("fp32", "bf16"))
    print(f"peak ({peak.get('isa', '-')}, {args.threads} threads, benchmarks/peak.c): {limits or 'not measured'}")
    if None not in trip:
        print(f"a cache line's round trip between two threads: {trip[0]:.0f} ns at the start, {trip[1]:.0f} at the end")
    print()
    print(
        table(["shape", "B,T,C,L,NH", "system", "tok/s", "ms/step", "of peak", "vs torch eager same precision"], rows)
    )
    if summary:
        print("\n## fastchar's best against PyTorch's best\n")
        if args.rounds > 1:
            print(
                f"tok/s: medians of {args.rounds} rounds, each round every system once, one after another; "
                "ratio: the median of the rounds' own ratios (best fastchar / best PyTorch in that round), "
                "with their range\n"
            )
        print(table(["shape", "fastchar", "tok/s", "of peak", "PyTorch", "tok/s", "of peak", "ratio"], summary))
    if not (args.quick or args.no_record):
        path = append_record("bench_train", record)
        print(f"\nrecorded in {path}")
    return record


def combine_rounds(rounds: list[dict]) -> dict:
    """{system: {"step_ms", "tok_s", "rounds_tok_s"}}: each system's median over the rounds that timed it."""
    out = {}
    for sys_name in rounds[0]:
        runs = [r[sys_name] for r in rounds if sys_name in r]
        tok = [r["tok_s"] for r in runs]
        out[sys_name] = {"step_ms": statistics.median(r["step_ms"] for r in runs), "tok_s": statistics.median(tok),
                         "rounds_tok_s": tok}  # fmt: skip
    return out


def round_ratios(rounds: list[dict]) -> list[float]:
    """Per round, fastchar's best tokens/s over PyTorch's best in that same round (rounds without both: none)."""
    ratios = []
    for res in rounds:
        ours = [v["tok_s"] for k, v in res.items() if k.startswith("fastchar")]
        theirs = [v["tok_s"] for k, v in res.items() if k.startswith("torch")]
        if ours and theirs:
            ratios.append(max(ours) / max(theirs))
    return ratios


def _of_peak(r: dict) -> str:
    """A result's fraction of the machine's peak (of its precision), as "63 %", or "-" unmeasured."""
    return f"{100 * r['peak_fraction']:.0f} %" if r.get("peak_fraction") is not None else "-"


def shape_config(name: str, vocab: int) -> tuple[ModelConfig, int]:
    """(ModelConfig, B) of one of SHAPES; the MLP is 4C wide."""
    B, T, C, L, NH = SHAPES[name]
    return ModelConfig(vocab_size=vocab, ctx=T, d_model=C, n_layer=L, n_head=NH, mlp_hidden=4 * C), B


def shapes_breakdown(args) -> dict:
    """--shapes NAME.. --breakdown: where a step goes, kernel by kernel, at those shapes (fastchar's
    default backend, fp32 and, where the path has it, bf16)."""
    from fastchar import isa

    names = list(SHAPES) if "all" in args.shapes else args.shapes
    data = load_corpus(args.synthetic)
    vocab = data.vocab_size if data is not None else 65
    backend = (args.backends or [default_backend()])[0]
    print(f"machine: {machine(args.threads)}; kernel path {isa.path()}")
    record: dict = {}
    for name in names:
        cfg, B = shape_config(name, vocab)
        for precision in ["fp32"] + (["bf16"] if _bf16_ok(backend) else []):
            parts = breakdown(backend, cfg, B, max(2, args.steps), data, precision)
            record[f"{name}/{precision}"] = parts
            rows = [[k, v, f"{100 * v / parts['total']:.1f} %"] for k, v in parts.items() if k != "named %"]
            speed = B * cfg.ctx / parts["total"] * 1e3
            print(f"\n## Where a step goes: {name} {SHAPES[name]}, {backend}, {precision} (ms per step; "
                  f"{speed:,.0f} tok/s; {parts['named %']:.1f} % in named kernels)\n")  # fmt: skip
            print(table(["kernel  module.function", "ms", "share"], rows))
    return record


def flop_per_token(cfg: ModelConfig) -> float:
    """Training FLOP per token: 6 x the product weights (forward 2, backward 4) plus 12 L T C for
    attention (forward q k^T and att v: 4 T C per token per layer, backward twice that)."""
    L, C, T = cfg.n_layer, cfg.d_model, cfg.ctx
    weights = L * (C * 3 * C + C * C + 2 * C * cfg.mlp_hidden) + C * cfg.vocab_size
    return 6.0 * weights + 12.0 * L * T * C


def cpu_ids() -> dict:
    """lscpu's CPU family and model numbers, from /proc/cpuinfo (empty strings elsewhere)."""
    ids = {"cpu_family": "", "cpu_model_number": ""}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "cpu family" and not ids["cpu_family"]:
                    ids["cpu_family"] = value.strip()
                elif key == "model" and not ids["cpu_model_number"]:
                    ids["cpu_model_number"] = value.strip()
    except OSError:
        pass
    return ids


def machine_peak(threads: int, path: str, round_trip: bool = False) -> dict:
    """{"isa", "fp32", "bf16"} GFLOP/s of benchmarks/peak.c at `threads` threads for the instruction set
    of path ("avx512" or "avx2"; other paths: {}), compiled here with cc (or $CC); {} if that fails.
    With round_trip (and threads > 1), also "round_trip_ns": a cache line's round trip between two
    threads (peak.c --latency), which says where the host runs the two virtual CPUs (see
    docs/performance.md: a step's figures move with it)."""
    if path not in ("avx512", "avx2"):
        return {}
    with _peak_exe() as exe:
        if exe is None:
            return {}
        out = subprocess.run([exe, str(threads), path], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"peak: benchmarks/peak.c did not run ({out.stderr.strip()[:200]}); no fraction of peak")
            return {}
        peak = json.loads(out.stdout.strip().splitlines()[-1])
        if round_trip and threads > 1:
            peak["round_trip_ns"] = peak_round_trip(exe)
    return peak


def round_trip_ns() -> float | None:
    """A cache line's round trip between two threads now (benchmarks/peak.c --latency), or None."""
    with _peak_exe() as exe:
        return peak_round_trip(exe) if exe is not None else None


@contextlib.contextmanager
def _peak_exe() -> Iterator[str | None]:
    """benchmarks/peak.c compiled with cc (or $CC) into a temporary folder: its path, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = build_peak(tmp, os.environ.get("CC", "cc"))
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"peak: benchmarks/peak.c did not build ({exc}); no fraction of peak")
            exe = None
        yield exe


def _bf16_ok(backend: str) -> bool:
    try:
        Model(ModelConfig(n_layer=1, d_model=16, n_head=1, mlp_hidden=16, ctx=4), backend=backend, precision="bf16")
    except Exception:  # ConfigError: no AVX512_BF16 here, or the backend has no bf16 kernels
        return False
    return True


def scaling(args, data, backends) -> dict:
    best = default_backend() if default_backend() in backends else backends[0]
    vocab = data.vocab_size if data is not None else 65  # the synthetic vocabulary has 65 characters too
    out: dict = {"backend": best, "d_model": {}, "batch": {}}
    widths = (64, 128) if args.quick else (64, 128, 256, 384)
    batches = (4, 12) if args.quick else (4, 12, 32, 64)
    rows = []
    for threads in (1, 2):
        set_threads(threads)
        for C in widths:
            cfg = ModelConfig(vocab_size=vocab, d_model=C, mlp_hidden=4 * C)
            r = time_fastchar(best, cfg, 12, args.steps, args.warmup, data)
            out["d_model"][f"{C}/t{threads}"] = r["tok_s"]
            rows.append([threads, f"d_model {C}, B 12", r["tok_s"], r["step_ms"]])
        for B in batches:
            r = time_fastchar(best, ModelConfig(vocab_size=vocab), B, args.steps, args.warmup, data)
            out["batch"][f"{B}/t{threads}"] = r["tok_s"]
            rows.append([threads, f"d_model 128, B {B}", r["tok_s"], r["step_ms"]])
    set_threads(args.threads)
    print(f"\n## Scaling ({best}; tokens/s)\n")
    print(table(["threads", "config", "tok/s", "ms/step"], rows))
    return out


def memory(args, cfg, data, backends) -> dict:
    best = default_backend() if default_backend() in backends else backends[0]
    model = Model(cfg, backend=best, seed=0)
    tcfg = TrainConfig(batch=64, steps=10**6)
    opt = AdamW(model, tcfg)
    rng = np.random.default_rng(0)
    rss = []
    for i in range(args.memory_steps):
        batch = data.get_batch("train", 64, cfg.ctx, rng) if data is not None else make_batches(cfg, 64, 1, None, i)[0]
        fastchar_step(model, opt, tcfg, batch, i)
        if i + 1 in (min(100, args.memory_steps), args.memory_steps):
            rss.append(rss_mib())
    out = {"backend": best, "steps": args.memory_steps, "rss_after_100_mib": rss[0], "rss_end_mib": rss[-1],
           "peak_rss_mib": peak_rss_mib(), "arena_mib": (model.acts.nbytes + model.dacts.nbytes) / 2**20}  # fmt: skip
    print(f"\n## Memory ({best}, B = 64)\n")
    print(table(["measure", "MiB"], [[k, v] for k, v in out.items() if k.endswith("mib")]))
    return out


if __name__ == "__main__":
    main()

"""Quality per second: wall-clock seconds to reach validation-loss targets on Tiny Shakespeare, and
the best validation loss within a time budget; fastchar and (when installed) PyTorch eager on the
identical model and recipe, one after the other.

    python -m benchmarks.time_to_loss --recipe ten-minutes --plot ten.png   # fastchar's recipe, both systems
    python -m benchmarks.time_to_loss --recipe one-minute --torch-mode eager
    python -m benchmarks.time_to_loss --budget 120 --batch 12   # the base model, a shorter run

The clock includes evaluation, for both systems: a target counts as reached at the first
evaluation that sees it. The cosine schedule is stretched over the budget (TrainConfig.time_budget).
PyTorch runs the same architecture (built from fastchar's graph) in the PyTorch user's best setting
on this machine: --torch-mode auto times eager fp32, eager with bf16 autocast and torch.compile
for a few steps each and trains with the fastest (compile time then counts against its budget).
Writes the curves (step, seconds, val loss) as one JSON line to benchmarks/results/time_to_loss.jsonl
and, with --plot and matplotlib installed, a PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import append_record, isolated, machine, table
from fastchar import Model, ModelConfig, TextDataset, TrainConfig, Trainer
from fastchar.data import find_corpus
from fastchar.optim import lr_at
from fastchar.recipes import RECIPES, precision_here
from fastchar.threads import set_threads
from fastchar.train import EVAL_SEED

TARGETS = (1.88, 1.70, 1.50, 1.47)
TORCH_MODES = ("eager", "bf16", "compile")


def seconds_to(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["val"] <= target:
            return point["seconds"]
    return None


def run_fastchar(data: TextDataset, mcfg: ModelConfig, tcfg: TrainConfig, backend: str, precision: str) -> list[dict]:
    model = Model(mcfg, backend=backend, seed=tcfg.seed, precision=precision)
    trainer = Trainer(model, data, tcfg, log=lambda line: None, progress=False, overwrite=True)  # its own metrics only
    trainer.train()
    return val_curve(Path(tcfg.out))


def val_curve(out: Path) -> list[dict]:
    """A run folder's evaluations from its metrics.jsonl: step, seconds, val and train loss."""
    curve = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append(
                {"step": rec["step"], "seconds": rec["elapsed"], "val": rec["val_loss"], "train": rec["train_loss"]}
            )
    return curve


def torch_setup(mcfg: ModelConfig, tcfg: TrainConfig, threads: int, mode: str):
    """PyTorch's model, optimizer, and a step function for mode (eager | bf16 | compile)."""
    import contextlib

    import torch

    from benchmarks.torch_model import TorchGPT

    torch.set_num_threads(threads)
    model = TorchGPT(mcfg)
    model.load_from(Model(mcfg, backend="numpy", seed=tcfg.seed).params)
    opt = torch.optim.AdamW(model.decay_groups(tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)
    params = list(model.parameters())
    run = torch.compile(model) if mode == "compile" else model

    def step(x: np.ndarray, y: np.ndarray, lr: float) -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
        with autocast:
            _, loss = run(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    return model, step


def torch_speed(data: TextDataset, mcfg: ModelConfig, tcfg: TrainConfig, threads: int, mode: str) -> float:
    """PyTorch's training tokens/s in mode: the median of 10 steps after 3 untimed ones."""
    _, step = torch_setup(mcfg, tcfg, threads, mode)
    rng = np.random.default_rng(tcfg.seed)
    times = []
    for i in range(13):
        x, y = data.get_batch("train", tcfg.batch, mcfg.ctx, rng)
        t0 = time.perf_counter()
        step(x, y, tcfg.lr)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return tcfg.batch * mcfg.ctx / float(np.median(times))


def run_torch(data: TextDataset, mcfg: ModelConfig, tcfg: TrainConfig, threads: int, mode: str) -> list[dict]:
    import torch

    model, train_step = torch_setup(mcfg, tcfg, threads, mode)
    rng = np.random.default_rng(tcfg.seed)
    T = mcfg.ctx

    def evaluate() -> tuple[float, float]:
        out = []
        model.eval()
        with torch.no_grad():
            for split in ("train", "val"):
                erng = np.random.default_rng([EVAL_SEED, tcfg.seed])
                total = 0.0
                for _ in range(tcfg.eval_batches):
                    x, y = data.get_batch(split, tcfg.batch, T, erng)
                    total += model(torch.from_numpy(x).long(), torch.from_numpy(y).long())[1].item()
                out.append(total / tcfg.eval_batches)
        model.train()
        return out[0], out[1]

    curve, step, start = [], 0, time.perf_counter()
    train, val = evaluate()  # as fastchar's Trainer does at step 0
    curve.append({"step": 0, "seconds": time.perf_counter() - start, "val": val, "train": train})
    eval_seconds = curve[0]["seconds"]  # kept for the final evaluation, as fastchar's Trainer does
    while step < tcfg.steps:
        now = time.perf_counter() - start + eval_seconds
        if now >= tcfg.time_budget:
            break
        lr = lr_at(step, tcfg, now / tcfg.time_budget)
        x, y = data.get_batch("train", tcfg.batch, T, rng)
        train_step(x, y, lr)
        step += 1
        if step % tcfg.eval_every == 0:
            t0 = time.perf_counter()
            train, val = evaluate()
            eval_seconds = time.perf_counter() - t0
            curve.append({"step": step, "seconds": time.perf_counter() - start, "val": val, "train": train})
    train, val = evaluate()
    curve.append({"step": step, "seconds": time.perf_counter() - start, "val": val, "train": train})
    return curve


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'); no plot written")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, curve in curves.items():
        ax.plot([p["seconds"] for p in curve], [p["val"] for p in curve], label=name)
    for target in TARGETS:
        ax.axhline(target, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("wall-clock seconds (2 threads)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(1.3, 3.0)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), help="a recipe of `fastchar train --recipe` (its model, "
                   "schedule and budget); the flags below override it")  # fmt: skip
    p.add_argument("--budget", type=float, help="seconds per system (default 600, or the recipe's)")
    p.add_argument("--batch", type=int, help="default 64")
    p.add_argument("--lr", type=float, help="default 1e-3")
    p.add_argument("--min-lr", type=float, help="default 1e-4")
    p.add_argument("--warmup", type=int, help="default 100")
    p.add_argument("--weight-decay", type=float, help="default 0.1")
    p.add_argument("--dropout", type=float, help="default 0")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default 250)")
    p.add_argument("--eval-batches", type=int, help="default 20")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--torch-mode", choices=("auto", *TORCH_MODES), default="auto",
                   help="PyTorch's setting: eager fp32, eager with bf16 autocast, torch.compile, or auto: "
                   "the fastest of the three over a few steps (default)")  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--torch-only", action="store_true", help="run only PyTorch")
    p.add_argument("--plot", metavar="PNG", help="write the curves as a PNG (needs matplotlib)")
    p.add_argument("--out", metavar="DIR", default=None, help="fastchar's run folder (default: a temporary one)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    data = TextDataset(find_corpus())
    out = args.out or tempfile.mkdtemp(prefix="fastchar-ttl-")
    recipe = RECIPES[args.recipe] if args.recipe else None
    model = dict(recipe.model) if recipe else {}
    train = {"batch": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "weight_decay": 0.1, "eval_every": 250,
             "eval_batches": 20, "time_budget": 600.0, **(recipe.train if recipe else {})}  # fmt: skip
    given = {k: getattr(args, k) for k in ("batch", "lr", "min_lr", "warmup", "weight_decay", "eval_every",
                                           "eval_batches") if getattr(args, k) is not None}  # fmt: skip
    train.update(given, **({"time_budget": args.budget} if args.budget is not None else {}))
    if args.dropout is not None:
        model["dropout"] = args.dropout
    if "d_model" in model:
        model.setdefault("mlp_hidden", 4 * model["d_model"])
    precision = precision_here(recipe, args.backend)[0] if recipe else "fp32"  # bf16 only where it runs
    mcfg = ModelConfig(vocab_size=data.vocab_size, **model)
    tcfg = TrainConfig(**train, steps=10**9, seed=args.seed, out=out, log_every=10**9)
    print(f"machine: {machine(args.threads)}")
    print(f"model: {mcfg.to_dict()}\ntrain: {tcfg.to_dict()}")
    curves: dict[str, list[dict]] = {}
    if not args.torch_only:
        curves[f"fastchar {precision}"] = run_fastchar(data, mcfg, tcfg, args.backend, precision)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    torch_speeds = {}
    if have_torch and not args.no_torch:
        mode = args.torch_mode
        if mode == "auto":  # the PyTorch user's best setting here, by a few timed steps of each
            for m in TORCH_MODES:
                try:
                    torch_speeds[m] = isolated(torch_speed, data, mcfg, tcfg, args.threads, m)
                except Exception as exc:  # torch.compile needs a working C++ toolchain
                    print(f"torch {m}: failed ({type(exc).__name__}: {exc}); not a candidate", flush=True)
                    continue
                print(f"torch {m}: {torch_speeds[m]:,.0f} tok/s", flush=True)
            mode = max(torch_speeds, key=torch_speeds.get)
        curves[f"torch {mode}"] = isolated(run_torch, data, mcfg, tcfg, args.threads, mode)
    rows = []
    summary = {}
    for name, curve in curves.items():
        best = min(curve, key=lambda q: q["val"])
        reach = {str(t): seconds_to(curve, t) for t in TARGETS}
        summary[name] = {
            "best_val": best["val"],
            "best_at_s": best["seconds"],
            "steps": curve[-1]["step"],
            "seconds_to": reach,
        }
        reached = ["-" if reach[str(t)] is None else f"{reach[str(t)]:.0f} s" for t in TARGETS]
        rows.append([name, curve[-1]["step"], *reached, f"{best['val']:.4f}", f"{best['seconds']:.0f} s"])
    what = f"recipe {args.recipe}" if recipe else f"B = {tcfg.batch}"
    print(f"\n## Time to validation loss ({what}, budget {tcfg.time_budget:.0f} s, {args.threads} threads)\n")
    print(table(["system", "steps", *[f"to {t}" for t in TARGETS], "best val", "best at"], rows))
    record = {
        "machine": machine(args.threads),
        "model": mcfg.to_dict(),
        "train": tcfg.to_dict(),
        "recipe": args.recipe,
        "precision": precision,
        "torch_speeds": torch_speeds,
        "summary": summary,
        "curves": curves,
    }
    if args.plot:
        title = (f"Tiny Shakespeare, {what}\nC={mcfg.d_model} L={mcfg.n_layer} T={mcfg.ctx} {mcfg.position}, "
                 f"B={tcfg.batch}, dropout {mcfg.dropout:g}")  # fmt: skip
        if plot(curves, Path(args.plot), title):
            print(f"plot: {args.plot}")
    if not args.no_record:
        print(f"recorded in {append_record('time_to_loss', record)}")
    if any(math.isnan(q["val"]) for c in curves.values() for q in c):
        raise SystemExit("a validation loss was NaN")
    return record


if __name__ == "__main__":
    main()

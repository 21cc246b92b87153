"""Quality per second: wall-clock seconds to reach validation-loss targets on Tiny Shakespeare, and
the best validation loss within a time budget; fastchar and (when installed) PyTorch eager on the
identical model and recipe, one after the other.

    python -m benchmarks.time_to_loss                           # B = 64, 600 s each, SPEC's recipe
    python -m benchmarks.time_to_loss --budget 120 --batch 12   # a shorter run
    python -m benchmarks.time_to_loss --dropout 0.1 --plot curve.png

The clock includes evaluation, for both systems: a target counts as reached at the first
evaluation that sees it. The cosine schedule is stretched over the budget (TrainConfig.time_budget).
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
from fastchar.threads import set_threads
from fastchar.train import EVAL_SEED

TARGETS = (1.88, 1.76, 1.60, 1.50)


def seconds_to(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["val"] <= target:
            return point["seconds"]
    return None


def run_fastchar(data: TextDataset, mcfg: ModelConfig, tcfg: TrainConfig, backend: str) -> list[dict]:
    model = Model(mcfg, backend=backend, seed=tcfg.seed)
    trainer = Trainer(model, data, tcfg, log=lambda line: None, progress=False, overwrite=True)  # its own metrics only
    trainer.train()
    curve = []
    for line in (Path(tcfg.out) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            curve.append(
                {"step": rec["step"], "seconds": rec["elapsed"], "val": rec["val_loss"], "train": rec["train_loss"]}
            )
    return curve


def run_torch(data: TextDataset, mcfg: ModelConfig, tcfg: TrainConfig, threads: int) -> list[dict]:
    import torch

    from benchmarks.torch_model import TorchGPT

    torch.set_num_threads(threads)
    model = TorchGPT(mcfg)
    model.load_from(Model(mcfg, backend="numpy", seed=tcfg.seed).params)
    opt = torch.optim.AdamW(model.decay_groups(tcfg.weight_decay), lr=tcfg.lr, betas=tcfg.betas, eps=tcfg.eps)
    params = list(model.parameters())
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
    while step < tcfg.steps and time.perf_counter() - start < tcfg.time_budget:
        elapsed = time.perf_counter() - start
        lr = lr_at(step, tcfg, elapsed / tcfg.time_budget)
        x, y = data.get_batch("train", tcfg.batch, T, rng)
        _, loss = model(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        step += 1
        if step % tcfg.eval_every == 0:
            train, val = evaluate()
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
    p.add_argument("--budget", type=float, default=600.0, help="seconds per system (default 600)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations (default 250)")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if it is installed")
    p.add_argument("--torch-only", action="store_true", help="run only PyTorch")
    p.add_argument("--plot", metavar="PNG", help="write the curves as a PNG (needs matplotlib)")
    p.add_argument("--out", metavar="DIR", default=None, help="fastchar's run folder (default: a temporary one)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    data = TextDataset(find_corpus())
    out = args.out or tempfile.mkdtemp(prefix="fastchar-ttl-")
    mcfg = ModelConfig(vocab_size=data.vocab_size, dropout=args.dropout)
    tcfg = TrainConfig(
        batch=args.batch, steps=10**9, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup,
        weight_decay=args.weight_decay, eval_every=args.eval_every, eval_batches=args.eval_batches,
        seed=args.seed, out=out, time_budget=args.budget, log_every=10**9,
    )  # fmt: skip
    print(f"machine: {machine(args.threads)}")
    print(f"model: {mcfg.to_dict()}\ntrain: {tcfg.to_dict()}")
    curves: dict[str, list[dict]] = {}
    if not args.torch_only:
        curves["fastchar"] = run_fastchar(data, mcfg, tcfg, args.backend)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    if have_torch and not args.no_torch:
        curves["torch eager"] = isolated(run_torch, data, mcfg, tcfg, args.threads)
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
    print(f"\n## Time to validation loss (B = {args.batch}, budget {args.budget:.0f} s, {args.threads} threads)\n")
    print(table(["system", "steps", *[f"to {t}" for t in TARGETS], "best val", "best at"], rows))
    record = {
        "machine": machine(args.threads),
        "model": mcfg.to_dict(),
        "train": tcfg.to_dict(),
        "summary": summary,
        "curves": curves,
    }
    if args.plot:
        title = f"Tiny Shakespeare, B={args.batch}, dropout {args.dropout}"
        if plot(curves, Path(args.plot), title):
            print(f"plot: {args.plot}")
    if not args.no_record:
        print(f"recorded in {append_record('time_to_loss', record)}")
    if any(math.isnan(q["val"]) for c in curves.values() for q in c):
        raise SystemExit("a validation loss was NaN")
    return record


if __name__ == "__main__":
    main()

"""bf16 against fp32 on the quality that matters: validation loss after the same training run.

    python -m benchmarks.bf16_val_loss                 # 2,000 steps, B = 12, base model, backend cython
    python -m benchmarks.bf16_val_loss --steps 200     # a shorter check

Trains the base model twice from the same seed on Tiny Shakespeare (the default recipe, TrainConfig
defaults), once with precision="fp32" and once with "bf16", and prints both final validation losses,
their difference and whether it is within --tolerance (issue 10: 0.02). Exits 1 when it is not.
Appends one JSON line to benchmarks/results/bf16_val_loss.jsonl (unless --no-record).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from benchmarks.common import append_record, machine
from fastchar import Model, ModelConfig, TextDataset, TrainConfig, Trainer
from fastchar.data import find_corpus
from fastchar.threads import set_threads


def run(precision: str, backend: str, steps: int, batch: int, seed: int) -> dict:
    """One training run; returns its summary (val_loss, tok_per_s, ...)."""
    data = TextDataset(find_corpus(download=False))
    model = Model(ModelConfig(vocab_size=data.vocab_size), backend=backend, seed=seed, precision=precision)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(steps=steps, batch=batch, seed=seed, out=out, eval_every=max(1, steps // 4))
        return Trainer(model, data, cfg).train()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bf16_val_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--backend", default="cython", help="backend of both runs (default cython)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    res = {prec: run(prec, args.backend, args.steps, args.batch, args.seed) for prec in ("fp32", "bf16")}
    diff = res["bf16"]["val_loss"] - res["fp32"]["val_loss"]
    ok = abs(diff) <= args.tolerance
    for prec, r in res.items():
        print(f"{prec}: val loss {r['val_loss']:.4f} after {r['step']} steps, {r['tok_per_s']:,.0f} tokens/s")
    print(f"bf16 - fp32 = {diff:+.4f} ({'within' if ok else 'OUTSIDE'} {args.tolerance})")
    record = {"machine": machine(args.threads), "steps": args.steps, "batch": args.batch, "backend": args.backend,
              "val_loss": {k: r["val_loss"] for k, r in res.items()},
              "tok_s": {k: r["tok_per_s"] for k, r in res.items()}, "diff": diff, "ok": ok}  # fmt: skip
    if not args.no_record:
        print(f"recorded in {append_record('bf16_val_loss', record)}")
    if not ok:
        sys.exit(1)
    return record


if __name__ == "__main__":
    main()

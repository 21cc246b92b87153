"""Run nanoGPT's own train.py for a fixed wall time, for the side-by-side of docs/nanogpt.md.

    python benchmarks/nanogpt_train.py --nanogpt DIR --seconds 300 --out FILE.pt [-- key=value ...]

Standalone on purpose: it imports nothing from fastchar (whose import sets up BLAS and OpenMP) and
copies no nanoGPT code. It executes DIR/train.py unchanged, as `python train.py
config/train_shakespeare_char.py key=value ...` would (the arguments after `--` go to nanoGPT's
configurator as `--key=value`), with two things added from outside:

- a wall-time stop: a PyTorch optimizer-step hook ends the run after the step that leaves no room
  for one more within --seconds (the clock starts before train.py runs, so model construction,
  nanoGPT's evaluation at step 0 and a torch.compile are inside the budget);
- a schedule that ends with the budget: from step --calibrate on (still inside warm-up when
  warmup_iters > calibrate, so no learning rate differs from a run configured up front), after every
  step the hook sets nanoGPT's lr_decay_iters to the steps done plus the steps the rest of the budget
  holds at the mean step time since step 2, so nanoGPT's own cosine ends where the budget does (what
  fastchar's --time-budget does with its cosine); max_iters is lifted so that only the budget ends
  the run.

Writes FILE.pt: {"model": state_dict (no "_orig_mod." prefix), "model_args", "steps", "seconds",
"step_seconds" (one per step), "tokens_per_step", "overrides"}; prints one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


class WallTime(Exception):
    """Raised by the step hook to leave train.py's loop once the budget is used."""


def run(nanogpt: Path, seconds: float, out: Path, overrides: list[str], config: str, calibrate: int) -> dict:
    """Execute nanogpt/train.py with config and overrides until `seconds` of wall time; save to out."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    script = nanogpt / "train.py"
    if not script.is_file():
        raise SystemExit(f"error: {script} not found (hint: --nanogpt is a checkout of karpathy/nanoGPT)")
    os.chdir(nanogpt)
    sys.path.insert(0, str(nanogpt))
    sys.argv = ["train.py", config, *[a if a.startswith("--") else "--" + a for a in overrides]]
    g: dict = {"__name__": "__main__", "__file__": str(script)}
    stamps: list[float] = []
    start = time.perf_counter()

    def hook(optimizer, args, kwargs) -> None:
        now = time.perf_counter() - start
        stamps.append(now)
        n = len(stamps)
        if n == 1:
            g["max_iters"] = 10**12  # only the budget ends the run
        if n >= calibrate:  # steps 2..n: after compilation and nanoGPT's step-0 evaluation
            per_step = (stamps[-1] - stamps[0]) / (n - 1)
            total = n + int(max(0.0, seconds - now) / per_step)
            g["lr_decay_iters"] = max(total, g["warmup_iters"] + 1)
        last = stamps[-1] - stamps[-2] if n > 1 else 0.0  # the first holds start-up and compilation
        if now + last >= seconds:
            raise WallTime

    handle = register_optimizer_step_post_hook(hook)
    try:
        exec(compile(script.read_text(), str(script), "exec"), g)
    except WallTime:
        pass
    finally:
        handle.remove()
    elapsed = time.perf_counter() - start
    model = g["model"]
    state = {k.removeprefix("_orig_mod."): v for k, v in model.state_dict().items()}
    tokens = g["batch_size"] * g["block_size"] * g["gradient_accumulation_steps"]
    steps = [b - a for a, b in zip([0.0, *stamps], stamps, strict=False)]
    summary = {
        "steps": len(stamps),
        "seconds": elapsed,
        "tokens_per_step": tokens,
        "tok_s_overall": tokens * len(stamps) / elapsed,
        "tok_s_steady": tokens * (len(steps) - 2) / sum(steps[2:]) if len(steps) > 2 else None,
        "lr_decay_iters_last": g.get("lr_decay_iters"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "overrides": overrides,
    }
    torch.save({"model": state, "model_args": g["model_args"], "step_seconds": steps, **summary}, out)
    return summary


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python benchmarks/nanogpt_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of karpathy/nanoGPT (its data prepared)")
    p.add_argument("--seconds", type=float, required=True, help="wall-time budget")
    p.add_argument("--out", type=Path, required=True, help="where to save the final weights and timings (.pt)")
    p.add_argument("--config", default="config/train_shakespeare_char.py", help="nanoGPT config file")
    p.add_argument("--calibrate", type=int, default=4, help="steps timed before fixing max_iters (default 4)")
    args = p.parse_args(argv)
    if args.calibrate < 2:
        p.error("--calibrate needs at least 2 steps")
    summary = run(args.nanogpt.resolve(), args.seconds, args.out.resolve(), overrides, args.config, args.calibrate)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

"""The `fastchar` command: train, sample, info and bench (also `python -m fastchar`).

Every option is checked before any work starts. Errors a user can cause print one line on stderr
(`error: ...`, then a `hint: ...`) and exit with status 1; Ctrl-C during training saves a checkpoint
and exits with 130. `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

from fastchar.config import POSITIONS, ModelConfig, TrainConfig
from fastchar.errors import ConfigError, FastcharError

DEFAULT_MODEL = ModelConfig()
DEFAULT_TRAIN = TrainConfig()
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

MODEL_HELP = {
    "vocab_size": "vocabulary size (default: the distinct characters of the text)",
    "d_model": f"residual width C (default {DEFAULT_MODEL.d_model})",
    "n_layer": f"transformer blocks L (default {DEFAULT_MODEL.n_layer})",
    "n_head": f"attention heads; must divide d_model (default {DEFAULT_MODEL.n_head})",
    "ctx": f"context length T in characters (default {DEFAULT_MODEL.ctx})",
    "mlp_hidden": "MLP width (default 4 * d_model)",
    "dropout": f"dropout on attention and residual branches, training only (default {DEFAULT_MODEL.dropout})",
    "position": "positions: learned (an absolute table, SPEC's base model; the default) or rope (rotary)",
    "rope_base": f"rotary base: pair i turns by p * base**(-2i/HS) (default {DEFAULT_MODEL.rope_base:g})",
}
TRAIN_HELP = {
    "batch": f"sequences per step B (default {DEFAULT_TRAIN.batch})",
    "steps": f"optimizer steps; the cosine schedule ends at the last (default {DEFAULT_TRAIN.steps})",
    "lr": f"peak learning rate after warm-up (default {DEFAULT_TRAIN.lr:g})",
    "min_lr": f"learning rate at the last step (default {DEFAULT_TRAIN.min_lr:g})",
    "warmup": f"linear warm-up steps (default {DEFAULT_TRAIN.warmup})",
    "weight_decay": f"AdamW weight decay on 2-D matrices (default {DEFAULT_TRAIN.weight_decay:g})",
    "betas": "Adam's beta1 beta2 (default 0.9 0.99)",
    "eps": f"Adam's epsilon (default {DEFAULT_TRAIN.eps:g})",
    "grad_clip": f"clip the global gradient norm to this; 0 disables (default {DEFAULT_TRAIN.grad_clip:g})",
    "eval_every": f"steps between evaluations and checkpoints (default {DEFAULT_TRAIN.eval_every})",
    "eval_batches": f"batches per split at each evaluation (default {DEFAULT_TRAIN.eval_batches})",
    "seed": f"seed for weights, batches and dropout (default {DEFAULT_TRAIN.seed})",
    "out": f"run folder for checkpoints and metrics.jsonl (default {DEFAULT_TRAIN.out})",
    "time_budget": "stop after this many seconds, stretching the schedule over them (default: off)",
    "log_every": f"steps between log lines (default {DEFAULT_TRAIN.log_every})",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="numpy, numba, cython or auto: the fastest here (default)")
    p.add_argument(
        "--threads", type=_number(int), default=None, help="threads for Numba, OpenMP and BLAS (default: all cores)"
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastchar",
        description="Train and sample a small character-level transformer on CPU cores, fast.",
        epilog="Run `fastchar COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train a model on a text file (default: Tiny Shakespeare)",
        description="Train the model of SPEC.md on a UTF-8 text file and print a sample at the end. "
        "Without --data, Tiny Shakespeare is read from $FASTCHAR_DATA_DIR or data/, or downloaded once.",
    )
    train.add_argument("--data", metavar="FILE", help="UTF-8 training text (default: Tiny Shakespeare)")
    train.add_argument(
        "--resume", metavar="DIR", help="continue exactly from a checkpoint folder (e.g. runs/base/latest)"
    )
    train.add_argument(
        "--until", type=_number(int), metavar="STEP", help="stop after this step and save (resume later)"
    )
    train.add_argument(
        "--sample-chars", type=_number(int), default=300, help="characters to sample at the end; 0: none (default 300)"
    )
    group = train.add_argument_group("model (ModelConfig)")
    for f in dataclasses.fields(ModelConfig):
        if f.name == "position":
            group.add_argument("--position", choices=POSITIONS, default=None, help=MODEL_HELP[f.name])
            continue
        kind = float if f.type == "float" else int
        group.add_argument(_flag(f.name), type=_number(kind), default=None, help=MODEL_HELP[f.name])
    group = train.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "betas":
            group.add_argument(
                "--betas", type=_number(float), nargs=2, metavar=("B1", "B2"), default=None, help=TRAIN_HELP["betas"]
            )
        elif f.name == "out":
            group.add_argument("--out", metavar="DIR", default=None, help=TRAIN_HELP["out"])
        else:
            kind = int if f.type == "int" else float
            group.add_argument(_flag(f.name), type=_number(kind), default=None, help=TRAIN_HELP[f.name])
    _add_runtime_flags(train)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser(
        "sample",
        help="sample text from a checkpoint",
        description="Continue a prompt with characters sampled from a trained model, streamed to stdout.",
    )
    sample.add_argument("--checkpoint", metavar="DIR", required=True, help="checkpoint folder (e.g. runs/base/best)")
    sample.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file instead")
    sample.add_argument("--max-new-tokens", type=_number(int), default=500, help="characters to generate (default 500)")
    sample.add_argument(
        "--temperature", type=_number(float), default=0.8, help="softmax temperature; 0 is greedy (default 0.8)"
    )
    sample.add_argument("--top-k", type=_number(int), default=None, help="sample among the k most likely characters")
    sample.add_argument(
        "--top-p", type=_number(float), default=None, help="nucleus sampling: smallest set with mass >= p, in (0, 1]"
    )
    sample.add_argument(
        "--seed", type=_number(int), default=None, help="seed; the same seed gives the same text (default: random)"
    )
    sample.add_argument(
        "--num-samples",
        type=_number(int),
        default=1,
        help="independent samples, made together in one batched decode and printed numbered (default 1)",
    )
    sample.add_argument(
        "--stop",
        metavar="TEXT",
        action="append",
        default=None,
        help="end a sample when it produces TEXT (not printed; \\n is a newline); repeatable",
    )
    sample.add_argument(
        "--ctx", type=_number(int), default=None, help="context window, at most the model's (default: the model's)"
    )
    _add_runtime_flags(sample)
    sample.set_defaults(func=cmd_sample)

    info = sub.add_parser(
        "info",
        help="show a checkpoint's config and the machine's backends and threads",
        description="Print a checkpoint's config, parameters per tensor, vocabulary, and the backends, "
        "threading layers and BLAS active on this machine.",
    )
    info.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint folder (optional)")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_runtime_flags(info)
    info.set_defaults(func=cmd_info)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (training, sampling, kernels) from a source checkout",
        description="Run benchmarks/bench_train.py (and with --kernels, bench_kernels.py). Options after "
        "the known ones pass through: e.g. `fastchar bench --quick`, `fastchar bench -- --compile --scaling`.",
    )
    bench.add_argument("--quick", action="store_true", help="a few steps of everything; records nothing")
    bench.add_argument("--kernels", action="store_true", help="also time every kernel x backend")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to bench_train (see its --help)")
    bench.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    bench.set_defaults(func=cmd_bench)
    return parser


# -- commands ---------------------------------------------------------------------------------


def _given(args: argparse.Namespace, cls: type) -> dict:
    """Fields of dataclass cls that were given on the command line."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if f.name == "betas" else value
    return values


def _setup_runtime(args: argparse.Namespace) -> None:
    from fastchar.backends import canonical
    from fastchar.threads import set_threads

    canonical(args.backend)
    set_threads(args.threads)


def cmd_train(args: argparse.Namespace) -> int:
    from fastchar.checkpoint import load
    from fastchar.data import TextDataset, find_corpus
    from fastchar.model import Model
    from fastchar.train import Trainer, check_writable

    model_args, train_args = _given(args, ModelConfig), _given(args, TrainConfig)
    if args.until is not None and args.until < 1:
        raise ConfigError(f"--until must be a positive step, got {args.until}")
    if args.sample_chars < 0:
        raise ConfigError(f"--sample-chars must be >= 0, got {args.sample_chars}")
    _setup_runtime(args)
    if args.resume:
        model = load(args.resume, backend=args.backend)
        mismatched = {k: (v, getattr(model.cfg, k)) for k, v in model_args.items() if getattr(model.cfg, k) != v}
        if mismatched:
            details = ", ".join(f"{k}={v} but the checkpoint has {old}" for k, (v, old) in mismatched.items())
            raise ConfigError(f"--resume {args.resume}: incompatible model options: {details}",
                              hint="drop the model options when resuming")  # fmt: skip
        train_cfg = TrainConfig.from_dict({**(model.train_cfg or {}), **train_args})
        dataset = TextDataset(find_corpus(args.data), tokenizer=model.tokenizer)
    else:
        train_cfg = TrainConfig(**train_args)
        check_writable(Path(train_cfg.out))
        dataset = TextDataset(find_corpus(args.data))
        model_args.setdefault("vocab_size", dataset.vocab_size)
        if "mlp_hidden" not in model_args and "d_model" in model_args:
            model_args["mlp_hidden"] = 4 * model_args["d_model"]
        model_cfg = ModelConfig(**model_args)
        model = Model(model_cfg, backend=args.backend, seed=train_cfg.seed)
    print(f"data: {dataset.path} ({len(dataset):,} characters, vocabulary {dataset.vocab_size})")
    print(f"model: {json.dumps(model.cfg.to_dict())}")
    print(f"train: {json.dumps(train_cfg.to_dict())}")
    trainer = Trainer(model, dataset, train_cfg)
    summary = trainer.train(until=args.until)
    print(
        f"done: step {summary['step']} | train {summary['train_loss']:.4f} | val {summary['val_loss']:.4f} | "
        f"best val {summary['best_val']:.4f} | {summary['tok_per_s']:,.0f} tok/s | {summary['elapsed']:.1f} s"
    )
    print(f"checkpoints: {trainer.out / 'best'} (best val), {trainer.out / 'latest'}")
    if args.sample_chars:
        from fastchar.sampler import stream

        print("--- sample (temperature 0.8, seed 0) ---")
        sys.stdout.write("\n")
        for ch in stream(model, dataset.tokenizer, "\n", args.sample_chars, temperature=0.8, seed=0):
            sys.stdout.write(ch)
        sys.stdout.write("\n")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from fastchar.checkpoint import load
    from fastchar.data import read_text
    from fastchar.errors import CheckpointError
    from fastchar.sampler import check_sampling, generate, stream

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.ctx is not None and args.ctx < 1:
        raise ConfigError(f"--ctx must be >= 1, got {args.ctx}")
    prompt = read_text(args.prompt_file) if args.prompt_file else args.prompt
    _setup_runtime(args)
    model = load(args.checkpoint, backend=args.backend)
    if model.tokenizer is None:
        raise CheckpointError(
            f"{args.checkpoint} has no tokenizer.json", hint="sample from a checkpoint a training run wrote"
        )
    if args.ctx is not None and args.ctx > model.cfg.ctx:
        raise ConfigError(f"--ctx {args.ctx} is larger than the model's context of {model.cfg.ctx}")
    model.tokenizer.encode(prompt)  # names unknown characters before anything is printed
    stop = [t.replace("\\n", "\n") for t in args.stop or []]  # a typed \n is a newline: --stop '\n\n'
    if args.num_samples == 1:
        sys.stdout.write(prompt)
        for ch in stream(model, model.tokenizer, prompt, args.max_new_tokens, args.temperature,
                         args.top_k, args.top_p, args.seed, ctx=args.ctx, stop=stop):  # fmt: skip
            sys.stdout.write(ch)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    # all samples advance together (one batched decode step each); printed when done, in order
    texts = generate(model, model.tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k,
                     args.top_p, args.seed, ctx=args.ctx, num_samples=args.num_samples, stop=stop)  # fmt: skip
    for i, text in enumerate(texts):
        sys.stdout.write(f"--- sample {i + 1} ---\n{text}\n")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from fastchar.arena import param_specs
    from fastchar.backends import available_backends, default_backend
    from fastchar.threads import thread_report

    _setup_runtime(args)
    report: dict = {}
    if args.checkpoint:
        from fastchar.checkpoint import load

        model = load(args.checkpoint, backend="numpy")
        tensors = [(name, list(shape), int(model.params[name].size)) for name, shape in param_specs(model.cfg)]
        report["checkpoint"] = {
            "path": str(model.checkpoint_path),
            "model": model.cfg.to_dict(),
            "train": model.train_cfg,
            "step": model.train_state.get("step"),
            "best_val": model.train_state.get("best_val"),
            "parameters": {"total": model.num_params(), "tensors": tensors},
            "vocabulary": "".join(model.tokenizer.chars) if model.tokenizer else None,
        }
    backends = available_backends()
    report["backends"] = {"available": backends, "default": default_backend()}
    report["threads"] = thread_report()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_format_info(report))
    return 0


def _format_info(report: dict) -> str:
    lines = []
    ck = report.get("checkpoint")
    if ck:
        lines += [f"checkpoint: {ck['path']}", f"  step {ck['step']}, best val {ck['best_val']}"]
        lines.append("  model: " + ", ".join(f"{k}={v}" for k, v in ck["model"].items()))
        if ck["train"]:
            lines.append("  train: " + ", ".join(f"{k}={v}" for k, v in ck["train"].items()))
        lines.append(f"  parameters: {ck['parameters']['total']:,}")
        for name, shape, size in ck["parameters"]["tensors"]:
            lines.append(f"    {name:<24} {str(shape):<12} {size:>9,}")
        if ck["vocabulary"] is not None:
            lines.append(f"  vocabulary ({len(ck['vocabulary'])}): {ck['vocabulary']!r}")
    b = report["backends"]
    lines.append(f"backends: {', '.join(b['available'])} (default: {b['default']})")
    t = report["threads"]
    lines.append(f"cores: {t['cores']}")
    if "numba" in t:
        lines.append(f"numba: {t['numba']['threads']} threads, threading layer {t['numba']['threading_layer']}")
    lines.append(f"openmp (cython kernels): {t['openmp']['threads'] if t['openmp'] else 'not built'} threads")
    for blas in t["blas"]:
        lines.append(
            f"blas: {blas['internal_api']} {blas['version']} ({blas['architecture']} kernels), "
            f"{blas['num_threads']} threads ({blas['filepath']})"
        )
    if t["replaced_OPENBLAS_CORETYPE"]:
        lines.append(
            f"note: OPENBLAS_CORETYPE={t['replaced_OPENBLAS_CORETYPE']} was replaced by "
            f"{t['OPENBLAS_CORETYPE']} on this AVX-512 CPU (FASTCHAR_KEEP_OPENBLAS_CORETYPE=1 keeps it)"
        )
    for omp in t["openmp_runtimes"]:
        lines.append(f"openmp runtime: {omp['internal_api']}, {omp['num_threads']} threads ({omp['filepath']})")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark scripts of a source checkout as `python -m benchmarks....` in their own
    process: the installed package never imports the benchmarks folder (a wheel does not ship it)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench_train.py").is_file():
        raise FastcharError(
            "the benchmarks are not installed with the package",
            hint="run `fastchar bench` from a source checkout (pip install -e .), which has benchmarks/",
        )
    rest = [a for a in args.rest if a != "--"] + (["--quick"] if args.quick else [])
    if args.kernels:
        kernels = [sys.executable, "-m", "benchmarks.bench_kernels", *(["--quick"] if args.quick else [])]
        code = subprocess.run(kernels, cwd=root).returncode
        if code:
            return code
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_train", *rest], cwd=root).returncode


# -- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from fastchar.train import Interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        _report(exc, args)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FastcharError as exc:
        _report(exc, args)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:  # a full disk, a permission denied: name the file, keep it short
        _report(exc, args)
        return EXIT_ERROR


def _report(exc: BaseException, args: argparse.Namespace) -> None:
    if getattr(args, "debug", False):
        traceback.print_exception(exc)
    print(f"error: {exc}", file=sys.stderr)
    hint = getattr(exc, "hint", "")
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())

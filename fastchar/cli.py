"""The `fastchar` command: train, sample, info, plot, bench and export (also `python -m fastchar`).

Every option is checked before any work starts. Errors a user can cause print one line on stderr
(`error: ...`, then a `hint: ...`) and exit with status 1; a malformed command line (an unknown
option, a value that is not a finite number, two exclusive options) exits with status 2, the Unix
convention for usage errors. Ctrl-C, SIGTERM or SIGHUP during training saves a checkpoint and exits
with 128 + the signal's number (130, 143, 129). `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from fastchar import config_file, recipes
from fastchar.config import ACTIVATIONS, NO_STEP_LIMIT, NORMS, POSITIONS, ModelConfig, TrainConfig
from fastchar.distributed import World
from fastchar.errors import ConfigError, FastcharError

DEFAULT_MODEL = ModelConfig()
DEFAULT_TRAIN = TrainConfig()
EXIT_ERROR = 1
FLUSH_EVERY = 0.05  # seconds between flushes of a streamed sample
SAMPLE_CHARS = 300  # characters `fastchar train` samples at the end
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130; SIGTERM gives 143, SIGHUP 129
GENERIC_HINTS = {  # for errors raised without a hint of their own
    "ConfigError": "run `fastchar COMMAND --help` for the options and their ranges",
    "CheckpointError": "use another checkpoint (e.g. latest instead of best)",
    "DataError": "pass a UTF-8 text file with --data FILE",
    "InputError": "use only characters the model was trained on (see `fastchar info CHECKPOINT`)",
    "BackendError": "`fastchar info` lists the backends available on this machine",
    "TrainingDiverged": "lower --lr or raise --warmup",
}

RANK_OWN_OPTIONS = ("func", "threads", "debug")  # options the ranks of one job may set differently
PYTHON_TO_FLAGS = (  # how a hint written for the Python API reads on the command line
    ("precision='fp32'", "--precision fp32"),
    ("backend='cython'", "--backend cython"),
    ("'numpy' (the bf16 reference)", "--backend numpy (the bf16 reference)"),
)
MEMORY_HINTS = {
    "train": "lower --batch or choose a smaller model; `free -m` shows the memory available",
    "sample": "lower --num-samples or --max-new-tokens; `free -m` shows the memory available",
    "eval": "lower --batch; `free -m` shows the memory available",
}

MODEL_HELP = {
    "d_model": f"residual width C (default {DEFAULT_MODEL.d_model})",
    "n_layer": f"transformer blocks L (default {DEFAULT_MODEL.n_layer})",
    "n_head": f"attention heads; must divide d_model (default {DEFAULT_MODEL.n_head})",
    "ctx": f"context length T in characters (default {DEFAULT_MODEL.ctx})",
    "mlp_hidden": "MLP width (default 4 * d_model)",
    "dropout": f"dropout on attention and residual branches, training only (default {DEFAULT_MODEL.dropout})",
    "position": "positions: learned (an absolute table; the default) or rope (rotary)",
    "rope_base": f"rotary base: pair i turns by p * base**(-2i/HS) (default {DEFAULT_MODEL.rope_base:g})",
    "norm": "every norm: rmsnorm (x / rms(x) * g; the default) or layernorm ((x - mean) / std * g, no bias)",
    "activation": "the MLP's activation: relu2 (relu(x)**2; the default) or gelu (exact, erf form)",
    "tie_embeddings": "no lm_head: the logits are ln_f(x) @ wte.T (default: an untied lm_head)",
}
CHOICES = {"position": POSITIONS, "norm": NORMS, "activation": ACTIVATIONS}  # ModelConfig's string fields
TRAIN_HELP = {
    "batch": f"sequences per micro-batch B (default {DEFAULT_TRAIN.batch})",
    "grad_accum": "micro-batches K per optimizer step: the step's loss and gradient are the mean over K*B "
    f"sequences (times the ranks under mpiexec) (default {DEFAULT_TRAIN.grad_accum})",
    "steps": f"optimizer steps; the cosine schedule ends at the last (default {DEFAULT_TRAIN.steps}; with "
    "--time-budget, only a cap, and none unless given)",
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
    "out": f"run folder for checkpoints and metrics.jsonl (default: {DEFAULT_TRAIN.out}, or {DEFAULT_TRAIN.out}-2, "
    "-3, ... when that holds a run)",
    "time_budget": "stop after this many wall-clock seconds, evaluation included, stretching the schedule over "
    "them; the default step count does not apply (default: off)",
    "log_every": f"steps between log lines (default {DEFAULT_TRAIN.log_every})",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse with fastchar's error format: usage, `error: ...`, `hint: ...`, status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        print(f"hint: run `{self.prog} --help` for the options", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


PRECISION_HELP = (
    "fp32 (default) or bf16: matrix products on bf16-rounded inputs, fp32 accumulation (cython on CPUs "
    "with AVX512_BF16, or numpy's reference); weights, checkpoints and everything else stay fp32"
)


def _add_precision_flag(p: argparse.ArgumentParser, help: str = PRECISION_HELP) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None, help=help)


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        default=None,
        help="numpy, numba, cython or auto: the fastest here (default; a resume uses the run's backend)",
    )
    p.add_argument(
        "--threads", type=_number(int), default=None, help="threads for Numba, OpenMP and BLAS (default: all cores)"
    )
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastchar",
        description="Train and sample a small character-level transformer on CPU cores, fast.",
        epilog="Run `fastchar COMMAND --help` for a command's options.",
    )
    from fastchar import __version__

    parser.add_argument("--version", action="version", version=f"fastchar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train",
        help="train a model on a text file (default: Tiny Shakespeare)",
        description="Train the model of docs/architecture.md on a UTF-8 text file and print a sample at the end. "
        "Without --data, Tiny Shakespeare is read from $FASTCHAR_DATA_DIR or data/, or downloaded once.",
    )
    train.add_argument("--data", metavar="FILE", help="UTF-8 training text (default: Tiny Shakespeare)")
    train.add_argument(
        "--config",
        metavar="FILE.toml",
        help="settings from a TOML file whose keys are these flags' names (d_model = 64 or d-model = 64); flags "
        "given here override it. Every run writes its own as config.toml: --config runs/x/config.toml repeats it",
    )
    train.add_argument(
        "--recipe",
        metavar="NAME",
        help="a measured setting for a time budget: one-minute or ten-minutes (flags given beside it override "
        "its values); `--recipe list` prints each as flags",
    )
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue exactly from a checkpoint folder (e.g. runs/base/latest) or a run folder (its latest)",
    )
    train.add_argument(
        "--init-from",
        metavar="RUN_OR_CHECKPOINT",
        help="fine-tune: start from the weights of a trained model (a checkpoint, or a run folder: its best) "
        "with a fresh optimizer and schedule from step 0, on the text of --data, whose characters must be in the "
        "model's vocabulary; the architecture is the checkpoint's",
    )
    train.add_argument(
        "--until", type=_number(int), metavar="STEP", help="stop after this step and save (resume later)"
    )
    train.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files into the run folder (needs tensorboardX; "
        "view with `tensorboard --logdir runs`)",
    )
    train.add_argument(
        "--ranks",
        type=_number(int),
        metavar="N",
        help="expect N ranks: fastchar starts no processes, launch it as `mpiexec -n N fastchar train ...`",
    )
    train.add_argument(
        "--sample-chars",
        type=_number(int),
        default=None,
        help=f"characters to sample at the end; 0: none (default {SAMPLE_CHARS})",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --out folder that holds one, replacing its checkpoints and metrics",
    )
    group = train.add_argument_group("model (ModelConfig)")
    for f in dataclasses.fields(ModelConfig):
        if f.name == "vocab_size":  # the text's distinct characters, never a choice
            continue
        if f.name in CHOICES:
            group.add_argument(_flag(f.name), choices=CHOICES[f.name], default=None, help=MODEL_HELP[f.name])
            continue
        if f.name == "tie_embeddings":
            group.add_argument(_flag(f.name), action="store_true", default=None, help=MODEL_HELP[f.name])
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
    _add_precision_flag(train)
    train.set_defaults(func=cmd_train, train_parser=train)

    sample = sub.add_parser(
        "sample",
        help="sample text from a checkpoint",
        description="Continue a prompt with characters sampled from a trained model, streamed to stdout.",
    )
    sample.add_argument(
        "--checkpoint",
        metavar="DIR",
        required=True,
        help="checkpoint folder (e.g. runs/base/best), or a run folder (e.g. runs/base: its best checkpoint)",
    )
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=None, help="text to continue (default: a newline, or the vocabulary's first character)"
    )
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file instead")
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
    _add_precision_flag(sample, PRECISION_HELP + "; bf16 also decodes with bf16 products (weights packed to bf16)")
    sample.set_defaults(func=cmd_sample)
    _add_serve_parser(sub)

    info = sub.add_parser(
        "info",
        help="show a checkpoint's config and the machine's backends and threads",
        description="Print a checkpoint's config, parameters per tensor, vocabulary, and the backends, "
        "threading layers and BLAS active on this machine.",
    )
    info.add_argument(
        "checkpoint", nargs="?", metavar="CHECKPOINT", help="checkpoint or run folder (its best checkpoint); optional"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.add_argument(
        "--plan",
        action="store_true",
        help="list the kernel calls of a training step and of a decode step (op, kernel module.function, why "
        "chosen) for the checkpoint's model, or the default model; --backend and --precision choose the plan",
    )
    _add_precision_flag(info, "precision of the listed plan: fp32 (default) or bf16")
    _add_runtime_flags(info)
    info.set_defaults(func=cmd_info)

    evaluate = sub.add_parser(
        "eval",
        help="measure a checkpoint's loss on a text (nats and bits a character, accuracy)",
        description="Predict every character of a text (by default the validation split, the last 10 %, of the "
        "text the run trained on) from the characters before it, in windows of the model's context that "
        "overlap by one character, and print the mean loss in nats and bits a character, the perplexity and "
        "the share of characters that were the most likely one.",
    )
    evaluate.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="checkpoint folder, or a run folder (its best checkpoint)"
    )
    evaluate.add_argument(
        "--data",
        metavar="FILE",
        default=None,
        help="UTF-8 text to evaluate on; its characters must be in the model's vocabulary (default: the text "
        "the run trained on, else Tiny Shakespeare)",
    )
    evaluate.add_argument(
        "--split",
        choices=("val", "train", "all"),
        default="val",
        help="val: the last 10 %% of the text, the split training validates on (default); train: the first "
        "90 %%; all: the whole text (for a held-out file)",
    )
    evaluate.add_argument("--batch", type=_number(int), default=None, help="windows per forward pass (default 32)")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_precision_flag(evaluate, "fp32 (default) or bf16 products (bf16: cython on CPUs with AVX512_BF16)")
    _add_runtime_flags(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    plot = sub.add_parser(
        "plot",
        help="draw train and val loss of one or more runs into a PNG",
        description="Draw the train and validation loss of each run (its metrics.jsonl) against step and "
        'against wall-clock seconds, runs overlaid by name. Needs matplotlib: pip install "fastchar[plot]".',
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run folder a training run wrote (e.g. runs/base)")
    plot.add_argument(
        "-o", "--output", metavar="FILE.png", default="curves.png", help="image to write (default curves.png)"
    )
    plot.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    plot.set_defaults(func=cmd_plot)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks (training, sampling, kernels) from a source checkout",
        description="Run benchmarks/bench_train.py (and with --kernels, bench_kernels.py). Options after "
        "the known ones pass through: e.g. `fastchar bench --quick`, `fastchar bench -- --compile --scaling`.",
    )
    bench.add_argument("--quick", action="store_true", help="a few steps of everything; records nothing")
    bench.add_argument("--kernels", action="store_true", help="also time every kernel x backend")
    _add_precision_flag(bench, "precision of the fastchar training runs: fp32 (default) or bf16")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to bench_train (see its --help)")
    bench.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    bench.set_defaults(func=cmd_bench)

    export = sub.add_parser(
        "export",
        help="write a checkpoint's forward pass as an ONNX file",
        description="Write a trained model as an ONNX graph: input `tokens` int64 [batch, T] (T at most the "
        "model's context), output `logits` float32 [batch, T, vocab], the vocabulary in the metadata under "
        '`fastchar.vocabulary`. Needs the onnx package: pip install "fastchar[export]".',
    )
    export.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="checkpoint folder, or a run folder (its best checkpoint)"
    )
    export.add_argument("--format", choices=("onnx",), default="onnx", help="file format (default onnx)")
    export.add_argument(
        "-o", "--output", metavar="FILE", default="model.onnx", help="file to write (default model.onnx)"
    )
    export.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    export.set_defaults(func=cmd_export)
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

    if args.backend is not None:
        canonical(args.backend)
    set_threads(args.threads)


def _hint(message: str) -> str:
    return f"hint: {message}"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _start_prompt(tokenizer: object) -> str:
    """A newline if the vocabulary has one, else its first character (a run always has a prompt)."""
    return "\n" if "\n" in tokenizer.stoi else tokenizer.chars[0]


def _resume_backend(args: argparse.Namespace, meta: dict) -> str:
    """--backend if given, else the backend the run trained with (so the resume stays bitwise)."""
    from fastchar.backends import available_backends

    recorded = meta.get("backend")
    if args.backend is not None:
        if recorded and args.backend not in ("auto", recorded):
            _note(f"the run trained with backend {recorded}; continuing with {args.backend} (not bitwise)")
        return args.backend
    if recorded and recorded not in available_backends():
        _note(f"the run trained with backend {recorded}, which is not available here; using auto (not bitwise)")
        return "auto"
    return recorded or "auto"


def _note_kernel_path(meta: dict) -> None:
    """A note when the run trained on another instruction-set path (FASTCHAR_ISA, or another CPU):
    the products sum in another order, so the resume is not bit for bit."""
    from fastchar import isa

    recorded, now = meta.get("isa"), isa.path()
    if recorded and recorded != now:
        _note(f"the run trained on the {recorded} kernel path; continuing on {now} (not bitwise)")


def _resume_precision(args: argparse.Namespace, meta: dict) -> str:
    """--precision if given, else the precision the run trained with."""
    recorded = meta.get("precision") or "fp32"
    if args.precision is not None and args.precision != recorded:
        _note(f"the run trained in {recorded}; continuing in {args.precision}")
    return args.precision or recorded


def _run_text(data: str | None, recorded: dict | None, hint: str) -> tuple[Path, str]:
    """(path, where it came from) of a run's text: --data, else the file the run recorded (an error
    with `hint` if it is gone), else Tiny Shakespeare."""
    from fastchar.data import locate_corpus
    from fastchar.errors import DataError

    if data is None and recorded:
        path = Path(recorded["path"])
        if not path.is_file():
            raise DataError(f"the run trained on {path}, which no longer exists", hint=hint)
        return path, "the text the run trained on, recorded in its checkpoint"
    return locate_corpus(data)


def _resume_data(args: argparse.Namespace, meta: dict, tokenizer: object) -> object:
    """The training text of a resumed run: --data, else the file the run recorded (checked by size
    and sha256), else Tiny Shakespeare. Its characters must be the checkpoint's vocabulary."""
    from fastchar.data import TextDataset, check_corpus_memory, read_text
    from fastchar.errors import DataError
    from fastchar.runfolder import data_record

    recorded = meta.get("data")
    path, origin = _run_text(
        args.data, recorded, "pass its text with --data FILE (the same characters as the checkpoint's vocabulary)"
    )
    print(f"data: {path} ({origin})", flush=True)
    check_corpus_memory(path)
    text = read_text(path)
    if sorted(set(text)) != list(tokenizer.chars):
        extra = sorted(set(text) - set(tokenizer.chars))
        missing = sorted(set(tokenizer.chars) - set(text))
        shown = ", ".join(repr(c) for c in (extra + missing)[:10])
        raise DataError(
            f"{path} has another vocabulary than the checkpoint ({len(extra)} new, {len(missing)} missing "
            f"character(s): {shown})",
            hint="resume on the text the run trained on (or one with exactly the same characters)",
        )
    if recorded and data_record(path, text)["sha256"] != recorded["sha256"]:
        if args.data is None:
            raise DataError(
                f"{path} changed since the run trained on it (size {len(text.encode()):,} bytes, "
                f"recorded {recorded['bytes']:,}; the sha256 differs)",
                hint=f"to continue on its new content anyway, pass it explicitly: --data {path}",
            )
        _note(f"{path} is not the text the run trained on ({recorded['path']}); continuing on it as asked")
    return TextDataset(path, tokenizer=tokenizer)


def cmd_train(args: argparse.Namespace) -> int:
    from fastchar.checkpoint import read_meta, resolve
    from fastchar.data import TextDataset, check_corpus_memory, locate_corpus
    from fastchar.errors import CheckpointError
    from fastchar.model import Model, load
    from fastchar.runfolder import check_fresh, check_memory
    from fastchar.tensorboard_log import require_tensorboardx
    from fastchar.train import Trainer, check_writable

    if args.config:  # flags given on the command line override the file
        config_file.apply(args, config_file.read(args.config, args.train_parser))
    if args.sample_chars is None:
        args.sample_chars = SAMPLE_CHARS
    model_args, train_args = _given(args, ModelConfig), _given(args, TrainConfig)
    if args.recipe == "list":
        print(recipes.listing())
        return 0
    if args.init_from and args.resume:
        raise ConfigError("--init-from starts a new run from trained weights; --resume continues a run",
                          hint="pass one of them: --resume RUN to continue, --init-from RUN to fine-tune")  # fmt: skip
    if args.recipe:
        if args.resume:
            raise ConfigError("--recipe starts a new run; a resume continues with the run's own settings",
                              hint="drop --recipe when resuming")  # fmt: skip
        recipe = recipes.get(args.recipe)
        model_args, train_args = {**recipe.model, **model_args}, {**recipe.train, **train_args}
        if args.precision is None:
            args.precision, why = recipes.precision_here(recipe, args.backend)
            if why:
                _note(why)
    if train_args.get("time_budget") and "steps" not in train_args and not args.resume:
        train_args["steps"] = NO_STEP_LIMIT  # the budget ends the run, not the default step count
    if args.until is not None and args.until < 1:
        raise ConfigError(f"--until must be a positive step, got {args.until}", hint="pass --until N with N >= 1")
    if args.sample_chars < 0:
        raise ConfigError(
            f"--sample-chars must be >= 0, got {args.sample_chars}", hint="pass --sample-chars 0 for no sample"
        )
    _setup_runtime(args)
    dist = _check_ranks(args.ranks, args.threads)
    if dist.size > 1:  # every rank must start from the same command line (--threads may differ per host);
        # the model and training options are compared with the run's other facts (Trainer), by their config names
        configs = {f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}
        options = {k: v for k, v in vars(args).items() if k not in RANK_OWN_OPTIONS and k not in configs}
        dist.check_same("the command line", options)
    say = print if dist.is_root else (lambda *a, **k: None)  # rank 0 alone prints
    if args.tensorboard:
        require_tensorboardx()
    if args.resume:
        folder, note = resolve(args.resume, "latest")
        folder, meta = read_meta(folder)
        model = load(folder, backend=_resume_backend(args, meta), precision=_resume_precision(args, meta))
        if dist.is_root:
            _note_kernel_path(meta)
        model.checkpoint_note = note
        if dist.is_root:  # one note, not one per rank
            _say_checkpoint(model)
        mismatched = {k: (v, getattr(model.cfg, k)) for k, v in model_args.items() if getattr(model.cfg, k) != v}
        if mismatched:
            details = ", ".join(f"{k}={v} but the checkpoint has {old}" for k, (v, old) in mismatched.items())
            raise ConfigError(f"--resume {args.resume}: incompatible model options: {details}",
                              hint="drop the model options when resuming")  # fmt: skip
        if model.tokenizer is None:
            raise CheckpointError(f"{folder} has no tokenizer.json", hint="resume a checkpoint a training run wrote")
        # A resume writes where the user says, or next to the checkpoint: never where meta.json says.
        # The folder the user named (its parent), not where a symbolic link on the way leads.
        out = train_args.get("out") or os.path.dirname(os.path.abspath(folder))
        train_cfg = TrainConfig.from_dict({**(model.train_cfg or {}), **train_args, "out": out})
        check_memory(model.cfg, train_cfg.batch)
        dist.root_only(check_writable, Path(train_cfg.out), False)
        dataset = _resume_data(args, meta, model.tokenizer)
    elif args.init_from:
        model, dataset, train_cfg = _fine_tune(args, model_args, train_args, dist)
    else:
        chosen = _choose_out(train_args, args, dist)
        train_cfg = TrainConfig(**train_args)
        dist.root_only(check_writable, Path(train_cfg.out), False)
        if not args.overwrite:
            dist.root_only(check_fresh, Path(train_cfg.out))
        corpus, origin = locate_corpus(args.data)
        say(f"data: {corpus} ({origin})", flush=True)
        if chosen:
            say(chosen, flush=True)
        check_corpus_memory(corpus)
        dataset = TextDataset(corpus)
        model_args.setdefault("vocab_size", dataset.vocab_size)
        if "mlp_hidden" not in model_args and "d_model" in model_args:
            model_args["mlp_hidden"] = 4 * model_args["d_model"]
        model_cfg = ModelConfig(**model_args)
        check_memory(model_cfg, train_cfg.batch)
        precision = args.precision or "fp32"
        model = Model(model_cfg, backend=args.backend or "auto", seed=train_cfg.seed, precision=precision)
    _warn_build(args.backend or "auto", model.backend)
    files = {} if args.resume else {config_file.CONFIG_NAME: _config_text(args, model, dataset, train_cfg, dist)}
    trainer = Trainer(  # checks the text against the model before anything is printed or created
        model, dataset, train_cfg, tensorboard=args.tensorboard and dist.is_root, overwrite=args.overwrite, files=files
    )
    say(f"text: {len(dataset):,} characters, vocabulary {dataset.vocab_size}")
    say(f"model: {json.dumps(model.cfg.to_dict())}")
    say(f"train: {json.dumps(train_cfg.to_dict())}")
    summary = trainer.train(until=args.until)
    if not dist.is_root:
        return 0
    print(
        f"done: step {summary['step']} | train {summary['train_loss']:.4f} | val {summary['val_loss']:.4f} | "
        f"best val {summary['best_val']:.4f} | val acc {100 * summary['val_acc']:.1f} % | "
        f"{summary['tok_per_s']:,.0f} tok/s | {summary['elapsed']:.1f} s"
    )
    print(f"checkpoints: {trainer.out / 'best'} (best val), {trainer.out / 'latest'}")
    if args.sample_chars:
        from fastchar.sampler import stream

        print("--- sample (temperature 0.8, seed 0) ---")
        prompt = _start_prompt(dataset.tokenizer)
        sys.stdout.write(prompt)
        for ch in stream(model, dataset.tokenizer, prompt, args.sample_chars, temperature=0.8, seed=0):
            sys.stdout.write(ch)
        sys.stdout.write("\n")
    return 0


def _config_text(args: argparse.Namespace, model: object, dataset: object, train_cfg: TrainConfig, dist: World) -> str:
    """The resolved settings of a fresh run as TOML (its config.toml): the text, the weights it starts
    from (--init-from), every model and training field that has a flag, the backend and precision in
    use; the run folder is left out, so that a repeat goes to a new one."""
    from fastchar import __version__

    flags = config_file.flag_actions(args.train_parser)
    settings: dict = {"data": str(Path(dataset.path).resolve())}
    if args.init_from:
        settings["init_from"] = str(Path(args.init_from_path).resolve())
    settings.update({k: v for k, v in model.cfg.to_dict().items() if k in flags})
    settings.update({k: v for k, v in train_cfg.to_dict().items() if k in flags and k != "out"})
    settings.update(backend=model.backend, precision=model.precision, sample_chars=args.sample_chars)
    if args.threads is not None:
        settings["threads"] = args.threads
    if args.tensorboard:
        settings["tensorboard"] = True
    if dist.size > 1:
        settings["ranks"] = dist.size  # a repeat needs mpiexec -n N as well
    comment = (
        f"The settings of the fastchar {__version__} run in this folder. `fastchar train --config FILE` repeats it\n"
        "(into a new run folder, or --out DIR); flags given beside --config override these values."
    )
    return config_file.dumps(settings, comment)


FINE_TUNE_FREE = ("dropout",)  # model fields a fine-tuning run may change: they shape no weight


def _fine_tune(args: argparse.Namespace, model_args: dict, train_args: dict, dist: World) -> tuple:
    """(model, dataset, train config) of `--init-from`: the checkpoint's architecture and weights in a
    new Model (fresh Adam moments, dropout counter and batch generator: step 0), the new text encoded
    with the checkpoint's vocabulary, and a training config of its own (not the checkpoint's)."""
    from fastchar.checkpoint import read
    from fastchar.data import TextDataset, locate_corpus, read_text
    from fastchar.errors import CheckpointError, DataError
    from fastchar.model import Model
    from fastchar.runfolder import check_fresh, check_memory
    from fastchar.train import check_writable

    stored = read(args.init_from, "best")
    if stored.note:
        print(f"checkpoint: {stored.note}", file=sys.stderr, flush=True)
    if stored.tokenizer is None:
        raise CheckpointError(
            f"{stored.path} has no tokenizer.json", hint="fine-tune a checkpoint a training run wrote"
        )
    fixed = {k: v for k, v in model_args.items() if k not in FINE_TUNE_FREE}
    mismatched = {k: (v, getattr(stored.cfg, k)) for k, v in fixed.items() if getattr(stored.cfg, k) != v}
    if mismatched:
        details = ", ".join(f"{k}={v} but the checkpoint has {old}" for k, (v, old) in mismatched.items())
        raise ConfigError(
            f"--init-from {args.init_from}: the architecture is the checkpoint's; conflicting options: {details}",
            hint="drop the model options (only --dropout may change when fine-tuning)",
        )
    cfg = dataclasses.replace(stored.cfg, **{k: v for k, v in model_args.items() if k in FINE_TUNE_FREE})
    chosen = _choose_out(train_args, args, dist)
    train_cfg = TrainConfig(**train_args)
    dist.root_only(check_writable, Path(train_cfg.out))
    if not args.overwrite:
        dist.root_only(check_fresh, Path(train_cfg.out))
    corpus, origin = locate_corpus(args.data)
    if dist.is_root:
        print(f"data: {corpus} ({origin})" + (f"\n{chosen}" if chosen else ""), flush=True)
    missing = stored.tokenizer.unknown(read_text(corpus))
    if missing:
        raise DataError(
            f"{corpus} has {len(missing)} character(s) that are not in the vocabulary of {stored.path}: "
            f"{', '.join(repr(c) for c in missing[:40])}{' ...' if len(missing) > 40 else ''}",
            hint="replace or remove those characters in the text, or train a new model on it without --init-from",
        )
    dataset = TextDataset(corpus, tokenizer=stored.tokenizer)
    check_memory(cfg, train_cfg.batch)
    model = Model(cfg, backend=args.backend or "auto", seed=train_cfg.seed, precision=args.precision or "fp32")
    for name, weights in stored.weights.items():
        model.params[name][...] = weights
    args.init_from_path = stored.path  # recorded in the run's config.toml
    step, best = stored.meta.get("state", {}).get("step"), stored.meta.get("state", {}).get("best_val")
    if dist.is_root:
        trained = f"step {step}" + (f", best val {best:.4f}" if best is not None else "")
        print(f"init from: {stored.path} ({trained}); fresh optimizer and schedule from step 0", flush=True)
    return model, dataset, train_cfg


def _choose_out(train_args: dict, args: argparse.Namespace, dist: World) -> str:
    """Without --out (or `out` in --config), a new run gets a run folder of its own: runs/base, or
    runs/base-2, -3, ... when that holds a run. --overwrite alone reuses runs/base. Returns the line
    that says which ('' when --out chose)."""
    from fastchar.runfolder import next_free

    if "out" in train_args or args.overwrite:
        return ""
    base = Path(DEFAULT_TRAIN.out)
    out = dist.root_only(next_free, base)
    train_args["out"] = str(out)
    why = "" if out == base else f"; {base} holds another run"
    return f"run folder: {out} (new{why}; choose one with --out DIR)"


def _check_ranks(expected: int | None, threads: int | None = None) -> World:
    """The world of ranks (distributed.world); with --ranks N, check that mpiexec started N."""
    from fastchar.distributed import mark_collective, world
    from fastchar.threads import cores

    dist = world()
    if dist.size > 1 and threads is not None and dist.local_size * threads > cores() and dist.local_rank == 0:
        print(f"warning: {dist.local_size} ranks x --threads {threads} exceed the {cores()} cores of {dist.host}; "
              "without --threads the cores are shared out", file=sys.stderr)  # fmt: skip
    if expected is not None and expected != dist.size:
        launched = f"this is one of {dist.size} ranks" if dist.size > 1 else "this is one process, not under mpiexec"
        raise mark_collective(
            ConfigError(
                f"--ranks {expected}: {launched}; fastchar does not start processes itself",
                hint=f'launch N ranks with mpiexec (pip install -e ".[mpi]"): mpiexec -n {expected} fastchar train ...',
            )
        )
    return dist


def cmd_sample(args: argparse.Namespace) -> int:
    from fastchar.data import read_prompt
    from fastchar.sampler import MAX_STREAMS, check_sampling, check_seed, check_stop, generate, stream

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    check_seed(args.seed)
    if not 1 <= args.num_samples <= MAX_STREAMS:
        raise ConfigError(f"--num-samples must be in [1, {MAX_STREAMS:,}], got {args.num_samples}",
                          hint=f"pass --num-samples {MAX_STREAMS} or less (run several times for more)")  # fmt: skip
    stop = check_stop([t.replace("\\n", "\n") for t in args.stop or []])  # a typed \n is a newline: --stop '\n\n'
    if args.ctx is not None and args.ctx < 1:
        raise ConfigError(f"--ctx must be >= 1, got {args.ctx}", hint="leave --ctx out to use the model's context")
    prompt = read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    model = _one_process_model(args, "sample", "sample from")
    if args.ctx is not None and args.ctx > model.cfg.ctx:
        raise ConfigError(
            f"--ctx {args.ctx} is larger than the model's context of {model.cfg.ctx}",
            hint=f"pass --ctx {model.cfg.ctx} or less",
        )
    if prompt is None:
        prompt = _start_prompt(model.tokenizer)
    model.tokenizer.encode(prompt)  # names unknown characters before anything is printed
    for text in stop:
        if unknown := model.tokenizer.unknown(text):
            shown = ", ".join(repr(c) for c in unknown[:10])
            print(f"warning: --stop {text!r} can never match: the model has no {shown} in its vocabulary",
                  file=sys.stderr)  # fmt: skip
    if args.num_samples == 1:
        sys.stdout.write(prompt)
        shown = time.monotonic()
        for ch in stream(model, model.tokenizer, prompt, args.max_new_tokens, args.temperature,
                         args.top_k, args.top_p, args.seed, ctx=args.ctx, stop=stop):  # fmt: skip
            sys.stdout.write(ch)
            if time.monotonic() - shown >= FLUSH_EVERY:  # a flush per character would cost a system call each
                sys.stdout.flush()
                shown = time.monotonic()
        sys.stdout.write("\n")
        return 0
    # all samples advance together (one batched decode step each); printed when done, in order
    _check_samples_memory(args.num_samples, len(prompt) + args.max_new_tokens)
    texts = generate(model, model.tokenizer, prompt, args.max_new_tokens, args.temperature, args.top_k,
                     args.top_p, args.seed, ctx=args.ctx, num_samples=args.num_samples, stop=stop)  # fmt: skip
    for i, text in enumerate(texts):
        sys.stdout.write(f"--- sample {i + 1} ---\n{text}\n")
    return 0


def _one_process_model(args: argparse.Namespace, command: str, verb: str) -> object:
    """For `fastchar sample` and `eval`: the threads set, a refusal under mpiexec, and args.checkpoint
    loaded (on --backend, in --precision), which must have a tokenizer."""
    from fastchar.distributed import mark_collective
    from fastchar.errors import CheckpointError
    from fastchar.model import load

    _setup_runtime(args)
    if _check_ranks(None).size > 1:
        raise mark_collective(ConfigError(f"fastchar {command} runs in one process",
                                          hint=f"run it without mpiexec: fastchar {command} ..."))  # fmt: skip
    model = load(args.checkpoint, backend=args.backend or "auto", precision=args.precision or "fp32")
    _say_checkpoint(model)
    if model.tokenizer is None:
        raise CheckpointError(
            f"{args.checkpoint} has no tokenizer.json", hint=f"{verb} a checkpoint a training run wrote"
        )
    return model


def _check_samples_memory(n: int, chars: int) -> None:
    """Refuse n samples of up to chars characters each that could not be held until they are printed."""
    from fastchar.runfolder import MIB, available_bytes

    need, available = 2 * n * chars, available_bytes()  # a byte a character, and the joined copy
    if available is not None and need > available:
        raise ConfigError(
            f"{n:,} samples of up to {chars:,} characters are held until all are done: about {need / MIB:,.0f} MiB, "
            f"but only {available / MIB:,.0f} MiB is available",
            hint="lower --max-new-tokens (one sample, --num-samples 1, is printed as it is made)",
        )


def _say_checkpoint(model: object) -> None:
    """On stderr, which checkpoint of a run folder was taken (nothing for a checkpoint folder)."""
    note = getattr(model, "checkpoint_note", None)
    if note:
        print(f"checkpoint: {note}", file=sys.stderr, flush=True)


def cmd_info(args: argparse.Namespace) -> int:
    from fastchar.arena import param_specs
    from fastchar.backends import available_backends, default_backend
    from fastchar.threads import thread_report

    _setup_runtime(args)
    report: dict = {}
    if args.checkpoint:
        from fastchar.model import load

        model = load(args.checkpoint, backend="numpy")
        _say_checkpoint(model)
        tensors = [(name, list(shape), int(model.params[name].size)) for name, shape in param_specs(model.cfg)]
        report["checkpoint"] = {
            "path": str(model.checkpoint_path),
            "picked": model.checkpoint_note,
            "model": model.cfg.to_dict(),
            "train": model.train_cfg,
            "step": model.train_state.get("step"),
            "best_val": model.train_state.get("best_val"),
            "best_val_acc": model.train_state.get("best_val_acc"),  # next-character accuracy at best_val
            "last_eval": model.train_state.get("last_eval"),  # losses and accuracies when it was saved
            "parameters": {"total": model.num_params(), "tensors": tensors},
            "vocabulary": "".join(model.tokenizer.chars) if model.tokenizer else None,
        }
    backends = available_backends()
    report["backends"] = {"available": backends, "default": default_backend(), "fallback": _fallbacks(backends)}
    if args.plan:
        report["plan"] = _plan_report(args)
    report["threads"] = thread_report()
    report["build"] = _build_report()
    report["cpu"] = _cpu_features()
    dist = _check_ranks(None, args.threads)
    t = report["threads"]
    mine = {"host": dist.host, "local_rank": dist.local_rank, "cores": t["cores"],
            "threads": t["openmp"]["threads"] if t["openmp"] else t.get("numba", {}).get("threads")}  # fmt: skip
    report["ranks"] = {**dist.describe(), "per_rank": dist.allgather(mine)}
    if not dist.is_root:
        return 0
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(_format_info(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fastchar.data import check_corpus_memory, read_text, train_size
    from fastchar.errors import DataError
    from fastchar.evaluation import DEFAULT_BATCH, Progress, evaluate
    from fastchar.runfolder import data_record

    batch = DEFAULT_BATCH if args.batch is None else args.batch
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}", hint="leave --batch out for the default")
    model = _one_process_model(args, "eval", "evaluate")
    recorded = (model.checkpoint_meta or {}).get("data")
    path, origin = _run_text(
        args.data, recorded, "pass a text with --data FILE (its characters must be in the model's vocabulary)"
    )
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    say(f"data: {path} ({origin})")
    check_corpus_memory(path)
    text = read_text(path)
    if args.data is None and recorded and data_record(path, text)["sha256"] != recorded["sha256"]:
        _note(f"{path} changed since the run trained on it: its splits are not the ones the run saw")
    n_train = train_size(len(text))  # TextDataset's split
    part = {"val": text[n_train:], "train": text[:n_train], "all": text}[args.split]
    if len(part) < 2:
        raise DataError(
            f"the {args.split} split of {path} has {len(part)} character(s): at least 2 are needed",
            hint="use a longer text, or --split all",
        )
    result = evaluate(model, part, batch, Progress(lambda line: print(line, file=sys.stderr, flush=True)))
    report = {"checkpoint": str(model.checkpoint_path), "data": str(path), "split": args.split,
              "context": model.cfg.ctx, "precision": args.precision or "fp32", "backend": model.backend,
              **result}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    where = {"val": "the last 10 %", "train": "the first 90 %", "all": "the whole text"}[args.split]
    print(f"{args.split} split ({where}): {result['chars']:,} characters predicted in {result['windows']:,} "
          f"window(s) of up to {model.cfg.ctx}")  # fmt: skip
    print(f"loss {result['loss']:.4f} nats a character ({result['bits_per_char']:.4f} bits), perplexity "
          f"{result['perplexity']:.3f}, next-character accuracy {result['accuracy']:.1%}")  # fmt: skip
    return 0


def _fallbacks(backends: list[str]) -> dict[str, list[str]]:
    """backend -> the kernels it declares missing (the reference's run instead)."""
    from fastchar.backends import get_backend

    return {name: sorted(get_backend(name).fallback) for name in backends}


def _plan_report(args: argparse.Namespace) -> dict:
    """The training step's and the decode step's calls for the checkpoint's model (or the default one)."""
    from fastchar.model import Model, load
    from fastchar.sampler import describe_decode

    precision = args.precision or "fp32"
    if args.checkpoint:
        model = load(args.checkpoint, backend=args.backend or "auto", precision=precision)
        batch = (model.train_cfg or {}).get("batch", DEFAULT_TRAIN.batch)
    else:
        model = Model(DEFAULT_MODEL, backend=args.backend or "auto", precision=precision)
        batch = DEFAULT_TRAIN.batch
    return {
        "backend": model.backend,
        "precision": precision,
        "batch": batch,
        "ctx": model.cfg.ctx,
        "training": model.describe_plan(batch),
        "decode": describe_decode(model),
    }


def _warn_build(requested: str, chosen: str) -> None:
    """One stderr line per build note that concerns this run (a missing or single-threaded Cython build)."""
    from fastchar.build_info import build_notes

    if chosen == "cython" or requested == "auto":
        for note in build_notes():
            print(f"warning: {note}", file=sys.stderr)


def _build_report() -> dict:
    """The recorded C build (compiler, flags, OpenMP, extensions not built) and what to know about it."""
    from fastchar.build_info import build_notes, read_build_info

    info = read_build_info() or {}
    keys = ("family", "version", "compile_args", "link_args", "openmp", "openmp_note", "extensions")
    return {**{k: info.get(k) for k in keys}, "recorded": bool(info), "notes": build_notes()}


def _cpu_features() -> dict:
    """The matrix-product ISAs the CPU offers and whether fastchar's packed products may use them."""
    try:
        from fastchar import _gemm
    except ImportError:
        return {"avx512_bf16": None, "bf16_usable": False, "note": "fastchar._gemm is not built"}
    from dataclasses import asdict

    from fastchar import isa

    feats = _gemm.cpu_features()
    sel = isa.selection()
    return {**feats, "bf16_usable": _gemm.has_avx512bf16(), "isa": {**asdict(sel), "line": sel.describe()}}


def _format_info(report: dict) -> str:
    lines = []
    ck = report.get("checkpoint")
    if ck:
        lines += [
            f"checkpoint: {ck['path']}",
            f"  step {ck['step']}, best val {_loss_acc(ck['best_val'], ck['best_val_acc'])}",
        ]
        if ck.get("last_eval"):
            ev = ck["last_eval"]
            lines.append(f"  evaluation at step {ck['step']}: train {_loss_acc(ev['train_loss'], ev['train_acc'])}, "
                         f"val {_loss_acc(ev['val_loss'], ev['val_acc'])}")  # fmt: skip
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
    for name, missing in b.get("fallback", {}).items():
        if missing:
            lines.append(f"  {name} falls back to the reference for: {', '.join(missing)}")
    plan = report.get("plan")
    if plan:
        lines.append(
            f"training step ({plan['backend']}, {plan['precision']}, B={plan['batch']}, T={plan['ctx']}): "
            f"{len(plan['training'])} calls"
        )
        lines += ["  " + line for line in plan["training"]]
        lines.append(f"decode step ({plan['backend']}): {len(plan['decode'])} rows")
        lines += ["  " + line for line in plan["decode"]]
    t = report["threads"]
    lines.append(f"cores: {t['cores']}")
    if "numba" in t:
        lines.append(f"numba: {t['numba']['threads']} threads, threading layer {t['numba']['threading_layer']}")
    omp = t["openmp"]
    if omp is None:
        lines.append("openmp (cython kernels): not built")
    else:
        lines.append(
            f"openmp (cython kernels): {omp['threads']} thread{'s' if omp['threads'] != 1 else ''}"
            + ("" if omp["enabled"] else " (built without OpenMP)")
        )
    build = report.get("build") or {}
    if build.get("recorded"):
        compile_args, link_args = " ".join(build["compile_args"] or []), " ".join(build["link_args"] or [])
        lines.append(
            f"c build: {build['family']} ({build['version']}), compile {compile_args}, link {link_args or '-'}"
        )
    for note in build.get("notes", []):
        lines.append(f"warning: {note}")
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
    r = report["ranks"]
    if r["ranks"] == 1:
        lines.append("ranks: 1 (one process; `mpiexec -n N fastchar train ...` trains with N ranks)")
    else:
        lines.append(f"ranks: {r['ranks']} on {len(set(r['hosts']))} host(s), {r['mpi']}, timeout {r['timeout_s']:g} s")
        for host in dict.fromkeys(r["hosts"]):
            mine = [(i, p) for i, p in enumerate(r["per_rank"]) if p["host"] == host]
            threads = ", ".join(f"rank {i}: {p['threads']}" for i, p in mine)
            lines.append(f"  {host}: {len(mine)} ranks, {mine[0][1]['cores']} cores, threads {threads}")
    cpu = report.get("cpu")
    if cpu is not None:
        if cpu["avx512_bf16"] is None:
            lines.append(f"cpu AVX512_BF16: unknown ({cpu['note']}); bf16 matrix products unavailable")
        else:
            has = "yes" if cpu["avx512_bf16"] else "no"
            use = "available" if cpu["bf16_usable"] else "unavailable"
            if cpu["avx512_bf16"] and not cpu["bf16_usable"]:
                use += " (disabled by FASTCHAR_DISABLE_BF16, or FASTCHAR_ISA below avx512)"
            lines.append(f"cpu AVX512_BF16 (vdpbf16ps): {has}; bf16 matrix products {use}")
            lines.append(cpu["isa"]["line"])
    return "\n".join(lines)


def _loss_acc(loss: float | None, acc: float | None) -> str:
    """`1.4600 (next-character accuracy 55.3 %)`; what a checkpoint lacks (older runs) is left out."""
    if loss is None:
        return "-"
    return f"{loss:.4f}" + (f" (next-character accuracy {100 * acc:.1f} %)" if acc is not None else "")


def cmd_plot(args: argparse.Namespace) -> int:
    from fastchar.plot import plot_runs, require_matplotlib

    require_matplotlib()
    path = plot_runs(args.runs, args.output)
    print(f"wrote {path} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
    return 0


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
    rest += ["--precision", args.precision] if args.precision not in (None, "fp32") else []
    if args.kernels:
        kernels = [sys.executable, "-m", "benchmarks.bench_kernels", *(["--quick"] if args.quick else [])]
        code = subprocess.run(kernels, cwd=root).returncode
        if code:
            return code
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_train", *rest], cwd=root).returncode


# -- serve: an HTTP server over the batched decode (fastchar/serve.py) ------------------------


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser(
        "serve",
        help="answer OpenAI-style completion requests over HTTP (needs the [serve] extra)",
        description="Serve a checkpoint over HTTP: POST /v1/completions (OpenAI's completions shape, server-sent "
        "events with stream=true), GET /v1/models, GET /health, and a page to try it at GET /. Every request's "
        "streams join the running batched decode at the next character. Ctrl-C or SIGTERM stops it.",
    )
    serve.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (its best checkpoint) or a checkpoint folder"
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    serve.add_argument("--port", type=_number(int), default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--max-streams", type=_number(int), default=64, help="streams decoded together at most (default 64)"
    )
    serve.add_argument(
        "--max-queue",
        type=_number(int),
        default=None,
        help="streams that may wait for a free one; beyond, requests get a 503 (default 4 x --max-streams)",
    )
    _add_runtime_flags(serve)
    _add_precision_flag(serve, PRECISION_HELP + "; bf16 also decodes with bf16 products (weights packed to bf16)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from fastchar.errors import CheckpointError
    from fastchar.model import load
    from fastchar.serve import _require_serve_extra, bound_port, make_server

    _require_serve_extra()
    if args.max_streams < 1:
        raise ConfigError(f"--max-streams must be >= 1, got {args.max_streams}", hint="pass --max-streams 64")
    if args.max_queue is not None and args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}", hint="pass --max-queue 0 to refuse waits")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}", hint="pass --port 8000")
    _setup_runtime(args)
    model = load(args.checkpoint, backend=args.backend or "auto", precision=args.precision or "fp32")
    _say_checkpoint(model)
    if model.tokenizer is None:
        raise CheckpointError(
            f"{args.checkpoint} has no tokenizer.json", hint="serve a checkpoint a training run wrote"
        )
    name = Path(args.checkpoint).resolve().name
    server = make_server(
        model, args.host, args.port, args.max_streams, args.max_queue, model_id=name, threads=args.threads
    )
    host = f"[{args.host}]" if ":" in args.host else args.host

    def started(srv: object) -> None:
        print(
            f"fastchar serve: {name} ({model.backend}, {model.precision}) on http://{host}:{bound_port(srv)}/ "
            f"with at most {args.max_streams} streams at once; Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )

    server.on_started = started
    try:
        server.run()
    except SystemExit:  # uvicorn exits with status 3 when it cannot listen (a port in use): say so, as below
        if server.started:
            raise
    if not server.started:
        raise FastcharError(
            f"could not listen on {args.host}:{args.port}", hint="the port may be in use: pass another --port"
        )
    if server.stopped_by is not None:
        print(f"fastchar serve: stopped by {signal.Signals(server.stopped_by).name}", file=sys.stderr, flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastchar.errors import CheckpointError
    from fastchar.export import OPSET, export, require_onnx
    from fastchar.model import load

    require_onnx()  # before the checkpoint is read
    model = load(args.checkpoint, backend="numpy")
    _say_checkpoint(model)
    if model.tokenizer is None:
        raise CheckpointError(
            f"{args.checkpoint} has no tokenizer.json", hint="export a checkpoint a training run wrote"
        )
    if (model.checkpoint_meta or {}).get("precision") == "bf16":
        _note("the run computed with bf16 products; the export holds its fp32 weights and computes in fp32")
    path = export(model, args.output, args.format)
    cfg = model.cfg
    size = path.stat().st_size / 2**20
    print(f"wrote {path} ({size:.1f} MiB, ONNX opset {OPSET}): tokens int64 [batch, T <= {cfg.ctx}] -> "
          f"logits float32 [batch, T, {cfg.vocab_size}]")  # fmt: skip
    return 0


# -- entry point ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from fastchar.train import Interrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Interrupted as exc:
        _report(exc, args, 128 + exc.signum)
        return 128 + exc.signum
    except KeyboardInterrupt as exc:  # a second signal, or one outside the training loop
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"\ninterrupted by {signal.Signals(signum).name}", file=sys.stderr)
        _end_other_ranks(exc, 128 + signum)
        return 128 + signum
    except FastcharError as exc:
        _report(exc, args)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR
    except MemoryError as exc:
        exc.hint = MEMORY_HINTS.get(args.command, "`free -m` shows the memory available")
        _report(exc, args, message=f"out of memory: {exc}" if str(exc) else "out of memory")
        return EXIT_ERROR
    except OSError as exc:  # a full disk, a permission denied: name the file, keep it short
        full = exc.errno == errno.ENOSPC
        exc.hint = getattr(exc, "hint", "") or (
            "free some disk space or write elsewhere" if full else "check the path, its permissions and free space"
        )
        _report(exc, args)
        return EXIT_ERROR


def _report(exc: BaseException, args: argparse.Namespace, code: int = EXIT_ERROR, message: str | None = None) -> None:
    """`error: ...` and `hint: ...`, one line each, on stderr (and the traceback with --debug)."""
    from fastchar.distributed import is_collective, launch_rank

    rank = launch_rank()  # under mpiexec: rank 0 reports what every rank raised; others name themselves
    if rank and is_collective(exc):
        return
    if getattr(args, "debug", False):
        traceback.print_exception(exc)
    message = " ".join(str(exc if message is None else message).split("\n"))
    print(f"error: {f'rank {rank}: ' if rank else ''}{message}", file=sys.stderr)
    hint = getattr(exc, "hint", "") or next(
        (h for cls, h in GENERIC_HINTS.items() if cls in [c.__name__ for c in type(exc).__mro__]), ""
    )
    command = getattr(args, "command", None) or "COMMAND"
    hint = hint.replace("COMMAND", command)
    for python, flag in PYTHON_TO_FLAGS:  # hints written for the Python API, said as options
        hint = hint.replace(python, flag)
    print(_hint(" ".join(hint.split("\n")) if hint else "run `fastchar --help`"), file=sys.stderr)
    _end_other_ranks(exc, code)


def _end_other_ranks(exc: BaseException, code: int) -> None:
    """Under mpiexec, an error only this rank hit ends every rank (MPI_Abort) rather than hang them."""
    from fastchar.distributed import current, is_collective

    dist = current()
    if dist is not None and dist.size > 1 and not is_collective(exc):
        dist.abort(code)


if __name__ == "__main__":
    sys.exit(main())

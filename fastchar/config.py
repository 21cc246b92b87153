"""Configuration dataclasses: the model's shape and the training recipe (defaults: docs/architecture.md).

Validation lives here too, so that bad values are rejected before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from fastchar.errors import ConfigError

POSITIONS = ("learned", "rope")  # ModelConfig.position: absolute learned table, or rotary (RoPE)
NORMS = ("rmsnorm", "layernorm")  # ModelConfig.norm: op records of fastchar/ops.py
ACTIVATIONS = ("relu2", "gelu")  # ModelConfig.activation: op records of fastchar/ops.py


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 65  # distinct characters of the corpus (65 for Tiny Shakespeare)
    d_model: int = 128  # C, the residual stream width
    n_layer: int = 4  # L, transformer blocks
    n_head: int = 8  # NH; head size is d_model // n_head = 16
    ctx: int = 64  # T, the longest context the learned positions cover
    mlp_hidden: int = 512  # 4 * d_model, width of the squared-ReLU MLP
    dropout: float = 0.0  # on attention probabilities and residual branches, training only
    position: str = "learned"  # "learned": a wpe table of ctx rows; "rope": rotary q and k, no wpe
    rope_base: float = 10000.0  # rotary base: pair i of a head turns by p * rope_base**(-2i/HS)
    norm: str = "rmsnorm"  # every norm (ln1, ln2, ln_f): "rmsnorm", or "layernorm" (a gain, no bias)
    activation: str = "relu2"  # the MLP's: "relu2" (squared ReLU), or "gelu" (exact, erf form)
    tie_embeddings: bool = False  # True: no lm_head; logits = ln_f(x) @ wte.T

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "ctx", "mlp_hidden"):
            _positive_int(self, name)
        if self.vocab_size < 2:  # one character leaves nothing to predict (and degenerate kernel shapes)
            raise ConfigError(f"ModelConfig.vocab_size must be at least 2, got {self.vocab_size}",
                              hint="train on a text with at least two distinct characters")  # fmt: skip
        for name in ("d_model", "mlp_hidden"):  # a width of 1 is the shape of a per-position value (graph.act_specs)
            if getattr(self, name) < 2:
                raise ConfigError(f"ModelConfig.{name} must be at least 2, got {getattr(self, name)}",
                                  hint=f"pass --{name.replace('_', '-')} 2 or more")  # fmt: skip
        if self.d_model % self.n_head:
            raise ConfigError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})",
                hint="choose --n-head among the divisors of --d-model (e.g. 8 heads of 16 for 128)",
            )
        _number(self, "dropout", 0.0, 1.0, hi_open=True)
        if self.position not in POSITIONS:
            raise ConfigError(
                f"ModelConfig.position must be one of {', '.join(POSITIONS)}, got {self.position!r}",
                hint="learned: absolute positions (the default); rope: rotary positions",
            )
        _number(self, "rope_base", 1.0, math.inf, lo_open=True, hi_open=True)
        for name, choices, hint in (
            ("norm", NORMS, "rmsnorm: x / rms(x) * g (the default); layernorm: (x - mean) / std * g, no bias"),
            ("activation", ACTIVATIONS, "relu2: relu(x)**2 (the default); gelu: 0.5 x (1 + erf(x / sqrt 2))"),
        ):
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"ModelConfig.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}", hint=hint
                )
        if not isinstance(self.tie_embeddings, bool | np_bool()):
            raise ConfigError(
                f"ModelConfig.tie_embeddings must be True or False, got {self.tie_embeddings!r}",
                hint="True: the lm_head is wte transposed (no lm_head parameter)",
            )
        object.__setattr__(self, "tie_embeddings", bool(self.tie_embeddings))
        if self.position == "rope" and self.head_size % 2:
            raise ConfigError(
                f"rotary positions need an even head size, got d_model/n_head = {self.head_size}",
                hint="pick d_model and n_head so that d_model // n_head is even",
            )

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(**_known_fields(cls, data))


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 12  # B, sequences per micro-batch (per step when grad_accum is 1, per rank under MPI)
    grad_accum: int = 1  # K micro-batches of `batch` sequences whose gradients are summed per step
    steps: int = 2000  # optimizer steps (the cosine schedule ends at the last one)
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    min_lr: float = 1e-4  # learning rate at the last step
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay, on 2-D matrices only
    betas: tuple[float, float] = (0.9, 0.99)  # Adam's moment decay rates
    eps: float = 1e-8  # Adam's denominator guard
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables it
    eval_every: int = 200  # steps between evaluations (and checkpoints)
    eval_batches: int = 20  # batches averaged per split at each evaluation
    seed: int = 0  # seeds the weights, the batches and dropout
    out: str = "runs/base"  # run folder: checkpoints and metrics.jsonl
    # seconds; > 0 stops on wall time (evaluation included), stretching the schedule over it; `steps`
    # still caps such a run: pass steps=NO_STEP_LIMIT for none (the CLI does when --steps is not given)
    time_budget: float = 0.0
    log_every: int = 10  # steps between log lines

    def __post_init__(self) -> None:
        betas = self.betas
        if isinstance(betas, str | bytes) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {betas!r}", hint=HINT)
        for b in betas:
            if not _is_real(b) or not 0 <= b < 1:
                raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {betas!r}", hint=HINT)
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for name in ("batch", "grad_accum", "steps", "eval_every", "eval_batches", "log_every"):
            _positive_int(self, name)
        if self.eval_batches > MAX_EVAL_BATCHES:  # a stop signal waits for one batch, but the run for all
            raise ConfigError(
                f"TrainConfig.eval_batches must be at most {MAX_EVAL_BATCHES:,}, got {self.eval_batches:,}",
                hint=f"pass --eval-batches {MAX_EVAL_BATCHES} or less (the default is 20)",
            )
        _number(self, "lr", 0.0, math.inf, lo_open=True)
        _number(self, "min_lr", 0.0, self.lr)
        _int(self, "warmup", 0)
        _number(self, "weight_decay", 0.0, math.inf)
        _number(self, "eps", 0.0, math.inf, lo_open=True)
        _number(self, "grad_clip", 0.0, math.inf)
        _number(self, "time_budget", 0.0, math.inf)
        _int(self, "seed", 0)
        if not isinstance(self.out, str | os.PathLike) or not str(self.out) or "\x00" in str(self.out):
            raise ConfigError(f"TrainConfig.out must be a folder path, got {self.out!r}", hint=HINT)
        object.__setattr__(self, "out", str(self.out))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**_known_fields(cls, data))


HINT = "see `fastchar train --help` for every option's range"


def np_bool() -> type:
    """numpy's bool type (a config read back from JSON or built from numpy values may hold one)."""
    import numpy as np

    return np.bool_


MAX_EVAL_BATCHES = 10_000  # batches per split at one evaluation: 20 by default, 64 in the one-minute recipe
MAX_INT = 2**62  # as checkpoints are checked (schema.MAX_INT): a larger value would make them unreadable
NO_STEP_LIMIT = 10**9  # steps beside a time budget when none are asked for: the budget alone ends the run


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(obj: object, name: str) -> None:
    _int(obj, name, 1)


def _int(obj: object, name: str, lo: int) -> None:
    """An integer >= lo (a numpy integer is stored as int, as a numpy bool is for the flags)."""
    import numpy as np

    value = getattr(obj, name)
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or not lo <= value <= MAX_INT:
        what = f"a positive integer at most {MAX_INT}" if lo == 1 else f"an integer in [{lo}, {MAX_INT}]"
        raise ConfigError(f"{type(obj).__name__}.{name} must be {what}, got {value!r}", hint=HINT)
    object.__setattr__(obj, name, int(value))


def _number(obj: object, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """A finite number in the interval [lo, hi] (or open at either end); NaN and infinities never pass."""
    value = getattr(obj, name)
    inside = _is_real(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not inside:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        if hi == math.inf:
            what = f"{'>' if lo_open else '>='} {lo:g} and finite"
        else:
            what = f"a number in {left}{lo:g}, {hi:g}{right}"
        raise ConfigError(f"{type(obj).__name__}.{name} must be {what}, got {value!r}", hint=HINT)


def _known_fields(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} is built from a dict, got {type(data).__name__}", hint=HINT)
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(map(str, unknown))}", hint=HINT)
    return dict(data)

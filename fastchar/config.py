"""Configuration dataclasses: the model's shape and the training recipe (defaults from SPEC.md).

Validation lives here too, so that bad values are rejected before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastchar.errors import ConfigError

POSITIONS = ("learned", "rope")  # ModelConfig.position: absolute learned table, or rotary (RoPE)


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "ctx", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"ModelConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.position not in POSITIONS:
            raise ConfigError(
                f"ModelConfig.position must be one of {', '.join(POSITIONS)}, got {self.position!r}",
                hint="learned: absolute positions (SPEC's base model); rope: rotary positions",
            )
        if not self.rope_base > 1.0:
            raise ConfigError(f"ModelConfig.rope_base must be > 1, got {self.rope_base!r}")
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
    time_budget: float = 0.0  # seconds; > 0 stops on wall time, stretching the schedule over it
    log_every: int = 10  # steps between log lines

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        positive_ints = ("batch", "grad_accum", "steps", "eval_every", "eval_batches", "log_every")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"TrainConfig.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup < 0:
            raise ConfigError(f"TrainConfig.warmup must be >= 0, got {self.warmup!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"TrainConfig.eps must be > 0, got {self.eps!r}")
        if self.grad_clip < 0:
            raise ConfigError(f"TrainConfig.grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.time_budget < 0:
            raise ConfigError(f"TrainConfig.time_budget must be >= 0, got {self.time_budget!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**_known_fields(cls, data))


def _known_fields(cls: type, data: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return dict(data)

"""The learning-rate schedule (linear warm-up, cosine decay) and AdamW over the flat buffers.

The update itself is one backend kernel (adamw_update) over params, grads, m and v; clipping is the
global gradient norm folded into that kernel as a scale on the gradients.
"""

from __future__ import annotations

import math

from fastchar.config import TrainConfig
from fastchar.errors import TrainingDiverged
from fastchar.model import Model


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate at step (0-based): warm-up for cfg.warmup steps, then cosine to min_lr.

    progress in [0, 1] overrides the cosine's position (a wall-clock budget stretches the schedule);
    by default it is the fraction of post-warm-up steps done, reaching 1 at the last step.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if progress is None:
        progress = (step - cfg.warmup) / max(1, cfg.steps - 1 - cfg.warmup)
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


class AdamW:
    """AdamW with global-norm clipping; state is the model's adam_m / adam_v arenas and a counter."""

    def __init__(self, model: Model, cfg: TrainConfig, step: int = 0) -> None:
        self.model = model
        self.cfg = cfg
        self.step_count = step

    def step(self, lr: float) -> float:
        """Clip and apply one update; returns the gradient norm before clipping."""
        m, k, cfg = self.model, self.model.kernels, self.cfg
        norm = k.grad_norm(m.grads.flat)
        if not math.isfinite(norm):
            raise TrainingDiverged(f"the gradient norm is {norm} at step {self.step_count + 1}")
        scale = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
        self.step_count += 1
        beta1, beta2 = cfg.betas
        k.adamw_update(
            m.params.flat, m.grads.flat, m.adam_m.flat, m.adam_v.flat, m.decay,
            lr, beta1, beta2, cfg.eps, cfg.weight_decay, self.step_count, scale,
        )  # fmt: skip
        return norm

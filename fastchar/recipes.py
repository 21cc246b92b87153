"""Training recipes for a wall-clock budget, found by measurement (benchmarks/recipe_sweep.py).

A recipe fixes the model's shape, the batch, the learning-rate schedule, dropout, precision and the
evaluation cadence for Tiny Shakespeare-sized corpora (about 1 M characters). The budget is wall
time on the whole machine, evaluation included; the cosine schedule is stretched over it and no step
count cuts it short. Any flag given beside `--recipe` overrides the recipe's value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastchar.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    model: dict = field(default_factory=dict)  # ModelConfig fields
    train: dict = field(default_factory=dict)  # TrainConfig fields (time_budget included)
    precision: str = "fp32"

    def flags(self) -> str:
        """The recipe as command-line flags a user can copy."""
        parts = [f"--{k.replace('_', '-')} {_text(v)}" for k, v in {**self.model, **self.train}.items()]
        return " ".join([*parts, f"--precision {self.precision}"])


def _text(value: object) -> str:
    if isinstance(value, tuple | list):
        return " ".join(_text(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "one-minute",
            "60 s: a 64-wide model (4 layers, 4 heads, rotary positions), batch 8",
            model={"d_model": 64, "n_layer": 4, "n_head": 4, "ctx": 64, "position": "rope", "dropout": 0.0},
            train={
                "time_budget": 60.0,
                "batch": 8,
                "lr": 2e-3,
                "min_lr": 1e-4,
                "warmup": 50,
                "eval_every": 1000,
                "eval_batches": 64,
            },  # fmt: skip
        ),
        Recipe(
            "ten-minutes",
            "600 s: the base model's width with rotary positions, context 128, batch 8, dropout 0.1, bf16 products "
            "(fp32 without AVX512_BF16)",
            model={"d_model": 128, "n_layer": 4, "n_head": 8, "ctx": 128, "position": "rope", "dropout": 0.1},
            train={
                "time_budget": 600.0,
                "batch": 8,
                "lr": 2e-3,
                "min_lr": 1e-4,
                "warmup": 100,
                "eval_every": 2000,
                "eval_batches": 200,
            },  # fmt: skip
            precision="bf16",
        ),
    )
}


def precision_here(recipe: Recipe, backend: str | None) -> tuple[str, str | None]:
    """The precision to train the recipe with on this machine, and a note if it is not the recipe's:
    a bf16 recipe trains in fp32 where bf16 products are unavailable (no AVX512_BF16, or numba)."""
    if recipe.precision != "bf16" or backend == "numpy":
        return recipe.precision, None
    try:
        from fastchar import _gemm

        usable = _gemm.has_avx512bf16() and backend in (None, "auto", "cython")
    except ImportError:
        usable = False
    if usable:
        return "bf16", None
    return "fp32", f"recipe {recipe.name} uses bf16 products, unavailable here (`fastchar info`); training in fp32"


def get(name: str) -> Recipe:
    """The recipe called name; a ConfigError names the ones there are."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(
            f"--recipe {name!r}: no such recipe (there are: {', '.join(RECIPES)})",
            hint="`fastchar train --recipe list` prints every recipe as flags",
        ) from None


def listing() -> str:
    """Every recipe, one paragraph each: its name, what it is for, and its flags."""
    out = []
    for r in RECIPES.values():
        out.append(f"{r.name}: {r.summary}\n  fastchar train {r.flags()}")
    return "\n\n".join(out)

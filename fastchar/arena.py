"""Arena: one flat buffer per role (params, grads, Adam moments, activations) with named views.

`param_specs` is the parameter table of SPEC.md (names, shapes, order, [in, out] orientation); it is
also the checkpoint layout. `act_specs` lists every activation a training step keeps, so memory is
counted in one place. Nothing here computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from fastchar.config import ModelConfig

Spec = list[tuple[str, tuple[int, ...]]]


class Arena:
    """One contiguous buffer and a view per name; `arena[name]` never copies."""

    def __init__(self, specs: Spec, dtype: npt.DTypeLike = np.float32) -> None:
        self.specs = list(specs)
        self.offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, shape in self.specs:
            size = math.prod(shape)
            self.offsets[name] = (total, total + size)
            total += size
        self.flat = np.zeros(total, dtype=dtype)
        self.views = {
            name: self.flat[start:stop].reshape(shape)
            for (name, shape), (start, stop) in zip(self.specs, self.offsets.values(), strict=True)
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]

    def __contains__(self, name: object) -> bool:
        return name in self.views

    def __iter__(self) -> Iterator[str]:
        return iter(self.views)

    def __len__(self) -> int:
        return len(self.views)

    def keys(self) -> list[str]:
        return list(self.views)

    def items(self) -> list[tuple[str, np.ndarray]]:
        return list(self.views.items())

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes


def param_specs(cfg: ModelConfig) -> Spec:
    """The parameter table of SPEC.md, in buffer order."""
    V, C, T, H = cfg.vocab_size, cfg.d_model, cfg.ctx, cfg.mlp_hidden
    specs: Spec = [("wte", (V, C)), ("wpe", (T, C))]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        specs += [
            (p + "ln1.weight", (C,)),
            (p + "attn.qkv", (C, 3 * C)),
            (p + "attn.proj", (C, C)),
            (p + "ln2.weight", (C,)),
            (p + "mlp.fc", (C, H)),
            (p + "mlp.proj", (H, C)),
        ]
    specs += [("ln_f.weight", (C,)), ("lm_head", (C, V))]
    return specs


def act_specs(cfg: ModelConfig, B: int, T: int) -> Spec:
    """Every activation of one forward pass over a [B, T] batch, including buffers saved for backward.

    The gradient arena uses the same table; `datt` doubles as attention backward's scratch.
    """
    V, C, NH, H = cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.mlp_hidden
    specs: Spec = [("encoded", (B, T, C))]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        specs += [
            (p + "ln1", (B, T, C)),
            (p + "ln1_rstd", (B, T)),
            (p + "qkv", (B, T, 3 * C)),
            (p + "att", (B, NH, T, T)),
            (p + "atty", (B, T, C)),
            (p + "attproj", (B, T, C)),
            (p + "res1", (B, T, C)),
            (p + "ln2", (B, T, C)),
            (p + "ln2_rstd", (B, T)),
            (p + "fch", (B, T, H)),
            (p + "fch_act", (B, T, H)),
            (p + "fcproj", (B, T, C)),
            (p + "res2", (B, T, C)),
        ]
        if cfg.dropout > 0:  # residual branches after dropout (the masks themselves are not stored)
            specs += [(p + "attproj_drop", (B, T, C)), (p + "fcproj_drop", (B, T, C))]
    specs += [
        ("lnf", (B, T, C)),
        ("lnf_rstd", (B, T)),
        ("logits", (B, T, V)),
        ("probs", (B, T, V)),
        ("losses", (B, T)),
    ]
    return specs

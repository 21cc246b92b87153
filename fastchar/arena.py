"""Arena: one flat buffer per role (params, grads, Adam moments, activations) with named views.

The tables come from the network's description (fastchar/graph.py) and are re-exported here:
`param_specs` is the parameter table of docs/architecture.md (names, shapes, order, [in, out] orientation; also
the checkpoint layout), `act_specs` every activation a training step keeps, so memory is counted in
one place. Nothing here computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from fastchar.graph import Spec, act_specs, param_specs

__all__ = ["Arena", "Spec", "act_specs", "param_specs"]


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

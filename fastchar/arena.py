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

__all__ = ["Arena", "Spec", "act_specs", "aligned_zeros", "param_specs"]


def aligned_zeros(n: int, align: int = 64, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """(n,) zeros (float32, or dtype) whose first element sits on an `align`-byte boundary (numpy's
    large zeroed buffers come from mmap, one 16-byte header past a page)."""
    size = np.dtype(dtype).itemsize
    raw = np.zeros(n + align // size, dtype)
    start = (-raw.ctypes.data % align) // size
    return raw[start : start + n]


LINE = 64  # bytes: the flat buffer starts on a cache line (and a 64-byte vector's boundary)


class Arena:
    """One contiguous buffer and a view per name; `arena[name]` never copies.

    The buffer starts on a 64-byte line. With `aligned_views`, every view starts on one too (the
    activations: kernels read and write them in whole vectors, and streaming stores need it); the
    gaps between views are zeros that nothing names. Without it (the parameters, their gradients and
    Adam's moments) the views lie end to end: `flat` is the checkpoint's layout.
    """

    def __init__(self, specs: Spec, dtype: npt.DTypeLike = np.float32, aligned_views: bool = False) -> None:
        self.specs = list(specs)
        self.offsets: dict[str, tuple[int, int]] = {}
        step = LINE // np.dtype(dtype).itemsize
        total = 0
        for name, shape in self.specs:
            if aligned_views:
                total = -(-total // step) * step
            size = math.prod(shape)
            self.offsets[name] = (total, total + size)
            total += size
        self.flat = aligned_zeros(total, LINE, dtype)
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

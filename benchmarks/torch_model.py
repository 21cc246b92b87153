"""The PyTorch twin of fastchar's model, for the benchmarks: it now lives in the package
(fastchar/torch_model.py, `fastchar.to_torch(model)`); this module re-exports it."""

from __future__ import annotations

from fastchar.torch_model import TorchGPT, to_torch

__all__ = ["TorchGPT", "to_torch"]

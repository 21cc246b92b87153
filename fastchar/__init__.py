"""fastchar: train and sample a small character-level transformer on CPU cores, fast.

import fastchar
data = fastchar.TextDataset(fastchar.find_corpus())  # Tiny Shakespeare
model = fastchar.Model(fastchar.ModelConfig(vocab_size=data.vocab_size), backend="auto", seed=0)
fastchar.Trainer(model, data, fastchar.TrainConfig(steps=300)).train()
print(fastchar.generate(model, data.tokenizer, "ROMEO:", 200, top_p=0.9, seed=0))
"""

from fastchar import _blas_env  # noqa: F401, I001  (must run before NumPy loads OpenBLAS)
from fastchar.model import load
from fastchar.config import ModelConfig, TrainConfig
from fastchar.data import TextDataset, find_corpus
from fastchar.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    FastcharError,
    InputError,
    TrainingDiverged,
)
from fastchar.evaluation import evaluate
from fastchar.export import export_onnx
from fastchar.model import Model
from fastchar.sampler import KVCache, generate, stream
from fastchar.threads import set_threads
from fastchar.tokenizer import CharTokenizer
from fastchar.train import Trainer

__all__ = [
    "CharTokenizer",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FastcharError",
    "InputError",
    "KVCache",
    "Model",
    "ModelConfig",
    "TextDataset",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "evaluate",
    "export_onnx",
    "find_corpus",
    "generate",
    "load",
    "set_threads",
    "stream",
    "to_torch",
]


def _version() -> str:
    """The installed distribution's version; from a source tree that is not installed, the version in
    its pyproject.toml (the one place the version is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fastchar")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            found = re.search(r'(?m)^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"))
        except OSError:
            found = None
        return found[1] if found else "0+unknown"


__version__ = _version()


def to_torch(model: Model, dtype: object = None) -> object:
    """model as a torch.nn.Module with its weights (fastchar.torch_model.to_torch; needs PyTorch,
    `pip install "fastchar[torch]"`). Its forward(idx (B, T)) returns (logits (B, T, V), None)."""
    from fastchar.torch_model import to_torch as convert

    return convert(model, dtype)

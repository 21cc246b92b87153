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
    "export_onnx",
    "find_corpus",
    "generate",
    "load",
    "set_threads",
    "stream",
]
__version__ = "0.1.0"

"""fastchar: train and sample a small character-level transformer on CPU cores, fast."""

from fastchar.config import ModelConfig, TrainConfig
from fastchar.model import Model

__all__ = ["ModelConfig", "Model", "TrainConfig"]
__version__ = "0.1.0"

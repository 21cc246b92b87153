"""TensorBoard event files for a training run (`fastchar train --tensorboard`), through tensorboardX.

TensorBoardLog turns the Trainer's metric records (the lines of metrics.jsonl) into scalars in event
files inside the run folder, so `tensorboard --logdir runs` shows every run side by side. tensorboardX
is an optional extra (`pip install "fastchar[tensorboard]"`); this module imports it only when a log is
opened. Nothing here decides what is measured: the Trainer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastchar.errors import ConfigError

TENSORBOARD_HINT = 'pip install "fastchar[tensorboard]" (tensorboardX)'
FLUSH_SECONDS = 10  # how stale a live TensorBoard may be

# metrics.jsonl field -> TensorBoard tag. "loss/..." share one chart group.
TAGS = {
    "loss": "loss/train",  # the training batch's loss at a log line
    "val_loss": "loss/val",  # evaluation: mean over eval_batches of the validation split
    "train_loss": "loss/train_eval",  # evaluation: the same on the training split
    "val_acc": "accuracy/val",  # evaluation: next-character accuracy (argmax = target) on the validation split
    "train_acc": "accuracy/train_eval",  # evaluation: the same on the training split
    "lr": "lr",
    "grad_norm": "grad_norm",  # global gradient norm before clipping
    "tok_per_s": "tok_per_s",  # training tokens per second since the previous log line
}


def require_tensorboardx() -> Any:
    """tensorboardX's SummaryWriter, or a ConfigError naming the extra to install."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs tensorboardX, which is not installed", hint=TENSORBOARD_HINT) from None
    return SummaryWriter


class TensorBoardLog:
    """Scalars of a run, written as TensorBoard event files into folder."""

    def __init__(self, folder: str | Path) -> None:
        summary_writer = require_tensorboardx()
        self.folder = Path(folder)
        self.writer = summary_writer(logdir=str(self.folder), flush_secs=FLUSH_SECONDS)

    def record(self, record: dict) -> None:
        """Add every known field of one metrics record as a scalar at record["step"]."""
        step = int(record["step"])
        for field, tag in TAGS.items():
            value = record.get(field)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, float(value), global_step=step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

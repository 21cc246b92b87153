"""A model's loss on a text: every character predicted once, from the characters before it.

`evaluate(model, text)` cuts the text into windows of the model's context T that overlap by one
character (window w reads characters wT .. wT + T - 1 and predicts wT + 1 .. wT + T), so each
character after the first is a target exactly once and sees between 1 and T characters before it
(the training loop's evaluation draws random windows instead; its figure is an estimate of this one).
The `fastchar eval` command runs it on a file or on a split of one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from fastchar.errors import DataError, InputError
from fastchar.model import Model

DEFAULT_BATCH = 32  # windows per forward: big enough that the kernels run at speed, small in memory


def evaluate(
    model: Model,
    text: str | npt.ArrayLike,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float | int]:
    """Mean next-character loss of model over text (a str, encoded by model.tokenizer, or token ids
    (N,)), in evaluation mode (no dropout): {"loss": nats per character, "bits_per_char",
    "perplexity", "accuracy": the share of targets that are the most likely character, "chars": the
    targets (N - 1), "windows"}. progress(done, total) is called after every batch with targets
    counted so far. The model is left in the mode it was in."""
    ids = _ids(model, text)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    T, n = model.cfg.ctx, len(ids) - 1
    if n < 1:
        raise DataError(f"the text has {len(ids)} character(s): at least 2 are needed to predict one")
    starts = np.arange(0, n, T)
    full = starts[starts + T <= n]
    total, hits = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(full), batch):
            w = full[b0 : b0 + batch, None] + np.arange(T + 1)
            total, hits = _add(model, ids[w], total, hits)
            if progress is not None:
                progress(min(b0 + batch, len(full)) * T, n)
        if len(full) < len(starts):  # the last, shorter window
            total, hits = _add(model, ids[None, starts[-1] :], total, hits)
            if progress is not None:
                progress(n, n)
    finally:
        if was_training:
            model.train()
    loss = total / n
    return {"loss": loss, "bits_per_char": loss / math.log(2), "perplexity": math.exp(min(loss, 700.0)),
            "accuracy": hits / n, "chars": n, "windows": len(starts)}  # fmt: skip


def _ids(model: Model, text: str | npt.ArrayLike) -> np.ndarray:
    """text as token ids (N,): a str through the model's tokenizer (which names characters it
    lacks), else an integer array checked against the vocabulary."""
    if isinstance(text, str):
        if model.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids instead of a str")
        return model.tokenizer.encode(text, dtype=model.tokenizer.dtype())  # 1-2 bytes a character
    ids = np.asarray(text)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"text must be a str or token ids (N,) of integers, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= model.cfg.vocab_size):
        raise InputError(f"token ids must be in [0, {model.cfg.vocab_size}), got {ids.min()} .. {ids.max()}")
    return ids


def _add(model: Model, windows: np.ndarray, total: float, hits: int) -> tuple[float, int]:
    """One forward of windows (B, t + 1): x the first t ids, y the last t; the loss summed and the
    hits added."""
    x, y = windows[:, :-1], windows[:, 1:]
    total += model.forward(x, y) * y.size
    hits += int(np.count_nonzero(model.logits.argmax(axis=-1) == y))
    return total, hits


class Progress:
    """progress(done, total) that prints a line to `write` at most every `every` seconds (nothing for a
    job that ends sooner) and a last line when it ends after one was printed."""

    def __init__(self, write: Callable[[str], None], every: float = 2.0) -> None:
        self.write, self.every = write, every
        self.t0 = self.shown = time.monotonic()
        self.printed = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.shown >= self.every or (self.printed and done == total):
            rate = done / max(now - self.t0, 1e-9)
            self.write(f"eval: {done:,} of {total:,} characters ({done / total:.0%}), {rate:,.0f} a second")
            self.shown, self.printed = now, True

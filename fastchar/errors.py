"""Errors a user can cause: each carries a one-line message and a hint on what to do.

The CLI prints them as `error: ...` and `hint: ...` on stderr and exits non-zero; anything else is a
bug and shows a traceback (or always, with --debug).
"""

from __future__ import annotations


class FastcharError(Exception):
    """Base of every user-facing error; `hint` says what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class ConfigError(FastcharError, ValueError):
    """A configuration or option value is out of range."""


class DataError(FastcharError, ValueError):
    """Training text that cannot be used: missing, empty, too short or not UTF-8."""


class InputError(FastcharError, ValueError):
    """Tokens, a prompt or a batch that does not fit the model or its vocabulary."""


class CheckpointError(FastcharError):
    """A checkpoint folder that is missing, truncated, corrupt or incompatible."""


class TrainingDiverged(FastcharError):
    """The loss or the gradient became NaN or infinite."""

"""CharTokenizer: one token per character, the vocabulary sorted by code point (any Unicode).

Saved with the model as JSON. Leaves out sub-word merges and special tokens on purpose.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fastchar.errors import InputError

SURROGATES = (0xD800, 0xDFFF)  # UTF-16 halves: a str may hold them, UTF-8 text never does
ENCODE_CHUNK = 1 << 16  # characters encoded at a time: the temporaries stay under 1 MiB


class CharTokenizer:
    """Maps characters to ids 0..V-1 in code-point order and back."""

    def __init__(self, chars: Iterable[str]) -> None:
        """chars: the vocabulary, or any text holding it (duplicates are dropped)."""
        if isinstance(chars, bytes | bytearray) or not isinstance(chars, Iterable):
            raise InputError(f"a tokenizer is made from a text or its characters, got {type(chars).__name__}")
        chars = set(chars)
        if not chars:
            raise InputError("a tokenizer needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise InputError("a tokenizer's vocabulary must be single characters")
        surrogates = sorted(c for c in chars if SURROGATES[0] <= ord(c) <= SURROGATES[1])
        if surrogates:  # not characters: they cannot be written out as UTF-8
            raise InputError(f"a tokenizer's vocabulary holds a lone surrogate ({surrogates[0]!r}), not a character")
        self.chars = sorted(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def unknown(self, text: str) -> list[str]:
        """Characters of text that the vocabulary lacks, sorted."""
        if not isinstance(text, str):
            raise InputError(f"the tokenizer encodes a str, got {type(text).__name__}")
        return sorted(set(text) - self.stoi.keys())

    def encode(self, text: str, dtype: npt.DTypeLike = np.int32) -> npt.NDArray[np.int32]:
        """text -> ids (len(text),) int32 (or dtype); names any character the vocabulary lacks.

        Encoded ENCODE_CHUNK characters at a time, so a large text costs its ids and under 1 MiB more."""
        missing = self.unknown(text)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:20])
            more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
            raise InputError(
                f"the text has {len(missing)} character(s) the vocabulary lacks: {shown}{more}",
                hint="use only characters the model was trained on (see `fastchar info CHECKPOINT`)",
            )
        ids = np.empty(len(text), dtype)
        for start in range(0, len(text), ENCODE_CHUNK):
            codes = np.frombuffer(text[start : start + ENCODE_CHUNK].encode("utf-32-le"), dtype=np.uint32)
            ids[start : start + codes.size] = np.searchsorted(self._codes, codes)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; an id outside 0..V-1 is an InputError (a negative one indexed from the end)."""
        chars, n, out = self.chars, len(self.chars), []
        for i in ids:
            k = int(i)
            if not 0 <= k < n:
                raise InputError(f"token id {k} is outside the vocabulary (0..{n - 1})")
            out.append(chars[k])
        return "".join(out)

    def to_dict(self) -> dict:
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, data: dict) -> CharTokenizer:
        return cls(list(data["chars"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> CharTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

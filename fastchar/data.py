"""Training text: finding the corpus, encoding it compactly, the 90/10 split and seeded batches.

Tiny Shakespeare is looked up locally (--data, $FASTCHAR_DATA_DIR, data/) and otherwise downloaded
once from its public home, checked by size and md5, and written atomically into data/. It is never
committed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from fastchar.errors import DataError
from fastchar.tokenizer import CharTokenizer

SHAKESPEARE_NAME = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
VAL_FRACTION = 0.1


def read_text(path: str | Path) -> str:
    """The UTF-8 text of path; errors name the file and, for bad bytes, the line and byte."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"training text {path} does not exist", hint="pass an existing file with --data FILE")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not valid UTF-8: byte {exc.start} (line {line}) is {raw[exc.start : exc.start + 1]!r}",
            hint="convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`",
        ) from None
    if not text:
        raise DataError(f"training text {path} is empty", hint="pass a file with some text in it")
    return text


class TextDataset:
    """A corpus encoded to token ids, split into train (first 90 %) and val (last 10 %).

    `get_batch(split, B, T, rng)` returns x, y: (B, T) int32, y shifted one character ahead.
    """

    def __init__(
        self,
        source: str | Path,
        tokenizer: CharTokenizer | None = None,
        val_fraction: float = VAL_FRACTION,
    ) -> None:
        self.path = Path(source)
        self.text = read_text(self.path)
        self.tokenizer = tokenizer or CharTokenizer.from_text(self.text)
        ids = self.tokenizer.encode(self.text).astype(self.tokenizer.dtype())
        n_train = int(len(ids) * (1 - val_fraction))
        self.splits = {"train": ids[:n_train], "val": ids[n_train:]}

    @classmethod
    def from_text(cls, text: str, tokenizer: CharTokenizer | None = None) -> TextDataset:
        """Build a dataset from an in-memory string (written to a temporary file first)."""
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
            f.write(text)
        try:
            return cls(f.name, tokenizer)
        finally:
            os.unlink(f.name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def check_context(self, T: int) -> None:
        """Each split must hold at least T + 1 characters to cut one (x, y) pair of length T."""
        for split, ids in self.splits.items():
            if len(ids) < T + 1:
                raise DataError(
                    f"{self.path} is too short: its {split} split has {len(ids)} characters but a "
                    f"context of {T} needs at least {T + 1} (the whole file has {len(self)})",
                    hint=f"use a longer text (at least ~{(T + 1) * 10 + 10} characters) or a smaller --ctx",
                )

    def get_batch(self, split: str, B: int, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """B random windows of T + 1 characters from split: x (B, T) int32, y (B, T) int32."""
        ids = self.splits[split]
        self.check_context(T)
        starts = rng.integers(0, len(ids) - T, size=B)
        window = ids[starts[:, None] + np.arange(T + 1)]
        return window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)


def find_corpus(data: str | Path | None = None, download: bool = True) -> Path:
    """The training text: --data, $FASTCHAR_DATA_DIR/tinyshakespeare.txt, data/..., else download."""
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise DataError(f"training text {path} does not exist", hint="check the path given to --data")
        return path
    candidates = []
    if os.environ.get("FASTCHAR_DATA_DIR"):
        candidates.append(Path(os.environ["FASTCHAR_DATA_DIR"]) / SHAKESPEARE_NAME)
    local = Path("data") / SHAKESPEARE_NAME
    candidates.append(local)
    for path in candidates:
        if path.is_file():
            return path
    if not download:
        raise DataError("Tiny Shakespeare was not found", hint=_corpus_hint(candidates))
    return download_shakespeare(local, candidates)


def _corpus_hint(candidates: list[Path]) -> str:
    looked = ", ".join(str(p) for p in candidates)
    return (
        f"looked in {looked}; pass --data FILE, set FASTCHAR_DATA_DIR to a folder holding "
        f"{SHAKESPEARE_NAME}, or download {SHAKESPEARE_URL} to {candidates[-1]}"
    )


def download_shakespeare(dest: Path, candidates: list[Path] | None = None) -> Path:
    """Fetch Tiny Shakespeare once, check size and md5, and write it atomically to dest."""
    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} ...", flush=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except OSError as exc:
        raise DataError(
            f"Tiny Shakespeare is not on this machine and could not be downloaded ({exc})",
            hint=_corpus_hint(candidates or [dest]),
        ) from None
    digest = hashlib.md5(raw).hexdigest()
    if len(raw) != SHAKESPEARE_SIZE or digest != SHAKESPEARE_MD5:
        raise DataError(
            f"the downloaded file has {len(raw)} bytes and md5 {digest}, expected "
            f"{SHAKESPEARE_SIZE} bytes and md5 {SHAKESPEARE_MD5}",
            hint="try again later, or pass a local copy with --data FILE",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(raw)
    os.replace(tmp, dest)
    return dest

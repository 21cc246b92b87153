"""Training text: finding the corpus, encoding it compactly, the 90/10 split and seeded batches.

Tiny Shakespeare is looked up locally (--data, $FASTCHAR_DATA_DIR, data/), then in the xz copy shipped
inside the package (fastchar/corpora/, md5 checked after decompression), and only then downloaded
once from its public home, checked by size and md5, and written atomically into data/. It is never
committed uncompressed. Files ending in .xz are decompressed in memory wherever a text is read.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from fastchar.errors import DataError, InputError
from fastchar.tokenizer import CharTokenizer

SHAKESPEARE_NAME = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SIZE = 1_115_394
SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
# The copy shipped as package data (xz -9e of the file above, 364,404 bytes; see data/README.md).
SHIPPED_CORPUS = Path(__file__).resolve().parent / "corpora" / (SHAKESPEARE_NAME + ".xz")
VAL_FRACTION = 0.1


BOM = "\ufeff"  # a UTF-8 byte order mark some editors put first: not part of the text


def _check_file(path: Path, what: str, hint: str) -> None:
    """A DataError unless path is a regular file, saying what it is instead."""
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file", hint=hint)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist", hint=hint)
    if not path.is_file():
        raise DataError(
            f"{what} {path} is not a regular file (a pipe or a device)",
            hint="save the text to a file first, then pass that file",
        )


def read_bytes(path: str | Path) -> bytes:
    """The bytes of path, decompressed in memory if its name ends in .xz."""
    path = Path(path)
    _check_file(path, "training text", "pass an existing file with --data FILE")
    raw = path.read_bytes()
    if path.suffix == ".xz":
        try:
            raw = _xz_text(raw, path)
        except lzma.LZMAError as exc:
            raise DataError(
                f"{path} is not a valid xz file ({exc})", hint="check the file with `xz -t FILE`, or pass the text"
            ) from None
    return raw


def _xz_text(raw: bytes, path: Path) -> bytes:
    """raw decompressed (every xz stream in it), 16 MiB at a time, refused as soon as the text passes
    what the memory available can read and encode (check_corpus_memory can only guess an .xz file's
    text from its size, and a few MB of xz can hold gigabytes)."""
    from fastchar.runfolder import MIB, available_bytes

    available = available_bytes()
    limit = None if available is None else available // CORPUS_BYTES_PER_BYTE
    parts, total, data = [], 0, raw
    while True:
        stream = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        chunk = stream.decompress(data, max_length=16 * MIB)
        while True:
            parts.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise DataError(
                    f"the training text in {path} is over {limit / MIB:,.0f} MiB, more than the memory available "
                    f"({available / MIB:,.0f} MiB) can read and encode",
                    hint="use a shorter text, or free memory (`free -m`)",
                )
            if stream.eof:
                break
            if stream.needs_input:
                raise lzma.LZMAError("the file ends inside a stream (truncated?)")
            chunk = stream.decompress(b"", max_length=16 * MIB)
        data = stream.unused_data.lstrip(b"\0")  # the zero padding xz allows between streams
        if not data:
            return b"".join(parts)


def _decode(raw: bytes, path: Path) -> str:
    """raw as UTF-8 without a leading byte order mark; bad bytes are named by line and byte."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not valid UTF-8: byte {exc.start} (line {line}) is {raw[exc.start : exc.start + 1]!r}",
            hint="convert the file to UTF-8, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`",
        ) from None
    return text.removeprefix(BOM)


def read_text(path: str | Path) -> str:
    """The UTF-8 text of path (.xz decompressed); errors name the file and, for bad bytes, the line and byte."""
    path = Path(path)
    text = _decode(read_bytes(path), path)
    if not text:
        raise DataError(f"training text {path} is empty", hint="pass a file with some text in it")
    return text


def read_prompt(path: str | Path) -> str:
    """The UTF-8 text of a prompt file (--prompt-file); a pipe such as <(printf X) is read as well."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"prompt file {path} is a folder, not a file", hint="pass a text file with --prompt-file FILE")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPT_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"prompt file {path} does not exist", hint="check the path given to --prompt-file") from None
    except OSError as exc:
        raise DataError(f"prompt file {path} cannot be read ({exc.strerror or exc})",
                        hint="check the path given to --prompt-file and its permissions") from None  # fmt: skip
    if len(raw) > MAX_PROMPT_BYTES:
        raise DataError(f"prompt file {path} is larger than {MAX_PROMPT_BYTES // 2**20} MiB",
                        hint="a prompt longer than the model's context is cut to it anyway: pass its end")  # fmt: skip
    return _decode(raw, path)


MAX_PROMPT_BYTES = 64 * 2**20
# bytes of memory per byte of training text while it is read, encoded and fingerprinted (the raw
# bytes, the str, the ids, the encoder's chunks, the UTF-8 copy hashed for checkpoints); TextDataset
# alone peaks at 2.4 for an ASCII text (tests/test_adversarial2.py, case 8)
CORPUS_BYTES_PER_BYTE = 4


def check_corpus_memory(path: str | Path, available: int | None = None) -> int:
    """Refuse a training text too large to read and encode in the memory available now; returns
    the estimate in bytes (from the file's size, before anything is read)."""
    from fastchar.runfolder import MIB, available_bytes

    path = Path(path)
    _check_file(path, "training text", "pass an existing file with --data FILE")
    size = path.stat().st_size * (8 if path.suffix == ".xz" else 1)  # xz text compresses ~3-8x
    need = size * CORPUS_BYTES_PER_BYTE
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        raise DataError(
            f"reading the training text {path} ({size / MIB:,.0f} MiB) needs about {need / MIB:,.0f} MiB "
            f"but only {available / MIB:,.0f} MiB is available",
            hint="use a shorter text (e.g. `head -c 100M in.txt > part.txt`), or free memory (`free -m`)",
        )
    return need


def train_size(n: int, val_fraction: float = VAL_FRACTION) -> int:
    """Characters of the train split of a text of n: the first (1 - val_fraction) n, the rest val."""
    return int(n * (1 - val_fraction))


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
        if not isinstance(source, str | os.PathLike):
            raise InputError(f"TextDataset reads a file: pass its path, got {type(source).__name__}")
        if tokenizer is not None and not isinstance(tokenizer, CharTokenizer):
            raise InputError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
            raise InputError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
        self.path = Path(source)
        self.text = read_text(self.path)
        self.tokenizer = tokenizer or CharTokenizer.from_text(self.text)
        if self.tokenizer.vocab_size < 2:
            raise DataError(
                f"{self.path} has only one distinct character ({self.text[0]!r}); there is nothing to predict",
                hint="pass a text with at least two distinct characters",
            )
        ids = self.tokenizer.encode(self.text, dtype=self.tokenizer.dtype())  # 1-2 bytes per character
        n_train = train_size(len(ids), val_fraction)
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
    """The training text: --data, $FASTCHAR_DATA_DIR/tinyshakespeare.txt, data/..., the shipped copy,
    else a download. `locate_corpus` also says which one it took."""
    return locate_corpus(data, download)[0]


def locate_corpus(data: str | Path | None = None, download: bool = True) -> tuple[Path, str]:
    """(path, where it came from) of the training text, in the order of find_corpus."""
    if data is not None:
        path = Path(data)
        _check_file(path, "training text", "check the path given to --data")
        return path, "--data"
    candidates = []
    if os.environ.get("FASTCHAR_DATA_DIR"):
        candidates.append((Path(os.environ["FASTCHAR_DATA_DIR"]) / SHAKESPEARE_NAME, "$FASTCHAR_DATA_DIR"))
    local = Path("data") / SHAKESPEARE_NAME
    candidates.append((local, "data/ in the current folder"))
    for path, origin in candidates:
        if path.is_file():
            return path, origin
    if SHIPPED_CORPUS.is_file():
        check_shakespeare(read_bytes(SHIPPED_CORPUS), f"the shipped copy {SHIPPED_CORPUS}")
        return SHIPPED_CORPUS, "the copy shipped with fastchar, md5 checked"
    looked = [path for path, _ in candidates] + [SHIPPED_CORPUS]
    if not download:
        raise DataError("Tiny Shakespeare was not found", hint=_corpus_hint(looked))
    return download_shakespeare(local, looked), f"downloaded from {SHAKESPEARE_URL}"


def check_shakespeare(raw: bytes, what: str) -> None:
    """Raise a DataError unless raw is Tiny Shakespeare, byte for byte (size and md5)."""
    digest = hashlib.md5(raw).hexdigest()
    if len(raw) != SHAKESPEARE_SIZE or digest != SHAKESPEARE_MD5:
        raise DataError(
            f"{what} has {len(raw)} bytes and md5 {digest}, expected "
            f"{SHAKESPEARE_SIZE} bytes and md5 {SHAKESPEARE_MD5}",
            hint="reinstall fastchar, or pass a local copy with --data FILE",
        )


def _corpus_hint(candidates: list[Path]) -> str:
    looked = ", ".join(str(p) for p in candidates)
    return (
        f"looked in {looked}; pass --data FILE, set FASTCHAR_DATA_DIR to a folder holding "
        f"{SHAKESPEARE_NAME}, or download {SHAKESPEARE_URL} to data/{SHAKESPEARE_NAME}"
    )


def download_shakespeare(dest: Path, candidates: list[Path] | None = None) -> Path:
    """Fetch Tiny Shakespeare once, check size and md5, and write it atomically to dest."""
    print(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} ...", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            raw = response.read()
    except OSError as exc:
        raise DataError(
            f"Tiny Shakespeare is not on this machine and could not be downloaded ({exc})",
            hint=_corpus_hint(candidates or [dest]),
        ) from None
    try:
        check_shakespeare(raw, "the downloaded file")
    except DataError as exc:
        exc.hint = "try again later, or pass a local copy with --data FILE"
        raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    tmp.write_bytes(raw)
    os.replace(tmp, dest)
    return dest

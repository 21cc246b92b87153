"""Tokenizer, dataset, batches and corpus lookup, including the errors a user can run into."""

from __future__ import annotations

import hashlib
import lzma

import numpy as np
import pytest

from fastchar import CharTokenizer, DataError, InputError, TextDataset
from fastchar import data as data_module


def test_tokenizer_round_trip_any_unicode(tmp_path):
    text = "héllo wörld — ☃ 日本\n"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text)), "vocabulary is sorted by code point"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.decode(ids) == text
    tok.save(tmp_path / "tok.json")
    again = CharTokenizer.load(tmp_path / "tok.json")
    assert again.chars == tok.chars


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(InputError, match=r"2 character\(s\).*'x', 'z'"):
        tok.encode("abxcz")


def test_dataset_split_and_batches(corpus):
    ds = TextDataset(corpus)
    n = len(ds.text)
    assert len(ds.splits["train"]) == int(n * 0.9) and len(ds) == n
    assert ds.splits["train"].dtype == np.uint8
    x, y = ds.get_batch("train", 4, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    assert np.array_equal(x[:, 1:], y[:, :-1]), "y is x shifted by one character"
    x2, _ = ds.get_batch("train", 4, 16, np.random.default_rng(0))
    assert np.array_equal(x, x2), "the same seed gives the same batch"
    decoded = ds.tokenizer.decode(x[0])
    assert decoded in ds.text


def test_shakespeare_has_spec_vocabulary(shakespeare):
    ds = TextDataset(shakespeare)
    assert len(ds) == 1_115_394 and ds.vocab_size == 65


@pytest.fixture
def shakespeare():
    try:
        return data_module.find_corpus(download=False)
    except DataError:
        pytest.skip("Tiny Shakespeare is not on this machine (set FASTCHAR_DATA_DIR)")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match="is empty"):
        TextDataset(path)


def test_too_short_for_context(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 3)
    ds = TextDataset(path)
    with pytest.raises(DataError, match="too short.*context of 64 needs at least 65"):
        ds.check_context(64)


def test_not_utf8_says_where(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"line one\nline two caf\xe9\n")
    with pytest.raises(DataError, match=r"not valid UTF-8: byte 21 \(line 2\)"):
        TextDataset(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data_module.find_corpus(tmp_path / "nope.txt")


def test_corpus_lookup_order(tmp_path, monkeypatch):
    env_dir, cwd = tmp_path / "env", tmp_path / "cwd"
    (cwd / "data").mkdir(parents=True)
    env_dir.mkdir()
    (cwd / "data" / "tinyshakespeare.txt").write_text("local")
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    assert data_module.find_corpus() == data_module.Path("data/tinyshakespeare.txt")
    (env_dir / "tinyshakespeare.txt").write_text("env")
    monkeypatch.setenv("FASTCHAR_DATA_DIR", str(env_dir))
    assert data_module.find_corpus() == env_dir / "tinyshakespeare.txt"
    explicit = tmp_path / "mine.txt"
    explicit.write_text("mine")
    assert data_module.find_corpus(explicit) == explicit


@pytest.fixture
def offline(monkeypatch):
    """No network: any download attempt fails at once, and is counted."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", refuse)
    return attempts


def test_shipped_copy_is_used_offline(tmp_path, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)  # no data/ here
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    path, origin = data_module.locate_corpus()
    assert path == data_module.SHIPPED_CORPUS and path.name == "tinyshakespeare.txt.xz"
    assert "shipped" in origin and not offline, "no download was attempted"
    assert path.stat().st_size < 400_000, "shipped compressed"
    ds = TextDataset(path)
    assert len(ds) == 1_115_394 and ds.vocab_size == 65
    assert hashlib.md5(ds.text.encode("utf-8")).hexdigest() == data_module.SHAKESPEARE_MD5
    assert ds.text.startswith("First Citizen:\n")


def test_local_copies_come_before_the_shipped_one(tmp_path, monkeypatch, offline):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tinyshakespeare.txt").write_text("local")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    assert data_module.locate_corpus() == (data_module.Path("data/tinyshakespeare.txt"), "data/ in the current folder")


def test_shipped_copy_is_md5_checked(tmp_path, monkeypatch, offline):
    fake = tmp_path / "tinyshakespeare.txt.xz"
    fake.write_bytes(lzma.compress(b"Not Shakespeare at all.\n" * 100))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module, "SHIPPED_CORPUS", fake)
    with pytest.raises(DataError, match=r"the shipped copy .* has 2400 bytes and md5 .*expected 1115394 bytes"):
        data_module.find_corpus()
    assert not offline


def test_xz_text_and_a_corrupt_xz(tmp_path):
    good = tmp_path / "poem.txt.xz"
    good.write_bytes(lzma.compress("héllo wörld\n".encode() * 50))
    assert TextDataset(good).text == "héllo wörld\n" * 50
    bad = tmp_path / "bad.txt.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 truncated")
    with pytest.raises(DataError, match="bad.txt.xz is not a valid xz file"):
        TextDataset(bad)


def test_xz_streams_truncation_and_a_bomb(tmp_path, monkeypatch):
    """Concatenated streams (and xz's zero padding) read whole; a file cut inside a stream is an error;
    20 MiB of text in 3 KB of xz, which check_corpus_memory's size guess lets through, is refused while
    it is decompressed once it passes what the memory available can take."""
    from fastchar import runfolder

    two = tmp_path / "two.txt.xz"
    two.write_bytes(lzma.compress(b"first\n" * 1000) + b"\0" * 8 + lzma.compress(b"second\n" * 1000))
    assert TextDataset(two).text == "first\n" * 1000 + "second\n" * 1000
    cut = tmp_path / "cut.txt.xz"
    cut.write_bytes(two.read_bytes()[:200])
    with pytest.raises(DataError, match="cut.txt.xz is not a valid xz file"):
        TextDataset(cut)
    bomb = tmp_path / "bomb.txt.xz"
    bomb.write_bytes(lzma.compress(b"ab\n" * (7 * 2**20)))
    assert bomb.stat().st_size < 10_000
    monkeypatch.setattr(runfolder, "available_bytes", lambda: 40 * runfolder.MIB)
    data_module.check_corpus_memory(bomb)  # the size guess: 80 KB of text
    with pytest.raises(DataError, match=r"bomb.txt.xz is over 10 MiB, more than the memory available \(40 MiB\)"):
        TextDataset(bomb)


def test_offline_and_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module, "SHIPPED_CORPUS", tmp_path / "not-installed.txt.xz")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not be downloaded") as info:
        data_module.find_corpus()
    assert "--data FILE" in info.value.hint and "FASTCHAR_DATA_DIR" in info.value.hint
    assert "not-installed.txt.xz" in info.value.hint, "the hint lists every place looked in"
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()


def test_download_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module, "SHIPPED_CORPUS", tmp_path / "not-installed.txt.xz")

    class Response:
        def __init__(self, body: bytes) -> None:
            self.body = body

        def read(self) -> bytes:
            return self.body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(data_module.urllib.request, "urlopen", lambda *a, **k: Response(b"wrong"))
    with pytest.raises(DataError, match="md5"):
        data_module.find_corpus()
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()
    good = b"x" * 10
    monkeypatch.setattr(data_module, "SHAKESPEARE_SIZE", len(good))
    monkeypatch.setattr(data_module, "SHAKESPEARE_MD5", data_module.hashlib.md5(good).hexdigest())
    monkeypatch.setattr(data_module.urllib.request, "urlopen", lambda *a, **k: Response(good))
    path = data_module.find_corpus()
    assert path.read_bytes() == good and not list((tmp_path / "data").glob("*.part"))

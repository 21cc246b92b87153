"""Tokenizer, dataset, batches and corpus lookup, including the errors a user can run into."""

from __future__ import annotations

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


def test_offline_and_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not be downloaded") as info:
        data_module.find_corpus()
    assert "--data FILE" in info.value.hint and "FASTCHAR_DATA_DIR" in info.value.hint
    assert not (tmp_path / "data" / "tinyshakespeare.txt").exists()


def test_download_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FASTCHAR_DATA_DIR", raising=False)

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

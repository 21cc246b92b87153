"""Adversarial review, round 3: cases found by trying to break the command line and the Python API."""

from __future__ import annotations

import pytest

from fastchar import ModelConfig
from fastchar.cli import main
from fastchar.errors import ConfigError


@pytest.mark.parametrize("sizes", [{"mlp_hidden": 1}, {"d_model": 1, "n_head": 1}])
def test_a_width_of_one_is_refused_by_the_config(sizes):
    """A layer of width 1 used to build: every backend then failed in its first forward (numpy's matmul
    ValueError, Numba's TypingError, the Cython gemm's shape error), because act_specs gives a width-1
    activation the [B, T] shape of a per-position value."""
    with pytest.raises(ConfigError, match="must be at least 2"):
        ModelConfig(**sizes)


def test_mlp_hidden_1_on_the_command_line_is_one_error_before_work(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--out", str(out), "--mlp-hidden", "1", "--d-model", "32",
            "--n-head", "2", "--n-layer", "1", "--ctx", "16", "--steps", "2", "--sample-chars", "0"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: ModelConfig.mlp_hidden must be at least 2, got 1" in err, err
    assert "hint: pass --mlp-hidden 2 or more" in err
    assert not out.exists()  # refused before the run folder was made


def _raises(fn, kind, says):
    with pytest.raises(kind, match=says):
        fn()


def test_the_python_api_names_bad_arguments(tmp_path):
    """Wrong types and values through the Python API were bare TypeError, ValueError, AttributeError or
    IndexError tracebacks, and tok.decode([-1]) silently gave the last character."""
    import numpy as np

    from fastchar import CharTokenizer, Model, TextDataset, load
    from fastchar.errors import InputError

    tok = CharTokenizer("abc")
    _raises(lambda: tok.decode([3]), InputError, r"token id 3 is outside the vocabulary \(0..2\)")
    _raises(lambda: tok.decode([-1]), InputError, "token id -1 is outside")
    assert tok.decode(np.array([2, 0], np.int64)) == "ca"
    _raises(lambda: CharTokenizer(5), InputError, "made from a text or its characters, got int")
    _raises(lambda: CharTokenizer(None), InputError, "got NoneType")
    _raises(lambda: tok.encode(None), InputError, "encodes a str, got NoneType")
    _raises(lambda: Model({"vocab_size": 65}), ConfigError, "Model needs a ModelConfig, got dict")
    cfg = ModelConfig(vocab_size=np.int64(11), d_model=32, n_head=4, n_layer=1, ctx=8)
    assert type(cfg.vocab_size) is int and cfg.to_dict()["vocab_size"] == 11  # numpy ints are taken as ints
    for seed in (-1, "a", 1.5, True):
        _raises(lambda seed=seed: Model(cfg, backend="numpy", seed=seed), ConfigError, "seed must be an integer >= 0")
    assert Model(cfg, backend="numpy", seed=np.int64(3)).dropout_seed == 3
    text = tmp_path / "t.txt"
    text.write_text("abcabc\n" * 20)
    _raises(lambda: TextDataset(None), InputError, "pass its path, got NoneType")
    _raises(lambda: TextDataset(text, tokenizer="abc"), InputError, "must be a CharTokenizer, got str")
    for bad in (float("nan"), "0.1", 1.5, -1, 0, 1, True):
        _raises(
            lambda bad=bad: TextDataset(text, val_fraction=bad),
            InputError,
            r"val_fraction must be a number in \(0, 1\)",
        )
    assert len(TextDataset(text, val_fraction=0.25).splits["val"]) == 35
    _raises(lambda: load(None), InputError, "pass its path, got NoneType")

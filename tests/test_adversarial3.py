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

"""Checkpoints: exact round trip, atomic writes, and clear errors for damaged or foreign folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fastchar.checkpoint as ckpt
from fastchar import CharTokenizer, CheckpointError, Model, ModelConfig, TrainConfig, load

CFG = ModelConfig(vocab_size=5, d_model=16, n_layer=1, n_head=2, ctx=8, mlp_hidden=32)


@pytest.fixture
def saved(tmp_path):
    model = Model(CFG, backend="numpy", seed=1)
    model.adam_m.flat[:] = np.arange(model.adam_m.flat.size, dtype=np.float32)
    model.adam_v.flat[:] = 2.0
    path = ckpt.save(model, tmp_path / "ck", CharTokenizer("abcde"), TrainConfig(steps=7), {"step": 3})
    return model, path


def test_round_trip(saved):
    model, path = saved
    again = load(path, backend="numpy")
    assert again.cfg == CFG
    assert np.array_equal(again.params.flat, model.params.flat)
    assert np.array_equal(again.adam_m.flat, model.adam_m.flat)
    assert np.array_equal(again.adam_v.flat, model.adam_v.flat)
    assert again.tokenizer.chars == list("abcde")
    assert again.train_cfg["steps"] == 7 and again.train_state["step"] == 3
    for name in model.params:
        assert np.array_equal(again.params[name], model.params[name]), name


def test_model_save_method(tmp_path):
    model = Model(CFG, backend="numpy", seed=2)
    model.save(tmp_path / "m")
    assert np.array_equal(load(tmp_path / "m").params.flat, model.params.flat)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")


def test_folder_without_meta(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        load(tmp_path / "empty")


def test_truncated_file_is_named(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated"):
        load(path)


def test_corrupt_file_is_named(saved):
    _, path = saved
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is corrupt"):
        load(path)


@pytest.mark.parametrize("name, other", [("latest", "best instead of latest"), ("best", "latest instead of best")])
def test_a_damaged_checkpoint_s_hint_names_the_other_one(tmp_path, name, other):
    """A damaged latest said "use another one (e.g. latest instead of best)": the damaged one itself."""
    model = Model(CFG, backend="numpy", seed=1)
    path = ckpt.save(model, tmp_path / name, CharTokenizer("abcde"), TrainConfig(steps=7), {"step": 3})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load(path)
    assert info.value.hint == f"the checkpoint is damaged; use another one (e.g. {other})"
    (path / "model.safetensors").write_bytes(data[:-8] + bytes(8))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load(path)
    assert info.value.hint == f"the checkpoint is damaged; use another one (e.g. {other})"


def test_corrupt_meta(saved):
    _, path = saved
    (path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        load(path)


def test_incompatible_config_names_the_mismatch(saved):
    _, path = saved
    meta = json.loads((path / "meta.json").read_text())
    meta["model"]["d_model"] = 32
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor 'wte' has shape \(5, 16\).*needs \(5, 32\)"):
        load(path)


def test_failed_save_keeps_last_good_checkpoint(saved, monkeypatch):
    model, path = saved
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    calls = []

    def disk_full(tensors, filename, *args, **kwargs):
        calls.append(filename)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    model.params.flat[:] = 0
    with pytest.raises(OSError, match="No space"):
        ckpt.save(model, path)
    assert calls, "the save was attempted"
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary folder left"
    assert not np.array_equal(load(path).params.flat, model.params.flat)


def test_crash_between_renames_is_recovered(saved):
    model, path = saved
    path.rename(path.with_name(path.name + ".old"))  # as if the process died mid-swap
    with pytest.warns(UserWarning, match="interrupted save"):
        again = load(path)
    assert np.array_equal(again.params.flat, model.params.flat)


def test_checkpoint_module_does_not_import_the_model():
    """checkpoint.py reads and writes files; fastchar.model builds Models from them (no import circle)."""
    import ast

    tree = ast.parse((Path(__file__).parent.parent / "fastchar" / "checkpoint.py").read_text())
    runtime = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    guarded = {id(n) for node in tree.body if isinstance(node, ast.If) for n in ast.walk(node)}
    imported = {node.module for node in runtime if id(node) not in guarded}
    assert "fastchar.model" not in imported and "fastchar" not in imported, imported

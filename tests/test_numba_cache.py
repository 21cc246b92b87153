"""An unwritable Numba cache must not break fastchar: the numba backend warns and caches elsewhere.

Runs a fresh interpreter on a copy of the package where every cache location Numba tries is blocked
by a regular file standing where a directory must go (this blocks root too, unlike chmod):
NUMBA_CACHE_DIR, the package's own __pycache__ and the user-wide cache under XDG_CACHE_HOME/HOME.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fastchar

pytest.importorskip("numba")

SCRIPT = """
import warnings
warnings.simplefilter("always")
import numpy as np
import fastchar
assert fastchar.__file__.startswith({root!r}), fastchar.__file__
from fastchar import Model, ModelConfig
cfg = ModelConfig(vocab_size=11, d_model=32, n_layer=1, n_head=4, ctx=8, mlp_hidden=64)
model = Model(cfg, backend="numba", seed=0)
x = np.random.default_rng(0).integers(0, 11, (2, 8))
loss = model.forward(x, x)
assert np.isfinite(loss), loss
print("LOSS", loss)
"""


@pytest.mark.slow  # compiles every kernel cold in a fresh process
def test_unwritable_cache_falls_back_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "site"
    pkg = root / "fastchar"
    src = Path(fastchar.__file__).parent
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    (pkg / "backends" / "__pycache__").write_text("not a directory")  # blocks the in-tree cache
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(
        NUMBA_CACHE_DIR=str(blocker / "numba"),
        XDG_CACHE_HOME=str(blocker / "xdg"),
        HOME=str(blocker / "home"),
        # -S below skips site, and so the editable install's finder: the copy is what imports
        PYTHONPATH=os.pathsep.join([str(root), sysconfig.get_paths()["purelib"]]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT.format(root=str(root))],
        env=env,
        cwd=tmp_path,  # not the repo: "" on sys.path would import the real package
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "LOSS" in proc.stdout
    assert "no writable Numba cache location" in proc.stderr, proc.stderr

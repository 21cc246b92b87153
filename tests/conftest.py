"""Shared fixtures: a seeded rng, the backends to test, tolerances in one table, tiny configs."""

from __future__ import annotations

import os

# OpenMP threads that wait by sleeping rather than spinning, for this process and the ones it starts,
# unless the environment chose: on a machine where anything else runs, 2 spinning threads on 2 cores
# made 30 steps take 50 s instead of 2 s. Set before fastchar loads (it reads the policy at import).
if not any(os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fastchar.backends import available_backends  # noqa: E402
from fastchar.config import ModelConfig  # noqa: E402

# (rtol, atol) per kernel, float32 against the float32 reference. Reductions over C or T in a
# different order differ by a few ulps of the largest term; matmuls over up to 512 terms more so.
DEFAULT_TOL = (1e-4, 1e-5)
TOL = {
    "matmul_forward": (1e-4, 1e-4),
    "matmul_backward": (1e-4, 1e-4),
    "attention_backward": (1e-4, 5e-5),
    "crossentropy_forward": (1e-5, 1e-5),
    "grad_norm": (1e-5, 0.0),
    "adamw_update": (1e-5, 1e-6),
}


def tol(kernel: str) -> tuple[float, float]:
    return TOL.get(kernel, DEFAULT_TOL)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def compiled_backends() -> list[str]:
    """Every backend but the reference; FASTCHAR_REQUIRE_BACKENDS makes a missing one an error."""
    names = [b for b in available_backends() if b != "numpy"]
    required = os.environ.get("FASTCHAR_REQUIRE_BACKENDS", "")
    for name in filter(None, required.split(",")):
        if name not in available_backends():
            raise RuntimeError(f"backend {name!r} is required (FASTCHAR_REQUIRE_BACKENDS) but not available")
    return names


def reference_fast_compiled_slow() -> list:
    """available_backends() as parameters, the compiled ones marked slow: for end-to-end runs whose
    compiled twins the kernel and model parity tests already cover in the fast set."""
    return [name if name == "numpy" else pytest.param(name, marks=pytest.mark.slow) for name in available_backends()]


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=11, d_model=32, n_layer=2, n_head=4, ctx=16, mlp_hidden=128)


PANGRAMS = (
    "the quick brown fox jumps over the lazy dog.\n"
    "pack my box with five dozen liquor jugs!\n"
    "how vexingly quick daft zebras jump?\n"
)


@pytest.fixture
def corpus(tmp_path):
    """A small learnable UTF-8 text file (about 12 k characters)."""
    path = tmp_path / "corpus.txt"
    path.write_text(PANGRAMS * 100, encoding="utf-8")
    return path


# ---- instruction-set paths (fastchar.isa) -------------------------------------------------------
# A test that takes `isa_path` runs once per path this CPU runs (avx512, avx2 and generic on an
# AVX-512 machine; avx2 and generic on an AVX2 one; neon and generic on ARM64), the compiled kernels
# forced onto it (fastchar.isa.force) for the test's duration; `vector_path` skips "generic".
from collections.abc import Iterator  # noqa: E402

from fastchar import isa  # noqa: E402


def paths() -> list[str]:
    """Every path this CPU runs, best first ("generic" alone when no compiled module is built)."""
    try:
        return list(isa.runnable())
    except ImportError:
        return ["generic"]


VECTOR_PATHS = [p for p in paths() if p != "generic"]


@pytest.fixture(params=paths())
def isa_path(request: pytest.FixtureRequest) -> Iterator[str]:
    with isa.force(request.param):
        yield request.param


@pytest.fixture(params=VECTOR_PATHS or [pytest.param("none", marks=pytest.mark.skip(reason="no vector path"))])
def vector_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """As isa_path, over the vector paths only (the kernels that the generic path does not have)."""
    with isa.force(request.param):
        yield request.param

"""Model(precision=...): bf16 matrix products against the bf16 reference and fp32; the environment
fastchar sets for libgomp and OpenBLAS (fastchar/_blas_env.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastchar import ConfigError, Model, ModelConfig, isa
from fastchar.backends import available_backends
from fastchar.backends.reference import matmul_backward_bf16, matmul_forward_bf16, round_bf16

try:
    from fastchar import _gemm

    HAS_BF16 = _gemm.has_avx512bf16()
except ImportError:
    _gemm, HAS_BF16 = None, False

needs_bf16 = pytest.mark.skipif(
    "cython" not in available_backends() or not HAS_BF16,
    reason="bf16 needs the cython backend and a CPU with AVX512_BF16 (FASTCHAR_DISABLE_BF16 unset)",
)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def batch(cfg: ModelConfig, B: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, cfg.ctx)), rng.integers(0, cfg.vocab_size, (B, cfg.ctx))


def grads(backend: str, precision: str, cfg: ModelConfig) -> tuple[float, np.ndarray]:
    model = Model(cfg, backend=backend, seed=1, precision=precision)
    loss = model.forward(*batch(cfg))
    model.backward()
    return loss, model.grads.flat.copy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


CFG = ModelConfig(vocab_size=65, ctx=32, d_model=64, n_layer=2, n_head=4)


def test_reference_bf16_rounds_every_operand() -> None:
    """The numpy bf16 kernels equal float64 products of the bf16-rounded operands."""
    rng = np.random.default_rng(0)
    inp, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((7, 5), (5, 3), (7, 3)))
    out = np.empty((7, 3), np.float32)
    matmul_forward_bf16(out, inp, w)
    r = lambda a: round_bf16(a).astype(np.float64)  # noqa: E731
    np.testing.assert_allclose(out, r(inp) @ r(w), rtol=1e-5, atol=1e-6)
    dinp, dw = np.ones((7, 5), np.float32), np.ones((5, 3), np.float32)
    matmul_backward_bf16(dinp, dw, dout, inp, w)
    np.testing.assert_allclose(dinp, 1 + r(dout) @ r(w).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, 1 + r(inp).T @ r(dout), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, inp @ w, rtol=1e-6, atol=0)  # the rounding did something


@needs_bf16
def test_cython_bf16_matmul_kernels_match_reference() -> None:
    """_gemm bf16 against the reference on the same (rounded) inputs: both accumulate the same bf16
    products in fp32, only the summation order differs, so |diff| <= 1e-5 * sum|a||b| (K <= 512)."""
    rng = np.random.default_rng(3)
    N, IC, OC = 96, 128, 384
    inp, w, dout = (rng.standard_normal(s).astype(np.float32) for s in ((N, IC), (IC, OC), (N, OC)))
    out, ref = np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)
    _gemm.matmul_forward(out, inp, w, precision="bf16")
    matmul_forward_bf16(ref, inp, w)
    scale = np.abs(round_bf16(inp)) @ np.abs(round_bf16(w))
    assert np.max(np.abs(out - ref) / scale) < 1e-5
    dinp, dw = np.zeros((N, IC), np.float32), np.zeros((IC, OC), np.float32)
    rdinp, rdw = np.zeros_like(dinp), np.zeros_like(dw)
    _gemm.matmul_backward(dinp, dw, dout, inp, w, precision="bf16")
    matmul_backward_bf16(rdinp, rdw, dout, inp, w)
    assert np.max(np.abs(dinp - rdinp) / (np.abs(round_bf16(dout)) @ np.abs(round_bf16(w)).T)) < 1e-5
    assert np.max(np.abs(dw - rdw) / (np.abs(round_bf16(inp)).T @ np.abs(round_bf16(dout)))) < 1e-5


def test_numpy_bf16_model_near_fp32() -> None:
    """The bf16 reference model: rounding the products' operands to 8 mantissa bits (relative error
    2**-9 each) moves the loss by < 1e-3 and the gradient by a few 1e-3 relative; 2e-2 bounds it."""
    l32, g32 = grads("numpy", "fp32", CFG)
    l16, g16 = grads("numpy", "bf16", CFG)
    assert abs(l16 - l32) < 1e-3
    assert 1e-5 < rel(g16, g32) < 2e-2  # different (rounded), but close


@needs_bf16
def test_cython_bf16_model_gradients() -> None:
    """Cython bf16 against the numpy bf16 reference (same rounding; fp32 summation order and the
    compiled softmax/attention differ: measured ~2e-3, bound 1e-2) and against numpy fp32 (2e-2)."""
    l32, g32 = grads("numpy", "fp32", CFG)
    lref, gref = grads("numpy", "bf16", CFG)
    l16, g16 = grads("cython", "bf16", CFG)
    assert abs(l16 - lref) < 1e-3 and abs(l16 - l32) < 1e-3
    assert rel(g16, gref) < 1e-2
    assert rel(g16, g32) < 2e-2


@pytest.mark.skipif("cython" not in available_backends(), reason="the cython backend is not built here")
def test_cython_fp32_plan_matches_reference() -> None:
    """The fp32 plan (packed AVX-512 products and attention where available) stays at fp32 accuracy."""
    l32, g32 = grads("numpy", "fp32", CFG)
    lc, gc = grads("cython", "fp32", CFG)
    assert abs(lc - l32) < 1e-5
    assert rel(gc, g32) < 1e-4


def test_bad_precision_and_numba_bf16_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="precision must be one of"):
        Model(CFG, backend="numpy", precision="fp16")
    if "numba" in available_backends():
        with pytest.raises(ConfigError, match="no bf16 kernels") as info:
            Model(CFG, backend="numba", precision="bf16")
        assert "fp32" in info.value.hint


def _bf16_error(extra_env: dict) -> str:
    """The ConfigError line (message | hint) of a bf16 cython Model in a child with ENV + extra_env."""
    code = (
        "import fastchar\n"
        "try:\n"
        "    fastchar.Model(fastchar.ModelConfig(vocab_size=65), backend='cython', precision='bf16')\n"
        "except fastchar.ConfigError as e:\n"
        "    print('ERR', e, '|', e.hint)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**ENV, **extra_env}, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert "ERR precision 'bf16' is unavailable" in out.stdout, out.stderr
    return out.stdout


@pytest.mark.skipif("cython" not in available_backends(), reason="the cython backend is not built here")
def test_bf16_disabled_is_a_clear_error() -> None:
    """FASTCHAR_DISABLE_BF16=1: a clear error naming the reason bf16 is off on the path in use (the switch
    itself on the avx512 path of an AVX512_BF16 CPU, else the lower path or the missing instruction);
    and, where this CPU runs the avx512 path with AVX512_BF16, the switch named there whatever
    FASTCHAR_ISA this test runs under."""
    sel = isa.selection()
    if not sel.bf16_cpu:
        want = "this CPU has no AVX512_BF16"
    elif sel.path != "avx512":
        want = f"the {sel.path} path has no bf16 products (FASTCHAR_ISA={sel.forced})"
    else:
        want = "FASTCHAR_DISABLE_BF16 is set"
    assert want in _bf16_error({"FASTCHAR_DISABLE_BF16": "1"})
    if sel.bf16_cpu and "avx512" in sel.runnable:
        assert "FASTCHAR_DISABLE_BF16 is set" in _bf16_error({"FASTCHAR_DISABLE_BF16": "1", "FASTCHAR_ISA": "avx512"})


@pytest.mark.skipif("cython" not in available_backends(), reason="the cython backend is not built here")
@pytest.mark.parametrize("gemm", ["", "blas"])
def test_numpy_first_with_haswell_coretype(gemm: str) -> None:
    """import numpy; import fastchar with OPENBLAS_CORETYPE=Haswell: our own products (no OpenBLAS),
    or, where the sgemm products stay (FASTCHAR_GEMM=blas, no AVX-512), a one-line warning."""
    code = (
        "import numpy, warnings\n"
        "warnings.simplefilter('always')\n"
        "import fastchar\n"
        "m = fastchar.Model(fastchar.ModelConfig(vocab_size=65), backend='cython')\n"
        "print('OWN' if 'matmul_forward' in m._plan_kernels else 'BLAS')\n"
    )
    env = {**ENV, "OPENBLAS_CORETYPE": "Haswell", "FASTCHAR_GEMM": gemm}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from fastchar._blas_env import AVX512, cpu_flags

    # FASTCHAR_ISA=avx2 or generic keeps the user's OPENBLAS_CORETYPE on purpose (fastchar._blas_env): no warning
    lower = (sel := isa.selection()).forced is not None and sel.path in ("avx2", "generic")
    if "BLAS" in out.stdout and AVX512 <= cpu_flags() and lower:
        assert "OPENBLAS_CORETYPE" not in out.stderr, out.stderr
    elif "BLAS" in out.stdout and AVX512 <= cpu_flags():
        assert "OPENBLAS_CORETYPE=Haswell forces" in out.stderr
    else:
        assert "OWN" in out.stdout or not AVX512 <= cpu_flags()
    if gemm == "" and _gemm is not None and _gemm.has_fp32():
        assert "OWN" in out.stdout


@pytest.mark.parametrize(
    ("env", "want"),
    [({}, "20000"), ({"GOMP_SPINCOUNT": "5000"}, "5000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_omp_spinning_limited_unless_user_chose(env: dict, want: str | None) -> None:
    base = {
        k: v
        for k, v in ENV.items()
        if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "FASTCHAR_KEEP_OMP_WAIT", "FASTCHAR_SET_GOMP_SPINCOUNT")
    }
    code = "import fastchar, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(want)


def test_checkpoint_tensors_do_not_depend_on_precision(tmp_path) -> None:
    """Same weights saved from an fp32 and a bf16 model: identical tensor files; precision is meta info."""
    import json

    import fastchar

    paths = {}
    for precision in ("fp32", "bf16"):
        model = Model(CFG, backend="numpy", seed=2, precision=precision)
        paths[precision] = model.save(tmp_path / precision)
    from fastchar.checkpoint import TENSOR_FILES

    for name in TENSOR_FILES:
        assert (paths["fp32"] / name).read_bytes() == (paths["bf16"] / name).read_bytes()
    assert json.loads((paths["bf16"] / "meta.json").read_text())["precision"] == "bf16"
    loaded = fastchar.load(paths["bf16"], backend="numpy", precision="bf16")
    assert loaded.precision == "bf16"
    np.testing.assert_array_equal(loaded.params.flat, Model(CFG, backend="numpy", seed=2).params.flat)


def test_cli_bf16_on_numba_is_an_error_with_hint(capsys) -> None:
    from fastchar.cli import main

    if "numba" not in available_backends():
        pytest.skip("numba is not installed here")
    code = main(["train", "--backend", "numba", "--precision", "bf16", "--steps", "1", "--out", "/tmp/unused"])
    err = capsys.readouterr().err
    assert code != 0 and "error: backend 'numba' has no bf16 kernels" in err and "hint:" in err


def test_resume_keeps_the_recorded_precision(tmp_path, capsys) -> None:
    """A run trained in bf16 (numpy reference: runs anywhere) resumes in bf16 without --precision."""
    import json

    from fastchar.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    out = tmp_path / "run"
    tiny = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--ctx", "8", "--batch", "2"]
    common = [
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--sample-chars",
        "0",
    ]
    assert (
        main(["train", *common, *tiny, "--backend", "numpy", "--precision", "bf16", "--steps", "4", "--until", "2"])
        == 0
    )
    assert main(["train", "--resume", str(out), "--sample-chars", "0"]) == 0
    meta = json.loads((out / "latest" / "meta.json").read_text())
    assert meta["state"]["step"] == 4 and meta["precision"] == "bf16", meta["precision"]

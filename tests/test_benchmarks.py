"""The benchmarks' quick modes run end to end (not timed: this only proves they work)."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import bench_kernels, bench_train
from fastchar.backends import default_backend


def test_bench_kernels_quick(capsys):
    record = bench_kernels.main(["--quick", "--backends", "numpy"])
    assert any(key.endswith("matmul_forward/numpy") for key in record["kernels"])
    assert "| kernel | backend |" in capsys.readouterr().out


@pytest.mark.slow  # a whole benchmark run, end to end
def test_bench_train_quick(capsys):
    best = default_backend()
    record = bench_train.main(["--quick", "--synthetic", "--no-torch", "--scaling", "--memory", "--backends", best])
    assert record["train"]["B4"][best]["tok_s"] > 0
    assert record["sampling"][best] > 0
    assert record["memory"]["peak_rss_mib"] > 0
    out = capsys.readouterr().out
    assert "## Training throughput" in out and "## Sampling" in out and "## Scaling" in out


def test_bench_gemm_quick(capsys):
    from benchmarks import bench_gemm
    from fastchar import _gemm, isa

    result = bench_gemm.main(["--quick", "--models", "base", "--threads", "1", "--no-openblas"])
    want = (["bf16"] if _gemm.has_avx512bf16() else []) + [f"fp32_{p}" for p in isa.runnable() if p != "generic"]
    for column in want:
        assert result["gflops"][f"base/qkv/fwd/{column}"] > 0
    assert "base     qkv      fwd" in capsys.readouterr().out


def test_bench_gemm_times_fastchar_with_blas_on_one_thread():
    """NumPy's reference products must not leave an OpenBLAS pool spinning beside the timed calls."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from benchmarks import bench_gemm
    from fastchar.threads import set_threads

    try:
        threadpool_limits(limits=2, user_api="blas")
        bench_gemm.run_fastchar(["base"], 2, 0.0005, 1)
        assert {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"} == {1}
    finally:
        set_threads()


def test_ab_gemm_compares_builds_and_paths(capsys):
    """The same build twice (and on a second path where the CPU has one): one figure per build."""
    from benchmarks import ab_gemm
    from fastchar import _gemm, isa

    if not _gemm.has_fp32():
        pytest.skip("the generic path has no packed fp32 products to compare")
    paths = [p for p in isa.runnable() if p != "generic"][:2]
    builds = [f"{_gemm.__file__}@{p}" for p in paths] + [_gemm.__file__]
    ab_gemm.main([*builds, "--models", "base", "--rounds", "1"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("base: "))
    assert len(line.split(" GFLOP/s")[0].removeprefix("base: ").split(" | ")) == len(builds)
    assert "qkv.fwd " in out and "lm_head.dW " in out


def test_bench_attention_quick(capsys):
    from benchmarks import bench_attention
    from fastchar import isa

    result = bench_attention.main(["--quick", "--threads", "1"])
    assert result["base"]["cython bwd"]["ms"] > 0
    for path in isa.runnable():
        if path != "generic":
            assert result["base"][f"{path} fwd"]["gflops"] > 0 and result["base"][f"{path} bwd"]["ms"] > 0
    assert "base" in capsys.readouterr().out


@pytest.mark.slow  # a whole benchmark run, end to end
def test_time_to_loss_runs_a_recipe(capsys, monkeypatch, corpus):
    from benchmarks import time_to_loss

    monkeypatch.setattr(time_to_loss, "find_corpus", lambda: corpus)
    torch_args = [] if _have_torch() else ["--no-torch"]
    record = time_to_loss.main(["--recipe", "one-minute", "--budget", "3", "--eval-every", "5", "--eval-batches", "1",
                                "--torch-mode", "eager", "--no-record", *torch_args])  # fmt: skip
    from fastchar.recipes import RECIPES

    for name, value in RECIPES["one-minute"].model.items():  # the recipe's model, in both systems
        assert record["model"][name] == value, name
    assert record["train"]["time_budget"] == 3
    fastchar_curve = record["curves"][f"fastchar {record['precision']}"]
    assert fastchar_curve[-1]["step"] > 0 and fastchar_curve[-1]["val"] < fastchar_curve[0]["val"]
    assert fastchar_curve[-1]["seconds"] < 3 + 2
    if _have_torch():
        assert record["curves"]["torch eager"][-1]["step"] > 0
    assert "## Time to validation loss (recipe one-minute, budget 3 s" in capsys.readouterr().out


@pytest.mark.slow  # a whole benchmark run, end to end
def test_recipe_sweep_runs_a_candidate(capsys):
    from benchmarks import recipe_sweep

    results = recipe_sweep.main(["--budget", "8", "--only", "rope-c64-b8-lr2e-3", "--no-record"])  # a cheap evaluation
    assert len(results) == 1 and results[0]["steps"] > 0 and results[0]["best_val"] < 5
    assert "| rope-c64-b8-lr2e-3 |" in capsys.readouterr().out


def _have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def test_recipe_sweep_evaluates_a_checkpoint_on_the_fixed_sample(capsys, monkeypatch, corpus, tmp_path):
    from benchmarks import recipe_sweep
    from fastchar.cli import main as cli

    assert cli(["train", "--data", str(corpus), "--out", str(tmp_path / "r"), "--steps", "30", "--d-model", "32",
                "--n-layer", "1", "--n-head", "4", "--ctx", "16", "--batch", "4", "--eval-batches", "2",
                "--sample-chars", "0", "--backend", "numpy"]) == 0  # fmt: skip
    monkeypatch.setattr(recipe_sweep, "find_corpus", lambda: corpus)
    capsys.readouterr()
    recipe_sweep.main(["--evaluate", str(tmp_path / "r" / "best")])
    line = capsys.readouterr().out.strip()
    value = float(line.split(": ")[1].split()[0])
    assert 0 < value < 4.2 and "on the fixed val sample (50 x 64 sequences of 16, seed 12345)" in line, line


@pytest.mark.slow  # a whole benchmark run, end to end
def test_bench_sample_quick(capsys):
    from benchmarks import bench_sample
    from fastchar import _cydecode

    precisions = ["fp32", "bf16"] if _cydecode.packed_available("bf16") else ["fp32"]
    record = bench_sample.main(["--quick", "--no-torch", "--precision", *precisions])
    assert record["chars/s"]["N = 64 streams, aggregate"]["top_p_0.9"] > 0
    if "bf16" in precisions:
        assert record["chars/s"]["one stream, bf16"]["temperature"] > 0
    assert set(record["more_streams_faster"]) == set(precisions)
    assert 0.0 <= record["chars/s"]["one stream"]["one_thread_share"] <= 1.0  # the Cython loop's choice, seen
    # the base model (4 layers): 2 fused stages a layer and character, plus the prompt's 8 per call
    assert 8 <= record["chars/s"]["one stream"]["stages_per_step"] < 16
    assert "| N = 8 streams, aggregate" in capsys.readouterr().out


def test_bench_sample_gives_8_and_64_streams_the_same_work():
    from benchmarks.bench_sample import stream_runs

    runs = {streams: n for _, streams, n in stream_runs(20000)}
    assert runs[0] == runs[1] == 20000
    total8, total64 = 8 * runs[8], 64 * runs[64]
    assert total8 >= 5 * 20000 and abs(total64 - total8) <= 0.03 * total8  # 100,000 and 102,400
    assert min(n for _, _, n in stream_runs(400)) == 400  # --quick: each stream at least all of --chars


@pytest.mark.slow
def test_bench_contention_runs_the_trainer_beside_a_busy_loop(capsys):
    from benchmarks import bench_contention

    rows = bench_contention.main(["--steps", "20", "--isa", "generic", "--busy", "0", "1"])
    assert [row[1] for row in rows] == [0, 1]
    assert all(float(row[3].replace(",", "")) > 0 for row in rows)
    assert "| generic | 1 | chooser |" in capsys.readouterr().out


def test_bench_sample_tells_when_the_threads_share_a_core():
    from benchmarks.bench_sample import threads_share_a_core

    shared = {"round_trip_ns": 27.0, "read_gbs_3.18MB": 97.8, "read_gbs_3.18MB_1thread": 96.3}
    assert threads_share_a_core(shared, 3.18)
    assert not threads_share_a_core({**shared, "round_trip_ns": 69.0}, 3.18)  # two cores
    assert not threads_share_a_core({**shared, "read_gbs_3.18MB": 184.0}, 3.18)  # twice one thread's
    assert not threads_share_a_core({}, 3.18)  # not measured (--quick)


@pytest.mark.slow  # compiles and runs benchmarks/peak.c
@pytest.mark.skipif(shutil.which("gcc") is None, reason="benchmarks/peak.c needs gcc")
def test_machine_limits_measure_peak_bandwidth_and_round_trip():
    from benchmarks.bench_sample import machine_limits

    limits = machine_limits(2, [0.5])
    assert limits["fp32_gflops"] > 1
    assert limits["read_gbs_0.50MB"] > 0.1
    assert 1 < limits["round_trip_ns"] < 1e6


@pytest.mark.slow  # compiles and runs benchmarks/peak.c
@pytest.mark.skipif(shutil.which("cc") is None, reason="benchmarks/peak.c needs a C compiler")
def test_bench_train_measures_the_peak_and_the_threads_round_trip():
    from benchmarks.bench_train import machine_peak, round_trip_ns
    from fastchar import isa

    path = isa.selection().path
    if path not in ("avx512", "avx2"):
        pytest.skip(f"benchmarks/peak.c measures x86-64 only (this path: {path})")
    peak = machine_peak(2, path, round_trip=True)
    assert peak["fp32"] > 1 and peak["isa"] == path
    assert 1 < peak["round_trip_ns"] < 1e6
    assert "round_trip_ns" not in machine_peak(1, path, round_trip=True)  # one thread: no pair to time
    assert 1 < round_trip_ns() < 1e6


def test_rounds_give_medians_and_the_rounds_own_ratios():
    """--rounds: a system's figure is its median over the rounds; the ratio is the median of each round's
    own best-against-best ratio, so a round on a slower machine state compares like with like."""
    rounds = [
        {"fastchar fp32": {"tok_s": 300.0, "step_ms": 10.0}, "torch eager fp32": {"tok_s": 100.0, "step_ms": 30.0}},
        {"fastchar fp32": {"tok_s": 100.0, "step_ms": 30.0}, "torch eager fp32": {"tok_s": 50.0, "step_ms": 60.0},
         "torch.compile fp32": {"tok_s": 80.0, "step_ms": 37.5}},
        {"fastchar fp32": {"tok_s": 200.0, "step_ms": 15.0}, "torch eager fp32": {"tok_s": 90.0, "step_ms": 33.3}},
    ]  # fmt: skip
    combined = bench_train.combine_rounds(rounds)
    assert combined["fastchar fp32"]["tok_s"] == 200.0 and combined["fastchar fp32"]["step_ms"] == 15.0
    assert combined["fastchar fp32"]["rounds_tok_s"] == [300.0, 100.0, 200.0]
    assert combined["torch eager fp32"]["tok_s"] == 90.0
    assert bench_train.round_ratios(rounds) == [3.0, 1.25, 200.0 / 90.0]


@pytest.mark.slow  # two rounds of a few steps at the base shape
def test_bench_train_shapes_rounds(capsys):
    record = bench_train.main(["--shapes", "base", "--rounds", "2", "--steps", "2", "--warmup", "1", "--no-torch",
                               "--no-record", "--synthetic"])  # fmt: skip
    assert record["rounds"] == 2
    assert len(record["shapes"]["base"]["fastchar fp32"]["rounds_tok_s"]) == 2
    assert "base: round 2 of 2" in capsys.readouterr().out


def test_bench_train_rejects_zero_rounds(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--shapes", "base", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_bench_decode_attention_quick(capsys):
    from benchmarks import bench_decode_attention
    from fastchar import isa

    pytest.importorskip("fastchar._cydecode", reason="the Cython extension is part of the product: build it")
    result = bench_decode_attention.main(["--quick"])
    assert {path for path, _, _ in result} == set(isa.runnable())
    assert all(r["ns"] > 0 and r["gbs"] > 0 for r in result.values())
    out = capsys.readouterr().out
    assert "| streamed | 16 MB fp32 |" in out
    from fastchar import _cydecode

    assert ("| avx512 | streamed | 8 MB bf16 |" in out) == bool(_cydecode.kv16_ok(128, 64, 8))


@pytest.mark.slow  # builds csrc/fc_decode.c with gcc (about 10 s)
def test_bench_decode_products_runs_every_vector_path(capsys):
    from benchmarks import bench_decode_products
    from fastchar import _cydecode, isa

    if shutil.which("gcc") is None:
        pytest.skip("no gcc: the benchmark builds its C harness")
    result = bench_decode_products.main(["--rows", "1,8"])
    paths = {path for path, _, _ in result}
    assert paths == set(isa.runnable()) - {"generic"}
    if _cydecode.packed_available("bf16"):
        assert ("avx512", "bf16", 8) in result
    assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in result.values())
    assert "| 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_decode_products.main(["--rows", "0"])

"""Data-parallel training under `mpiexec -n 2`: the tests launch mpiexec as a subprocess.

Needs mpi4py and an MPI with its mpiexec (pip install -e ".[mpi]"). Without them these tests skip,
unless FASTCHAR_REQUIRE_MPI=1 (CI's MPI block), which turns the skip into a failure.

Tolerances. Two ranks x batch B sum two gradients of B sequences where one process x batch 2B sums
2B rows in one matmul: the same numbers in another order. In float64 (numpy backend) the curves
agree to ~1e-15 and are tested at 1e-12; in float32 the loss agrees to ~1e-8 relative and the
weights to ~1e-7 after 50 AdamW steps, tested at 1e-5. Ranks of one run must be bitwise identical.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastchar import load

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "mpi_train.py"
TINY = ["--d-model", "32", "--n-layer", "2", "--n-head", "4", "--ctx", "16", "--eval-batches", "2", "--warmup", "5"]
TIMEOUT = 5  # FASTCHAR_MPI_TIMEOUT in these tests: seconds before a rank gives up on the others
# Two ranks over TCP on the loopback interface only (MPICH: libfabric's tcp provider, no shared memory).
LOOPBACK = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo", "MPIR_CVAR_NOLOCAL": "1"}


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _mpi_ready() -> str:
    """Why MPI tests cannot run here ('' when they can)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    return "" if _mpiexec() else "no mpiexec on PATH"


_why = _mpi_ready()
if _why and os.environ.get("FASTCHAR_REQUIRE_MPI") == "1":
    raise RuntimeError(f"FASTCHAR_REQUIRE_MPI=1 but {_why}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(_why), reason=_why)]  # slow: launches mpiexec


def env(**extra: str) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "FASTCHAR_MPI_TIMEOUT": str(TIMEOUT), **extra}


def mpirun(n: int, *argv: str, extra_env: dict | None = None, launcher: tuple = (), timeout: float = 180):
    cmd = [_mpiexec(), "-n", str(n), *launcher, sys.executable, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(**(extra_env or {})), timeout=timeout)


def fastchar(*argv: str, timeout: float = 180):
    cmd = [sys.executable, "-m", "fastchar", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


def step_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# -- the same training, split over ranks --------------------------------------------------------

CASES = {  # name: (backend, dtype, per-rank options, one-process options, rtol of the loss, atol of weights)
    "float64": ("numpy", "float64", ["--batch", "4"], ["--batch", "8"], 1e-12, 1e-12),
    "float32-cython": ("cython", "float32", ["--batch", "4"], ["--batch", "8"], 1e-5, 1e-5),
    "float64-grad-accum": ("numpy", "float64", ["--batch", "2", "--grad-accum", "2"], ["--batch", "8"], 1e-12, 1e-12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_like_one_process_with_the_global_batch(corpus, tmp_path, case):
    backend, dtype, per_rank, single, rtol, atol = CASES[case]
    common = ["--corpus", str(corpus), "--backend", backend, "--dtype", dtype, "--steps", "50"]
    two = mpirun(2, str(SCRIPT), *common, *per_rank, "--out", str(tmp_path / "o2"), "--dump", str(tmp_path / "d2"))
    assert two.returncode == 0, two.stderr
    one = subprocess.run([sys.executable, str(SCRIPT), *common, *single, "--out", str(tmp_path / "o1"),
                          "--dump", str(tmp_path / "d1")], capture_output=True, text=True, env=env())  # fmt: skip
    assert one.returncode == 0, one.stderr
    r0, r1, p = (np.load(tmp_path / d / f"rank{r}.npz") for d, r in (("d2", 0), ("d2", 1), ("d1", 0)))
    assert int(r0["ranks"]) == 2 and int(p["ranks"]) == 1
    for key in ("params", "adam_m", "adam_v", "losses"):  # rank 1 began from other weights: broadcast
        assert np.array_equal(r0[key], r1[key]), f"ranks differ in {key}"
    assert len(r0["losses"]) == 50
    np.testing.assert_allclose(r0["losses"], p["losses"], rtol=rtol)
    np.testing.assert_allclose(r0["params"], p["params"], rtol=0, atol=atol)
    # Rank 0 alone logged and wrote; the checkpoint is the one a single process writes.
    assert two.stdout.count("eval step     50") == 1
    a, b = load(tmp_path / "o2" / "latest", backend="numpy"), load(tmp_path / "o1" / "latest", backend="numpy")
    assert a.train_state["step"] == b.train_state["step"] == 50
    assert a.train_state["rng"] == b.train_state["rng"], "the generator advanced by the same global batches"
    np.testing.assert_allclose(a.params.flat, b.params.flat, rtol=0, atol=atol)
    logged = step_losses(tmp_path / "o2")
    assert logged[50] == pytest.approx(float(r0["losses"][-1]), rel=1e-12), "the log shows the global batch's loss"


def test_dropout_masks_differ_per_rank_and_the_ranks_stay_identical(corpus, tmp_path):
    common = ["--corpus", str(corpus), "--dropout", "0.2", "--steps", "30", "--batch", "4"]
    two = mpirun(2, str(SCRIPT), *common, "--out", str(tmp_path / "o2"), "--dump", str(tmp_path / "d2"))
    assert two.returncode == 0, two.stderr
    r0, r1 = np.load(tmp_path / "d2" / "rank0.npz"), np.load(tmp_path / "d2" / "rank1.npz")
    assert np.array_equal(r0["params"], r1["params"]) and np.array_equal(r0["adam_v"], r1["adam_v"])
    # Every micro-batch of the global batch has its own dropout counter: 30 steps x 2 ranks.
    assert load(tmp_path / "o2" / "latest").train_state["dropout_counter"] == 60
    assert r0["losses"][-5:].mean() < r0["losses"][:5].mean()


def test_drift_between_ranks_is_caught(corpus, tmp_path):
    run = mpirun(2, str(SCRIPT), "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--dump", str(tmp_path / "d"),
                 "--drift-at", "10")  # fmt: skip
    assert run.returncode != 0
    assert "after step 25 the weights of rank(s) [1] differ from rank 0's" in run.stderr
    assert load(tmp_path / "o" / "latest").train_state["step"] == 10, "the drifted state was not saved"


def test_an_uncaught_error_on_one_rank_ends_the_job_at_once(corpus, tmp_path):
    t0 = time.monotonic()
    run = mpirun(2, str(SCRIPT), "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--dump", str(tmp_path / "d"),
                 "--fail-at", "10", extra_env={"FASTCHAR_MPI_TIMEOUT": "100"})  # fmt: skip
    assert run.returncode != 0
    assert "RuntimeError: a failure on rank 1 only" in run.stderr and "MPI_Abort" in run.stderr
    assert time.monotonic() - t0 < 60, "rank 0 waited for its deadline instead of being ended by rank 1's abort"
    assert load(tmp_path / "o" / "latest").train_state["step"] == 10


# -- the command line under mpiexec -------------------------------------------------------------


def test_resume_across_a_stop_with_the_same_and_another_number_of_ranks(corpus, tmp_path):
    train = ["-m", "fastchar", "train", "--data", str(corpus), *TINY, "--batch", "4", "--steps", "40",
             "--eval-every", "20", "--log-every", "1", "--sample-chars", "0"]  # fmt: skip
    whole = mpirun(2, *train, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    first = mpirun(2, *train, "--out", str(tmp_path / "split"), "--until", "20")
    assert first.returncode == 0, first.stderr
    assert "step 20" in first.stdout and "step 21" not in first.stdout
    latest = str(tmp_path / "split" / "latest")
    shutil.copytree(tmp_path / "split", tmp_path / "single")
    again = mpirun(2, "-m", "fastchar", "train", "--data", str(corpus), "--resume", latest, "--sample-chars", "0")
    assert again.returncode == 0, again.stderr
    assert step_losses(tmp_path / "split") == step_losses(tmp_path / "whole"), "2 ranks resume bit for bit"
    # One process with the same global batch (2 x 4) continues with the same data, to rounding.
    single = fastchar("train", "--data", str(corpus), "--resume", str(tmp_path / "single" / "latest"),
                      "--out", str(tmp_path / "single"), "--batch", "8", "--sample-chars", "0")  # fmt: skip
    assert single.returncode == 0, single.stderr
    resumed, reference = step_losses(tmp_path / "single"), step_losses(tmp_path / "whole")
    assert sorted(resumed) == sorted(reference)
    for step in range(21, 41):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5), step


def test_ctrl_c_on_mpiexec_saves_once_and_exits_130(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "fastchar", "train", "--data", str(corpus), "--out", str(out),
           *TINY, "--batch", "4", "--steps", "1000000", "--eval-every", "1000000", "--log-every", "10"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    _wait_for(proc, "step ")
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to mpiexec; it forwards it to the ranks
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("interrupted at step") == 1 and "mpiexec -n 2 fastchar train --resume" in err
    assert "Abort" not in err
    step = load(out / "latest").train_state["step"]
    assert f"interrupted at step {step};" in err


@pytest.mark.parametrize("how", ["kill", "kill-no-cleanup", "stop"])
def test_a_lost_rank_ends_the_job_with_an_error_and_an_intact_checkpoint(corpus, tmp_path, how):
    """kill: SIGKILL a rank; MPICH's mpiexec notices and ends the job, and with its clean-up off
    (kill-no-cleanup) MPICH itself ends the survivor. stop: SIGSTOP a rank, so nothing exits and
    nothing fails in MPI: the other rank's deadline must end the job with fastchar's error."""
    out = tmp_path / "run"
    launcher = ("-disable-auto-cleanup",) if how == "kill-no-cleanup" else ()
    cmd = [_mpiexec(), "-n", "2", *launcher, sys.executable, "-m", "fastchar", "train", "--data", str(corpus),
           "--out", str(out), *TINY, "--batch", "4", "--steps", "1000000", "--eval-every", "50",
           "--log-every", "10"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    _wait_for(proc, "eval step    100")
    victim = _rank_pid(str(out), 1)
    os.kill(victim, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
    t0 = time.monotonic()
    try:
        rest, err = proc.communicate(timeout=TIMEOUT + 60)
    finally:
        if how == "stop":
            _kill_quietly(victim)
    took = time.monotonic() - t0
    assert proc.returncode not in (0, None), err
    if how == "stop":
        assert "error: rank 0 of 2" in err and "no answer from the other ranks within 5 s" in err, err
        assert f"the last good checkpoint is {out / 'latest'}" in err
    else:
        assert "Killed (signal 9)" in rest + err, rest + err
    assert took < TIMEOUT + 30
    model = load(out / "latest")  # verifies sizes and sha256 of every file
    assert model.train_state["step"] >= 100 and model.train_state["step"] % 50 == 0


def _wait_for(proc: subprocess.Popen, text: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    for line in proc.stdout:
        if text in line:
            return
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never saw {text!r}: {proc.communicate()[1]}")


def _rank_pid(marker: str, rank: int) -> int:
    """The pid of the fastchar process with this rank whose command line holds marker."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and b"fastchar" in cmdline and f"PMI_RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process for {marker}")


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_two_ranks_over_tcp_on_loopback(corpus, tmp_path):
    """The several-machines path on one machine: ranks on 127.0.0.1 talking TCP, no shared memory."""
    common = ["--corpus", str(corpus), "--backend", "numpy", "--dtype", "float64", "--steps", "20", "--batch", "4"]
    run = mpirun(2, str(SCRIPT), *common, "--out", str(tmp_path / "o"), "--dump", str(tmp_path / "tcp"),
                 launcher=("-hosts", "127.0.0.1,127.0.0.1", "-iface", "lo"),
                 extra_env={**LOOPBACK, "MPIR_CVAR_DEBUG_SUMMARY": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "libfabric provider: tcp - 127.0.0.1" in run.stdout + run.stderr, "the ranks did not use TCP on loopback"
    shm = mpirun(2, str(SCRIPT), *common, "--out", str(tmp_path / "o2"), "--dump", str(tmp_path / "shm"))
    assert shm.returncode == 0, shm.stderr
    a, b = np.load(tmp_path / "tcp" / "rank1.npz"), np.load(tmp_path / "shm" / "rank1.npz")
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-12)
    # Without shared memory MPI no longer says the ranks share a host; the host name still does.
    info = mpirun(2, "-m", "fastchar", "info", "--json", launcher=("-hosts", "127.0.0.1,127.0.0.1", "-iface", "lo"),
                  extra_env=LOOPBACK)  # fmt: skip
    report = json.loads(info.stdout)
    threads = [r["threads"] for r in report["ranks"]["per_rank"]]
    assert sum(threads) <= max(report["threads"]["cores"], 2), threads


def test_info_reports_ranks_hosts_and_threads():
    run = mpirun(2, "-m", "fastchar", "info", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # rank 0 alone prints
    ranks = report["ranks"]
    assert ranks["ranks"] == 2 and len(ranks["hosts"]) == 2
    cores = report["threads"]["cores"]
    threads = [r["threads"] for r in ranks["per_rank"]]
    assert sum(threads) <= max(cores, 2) and all(t >= 1 for t in threads), (threads, cores)
    text = mpirun(2, "-m", "fastchar", "info", "--threads", "1")
    assert "ranks: 2 on 1 host(s)" in text.stdout and "rank 0: 1, rank 1: 1" in text.stdout
    many = mpirun(2, "-m", "fastchar", "info", "--threads", str(cores))
    assert many.returncode == 0 and f"warning: 2 ranks x --threads {cores} exceed" in many.stderr


# -- misuse gives a clear error -------------------------------------------------------------------


def test_ranks_with_different_options_stop_with_an_error_naming_them(corpus, tmp_path):
    """MPMD launch (`a : b`): rank 1 gets another learning rate than rank 0."""
    train = [sys.executable, "-m", "fastchar", "train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "o")]
    cmd = [_mpiexec(), "-n", "1", *train, "--lr", "1e-3", ":", "-n", "1", *train, "--lr", "2e-3"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=180)
    assert run.returncode == 1
    assert run.stderr.count("error: ") == 1, run.stderr
    assert "rank 1 (" in run.stderr and "differ in the run: train.lr: 0.002 against 0.001" in run.stderr


def test_launch_without_mpi4py_says_how_to_install(corpus, tmp_path):
    fake = tmp_path / "fake" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'mpi4py'\")\n")
    path = os.pathsep.join([str(fake.parent), str(ROOT)])
    run = mpirun(2, "-m", "fastchar", "train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "o"),
                 extra_env={"PYTHONPATH": path})  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.count("error: this process was started by an MPI launcher") == 1, run.stderr
    assert 'pip install -e ".[mpi]"' in run.stderr and "Traceback" not in run.stderr


def test_ranks_flag_and_sample_misuse(corpus, tmp_path):
    alone = fastchar("train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "o"), "--ranks", "2")
    assert alone.returncode == 1
    assert "fastchar does not start processes itself" in alone.stderr and "mpiexec -n 2 fastchar train" in alone.stderr
    wrong = mpirun(2, "-m", "fastchar", "train", "--data", str(corpus), *TINY, "--out", str(tmp_path / "o"),
                   "--ranks", "3")  # fmt: skip
    assert wrong.returncode == 1 and wrong.stderr.count("error: --ranks 3: this is one of 2 ranks") == 1
    sample = mpirun(2, "-m", "fastchar", "sample", "--checkpoint", str(tmp_path / "missing"))
    assert sample.returncode == 1 and "fastchar sample runs in one process" in sample.stderr


def test_time_budget_stops_every_rank_at_the_same_step(corpus, tmp_path):
    """Each rank has its own clock; they follow rank 0's, or one would stop while the other waits."""
    run = mpirun(2, "-m", "fastchar", "train", "--data", str(corpus), *TINY, "--batch", "4", "--steps", "1000000",
                 "--time-budget", "2", "--eval-every", "1000000", "--sample-chars", "0",
                 "--out", str(tmp_path / "o"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert load(tmp_path / "o" / "latest").train_state["step"] > 10

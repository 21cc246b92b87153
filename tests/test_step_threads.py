"""StepThreads: the trainer's choice between its threads and one, driven by measured step times."""

from __future__ import annotations

import pytest

from fastchar import threads
from fastchar.threads import StepThreads


@pytest.fixture
def pool_sizes(monkeypatch):
    used: list[int] = []
    monkeypatch.setattr(threads, "_use", used.append)
    return used


def run(chooser: StepThreads, seconds_for: dict[int, float], steps: int) -> list[str]:
    """Run `steps` steps whose time depends on the thread count in use; returns the logged lines."""
    lines = []
    for _ in range(steps):
        chooser.before()
        in_use = chooser._other() if chooser._probing else chooser.current
        if (line := chooser.after(seconds_for[in_use])) is not None:
            lines.append(line)
    return lines


def test_a_busy_core_moves_training_to_one_thread_and_back(pool_sizes):
    chooser = StepThreads(2, first=10, every=80, probe=3)
    assert run(chooser, {2: 0.030, 1: 0.055}, 200) == []  # quiet: two threads stay
    assert chooser.current == 2 and 1 in pool_sizes  # one thread was tried
    lines = run(chooser, {2: 0.300, 1: 0.060}, 20)  # another process takes a core
    assert chooser.current == 1 and len(lines) == 1 and "another process" in lines[0]
    assert pool_sizes[-1] == 1
    lines = run(chooser, {2: 0.030, 1: 0.060}, 200)  # it stops: two threads win the next probe
    assert chooser.current == 2 and len(lines) == 1 and pool_sizes[-1] == 2
    assert chooser.switches == 2


def test_quiet_probes_thin_out(pool_sizes):
    chooser = StepThreads(2, first=10, every=640, probe=3)
    run(chooser, {2: 0.030, 1: 0.055}, 2000)
    probes = pool_sizes.count(1)
    assert 3 <= probes <= 10  # 10, 20, 40, ... 640 steps apart: a few percent of one step's time at most
    assert chooser.current == 2


def test_a_small_difference_changes_nothing(pool_sizes):
    chooser = StepThreads(2, first=5, every=40, probe=3)
    run(chooser, {2: 0.050, 1: 0.047}, 300)  # one thread 6 % faster: within the 10 % margin
    assert chooser.current == 2 and chooser.switches == 0


def test_one_configured_thread_never_probes(pool_sizes):
    chooser = StepThreads(1)
    assert run(chooser, {1: 0.05}, 100) == [] and pool_sizes == []


def test_restore_returns_to_the_configured_threads(pool_sizes):
    chooser = StepThreads(2, first=3, every=10, probe=3)
    run(chooser, {2: 0.5, 1: 0.05}, 20)
    assert chooser.current == 1
    chooser.restore()
    assert chooser.current == 2 and pool_sizes[-1] == 2


def test_a_sudden_slowdown_probes_at_once(pool_sizes):
    chooser = StepThreads(2, first=1000, every=1000, probe=3)
    run(chooser, {2: 0.030, 1: 0.055}, 50)
    assert pool_sizes == []  # no periodic probe yet
    run(chooser, {2: 0.200, 1: 0.055}, 6)
    assert chooser.current == 1

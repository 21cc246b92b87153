"""fastchar.distributed without MPI: launcher detection, the one-process World, option checks.

The tests with real ranks (mpiexec -n 2) are in test_mpi.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastchar import ConfigError, distributed
from fastchar.distributed import World, is_collective, launch_env


@pytest.fixture
def clean_env(monkeypatch):
    for size_var, rank_var in distributed.LAUNCH_ENV:
        for var in filter(None, (size_var, rank_var)):
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_world", None)
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (None, None, None)),
        ({"PMI_SIZE": "4", "PMI_RANK": "3"}, (4, 3, "PMI_SIZE")),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, (2, 1, "OMPI_COMM_WORLD_SIZE")),
        ({"PMIX_RANK": "5"}, (None, 5, "PMIX_RANK")),
    ],
)
def test_launcher_is_found_from_its_environment(clean_env, env, expected):
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert launch_env() == expected
    assert distributed.launch_rank() == (expected[1] or 0)


def test_one_process_is_a_world_of_one_without_mpi(clean_env):
    clean_env.setenv("PMI_SIZE", "1")  # mpiexec -n 1: no mpi4py needed
    clean_env.setenv("PMI_RANK", "0")
    dist = distributed.world()
    assert type(dist) is World and dist.size == 1 and dist.is_root
    buf = np.arange(5, dtype=np.float32)
    dist.sum_(buf)
    assert np.array_equal(buf, np.arange(5)), "a sum over one rank changes nothing"
    assert dist.sum_scalars([1.5, 0.0]) == [1.5, 0.0] and dist.from_root(2.5) == 2.5
    assert dist.bcast({"a": 1}) == {"a": 1} and dist.allgather(3) == [3]
    assert dist.root_only(lambda x: x + 1, 1) == 2
    assert dist.default_threads(7) == 7


def test_bad_timeout_is_a_clear_error(clean_env):
    clean_env.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ConfigError, match="FASTCHAR_MPI_TIMEOUT must be a positive number") as info:
        distributed._timeout()
    assert is_collective(info.value)
    clean_env.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert distributed._timeout() == 2.5

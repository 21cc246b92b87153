"""The arenas' layout: parameters end to end (the checkpoint's layout), activations on 64-byte lines."""

import numpy as np
import pytest

from fastchar import Model, ModelConfig
from fastchar.arena import Arena, aligned_zeros
from fastchar.model import _runs

ODD = [("a", (3, 5)), ("b", (7,)), ("c", (2, 3, 3)), ("d", (0,)), ("e", (1,))]


def _address(x: np.ndarray) -> int:
    return x.ctypes.data


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aligned_views_start_on_lines_and_never_overlap(dtype):
    arena = Arena(ODD, dtype, aligned_views=True)
    starts = [start for start, _ in arena.offsets.values()]
    assert all(_address(arena[name]) % 64 == 0 for name, _ in ODD)
    assert starts == sorted(starts)
    for (_, stop), (start, _) in zip(list(arena.offsets.values()), list(arena.offsets.values())[1:], strict=False):
        assert stop <= start
    assert arena.flat.size == list(arena.offsets.values())[-1][1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_views_lie_end_to_end_from_a_line(dtype):
    arena = Arena(ODD, dtype)
    assert _address(arena.flat) % 64 == 0
    stops = [0] + [stop for _, stop in arena.offsets.values()][:-1]
    assert [start for start, _ in arena.offsets.values()] == stops
    assert arena.flat.size == sum(int(np.prod(shape)) for _, shape in ODD)


def test_aligned_zeros_is_zero_and_aligned():
    for n in (1, 15, 1000, 3_000_000):
        z = aligned_zeros(n)
        assert z.shape == (n,) and _address(z) % 64 == 0 and not z.any()


def test_runs_merge_neighbours_across_padding_and_stop_at_skipped_slots():
    arena = Arena(ODD, np.float32, aligned_views=True)
    o = arena.offsets
    assert _runs(arena, set()) == [(o["a"][0], o["e"][1])]
    assert _runs(arena, {"b"}) == [o["a"], (o["c"][0], o["e"][1])]
    assert _runs(arena, {"c"}) == [(o["a"][0], o["b"][1]), o["e"]]  # the empty d between c and e joins nothing


def test_a_models_parameters_and_activations_sit_on_lines():
    """Odd B and T: the activation slots are not whole lines long, so only padding aligns them."""
    cfg = ModelConfig(vocab_size=11, ctx=8, d_model=32, n_layer=1, n_head=2)
    model = Model(cfg, backend="numpy", seed=0)
    x = np.arange(15, dtype=np.int32).reshape(3, 5) % 11
    model.forward(x, x)
    model.backward()
    for arena in (model.acts, model.dacts):
        assert all(_address(v) % 64 == 0 for v in arena.views.values())
    for arena in (model.params, model.grads, model.adam_m, model.adam_v):
        assert _address(arena.flat) % 64 == 0
        assert arena.flat.size == sum(v.size for v in arena.views.values())

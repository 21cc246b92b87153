"""Backends: a backend is a module that defines every kernel in KERNELS with the reference signature.

`get_backend(name)` returns a namespace of kernels. A backend may leave a kernel out only by naming
it in its `FALLBACK` set; the reference fills the gap and the namespace's `fallback` names it.
Entries of `OPTIONAL` (e.g. the compiled generation loop) live in separate modules and are None when
missing. A backend that runs threads defines the hooks `set_threads(n)` and `thread_info()`;
fastchar.threads reaches them through `thread_hooks()`. A backend may define
`plan_kernels(precision, cfg)`: kernels that replace its own in a training plan for that precision
and model shape (bf16 matrix products, faster fp32 ones); `plan_kernels(kernels, precision, cfg)`
below asks it. Nothing else in fastchar imports a backend
module directly: `Model(cfg, backend=...)` chooses.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType, SimpleNamespace

from fastchar.errors import FastcharError
from fastchar.ops import KERNELS as _KERNELS

# Every kernel name a backend defines, derived from the op records (fastchar/ops.py): each record
# adds its forward/backward pair (and extras such as attention_decode, or the optimizer's kernels).
KERNELS = _KERNELS

MODULES = {"numpy": "reference", "numba": "numba_cpu", "cython": "cython_cpu"}

# Optional entry points beyond KERNELS: name -> {backend: module}. A backend without one (or whose
# module does not import here) gets None under that name, and callers fall back to their own Python
# path (fastchar.sampler's generation loop for `generate_tokens`).
OPTIONAL = {
    "generate_tokens": {"numba": "fastchar.backends.numba_decode", "cython": "fastchar.backends.cython_decode"},
    # many streams in one batched step (fastchar.sampler.batch_tokens); without it streams run in turn
    "generate_batch": {"cython": "fastchar.backends.cython_decode"},
    # the products' weights packed once per generation for the AVX-512 decode product
    "pack_decode_weights": {"cython": "fastchar.backends.cython_decode"},
    # the rows of the decode product's full tile on the path in use (fastchar.sampler.cache_groups)
    "decode_tile_rows": {"cython": "fastchar.backends.cython_decode"},
    # whether a bf16 decode's caches can be bf16 on the path in use (fastchar.sampler.decode_state)
    "kv16_ok": {"cython": "fastchar.backends.cython_decode"},
}
ALIASES = {"reference": "numpy"}
PRECISIONS = ("fp32", "bf16")


class BackendError(FastcharError):
    """A backend is unknown or cannot be loaded here."""


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODULES and name != "auto":
        choices = ", ".join([*MODULES, "auto"])
        raise BackendError(
            f"unknown backend {name!r}; choose one of: {choices}",
            hint="`fastchar info` lists the backends available on this machine",
        )
    return name


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"fastchar.backends.{MODULES[name]}")
    except ImportError as exc:
        if name == "cython":
            from fastchar.build_info import cython_unavailable

            message, hint = cython_unavailable(exc)
        else:
            message, hint = str(exc), f"use another backend ({', '.join(PREFERENCE)}), or reinstall fastchar"
        raise BackendError(f"backend {name!r} is not available: {message}", hint=hint) from exc


def thread_hooks() -> list[ModuleType]:
    """The backend modules that load here and size threads (define set_threads and thread_info)."""
    hooks = []
    for name in MODULES:
        try:
            module = _module(name)
        except BackendError:
            continue
        if hasattr(module, "set_threads"):
            hooks.append(module)
    return hooks


@cache
def _load(name: str) -> SimpleNamespace:
    module = _module(name)
    reference = importlib.import_module("fastchar.backends.reference")
    fallback = set(getattr(module, "FALLBACK", ()))
    kernels = {}
    for kernel in KERNELS:
        if hasattr(module, kernel) and kernel not in fallback:
            kernels[kernel] = getattr(module, kernel)
        elif kernel in fallback:
            kernels[kernel] = getattr(reference, kernel)
        else:
            raise BackendError(f"backend {name!r} lacks kernel {kernel!r} and does not list it in FALLBACK")
    for entry, homes in OPTIONAL.items():
        kernels[entry] = _optional(homes.get(name), entry)
    kernels["plan_kernels"] = getattr(module, "plan_kernels", None)
    return SimpleNamespace(name=name, fallback=frozenset(fallback), **kernels)


def _optional(module_name: str | None, entry: str) -> object | None:
    """getattr(module, entry), or None when there is no such module or it does not import."""
    if module_name is None:
        return None
    try:
        return getattr(importlib.import_module(module_name), entry, None)
    except ImportError:
        return None


def get_backend(name: str = "auto") -> SimpleNamespace:
    """The kernels of backend `name` ("numpy", "numba", "cython" or "auto": the fastest available)."""
    from fastchar.threads import ensure_threads

    name = canonical(name)
    if name == "auto":
        name = default_backend()
    ensure_threads()
    return _load(name)


def available_backends() -> list[str]:
    """Backends that load on this machine, in MODULES order."""
    names = []
    for name in MODULES:
        try:
            _load(name)
        except BackendError:
            continue
        names.append(name)
    return names


# Measured by benchmarks/bench_train.py on the project's 2-core machines (see docs/performance.md): the first
# available entry of this list is the default.
PREFERENCE = ("cython", "numba", "numpy")


def default_backend() -> str:
    """The fastest backend available here, by the measured PREFERENCE order (see _outpaced)."""
    available = available_backends()
    for name in PREFERENCE:
        if name in available and not _outpaced(name, available):
            return name
    raise BackendError("no backend is available")


def _outpaced(name: str, available: list[str]) -> bool:
    """A Cython build without OpenMP (see setup.py) runs one thread; given more, numba is faster.

    Base model, B = 12, 2 cores: numba on 2 threads ~28,400 tok/s (docs/performance.md), cython on 1 thread
    ~19,700 (clang build without OpenMP, measured on a busy machine).
    """
    if name != "cython" or "numba" not in available:
        return False
    from fastchar.build_info import cython_openmp
    from fastchar.threads import ensure_threads

    return cython_openmp() is False and ensure_threads() > 1


def plan_kernels(kernels: SimpleNamespace, precision: str, cfg: object) -> dict:
    """Kernel replacements of a training plan: {"matmul_forward": fn, ...} for `precision` and the
    model config `cfg` (fastchar.graph.training_plan takes them). Raises ConfigError when the backend
    (or this CPU) cannot run `precision`; fp32 without a backend hook means the backend's own kernels."""
    from fastchar.errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    hook = getattr(kernels, "plan_kernels", None)
    if hook is None:
        if precision == "fp32":
            return {}
        raise ConfigError(
            f"backend {kernels.name!r} has no {precision} kernels",
            hint="use precision='fp32', or backend='cython' (AVX512_BF16 CPUs) or 'numpy' (the bf16 reference)",
        )
    return hook(precision, cfg)

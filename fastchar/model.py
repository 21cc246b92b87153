"""Model: the character-level GPT of docs/architecture.md over flat arenas, orchestrating one backend's kernels.

Holds four parameter-shaped arenas (params, grads, adam_m, adam_v) and two activation arenas (acts,
dacts) sized by the batch. The network itself is described once, in fastchar/graph.py (read
`block_ops` for the architecture); `forward` runs that list of kernel calls bound to the arenas'
views, and `backward` the same list reversed. Sampling (KV cache) lives in sampler.py, the optimizer
step in optim.py and checkpoints in checkpoint.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from fastchar import checkpoint
from fastchar.arena import Arena, act_specs, param_specs
from fastchar.backends import get_backend, plan_kernels
from fastchar.config import ModelConfig
from fastchar.errors import ConfigError, InputError
from fastchar.graph import (
    INIT_STD,
    ONES,
    TARGETS,
    TOKENS,
    U32,
    Plan,
    Views,
    fill_constants,
    lowbias32,
    param_inits,
    saved_slots,
    training_plan,
)

MASK32 = U32


@dataclass
class RunInfo:
    """What a model carries besides the network: the tokenizer, training config (as a dict) and
    training state of the run or checkpoint its weights come from, and that checkpoint's folder."""

    tokenizer: Any = None
    train_cfg: dict | None = None
    state: dict = field(default_factory=dict)
    path: Path | None = None
    meta: dict | None = None  # the checkpoint's checked meta.json (backend, precision, data of the run)
    note: str | None = None  # which checkpoint of a run folder was taken


class Model:
    """The model of docs/architecture.md. `params[name]` and `grads[name]` are views into flat buffers."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: str = "auto",
        seed: int = 0,
        dtype: npt.DTypeLike = np.float32,
        precision: str = "fp32",
    ) -> None:
        """precision: "fp32", or "bf16": the matrix products (forward and both backward products)
        multiply bf16-rounded inputs and accumulate in fp32; parameters, gradients, Adam's moments,
        norms, softmax, loss and residual stay in the arenas' dtype. Checkpoints do not depend on it.
        ConfigError where the backend or CPU cannot run it (cython needs AVX512_BF16; numba has none)."""
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"Model needs a ModelConfig, got {type(cfg).__name__}",
                              hint="build one: fastchar.ModelConfig(vocab_size=...)")  # fmt: skip
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        seed = int(seed)
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.kernels = get_backend(backend)
        if self.dtype != np.float32 and self.kernels.name != "numpy":
            raise ValueError(f"backend {self.kernels.name!r} runs float32 only; use backend='numpy'")
        self.precision = precision
        self._plan_kernels = plan_kernels(self.kernels, precision, cfg)  # checks precision here, not at step 1
        optimizer = {k: self._plan_kernels[k][0] for k in ("grad_norm", "adamw_update") if k in self._plan_kernels}
        if optimizer:  # the optimizer's kernels as the plan chose them (cython: AVX2 + FMA builds)
            self.kernels = SimpleNamespace(**{**vars(self.kernels), **optimizer})
        specs = param_specs(cfg)
        self.params = Arena(specs, self.dtype)
        self.grads = Arena(specs, self.dtype)
        self.adam_m = Arena(specs, self.dtype)
        self.adam_v = Arena(specs, self.dtype)
        self.decay = np.zeros(self.params.flat.size, np.uint8)
        for name, shape in specs:
            if len(shape) == 2:
                start, stop = self.params.offsets[name]
                self.decay[start:stop] = 1
        self.acts: Arena | None = None
        self.dacts: Arena | None = None
        self._has_targets = False
        self._dropout = False
        self.training = True
        self.dropout_seed = seed & MASK32  # masks are a hash of (seed, counter, site, element)
        self.dropout_counter = 0  # training forwards so far; saved in checkpoints for exact resume
        self.run = RunInfo()  # where the weights come from (a checkpoint, a Trainer); not the model
        self.init_weights(seed)

    # The run's data, kept in `run` (README: `fastchar.load(path).tokenizer`); settable for the
    # Trainer and fastchar.model.load.
    tokenizer = property(lambda self: self.run.tokenizer, lambda self, v: setattr(self.run, "tokenizer", v))
    train_cfg = property(lambda self: self.run.train_cfg, lambda self, v: setattr(self.run, "train_cfg", v))
    train_state = property(lambda self: self.run.state, lambda self, v: setattr(self.run, "state", v))
    checkpoint_path = property(lambda self: self.run.path, lambda self, v: setattr(self.run, "path", v))
    checkpoint_meta = property(lambda self: self.run.meta, lambda self, v: setattr(self.run, "meta", v))
    checkpoint_note = property(lambda self: self.run.note, lambda self, v: setattr(self.run, "note", v))

    @property
    def backend(self) -> str:
        return self.kernels.name

    def init_weights(self, seed: int) -> None:
        """Each parameter as its op's record says (graph.param_inits): normal(0, 0.02), output
        projections 0.02/sqrt(2L), norm gains ones; drawn in buffer order from one seeded generator."""
        rng = np.random.default_rng(seed)
        inits = param_inits(self.cfg)
        for name, view in self.params.items():
            init = inits[name][1] if name in inits else INIT_STD  # a tensor no op declares: the default
            if init == ONES:
                view[...] = 1.0
            else:
                view[...] = rng.normal(0.0, init, size=view.shape)

    def num_params(self) -> int:
        return int(self.params.flat.size)

    @property
    def logits(self) -> np.ndarray:
        """(B, T, V) logits of the last forward."""
        if self.acts is None:
            raise RuntimeError("no forward pass has run yet")
        return self.acts["logits"]

    @property
    def probs(self) -> np.ndarray:
        """(B, T, V) softmax of the last forward that had targets."""
        if self.acts is None:
            raise RuntimeError("no forward pass has run yet")
        return self.acts["probs"]

    def check_tokens(self, x: np.ndarray, name: str = "x") -> np.ndarray:
        """Validate a [B, T] token batch and return it as C-contiguous int32."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
            raise InputError(f"{name} must be a non-empty [B, T] array of token ids, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.integer):
            raise InputError(f"{name} must hold integer token ids, got dtype {x.dtype}")
        if x.shape[1] > self.cfg.ctx:
            raise InputError(f"{name} has T={x.shape[1]} positions but the model's ctx is {self.cfg.ctx}")
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise InputError(f"{name} holds token ids in [{lo}, {hi}] but the vocabulary has {self.cfg.vocab_size}")
        return np.ascontiguousarray(x, dtype=np.int32)

    def train(self) -> Model:
        """Training mode: dropout (if cfg.dropout > 0) is applied in forward. The default."""
        self.training = True
        return self

    def eval(self) -> Model:
        """Evaluation mode: no dropout."""
        self.training = False
        return self

    def _ensure_acts(self, B: int, T: int) -> Arena:
        """Size the activation arenas for (B, T) and bind the network's ops (fastchar/graph.py) to
        their views: a plan with and one without dropout, so a step only patches dropout keys."""
        if self.acts is None or self.acts["encoded"].shape[:2] != (B, T):
            self.acts = Arena(act_specs(self.cfg, B, T), self.dtype, aligned_views=True)
            self.dacts = Arena(self.acts.specs, self.dtype, aligned_views=True)
            saved = saved_slots(self.cfg)
            self._idx = np.zeros((B, T), np.int32)
            self._tgt = np.zeros((B, T), np.int32)
            fill_constants(self.acts, self.cfg, T)
            views = Views(self.params, self.grads, self.acts, self.dacts, {TOKENS: self._idx, TARGETS: self._tgt})
            self._plans = {
                drop: training_plan(self.cfg, self.kernels, views, drop, self._plan_kernels) for drop in (False, True)
            }
            # per plan: the runs of activation-gradient slots its backward accumulates into (not the
            # saved slots, nor those its first writer overwrites: graph.OVERWRITE)
            self._zeroed = {
                drop: _runs(self.dacts, skip=saved | plan.overwritten) for drop, plan in self._plans.items()
            }
        return self.acts

    def plan(self, B: int, T: int | None = None, dropout: bool | None = None) -> Plan:
        """The training plan a [B, T] batch runs (T defaults to ctx; dropout to cfg.dropout > 0):
        `plan.describe()` lists its calls, `plan.timed(spent)` wraps them with a timer."""
        T = self.cfg.ctx if T is None else T
        self._ensure_acts(B, T)
        return self._plans[self.cfg.dropout > 0 if dropout is None else dropout]

    def describe_plan(self, B: int, T: int | None = None) -> list[str]:
        """One line per call of a training step (forward, loss, backward, then the optimizer's two
        kernels): op, kernel module.function, and why it was chosen."""
        from fastchar.graph import function_name

        lines = self.plan(B, T).describe()
        for name in ("grad_norm", "adamw_update"):
            fn = getattr(self.kernels, name)
            why = f"{self.backend}'s own kernel" if name not in self.kernels.fallback else "the reference's"
            lines.append(f"{'optimize':<8} {'optimizer':<17} {'(flat buffers)':<20} {function_name(fn):<52} {why}")
        return lines

    def dropout_keys(self, counter: int) -> list[int]:
        """32-bit keys of the dropout masks of training step `counter`: three sites per layer."""
        base = lowbias32(lowbias32(self.dropout_seed) ^ (counter & MASK32))
        return [lowbias32(base ^ site) for site in range(3 * self.cfg.n_layer)]

    def forward(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> float | None:
        """Run the model on x (B, T) token ids; with targets y (B, T) return the mean loss.

        Leaves logits (B, T, V) in `model.logits`. Without y, returns None. In training mode with
        cfg.dropout > 0 each call draws new dropout masks (a counter advances; see dropout_keys).
        """
        x = self.check_tokens(x, "x")
        if y is not None:
            y = self.check_tokens(y, "y")
            if y.shape != x.shape:
                raise InputError(f"y has shape {y.shape} but x has shape {x.shape}")
        a = self._ensure_acts(*x.shape)
        self._idx[...] = x
        self._dropout = self.training and self.cfg.dropout > 0
        plan = self._plans[self._dropout]
        if self._dropout:
            keys = self.dropout_keys(self.dropout_counter)
            self.dropout_counter += 1
            for args, index, site in plan.keys:
                args[index] = keys[site]
        for kernel, args in plan.forward:  # embedding, L blocks, head: graph.forward_ops
            kernel(*args)
        self._has_targets = y is not None
        if y is None:
            return None
        self._tgt[...] = y
        for kernel, args in plan.loss:
            kernel(*args)
        return float(np.mean(a["losses"], dtype=np.float64))

    def zero_grad(self) -> None:
        """Zero the parameter gradients and the activation gradients the next backward accumulates
        into (the slots its plan's first writers overwrite are left as they are)."""
        self.grads.flat.fill(0)
        self._zero_dacts()

    def _zero_dacts(self) -> None:
        """Zero the activation gradients the next backward accumulates into (not the saved slots',
        nor those its plan's first writer overwrites)."""
        if self.dacts is not None:
            for start, stop in self._zeroed[self._dropout]:
                self.dacts.flat[start:stop].fill(0)

    def backward(self, accumulate: bool = False) -> None:
        """Gradient of the last forward's mean loss into `model.grads`.

        Overwrites `grads` unless accumulate=True, which adds to them (micro-batches).
        """
        if self.acts is None or not self._has_targets:
            raise RuntimeError("backward() needs a forward(x, y) with targets first")
        if accumulate:
            self._zero_dacts()
        else:
            self.zero_grad()
        B, T = self._idx.shape
        self.dacts["losses"].fill(1.0 / (B * T))
        for kernel, args in self._plans[self._dropout].backward:  # the forward's ops, reversed
            kernel(*args)

    def save(self, path: str | Path, **extra: object) -> Path:
        """Write a checkpoint folder (weights, Adam moments, config, tokenizer); see checkpoint.save."""
        return checkpoint.save(self, path, **extra)


def load(path: str | Path, backend: str = "auto", which: str = "best", precision: str = "fp32") -> Model:
    """A Model from a checkpoint folder, or from a run folder's `which` checkpoint ("best" or "latest").

    Sets `.tokenizer`, `.train_cfg`, `.train_state`, `.checkpoint_path` (the folder read),
    `.checkpoint_note` (which checkpoint of a run folder was taken; None for a checkpoint folder) and
    `.checkpoint_meta` (the whole checked meta.json: backend, precision, data of the run).
    precision ("fp32" or "bf16") is how the loaded model computes; the files are the same for both.
    """
    if not isinstance(path, str | os.PathLike):
        raise InputError(f"load reads a checkpoint or run folder: pass its path, got {type(path).__name__}")
    stored = checkpoint.read(path, which)
    model = Model(stored.cfg, backend=backend, seed=0, precision=precision)  # precision: not in the files
    for name, weights in stored.weights.items():
        model.params[name][...] = weights
    model.adam_m.flat[...] = stored.adam_m
    model.adam_v.flat[...] = stored.adam_v
    meta = stored.meta
    model.run = RunInfo(stored.tokenizer, meta.get("train"), meta.get("state") or {}, stored.path, meta, stored.note)
    return model


def _runs(arena: Arena, skip: set[str]) -> list[tuple[int, int]]:
    """(start, stop) ranges of arena.flat covering every slot not in skip, neighbouring slots merged
    (with the unnamed padding between them)."""
    runs: list[tuple[int, int]] = []
    joins = False  # the last slot seen was kept: the next kept one extends its run
    for name, (start, stop) in arena.offsets.items():
        if start == stop:
            continue
        if name in skip:
            joins = False
            continue
        if runs and joins:
            runs[-1] = (runs[-1][0], stop)
        else:
            runs.append((start, stop))
        joins = True
    return runs

"""Model: the character-level GPT of SPEC.md over flat arenas, orchestrating one backend's kernels.

Holds four parameter-shaped arenas (params, grads, adam_m, adam_v) and two activation arenas (acts,
dacts) sized by the batch. `forward` reads like the architecture, one kernel call per line, and
`backward` is the same list reversed. Sampling (KV cache) lives in sampler.py, the optimizer step in
optim.py and checkpoints in checkpoint.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fastchar.arena import Arena, act_specs, param_specs
from fastchar.backends import get_backend
from fastchar.config import ModelConfig
from fastchar.errors import InputError

RMSNORM_EPS = 1e-5
INIT_STD = 0.02
MASK32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """The lowbias32 integer hash (the one the dropout kernels use per element)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def _rows(a: np.ndarray) -> np.ndarray:
    """(B, T, X) -> (B*T, X) view for the matmul kernels."""
    return a.reshape(-1, a.shape[-1])


class Model:
    """The base model of SPEC.md. `params[name]` and `grads[name]` are views into flat buffers."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: str = "auto",
        seed: int = 0,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        self.cfg = cfg
        self.dtype = np.dtype(dtype)
        self.kernels = get_backend(backend)
        if self.dtype != np.float32 and self.kernels.name != "numpy":
            raise ValueError(f"backend {self.kernels.name!r} runs float32 only; use backend='numpy'")
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
        self.tokenizer = None  # set by fastchar.load and the Trainer
        self.train_cfg: dict | None = None
        self.train_state: dict = {}
        self.init_weights(seed)

    @property
    def backend(self) -> str:
        return self.kernels.name

    def init_weights(self, seed: int) -> None:
        """SPEC's init: normal(0, 0.02); output projections 0.02/sqrt(2L); norm gains ones."""
        rng = np.random.default_rng(seed)
        proj_std = INIT_STD / math.sqrt(2 * self.cfg.n_layer)
        for name, view in self.params.items():
            if name.endswith(".weight"):
                view[...] = 1.0
            else:
                std = proj_std if name.endswith(("attn.proj", "mlp.proj")) else INIT_STD
                view[...] = rng.normal(0.0, std, size=view.shape)

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
        """Size the activation arenas for (B, T) and build the kernel-call plans over their views."""
        if self.acts is None or self.acts["encoded"].shape[:2] != (B, T):
            self.acts = Arena(act_specs(self.cfg, B, T), self.dtype)
            self.dacts = Arena(self.acts.specs, self.dtype)
            self._idx = np.zeros((B, T), np.int32)
            self._tgt = np.zeros((B, T), np.int32)
            self._plans = {drop: self._build_plans(drop) for drop in (False, True)}
        return self.acts

    def _build_plans(self, dropout: bool) -> tuple[list, list, list]:
        """Forward and backward as lists of (kernel, args) over fixed views, and the dropout key slots.

        forward reads like the architecture, one kernel call per line; backward is the same list
        reversed. Only the dropout keys change from step to step: `slots` holds (args, index, site)
        to patch before each call.
        """
        k, p, g, a, d = self.kernels, self.params, self.grads, self.acts, self.dacts
        cfg, eps, rate = self.cfg, RMSNORM_EPS, self.cfg.dropout
        dropout = dropout and rate > 0
        fwd: list = [(k.embedding_forward, [a["encoded"], self._idx, p["wte"], p["wpe"]])]
        bwd: list = []
        slots: list = []

        def keyed(plan: list, fn, args: list, site: int) -> None:
            plan.append((fn, args))
            slots.append((args, len(args) - 2, site))

        residual = "encoded"
        for i in range(cfg.n_layer):
            s = f"blocks.{i}."
            attproj, fcproj = (s + "attproj_drop", s + "fcproj_drop") if dropout else (s + "attproj", s + "fcproj")
            fwd.append((k.rmsnorm_forward, [a[s + "ln1"], a[s + "ln1_rstd"], a[residual], p[s + "ln1.weight"], eps]))
            fwd.append((k.matmul_forward, [_rows(a[s + "qkv"]), _rows(a[s + "ln1"]), p[s + "attn.qkv"]]))
            if dropout:
                keyed(fwd, k.attention_dropout_forward, [a[s + "atty"], a[s + "att"], a[s + "qkv"], 0, rate], 3 * i)
            else:
                fwd.append((k.attention_forward, [a[s + "atty"], a[s + "att"], a[s + "qkv"]]))
            fwd.append((k.matmul_forward, [_rows(a[s + "attproj"]), _rows(a[s + "atty"]), p[s + "attn.proj"]]))
            if dropout:
                keyed(fwd, k.dropout_forward, [a[attproj], a[s + "attproj"], 0, rate], 3 * i + 1)
            fwd.append((k.residual_forward, [a[s + "res1"], a[residual], a[attproj]]))
            fwd.append((k.rmsnorm_forward, [a[s + "ln2"], a[s + "ln2_rstd"], a[s + "res1"], p[s + "ln2.weight"], eps]))
            fwd.append((k.matmul_forward, [_rows(a[s + "fch"]), _rows(a[s + "ln2"]), p[s + "mlp.fc"]]))
            fwd.append((k.relu2_forward, [a[s + "fch_act"], a[s + "fch"]]))
            fwd.append((k.matmul_forward, [_rows(a[s + "fcproj"]), _rows(a[s + "fch_act"]), p[s + "mlp.proj"]]))
            if dropout:
                keyed(fwd, k.dropout_forward, [a[fcproj], a[s + "fcproj"], 0, rate], 3 * i + 2)
            fwd.append((k.residual_forward, [a[s + "res2"], a[s + "res1"], a[fcproj]]))

            layer: list = []  # this layer's backward, in forward order; reversed below
            if dropout:
                args = [d[s + "qkv"], d[s + "att"], d[s + "atty"], a[s + "qkv"], a[s + "att"], 0, rate]
                keyed(layer, k.attention_dropout_backward, args, 3 * i)
            else:
                layer.append(
                    (k.attention_backward, [d[s + "qkv"], d[s + "att"], d[s + "atty"], a[s + "qkv"], a[s + "att"]])
                )
            layer.insert(0, (k.matmul_backward, [_rows(d[s + "ln1"]), g[s + "attn.qkv"], _rows(d[s + "qkv"]),
                                                 _rows(a[s + "ln1"]), p[s + "attn.qkv"]]))  # fmt: skip
            layer.insert(0, (k.rmsnorm_backward, [d[residual], g[s + "ln1.weight"], d[s + "ln1"], a[residual],
                                                  p[s + "ln1.weight"], a[s + "ln1_rstd"]]))  # fmt: skip
            layer.append((k.matmul_backward, [_rows(d[s + "atty"]), g[s + "attn.proj"], _rows(d[s + "attproj"]),
                                              _rows(a[s + "atty"]), p[s + "attn.proj"]]))  # fmt: skip
            if dropout:
                keyed(layer, k.dropout_backward, [d[s + "attproj"], d[attproj], 0, rate], 3 * i + 1)
            layer.append((k.residual_backward, [d[residual], d[attproj], d[s + "res1"]]))
            layer.append((k.rmsnorm_backward, [d[s + "res1"], g[s + "ln2.weight"], d[s + "ln2"], a[s + "res1"],
                                               p[s + "ln2.weight"], a[s + "ln2_rstd"]]))  # fmt: skip
            layer.append((k.matmul_backward, [_rows(d[s + "ln2"]), g[s + "mlp.fc"], _rows(d[s + "fch"]),
                                              _rows(a[s + "ln2"]), p[s + "mlp.fc"]]))  # fmt: skip
            layer.append((k.relu2_backward, [d[s + "fch"], d[s + "fch_act"], a[s + "fch"]]))
            layer.append((k.matmul_backward, [_rows(d[s + "fch_act"]), g[s + "mlp.proj"], _rows(d[s + "fcproj"]),
                                              _rows(a[s + "fch_act"]), p[s + "mlp.proj"]]))  # fmt: skip
            if dropout:
                keyed(layer, k.dropout_backward, [d[s + "fcproj"], d[fcproj], 0, rate], 3 * i + 2)
            layer.append((k.residual_backward, [d[s + "res1"], d[fcproj], d[s + "res2"]]))
            bwd = list(reversed(layer)) + bwd  # later layers run their backward first
            residual = s + "res2"
        fwd.append((k.rmsnorm_forward, [a["lnf"], a["lnf_rstd"], a[residual], p["ln_f.weight"], eps]))
        fwd.append((k.matmul_forward, [_rows(a["logits"]), _rows(a["lnf"]), p["lm_head"]]))
        head = [
            (k.crossentropy_backward, [d["logits"], d["losses"], a["probs"], self._tgt]),
            (k.matmul_backward, [_rows(d["lnf"]), g["lm_head"], _rows(d["logits"]), _rows(a["lnf"]), p["lm_head"]]),
            (
                k.rmsnorm_backward,
                [d[residual], g["ln_f.weight"], d["lnf"], a[residual], p["ln_f.weight"], a["lnf_rstd"]],
            ),
        ]
        bwd = head + bwd + [(k.embedding_backward, [g["wte"], g["wpe"], d["encoded"], self._idx])]
        return fwd, bwd, slots

    def dropout_keys(self, counter: int) -> list[int]:
        """32-bit keys of the dropout masks of training step `counter`: three sites per layer."""
        base = _mix32(_mix32(self.dropout_seed) ^ (counter & MASK32))
        return [_mix32(base ^ site) for site in range(3 * self.cfg.n_layer)]

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
        fwd, _, slots = self._plans[self._dropout]
        if self._dropout:
            keys = self.dropout_keys(self.dropout_counter)
            self.dropout_counter += 1
            for args, index, site in slots:
                args[index] = keys[site]
        for kernel, args in fwd:
            kernel(*args)
        self._has_targets = y is not None
        if y is None:
            return None
        self._tgt[...] = y
        self.kernels.crossentropy_forward(a["losses"], a["probs"], a["logits"], self._tgt)
        return float(np.mean(a["losses"], dtype=np.float64))

    def zero_grad(self) -> None:
        """Zero the parameter gradients and the activation gradients."""
        self.grads.flat.fill(0)
        if self.dacts is not None:
            self.dacts.flat.fill(0)

    def backward(self, accumulate: bool = False) -> None:
        """Gradient of the last forward's mean loss into `model.grads`.

        Overwrites `grads` unless accumulate=True, which adds to them (micro-batches).
        """
        if self.acts is None or not self._has_targets:
            raise RuntimeError("backward() needs a forward(x, y) with targets first")
        if accumulate:
            self.dacts.flat.fill(0)
        else:
            self.zero_grad()
        B, T = self._idx.shape
        self.dacts["losses"].fill(1.0 / (B * T))
        for kernel, args in self._plans[self._dropout][1]:
            kernel(*args)

    def save(self, path: str | Path, **extra: object) -> Path:
        """Write a checkpoint folder (weights, Adam moments, config, tokenizer); see checkpoint.save."""
        from fastchar.checkpoint import save

        return save(self, path, **extra)

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
        self._targets: np.ndarray | None = None
        self._inputs: np.ndarray | None = None
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

    def _ensure_acts(self, B: int, T: int) -> Arena:
        if self.acts is None or self.acts["encoded"].shape[:2] != (B, T):
            self.acts = Arena(act_specs(self.cfg, B, T), self.dtype)
            self.dacts = None
        return self.acts

    def forward(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> float | None:
        """Run the model on x (B, T) token ids; with targets y (B, T) return the mean loss.

        Leaves logits (B, T, V) in `model.logits`. Without y, returns None.
        """
        x = self.check_tokens(x, "x")
        if y is not None:
            y = self.check_tokens(y, "y")
            if y.shape != x.shape:
                raise InputError(f"y has shape {y.shape} but x has shape {x.shape}")
        B, T = x.shape
        k, p, a = self.kernels, self.params, self._ensure_acts(B, T)
        self._inputs, self._targets = x, y

        k.embedding_forward(a["encoded"], x, p["wte"], p["wpe"])
        residual = a["encoded"]
        for i in range(self.cfg.n_layer):
            s = f"blocks.{i}."
            k.rmsnorm_forward(a[s + "ln1"], a[s + "ln1_rstd"], residual, p[s + "ln1.weight"], RMSNORM_EPS)
            k.matmul_forward(_rows(a[s + "qkv"]), _rows(a[s + "ln1"]), p[s + "attn.qkv"])
            k.attention_forward(a[s + "atty"], a[s + "att"], a[s + "qkv"])
            k.matmul_forward(_rows(a[s + "attproj"]), _rows(a[s + "atty"]), p[s + "attn.proj"])
            k.residual_forward(a[s + "res1"], residual, a[s + "attproj"])
            k.rmsnorm_forward(a[s + "ln2"], a[s + "ln2_rstd"], a[s + "res1"], p[s + "ln2.weight"], RMSNORM_EPS)
            k.matmul_forward(_rows(a[s + "fch"]), _rows(a[s + "ln2"]), p[s + "mlp.fc"])
            k.relu2_forward(a[s + "fch_act"], a[s + "fch"])
            k.matmul_forward(_rows(a[s + "fcproj"]), _rows(a[s + "fch_act"]), p[s + "mlp.proj"])
            k.residual_forward(a[s + "res2"], a[s + "res1"], a[s + "fcproj"])
            residual = a[s + "res2"]
        k.rmsnorm_forward(a["lnf"], a["lnf_rstd"], residual, p["ln_f.weight"], RMSNORM_EPS)
        k.matmul_forward(_rows(a["logits"]), _rows(a["lnf"]), p["lm_head"])
        if y is None:
            return None
        k.crossentropy_forward(a["losses"], a["probs"], a["logits"], y)
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
        if self.acts is None or self._targets is None:
            raise RuntimeError("backward() needs a forward(x, y) with targets first")
        if self.dacts is None:
            self.dacts = Arena(self.acts.specs, self.dtype)
        if accumulate:
            self.dacts.flat.fill(0)
        else:
            self.zero_grad()
        k, p, g, a, d = self.kernels, self.params, self.grads, self.acts, self.dacts
        x, y = self._inputs, self._targets
        B, T = x.shape

        d["losses"].fill(1.0 / (B * T))
        k.crossentropy_backward(d["logits"], d["losses"], a["probs"], y)
        k.matmul_backward(_rows(d["lnf"]), g["lm_head"], _rows(d["logits"]), _rows(a["lnf"]), p["lm_head"])
        last = f"blocks.{self.cfg.n_layer - 1}.res2" if self.cfg.n_layer else "encoded"
        k.rmsnorm_backward(d[last], g["ln_f.weight"], d["lnf"], a[last], p["ln_f.weight"], a["lnf_rstd"])
        for i in reversed(range(self.cfg.n_layer)):
            s = f"blocks.{i}."
            residual = f"blocks.{i - 1}.res2" if i > 0 else "encoded"
            k.residual_backward(d[s + "res1"], d[s + "fcproj"], d[s + "res2"])
            k.matmul_backward(
                _rows(d[s + "fch_act"]), g[s + "mlp.proj"], _rows(d[s + "fcproj"]),
                _rows(a[s + "fch_act"]), p[s + "mlp.proj"],
            )  # fmt: skip
            k.relu2_backward(d[s + "fch"], d[s + "fch_act"], a[s + "fch"])
            k.matmul_backward(
                _rows(d[s + "ln2"]), g[s + "mlp.fc"], _rows(d[s + "fch"]), _rows(a[s + "ln2"]), p[s + "mlp.fc"]
            )  # fmt: skip
            k.rmsnorm_backward(
                d[s + "res1"], g[s + "ln2.weight"], d[s + "ln2"], a[s + "res1"], p[s + "ln2.weight"], a[s + "ln2_rstd"]
            )  # fmt: skip
            k.residual_backward(d[residual], d[s + "attproj"], d[s + "res1"])
            k.matmul_backward(
                _rows(d[s + "atty"]), g[s + "attn.proj"], _rows(d[s + "attproj"]),
                _rows(a[s + "atty"]), p[s + "attn.proj"],
            )  # fmt: skip
            k.attention_backward(d[s + "qkv"], d[s + "att"], d[s + "atty"], a[s + "qkv"], a[s + "att"])
            k.matmul_backward(
                _rows(d[s + "ln1"]), g[s + "attn.qkv"], _rows(d[s + "qkv"]), _rows(a[s + "ln1"]), p[s + "attn.qkv"]
            )  # fmt: skip
            k.rmsnorm_backward(
                d[residual], g[s + "ln1.weight"], d[s + "ln1"], a[residual], p[s + "ln1.weight"], a[s + "ln1_rstd"]
            )  # fmt: skip
        k.embedding_backward(g["wte"], g["wpe"], d["encoded"], x)

    def save(self, path: str | Path, **extra: object) -> Path:
        """Write a checkpoint folder (weights, Adam moments, config, tokenizer); see checkpoint.save."""
        from fastchar.checkpoint import save

        return save(self, path, **extra)

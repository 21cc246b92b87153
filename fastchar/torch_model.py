"""fastchar's model in PyTorch, built from the same description: `fastchar.to_torch(model)`.

Not a copy of the network: the parameters come from fastchar.graph.param_specs and `run` walks
fastchar.graph.forward_ops, running each op with its record's PyTorch function (fastchar/ops.py,
`OpKind.torch`), so an architecture change in graph.py or a new op record reaches this model too
(or fails here, naming the op kind without a PyTorch reference). Same layout as fastchar (matrices
stored [in, out], applied as x @ W; a tied head reads wte transposed), so weights copy by name.
PyTorch is an optional dependency (`pip install "fastchar[torch]"`), imported only by this module.
"""

from __future__ import annotations

import numpy as np

from fastchar import graph
from fastchar.config import ModelConfig
from fastchar.errors import ConfigError
from fastchar.ops import record

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ConfigError(
        f"fastchar.to_torch needs PyTorch, which is not installed here ({exc})",
        hint='pip install "fastchar[torch]"',
    ) from exc


class TorchGPT(nn.Module):
    """Parameters are named exactly as fastchar's param_specs (dots become "__" in PyTorch).

    forward(idx (B, T) int64, targets (B, T) or None) -> (logits (B, T, V), loss or None).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = [name for name, _ in graph.param_specs(cfg)]
        for name, shape in graph.param_specs(cfg):
            self.register_parameter(name.replace(".", "__"), nn.Parameter(torch.zeros(shape)))
        if cfg.position == "rope":
            cos, sin = graph.rope_tables(cfg, np.arange(cfg.ctx))
            self.register_buffer("rope_cos", torch.from_numpy(cos).float(), persistent=False)
            self.register_buffer("rope_sin", torch.from_numpy(sin).float(), persistent=False)

    def rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (n, HS/2) float64 of the given positions (graph.rope_tables)."""
        return graph.rope_tables(self.cfg, positions)

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def load_from(self, params) -> None:
        """Copy weights from a fastchar Arena (or any name -> array mapping), in this module's dtype."""
        with torch.no_grad():
            for name in self.names:
                self.p(name).copy_(torch.from_numpy(np.asarray(params[name])))

    def run(self, idx: torch.Tensor, pos0: int = 0, cache: dict | None = None) -> torch.Tensor:
        """graph.forward_ops on token ids (B, T) at positions pos0..pos0+T-1: the logits (B, T, V)."""
        T = idx.shape[1]
        drop = self.cfg.dropout if self.training else 0.0
        ops = graph.forward_ops(self.cfg, dropout=drop > 0)
        x: dict[str, torch.Tensor] = {graph.TOKENS: idx}
        for op in ops:
            fn = record(op.kind).torch
            if fn is None:
                raise NotImplementedError(f"the op record {op.kind!r} (fastchar/ops.py) has no PyTorch reference")
            x[op.out] = fn(self, op, [x[name] for name in op.inputs], T, pos0, drop, cache)
        return x[ops[-1].out]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.run(idx)
        if targets is None:
            return logits, None
        return logits, nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def decay_groups(self, weight_decay: float) -> list[dict]:
        decay = [self.p(n) for n in self.names if self.p(n).dim() == 2]
        rest = [self.p(n) for n in self.names if self.p(n).dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

    @torch.no_grad()
    def generate_nocache(self, idx: torch.Tensor, n: int, temperature: float = 0.8) -> torch.Tensor:
        """nanoGPT's loop: crop to ctx and recompute the whole window for every new character."""
        for _ in range(n):
            logits, _ = self(idx[:, -self.cfg.ctx :])
            probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1)], dim=1)
        return idx

    @torch.no_grad()
    def generate_cache(self, idx: torch.Tensor, n: int, temperature: float = 0.8, batch: int = 1) -> torch.Tensor:
        """A simple KV cache, refilled with the newest ctx/2 tokens when the window is full; batch
        streams continue the same prompt idx (1, T) together (one cache row each). (batch, T + n)."""
        C, NH, L, S = self.cfg.d_model, self.cfg.n_head, self.cfg.n_layer, self.cfg.ctx
        shape = (L, batch, NH, S, C // NH)
        dtype = self.p("wte").dtype
        cache = {"k": torch.zeros(shape, dtype=dtype), "v": torch.zeros(shape, dtype=dtype), "length": 0}

        def step(tokens: torch.Tensor) -> torch.Tensor:
            cache["layer"] = 0
            logits = self.run(tokens, cache["length"], cache)
            cache["length"] += tokens.shape[1]
            return logits[:, -1]

        held = idx[:, -S:].expand(batch, -1)
        logits = step(held)
        out = [idx.expand(batch, -1)]
        for _ in range(n):
            token = torch.multinomial(torch.softmax(logits / temperature, -1), 1)
            out.append(token)
            if cache["length"] >= S:
                held = held[:, held.shape[1] - (S // 2 - 1) :]
                cache["length"] = 0
                step(held)
            logits = step(token)
            held = torch.cat([held, token], dim=1)
        return torch.cat(out, dim=1)


def to_torch(model, dtype: torch.dtype | None = None) -> TorchGPT:
    """A torch.nn.Module with `model`'s config and a copy of its weights (float32 by default; the
    model's dtype for a float64 model). Its forward(idx) returns (logits (B, T, V), None) equal to
    fastchar's logits; eval() mode unless you call train()."""
    if dtype is None:
        dtype = torch.float64 if np.dtype(model.dtype) == np.float64 else torch.float32
    module = TorchGPT(model.cfg).to(dtype)
    if model.cfg.position == "rope":  # the rotary tables from float64, not from float32 buffers
        cos, sin = graph.rope_tables(model.cfg, np.arange(model.cfg.ctx))
        module.rope_cos, module.rope_sin = torch.from_numpy(cos).to(dtype), torch.from_numpy(sin).to(dtype)
    module.load_from(model.params)
    return module.eval()

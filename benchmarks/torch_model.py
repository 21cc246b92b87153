"""fastchar's model in PyTorch, built from the same description: the side-by-side comparison and the
optional test oracle.

Not a copy of the network: the parameters come from fastchar.graph.param_specs and `forward` walks
fastchar.graph.forward_ops, running each op with the PyTorch function of its kind (TORCH_OPS), so an
architecture change in graph.py reaches this model too (or fails here, naming the new op kind).
Same layout as fastchar (matrices stored [in, out], applied as x @ W), so weights copy over by name.
PyTorch is never a dependency of fastchar: only benchmarks and optional tests import this file.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fastchar import graph


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half on q and k of every head (docs/architecture.md); qkv (B, T, 3C), cos/sin (T, HS/2)."""
    B, T, C3 = qkv.shape
    half = cos.shape[-1]
    qk, v = qkv[..., : 2 * C3 // 3], qkv[..., 2 * C3 // 3 :]
    heads = qk.reshape(B, T, -1, 2, half)
    a, b = heads[..., 0, :], heads[..., 1, :]
    c, s = cos[:, None, :], sin[:, None, :]
    turned = torch.stack([a * c - b * s, a * s + b * c], dim=-2).reshape(B, T, -1)
    return torch.cat([turned, v], dim=-1)


def attention(qkv: torch.Tensor, n_head: int, drop: float, cache: dict | None) -> torch.Tensor:
    """Causal attention over (B, T, 3C); with a cache {"k", "v", "length"}, the new rows are
    appended to it (learned positions) and attend to everything cached."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))
    if cache is None:
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
    else:
        n = cache["length"]
        cache["k"][cache["layer"], :, :, n : n + T] = k
        cache["v"][cache["layer"], :, :, n : n + T] = v
        keys, values = cache["k"][cache["layer"], :, :, : n + T], cache["v"][cache["layer"], :, :, : n + T]
        scores = q @ keys.transpose(-1, -2) / math.sqrt(C // n_head)
        scores = scores.masked_fill(torch.ones(T, n + T, dtype=torch.bool).triu(n + 1), float("-inf"))
        y = torch.softmax(scores, -1) @ values
        cache["layer"] += 1
    return y.transpose(1, 2).reshape(B, T, C)


class TorchGPT(nn.Module):
    """Parameters are named exactly as fastchar's param_specs (dots become "__" in PyTorch)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = [name for name, _ in graph.param_specs(cfg)]
        for name, shape in graph.param_specs(cfg):
            self.register_parameter(name.replace(".", "__"), nn.Parameter(torch.zeros(shape)))
        if cfg.position == "rope":
            cos, sin = graph.rope_tables(cfg, np.arange(cfg.ctx))
            self.register_buffer("rope_cos", torch.from_numpy(cos).float(), persistent=False)
            self.register_buffer("rope_sin", torch.from_numpy(sin).float(), persistent=False)

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def load_from(self, params) -> None:
        """Copy weights from a fastchar Arena (or any name -> array mapping)."""
        with torch.no_grad():
            for name in self.names:
                self.p(name).copy_(torch.from_numpy(np.asarray(params[name], dtype=np.float32)))

    def run(self, idx: torch.Tensor, pos0: int = 0, cache: dict | None = None) -> torch.Tensor:
        """graph.forward_ops on token ids (B, T) at positions pos0..pos0+T-1: the logits (B, T, V)."""
        T = idx.shape[1]
        drop = self.cfg.dropout if self.training else 0.0
        ops = graph.forward_ops(self.cfg, dropout=drop > 0)
        x: dict[str, torch.Tensor] = {graph.TOKENS: idx}
        for op in ops:
            args = [x[name] for name in op.inputs]
            fn = TORCH_OPS.get(op.kind)
            if fn is None:
                raise NotImplementedError(f"benchmarks/torch_model.py has no PyTorch op for kind {op.kind!r}")
            x[op.out] = fn(self, op, args, T, pos0, drop, cache)
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
        cache = {"k": torch.zeros(shape), "v": torch.zeros(shape), "length": 0}

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


def _matmul(m: TorchGPT, op, args, T, pos0, drop, cache):
    return args[0] @ m.p(op.weights[0])


def _embedding(m: TorchGPT, op, args, T, pos0, drop, cache):
    x = m.p(op.weights[0])[args[0]]
    return x + m.p("wpe")[pos0 : pos0 + T] if op.weights[1] == "wpe" else x


def _rope(m: TorchGPT, op, args, T, pos0, drop, cache):
    if pos0 + T > m.rope_cos.shape[0]:
        cos, sin = (torch.from_numpy(t).float() for t in graph.rope_tables(m.cfg, np.arange(pos0, pos0 + T)))
    else:
        cos, sin = m.rope_cos[pos0 : pos0 + T], m.rope_sin[pos0 : pos0 + T]
    return rope(args[0], cos, sin)


TORCH_OPS = {
    "embedding": _embedding,
    "rmsnorm": lambda m, op, args, *_: rmsnorm(args[0], m.p(op.weights[0]), op.scalars[0]),
    "matmul": _matmul,
    "rope": _rope,
    "attention": lambda m, op, args, T, pos0, drop, cache: attention(args[0], m.cfg.n_head, 0.0, cache),
    "attention_dropout": lambda m, op, args, T, pos0, drop, cache: attention(args[0], m.cfg.n_head, drop, cache),
    "dropout": lambda m, op, args, T, pos0, drop, cache: nn.functional.dropout(args[0], drop, m.training),
    "relu2": lambda m, op, args, *_: torch.relu(args[0]).square(),
    "residual": lambda m, op, args, *_: args[0] + args[1],
}

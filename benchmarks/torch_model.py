"""The base model of SPEC.md in PyTorch: the side-by-side comparison and the optional test oracle.

Same layout as fastchar (matrices stored [in, out], applied as x @ W), so weights copy over by name.
PyTorch is never a dependency of fastchar: only benchmarks and one optional test import this file.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

RMSNORM_EPS = 1e-5


def rmsnorm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMSNORM_EPS) * weight


class TorchGPT(nn.Module):
    """Parameters are named exactly as fastchar's param_specs."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg = cfg
        V, C, T, H, L = cfg.vocab_size, cfg.d_model, cfg.ctx, cfg.mlp_hidden, cfg.n_layer
        self.names: list[str] = []

        def param(name: str, *shape: int) -> None:
            self.register_parameter(name.replace(".", "__"), nn.Parameter(torch.zeros(shape)))
            self.names.append(name)

        param("wte", V, C)
        param("wpe", T, C)
        for i in range(L):
            p = f"blocks.{i}."
            param(p + "ln1.weight", C)
            param(p + "attn.qkv", C, 3 * C)
            param(p + "attn.proj", C, C)
            param(p + "ln2.weight", C)
            param(p + "mlp.fc", C, H)
            param(p + "mlp.proj", H, C)
        param("ln_f.weight", C)
        param("lm_head", C, V)

    def p(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))

    def load_from(self, params) -> None:
        """Copy weights from a fastchar Arena (or any name -> array mapping)."""
        with torch.no_grad():
            for name in self.names:
                self.p(name).copy_(torch.from_numpy(np.asarray(params[name], dtype=np.float32)))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        C, NH = self.cfg.d_model, self.cfg.n_head
        HS = C // NH
        x = self.p("wte")[idx] + self.p("wpe")[:T]
        drop = self.cfg.dropout if self.training else 0.0  # same sites as fastchar, other masks
        for i in range(self.cfg.n_layer):
            s = f"blocks.{i}."
            h = rmsnorm(x, self.p(s + "ln1.weight"))
            q, k, v = (h @ self.p(s + "attn.qkv")).split(C, dim=-1)
            q, k, v = (t.view(B, T, NH, HS).transpose(1, 2) for t in (q, k, v))
            y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
            branch = y.transpose(1, 2).reshape(B, T, C) @ self.p(s + "attn.proj")
            x = x + nn.functional.dropout(branch, drop, self.training)
            h = rmsnorm(x, self.p(s + "ln2.weight"))
            branch = torch.relu(h @ self.p(s + "mlp.fc")).square() @ self.p(s + "mlp.proj")
            x = x + nn.functional.dropout(branch, drop, self.training)
        logits = rmsnorm(x, self.p("ln_f.weight")) @ self.p("lm_head")
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
    def generate_cache(self, idx: torch.Tensor, n: int, temperature: float = 0.8) -> torch.Tensor:
        """A simple KV cache, refilled with the newest ctx/2 tokens when the window is full."""
        C, NH, L, S = self.cfg.d_model, self.cfg.n_head, self.cfg.n_layer, self.cfg.ctx
        HS = C // NH
        tokens = idx[0].tolist()
        kc = torch.zeros(L, NH, S, HS)
        vc = torch.zeros(L, NH, S, HS)
        length = 0

        def step(token: int) -> torch.Tensor:
            nonlocal length
            pos = length
            x = self.p("wte")[token] + self.p("wpe")[pos]
            for i in range(L):
                s = f"blocks.{i}."
                h = rmsnorm(x, self.p(s + "ln1.weight"))
                q, k, v = (h @ self.p(s + "attn.qkv")).split(C)
                kc[i, :, pos] = k.view(NH, HS)
                vc[i, :, pos] = v.view(NH, HS)
                att = torch.softmax((kc[i, :, : pos + 1] @ q.view(NH, HS, 1)).squeeze(-1) / math.sqrt(HS), -1)
                y = (att.unsqueeze(1) @ vc[i, :, : pos + 1]).reshape(C)
                x = x + y @ self.p(s + "attn.proj")
                h = rmsnorm(x, self.p(s + "ln2.weight"))
                x = x + torch.relu(h @ self.p(s + "mlp.fc")).square() @ self.p(s + "mlp.proj")
            length += 1
            return rmsnorm(x, self.p("ln_f.weight")) @ self.p("lm_head")

        held: list[int] = []
        for t in tokens[-S:]:
            logits = step(t)
            held.append(t)
        out = list(tokens)
        for _ in range(n):
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
            out.append(token)
            if length >= S:
                held = held[len(held) - (S // 2 - 1) :]
                length = 0
                for t in held:
                    step(t)
            logits = step(token)
            held.append(token)
        return torch.tensor([out])

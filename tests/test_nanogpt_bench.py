"""benchmarks/nanogpt_train.py (nanoGPT's train.py under a wall-time budget) and
benchmarks/nanogpt_eval.py's weight mapping, without nanoGPT: a stand-in train.py and model.py with
nanoGPT's names and loop structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # PyTorch is the optional extra these benchmarks need

ROOT = Path(__file__).resolve().parent.parent

# nanoGPT's train.py in miniature: module-level config the configurator overrides, a schedule read
# from globals at every step, a loop that ends after max_iters, one optimizer step per iteration
FAKE_TRAIN = """
import sys, time, json
import torch
batch_size, block_size, gradient_accumulation_steps = 4, 8, 1
warmup_iters, max_iters, lr_decay_iters = 2, 10**6, 10**6
for arg in sys.argv[2:]:
    key, value = arg[2:].split("=")
    globals()[key] = type(globals()[key])(value)
json.dump(sys.argv, open("argv.json", "w"))
model_args = dict(n_layer=1)
model = torch.nn.Linear(3, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
iter_num = 0
lrs = []
while True:
    lrs.append(lr_decay_iters)
    json.dump(lrs, open("schedule.json", "w"))
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    time.sleep(step_s)
    iter_num += 1
    if iter_num > max_iters:
        break
"""


def run_fake(tmp_path: Path, seconds: float, step_s: float, max_iters: int | None = None) -> dict:
    (tmp_path / "train.py").write_text(FAKE_TRAIN.replace("step_s", repr(step_s)))
    extra = [f"max_iters={max_iters}"] if max_iters is not None else []
    cmd = [sys.executable, str(ROOT / "benchmarks" / "nanogpt_train.py"), "--nanogpt", str(tmp_path),
           "--seconds", str(seconds), "--out", str(tmp_path / "out.pt"), "--config", "cfg.py", "--",
           "batch_size=4", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_stops_at_the_wall_time_and_fits_the_schedule_to_it(tmp_path):
    summary = run_fake(tmp_path, seconds=3.0, step_s=0.1)
    start_up = summary["seconds"] - 0.1 * (summary["steps"] - 1)  # what came before the first step
    assert summary["steps"] >= 8 and summary["seconds"] < 3.0, summary  # stopped before a step ending past 3 s
    assert 3.0 - summary["seconds"] < 0.25, summary  # ... and not earlier than that
    # the schedule's end follows the measured step time from the 4th step on: the steps 3 s hold
    schedule = json.loads((tmp_path / "schedule.json").read_text())
    assert schedule[:4] == [10**6] * 4, schedule  # as configured until then
    assert all(abs(end - summary["steps"]) <= 2 for end in schedule[4:]), (schedule, summary, start_up)
    assert abs(summary["lr_decay_iters_last"] - summary["steps"]) <= 2, summary
    saved = torch.load(tmp_path / "out.pt", weights_only=False)
    assert set(saved["model"]) == {"weight", "bias"} and saved["model_args"] == {"n_layer": 1}
    assert len(saved["step_seconds"]) == summary["steps"]
    assert json.loads((tmp_path / "argv.json").read_text()) == ["train.py", "cfg.py", "--batch_size=4"]


def test_only_the_budget_ends_the_run(tmp_path):
    summary = run_fake(tmp_path, seconds=3.0, step_s=0.05, max_iters=2)  # nanoGPT would stop after 3 steps
    assert summary["steps"] > 10 and 3.0 - summary["seconds"] < 0.2, summary


def test_fastchar_weights_in_nanogpts_layout(tmp_path):
    """The mapping of nanogpt_eval onto a stand-in GPT with nanoGPT's parameter names and math
    (LayerNorm without bias, exact GELU, tied head): the same loss as fastchar's forward."""
    from benchmarks.nanogpt_eval import fastchar_into_nanogpt, torch_loss
    from fastchar.config import ModelConfig
    from fastchar.model import Model

    cfg = ModelConfig(vocab_size=11, d_model=12, n_layer=2, n_head=3, ctx=8, mlp_hidden=48, norm="layernorm",
                      activation="gelu", tie_embeddings=True)  # fmt: skip
    model = Model(cfg, backend="numpy", seed=3).eval()
    rng = np.random.default_rng(0)
    for name in model.params.keys():
        model.params[name][...] += rng.normal(0, 0.1, model.params[name].shape)
    x, y = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    gpt = fastchar_into_nanogpt(StandIn, {k: np.array(model.params[k]) for k in model.params.keys()}, cfg)
    assert abs(torch_loss(gpt, x, y, 2) - model.forward(x, y)) < 1e-5
    with pytest.raises(SystemExit, match="nanoGPT's GPT"):
        fastchar_into_nanogpt(StandIn, {}, ModelConfig(vocab_size=11))


class StandIn:
    """nanoGPT's model.py reduced to what nanogpt_eval uses: GPTConfig, GPT(config) with its names."""

    class GPTConfig:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class GPT(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            nn, C = torch.nn, c.n_embd
            self.c = c
            self.transformer = nn.ModuleDict(
                {"wte": nn.Embedding(c.vocab_size, C), "wpe": nn.Embedding(c.block_size, C),
                 "h": nn.ModuleList([nn.ModuleDict({
                     "ln_1": nn.LayerNorm(C, bias=False), "ln_2": nn.LayerNorm(C, bias=False),
                     "attn": nn.ModuleDict({"c_attn": nn.Linear(C, 3 * C, bias=False),
                                            "c_proj": nn.Linear(C, C, bias=False)}),
                     "mlp": nn.ModuleDict({"c_fc": nn.Linear(C, 4 * C, bias=False),
                                           "c_proj": nn.Linear(4 * C, C, bias=False)})})
                     for _ in range(c.n_layer)]),
                 "ln_f": nn.LayerNorm(C, bias=False)})  # fmt: skip
            self.lm_head = nn.Linear(C, c.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            F, c, t = torch.nn.functional, self.c, self.transformer
            B, T = idx.shape
            x = t.wte(idx) + t.wpe(torch.arange(T))
            for h in t.h:
                q, k, v = h.attn.c_attn(h.ln_1(x)).split(c.n_embd, dim=2)
                q, k, v = (z.view(B, T, c.n_head, -1).transpose(1, 2) for z in (q, k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
                x = x + h.attn.c_proj(y)
                x = x + h.mlp.c_proj(F.gelu(h.mlp.c_fc(h.ln_2(x))))
            logits = self.lm_head(t.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

"""The architecture options (norm, activation, tie_embeddings): every combination of the three, on
every backend, against an independent float64 PyTorch model, in the Python and compiled decode
loops, through checkpoints, the CLI and fastchar.to_torch.

The PyTorch oracle here (`NanoGPT`) is written out by hand in nanoGPT's form (nn.LayerNorm without
bias, nn.GELU(), a head tied to wte) and shares no code with fastchar's description of the network.
Tolerances: the float64 numpy model agrees to float64 rounding (1e-9 relative); float32 backends to
1e-4 relative on the loss and 1e-3 of each gradient tensor's largest entry (a few ulps per op over
two layers, gradients near zero have no meaningful relative error).
"""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
from conftest import compiled_backends

from fastchar import CharTokenizer, ConfigError, KVCache, Model, ModelConfig, load
from fastchar.arena import param_specs
from fastchar.graph import OVERWRITE
from fastchar.sampler import compiled_loop, compiled_tokens, python_tokens

COMBOS = list(itertools.product(("rmsnorm", "layernorm"), ("relu2", "gelu"), (False, True)))
IDS = [f"{n}-{a}-{'tied' if t else 'untied'}" for n, a, t in COMBOS]
SMALL = dict(vocab_size=13, d_model=24, n_layer=2, n_head=3, ctx=9, mlp_hidden=40)


def config(norm: str, activation: str, tied: bool, **kw) -> ModelConfig:
    return ModelConfig(**{**SMALL, **kw}, norm=norm, activation=activation, tie_embeddings=tied)


def sharp(model: Model, seed: int = 0) -> Model:
    """Perturb every weight (gains away from ones) so that each parameter matters."""
    r = np.random.default_rng(seed)
    model.params.flat[:] += r.normal(0, 0.15, model.params.flat.size).astype(model.params.flat.dtype)
    return model


def batch(cfg: ModelConfig, B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, cfg.ctx)), r.integers(0, cfg.vocab_size, (B, cfg.ctx))


def need_torch():
    """PyTorch, or a skip; FASTCHAR_REQUIRE_TORCH=1 (CI's torch block) makes a missing torch an error."""
    if os.environ.get("FASTCHAR_REQUIRE_TORCH") == "1":
        import torch

        return torch
    return pytest.importorskip("torch")


def nanogpt(cfg: ModelConfig):
    """nanoGPT's GPT (bias=False) with fastchar's options, float64, written independently."""
    torch = need_torch()
    from torch import nn

    class Norm(nn.Module):
        def __init__(self, C: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(C))

        def forward(self, x):
            if cfg.norm == "layernorm":
                return nn.functional.layer_norm(x, (x.shape[-1],), self.weight, None, 1e-5)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            C, H = cfg.d_model, cfg.mlp_hidden
            self.ln_1, self.ln_2 = Norm(C), Norm(C)
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
            self.c_fc, self.mlp_proj = nn.Linear(C, H, bias=False), nn.Linear(H, C, bias=False)
            self.act = nn.GELU() if cfg.activation == "gelu" else (lambda x: torch.relu(x) ** 2)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // cfg.n_head)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            x = x + self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.wpe = nn.Embedding(cfg.ctx, cfg.d_model)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = Norm(cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.lm_head.weight = self.wte.weight  # nanoGPT's weight tying

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return logits, nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

        def tensors(self) -> dict:
            """fastchar's parameter names -> (tensor, transposed?): Linear weights are [out, in]."""
            out = {
                "wte": (self.wte.weight, False),
                "wpe": (self.wpe.weight, False),
                "ln_f.weight": (self.ln_f.weight, False),
            }
            for i, b in enumerate(self.h):
                p = f"blocks.{i}."
                out[p + "ln1.weight"], out[p + "ln2.weight"] = (b.ln_1.weight, False), (b.ln_2.weight, False)
                out[p + "attn.qkv"], out[p + "attn.proj"] = (b.c_attn.weight, True), (b.c_proj.weight, True)
                out[p + "mlp.fc"], out[p + "mlp.proj"] = (b.c_fc.weight, True), (b.mlp_proj.weight, True)
            if not cfg.tie_embeddings:
                out["lm_head"] = (self.lm_head.weight, True)
            return out

    return GPT().double()


def oracle(model: Model, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray, dict]:
    """Loss, logits and every gradient (by fastchar's names) of the float64 PyTorch oracle."""
    import torch

    net = nanogpt(model.cfg)
    tensors = net.tensors()
    assert sorted(tensors) == sorted(name for name, _ in param_specs(model.cfg)), "the oracle's tensors"
    with torch.no_grad():
        for name, (t, transposed) in tensors.items():
            value = torch.from_numpy(np.asarray(model.params[name], np.float64))
            t.copy_(value.T if transposed else value)
    logits, loss = net(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    grads = {name: (t.grad.T if tr else t.grad).numpy() for name, (t, tr) in tensors.items()}
    return loss.item(), logits.detach().numpy(), grads


def assert_matches_oracle(model: Model, rel: float, seed: int = 1) -> None:
    x, y = batch(model.cfg, 3, seed)
    loss = model.forward(x, y)
    model.backward()
    want_loss, want_logits, want_grads = oracle(model, x, y)
    name = f"{model.backend} {model.cfg.norm}/{model.cfg.activation}/tied={model.cfg.tie_embeddings}"
    assert loss == pytest.approx(want_loss, rel=rel), f"{name}: loss {loss} vs {want_loss}"
    np.testing.assert_allclose(model.logits, want_logits, rtol=rel, atol=rel, err_msg=f"{name}: logits")
    for tensor, want in want_grads.items():
        scale = float(np.max(np.abs(want)))
        diff = float(np.max(np.abs(model.grads[tensor] - want)))
        assert diff <= 10 * rel * scale + 1e-12, f"{name}: grad {tensor} max abs diff {diff:.3g} (max |g| {scale:.3g})"


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
def test_numpy_float64_equals_pytorch_oracle(norm, activation, tied):
    """The reference in float64: loss, logits and every gradient to float64 rounding."""
    model = sharp(Model(config(norm, activation, tied), backend="numpy", seed=3, dtype=np.float64))
    assert_matches_oracle(model, rel=1e-9)


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
def test_numpy_float32_equals_pytorch_oracle(norm, activation, tied):
    model = sharp(Model(config(norm, activation, tied), backend="numpy", seed=3))
    assert_matches_oracle(model, rel=1e-4)


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
@pytest.mark.parametrize("backend_name", compiled_backends())
def test_compiled_backend_equals_pytorch_oracle(backend_name, norm, activation, tied):
    model = sharp(Model(config(norm, activation, tied), backend=backend_name, seed=3))
    assert_matches_oracle(model, rel=1e-4)


@pytest.mark.parametrize("backend_name", compiled_backends())
def test_nanogpt_shape_parity(backend_name):
    """The three options together at head size 64 (the AVX-512 attention's largest): every backend's
    loss and gradients equal the float64 oracle's."""
    cfg = ModelConfig(vocab_size=17, d_model=128, n_layer=1, n_head=2, ctx=16, mlp_hidden=512, norm="layernorm",
                      activation="gelu", tie_embeddings=True)  # fmt: skip
    assert_matches_oracle(sharp(Model(cfg, backend=backend_name, seed=1)), rel=1e-4)


def test_tied_model_has_no_lm_head_and_wte_gradient_sums_both_uses():
    untied, tied = config("rmsnorm", "relu2", False), config("rmsnorm", "relu2", True)
    names = [n for n, _ in param_specs(tied)]
    assert "lm_head" not in names and names == [n for n, _ in param_specs(untied) if n != "lm_head"]
    model = sharp(Model(tied, backend="numpy", seed=0, dtype=np.float64))
    x, y = batch(tied, 2, 5)
    model.forward(x, y)
    model.backward()
    head = model.grads["wte"].copy()
    # the embedding's share alone: the gradient reaching `encoded`, scattered by token
    embed = np.zeros_like(head)
    np.add.at(embed, model._idx, model.dacts["encoded"])
    lnf = model.acts["lnf"].reshape(-1, tied.d_model)
    dlogits = model.dacts["logits"].reshape(-1, tied.vocab_size)
    np.testing.assert_allclose(head, embed + dlogits.T @ lnf, rtol=1e-10, atol=1e-12)
    assert np.max(np.abs(dlogits.T @ lnf)) > 1e-3 and np.max(np.abs(embed)) > 1e-3, "both uses contribute"


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_norm_gains_start_at_ones(norm):
    """Init is part of each op's record: every norm's gain is ones, whatever the norm."""
    model = Model(config(norm, "gelu", True), backend="numpy", seed=0)
    gains = [n for n, s in param_specs(model.cfg) if len(s) == 1]
    assert gains == ["blocks.0.ln1.weight", "blocks.0.ln2.weight", "blocks.1.ln1.weight", "blocks.1.ln2.weight",
                     "ln_f.weight"]  # fmt: skip
    for name in gains:
        assert np.all(model.params[name] == 1.0), name
    assert abs(float(np.std(model.params["wte"])) - 0.02) < 0.004


def test_default_options_keep_the_base_model_and_its_init():
    """The defaults are the base model: same table, same seeded weights as before the options."""
    cfg = ModelConfig()
    assert (cfg.norm, cfg.activation, cfg.tie_embeddings) == ("rmsnorm", "relu2", False)
    assert sum(math.prod(s) for _, s in param_specs(cfg)) == 812_416
    model = Model(cfg, backend="numpy", seed=0)
    r = np.random.default_rng(0)
    assert np.array_equal(model.params["wte"], r.normal(0.0, 0.02, (65, 128)).astype(np.float32))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"tie_embeddings": "yes"}, "tie_embeddings must be True or False"),
    ],  # fmt: skip
)
def test_bad_options_are_named(kw, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kw)


# -- decoding ---------------------------------------------------------------------------------


def loop_backends() -> list[str]:
    names = []
    for b in compiled_backends():
        if compiled_loop(Model(ModelConfig(**SMALL), backend=b)) is not None:
            names.append(b)
    return names


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
@pytest.mark.parametrize("backend_name", loop_backends())
def test_compiled_decode_equals_python_loop(backend_name, norm, activation, tied):
    """Seeded text of the compiled loop equals the Python loop's (KVCache) across several refills,
    and every draw's logits equal a full forward over the tokens held in the cache."""
    model = sharp(Model(config(norm, activation, tied), backend=backend_name, seed=2))
    n, prompt, window = 3 * model.cfg.ctx, [1, 2, 3], model.cfg.ctx
    logits = np.zeros((n, model.cfg.vocab_size), np.float32)
    got = [int(t) for b in compiled_tokens(model, prompt, n, 1.0, None, None, np.random.default_rng(7), window, 5,
                                           logits) for t in b]  # fmt: skip
    want = [int(t) for t in python_tokens(model, prompt, n, 1.0, None, None, np.random.default_rng(7), window)]
    assert got == want
    held = prompt
    for i, token in enumerate(got):
        model.forward(np.array([held]))
        np.testing.assert_allclose(logits[i], model.logits[0, -1], rtol=1e-4, atol=1e-5, err_msg=f"draw {i}")
        held = [*held[len(held) - (window // 2 - 1) :], token] if len(held) >= window else [*held, token]


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
def test_python_cache_equals_full_forward(norm, activation, tied):
    model = sharp(Model(config(norm, activation, tied), backend="numpy", seed=2, dtype=np.float64))
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    model.forward(np.array([tokens]))
    full = model.logits[0].copy()
    cache = KVCache(model)
    for t, token in enumerate(tokens):
        np.testing.assert_allclose(cache.step(token), full[t], rtol=1e-10, atol=1e-12, err_msg=f"position {t}")


@pytest.mark.parametrize("norm, activation, tied", [c for c in COMBOS if c[0] == "layernorm" or c[2]], ids=str)
def test_batched_decode_equals_single_streams(norm, activation, tied):
    """The Cython batched loop (one row per stream) gives each stream the logits it gets alone."""
    from fastchar.sampler import batch_loop, batch_tokens, stream_rngs

    model = sharp(Model(config(norm, activation, tied), backend="cython" if "cython" in compiled_backends() else
                        "numpy", seed=2))  # fmt: skip
    if batch_loop(model) is None:
        pytest.skip("the batched loop needs the Cython backend")
    B, N, window = 5, 12, 8
    prompts = [[b % 13, (3 * b) % 13] for b in range(B)]
    batched = np.zeros((B, N, model.cfg.vocab_size), np.float32)
    list(batch_tokens(model, prompts, N, 1.0, None, None, stream_rngs(3, B), window, logits=batched))
    for b in range(B):
        alone = np.zeros((N, model.cfg.vocab_size), np.float32)
        list(compiled_tokens(model, prompts[b], N, 1.0, None, None, stream_rngs(3, B)[b], window, logits=alone))
        np.testing.assert_allclose(batched[b], alone, rtol=1e-5, atol=1e-6, err_msg=f"stream {b}")


# -- checkpoints, CLI, to_torch ---------------------------------------------------------------


def test_checkpoint_saves_the_options_and_old_checkpoints_load_with_defaults(tmp_path):
    cfg = config("layernorm", "gelu", True)
    model = sharp(Model(cfg, backend="numpy", seed=1))
    model.tokenizer = CharTokenizer("abcdefghijkl\n")
    model.save(tmp_path / "new")
    meta = json.loads((tmp_path / "new" / "meta.json").read_text())
    assert (meta["model"]["norm"], meta["model"]["activation"], meta["model"]["tie_embeddings"]) == (
        "layernorm", "gelu", True)  # fmt: skip
    back = load(tmp_path / "new", backend="numpy")
    assert back.cfg == cfg and np.array_equal(back.params.flat, model.params.flat)
    old = Model(ModelConfig(**SMALL), backend="numpy", seed=1)
    old.tokenizer = CharTokenizer("abcdefghijkl\n")
    old.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "meta.json").read_text())
    for name in ("norm", "activation", "tie_embeddings"):
        del meta["model"][name]  # a checkpoint written before the options existed
    (tmp_path / "old" / "meta.json").write_text(json.dumps(meta))
    back = load(tmp_path / "old", backend="numpy")
    assert (back.cfg.norm, back.cfg.activation, back.cfg.tie_embeddings) == ("rmsnorm", "relu2", False)
    assert np.array_equal(back.params.flat, old.params.flat)


def test_cli_trains_samples_and_lists_the_plan(tmp_path, corpus, capsys):
    from fastchar.cli import main

    out = tmp_path / "run"
    args = ["train", "--data", str(corpus), "--out", str(out), "--steps", "4", "--eval-every", "2"]
    args += ["--eval-batches", "1", "--batch", "2", "--d-model", "16", "--n-head", "2", "--n-layer", "1"]
    args += ["--ctx", "16", "--norm", "layernorm", "--activation", "gelu", "--tie-embeddings"]
    args += ["--sample-chars", "20", "--backend", "numpy"]
    assert main(args) == 0
    model = load(out)
    assert (model.cfg.norm, model.cfg.activation, model.cfg.tie_embeddings) == ("layernorm", "gelu", True)
    assert "lm_head" not in model.params
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(out), "--max-new-tokens", "30", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out) >= 30
    assert main(["info", "--plan", str(out)]) == 0
    text = capsys.readouterr().out
    for kernel in ("layernorm_forward", "gelu_backward", "matmul_t_forward", "matmul_t_backward"):
        assert kernel in text, kernel


@pytest.mark.parametrize("norm, activation, tied", COMBOS, ids=IDS)
def test_to_torch_logits_equal_fastchar(norm, activation, tied):
    torch = need_torch()
    import fastchar

    model = sharp(Model(config(norm, activation, tied, position="learned"), backend="numpy", seed=4))
    x, _ = batch(model.cfg, 2, 3)
    model.forward(x)
    module = fastchar.to_torch(model)
    assert isinstance(module, torch.nn.Module) and not module.training
    assert sum(p.numel() for p in module.parameters()) == model.num_params()
    with torch.no_grad():
        logits, _ = module(torch.from_numpy(x))
    np.testing.assert_allclose(logits.numpy(), model.logits, rtol=1e-4, atol=1e-5)
    rope = sharp(Model(config(norm, activation, tied, position="rope"), backend="numpy", seed=4, dtype=np.float64))
    rope.forward(x)
    with torch.no_grad():
        logits, _ = fastchar.to_torch(rope)(torch.from_numpy(x))
    assert logits.dtype == torch.float64
    np.testing.assert_allclose(logits.numpy(), rope.logits, rtol=1e-10, atol=1e-12)


# -- the plan, visible and timed --------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["numpy", *compiled_backends()])
def test_plan_describes_and_times_every_call(backend_name):
    """describe() has one line per call, naming the function the plan really calls; timed() wraps
    those very callables, so every call of a step is counted and the results do not change."""
    cfg = config("layernorm", "gelu", True)
    model = sharp(Model(cfg, backend=backend_name, seed=0))
    x, y = batch(cfg, 2, 0)
    plan = model.plan(2)
    calls = [*plan.forward, *plan.loss, *plan.backward]
    lines = plan.describe()
    assert len(lines) == len(calls) == len(plan.steps)
    for (fn, _), step, line in zip(calls, plan.steps, lines, strict=True):
        kernel = step.kernel.removesuffix(OVERWRITE)  # a first writer of its input gradients binds the = variant
        assert fn is step.fn and kernel in (step.op.kind + "_forward", step.op.kind + "_backward")
        assert step.op.kind in line and step.why in line
    loss = model.forward(x, y)
    model.backward()
    grads = model.grads.flat.copy()
    spent: dict[str, float] = {}
    plan.timed(spent)
    assert model.forward(x, y) == loss
    model.backward()
    np.testing.assert_array_equal(model.grads.flat, grads)
    assert set(spent) == {s.kernel for s in plan.steps} and all(v > 0 for v in spent.values())
    named = {k.removesuffix(OVERWRITE) for k in spent}
    assert {"layernorm_forward", "gelu_backward", "matmul_t_forward", "matmul_t_backward"} <= named


def test_tied_head_bf16_products_match_the_bf16_reference():
    """precision bf16 rounds the tied head's products too: Cython's AVX512_BF16 products (matmul and
    matmul_t) against the numpy bf16 reference, as tests/test_precision.py bounds the untied model."""
    if "cython" not in compiled_backends():
        pytest.skip("the bf16 products are the Cython backend's")
    cfg = config("layernorm", "gelu", True)
    try:
        fast = sharp(Model(cfg, backend="cython", seed=1, precision="bf16"))
    except ConfigError:
        pytest.skip("this CPU has no AVX512_BF16")
    ref = sharp(Model(cfg, backend="numpy", seed=1, precision="bf16"))
    fp32 = sharp(Model(cfg, backend="numpy", seed=1))
    x, y = batch(cfg, 3, 2)
    losses = [m.forward(x, y) for m in (fast, ref, fp32)]
    for m in (fast, ref, fp32):
        m.backward()
    assert abs(losses[0] - losses[1]) < 1e-3 and losses[1] != losses[2], losses
    rel = float(np.max(np.abs(fast.grads["wte"] - ref.grads["wte"]))) / float(np.max(np.abs(ref.grads["wte"])))
    assert rel < 1e-2, f"wte gradient differs from the bf16 reference by {rel:.3g} of its largest entry"
    assert not np.array_equal(ref.grads["wte"], fp32.grads["wte"]), "the reference rounded the tied products"

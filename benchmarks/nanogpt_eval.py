"""Validation loss of a nanoGPT checkpoint and a fastchar run on the same text, for docs/nanogpt.md.

    python -m benchmarks.nanogpt_eval --nanogpt DIR --text FILE [--nanogpt-ckpt FILE.pt ...] [--run RUN ...]

Both projects split a text the same way (the first 90 % trains, the last 10 % validates; the
characters sorted by code point are the vocabulary), but each estimates its validation loss on its
own random windows. This evaluates every model on the same windows: the validation split cut into
consecutive, non-overlapping windows of the context length (all of it, not a sample), mean
cross-entropy per character in nats.

- a nanoGPT checkpoint (as benchmarks/nanogpt_train.py writes it) runs in nanoGPT's own `GPT`
  (DIR/model.py, imported from the checkout; nothing of it is copied here);
- a fastchar run runs in fastchar (its latest checkpoint, --backend), and, as a check that the two
  networks are the same function, its weights are also loaded into nanoGPT's `GPT` (matrices
  transposed: fastchar stores [in, out], nn.Linear [out, in]) and evaluated there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from fastchar.data import VAL_FRACTION


def val_windows(text: str, chars: list[str], T: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y (N, T) int64: the last VAL_FRACTION of text in consecutive windows, y one character on."""
    stoi = {c: i for i, c in enumerate(chars)}
    val = text[int(len(text) * (1 - VAL_FRACTION)) :]
    ids = np.array([stoi[c] for c in val], dtype=np.int64)
    n = (len(ids) - 1) // T
    x = ids[: n * T].reshape(n, T)
    y = ids[1 : n * T + 1].reshape(n, T)
    return x, y


def nanogpt_module(nanogpt: Path):
    sys.path.insert(0, str(nanogpt))
    import model as nanogpt_model  # DIR/model.py of the nanoGPT checkout

    return nanogpt_model


def torch_loss(gpt, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """Mean loss of a torch module returning (logits, loss) over all windows, in batches."""
    import torch

    gpt.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb, yb = torch.from_numpy(x[i : i + batch]), torch.from_numpy(y[i : i + batch])
            _, loss = gpt(xb, yb)
            total += float(loss) * len(xb)
    return total / len(x)


def fastchar_into_nanogpt(mod, weights: dict[str, np.ndarray], cfg) -> object:
    """nanoGPT's GPT (bias=False, tied) holding a fastchar model's weights (layernorm, gelu, tied)."""
    import torch

    options = (cfg.norm, cfg.activation, cfg.tie_embeddings, cfg.position, cfg.mlp_hidden)
    if options != ("layernorm", "gelu", True, "learned", 4 * cfg.d_model):
        raise SystemExit(
            "error: only a fastchar model with --norm layernorm --activation gelu --tie-embeddings, learned "
            "positions and an MLP of 4 * d_model is nanoGPT's GPT (hint: evaluate the others with fastchar alone)"
        )
    conf = mod.GPTConfig(block_size=cfg.ctx, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                         n_embd=cfg.d_model, dropout=0.0, bias=False)  # fmt: skip
    gpt = mod.GPT(conf)
    sd = {"transformer.wte.weight": weights["wte"], "lm_head.weight": weights["wte"],
          "transformer.wpe.weight": weights["wpe"], "transformer.ln_f.weight": weights["ln_f.weight"]}  # fmt: skip
    for i in range(cfg.n_layer):
        s, h = f"blocks.{i}.", f"transformer.h.{i}."
        sd[h + "ln_1.weight"] = weights[s + "ln1.weight"]
        sd[h + "ln_2.weight"] = weights[s + "ln2.weight"]
        sd[h + "attn.c_attn.weight"] = weights[s + "attn.qkv"].T
        sd[h + "attn.c_proj.weight"] = weights[s + "attn.proj"].T
        sd[h + "mlp.c_fc.weight"] = weights[s + "mlp.fc"].T
        sd[h + "mlp.c_proj.weight"] = weights[s + "mlp.proj"].T
    own = gpt.state_dict()
    extra = sorted(set(own) ^ set(sd))
    if extra:
        raise SystemExit(f"error: nanoGPT's GPT and the mapping differ in {extra} (hint: a newer nanoGPT?)")
    gpt.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sd.items()})
    return gpt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nanogpt_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="the nanoGPT checkout (for its model.py)")
    p.add_argument("--text", type=Path, required=True, help="the training text both trained on")
    p.add_argument("--nanogpt-ckpt", type=Path, nargs="*", default=[], help="files from benchmarks/nanogpt_train.py")
    p.add_argument("--run", type=Path, nargs="*", default=[], help="fastchar run folders or checkpoints")
    p.add_argument("--which", default="latest", help="a run folder's checkpoint: latest (default) or best")
    p.add_argument("--backend", default="auto", help="fastchar backend for its own evaluation")
    p.add_argument("--batch", type=int, default=32, help="windows per forward pass (default 32)")
    args = p.parse_args(argv)

    import torch

    from fastchar.model import load

    text = args.text.read_text(encoding="utf-8")
    chars = sorted(set(text))
    mod = nanogpt_module(args.nanogpt.resolve())
    result: dict = {"text": str(args.text), "val_chars": len(text) - int(len(text) * (1 - VAL_FRACTION))}
    for path in args.nanogpt_ckpt:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        gpt = mod.GPT(mod.GPTConfig(**{**ck["model_args"], "dropout": 0.0}))
        gpt.load_state_dict(ck["model"])
        x, y = val_windows(text, chars, ck["model_args"]["block_size"])
        t0 = time.perf_counter()
        loss = torch_loss(gpt, x, y, args.batch)
        result[str(path)] = {"val_loss": loss, "windows": len(x), "steps": ck["steps"], "seconds": ck["seconds"],
                             "eval_s": time.perf_counter() - t0}  # fmt: skip
        print(f"{path}: nanoGPT model, val loss {loss:.4f} on {len(x)} windows ({ck['steps']} steps)")
    for path in args.run:
        model = load(path, backend=args.backend, which=args.which).eval()
        if model.run.tokenizer is not None and list(model.run.tokenizer.chars) != chars:
            raise SystemExit(f"error: {path} was trained on another vocabulary than {args.text}")
        cfg = model.cfg
        x, y = val_windows(text, chars, cfg.ctx)
        total = 0.0
        for i in range(0, len(x), args.batch):
            total += model.forward(x[i : i + args.batch], y[i : i + args.batch]) * len(x[i : i + args.batch])
        own = total / len(x)
        weights = {name: np.array(model.params[name]) for name in model.params.keys()}
        cross = torch_loss(fastchar_into_nanogpt(mod, weights, cfg), x, y, args.batch)
        state = model.train_state or {}
        result[str(path)] = {"val_loss": own, "val_loss_in_nanogpt_gpt": cross, "windows": len(x),
                             "steps": state.get("step"), "seconds": state.get("elapsed")}  # fmt: skip
        print(f"{path}: fastchar ({model.backend}) val loss {own:.4f}, the same weights in nanoGPT's GPT "
              f"{cross:.4f}, on {len(x)} windows ({state.get('step')} steps)")  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

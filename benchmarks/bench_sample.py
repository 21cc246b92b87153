"""Sampling throughput: one stream, and N = 1, 8, 64 streams made together, beside PyTorch eager.

fastchar: `generate` on the model's backend (compiled loops: cython batches the streams in one decode
step each; numba runs them one after another), temperature 0.8, optionally top-p. PyTorch: eager,
the same network (fastchar/torch_model.py) with a KV cache refilled like fastchar's, batch 1 and 64,
temperature only, in a child process (its OpenMP runtime and Numba's do not mix). chars/s counts
every stream's new characters. Weights: a checkpoint (--checkpoint; a trained model's peaked
distributions are what top-p sees in use) or the untrained base model.

    python -m benchmarks.bench_sample [--checkpoint runs/base/best] [--backend cython] [--threads 1]
                                      [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import isolated, median_time
from fastchar import Model, ModelConfig, generate, load, set_threads
from fastchar.tokenizer import CharTokenizer

PROMPT = "ROMEO:"


def _model(checkpoint: str | None, backend: str, precision: str = "fp32") -> tuple[Model, CharTokenizer]:
    if checkpoint:
        model = load(checkpoint, backend=backend, precision=precision)
        return model, model.tokenizer
    tok = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    return Model(ModelConfig(vocab_size=tok.vocab_size), backend=backend, seed=0, precision=precision), tok


def time_fastchar(model: Model, tok: CharTokenizer, streams: int, n: int, top_p: float | None, repeats: int) -> float:
    """Aggregate chars/s of `streams` streams of n characters each (streams = 0: the single-prompt API)."""
    kw = {} if streams == 0 else {"num_samples": streams}
    run = lambda: generate(model, tok, PROMPT, n, top_p=top_p, seed=0, **kw)  # noqa: E731
    run()  # warm-up: compile, caches, thread pool
    return max(streams, 1) * n / median_time(run, repeats, warmup=0)


def time_torch(cfg: ModelConfig, tokens: list[int], batch: int, n: int, repeats: int, threads: int) -> float:
    import torch

    from fastchar.torch_model import TorchGPT

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = TorchGPT(cfg)
    model.load_from(Model(cfg, backend="numpy", seed=0).params)
    idx = torch.tensor([tokens])
    model.generate_cache(idx, 10, batch=batch)
    return batch * n / median_time(lambda: model.generate_cache(idx, n, batch=batch), repeats, warmup=0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the untrained base model)")
    p.add_argument("--backend", default="cython")
    p.add_argument("--threads", type=int, default=1, help="threads (default 1: faster for one stream here)")
    p.add_argument("--chars", type=int, default=20000, help="characters per stream for one stream (default 20000)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="fastchar's decode products, one table each (bf16 needs AVX512_BF16)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny run (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.chars, args.repeats = 200, 1
    set_threads(args.threads)
    res: dict = {"backend": args.backend, "threads": args.threads, "checkpoint": args.checkpoint, "chars/s": {}}
    rows = [("one stream, 500 chars from ROMEO: (Python API)", 0, 500)]
    rows += [("one stream", 0, args.chars)]
    rows += [(f"N = {n} streams, aggregate", n, max(args.chars // n, 200)) for n in (1, 8, 64)]
    print(f"# Sampling, {args.backend}, {args.threads} thread(s); chars/s\n")
    print(f"| {'run':48} | precision | {'temperature 0.8':>16} | {'top-p 0.9':>12} |")
    for precision in args.precision:
        model, tok = _model(args.checkpoint, args.backend, precision)
        for name, streams, n in rows:
            a = time_fastchar(model, tok, streams, n, None, args.repeats)
            b = time_fastchar(model, tok, streams, n, 0.9, args.repeats)
            res["chars/s"][name if precision == "fp32" else f"{name}, bf16"] = {"temperature": a, "top_p_0.9": b}
            print(f"| {name:48} | {precision:9} | {a:16,.0f} | {b:12,.0f} |")
    if not args.no_torch:
        tokens = [int(t) for t in tok.encode(PROMPT)]
        for batch in (1, 64):
            n = max(200, (args.chars // 10) // batch) if not args.quick else 50
            cps = isolated(time_torch, model.cfg, tokens, batch, n, args.repeats, args.threads)
            name = f"PyTorch eager + KV cache, batch {batch}"
            res["chars/s"][name] = {"temperature": cps}
            print(f"| {name:48} | fp32      | {cps:16,.0f} | {'':>12} |")
    res["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print("\n" + json.dumps(res))
    return res


if __name__ == "__main__":
    main()

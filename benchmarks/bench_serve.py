"""`fastchar serve` under load: N concurrent streaming clients on loopback, beside `generate` with
num_samples = N in one process.

The server runs in its own process (`python -m fastchar serve CHECKPOINT --port 0 --max-streams N`);
the clients are one asyncio process (httpx), each asking for --chars characters with
"stream": true, top-p 0.9, temperature 0.8 and its own seed, all at once. Reported: characters/s in
all (every client's characters over the time from the first request to the last [DONE]), the
first-character latency (request sent to the first event with text, p50 and p99), and the same
model's `generate(..., num_samples=N)` in this process (long run minus short run, as
benchmarks/bench_sample.py) with the server's share of it. Before timing, two clients' texts are
checked against `generate` for their seeds. Bounded: at most 256 clients, --timeout seconds.

    python -m benchmarks.bench_serve [--checkpoint runs/base/best] [--clients 64] [--chars 2000]
                                     [--precision fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.bench_sample import PROMPT, _model, time_fastchar
from benchmarks.common import append_record, cpu_model
from fastchar import generate, set_threads
from fastchar.checkpoint import save
from fastchar.threads import cores

ROOT = Path(__file__).resolve().parent.parent
MAX_CLIENTS = 256


def start_server(checkpoint: str, clients: int, precision: str, threads: int) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "fastchar",
        "serve",
        checkpoint,
        "--port",
        "0",
        "--max-streams",
        str(clients),
        "--precision",
        precision,
        "--threads",
        str(threads),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stderr:
        if m := re.search(r"on (http://[^/]+)/", line):
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, m.group(1)
    raise RuntimeError(f"the server did not start (status {proc.wait()})")


async def one_client(client, base: str, seed: int, chars: int) -> dict:
    body = {"prompt": PROMPT, "max_tokens": chars, "temperature": 0.8, "top_p": 0.9, "seed": seed, "stream": True}
    sent = time.perf_counter()
    first = None
    text = []
    async with client.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter()
            text.append(piece)
    return {"sent": sent, "first": first, "end": time.perf_counter(), "text": "".join(text)}


async def all_clients(base: str, clients: int, chars: int, timeout: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        jobs = [one_client(client, base, seed, chars) for seed in range(clients)]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> dict:
    import httpx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the untrained rope base model)")
    p.add_argument("--clients", type=int, default=64, help=f"concurrent streaming clients, at most {MAX_CLIENTS}")
    p.add_argument("--chars", type=int, default=2000, help="characters per client (default 2000)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="the server's threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before the run gives up (default 300)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the in-process reference")
    p.add_argument("--quick", action="store_true", help="tiny run (tests)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if args.quick:
        args.clients, args.chars, args.repeats = min(args.clients, 8), 100, 1
    threads = set_threads(args.threads if args.threads is not None else cores())
    model, tok = _model(args.checkpoint, "cython", args.precision, "rope")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "base-rope")
            save(model, checkpoint, tok)
        reference = time_fastchar(model, tok, args.clients, args.chars, 0.9, args.repeats)
        proc, base = start_server(checkpoint, args.clients, args.precision, threads)
        try:
            asyncio.run(all_clients(base, 2, 50, args.timeout))  # warm-up, and a check of the texts
            check = asyncio.run(all_clients(base, 2, 300, args.timeout))
            want = generate(model, tok, PROMPT, 300, 0.8, None, 0.9, seed=0)[len(PROMPT) :]
            if check[0]["text"] != want:
                raise RuntimeError("the server's text for seed 0 differs from fastchar.generate's")
            before = httpx.get(f"{base}/health").json()
            runs = asyncio.run(all_clients(base, args.clients, args.chars, args.timeout))
            after = httpx.get(f"{base}/health").json()
        finally:
            proc.terminate()
            proc.wait(30)
    total = sum(len(r["text"]) for r in runs)
    seconds = max(r["end"] for r in runs) - min(r["sent"] for r in runs)
    latency = [r["first"] - r["sent"] for r in runs if r["first"] is not None]
    steps = after["steps"] - before["steps"]
    decode = {
        "steps": steps,
        "rows_per_step": (after["characters"] - before["characters"]) / max(steps, 1),
        "step_seconds": after["step_seconds"] - before["step_seconds"],
        "loop_seconds": after["loop_seconds"] - before["loop_seconds"],
    }
    res = {
        "cpu": cpu_model(),
        "threads": threads,
        "clients": args.clients,
        "chars_per_client": args.chars,
        "precision": args.precision,
        "checkpoint": args.checkpoint,
        "chars/s": total / seconds,
        "first_char_ms": {
            "p50": 1e3 * statistics.median(latency),
            "p99": 1e3 * percentile(latency, 99),
            "max": 1e3 * max(latency),
        },
        "generate_num_samples_chars/s": reference,
        "share_of_generate": total / seconds / reference,
        "decode_thread": decode,
    }
    print(
        f"# fastchar serve, {args.clients} streaming clients x {args.chars} characters, top-p 0.9, {args.precision}, "
        f"{threads} thread(s), {cpu_model()}"
    )
    print(
        f"serve: {res['chars/s']:,.0f} characters/s in all ({total:,} in {seconds:.2f} s); first character "
        f"p50 {res['first_char_ms']['p50']:.1f} ms, p99 {res['first_char_ms']['p99']:.1f} ms"
    )
    print(
        f"generate(num_samples={args.clients}) in one process: {reference:,.0f} characters/s (long minus short run); "
        f"serve reaches {res['share_of_generate']:.1%} of it"
    )
    print(
        f"decode thread: {steps:,} steps of {decode['rows_per_step']:.1f} rows on average; "
        f"{decode['step_seconds']:.2f} s in the batched step, {decode['loop_seconds']:.2f} s in its Python around "
        f"it, of {seconds:.2f} s"
    )
    if not args.quick:
        append_record("bench_serve", res)
    return res


if __name__ == "__main__":
    main()

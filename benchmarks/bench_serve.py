"""`fastchar serve` under load: N concurrent streaming clients on loopback, beside `generate` with
num_samples = N in one process.

The server runs in its own process (`python -m fastchar serve CHECKPOINT --port 0 --max-streams N`);
the clients are one asyncio process (httpx), each asking for --chars characters with
"stream": true, top-p 0.9, temperature 0.8 and its own seed, all at once. Reported: characters/s in
all (every client's characters over the time from the first request to the last [DONE]), the
first-character latency (request sent to the first event with text, p50 and p99), and the same
model's `generate(..., num_samples=N)` in this process (long run minus short run, as
benchmarks/bench_sample.py) with the server's share of it: --repeats rounds, each `generate` then the
clients right after it, and the median of the rounds' shares (the load of a shared machine drifts
between rounds more than within one). The share is given twice: the clients' whole run (connections,
the staggered start and end included) against generate's long minus short run, and like for like,
the clients' long run minus a short one (--chars / 4 each) against it. Also reported: the CPU time
per character of the server process (from /proc on Linux), of its event loop thread (HTTP, JSON, the
events), of the decode thread's Python around the batched step, and of the clients. Before timing,
two clients' texts are checked against `generate` for their seeds. Bounded: at most 256 clients, --timeout seconds.

    python -m benchmarks.bench_serve [--checkpoint runs/base/best] [--clients 64] [--chars 2000]
                                     [--precision fp32] [--repeats 3]
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

from benchmarks.bench_sample import PROMPT, _model
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


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process pid, all its threads (Linux /proc; None elsewhere)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def generate_rate(model, tok, streams: int, n: int) -> float:
    """`generate(num_samples=streams)`'s characters/s in all: the long run (n characters per stream)
    minus the short run (n/4), as benchmarks/bench_sample.py measures it."""
    short = max(n // 4, 1)
    seconds = []
    for m in (n, short):
        t0 = time.perf_counter()
        generate(model, tok, PROMPT, m, top_p=0.9, seed=0, num_samples=streams)
        seconds.append(time.perf_counter() - t0)
    return streams * (n - short) / max(seconds[0] - seconds[1], 1e-9)


def serve_round(base: str, pid: int, clients: int, chars: int, timeout: float) -> dict:
    """One timed run of the clients: their results, the server's /health before and after, and the
    CPU seconds of the server process and of this one (the clients) meanwhile."""
    import httpx

    before = httpx.get(f"{base}/health").json()
    server_cpu = process_cpu_seconds(pid)
    client_cpu = time.process_time()
    runs = asyncio.run(all_clients(base, clients, chars, timeout))
    client_cpu = time.process_time() - client_cpu
    after = httpx.get(f"{base}/health").json()
    if server_cpu is not None:
        server_cpu = process_cpu_seconds(pid) - server_cpu
    total = sum(len(r["text"]) for r in runs)
    seconds = max(r["end"] for r in runs) - min(r["sent"] for r in runs)
    delta = {k: after[k] - before[k] for k in after if isinstance(after[k], int | float) and k in before}
    return {
        "chars": total,
        "seconds": seconds,
        "chars/s": total / seconds,
        "latency": [r["first"] - r["sent"] for r in runs if r["first"] is not None],
        "health": delta,
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the untrained rope base model)")
    p.add_argument("--clients", type=int, default=64, help=f"concurrent streaming clients, at most {MAX_CLIENTS}")
    p.add_argument("--chars", type=int, default=2000, help="characters per client (default 2000)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None, help="the server's threads (default: all cores)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before the run gives up (default 300)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds, each the reference then the clients, one after the other (default 3): the share is "
        "the median of the rounds' shares, so that a machine whose load drifts compares like with like",
    )
    p.add_argument("--quick", action="store_true", help="tiny run (tests)")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be in [1, {MAX_CLIENTS}]")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.quick:
        args.clients, args.chars, args.repeats = min(args.clients, 8), 100, 1
    threads = set_threads(args.threads if args.threads is not None else cores())
    model, tok = _model(args.checkpoint, "cython", args.precision, "rope")
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = str(Path(tmp) / "base-rope")
            save(model, checkpoint, tok)
        generate_rate(model, tok, args.clients, max(args.chars // 4, 4))  # warm-up: compile, caches, threads
        proc, base = start_server(checkpoint, args.clients, args.precision, threads)
        try:
            asyncio.run(all_clients(base, 2, 50, args.timeout))  # warm-up, and a check of the texts
            check = asyncio.run(all_clients(base, 2, 300, args.timeout))
            want = generate(model, tok, PROMPT, 300, 0.8, None, 0.9, seed=0)[len(PROMPT) :]
            if check[0]["text"] != want:
                raise RuntimeError("the server's text for seed 0 differs from fastchar.generate's")
            short = max(args.chars // 4, 1)
            for _ in range(args.repeats):
                reference = generate_rate(model, tok, args.clients, args.chars)
                run = serve_round(base, proc.pid, args.clients, args.chars, args.timeout)
                brief = serve_round(base, proc.pid, args.clients, short, args.timeout)
                extra = args.clients * (args.chars - short) / max(run["seconds"] - brief["seconds"], 1e-9)
                rounds.append({**run, "ref": reference, "long_minus_short": extra})
        finally:
            proc.terminate()
            proc.wait(30)
    med = statistics.median
    total = sum(r["chars"] for r in rounds)
    latency = [x for r in rounds for x in r["latency"]]
    health = {k: sum(r["health"].get(k, 0) for r in rounds) for k in rounds[0]["health"]}
    steps = health.get("steps", 0)
    decode = {
        "steps": steps,
        "chars_per_call": health.get("characters", 0) / max(steps, 1),
        "step_seconds": health.get("step_seconds", 0.0),
        "loop_seconds": health.get("loop_seconds", 0.0),
    }
    server_cpu = None if any(r["server_cpu"] is None for r in rounds) else sum(r["server_cpu"] for r in rounds)
    per_char = {  # CPU microseconds per character
        "server": None if server_cpu is None else 1e6 * server_cpu / total,
        "event_loop": 1e6 * health.get("event_loop_cpu_seconds", 0.0) / total,
        "decode_thread_python": 1e6 * health.get("python_cpu_seconds", 0.0) / total,
        "decode_thread": 1e6 * health.get("decode_cpu_seconds", 0.0) / total,
        "clients": 1e6 * sum(r["client_cpu"] for r in rounds) / total,
    }
    from fastchar import isa

    res = {
        "cpu": cpu_model(),
        "isa": isa.path(),
        "threads": threads,
        "clients": args.clients,
        "chars_per_client": args.chars,
        "precision": args.precision,
        "checkpoint": args.checkpoint,
        "rounds": [
            {
                "serve_chars/s": r["chars/s"],
                "serve_long_minus_short": r["long_minus_short"],
                "generate_chars/s": r["ref"],
            }
            for r in rounds
        ],
        "chars/s": med([r["chars/s"] for r in rounds]),
        "first_char_ms": {
            "p50": 1e3 * statistics.median(latency),
            "p99": 1e3 * percentile(latency, 99),
            "max": 1e3 * max(latency),
        },
        "generate_num_samples_chars/s": med([r["ref"] for r in rounds]),
        "share_of_generate": med([r["chars/s"] / r["ref"] for r in rounds]),
        "long_minus_short_chars/s": med([r["long_minus_short"] for r in rounds]),
        "long_minus_short_share": med([r["long_minus_short"] / r["ref"] for r in rounds]),
        "decode_thread": decode,
        "cpu_us_per_char": per_char,
    }
    print(
        f"# fastchar serve, {args.clients} streaming clients x {args.chars} characters, top-p 0.9, {args.precision}, "
        f"{threads} thread(s), {cpu_model()}, kernels on {res['isa']}; {len(rounds)} round(s) of "
        f"generate(num_samples={args.clients}) "
        "then the clients"
    )
    for i, r in enumerate(rounds):
        print(
            f"round {i + 1}: serve {r['chars/s']:,.0f} characters/s in all ({r['chars']:,} in {r['seconds']:.2f} s), "
            f"generate {r['ref']:,.0f} (long minus short run): {r['chars/s'] / r['ref']:.1%}; serve long minus short "
            f"run {r['long_minus_short']:,.0f}: {r['long_minus_short'] / r['ref']:.1%}"
        )
    print(
        f"serve: {res['chars/s']:,.0f} characters/s in all (median); first character p50 "
        f"{res['first_char_ms']['p50']:.1f} ms, p99 {res['first_char_ms']['p99']:.1f} ms ({len(latency)} clients)"
    )
    print(
        f"generate(num_samples={args.clients}) in one process: {res['generate_num_samples_chars/s']:,.0f} "
        f"characters/s (median); serve reaches {res['share_of_generate']:.1%} of it (median of the rounds), "
        f"{res['long_minus_short_share']:.1%} measured as generate is (the clients' long run minus their short run)"
    )
    print(
        f"decode thread: {steps:,} calls of the batched loop, {decode['chars_per_call']:.0f} characters each on "
        f"average; {decode['step_seconds']:.2f} s in the batched step, {decode['loop_seconds']:.2f} s in its Python "
        f"around it, of {sum(r['seconds'] for r in rounds):.2f} s"
    )
    server = "?" if per_char["server"] is None else f"{per_char['server']:.1f}"
    print(
        f"CPU per character: server process {server} us, of which its event loop {per_char['event_loop']:.2f} us "
        f"and the decode thread's Python {per_char['decode_thread_python']:.2f} us (the server's own overhead: "
        f"{per_char['event_loop'] + per_char['decode_thread_python']:.2f} us); the clients {per_char['clients']:.2f} us"
    )
    if not args.quick:
        append_record("bench_serve", res)
    return res


if __name__ == "__main__":
    main()

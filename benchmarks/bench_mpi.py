"""Data parallel on one machine: 1 rank x 2 threads against 2 ranks x 1 thread, and the Allreduce.

    python -m benchmarks.bench_mpi                  # base model, global batch 24 and 64
    python -m benchmarks.bench_mpi --tcp            # ... and 2 ranks over TCP on 127.0.0.1 (MPICH)
    python -m benchmarks.bench_mpi --quick          # a few steps: proves it runs

Each configuration trains the base model on Tiny Shakespeare through the Trainer's own
step (the global batch drawn once, split over the ranks, one in-place Allreduce of the gradient
buffer, clip, AdamW) in a fresh process group: `python -m benchmarks.bench_mpi --worker ...` alone,
or under `mpiexec -n 2`. tokens/s = global batch * T / median step time. It also times the bare
in-place Allreduce of the gradient buffer (ranks lined up by a barrier first), and the Allreduce
inside a step (which includes waiting for the slower rank). Prints markdown tables and a ring
Allreduce model for more ranks; appends one JSON line to benchmarks/results/bench_mpi.jsonl.
Needs mpi4py and mpiexec (pip install -e ".[mpi]").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETWORKS = {"10 GbE": 1.25e9, "25 GbE": 3.125e9, "100 Gb/s": 12.5e9}  # bytes/s, ideal
NETWORK_LATENCY = 20e-6  # seconds per message on a TCP network (order of magnitude)
# MPICH: libfabric's TCP provider on the loopback interface, shared memory off (the multi-host path).
LOOPBACK_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo", "MPIR_CVAR_NOLOCAL": "1"}
LOOPBACK_ARGS = ["-hosts", "127.0.0.1,127.0.0.1", "-iface", "lo"]


def worker(args: argparse.Namespace) -> None:
    """One rank: train the base model for warmup + steps steps; rank 0 prints one JSON line."""
    import numpy as np

    from fastchar import Model, ModelConfig, TextDataset, TrainConfig, Trainer
    from fastchar.data import find_corpus
    from fastchar.distributed import world
    from fastchar.threads import set_threads

    set_threads(args.threads)
    dist = world()
    data = TextDataset(find_corpus(None))
    cfg = TrainConfig(batch=args.batch // dist.size, steps=10**6, eval_every=10**6, out="/tmp/fastchar-bench-mpi")
    model = Model(ModelConfig(vocab_size=data.vocab_size), backend=args.backend, seed=0)
    trainer = Trainer(model, data, cfg, log=lambda line: None, progress=False)
    times, comm = [], []
    for i in range(args.warmup + args.steps):
        before = dist.comm_seconds
        t0 = time.perf_counter()
        trainer.train_step(1e-3)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            comm.append(dist.comm_seconds - before)
    bare = []
    if dist.size > 1:
        buf = np.ones_like(model.grads.flat)
        for i in range(args.steps + 5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.sum_(buf)
            if i >= 5:
                bare.append(time.perf_counter() - t0)
    step = statistics.median(times)
    result = {
        "ranks": dist.size,
        "threads": args.threads,
        "global_batch": args.batch,
        "step_ms": 1e3 * step,
        "tok_per_s": args.batch * model.cfg.ctx / step,
        "allreduce_in_step_ms": 1e3 * statistics.median(comm),
        "allreduce_bare_ms": 1e3 * statistics.median(bare) if bare else None,
        "gradient_bytes": int(model.grads.flat.nbytes),
        "backend": model.backend,
    }
    if dist.is_root:
        print("RESULT " + json.dumps(result), flush=True)


def launch(ranks: int, threads: int, batch: int, args: argparse.Namespace, tcp: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_mpi", "--worker", "--threads", str(threads), "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--backend", args.backend]  # fmt: skip
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec") or "mpiexec"
        cmd = [mpiexec, "-n", str(ranks), *(LOOPBACK_ARGS if tcp else []), *cmd]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, **(LOOPBACK_ENV if tcp else {})}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    return {**json.loads(lines[0][len("RESULT ") :]), "link": "tcp loopback" if tcp else "shared memory"}


def ring_model(bytes_: int, step_s: float, measured_2: float) -> list[list[object]]:
    """Predicted Allreduce time and efficiency t_compute / (t_compute + t_allreduce) for N ranks.

    A ring Allreduce sends and receives 2 (N - 1) / N of the buffer per rank, in 2 (N - 1) messages;
    there is no overlap with compute in fastchar (one Allreduce after the backward pass).
    """
    rows = []
    for n in (2, 4, 8, 16, 64):
        volume = 2 * (n - 1) / n * bytes_
        row: list[object] = [n, f"{volume / 2**20:.2f}"]
        for bw in NETWORKS.values():
            t = volume / bw + 2 * (n - 1) * NETWORK_LATENCY
            row.append(f"{1e3 * t:.2f} ms ({100 * step_s / (step_s + t):.0f} %)")
        rows.append(row)
    shm_bw = bytes_ / measured_2  # two ranks move the whole buffer once each way
    efficiency = 100 * step_s / (step_s + measured_2)
    cell = f"{1e3 * measured_2:.2f} ms ({efficiency:.0f} %), {shm_bw / 1e9:.1f} GB/s effective"
    rows.append(["2 (measured, one host)", f"{bytes_ / 2**20:.2f}", cell, "", ""])
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[24, 64], help="global batches (default 24 64)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tcp", action="store_true", help="also 2 ranks over TCP on 127.0.0.1 (MPICH's mpiexec)")
    p.add_argument("--quick", action="store_true", help="a few steps; records nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=24, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.steps, args.warmup, args.batches = 3, 1, [8]
    from benchmarks.common import append_record, machine, table

    results = []
    for batch in args.batches:
        for ranks, threads, tcp in ((1, 2, False), (2, 1, False), (1, 1, False), (2, 1, True)):
            if tcp and not args.tcp:
                continue
            results.append(launch(ranks, threads, batch, args, tcp))
            r = results[-1]
            print(f"B={batch} {ranks} rank(s) x {threads} thread(s), {r['link']}: {r['tok_per_s']:,.0f} tok/s",
                  flush=True)  # fmt: skip
    header = [
        "global batch",
        "ranks x threads",
        "link",
        "step (ms)",
        "tok/s",
        "Allreduce in step (ms)",
        "bare Allreduce (ms)",
    ]
    rows = [[r["global_batch"], f"{r['ranks']} x {r['threads']}", r["link"] if r["ranks"] > 1 else "-",
             f"{r['step_ms']:.1f}", r["tok_per_s"],
             f"{r['allreduce_in_step_ms']:.2f}" if r["ranks"] > 1 else "-",
             f"{r['allreduce_bare_ms']:.2f}" if r["allreduce_bare_ms"] else "-"] for r in results]  # fmt: skip
    print()
    print(table(header, rows))
    two = [r for r in results if r["ranks"] == 2 and r["link"] == "shared memory"]
    if two:
        r = max(two, key=lambda r: r["global_batch"])
        one_thread = next(x for x in results if x["ranks"] == 1 and x["threads"] == 1 and x["global_batch"] ==
                          r["global_batch"])  # fmt: skip
        compute = one_thread["step_ms"] / 1e3 / 2  # one rank's share of the global batch on one core
        print(f"\nRing Allreduce model: {r['gradient_bytes']:,} bytes of gradients per step; per-rank compute "
              f"{1e3 * compute:.1f} ms (global batch {r['global_batch']} on 1 thread, halved); cells: Allreduce "
              f"time (efficiency) with N ranks each holding that share:")  # fmt: skip
        print(table(["ranks", "MiB sent per rank", *NETWORKS], ring_model(r["gradient_bytes"], compute,
                                                                          r["allreduce_bare_ms"] / 1e3)))  # fmt: skip
    load = os.getloadavg()
    print(f"\nload average during the run (1, 5, 15 min): {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    record = {"machine": machine(2), "loadavg": load, "steps": args.steps, "results": results}
    if not args.quick:
        print(f"\nrecorded in {append_record('bench_mpi', record)}")
    return record


if __name__ == "__main__":
    main()

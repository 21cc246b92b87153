"""kill -9 a training run while it saves, again and again; check what it leaves behind.

    python scripts/kill_loop.py --kills 25 [--workdir DIR] [--backend numpy]

Each round starts `fastchar train --resume RUN/latest` (the first round a fresh run that saves
once and exits), waits until a save has begun (a `.NAME.tmp-PID` folder appears), waits a random
0-200 ms more and sends SIGKILL. After each kill it loads `best` and `latest` (both must load),
and after the next start it counts temporaries of dead processes (there must be none). At the end
one clean run finishes and the folder must hold no temporary and no `.old` twin. Prints one
progress line per kill and a JSON summary as its last line; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--d-model", "128", "--n-layer", "4", "--n-head", "8", "--ctx", "64"]  # the base model: ~10 MB per save
RECIPE = ["--batch", "2", "--eval-every", "2", "--eval-batches", "1", "--log-every", "1", "--sample-chars", "0"]
TEMP = re.compile(r"^\.(best|latest)\.tmp-(\d+)$")


def corpus(workdir: Path) -> Path:
    """Tiny Shakespeare if it is on this machine, else a generated text."""
    shared = Path(os.environ.get("FASTCHAR_DATA_DIR", ROOT / "data")) / "tinyshakespeare.txt"
    if shared.is_file():
        return shared
    path = workdir / "corpus.txt"
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "runs", "away"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(5000)))
    return path


def fastchar(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastchar", "train", *args]


def leftovers(run: Path, alive: int | None = None) -> list[str]:
    """Temporaries of processes other than `alive`, and .old twins."""
    found = []
    for p in run.iterdir():
        m = TEMP.match(p.name)
        if (m and int(m[2]) != alive) or p.name.endswith(".old"):
            found.append(p.name)
    return sorted(found)


def loadable(path: Path) -> bool:
    import warnings

    from fastchar import load

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "using latest.old": the designed recovery
            model = load(path, backend="numpy")
        return model.train_state.get("step", 0) > 0
    except Exception as exc:  # noqa: BLE001 - counted and printed, never hidden
        print(f"  load {path.name} failed: {type(exc).__name__}: {exc}", flush=True)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=25, help="kills that must land during a save (default 25)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the run folder goes (default: a temp dir)")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill delays")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fastchar-kill-"))
    run = workdir / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(args.seed)
    data = corpus(workdir)
    first = subprocess.run(
        fastchar("--data", str(data), "--out", str(run), "--steps", "1000000", "--until", "2", "--backend",
                 args.backend, *MODEL, *RECIPE),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if first.returncode != 0:
        print(first.stderr, file=sys.stderr)
        return 1
    kills = during_save = loads = loads_ok = stale_after_start = attempts = 0
    t_start = time.time()
    while during_save < args.kills and attempts < 4 * args.kills:
        attempts += 1
        cmd = fastchar("--resume", str(run / "latest"), "--backend", args.backend)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        for line in proc.stdout:  # "training ..." is printed once the lock is held and leftovers cleared
            if line.startswith("training"):
                break
        stale = [n for n in leftovers(run, alive=proc.pid) if TEMP.match(n)]
        stale_after_start += len(stale)
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            if any(TEMP.match(p.name) and p.name.endswith(f"-{proc.pid}") for p in run.iterdir()):
                break
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.2))  # past the writes, into the renames
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kills += 1
        left = leftovers(run)
        hit = bool(left)
        during_save += hit
        ok = [loadable(run / "best"), loadable(run / "latest")]
        loads += 2
        loads_ok += sum(ok)
        print(f"kill {kills}: during save {hit} {left} | best {ok[0]} latest {ok[1]} | stale at start {stale}",
              flush=True)  # fmt: skip
    # One clean run to the end: resume with --until a few steps ahead, which saves and exits.
    from fastchar import load

    step = load(run / "latest", backend="numpy").train_state["step"]
    last = subprocess.run(
        fastchar("--resume", str(run / "latest"), "--backend", args.backend, "--until", str(step + 2)),
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    after = leftovers(run)
    summary = {
        "kills": kills,
        "kills_during_save": during_save,
        "loads": loads,
        "loads_ok": loads_ok,
        "temporaries_after_start": stale_after_start,
        "leftovers_after_final_run": after,
        "final_run_status": last.returncode,
        "final_step": load(run / "latest", backend="numpy").train_state["step"],
        "seconds": round(time.time() - t_start, 1),
        "workdir": str(workdir),
    }
    good = (
        during_save >= args.kills
        and loads_ok == loads
        and stale_after_start == 0
        and not after
        and last.returncode == 0
        and loadable(run / "best")
    )
    print(json.dumps(summary))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())

"""Loss curves from run folders: `fastchar plot RUN [RUN ...] -o FILE.png` and a run's curves.png.

Reads each run's metrics.jsonl (the Trainer's records: training lines carry `loss`, evaluation lines
`train_loss` and `val_loss`, all carry `step` and wall-clock `elapsed` seconds) and draws two panels,
loss against step and against seconds, every run in its own colour. matplotlib is an optional extra
(`pip install "fastchar[plot]"`); it is driven through its Agg canvas directly, so plotting never
touches pyplot's global state or needs a display. Nothing here trains or reads checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fastchar.errors import DataError, FastcharError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
FIGSIZE = (12.0, 4.5)  # inches: two panels side by side
DPI = 100  # so a default figure is 1200 x 450 pixels
PLOT_HINT = 'pip install "fastchar[plot]" (matplotlib)'


def have_matplotlib() -> bool:
    """True if matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib() -> None:
    """Raise a FastcharError naming the extra to install when matplotlib is missing."""
    if not have_matplotlib():
        raise FastcharError("plotting needs matplotlib, which is not installed", hint=PLOT_HINT)


def metrics_path(run: str | Path) -> Path:
    """The metrics.jsonl of a run folder (or the file itself if given)."""
    run = Path(run)
    path = run if run.is_file() else run / METRICS_FILE
    if not path.is_file():
        raise DataError(
            f"{run} has no {METRICS_FILE}" if run.is_dir() else f"run folder {run} does not exist",
            hint="pass the folder a training run wrote with --out (e.g. runs/base)",
        )
    return path


MAX_LINE = 1 << 20  # a metrics.jsonl line is about 200 bytes; a longer one is read in pieces, each skipped


def read_metrics(run: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """A run's curves: {"train": [(step, seconds, loss)], "val": [...]}, each sorted by step.

    "train" is the logged training loss (one batch per log line); where a run logged none, the
    evaluation's train loss stands in. A resumed run replays steps after its last checkpoint: a later
    record for a step replaces the earlier ones from that step on. Unreadable lines (a crash while
    writing) are skipped.
    """
    curves: dict[str, list[tuple[int, float, float]]] = {"train": [], "val": [], "eval_train": []}
    path = metrics_path(run)
    try:
        with path.open("rb") as lines:  # line by line, at most MAX_LINE bytes at a time: the file can be
            for line in iter(lambda: lines.readline(MAX_LINE), b""):  # far larger than its curves
                _add_record(curves, line.decode("utf-8", errors="replace"))  # a bad byte spoils its line only
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})", hint="check its permissions") from None
    if not curves["train"]:
        curves["train"] = curves["eval_train"]
    del curves["eval_train"]
    return curves


def _add_record(curves: dict[str, list[tuple[int, float, float]]], line: str) -> None:
    """One metrics.jsonl line's points onto curves (read_metrics); unreadable lines are skipped."""
    try:
        record = json.loads(line)
        step, seconds = int(record["step"]), float(record["elapsed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError):
        return
    if not math.isfinite(seconds):
        return
    for key, curve in (("loss", "train"), ("val_loss", "val"), ("train_loss", "eval_train")):
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points = curves[curve]
            while points and points[-1][0] >= step:  # a resumed run starts again from its checkpoint
                points.pop()
            points.append((step, seconds, float(record[key])))


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Legend names: each folder's name, or the whole path where two names would clash."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs, strict=True)]


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    names: Sequence[str] | None = None,
    figsize: tuple[float, float] = FIGSIZE,
    dpi: int = DPI,
) -> Path:
    """Draw train and val loss of every run against step and wall-clock seconds into out (PNG).

    The file is written atomically (a temporary name, then a rename); its format follows its suffix.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise DataError("no run folder to plot", hint="pass one or more run folders, e.g. runs/base")
    out = Path(out)
    if out.is_dir():
        raise DataError(
            f"cannot write the image {out}: it is a folder", hint=f"pass a file name, e.g. -o {out / 'curves.png'}"
        )
    fmt = image_format(out, FigureCanvasAgg)
    names = list(names) if names is not None else run_names(runs)
    data = [read_metrics(run) for run in runs]
    for run, curves in zip(runs, data, strict=True):
        if not curves["train"] and not curves["val"]:
            raise DataError(
                f"{metrics_path(run)} holds no loss records", hint="plot a run that trained at least one evaluation"
            )
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for name, curves, colour in zip(names, data, colours, strict=True):
        for curve, style in (("train", {"lw": 0.8, "alpha": 0.45}), ("val", {"lw": 1.8, "marker": "o", "ms": 3})):
            points = curves[curve]
            if not points:
                continue
            steps, seconds, losses = zip(*points, strict=True)
            label = f"{name} {curve}"
            by_step.plot(steps, losses, color=colour, label=label, **style)
            by_time.plot(seconds, losses, color=colour, label=label, **style)
    by_step.set(xlabel="step", ylabel="loss (nats per character)", title="loss against step")
    by_time.set(xlabel="wall-clock seconds", title="loss against time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize="small", loc="upper right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp, format=fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def image_format(out: Path, canvas: type) -> str:
    """The image format out's extension names (png when it has none); a DataError for one matplotlib
    cannot write."""
    formats = canvas.get_supported_filetypes()
    fmt = out.suffix[1:].lower() or "png"
    if fmt not in formats:
        raise DataError(
            f"cannot write the image {out}: {out.suffix!r} is not an image format matplotlib writes",
            hint=f"name the file with one of {', '.join('.' + f for f in sorted(formats))} (or none: PNG)",
        )
    return fmt


def write_run_curves(run: str | Path) -> Path | None:
    """curves.png in a run folder, if matplotlib is installed; a failure is a warning, never an error."""
    if not have_matplotlib():
        return None
    run = Path(run)
    try:
        return plot_runs([run], run / CURVES_FILE)
    except Exception as exc:  # a plot must never fail the training run that made it
        print(f"warning: could not write {run / CURVES_FILE}: {exc}", file=sys.stderr)
        return None

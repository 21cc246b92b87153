"""Trainer: the training loop (the default recipe) with timing, evaluation, logs and checkpoints.

Each step draws a seeded batch, runs forward and backward over its micro-batches (grad_accum),
sums the gradients over the ranks when launched under mpiexec (see distributed.py: rank 0 alone
logs and writes), then clipping and AdamW, and times itself. Every
eval_every steps it measures train and val loss on a fixed set of batches, writes the `latest`
checkpoint and, on a new best validation loss, the `best` one. Ctrl-C, SIGTERM and SIGHUP save
`latest` and stop (the CLI exits with 128 + the signal's number); a NaN or infinite loss, or weights
that stopped being finite, stop without overwriting the last good checkpoint.

Every log and evaluation line is also a record in the run folder's metrics.jsonl (and, with
tensorboard=True, a TensorBoard scalar); a finished run draws them into curves.png when matplotlib
is installed.

The run folder is locked while a run trains in it, its stale temporaries are cleared at the start,
and a fresh run refuses to replace another run's checkpoints unless told to (`overwrite=True`); see
fastchar/runfolder.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fastchar import portable, runfolder
from fastchar.checkpoint import non_finite, save
from fastchar.config import NO_STEP_LIMIT, TrainConfig
from fastchar.data import TextDataset
from fastchar.distributed import World, facts_of_run, mark_collective, world
from fastchar.errors import ConfigError, FastcharError, TrainingDiverged
from fastchar.model import Model
from fastchar.optim import AdamW, lr_at
from fastchar.plot import write_run_curves
from fastchar.tensorboard_log import TensorBoardLog, require_tensorboardx
from fastchar.threads import StepThreads, ensure_threads

EVAL_MARGIN = 1.2  # a time budget keeps 1.2 x the longest evaluation (and save) so far for the final one
EVAL_SEED = 2**31 - 1  # evaluation batches come from their own generator, the same at every eval


STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
check_writable = runfolder.check_writable  # the probe lives with the other run-folder helpers


class Interrupted(FastcharError):
    """Training stopped by a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint."""

    def __init__(self, message: str, hint: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message, hint)
        self.signum = int(signum)


class EvalStopped(Exception):
    """A stop signal arrived during an evaluation: it ends between two batches (the run saves and stops)."""


class Killed(KeyboardInterrupt):
    """A second stop signal: stop at once, without saving."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class Trainer:
    """Trains `model` on `dataset` with the recipe `cfg`; resumes from `model.train_state` if set.

    tensorboard=True also writes the metrics as TensorBoard event files into the run folder (needs
    tensorboardX); curves=False skips drawing curves.png at the end.
    """

    def __init__(
        self,
        model: Model,
        dataset: TextDataset,
        cfg: TrainConfig,
        log: Callable[[str], None] | None = None,
        progress: bool | None = None,
        tensorboard: bool = False,
        curves: bool = True,
        overwrite: bool = False,
        dist: World | None = None,
        files: dict[str, str] | None = None,
    ) -> None:
        """overwrite: a fresh run may replace the checkpoints and metrics already in cfg.out.
        files: name -> text of files to write into the run folder once it is locked and claimed
        (the CLI's config.toml)."""
        if not isinstance(cfg, TrainConfig):
            raise ConfigError(f"cfg must be a TrainConfig, got {type(cfg).__name__}", hint="pass TrainConfig(...)")
        if tensorboard:
            require_tensorboardx()  # a missing extra is an error before any work
        if dataset.vocab_size != model.cfg.vocab_size:
            raise ConfigError(
                f"the text has {dataset.vocab_size} distinct characters but the model's vocab_size "
                f"is {model.cfg.vocab_size}",
                hint="build the model with ModelConfig(vocab_size=dataset.vocab_size)",
            )
        if model.tokenizer is not None and list(model.tokenizer.chars) != list(dataset.tokenizer.chars):
            diff = sorted(set(dataset.tokenizer.chars) ^ set(model.tokenizer.chars))
            raise ConfigError(
                f"the text's characters differ from the model's vocabulary ({len(diff)} differ: "
                f"{', '.join(repr(c) for c in diff[:10])}{' ...' if len(diff) > 10 else ''})",
                hint="train on text with the model's vocabulary: TextDataset(path, tokenizer=model.tokenizer)",
            )
        dataset.check_context(model.cfg.ctx)
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.overwrite = overwrite
        self.files = dict(files or {})
        self.data = runfolder.data_record(dataset.path, dataset.text)
        self._owns_out = False
        self._signum = 0
        self.model.tokenizer = dataset.tokenizer
        self.out = Path(cfg.out)
        self.log = log or print
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.dist = dist or world()  # the ranks under mpiexec; one process otherwise
        if not self.dist.is_root:  # rank 0 alone logs and writes metrics and checkpoints
            self.log, self.progress = (lambda line: None), False
        if self.dist.size > 1:
            self.dist.check_same("the run", facts_of_run(model, dataset, cfg))
        state = self.dist.bcast(model.train_state or {})  # rank 0's state and weights on every rank
        self.dist.bcast_(model.params.flat, model.adam_m.flat, model.adam_v.flat)
        self.step = int(state.get("step", 0))
        self._resumed_id = state.get("run_id")  # None for a fresh run, or a checkpoint older than run ids
        self.run_id = str(self._resumed_id or uuid.uuid4().hex)  # one run keeps its id through every resume
        self.best_val = float(state.get("best_val", math.inf))
        self.best_val_acc: float | None = state.get("best_val_acc")  # next-character accuracy at best_val
        self.last_eval: dict | None = state.get("last_eval")  # the last evaluation's losses and accuracies
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.rng = np.random.default_rng(cfg.seed)
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        model.dropout_counter = int(state.get("dropout_counter", 0))
        self.optimizer = AdamW(model, cfg, step=self.step)
        self.losses: list[float] = []
        self._stop_requested = False  # Ctrl-C seen by this process
        self._stop_agreed = False  # Ctrl-C seen by any rank, as of the last step's sum over the ranks
        self._eval_seconds = 0.0  # what a time budget keeps for the final evaluation and save
        self.tensorboard, self.curves = tensorboard, curves
        self._tensorboard: TensorBoardLog | None = None

    # -- pieces of a step ---------------------------------------------------------------------

    def progress_fraction(self, elapsed: float) -> float | None:
        """Cosine position under a wall-clock budget (None: schedule by steps); elapsed counts the
        final evaluation's time ahead, so the schedule ends where the training does."""
        if self.cfg.time_budget <= 0:
            return None
        return elapsed / self.cfg.time_budget

    def train_step(self, lr: float) -> tuple[float, float]:
        """One global batch, forward, backward, clip and AdamW; returns its (mean loss, grad norm).

        The global batch is ranks x grad_accum x batch sequences from one draw of the seeded
        generator, however it is split: rank r trains on rows [r*K*B, (r+1)*K*B) in K micro-batches
        of B, so N ranks see exactly the sequences one process with the global batch would. Each
        micro-batch's gradient is that of its mean loss; the sum over micro-batches and ranks is
        divided by their count, giving the mean over all sequences.
        """
        model, dist, B, K = self.model, self.dist, self.cfg.batch, self.cfg.grad_accum
        x, y = self.dataset.get_batch("train", dist.size * K * B, model.cfg.ctx, self.rng)
        model.train()
        counter, loss = model.dropout_counter, 0.0
        for k in range(K):
            first = (dist.rank * K + k) * B
            model.dropout_counter = counter + dist.rank * K + k  # its own masks for each micro-batch
            loss += model.forward(x[first : first + B], y[first : first + B])
            model.backward(accumulate=k > 0)
        model.dropout_counter = counter + dist.size * K
        loss_sum, stops = dist.sum_scalars([loss, float(self._stop_requested)])
        loss, self._stop_agreed = loss_sum / (dist.size * K), stops > 0  # Ctrl-C on any rank stops all
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss} at step {self.step + 1}")
        dist.sum_(model.grads.flat)  # one in-place Allreduce of the flat gradient buffer
        if dist.size * K > 1:
            model.grads.flat *= 1.0 / (dist.size * K)
        norm = self.optimizer.step(lr)
        self.step += 1
        return loss, norm

    def evaluate(self, budget_check: bool = False) -> dict[str, float]:
        """Mean loss and next-character accuracy over cfg.eval_batches fixed random batches of each
        split: {"train", "val"} losses and {"train_acc", "val_acc"} fractions of the positions whose
        most likely character (argmax of the logits) is the target.

        Each batch holds ranks x batch sequences from one generator and rank r evaluates rows
        [r*B, (r+1)*B), so N ranks evaluate exactly the sequences one process of batch N*B does. A stop
        signal (seen by any rank) ends it between two batches with EvalStopped. budget_check: after
        three batches, refuse (ConfigError) evaluations that alone would use up the time budget.
        """
        model, dist, B, n = self.model, self.dist, self.cfg.batch, self.cfg.eval_batches
        result, correct, times = {}, {}, []
        model.eval()  # no dropout
        try:
            for split in ("train", "val"):
                rng = np.random.default_rng([EVAL_SEED, self.cfg.seed])
                total, hits = 0.0, 0
                for _ in range(n):
                    t0 = time.perf_counter()
                    x, y = self.dataset.get_batch(split, dist.size * B, model.cfg.ctx, rng)
                    first = dist.rank * B
                    mine = y[first : first + B]
                    total += model.forward(x[first : first + B], mine)
                    hits += int(np.count_nonzero(model.logits.argmax(axis=-1) == mine))
                    times.append(time.perf_counter() - t0)
                    if self._stop_seen():
                        raise EvalStopped
                    if budget_check and len(times) == 3 and n > 3:  # the first batch may be a cold start
                        self._check_eval_fits(min(times[1:]))
                result[split], correct[split] = total, hits
        finally:
            model.train()
        totals = dist.sum_scalars([result["train"], result["val"], correct["train"], correct["val"]])
        positions = n * dist.size * B * model.cfg.ctx
        return {
            "train": totals[0] / (n * dist.size),
            "val": totals[1] / (n * dist.size),
            "train_acc": totals[2] / positions,
            "val_acc": totals[3] / positions,
        }

    def _stop_seen(self) -> bool:
        """Whether a stop signal arrived (on any rank: every rank asks at the same batch)."""
        if self.dist.size == 1:
            return self._stop_requested
        return self.dist.sum_scalars([float(self._stop_requested)])[0] > 0

    def _check_eval_fits(self, batch_seconds: float) -> None:
        """Refuse a time budget that two evaluations (the first and the last) would use up."""
        cfg = self.cfg
        per_eval = self.dist.from_root(2 * cfg.eval_batches * batch_seconds)  # rank 0's clock for all ranks
        if cfg.time_budget <= 0 or 2 * per_eval <= cfg.time_budget:
            return
        fits = int(cfg.time_budget / 2 / 2 / (2 * batch_seconds))  # two evaluations in half the budget
        raise mark_collective(
            ConfigError(
                f"one evaluation ({cfg.eval_batches} batches of each split) takes about {per_eval:.1f} s and a run "
                f"evaluates at its start and end: more than --time-budget {cfg.time_budget:g} s",
                hint=(f"lower --eval-batches to {fits} or less, or raise --time-budget" if fits >= 1
                      else "raise --time-budget or choose a smaller model or --batch"),
            )
        )  # fmt: skip

    def state(self, elapsed: float) -> dict:
        return {
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "best_val": self.best_val if math.isfinite(self.best_val) else None,
            "best_val_acc": self.best_val_acc,
            "last_eval": self.last_eval,
            "elapsed": elapsed,
            "dropout_counter": self.model.dropout_counter,
            "run_id": self.run_id,
        }

    def save(self, name: str, elapsed: float) -> Path:
        state = self.state(elapsed)
        bad = non_finite(self.model)
        if bad:  # never write (or call "good") a checkpoint that cannot be trained or sampled
            raise TrainingDiverged(f"{' and '.join(bad)} stopped being finite by step {self.step}")
        self.model.train_state = state
        data = self.data
        return self.dist.root_only(
            lambda: save(self.model, self.out / name, self.dataset.tokenizer, self.cfg, state, data=data)
        )

    def _record(self, record: dict) -> None:
        if not self.dist.is_root:
            return
        fd = portable.open_nofollow(self.out / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with open(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.record(record)

    def _claim_out(self) -> None:
        """Check the run folder may hold this run; clear its leftovers (under the run's lock).

        A fresh run may not replace another run's checkpoints (unless overwrite); a resume may replace
        only checkpoints of its own run: the same run id, recorded at the run's start."""
        runfolder.clean_stale(self.out)
        runfolder.check_metrics_file(self.out)
        if self._owns_out:
            return
        runfolder.check_names_free(self.out)
        source = getattr(self.model, "checkpoint_path", None)
        if source is None:
            if self.overwrite:
                runfolder.clear_run(self.out)
            else:
                runfolder.check_fresh(self.out, overwrite=False)
        else:
            foreign = [p for p in runfolder.existing_checkpoints(self.out) if not self._same_run(p, Path(source))]
            if foreign and self.overwrite:
                runfolder.clear_run(self.out)
            elif foreign:
                names = " and ".join(p.name for p in foreign)
                raise ConfigError(
                    f"{self.out} holds checkpoints of another run ({names}); resuming {source} there would "
                    "replace them",
                    hint="pass --out DIR (a new folder) for the resumed run, or --overwrite to replace them",
                )
        self._owns_out = True

    def _same_run(self, checkpoint: Path, source: Path) -> bool:
        """Whether checkpoint (in the run folder) belongs to the run being resumed from source."""
        theirs = runfolder.recorded_run_id(checkpoint)
        if theirs is not None or self._resumed_id is not None:
            return theirs == self._resumed_id
        # checkpoints older than run ids: only the run folder the checkpoint itself sits in, by name
        here = Path(os.path.abspath(source)).parent == Path(os.path.abspath(self.out))
        return here and source.name.removesuffix(".old") in runfolder.CHECKPOINT_NAMES

    def _last_good(self) -> Path | None:
        """A finite checkpoint to name in hints: this run's latest, else the one it resumed from."""
        for candidate in (self.out / "latest", getattr(self.model, "checkpoint_path", None)):
            if candidate is not None and (Path(candidate) / "meta.json").is_file():
                return Path(candidate)
        return None

    # -- the loop -----------------------------------------------------------------------------

    def train(self, until: int | None = None) -> dict:
        """Train to cfg.steps (or the time budget, or step `until`); returns a summary dict.

        A run with nothing left to train (already at `until` or cfg.steps, or past its time budget)
        is refused with a ConfigError before anything is evaluated or written."""
        if self.dist.size > 1:  # ranks stopping at different steps would wait for each other forever
            self.dist.check_same("train()", {"until": until})
        self._check_work_left(until)
        self._lock: runfolder.RunLock | None = None
        self.dist.root_only(self._open_out)  # rank 0 owns the folder: probe, lock, leftovers, overwrite
        try:
            return self._train(until)
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def _check_work_left(self, until: int | None) -> None:
        cfg, step = self.cfg, self.step
        if until is not None and until <= step:
            raise mark_collective(ConfigError(
                f"the run is already at step {step}, past --until {until}; nothing was changed",
                hint=f"pass --until N with N > {step}, or leave --until out to train to step {cfg.steps}",
            ))  # fmt: skip
        if step >= cfg.steps:
            raise mark_collective(ConfigError(
                f"the run already ended: it is at step {step} of {cfg.steps}; nothing was changed",
                hint=f"pass --steps N with N > {step} to train further (the schedule is stretched to N)",
            ))  # fmt: skip
        if cfg.time_budget > 0 and self.elapsed_before >= cfg.time_budget:
            raise mark_collective(ConfigError(
                f"the run already used its time budget ({self.elapsed_before:.1f} s of {cfg.time_budget:g} s); "
                "nothing was changed",
                hint="pass a larger --time-budget to train further",
            ))  # fmt: skip

    def _open_out(self) -> None:
        """Probe and lock the run folder, then claim it (rank 0 only; the lock is held until the end)."""
        check_writable(self.out)
        self._lock = runfolder.RunLock(self.out).acquire()
        try:
            self._claim_out()
            for name, text in self.files.items():
                runfolder.write_text(self.out / name, text)
        except BaseException:
            self._lock.release()
            self._lock = None
            raise

    def _train(self, until: int | None) -> dict:
        cfg, model = self.cfg, self.model
        dist = self.dist
        dist.hint = f"the last good checkpoint is {self.out / 'latest'}; resume with --resume {self.out / 'latest'}"
        last = cfg.steps if until is None else min(until, cfg.steps)
        tokens_per_step = dist.size * cfg.grad_accum * cfg.batch * model.cfg.ctx
        split = f" x grad_accum {cfg.grad_accum}" if cfg.grad_accum > 1 else ""
        split += f" x {dist.size} ranks ({dist.local_size} on this host)" if dist.size > 1 else ""
        self.log(
            f"training {model.num_params():,} parameters with backend {model.backend} "
            f"({model.precision}) | "
            f"B={cfg.batch}{split} T={model.cfg.ctx} steps={'no limit' if cfg.steps >= NO_STEP_LIMIT else cfg.steps} "
            f"lr={cfg.lr:g} "
            f"time_budget={cfg.time_budget:g}s | out {self.out}"
        )
        if self.step:
            self.log(f"resuming at step {self.step}")
        if self.tensorboard and self.dist.is_root:
            self._tensorboard = TensorBoardLog(self.out)
        bar = self._progress_bar(last)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # keep nohup's (or a parent's) ignore
                    previous[signum] = signal.signal(signum, self._request_stop)
        start = time.perf_counter()
        step_time, window_time, window_steps, summary = 0.0, 0.0, 0, {}
        window_comm = dist.comm_seconds
        dt = 0.0  # the last step's seconds: a time budget keeps room for one more

        def elapsed() -> float:
            return self.elapsed_before + time.perf_counter() - start

        first_step = self.step
        # FASTCHAR_FIXED_THREADS=1: keep every thread whatever the step times (for comparisons)
        pool = StepThreads(1 if os.environ.get("FASTCHAR_FIXED_THREADS") == "1" else ensure_threads())
        try:
            if self.step == 0:  # where the curve starts: about ln(V) for an untrained model
                t0 = time.perf_counter()
                losses = self.evaluate(budget_check=True) if cfg.time_budget > 0 else self.evaluate()
                self._eval_seconds = EVAL_MARGIN * (time.perf_counter() - t0)
                self.last_eval = _eval_record(losses)
                self._emit(bar, f"eval step {0:>6} | {_eval_text(losses)}")
                self._record({"step": 0, **self.last_eval, "elapsed": elapsed()})
            while self.step < last:
                dist.context = f"at step {self.step + 1}"
                # when a final evaluation after one more step would end; one clock for all ranks
                now = dist.from_root(elapsed() + dt + self._eval_seconds) if cfg.time_budget > 0 else 0.0
                if cfg.time_budget > 0 and now >= cfg.time_budget:
                    break
                lr = lr_at(self.step, cfg, self.progress_fraction(now))
                pool.before()
                t0 = time.perf_counter()
                loss, norm = self.train_step(lr)
                dt = time.perf_counter() - t0
                if (change := pool.after(dt)) is not None:
                    self._emit(bar, change)
                step_time, window_time, window_steps = step_time + dt, window_time + dt, window_steps + 1
                self.losses.append(loss)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == last:
                    tok_s = tokens_per_step * window_steps / window_time
                    comm_ms = 1e3 * (dist.comm_seconds - window_comm) / window_steps
                    self._emit(
                        bar,
                        f"step {self.step:>6} | loss {loss:.4f} | lr {lr:.2e} | norm {norm:.3f} | "
                        f"{tok_s:,.0f} tok/s | {elapsed():.1f} s"
                        + (f" | allreduce {comm_ms:.2f} ms" if dist.size > 1 else ""),
                    )
                    record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                              "tok_per_s": tok_s, "elapsed": elapsed()}  # fmt: skip
                    self._record(record | ({"allreduce_ms": comm_ms} if dist.size > 1 else {}))
                    window_time, window_steps, window_comm = 0.0, 0, dist.comm_seconds
                if self.step % cfg.eval_every == 0:
                    summary = self._evaluate_and_save(bar, elapsed())
                if self._stop_requested if dist.size == 1 else self._stop_agreed:  # ranks stop at one step
                    self._interrupted(self.save("latest", elapsed()))
            if self.step == first_step:  # the budget left no room for a step: nothing to evaluate or save
                raise mark_collective(ConfigError(
                    f"no training step fit in --time-budget {cfg.time_budget:g} s after the first evaluation "
                    f"({self._eval_seconds / EVAL_MARGIN:.1f} s)",
                    hint="raise --time-budget, or lower --eval-batches",
                ))  # fmt: skip
            if self.step % cfg.eval_every != 0 or not summary:
                summary = self._evaluate_and_save(bar, elapsed())
            if dist.size == 1 and self._stop_requested:  # a signal during the final evaluation
                self._interrupted(self.out / "latest")  # latest was just saved
        except EvalStopped:  # a stop signal during an evaluation: save the weights as they are
            self._interrupted(self.save("latest", elapsed()))
        except TrainingDiverged as exc:  # every rank sees the same global loss and norm
            mark_collective(exc)
            good = self._last_good()
            exc.hint = (
                f"the last good checkpoint is {good}; lower --lr or raise --warmup"
                if good is not None
                else "lower --lr or raise --warmup"
            )
            raise
        finally:
            pool.restore()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if bar is not None:
                bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None
        summary["elapsed"] = elapsed()  # the run's time: the plot below is not part of it
        if self.curves and self.dist.is_root and (path := write_run_curves(self.out)) is not None:
            self.log(f"curves: {path}")
        summary["tok_per_s"] = tokens_per_step * len(self.losses) / step_time if step_time else 0.0
        summary["step"] = self.step
        return summary

    def _evaluate_and_save(self, bar: object, elapsed: float) -> dict:
        t0 = time.perf_counter()
        losses = self.evaluate()
        self.dist.check_in_sync(self.step, self.model.params.flat, self.model.adam_m.flat, self.model.adam_v.flat)
        improved = losses["val"] < self.best_val
        self.last_eval = _eval_record(losses)
        if improved:
            self.best_val, self.best_val_acc = losses["val"], losses["val_acc"]
        # latest comes last: a resume starts from it and never repeats this evaluation, so what belongs
        # to it (its record, a new best) is written first. A kill before latest is saved replays the
        # steps since the previous one (bit for bit), and plot keeps the later of two records of a step.
        done = elapsed + time.perf_counter() - t0  # when this loss was known: evaluation counts against the clock
        self._record({"step": self.step, **self.last_eval, "elapsed": done})
        if improved:
            self.save("best", elapsed)
        self.save("latest", elapsed)
        self._eval_seconds = max(self._eval_seconds, EVAL_MARGIN * (time.perf_counter() - t0))
        mark = " (best, saved)" if improved else ""
        self._emit(bar, f"eval step {self.step:>6} | {_eval_text(losses)}{mark}")
        return {**self.last_eval, "best_val": self.best_val, "best_val_acc": self.best_val_acc}

    def _emit(self, bar: object, line: str) -> None:
        if bar is not None:
            bar.write(line)
        else:
            self.log(line)

    def _progress_bar(self, last: int) -> object:
        if not self.progress:
            return None
        from tqdm import tqdm

        total = None if self.cfg.time_budget > 0 else last
        return tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, leave=False)

    def _interrupted(self, path: Path) -> None:
        signum = self._signum or signal.SIGINT
        name = signal.Signals(signum).name
        launcher = f"mpiexec -n {self.dist.size} " if self.dist.size > 1 else ""
        raise mark_collective(
            Interrupted(
                f"interrupted at step {self.step}; saved a checkpoint to {path} (stopped by {name})",
                hint=f"resume with: {launcher}fastchar train --resume {path}",
                signum=signum,
            )
        )

    def _request_stop(self, signum: int, frame: object) -> None:
        if self._stop_requested:  # a second signal stops at once
            raise Killed(signum)
        self._signum = signum
        self._stop_requested = True


def _eval_record(losses: dict[str, float]) -> dict[str, float]:
    """An evaluation as metrics.jsonl and checkpoints record it."""
    return {"train_loss": losses["train"], "val_loss": losses["val"],
            "train_acc": losses["train_acc"], "val_acc": losses["val_acc"]}  # fmt: skip


def _eval_text(losses: dict[str, float]) -> str:
    """`train 1.4600 (acc 55.3 %) | val 1.5012 (acc 54.9 %)`: each loss with its next-character accuracy."""
    return (
        f"train {losses['train']:.4f} (acc {100 * losses['train_acc']:.1f} %) | "
        f"val {losses['val']:.4f} (acc {100 * losses['val_acc']:.1f} %)"
    )

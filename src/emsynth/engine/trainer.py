"""`train(task, cfg, run_dir)`: the step loop every model in emsynth trains with.

The engine owns device and precision choice, seeding, budgets (steps, wall-clock), progress,
metric logs, validation/image cadence, checkpoints, exact resume, clean stops on SIGINT/SIGTERM
and data parallelism under torchrun. What one step does is the `Task`'s business.

Exactness: with `deterministic=True` on CPU, two runs with the same seed give bitwise equal
weights, and a run killed at any moment (even kill -9) and resumed ends bitwise equal to an
uninterrupted one: a checkpoint holds modules, optimisers, schedulers, every RNG state (torch,
numpy, python, the batch generator), the step and the elapsed time. Validation and image
logging run with the RNG states saved and restored around them, so how often they run never
changes the training trajectory.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from emsynth.engine import checkpoint as ckpt
from emsynth.engine import runinfo
from emsynth.engine.config import EngineConfig
from emsynth.engine.device import (
    resolve_device,
    seed_everything,
    thread_count,
)
from emsynth.engine.distributed import Distributed, init_distributed
from emsynth.engine.metrics import METRICS_CSV, TENSORBOARD_DIR, MetricsLog
from emsynth.engine.progress import format_duration
from emsynth.engine.task import Task, step_context
from emsynth.errors import EmsynthError
from emsynth.io import plain

IMAGES_DIR = "images"


@contextlib.contextmanager
def _torch_global_settings(cfg: EngineConfig) -> Iterator[None]:
    """Apply thread count (default: every core this process may use) and determinism for the
    run; put the previous settings back after, so that training inside a longer-lived process
    (tests, notebooks) leaves no trace."""
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    torch.set_num_threads(thread_count(cfg.num_threads))
    if cfg.deterministic:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])
        torch.backends.cudnn.benchmark = before[3]
        torch.backends.cudnn.deterministic = before[4]


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and returns.

    The handlers are put back at the first signal, so a second Ctrl-C interrupts at once
    (the previous checkpoint is intact: checkpoints are written atomically)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[_StopRequest]:
        request = cls()
        request.install()
        try:
            yield request
        finally:
            request._restore()


@contextlib.contextmanager
def _isolated(task: Task, device: torch.device) -> Iterator[None]:
    """Run validation/image code without touching the training RNG streams or train modes."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    modes = {name: [m.training for m in module.modules()] for name, module in task.modules.items()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for name, module in task.modules.items():
            for sub, mode in zip(module.modules(), modes[name]):
                sub.training = mode


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _check_task(task: Task) -> None:
    for attribute in ("modules", "optimizers", "schedulers"):
        value = getattr(task, attribute, None)
        if not isinstance(value, dict):
            raise TypeError(f"{type(task).__name__}.setup must set self.{attribute} to a dict")


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return f"{where}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
            found = _first_difference(old[key], new[key], where)
            if found:
                return found
        return None
    return None if old == new else f"{path or 'config'}: {old!r} -> {new!r}"


class _LossWindow:
    """The losses of the steps since the last metrics row, and when that window opened."""

    def __init__(self, step: int) -> None:
        self.losses: dict[str, list[float]] = {}
        self.start = (step, time.monotonic())

    def add(self, losses: dict[str, float]) -> None:
        for name, value in losses.items():
            self.losses.setdefault(name, []).append(value)

    def close(self, step: int) -> tuple[dict[str, float], float]:
        """Mean of each loss and steps per second over the window; a new window opens."""
        means = {k: float(np.mean(v)) for k, v in self.losses.items()}
        rate = (step - self.start[0]) / max(time.monotonic() - self.start[1], 1e-9)
        self.losses, self.start = {}, (step, time.monotonic())
        return means, rate


class _Run:
    """State of one `train` call; split out of `train` to keep each phase readable."""

    def __init__(self, task: Task, cfg: EngineConfig, run_dir: Path, dist: Distributed):
        self.task, self.cfg, self.run_dir, self.dist = task, cfg, run_dir, dist
        self.ctx = step_context(cfg, dist)
        self.device, self.precision = self.ctx.device, self.ctx.precision
        self.is_main = dist.rank == 0
        self.step = 0
        self.elapsed_before = 0.0
        self.last_saved_step = -1
        self.last_val_step = -1
        self.val_metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.batch_rng = np.random.default_rng(cfg.seed + dist.rank)
        self.task_config: dict[str, Any] = {}
        self.session_start = time.monotonic()

    def elapsed(self) -> float:
        """Training wall-clock seconds, summed over this and earlier (resumed) sessions."""
        return self.elapsed_before + time.monotonic() - self.session_start

    # --- setup and resume -------------------------------------------------------------------

    def setup(self, resume: bool) -> Path | None:
        seed_everything(self.cfg.seed)
        self.task.setup(self.ctx)
        _check_task(self.task)
        self.task_config = plain(self.task.task_config())
        # Each rank gets its own stream for dropout/noise; modules were built identically above.
        torch.manual_seed(self.cfg.seed + self.dist.rank)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_files(self.run_dir)
            if not resume:
                self._clear_previous_outputs()
        self.dist.barrier()
        path = self.dist.broadcast(ckpt.latest_checkpoint(self.run_dir) if resume else None)
        if path is not None:
            self._restore(Path(path))
        return path

    def _clear_previous_outputs(self) -> None:
        """--no-resume in a used run folder: start over (old checkpoints would win a resume)."""
        shutil.rmtree(self.run_dir / ckpt.CHECKPOINT_DIR, ignore_errors=True)
        shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)
        (self.run_dir / METRICS_CSV).unlink(missing_ok=True)

    def _restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        difference = _first_difference(state["task_config"], self.task_config)
        if difference:
            raise EmsynthError(
                f"{path}: this checkpoint was written with a different model config "
                f"({difference}). Fix: resume with the run's original config (see "
                f"{self.run_dir / runinfo.CONFIG_YAML}), or pass --no-resume or a new --run-dir"
            )
        task = self.task
        self._load_group(path, "module", task.modules, state["modules"],
                         lambda m, s: ckpt.unwrap(m).load_state_dict(s))
        self._load_group(path, "optimizer", task.optimizers, state["optimizers"],
                         lambda o, s: o.load_state_dict(s))
        self._load_group(path, "scheduler", task.schedulers, state["schedulers"],
                         lambda sch, s: sch.load_state_dict(s))
        task.load_extra_state(state["extra"])
        rng_states = state["rng"]
        if len(rng_states) != self.dist.world_size:
            Console(stderr=True).print(
                f"[yellow]warning:[/] {path} was written by {len(rng_states)} process(es), this "
                f"run has {self.dist.world_size}: training continues, but not bit-exactly"
            )
        if self.dist.rank < len(rng_states):
            ckpt.restore_rng_state(rng_states[self.dist.rank], self.batch_rng, self.device)
        self.step = self.last_saved_step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.train_metrics = dict(state["train_metrics"])
        self.val_metrics = dict(state["val_metrics"])
        self.last_val_step = int(state["last_val_step"])

    @staticmethod
    def _load_group(path: Path, kind: str, live: dict, saved: dict, load) -> None:
        if set(live) != set(saved):
            raise EmsynthError(
                f"{path}: checkpoint {kind}s {sorted(saved)} differ from this task's "
                f"{sorted(live)}. Fix: resume with the run's original config, or pass "
                "--no-resume or a new --run-dir"
            )
        for name, obj in live.items():
            try:
                load(obj, saved[name])
            except (RuntimeError, ValueError, KeyError) as err:
                detail = " ".join(str(err).split())[:240]
                raise EmsynthError(
                    f"{path}: the checkpoint's {kind} {name!r} does not fit this model "
                    f"({detail}). Fix: resume with the run's original config, or pass "
                    "--no-resume or a new --run-dir"
                ) from None

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, elapsed: float) -> None:
        rng_states = self.dist.gather(ckpt.capture_rng_state(self.batch_rng, self.device))
        if self.is_main:
            task = self.task
            state = {
                "format": ckpt.CHECKPOINT_FORMAT,
                "step": self.step,
                "elapsed_s": elapsed,
                "engine_config": self.cfg.model_dump(mode="json"),
                "task_config": self.task_config,
                "modules": {n: ckpt.unwrap(m).state_dict() for n, m in task.modules.items()},
                "optimizers": {n: o.state_dict() for n, o in task.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in task.schedulers.items()},
                "extra": task.extra_state(),
                "rng": rng_states,
                "train_metrics": self.train_metrics,
                "val_metrics": self.val_metrics,
                "last_val_step": self.last_val_step,
            }
            ckpt.require_plain(state, "checkpoint")
            ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir, self.step), state)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        self.last_saved_step = self.step

    # --- the loop ---------------------------------------------------------------------------

    def validate(self, log: MetricsLog, elapsed: float) -> None:
        with _isolated(self.task, self.device):
            metrics = {k: float(v) for k, v in self.task.validate(self.ctx).items()}
        self.val_metrics = metrics
        self.last_val_step = self.step
        log.log(self.step, elapsed, {f"val/{k}": v for k, v in metrics.items()})

    def log_images(self, log: MetricsLog) -> None:
        if self.is_main:
            with _isolated(self.task, self.device):
                self.task.log_images(self.step, log.writer, self.run_dir / IMAGES_DIR, self.ctx)

    def loop(self, log: MetricsLog, stop: _StopRequest) -> str:
        cfg, task = self.cfg, self.task
        self.session_start = session_start = time.monotonic()
        start_step = self.step
        window = _LossWindow(start_step)
        elapsed = self.elapsed

        def out_of_time() -> bool:
            return cfg.max_time is not None and elapsed() >= cfg.max_time

        with self._progress() as progress:
            bar = progress.add_task("train", total=cfg.steps, completed=self.step, status="")
            if self.dist.any(out_of_time()):
                return "max_time"
            while self.step < cfg.steps:
                batch = task.sample_batch(self.batch_rng)
                losses = self._train_step(batch)
                for scheduler in task.schedulers.values():
                    scheduler.step()
                self.step += 1
                window.add(losses)

                now = elapsed()
                if _due(self.step, cfg.log_every) or self.step == cfg.steps:
                    self.log_train_metrics(log, window, now)
                if _due(self.step, cfg.val_every):
                    self.validate(log, now)
                if _due(self.step, cfg.image_every):
                    self.log_images(log)
                if _due(self.step, cfg.checkpoint_every):
                    self.save(elapsed())

                done = self.step - start_step
                rate = done / max(time.monotonic() - session_start, 1e-9)
                progress.update(bar, completed=self.step,
                                status=self._status(losses, rate, elapsed()))
                stop_now = self.dist.any(stop.signal_name is not None or out_of_time())
                if stop_now and self.step < cfg.steps:
                    return f"signal:{stop.signal_name}" if stop.signal_name else "max_time"
        return "steps"

    def log_train_metrics(self, log: MetricsLog, window: _LossWindow, elapsed: float) -> None:
        """One metrics row: the window's mean losses, learning rates and speed."""
        self.train_metrics, rate = window.close(self.step)
        task = self.task
        row = {f"train/{k}": v for k, v in self.train_metrics.items()}
        row.update({f"lr/{n}": o.param_groups[0]["lr"] for n, o in task.optimizers.items()})
        row["perf/steps_per_s"] = rate
        if task.batch_size:
            row["perf/images_per_s"] = rate * task.batch_size * self.dist.world_size
        log.log(self.step, elapsed, row)

    def finish(self, log: MetricsLog, start_step: int, stop_reason: str) -> None:
        """End of the session: validation and images once more (unless a signal stopped the
        run, which should end fast), and a checkpoint of the last step."""
        if not stop_reason.startswith("signal"):
            if self.last_val_step != self.step:
                self.validate(log, self.elapsed())
            if self.step > start_step and not _due(self.step, self.cfg.image_every):
                self.log_images(log)
        if self.last_saved_step != self.step:
            self.save(self.elapsed())

    def result(self, stop_reason: str) -> dict[str, Any]:
        """What `train` returns: last window means, `val/` metrics, step, time, stop reason."""
        result: dict[str, Any] = dict(self.train_metrics)
        result.update({f"val/{k}": v for k, v in self.val_metrics.items()})
        result.update(step=self.step, elapsed_s=self.elapsed(), stop_reason=stop_reason)
        return result

    def _train_step(self, batch: Any) -> dict[str, float]:
        try:
            raw = self.task.train_step(batch, self.ctx)
        except RuntimeError as err:
            if "deterministic" in str(err) and self.cfg.deterministic:
                raise EmsynthError(
                    f"{self.run_dir}: an operation of this model has no deterministic "
                    f"implementation on {self.device.type} ({str(err).splitlines()[0][:160]}). "
                    "Fix: set engine.deterministic=false"
                ) from None
            raise
        losses = {name: float(value) for name, value in raw.items()}
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        if bad:
            raise EmsynthError(
                f"{self.run_dir}: training diverged at step {self.step + 1} ({bad}). Fix: "
                "lower the learning rate or use --precision fp32, then resume (the last "
                "checkpoint is intact) or start over with --no-resume"
            )
        return losses

    def _status(self, losses: dict[str, float], rate: float, elapsed: float) -> str:
        cfg = self.cfg
        shown = " ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:4])  # 4 fit a line
        speed = f"{rate:.2f} it/s"
        if self.task.batch_size:
            speed += f" {rate * self.task.batch_size * self.dist.world_size:.1f} img/s"
        eta = (cfg.steps - self.step) / rate if rate > 0 else math.inf
        if cfg.max_time is not None:
            eta = min(eta, max(cfg.max_time - elapsed, 0.0))
        return f"{shown}  {speed}  ETA {format_duration(eta)}"

    def _progress(self) -> Progress:
        console = Console(stderr=True)
        if not console.is_terminal:  # logs to a file: one wide final line rather than 80 cols
            console = Console(stderr=True, width=160)
        return Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not self.is_main,
            transient=False,
        )


def train(
    task: Task, cfg: EngineConfig, run_dir: str | Path, resume: bool = True
) -> dict[str, Any]:
    """Train `task` under `cfg`, writing logs and checkpoints into `run_dir`.

    resume=True continues from the latest checkpoint in `run_dir` (if any); resume=False starts
    over, removing the folder's previous checkpoints, metrics.csv and TensorBoard logs.
    Validation and images also run once at the end, unless a signal stopped the run.
    Returns the final metrics: the last training-window means (`loss`, ...), the last
    validation metrics prefixed `val/`, and `step`, `elapsed_s`, `stop_reason` ("steps",
    "max_time" or "signal:SIGTERM"/"signal:SIGINT").
    """
    run_dir = Path(run_dir)
    started_at = runinfo.now_iso()
    dist = init_distributed(resolve_device(cfg.device).type)
    try:
        with _torch_global_settings(cfg):
            run = _Run(task, cfg, run_dir, dist)
            resumed_from = run.setup(resume)
            record = runinfo.RunRecord.start(
                run_dir, task, cfg, run.task_config, run.ctx, started_at, resumed_from, run.step,
            ) if run.is_main else None
            log = MetricsLog(run_dir, run.step, enabled=run.is_main)
            start_step = run.step
            try:
                with _StopRequest.installed() as stop:
                    stop_reason = run.loop(log, stop)
                run.finish(log, start_step, stop_reason)
            except BaseException as err:
                if record is not None:  # the last checkpoint is intact; say why it ended
                    record.failed(err, run.step)
                raise
            finally:
                log.close()
            result = run.result(stop_reason)
            if record is not None:
                record.ended(stop_reason, run.step, result)
            dist.barrier()
            return result
    finally:
        dist.finish()

"""`study run --workers N`: N processes share one study folder, each running the cells it
takes (Cell.try_lock), so a study's small models keep every core busy: its cells are mostly
single-sample U-Nets that a second torch thread speeds up far less than a second process. This
process is worker 1; workers 2..N are `python -m emsynth study run` children with
the same config and overrides, logging to STUDY_DIR/logs/worker-<k>.log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from emsynth.engine.device import thread_count
from emsynth.errors import EmsynthError
from emsynth.study.config import StudyConfig
from emsynth.study.layout import LOGS_DIR
from emsynth.study.runner import clear_study, run_study

#: Seconds a helper gets to stop cleanly (a checkpoint) after this process is interrupted.
STOP_GRACE_S = 120


def helper_command(config: Path, overrides: list[str], study_dir: Path, workers: int,
                   threads: int, kinds: list[str] | None = None,
                   reuse: list[Path] | None = None) -> list[str]:
    sets = [item for override in overrides for item in ("--set", override)]
    only = ["--kinds", ",".join(kinds)] if kinds else []
    only += [item for folder in reuse or [] for item in ("--reuse", str(folder))]
    return [sys.executable, "-m", "emsynth", "study", "run", str(config), "--study-dir",
            str(study_dir), *sets, "--set", f"num_threads={threads}", "--no-report",
            "--workers", "1", "--worker-of", str(workers), *only]


def run_with_workers(cfg: StudyConfig, config: Path, overrides: list[str], study_dir: Path,
                     workers: int, resume: bool, console: Console,
                     kinds: list[str] | None = None, reuse: list[Path] | None = None) -> None:
    cores = thread_count(None)
    threads = cfg.num_threads or max(1, cores // workers)
    cfg = cfg.model_copy(update={"num_threads": threads})
    study_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_study(cfg, study_dir)  # before any worker starts
    logs = study_dir / LOGS_DIR
    logs.mkdir(exist_ok=True)
    command = helper_command(config, overrides, study_dir, workers, threads, kinds, reuse)
    helpers: list[tuple[subprocess.Popen, Path]] = []
    for k in range(2, workers + 1):
        log = logs / f"worker-{k}.log"
        with open(log, "w") as handle:
            helpers.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL), log))
    console.print(f"{workers} workers x {threads} torch thread(s); helpers log to {logs}/",
                  highlight=False)
    if workers * threads > cores:
        console.print(f"[yellow]{workers} x {threads} threads on {cores} usable cores: cells run "
                      "slower, and a wall-clock safety net (engine.max_time) may stop one short "
                      "of its steps[/]", highlight=False)
    try:
        run_study(cfg, study_dir, resume=True, console=console, workers=workers, kinds=kinds,
                  reuse=reuse)
    except BaseException:
        _stop(helpers)
        raise
    failed = [log for proc, log in helpers if proc.wait() != 0]
    if failed:
        raise EmsynthError(f"{failed[0]}: a worker failed (see its log). Fix: rerun the same "
                           "command to resume; finished cells are kept")
    # Cells the helpers finished after this process ran out of work: index them as done.
    run_study(cfg, study_dir, resume=True, console=console, kinds=kinds)


def _stop(helpers: list[tuple[subprocess.Popen, Path]]) -> None:
    """Ask the helpers to stop as Ctrl-C does (they checkpoint), then wait for them."""
    for proc, _ in helpers:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    for proc, _ in helpers:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()

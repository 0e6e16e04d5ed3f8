"""What a run records about itself (run.json, config.yaml), so a result can be traced to its code,
settings, software and machine."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml

import emsynth
from emsynth.engine.config import EngineConfig
from emsynth.engine.device import choose_precision, cpu_capability, cpu_kind
from emsynth.engine.task import StepContext
from emsynth.io import atomic_write_text

RUN_JSON = "run.json"
CONFIG_YAML = "config.yaml"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of Python and the libraries whose behaviour shapes the results."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("monai", "numpy", "emsynth"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the emsynth source checkout; nulls where there is no git
    (installed package, no git binary, not a repository)."""
    package_dir = Path(emsynth.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(package_dir), *args],
                capture_output=True, text=True, timeout=10, check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # Only trust the repository that holds this source tree (not one the venv happens to sit in).
    if top is None or Path(top).resolve() / "src" / "emsynth" != package_dir:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def host_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_kind(),
        "cpu_capability": cpu_capability(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None


def write_run_json(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(run_dir / RUN_JSON, json.dumps(record, indent=2, default=str) + "\n")


def write_config_yaml(run_dir: Path, engine_config: dict, task_config: dict) -> None:
    text = yaml.safe_dump({"engine": engine_config, "task": task_config}, sort_keys=False)
    atomic_write_text(run_dir / CONFIG_YAML, text)


def command_line() -> list[str]:
    return list(sys.argv)


def provenance(device: torch.device, precision: str) -> dict[str, Any]:
    """What a result computed outside an engine run (a score, a benchmark) records beside it:
    the CPU kind and the precision it ran in, software versions, commit and command."""
    return {"device": str(device), "precision": choose_precision(precision, device).precision,
            **host_info(device), "versions": versions(), "git": git_state(),
            "command": command_line(), "at": now_iso()}


#: What is kept of each earlier session when a run is resumed.
SESSION_KEYS = ("started_at", "ended_at", "start_step", "end_step", "stop_reason", "status", "git",
                "host")


@dataclass
class RunRecord:
    """run.json of a run folder: opened when training starts (status "running"), closed when
    the session ends ("finished", "stopped" or "failed"); earlier sessions of a resumed run are
    kept under `sessions`."""

    run_dir: Path
    record: dict[str, Any]

    @classmethod
    def start(cls, run_dir: Path, task: Any, cfg: EngineConfig, task_config: dict[str, Any],
              ctx: StepContext, started_at: str, resumed_from: Path | None,
              start_step: int) -> RunRecord:
        """Write config.yaml and the opening run.json."""
        engine_config = cfg.model_dump(mode="json")
        write_config_yaml(run_dir, engine_config, task_config)
        previous = read_run_json(run_dir) if resumed_from is not None else None
        sessions = list(previous.get("sessions", [])) if previous else []
        if previous:
            sessions.append({key: previous.get(key) for key in SESSION_KEYS})
        record: dict[str, Any] = {
            "task": f"{type(task).__module__}.{type(task).__qualname__}",
            "status": "running",
            "seed": cfg.seed,
            "engine_config": engine_config,
            "task_config": task_config,
            "resolved": {"device": str(ctx.device), "precision": ctx.precision,
                         "precision_reason": choose_precision(cfg.precision, ctx.device).reason,
                         "cpu_capability": cpu_capability(), "cpu_kind": cpu_kind(),
                         "num_threads": torch.get_num_threads(), "world_size": ctx.world_size},
            "versions": versions(),
            "git": git_state(),
            "host": host_info(ctx.device),
            "command": command_line(),
            "started_at": started_at,
            "ended_at": None,
            "resumed_from": str(resumed_from) if resumed_from is not None else None,
            "start_step": start_step,
            "end_step": None,
            "sessions": sessions,
        }
        opened = cls(run_dir, record)
        opened.write()
        return opened

    def write(self) -> None:
        write_run_json(self.run_dir, self.record)

    def ended(self, stop_reason: str, step: int, result: dict[str, Any]) -> None:
        self.record.update(status="finished" if stop_reason == "steps" else "stopped",
                           stop_reason=stop_reason, ended_at=now_iso(), end_step=step,
                           elapsed_s=result["elapsed_s"], final_metrics=result)
        self.write()

    def failed(self, err: BaseException, step: int) -> None:
        self.record.update(status="failed", error=f"{type(err).__name__}: {err}",
                           ended_at=now_iso(), end_step=step)
        self.write()

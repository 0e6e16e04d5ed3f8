"""The training engine across processes: kill -9 and resume, SIGTERM, torchrun data parallel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_tasks import TinyConfig, TinyTask, assert_bitwise_equal, tiny

from emsynth.engine import EngineConfig, load_weights, train
from emsynth.engine.checkpoint import list_checkpoints

SCRIPT = Path(__file__).with_name("engine_tasks.py")
STEPS = 60
# The same run in every test: deterministic, one thread; periodic checkpoints every 10 steps.
COMMON = ["--steps", str(STEPS), "--deterministic", "--device", "cpu",
          "--set", "engine.num_threads=1",
          "--set", "engine.checkpoint_every=10", "--set", "engine.log_every=1"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parent),
                                                      env.get("PYTHONPATH")]))
    return env


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """Train the tiny task in a child process, slowed down so that it can be interrupted."""
    command = [sys.executable, str(SCRIPT), "--run-dir", str(run_dir),
               "--weights-out", str(run_dir / "final.safetensors"), *COMMON,
               "--set", "step_sleep=0.05", *extra]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _reference_cfg() -> TinyConfig:
    return tiny(steps=STEPS, checkpoint_every=10, log_every=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Final weights of the run trained straight through, in this process."""
    task = TinyTask(_reference_cfg())
    train(task, task.cfg.engine, tmp_path_factory.mktemp("straight"))
    return {k: v.clone() for k, v in task.modules["net"].state_dict().items()}


def _resume_here(run_dir: Path) -> tuple[TinyTask, dict]:
    task = TinyTask(_reference_cfg())
    return task, train(task, task.cfg.engine, run_dir)


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    proc = _start(tmp_path)
    _wait_for(lambda: list_checkpoints(tmp_path), proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(tmp_path)[-1][0]
    assert 10 <= killed_at < STEPS

    task, result = _resume_here(tmp_path)
    assert result["step"] == STEPS and len(task.losses) == STEPS - killed_at
    assert_bitwise_equal(uninterrupted, task.modules["net"].state_dict())
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["start_step"] == killed_at and record["sessions"][0]["status"] == "running"


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path, uninterrupted):
    proc = _start(tmp_path, "--set", "engine.checkpoint_every=0")

    def logged_three_steps() -> bool:
        csv = tmp_path / "metrics.csv"
        return csv.is_file() and csv.read_text().count(",train/loss,") >= 3
    _wait_for(logged_three_steps, proc, "three logged steps")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    saved = list_checkpoints(tmp_path)
    assert len(saved) == 1 and 3 <= saved[0][0] < STEPS
    assert f"stop_reason=signal:SIGTERM step={saved[0][0]}" in stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "stopped" and record["stop_reason"] == "signal:SIGTERM"

    task, _ = _resume_here(tmp_path)
    assert_bitwise_equal(uninterrupted, task.modules["net"].state_dict())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process(run_dir: Path, emulate_ranks: int) -> dict[str, torch.Tensor]:
    cfg = TinyConfig(batchnorm=False, dropout=0.0, emulate_ranks=emulate_ranks,
                     engine=EngineConfig(steps=15, precision="fp32", num_threads=1,
                                         checkpoint_every=0, device="cpu"))
    task = TinyTask(cfg)
    train(task, cfg.engine, run_dir)
    return task.modules["net"].state_dict()


@pytest.mark.slow
def test_torchrun_two_processes_average_gradients(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(_free_port()), str(SCRIPT), "--run-dir", str(run_dir),
               "--weights-out", str(tmp_path / "w.safetensors"), "--steps", "15", "--device", "cpu",
               "--precision", "fp32", "--set", "batchnorm=false", "--set", "dropout=0.0",
               "--set", "engine.num_threads=1", "--set", "engine.checkpoint_every=0"]
    env = _env() | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, meta0 = load_weights(tmp_path / "w_rank0.safetensors")
    rank1, _ = load_weights(tmp_path / "w_rank1.safetensors")
    assert_bitwise_equal(rank0["net"], rank1["net"])
    assert meta0["step"] == 15

    # Averaged gradients == one process training on both ranks' batches (seed+0, seed+1) ...
    both = _single_process(tmp_path / "both", emulate_ranks=2)
    for key, value in both.items():
        torch.testing.assert_close(rank0["net"][key], value, rtol=1e-4, atol=1e-5)
    # ... and not the run on rank 0's data alone.
    alone = _single_process(tmp_path / "alone", emulate_ranks=1)
    assert max((rank0["net"][k] - alone[k]).abs().max().item() for k in alone) > 1e-3
    # only rank 0 wrote the run folder
    record = json.loads((run_dir / "run.json").read_text())
    assert record["resolved"]["world_size"] == 2
    assert [step for step, _ in list_checkpoints(run_dir)] == [15]
    assert len(list((run_dir / "tensorboard").iterdir())) == 1

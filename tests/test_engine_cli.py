"""The shared `train` command options (emsynth.engine.cli), through a real typer command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from engine_tasks import TinyConfig, app
from typer.testing import CliRunner

from emsynth.engine import load_weights
from emsynth.engine.cli import TrainOptions, train_options

runner = CliRunner()


def test_help_lists_the_shared_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for flag in ("--config", "--set", "--run-dir", "--no-resume", "--max-time", "--steps",
                 "--deterministic", "--device", "--precision", "--seed", "--weights-out"):
        assert flag in result.output


def test_options_become_config_and_run_dir(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("hidden: 6\nengine:\n  steps: 50\n  seed: 3\n  num_threads: 1\n")
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--set", "engine.seed=5", "--set", "lr=0.01",
            "--steps", "4", "--max-time", "10m", "--precision", "fp32",
            "--run-dir", str(run_dir), "--weights-out", str(tmp_path / "w.safetensors")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((run_dir / "run.json").read_text())
    engine = record["engine_config"]
    # file < --set < shortcut flags
    assert (engine["steps"], engine["seed"], engine["max_time"]) == (4, 5, 600.0)
    assert engine["precision"] == "fp32" and engine["num_threads"] == 1
    assert record["task_config"]["hidden"] == 6 and record["task_config"]["lr"] == 0.01
    _, metadata = load_weights(tmp_path / "w.safetensors")
    assert metadata["step"] == 4


def test_defaults_and_no_resume():
    captured: list[TrainOptions] = []
    probe = typer.Typer()

    @probe.command()
    @train_options(default_config="configs/x.yaml", default_run_dir="runs/x")
    def cmd(opts: TrainOptions) -> None:
        """Probe."""
        captured.append(opts)

    assert runner.invoke(probe, ["--no-resume", "--deterministic"]).exit_code == 0
    opts = captured[0]
    assert opts.run_dir == Path("runs/x") and opts.config == Path("configs/x.yaml")
    assert opts.resume is False and opts.overrides == []
    assert opts.engine_overrides() == ["engine.deterministic=true"]


def test_bad_option_value_is_a_config_error(tmp_path):
    from emsynth.errors import EmsynthError

    opts = TrainOptions(run_dir=tmp_path, precision="fp8")
    with pytest.raises(EmsynthError, match="engine.precision"):
        opts.load(TinyConfig)


def test_command_without_train_options_parameter_is_rejected():
    with pytest.raises(TypeError, match="TrainOptions"):
        train_options()(lambda run_dir: None)

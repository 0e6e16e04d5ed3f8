"""The training engine, in process: determinism, resume, logs, run record, budgets, safety."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import yaml
from engine_tasks import TinyConfig, TinyTask, assert_bitwise_equal, tiny, weights
from engine_tasks import run_task as run
from torch import nn

from emsynth.config import load_config
from emsynth.engine import EngineConfig, load_weights, save_weights, train
from emsynth.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from emsynth.engine.metrics import read_metrics_csv
from emsynth.engine.task import step_context
from emsynth.errors import EmsynthError


def test_deterministic_runs_are_bitwise_equal_and_seed_matters(tmp_path):
    first, result = run(tiny(), tmp_path / "a")
    second, _ = run(tiny(), tmp_path / "b")
    assert result["step"] == 20 and result["stop_reason"] == "steps"
    assert_bitwise_equal(weights(first), weights(second))
    assert first.losses == second.losses
    other, _ = run(tiny(seed=1), tmp_path / "c")
    assert not torch.equal(weights(first)["0.weight"], weights(other)["0.weight"])


def test_training_reduces_the_loss(tmp_path):
    task, _ = run(tiny(steps=60, precision="fp32"), tmp_path)
    assert np.mean(task.losses[-10:]) < 0.5 * np.mean(task.losses[:10])


def test_validation_and_images_do_not_change_training(tmp_path):
    """validate() draws from the global RNGs and switches to eval mode: both are isolated."""
    quiet, _ = run(tiny(), tmp_path / "quiet")
    busy, result = run(tiny(val_every=3, image_every=4), tmp_path / "busy")
    assert_bitwise_equal(weights(quiet), weights(busy))
    assert busy.modules["net"].training
    assert busy.image_steps == [4, 8, 12, 16, 20]
    assert quiet.image_steps == [20]  # images once at the end even when periodic ones are off
    assert sorted(p.name for p in (tmp_path / "busy" / "images").iterdir()) == [
        f"ramp_{s:06d}.png" for s in (4, 8, 12, 16, 20)
    ]
    assert math.isfinite(result["val/mse"])


def test_resume_continues_exactly(tmp_path):
    """20 steps, then resume to 30 == 30 steps straight (modules, Adam, StepLR, RNGs, extra)."""
    straight, _ = run(tiny(steps=30), tmp_path / "straight")
    run(tiny(steps=20), tmp_path / "split")
    resumed, result = run(tiny(steps=30), tmp_path / "split")
    assert result["step"] == 30
    assert_bitwise_equal(weights(straight), weights(resumed))
    assert resumed.steps_taken == 30  # extra_state came back
    assert resumed.losses == straight.losses[20:]
    assert resumed.optimizers["opt"].param_groups[0]["lr"] == pytest.approx(0.02 * 0.5**4)
    record = json.loads((tmp_path / "split" / "run.json").read_text())
    assert record["start_step"] == 20 and record["end_step"] == 30
    assert [s["end_step"] for s in record["sessions"]] == [20]
    assert record["resumed_from"].endswith("step_00000020.pt")
    # logs read like one uninterrupted run: each train/loss step exactly once
    loss_steps = [r["step"] for r in read_metrics_csv(tmp_path / "split" / "metrics.csv")
                  if r["name"] == "train/loss"]
    assert loss_steps == [5, 10, 15, 20, 25, 30]


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    task, result = run(tiny(), tmp_path)
    again, again_result = run(tiny(), tmp_path)
    assert again.losses == []
    assert again_result["loss"] == result["loss"] and again_result["step"] == 20
    assert_bitwise_equal(weights(task), weights(again))


def test_no_resume_starts_over(tmp_path):
    first, _ = run(tiny(steps=12, checkpoint_every=4), tmp_path)
    fresh, result = run(tiny(steps=6, checkpoint_every=4), tmp_path, resume=False)
    assert result["step"] == 6 and len(fresh.losses) == 6
    assert fresh.losses == first.losses[:6]
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]


def test_checkpoints_are_pruned_and_safe_to_load(tmp_path):
    run(tiny(steps=20, checkpoint_every=4, keep_checkpoints=2), tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [16, 20]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 20 and state["extra"] == {"steps_taken": 20}
    assert state["task_config"]["hidden"] == 8
    assert set(state["rng"][0]) == {"torch", "cuda", "python", "numpy_global", "batch"}


def test_metrics_csv_and_tensorboard_hold_the_logged_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task, result = run(tiny(steps=20, log_every=5, val_every=10, image_every=10), tmp_path)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    csv_loss = {r["step"]: r["value"] for r in rows if r["name"] == "train/loss"}
    expected = {s: float(np.mean(task.losses[s - 5 : s])) for s in (5, 10, 15, 20)}
    assert csv_loss == pytest.approx(expected, rel=1e-12)
    csv_lr = {r["step"]: r["value"] for r in rows if r["name"] == "lr/opt"}
    assert csv_lr == pytest.approx({5: 0.02, 10: 0.01, 15: 0.005, 20: 0.005})  # StepLR(7, 0.5)
    csv_val = {r["step"]: r["value"] for r in rows if r["name"] == "val/mse"}
    assert sorted(csv_val) == [10, 20] and csv_val[20] == pytest.approx(result["val/mse"])
    assert {r["name"] for r in rows} >= {"perf/steps_per_s", "perf/images_per_s"}
    assert result["loss"] == pytest.approx(expected[20])

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx(expected, rel=1e-6)
    assert [e.step for e in events.Scalars("val/mse")] == [10, 20]
    assert [e.step for e in events.Images("ramp")] == [10, 20]


def test_run_json_and_config_yaml_record_the_run(tmp_path):
    cfg = tiny(seed=7)
    run(cfg, tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "finished" and record["stop_reason"] == "steps"
    assert record["seed"] == 7 and record["engine_config"] == cfg.engine.model_dump(mode="json")
    assert record["task_config"]["hidden"] == 8
    assert record["task"] == "engine_tasks.TinyTask"
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["numpy"] == np.__version__
    assert set(record["versions"]) == {"python", "torch", "monai", "numpy", "emsynth"}
    commit = record["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    from emsynth.engine.device import choose_precision, cpu_capability

    expected = choose_precision("auto", torch.device("cpu"))
    resolved = record["resolved"]
    assert {k: resolved[k] for k in ("device", "precision", "num_threads", "world_size")} == {
        "device": "cpu", "precision": expected.precision, "num_threads": 1, "world_size": 1}
    assert resolved["precision_reason"] == expected.reason
    assert resolved["cpu_capability"] == cpu_capability()
    assert record["host"]["hostname"] and record["started_at"] <= record["ended_at"]
    assert record["start_step"] == 0 and record["end_step"] == 20
    assert record["final_metrics"]["step"] == 20
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == {"engine": cfg.engine.model_dump(mode="json"),
                     "task": {"hidden": 8, "batch": 16, "batchnorm": True, "dropout": 0.1,
                              "lr": 0.02}}


def test_max_time_stops_with_a_checkpoint(tmp_path):
    cfg = TinyConfig(step_sleep=0.01, engine=EngineConfig(
        steps=100_000, max_time="0.3s", checkpoint_every=0, log_every=0, num_threads=1,
        device="cpu"))
    _, result = run(cfg, tmp_path)
    assert result["stop_reason"] == "max_time"
    assert 0 < result["step"] < 100_000 and result["elapsed_s"] >= 0.3
    assert [step for step, _ in list_checkpoints(tmp_path)] == [result["step"]]
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "stopped" and record["stop_reason"] == "max_time"
    # the budget spans sessions: resuming with it spent trains no further
    again, again_result = run(cfg, tmp_path)
    assert again.losses == [] and again_result["step"] == result["step"]


def test_config_mismatch_on_resume_is_refused(tmp_path):
    run(tiny(steps=5, checkpoint_every=5), tmp_path)
    changed = tiny(steps=10, checkpoint_every=5)
    changed.hidden = 12
    with pytest.raises(EmsynthError, match=r"different model config \(hidden: 8 -> 12\)") as err:
        run(changed, tmp_path)
    assert "step_00000005.pt" in str(err.value) and "--no-resume" in str(err.value)


class _SilentConfigTask(TinyTask):
    """A task that declares no config: a changed architecture still surfaces on load."""

    def task_config(self) -> dict:
        return {}


def test_architecture_mismatch_without_task_config_is_refused(tmp_path):
    cfg = tiny(steps=5, checkpoint_every=5)
    train(_SilentConfigTask(cfg), cfg.engine, tmp_path)
    cfg.hidden = 12
    with pytest.raises(EmsynthError, match="module 'net' does not fit this model"):
        train(_SilentConfigTask(cfg), cfg.engine, tmp_path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "run" / "checkpoints" / "step_00000005.pt"
    path.parent.mkdir(parents=True)
    torch.save({"format": 1, "step": 5, "payload": _Evil(marker)}, path)
    with pytest.raises(EmsynthError, match="refusing to load this checkpoint") as err:
        run(tiny(), tmp_path / "run")
    assert str(path) in str(err.value)
    assert not marker.exists()


def test_damaged_or_foreign_checkpoints_are_refused(tmp_path):
    run(tiny(steps=5, checkpoint_every=5), tmp_path)
    path = latest_checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EmsynthError, match="not a readable checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(EmsynthError, match="not an emsynth training checkpoint"):
        load_checkpoint(path)


def test_half_written_checkpoint_from_a_kill_is_ignored(tmp_path):
    run(tiny(steps=10, checkpoint_every=5), tmp_path)
    stale = tmp_path / "checkpoints" / ".step_00000015.pt.abc.tmp"
    stale.write_bytes(b"partial")
    _, result = run(tiny(steps=15, checkpoint_every=5), tmp_path)
    assert result["step"] == 15 and not stale.exists()


class _DivergingTask(TinyTask):
    def train_step(self, batch, ctx):
        super().train_step(batch, ctx)
        return {"loss": float("nan")}


def test_divergence_is_a_clear_error_and_recorded(tmp_path):
    cfg = tiny()
    with pytest.raises(EmsynthError, match="training diverged at step 1"):
        train(_DivergingTask(cfg), cfg.engine, tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"] == "failed" and "diverged" in record["error"]


def test_weights_export_round_trip(tmp_path):
    task, _ = run(tiny(steps=3), tmp_path / "run")
    path = tmp_path / "model.safetensors"
    save_weights(path, task.modules, {"config": {"hidden": 8}, "note": "x"})
    fresh = TinyTask(tiny())
    fresh.setup(step_context(task.cfg.engine))
    state_dicts, metadata = load_weights(path, fresh.modules)
    assert metadata == {"config": {"hidden": 8}, "note": "x"}
    assert_bitwise_equal(weights(task), weights(fresh))
    assert set(state_dicts) == {"net"}

    wrong = tiny()
    wrong.hidden = 5
    other = TinyTask(wrong)
    other.setup(step_context(task.cfg.engine))
    with pytest.raises(EmsynthError, match="weights do not fit module 'net'") as err:
        load_weights(path, other.modules)
    assert str(path) in str(err.value)
    with pytest.raises(EmsynthError, match="has no weights for module 'g'"):
        load_weights(path, {"g": nn.Linear(2, 2)})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(EmsynthError, match="not a readable safetensors file"):
        load_weights(junk)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("20m", 1200), ("1h", 3600), ("1h30m", 5400), ("1.5h", 5400), ("45", 45),
     (12, 12), (None, None)],
)
def test_max_time_accepts_durations(text, seconds):
    assert EngineConfig(max_time=text).max_time == seconds


@pytest.mark.parametrize("text", ["soon", "10 parsecs", "1h30", "-5", "0s"])
def test_bad_max_time_is_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"max_time: {text}\n")
    with pytest.raises(EmsynthError, match="max_time"):
        load_config(EngineConfig, path)

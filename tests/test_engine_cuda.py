"""The training engine on a CUDA GPU (skipped without one): bf16 autocast, deterministic
kernels, and exact resume including the CUDA RNG state."""

from __future__ import annotations

import json

import pytest
import torch
from engine_tasks import assert_bitwise_equal, tiny, weights
from engine_tasks import run_task as run

from emsynth.engine.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_run_is_repeatable_and_resumes_exactly(tmp_path):
    straight, result = run(tiny(steps=30, device="cuda"), tmp_path / "a")
    again, _ = run(tiny(steps=30, device="cuda"), tmp_path / "b")
    assert result["step"] == 30
    assert_bitwise_equal(weights(straight), weights(again))
    assert next(straight.modules["net"].parameters()).is_cuda

    run(tiny(steps=20, device="cuda"), tmp_path / "split")
    resumed, _ = run(tiny(steps=30, device="cuda"), tmp_path / "split")
    assert_bitwise_equal(weights(straight), weights(resumed))

    record = json.loads((tmp_path / "a" / "run.json").read_text())
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert record["resolved"]["device"] == "cuda:0"
    assert record["resolved"]["precision"] == expected
    assert record["host"]["gpu"] == torch.cuda.get_device_name(0)
    state = load_checkpoint(latest_checkpoint(tmp_path / "a"))
    assert len(state["rng"][0]["cuda"]) == 1  # the training GPU's generator


def test_dropout_stream_on_cuda_depends_on_the_seed(tmp_path):
    first, _ = run(tiny(device="cuda"), tmp_path / "a")
    other, _ = run(tiny(device="cuda", seed=1), tmp_path / "b")
    assert not torch.equal(weights(first)["0.weight"], weights(other)["0.weight"])

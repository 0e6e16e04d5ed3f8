"""Precision, device and thread choice (`emsynth.engine.device`) and `emsynth doctor`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import SEGMENT_TINY
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.engine import device
from emsynth.errors import EmsynthError

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # a device object needs no GPU; only the probe is consulted


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(device, "cpu_capability", lambda: "AVX2")


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(device, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(device, "cpu_capability", lambda: "AVX512")


def test_auto_is_fp32_on_a_cpu_without_native_bf16(no_native_bf16):
    choice = device.choose_precision("auto", CPU)
    assert choice.precision == "fp32"
    assert "no native bf16" in choice.reason and "AVX2" in choice.reason
    assert device.resolve_precision("auto", CPU) == "fp32"


def test_auto_is_bf16_on_a_cpu_with_native_bf16(native_bf16):
    assert device.choose_precision("auto", CPU).precision == "bf16"
    assert device.resolve_precision("auto", CPU) == "bf16"


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch, no_native_bf16, supported,
                                                    expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    assert device.choose_precision("auto", CUDA).precision == expected


@pytest.mark.parametrize("explicit", ["bf16", "fp32"])
def test_explicit_precision_is_kept_whatever_the_hardware(no_native_bf16, explicit, monkeypatch):
    monkeypatch.setattr(device, "bf16_slowdown", lambda: 17.0)
    device.warn_emulated_bf16.cache_clear()
    assert device.resolve_precision(explicit, CPU) == explicit


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_measured_factor(
        no_native_bf16, monkeypatch, capsys):
    monkeypatch.setattr(device, "bf16_slowdown", lambda: 17.0)
    device.warn_emulated_bf16.cache_clear()
    device.resolve_precision("bf16", CPU)
    device.resolve_precision("bf16", CPU)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "emulated" in err and "17x slower" in err and "--precision auto" in err
    device.warn_emulated_bf16.cache_clear()


def test_no_warning_for_auto_fp32_or_native_bf16(monkeypatch, capsys):
    monkeypatch.setattr(device, "bf16_slowdown", lambda: 17.0)
    device.warn_emulated_bf16.cache_clear()
    monkeypatch.setattr(device, "cpu_bf16_native", lambda: False)
    device.resolve_precision("auto", CPU)
    device.resolve_precision("fp32", CPU)
    monkeypatch.setattr(device, "cpu_bf16_native", lambda: True)
    device.resolve_precision("bf16", CPU)
    assert "warning" not in capsys.readouterr().err


def test_unknown_precision_and_device_are_one_line_errors():
    with pytest.raises(EmsynthError, match="--precision 'fp16' is unknown"):
        device.choose_precision("fp16", CPU)
    with pytest.raises(EmsynthError, match="--device 'tpu' is unknown"):
        device.resolve_device("tpu")


def test_default_threads_are_the_usable_cores(monkeypatch):
    monkeypatch.setattr(device, "usable_cores", lambda: 3)
    assert device.thread_count(None) == 3
    assert device.thread_count(1) == 1
    before = torch.get_num_threads()
    with device.torch_threads(None):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before


def test_bf16_slowdown_measures_a_ratio_in_the_right_direction():
    ratio = device.bf16_slowdown.__wrapped__()
    if device.cpu_bf16_native():
        assert ratio < 4.0  # native: about as fast or faster
    else:
        assert ratio > 1.5  # emulated: several times slower


def test_doctor_reports_what_auto_picks_and_why(no_native_bf16, tmp_path):
    out = tmp_path / "doctor.json"
    result = CliRunner().invoke(app, ["doctor", "--no-benchmark", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "precision auto  fp32: the CPU has no native bf16 (AVX2)" in result.output
    assert "AVX2, no native bf16" in result.output
    report = json.loads(out.read_text())
    assert report["auto_precision"] == "fp32" and report["cpu_capability"] == "AVX2"
    assert "unet_fp32_img_s" not in report


def test_doctor_benchmark_times_both_precisions(native_bf16):
    from emsynth.engine.doctor import doctor_report

    report = doctor_report("cpu", benchmark=True)
    assert report["auto_precision"] == "bf16"
    assert report["unet_fp32_img_s"] > 0 and report["unet_bf16_img_s"] > 0
    result = CliRunner().invoke(app, ["doctor", "--device", "cpu"])
    assert result.exit_code == 0 and "U-Net step      fp32" in result.output


@pytest.mark.slow
def test_fp32_and_bf16_inference_give_the_same_masks(tmp_path):
    """The precision flag changes speed, not results: masks agree to 0.002 IoU."""
    from emsynth.config import load_config
    from emsynth.data.phantom import generate_volume
    from emsynth.segment.config import SegmentConfig
    from emsynth.segment.infer import predict_with
    from emsynth.segment.metrics import counts
    from emsynth.segment.model import Segmenter
    from emsynth.segment.train import MODEL_DIR, train_segmenter

    volume = next(v for seed in range(20)
                  if 0.05 < (v := generate_volume("ca1", 6, (192, 192), seed=seed)).labels[
                      "mito"].mean() < 0.25)
    cfg = load_config(SegmentConfig, None, [
        *SEGMENT_TINY, "engine.steps=300", "engine.val_every=0", "engine.image_every=0",
    ])
    train_segmenter(cfg, volume, tmp_path / "run", resume=False)
    model = Segmenter.load(tmp_path / "run" / MODEL_DIR)
    fp32 = predict_with(model, volume.image, precision="fp32") >= model.threshold
    bf16 = predict_with(model, volume.image, precision="bf16") >= model.threshold
    truth = volume.labels["mito"]
    assert counts(fp32, truth).iou > 0.7  # a trained model, not all or nothing
    # A 300-step model has many pixels near its threshold, the worst case for bf16's 8-bit
    # mantissa: measured agreement IoU 0.97-0.99, scores 0.002-0.005 apart.
    assert counts(bf16, fp32).iou > 0.97
    assert abs(counts(bf16, truth).iou - counts(fp32, truth).iou) < 0.01
    auto = predict_with(model, volume.image, precision="auto") >= model.threshold
    resolved = bf16 if device.resolve_precision("auto", CPU) == "bf16" else fp32
    assert np.array_equal(auto, resolved)

"""Sliding-window inference, test-time augmentation, and the saved model format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from emsynth.errors import EmsynthError
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.infer import (
    predict_probs,
    predict_with,
    probability_to_uint8,
    sliding_probs,
    window_size,
    write_tiff_stack,
)
from emsynth.segment.model import Segmenter, build_model

TINY = ModelConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)


class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv): sliding windows must reproduce it exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(4.0)
            self.conv.bias.fill_(-2.0)

    def forward(self, x):
        return self.conv(x)


class Shifted(nn.Module):
    """Not equivariant to flips/rotations: looks at the pixel to its right."""

    def forward(self, x):
        return torch.roll(x, shifts=-1, dims=-1) * 6 - 3


def test_window_shrinks_to_small_slices():
    assert window_size(100, 130, 256, 16) == (112, 144)
    assert window_size(768, 1024, 256, 16) == (256, 256)


@pytest.mark.parametrize("tta", [False, True])
def test_unet_on_odd_sizes_returns_the_input_shape(tta):
    torch.manual_seed(0)
    net = build_model(TINY, 1).eval()
    x = torch.rand(2, 1, 100, 130)
    infer = InferConfig(window=64, overlap=0.25, sw_batch_size=3)
    probs = sliding_probs(net, x, infer, TINY.divisor, tta=tta)
    assert probs.shape == (2, 1, 100, 130)
    assert float(probs.min()) >= 0 and float(probs.max()) <= 1


def test_sliding_window_equals_direct_inference_for_a_pointwise_model():
    net = Pointwise().eval()
    x = torch.rand(3, 1, 100, 130)
    direct = torch.sigmoid(net(x))
    for blend in ("gaussian", "constant"):
        infer = InferConfig(window=48, overlap=0.5, sw_batch_size=4, blend=blend)
        assert torch.allclose(sliding_probs(net, x, infer, 16), direct, atol=1e-5)


def test_unet_windowed_close_to_whole_image_inference():
    torch.manual_seed(0)
    net = build_model(TINY, 1).eval()
    x = torch.rand(1, 1, 128, 128)
    whole = torch.sigmoid(net(x))
    single = sliding_probs(net, x, InferConfig(window=128), TINY.divisor)
    assert torch.allclose(single, whole, atol=1e-5)
    tiled = sliding_probs(net, x, InferConfig(window=64, overlap=0.5), TINY.divisor)
    # Only the window borders see different padding: the bulk agrees closely.
    assert (tiled - whole).abs().mean() < 0.02


def test_tta_is_the_mean_over_the_eight_views():
    x = torch.rand(1, 1, 32, 48)
    infer = InferConfig(window=64)
    assert torch.allclose(
        sliding_probs(Pointwise(), x, infer, 16, tta=True), torch.sigmoid(Pointwise()(x)), atol=1e-5
    )
    net = Shifted()
    views = []
    for k in range(8):
        v = torch.rot90(x, k % 4, dims=(-2, -1))
        v = torch.flip(v, dims=(-1,)) if k >= 4 else v
        p = torch.sigmoid(net(v))
        p = torch.flip(p, dims=(-1,)) if k >= 4 else p
        views.append(torch.rot90(p, -(k % 4), dims=(-2, -1)))
    expected = torch.stack(views).mean(0)
    got = sliding_probs(net, x, infer, 16, tta=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.sigmoid(net(x)), atol=1e-3)


def test_predict_probs_chunks_slices_and_restores_train_mode():
    net = Pointwise().train()
    inputs = np.random.default_rng(0).integers(0, 256, (5, 1, 40, 52), dtype=np.uint8)
    seen = []
    probs = predict_probs(
        net,
        inputs,
        InferConfig(window=32, slices_per_batch=2),
        16,
        torch.device("cpu"),
        progress=seen.append,
    )
    expected = torch.sigmoid(net(torch.from_numpy(inputs).float() / 255)).detach()[:, 0].numpy()
    assert probs.shape == (5, 40, 52) and probs.dtype == np.float32
    assert np.allclose(probs, expected, atol=1e-5)
    assert seen == [2, 2, 1] and net.training


def test_segmenter_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    seg = Segmenter(
        net=build_model(TINY, 2).eval(),
        model=TINY,
        channel_names=["image", "mito"],
        target_name="membrane",
        threshold=0.45,
        infer=InferConfig(window=64),
        meta={"note": "test"},
    )
    seg.save(tmp_path / "model")
    loaded = Segmenter.load(tmp_path / "model")
    assert loaded.threshold == 0.45 and loaded.channel_names == ["image", "mito"]
    assert loaded.target_name == "membrane" and loaded.meta == {"note": "test"}
    inputs = np.random.default_rng(0).integers(0, 256, (2, 2, 50, 70), dtype=np.uint8)
    a = predict_with(seg, inputs, precision="fp32")
    b = predict_with(loaded, inputs, precision="fp32")
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="2 input channels"):
        predict_with(loaded, inputs[:, 0])


def test_load_rejects_missing_or_foreign_models(tmp_path):
    with pytest.raises(EmsynthError, match="no trained segmenter"):
        Segmenter.load(tmp_path)
    seg = Segmenter(
        net=build_model(TINY, 1), model=TINY, channel_names=["image"], target_name="mito"
    )
    seg.save(tmp_path)
    sidecar = json.loads((tmp_path / "model.json").read_text())
    sidecar["format"] = "something-else"
    (tmp_path / "model.json").write_text(json.dumps(sidecar))
    with pytest.raises(EmsynthError, match="format"):
        Segmenter.load(tmp_path)


def test_tiff_stack_writing(tmp_path):
    prob = np.linspace(0, 1, 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    as_bytes = probability_to_uint8(prob)
    assert as_bytes.dtype == np.uint8 and as_bytes[0, 0, 0] == 0 and as_bytes[-1, -1, -1] == 255
    path = write_tiff_stack(tmp_path / "prob.tif", as_bytes)
    assert np.array_equal(tifffile.imread(path), as_bytes)
    assert [p.name for p in tmp_path.iterdir()] == ["prob.tif"]

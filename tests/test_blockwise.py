"""Blockwise prediction: equal to whole-volume prediction, resumable after kill -9, sharded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", minversion="3")

from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.data.blocks import DONE_DIR, SLEEP_ENV, iter_blocks, shard_blocks, source_index
from emsynth.data.omezarr import open_ome_zarr, write_volume
from emsynth.data.phantom.generate import generate_volume
from emsynth.errors import EmsynthError
from emsynth.segment.blockwise import (
    BlockwiseModel,
    inference_net,
    predict_array,
    predict_to_ome_zarr,
)
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.infer import probability_to_uint8
from emsynth.segment.model import Segmenter, build_model

TINY = ModelConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model(TINY, 1).eval()


@pytest.fixture(scope="module")
def image():
    return generate_volume("vnc", 3, (150, 130), 2).image


@pytest.mark.parametrize("tta", [False, True])
def test_blockwise_equals_whole_volume(net, image, tta):
    model = BlockwiseModel(net, (64, 64), 0.25, tta=tta, sw_batch_size=4)
    whole = predict_array(model, image)
    for block in [(1, 40, 48), (2, 64, 128)]:
        blocks = predict_array(model, image, block)
        np.testing.assert_allclose(blocks, whole, atol=1e-5)
        np.testing.assert_array_equal(blocks >= 0.5, whole >= 0.5)


@pytest.mark.parametrize("cfg", [TINY, ModelConfig(arch="basicunet", channels=[4, 4, 8, 8, 16, 4])])
def test_inference_net_folds_batchnorm_and_predicts_as_the_net(cfg):
    torch.manual_seed(0)
    net = build_model(cfg, 2)
    for m in net.modules():  # trained-looking statistics, so that folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2),
                              (m.weight.data, 0.5, 2), (m.bias.data, -1, 1)):
                t.uniform_(lo, hi)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = inference_net(net)
    assert net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.rand(3, 2, 64, 48)
    with torch.no_grad():
        expected = net.eval()(x)
        np.testing.assert_allclose(fast(x), expected, atol=1e-5 * float(expected.abs().max()))


def test_blocks_tile_the_volume_and_shards_partition_them():
    blocks = list(iter_blocks((5, 70, 33), (2, 32, 32)))
    cover = np.zeros((5, 70, 33), int)
    for b in blocks:
        cover[slice(*b.z), slice(*b.y), slice(*b.x)] += 1
    assert (cover == 1).all()
    shards = [shard_blocks(blocks, i, 3) for i in range(3)]
    assert sorted(b.name for s in shards for b in s) == sorted(b.name for b in blocks)


@pytest.mark.parametrize("pad", ["edge", "reflect"])
def test_padding_from_global_positions_is_numpys_padding_of_the_whole_slice(pad):
    for size in (1, 2, 5, 9):
        whole = np.pad(np.arange(size), (0, 40), mode=pad)
        for start in range(size):  # any region start inside the slice, any width past it
            np.testing.assert_array_equal(source_index(start, size + 40, size, pad),
                                          whole[start:])


def test_two_shards_together_equal_one_run(tmp_path, net, image):
    model = BlockwiseModel(net, (64, 64), 0.25)
    kw = {"threshold": 0.5, "label": "mito", "block": (2, 64, 64), "scale_nm": (5.0, 5.0, 5.0)}
    one = predict_to_ome_zarr(model, image, tmp_path / "one.ome.zarr", **kw)
    assert one["complete"] and one["predicted"] == one["blocks"] == 18
    first = predict_to_ome_zarr(model, image, tmp_path / "two.ome.zarr", shard_id=0,
                                num_shards=2, **kw)
    assert not first["complete"] and first["predicted"] == 9
    second = predict_to_ome_zarr(model, image, tmp_path / "two.ome.zarr", shard_id=1,
                                 num_shards=2, **kw)
    assert second["complete"] and second["done"] == 18
    for name in ("one", "two"):
        out = open_ome_zarr(tmp_path / f"{name}.ome.zarr")
        assert out.scale_nm == (5.0, 5.0, 5.0) and out.labels == {"mito": "mito"}
    a, b = (open_ome_zarr(tmp_path / f"{n}.ome.zarr") for n in ("one", "two"))
    np.testing.assert_array_equal(a.array[:, :, :], b.array[:, :, :])
    np.testing.assert_array_equal(a.label("mito").array[:, :, :], b.label("mito").array[:, :, :])
    reference = predict_array(model, image)
    np.testing.assert_array_equal(a.label("mito").array[:, :, :], reference >= 0.5)


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "emsynth.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def _save_model(path: Path) -> Segmenter:
    torch.manual_seed(1)
    segmenter = Segmenter(build_model(TINY, 1), TINY, ["image"], "mito", 0.5,
                          InferConfig(window=64))
    segmenter.save(path)
    return segmenter


def test_killed_prediction_resumes_to_the_same_result(tmp_path):
    segmenter = _save_model(tmp_path / "model")
    volume = generate_volume("vnc", 2, (128, 128), 3)
    src = write_volume(volume, tmp_path / "in.ome.zarr")
    args = [src, "-m", tmp_path / "model", "--block", "1,64,64", "--device", "cpu",
            "--precision", "fp32"]
    # A slow run (sleeps after each block) killed with SIGKILL after a few blocks.
    out = tmp_path / "run.ome.zarr"
    proc = _cli("segment", "predict", *args, "-o", out, env={SLEEP_ENV: "0.3"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / DONE_DIR).is_dir() and len(list((out / DONE_DIR).glob("*.done"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(list((out / DONE_DIR).glob("*.done")))
    assert 2 <= done_before < 8
    resumed = _cli("segment", "predict", *args, "-o", out)
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, stderr
    assert f"{8 - done_before} blocks predicted, {done_before} already done" in " ".join(
        stdout.split())
    # The reference: the same model over the whole volume, in memory, in one uninterrupted pass.
    model = BlockwiseModel(segmenter.net, (64, 64), 0.25)
    reference = predict_array(model, volume.image, (1, 64, 64))
    result = open_ome_zarr(out)
    np.testing.assert_array_equal(result.array[:, :, :], probability_to_uint8(reference))
    np.testing.assert_array_equal(result.label("mito").array[:, :, :], reference >= 0.5)
    assert zarr.open_group(store=str(out), mode="r").attrs["emsynth"]["complete"] is True


def test_refuses_a_bad_shard_and_a_mismatched_output(tmp_path, net, image):
    _save_model(tmp_path / "model")
    bad = CliRunner().invoke(app, ["segment", "predict", str(tmp_path), "-m",
                                   str(tmp_path / "model"), "-o", str(tmp_path / "o.zarr"),
                                   "--shard-id", "2", "--num-shards", "2"])
    assert isinstance(bad.exception, EmsynthError) and "--shard-id" in str(bad.exception)
    model = BlockwiseModel(net, (64, 64), 0.25)
    kw = {"threshold": 0.5, "label": "mito", "scale_nm": (5.0, 5.0, 5.0)}
    predict_to_ome_zarr(model, image, tmp_path / "o.zarr", block=(1, 64, 64), **kw)
    with pytest.raises(EmsynthError, match="differs in: block"):
        predict_to_ome_zarr(model, image, tmp_path / "o.zarr", block=(2, 64, 64), **kw)


def test_outputs_get_a_multiscale_pyramid_once_complete(tmp_path, net, image):
    model = BlockwiseModel(net, (64, 64), 0.25)
    threshold = float(np.median(predict_array(model, image)))  # a plausible mask for `data info`
    kw = {"threshold": threshold, "label": "mito", "block": (2, 64, 64),
          "scale_nm": (8.0, 4.0, 5.0), "pyramid_min": 32}
    out = tmp_path / "p.ome.zarr"
    first = predict_to_ome_zarr(model, image, out, shard_id=0, num_shards=2, **kw)
    assert first["levels"] == 4 and not first["complete"]
    assert open_ome_zarr(out).levels == 1  # coarse levels are declared once written
    assert predict_to_ome_zarr(model, image, out, shard_id=1, num_shards=2, **kw)["complete"]
    root = zarr.open_group(store=str(out), mode="r")
    for group, name in ((root, "prob"), (root["labels"]["mito"], "mito")):
        ms = group.attrs["ome"]["multiscales"][0]
        assert ms["name"] == name and [d["path"] for d in ms["datasets"]] == ["0", "1", "2", "3"]
        for k, d in enumerate(ms["datasets"]):
            f = 2.0**k
            assert d["coordinateTransformations"][0] == {"type": "scale",
                                                         "scale": [8.0, 4.0 * f, 5.0 * f]}
            if k:  # a coarse pixel's centre is the middle of the 2^k fine pixels it covers
                assert d["coordinateTransformations"][1] == {
                    "type": "translation", "translation": [0.0, 2.0 * (f - 1), 2.5 * (f - 1)]}
    assert "image-label" in root["labels"]["mito"].attrs["ome"]
    shapes = [root[str(k)].shape for k in range(4)]
    assert shapes == [(3, 150, 130), (3, 75, 65), (3, 38, 33), (3, 19, 17)]
    prob = root["0"][...].astype(np.float64)
    level1 = np.rint(prob.reshape(3, 75, 2, 65, 2).mean(axis=(2, 4)))
    np.testing.assert_array_equal(root["1"][...], level1)
    edge = np.pad(root["1"][...].astype(np.float64), ((0, 0), (0, 1), (0, 1)), mode="edge")
    np.testing.assert_array_equal(root["2"][...],
                                  np.rint(edge.reshape(3, 38, 2, 33, 2).mean(axis=(2, 4))))
    mito = root["labels"]["mito"]
    np.testing.assert_array_equal(mito["1"][...],
                                  mito["0"][...].reshape(3, 75, 2, 65, 2).max(axis=(2, 4)))
    info = CliRunner().invoke(app, ["data", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    stats = json.loads(info.output)
    assert "4 levels" in stats["source"] and stats["shape"] == [3, 150, 130]
    assert stats["pixel_size_nm"] == [4.0, 5.0] and 0.3 < stats["label_fractions"]["mito"] < 0.7

"""The dask backend: the same blocks on a LocalCluster of 2 workers give the local result.

The API tests use thread workers (processes=False: they start in a second here); the CLI test
runs `--backend dask` with its default, a LocalCluster of 2 worker processes (about 15 s to
start on 2 busy cores), where each worker loads the model from its folder once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr", minversion="3")
pytest.importorskip("distributed", reason="the dask backend needs dask[distributed] "
                    "(pip install 'emsynth[dask]')")

from emsynth.data.blocks import dask_client
from emsynth.data.omezarr import open_ome_zarr, write_volume
from emsynth.data.phantom.generate import generate_volume
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.gan.data import Conditioning
from emsynth.gan.inference import Tiling, synthesize_to_ome_zarr, synthesize_volume
from emsynth.gan.networks import build_generator
from emsynth.segment.blockwise import BlockwiseModel, predict_to_ome_zarr
from emsynth.segment.config import InferConfig, ModelConfig
from emsynth.segment.model import Segmenter, build_model

TINY = ModelConfig(channels=[4, 8, 16], strides=[2, 2], num_res_units=1)


def _arrays(path) -> list[np.ndarray]:
    out = open_ome_zarr(path)
    return [out.array[:, :, :], *(out.label(k).array[:, :, :] for k in sorted(out.labels))]


@pytest.fixture(scope="module")
def client():
    with dask_client(processes=False) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        yield c


def test_segment_prediction_on_dask_equals_local(tmp_path, client):
    torch.manual_seed(0)
    model = BlockwiseModel(build_model(TINY, 1).eval(), (64, 64), 0.25, tta=True)
    image = generate_volume("vnc", 3, (150, 130), 2).image
    kw = {"threshold": 0.5, "label": "mito", "block": (1, 64, 64), "pyramid_min": 64}
    local = predict_to_ome_zarr(model, image, tmp_path / "local.ome.zarr", **kw)
    first = predict_to_ome_zarr(model, image, tmp_path / "dask.ome.zarr", client=client,
                                shard_id=0, num_shards=2, **kw)
    assert first["predicted"] == 14 and not first["complete"]
    rest = predict_to_ome_zarr(model, image, tmp_path / "dask.ome.zarr", client=client, **kw)
    assert rest["predicted"] == 13 and rest["skipped"] == 14 and rest["complete"]
    assert local["complete"] and local["levels"] == rest["levels"] == 3
    for a, b in zip(_arrays(tmp_path / "local.ome.zarr"), _arrays(tmp_path / "dask.ome.zarr")):
        np.testing.assert_array_equal(a, b)
    level2 = zarr.open_array(store=str(tmp_path / "dask.ome.zarr" / "2"), mode="r")
    local2 = zarr.open_array(store=str(tmp_path / "local.ome.zarr" / "2"), mode="r")
    np.testing.assert_array_equal(level2[...], local2[...])


def test_tiled_synthesis_on_dask_equals_in_memory(tmp_path, client):
    torch.manual_seed(0)
    generator = build_generator("unet", 2, 8, noise=0.5)
    conditioning = Conditioning((MITO, MEMBRANE))
    masks = generate_volume("vnc", 1, (260, 260), 5)
    expected = synthesize_volume(generator, masks, conditioning, seed=7, precision="fp32",
                                 tiling=Tiling(256)).image
    result = synthesize_to_ome_zarr(
        generator, {c: masks.labels[c] for c in conditioning.channels},
        tmp_path / "s.ome.zarr", conditioning, Tiling(256), shape=masks.shape,
        block=(1, 130, 130), seed=7, device="cpu", precision="fp32", client=client)
    assert result["complete"] and result["predicted"] == 4
    np.testing.assert_array_equal(open_ome_zarr(tmp_path / "s.ome.zarr").array[:, :, :],
                                  expected)


@pytest.mark.slow
def test_cli_backend_dask_with_worker_processes_equals_local(tmp_path):
    torch.manual_seed(1)
    Segmenter(build_model(TINY, 1), TINY, ["image"], "mito", 0.5,
              InferConfig(window=64)).save(tmp_path / "model")
    src = write_volume(generate_volume("vnc", 2, (128, 96), 3), tmp_path / "in.ome.zarr")
    base = [sys.executable, "-m", "emsynth.cli", "segment", "predict", str(src), "-m",
            str(tmp_path / "model"), "--block", "1,64,64", "--device", "cpu", "--precision",
            "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("local", []), ("dask", ["--backend", "dask"])):
        done = subprocess.run([*base, "-o", str(tmp_path / f"{name}.ome.zarr"), *extra],
                              capture_output=True, text=True, env=env, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "8 blocks predicted" in " ".join(done.stdout.split())
    for a, b in zip(_arrays(tmp_path / "local.ome.zarr"), _arrays(tmp_path / "dask.ome.zarr")):
        np.testing.assert_array_equal(a, b)

"""Other NGFF readers open emsynth's OME-Zarr outputs: ome-zarr-py's Reader (what
napari-ome-zarr uses to show images and labels) finds the image, its pyramid and the mito
labels with their image-label metadata, and the ome-zarr-models validators accept the image
and the labels (NGFF 0.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import unet_micro

from emsynth.data.omezarr import open_ome_zarr
from emsynth.data.phantom import generate_volume
from emsynth.segment.blockwise import BlockwiseModel, predict_to_ome_zarr
from emsynth.segment.config import ModelConfig
from emsynth.segment.model import build_model

pytest.importorskip("ome_zarr", reason="ome-zarr (the test extra) is not installed")
pytest.importorskip("ome_zarr_models", reason="ome-zarr-models (the test extra) is not installed")


@pytest.fixture(scope="module")
def prediction(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model(ModelConfig.model_validate(unet_micro()), 1).eval()
    volume = generate_volume("ca1", 2, (300, 280), 0)
    out = tmp_path_factory.mktemp("ngff") / "pred.ome.zarr"
    done = predict_to_ome_zarr(BlockwiseModel(net, (64, 64), 0.25), volume.image, out,
                               threshold=0.5, label="mito", block=(1, 128, 128),
                               scale_nm=(40.0, 5.0, 5.0), pyramid_min=64)
    assert done["complete"] and done["levels"] == 4
    return out


def test_ome_zarr_py_reads_the_image_pyramid_and_labels(prediction):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(prediction)))())
    ours = open_ome_zarr(prediction)
    image = nodes[0]  # the image first, then labels/ and each label
    assert any(isinstance(spec, Multiscales) for spec in image.specs)
    assert [d.shape for d in image.data] == [(2, 300, 280), (2, 150, 140), (2, 75, 70),
                                             (2, 38, 35)]
    np.testing.assert_array_equal(np.asarray(image.data[0]), ours.array[:, :, :])
    assert [a["name"] for a in image.metadata["axes"]] == ["z", "y", "x"]
    (mito,) = [n for n in nodes if n.metadata.get("name") == "mito"]
    assert any(isinstance(spec, Label) for spec in mito.specs)
    np.testing.assert_array_equal(np.asarray(mito.data[0]), ours.label("mito").array[:, :, :])
    # a coarse label level is the 2 x 2 maximum of the finer one (thin objects stay visible)
    fine, coarse = np.asarray(mito.data[0]), np.asarray(mito.data[1])
    assert np.array_equal(coarse[:, :149, :140], fine[:, :298, :].reshape(
        2, 149, 2, 140, 2).max(axis=(2, 4)))


def test_ome_zarr_models_validate_image_and_labels(prediction):
    import zarr
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    image = Image.from_zarr(zarr.open_group(prediction, mode="r"))
    scales = [d.coordinateTransformations[0].scale for d in
              image.attributes.ome.multiscales[0].datasets]
    assert scales == [[40.0, 5.0, 5.0], [40.0, 10.0, 10.0], [40.0, 20.0, 20.0],
                      [40.0, 40.0, 40.0]]
    label = ImageLabel.from_zarr(zarr.open_group(prediction / "labels" / "mito", mode="r"))
    assert len(label.attributes.ome.multiscales[0].datasets) == 4

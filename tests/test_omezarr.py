"""OME-Zarr (NGFF 0.5 / zarr v3, and 0.4 / zarr v2) as a dataset layout: read, write, convert."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

zarr = pytest.importorskip("zarr", minversion="3")

from emsynth.cli import app
from emsynth.data.omezarr import (
    create_image,
    is_ome_zarr,
    open_ome_zarr,
    write_volume,
)
from emsynth.data.phantom.generate import generate_volume
from emsynth.data.readers import detect_layout, open_lazy, read_volume
from emsynth.data.validate import InputWarning
from emsynth.data.writers import write_slice_folder
from emsynth.errors import EmsynthError

runner = CliRunner()


@pytest.fixture(scope="module")
def volume():
    return generate_volume("vnc", 3, (96, 80), 1)


def _quiet_read(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        return read_volume(path, **kw)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_round_trip_keeps_image_labels_and_scale(tmp_path, volume, version):
    out = write_volume(volume, tmp_path / "v.ome.zarr", version=version, chunks=(2, 64, 64),
                       z_nm=40.0)
    assert is_ome_zarr(out) and detect_layout(out) == "ome-zarr"
    back = _quiet_read(out)
    np.testing.assert_array_equal(back.image, volume.image)
    assert sorted(back.labels) == sorted(volume.labels)
    for name, lab in volume.labels.items():
        np.testing.assert_array_equal(back.labels[name], lab)
    assert back.pixel_size_nm == volume.pixel_size_nm
    assert back.slice_names == volume.slice_names
    assert open_ome_zarr(out).scale_nm == (40.0, *volume.pixel_size_nm)
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary folder was renamed away


def test_ngff_05_metadata_is_what_viewers_expect(tmp_path, volume):
    out = write_volume(volume, tmp_path / "v.ome.zarr")
    root = json.loads((out / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    ome = root["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["type"] for a in ms["axes"]} == {"space"}
    assert ms["datasets"][0]["path"] == "0"
    scale = ms["datasets"][0]["coordinateTransformations"][0]
    assert scale["type"] == "scale" and scale["scale"][1:] == list(volume.pixel_size_nm)
    array = json.loads((out / "0" / "zarr.json").read_text())
    assert array["node_type"] == "array" and array["dimension_names"] == ["z", "y", "x"]
    labels = json.loads((out / "labels" / "zarr.json").read_text())["attributes"]["ome"]
    assert sorted(labels["labels"]) == sorted(volume.labels)
    mito = json.loads((out / "labels" / "mito" / "zarr.json").read_text())["attributes"]["ome"]
    assert mito["image-label"]["source"] == {"image": "../../"}
    assert mito["image-label"]["colors"][0]["label-value"] == 1
    assert mito["multiscales"][0]["datasets"][0]["path"] == "0"


def test_reads_tczyx_in_micrometres_and_2d_images(tmp_path):
    data = np.arange(2 * 8 * 6, dtype=np.uint8).reshape(1, 1, 2, 8, 6)
    path = tmp_path / "t.ome.zarr"
    group = zarr.open_group(store=str(path), mode="w", zarr_format=3)
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 1, 0.03, 0.005, 0.005]}]}]}]}})
    group.create_array("0", data=data, chunks=(1, 1, 1, 4, 4))
    image = open_ome_zarr(path)
    assert image.shape == (2, 8, 6)
    assert image.scale_nm == pytest.approx((30.0, 5.0, 5.0))
    np.testing.assert_array_equal(image.array[1:2, 2:5, 1:3], data[0, 0, 1:2, 2:5, 1:3])
    vol = read_volume(path)
    assert vol.pixel_size_nm == pytest.approx((5.0, 5.0)) and vol.labels == {}

    flat = tmp_path / "flat.ome.zarr"
    create_image(flat, (1, 8, 6))[...] = data[0, 0, :1]
    attrs = json.loads((flat / "zarr.json").read_text())
    ms = attrs["attributes"]["ome"]["multiscales"][0]
    ms["axes"] = ms["axes"][1:]
    ms["datasets"][0]["coordinateTransformations"][0]["scale"] = [4.0, 4.0]
    (flat / "zarr.json").write_text(json.dumps(attrs))
    g = zarr.open_group(store=str(flat), mode="r+")
    del g["0"]
    g.create_array("0", data=data[0, 0, 0], chunks=(4, 4))
    assert read_volume(flat).shape == (1, 8, 6)


def test_convert_cli_from_slice_folder_then_info(tmp_path, volume):
    src = write_slice_folder(volume, tmp_path / "slices")
    out = tmp_path / "out.ome.zarr"
    result = runner.invoke(app, ["data", "convert", str(src), str(out), "--chunks", "2,32,32"])
    assert result.exit_code == 0, result.output
    assert "labels: membrane, mito" in result.output
    assert zarr.open_array(store=str(out / "0"), mode="r").chunks == (2, 32, 32)
    np.testing.assert_array_equal(_quiet_read(out).image, volume.image)
    again = runner.invoke(app, ["data", "convert", str(src), str(out)])
    assert isinstance(again.exception, EmsynthError)  # main() prints it on one line, exit 2
    assert "already exists" in str(again.exception)
    info = runner.invoke(app, ["data", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output[info.output.index("{"):])["layout"] == "ome-zarr"
    bad = runner.invoke(app, ["data", "convert", str(src), str(tmp_path / "x.zarr"),
                              "--chunks", "a,b"])
    assert isinstance(bad.exception, EmsynthError) and "--chunks" in str(bad.exception)


def test_tiff_stack_reads_lazily_through_the_zarr_store(tmp_path, volume):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, volume.image, photometric="minisblack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        array, scale, source = open_lazy(path)
    assert not isinstance(array, np.ndarray) and "lazily" in source
    np.testing.assert_array_equal(array[1:3, 10:20, 5:9], volume.image[1:3, 10:20, 5:9])
    assert scale == (5.0, 5.0, 5.0)


def test_broken_ome_zarr_is_a_one_line_error(tmp_path):
    path = tmp_path / "b.ome.zarr"
    path.mkdir()
    (path / "zarr.json").write_text(json.dumps({
        "zarr_format": 3, "node_type": "group",
        "attributes": {"ome": {"version": "0.5", "multiscales": [{"axes": ["z", "y", "x"],
                                                                  "datasets": [{"path": "0"}]}]}}}))
    result = subprocess.run([sys.executable, "-m", "emsynth.cli", "data", "info", str(path)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "cannot open the level-0 array" in result.stderr + result.stdout
    assert len((result.stderr + result.stdout).strip().splitlines()) == 1


def test_downsampling_means_images_and_keeps_thin_labels():
    from emsynth.data.omezarr import downsample_yx

    image = np.array([[[0, 3, 10], [1, 0, 20], [5, 5, 7]]], np.uint8)
    # 2 x 2 means rounded; the odd last row/column averaged with itself
    np.testing.assert_array_equal(downsample_yx(image, "mean"), [[[1, 15], [5, 7]]])
    probs = image.astype(np.float32) / 10
    np.testing.assert_allclose(downsample_yx(probs, "mean"), [[[0.1, 1.5], [0.5, 0.7]]])
    line = np.zeros((1, 4, 4), np.uint8)
    line[0, :, 1] = 1  # a one-pixel membrane survives as a label, not as a mean
    np.testing.assert_array_equal(downsample_yx(line, "max"), [[[1, 0], [1, 0]]])
    assert downsample_yx(np.zeros((2, 5, 1), np.uint8), "max").shape == (2, 3, 1)

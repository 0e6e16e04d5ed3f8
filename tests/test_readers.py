"""Readers for every layout, on small synthetic datasets built in tmp_path."""

from __future__ import annotations

import json
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.data.figures import default_slices, overlay, save_slice_figure
from emsynth.data.readers import (
    SLICE_LAYOUTS,
    detect_layout,
    natural_key,
    read_volume,
    resolve_layout,
    volume_stats,
)
from emsynth.data.validate import InputWarning
from emsynth.data.volume import MEMBRANE, MITO, SYNAPSE
from emsynth.errors import EmsynthError

SHAPE = (48, 64)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


def _blobs(n: int, seed: int = 1) -> np.ndarray:
    """Sparse round objects (about 5-15% of pixels), a plausible mitochondria mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    out = np.zeros((n, *SHAPE), bool)
    for z in range(n):
        for _ in range(3):
            cy, cx = rng.integers(8, SHAPE[0] - 8), rng.integers(8, SHAPE[1] - 8)
            out[z] |= (yy - cy) ** 2 + (xx - cx) ** 2 < 25
    return out


def _grid(n: int) -> np.ndarray:
    """A connected membrane network: lines every 12 pixels, 2 pixels thick (~30%)."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    net = (yy % 12 < 2) | (xx % 12 < 2)
    return np.repeat(net[None], n, axis=0)


def _write_png(path, arr) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == bool:
        Image.fromarray(arr).save(path)  # mode "1": a 1-bit PNG like drosophila_vnc
    else:
        iio.imwrite(path, arr)


def _slice_folder(root, n=4, names=None, **extra):
    images, mito = _images(n), _blobs(n)
    names = names or [f"{i:04d}" for i in range(n)]
    for z, name in enumerate(names):
        _write_png(root / "images" / f"{name}.png", images[z])
        _write_png(root / "masks" / f"{name}.png", mito[z].astype(np.uint8) * 255)
        for folder, stack in extra.items():
            _write_png(root / folder / f"{name}.png", stack[z].astype(np.uint8) * 255)
    return images, mito


def test_slices_layout_reads_all_labels_and_meta(tmp_path):
    membranes, synapses = _grid(4), _blobs(4, seed=7) & _grid(4)
    images, mito = _slice_folder(tmp_path, membranes=membranes, synapses=synapses)
    meta = {"pixel_size_nm": [5.0, 6.0], "source": "phantom", "slice_names": list("abcd")}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert detect_layout(tmp_path) == "slices"
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.image, images)
    np.testing.assert_array_equal(vol.labels[MITO], mito)
    np.testing.assert_array_equal(vol.labels[MEMBRANE], membranes)
    np.testing.assert_array_equal(vol.labels[SYNAPSE], synapses)
    assert vol.pixel_size_nm == (5.0, 6.0)
    assert vol.slice_names == list("abcd")
    assert "phantom" in vol.source and "slices" in vol.source


def test_slices_sorted_naturally_and_subset(tmp_path):
    images, _ = _slice_folder(tmp_path, n=3, names=["s10", "s2", "s1"])
    vol = read_volume(tmp_path, layout="slices")
    assert vol.slice_names == ["s1", "s2", "s10"]
    np.testing.assert_array_equal(vol.image[2], images[0])
    sub = read_volume(tmp_path, indices=[2, 0])
    assert sub.slice_names == ["s10", "s1"]
    assert sorted(["x10", "x9", "x100"], key=natural_key) == ["x9", "x10", "x100"]


def test_images_only_folder_reads_without_labels_and_hints_at_mask_dir(tmp_path):
    _write_png(tmp_path / "images" / "0.png", _images(1)[0])
    _write_png(tmp_path / "labels" / "0.png", _blobs(1)[0].astype(np.uint8) * 255)
    with pytest.warns(InputWarning, match="--mask-dir.*labels"):
        vol = read_volume(tmp_path)
    assert vol.labels == {} and vol.shape == (1, *SHAPE)


def test_vnc_layout_thresholds_anti_aliased_mito_and_reads_1bit(tmp_path):
    n = 3
    raw, mito, membranes, synapses = _images(n), _blobs(n), _grid(n), _blobs(n, 9) & ~_blobs(n)
    mito_png = mito.astype(np.uint8) * 255
    edge = mito ^ np.roll(mito, 1, axis=2)  # pixels on object edges get anti-aliased values
    mito_png[edge & mito] = 200  # still foreground (>= 128)
    mito_png[edge & ~mito] = 60  # still background
    (tmp_path / "raw").mkdir()
    for z in range(n):
        tifffile.imwrite(tmp_path / "raw" / f"{z:02d}.tif", raw[z])
        _write_png(tmp_path / "membranes" / f"{z:02d}.png", membranes[z])
        _write_png(tmp_path / "mitochondria" / f"{z:02d}.png", mito_png[z])
        _write_png(tmp_path / "synapses" / f"{z:02d}.png", synapses[z])
    assert detect_layout(tmp_path) == "vnc"
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.image, raw)
    np.testing.assert_array_equal(vol.labels[MITO], mito)
    np.testing.assert_array_equal(vol.labels[MEMBRANE], membranes)
    np.testing.assert_array_equal(vol.labels[SYNAPSE], synapses)
    assert vol.pixel_size_nm == (4.6, 4.6)
    assert vol.slice_names == ["00", "01", "02"]


def test_isbi_layout_is_detected_and_inverted(tmp_path):
    membranes = _grid(3)
    for z in range(3):
        _write_png(tmp_path / "images" / f"{z:02d}.png", _images(3)[z])
        _write_png(tmp_path / "masks" / f"{z:02d}.png", (~membranes[z]).astype(np.uint8) * 255)
    assert detect_layout(tmp_path) == "isbi"
    vol = read_volume(tmp_path)
    assert list(vol.labels) == [MEMBRANE]
    np.testing.assert_array_equal(vol.labels[MEMBRANE], membranes)
    assert vol.pixel_size_nm == (4.0, 4.0)
    # The same folder read as mitochondria by mistake is refused as inverted.
    with pytest.raises(EmsynthError, match="looks inverted"):
        read_volume(tmp_path, layout="slices")


@pytest.mark.parametrize("name", sorted(SLICE_LAYOUTS))
def test_each_slice_layout_of_the_table_reads_its_folders(tmp_path, name):
    """A folder built from the table entry alone (image folder, label folders, mask
    convention) reads back exactly, with the entry's pixel size; the stated polarity
    overrides the entry's convention."""
    layout = SLICE_LAYOUTS[name]
    images = _images(3)
    truth = {MITO: _blobs(3), MEMBRANE: _grid(3), SYNAPSE: _blobs(3, 9) & ~_blobs(3)}
    for z in range(3):
        _write_png(tmp_path / layout.image_dir / f"{z:02d}.png", images[z])
        for folder, label in layout.label_dirs.items():
            mask = ~truth[label][z] if layout.foreground_black else truth[label][z]
            _write_png(tmp_path / folder / f"{z:02d}.png", mask.astype(np.uint8) * 255)
    vol = read_volume(tmp_path, layout=name)
    np.testing.assert_array_equal(vol.image, images)
    assert sorted(vol.labels) == sorted(layout.label_dirs.values())
    for label, mask in vol.labels.items():
        np.testing.assert_array_equal(mask, truth[label])
    assert vol.pixel_size_nm == layout.pixel_size and f"({name})" in vol.source
    flipped = "foreground-white" if layout.foreground_black else "foreground-black"
    inverted = read_volume(tmp_path, layout=name, polarity=flipped)
    for label, mask in inverted.labels.items():
        np.testing.assert_array_equal(mask, ~truth[label])


def test_required_label_folder_of_a_layout_must_exist(tmp_path):
    assert SLICE_LAYOUTS["isbi"].required == ("masks",)
    _write_png(tmp_path / "images" / "00.png", _images(1)[0])
    with pytest.raises(EmsynthError, match="membrane mask folder does not exist"):
        read_volume(tmp_path, layout="isbi")
    assert read_volume(tmp_path, layout="slices").labels == {}


def test_generic_layout_with_mask_dir_label_and_polarity(tmp_path):
    _, mito = _slice_folder(tmp_path, n=2)
    membranes = _grid(2)
    for z in range(2):
        dark = (~membranes[z]).astype(np.uint8) * 255
        _write_png(tmp_path / "dark_membranes" / f"{z:04d}.png", dark)
    assert resolve_layout(tmp_path, "auto", "masks") == "generic"
    vol = read_volume(tmp_path, mask_dir="dark_membranes", label=MEMBRANE,
                      polarity="foreground-black")
    assert list(vol.labels) == [MEMBRANE]
    np.testing.assert_array_equal(vol.labels[MEMBRANE], membranes)
    assert "dark_membranes as membrane" in vol.source
    absolute = read_volume(tmp_path, layout="slices", mask_dir=str(tmp_path / "masks"))
    np.testing.assert_array_equal(absolute.labels[MITO], mito)


def _epfl(tmp_path, n=5, stem="training"):
    images, mito = _images(n), _blobs(n)
    tifffile.imwrite(tmp_path / f"{stem}.tif", images, photometric="minisblack")
    gt = mito.astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / f"{stem}_groundtruth.tif", gt, photometric="minisblack")
    return images, mito


@pytest.mark.parametrize("stem", ["training", "testing"])
def test_epfl_tiff_folder_file_and_subset(tmp_path, stem):
    images, mito = _epfl(tmp_path, stem=stem)
    assert detect_layout(tmp_path) == "epfl-tiff"
    assert detect_layout(tmp_path / f"{stem}.tif") == "epfl-tiff"
    for path in (tmp_path, tmp_path / f"{stem}.tif"):
        vol = read_volume(path)
        np.testing.assert_array_equal(vol.image, images)
        np.testing.assert_array_equal(vol.labels[MITO], mito)
        assert vol.pixel_size_nm == (5.0, 5.0)
    sub = read_volume(tmp_path, layout="epfl-tiff", indices=[4, 1])
    np.testing.assert_array_equal(sub.image, images[[4, 1]])
    np.testing.assert_array_equal(sub.labels[MITO], mito[[4, 1]])
    assert sub.slice_names == ["0004", "0001"]


def test_epfl_tiff_without_ground_truth_reads_images_with_a_note(tmp_path):
    tifffile.imwrite(tmp_path / "volume.tif", _images(2), photometric="minisblack")
    with pytest.warns(InputWarning, match="no ground truth"):
        vol = read_volume(tmp_path / "volume.tif")
    assert vol.labels == {} and len(vol) == 2


def test_zero_one_masks_and_two_value_masks_are_binary(tmp_path):
    _, mito = _slice_folder(tmp_path, n=2)
    _write_png(tmp_path / "masks" / "0000.png", mito[0].astype(np.uint8))  # 0/1 convention
    _write_png(tmp_path / "masks" / "0001.png", mito[1].astype(np.uint8) * 100)  # {0, 100}
    vol = read_volume(tmp_path)
    np.testing.assert_array_equal(vol.labels[MITO], mito)


def test_rgb_with_equal_channels_and_8bit_in_16bit_are_converted_with_notes(tmp_path):
    images, _mito = _slice_folder(tmp_path, n=3)
    _write_png(tmp_path / "images" / "0000.png", np.repeat(images[0][..., None], 3, axis=-1))
    tifffile.imwrite(tmp_path / "images" / "0001.tif", images[1].astype(np.uint16))
    (tmp_path / "images" / "0001.png").unlink()
    tifffile.imwrite(tmp_path / "images" / "0002.tif", images[2].astype(np.uint16) * 257)
    (tmp_path / "images" / "0002.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_volume(tmp_path)
    messages = " | ".join(str(w.message) for w in caught if w.category is InputWarning)
    assert "RGB images with identical channels read as greyscale" in messages
    assert "8-bit values (0..255) read as-is" in messages
    assert "x 257 divided by 257" in messages
    np.testing.assert_array_equal(vol.image, images)


def test_volume_stats_match_numpy(tmp_path):
    images, mito = _slice_folder(tmp_path, n=3)
    stats = volume_stats(read_volume(tmp_path))
    assert stats["shape"] == [3, *SHAPE]
    assert stats["intensity"]["mean"] == pytest.approx(images.mean(), abs=1e-3)
    assert stats["intensity"]["std"] == pytest.approx(images.std(), abs=1e-3)
    assert stats["intensity"]["p1"] == int(np.percentile(images, 1, method="inverted_cdf"))
    assert stats["intensity"]["p99"] == int(np.percentile(images, 99, method="inverted_cdf"))
    assert stats["label_fractions"][MITO] == pytest.approx(mito.mean())


def test_overlay_colours_labels():
    image = np.full((2, 3), 100, np.uint8)
    labels = {MITO: np.array([[1, 0, 0], [0, 0, 0]], bool),
              MEMBRANE: np.array([[0, 1, 0], [0, 0, 0]], bool),
              SYNAPSE: np.array([[0, 0, 1], [0, 0, 0]], bool)}
    rgb = overlay(image, labels)
    assert rgb[0, 0].argmax() == 0 and rgb[0, 1].argmax() == 1 and rgb[0, 2].argmax() == 2
    np.testing.assert_allclose(rgb[1, 0], [100 / 255] * 3, atol=1e-6)  # unlabelled stays grey
    assert default_slices(20) == [0, 10, 19] and default_slices(2) == [0, 1]


def test_figure_is_small_png_with_red_overlay(tmp_path):
    _slice_folder(tmp_path / "data", n=3)
    vol = read_volume(tmp_path / "data")
    out = save_slice_figure(vol, tmp_path / "fig.png", title="synthetic", z_numbers=[0, 1, 2])
    rgb = iio.imread(out, mode="RGB").astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.sum() > 50  # mitochondria overlay and legend patch
    assert out.stat().st_size < 300_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic
    with pytest.raises(EmsynthError, match="ending in .png"):
        save_slice_figure(vol, tmp_path / "fig.jpg")


def test_cli_info_json_and_show(tmp_path):
    images, mito = _slice_folder(tmp_path / "data", n=4)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", str(tmp_path / "data"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "slices" and info["shape"] == [4, *SHAPE]
    assert info["label_fractions"]["mito"] == pytest.approx(mito.mean())
    assert info["intensity"]["mean"] == pytest.approx(images.mean(), abs=1e-3)
    table = runner.invoke(app, ["data", "info", str(tmp_path / "data")])
    assert table.exit_code == 0 and "label mito" in table.stdout and "slices" in table.stdout
    fig = tmp_path / "out" / "fig.png"
    shown = runner.invoke(app, ["data", "show", str(tmp_path / "data"), "--out", str(fig),
                                "--slices", "0,3"])
    assert shown.exit_code == 0, shown.output
    assert fig.is_file() and "slices [0, 3]" in shown.stdout
    assert iio.imread(fig).shape[1] > iio.imread(fig).shape[0]  # two columns side by side

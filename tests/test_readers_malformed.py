"""Malformed inputs: each fails with one line that names the offending file and says a fix.

Every case builds a small dataset in tmp_path, breaks one thing, and checks the message.
"""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from emsynth.data.readers import detect_layout, read_volume
from emsynth.data.validate import InputWarning
from emsynth.errors import EmsynthError

SHAPE = (40, 56)


def _image(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _mask(seed=0, shape=SHAPE):
    """A plausible mitochondria mask: one disc, about 10% of pixels, 0/255."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = 10 + seed % 20, 12 + seed % 30
    return (((yy - cy) ** 2 + (xx - cx) ** 2) < 64).astype(np.uint8) * 255


def _dataset(root, n=3):
    """images/ + masks/ with n good slices 0000..; returns root."""
    for d in ("images", "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for z in range(n):
        iio.imwrite(root / "images" / f"{z:04d}.png", _image(z))
        iio.imwrite(root / "masks" / f"{z:04d}.png", _mask(z))
    return root


def _epfl(root, n=4, gt_pages=None, gt_shape=SHAPE):
    root.mkdir(parents=True, exist_ok=True)
    grey = {"photometric": "minisblack"}  # one page per slice, as in the official files
    tifffile.imwrite(root / "training.tif", np.stack([_image(z) for z in range(n)]), **grey)
    gt = np.stack([_mask(z, gt_shape) for z in range(gt_pages or n)])
    tifffile.imwrite(root / "training_groundtruth.tif", gt, **grey)
    return root


# Each builder breaks one thing and returns (path to read, read kwargs, offending file,
# a phrase the problem must contain).
def missing_mask(tmp):
    root = _dataset(tmp)
    (root / "masks" / "0001.png").unlink()
    return root, {}, root / "masks", "no mask for 1 image(s) with stem 0001"


def extra_mask(tmp):
    root = _dataset(tmp)
    iio.imwrite(root / "masks" / "0009.png", _mask())
    return root, {}, root / "masks" / "0009.png", "without an image of the same stem: 0009"


def empty_images(tmp):
    root = _dataset(tmp)
    for p in (root / "images").iterdir():
        p.unlink()
    return root, {"layout": "slices"}, root / "images", "folder is empty"


def empty_masks(tmp):
    root = _dataset(tmp)
    for p in (root / "masks").iterdir():
        p.unlink()
    return root, {"layout": "slices"}, root / "masks", "folder is empty"


def image_shape_mismatch(tmp):
    root = _dataset(tmp)
    iio.imwrite(root / "images" / "0002.png", _image(2, (40, 50)))
    return root, {}, root / "images" / "0002.png", "shape 40x50 differs from 0000.png (40x56)"


def mask_shape_mismatch(tmp):
    root = _dataset(tmp)
    iio.imwrite(root / "masks" / "0001.png", _mask(1, (20, 28)))
    return root, {}, root / "masks" / "0001.png", "differs from its image"


def rgb_image(tmp):
    root = _dataset(tmp)
    rgb = np.stack([_image(0), _image(1), _image(2)], axis=-1)
    iio.imwrite(root / "images" / "0000.png", rgb)
    return root, {}, root / "images" / "0000.png", "colour (RGB) image whose channels differ"


def alpha_image(tmp):
    root = _dataset(tmp)
    grey = _image(0)
    iio.imwrite(root / "images" / "0000.png", np.stack([grey, grey, grey, _image(5)], axis=-1))
    return root, {}, root / "images" / "0000.png", "transparency"


def wide_16bit_image(tmp):
    root = _dataset(tmp)
    (root / "images" / "0001.png").unlink()
    wide = np.random.default_rng(0).integers(0, 4096, SHAPE, dtype=np.uint16)
    tifffile.imwrite(root / "images" / "0001.tif", wide)
    return root, {}, root / "images" / "0001.tif", "16-bit image with values"


def float_image(tmp):
    root = _dataset(tmp)
    (root / "images" / "0001.png").unlink()
    tifffile.imwrite(root / "images" / "0001.tif", _image(1).astype(np.float32) / 255)
    return root, {}, root / "images" / "0001.tif", "float32 image"


def nan_image(tmp):
    root = _dataset(tmp)
    (root / "images" / "0001.png").unlink()
    data = _image(1).astype(np.float32)
    data[3, 4] = np.nan
    tifffile.imwrite(root / "images" / "0001.tif", data)
    return root, {}, root / "images" / "0001.tif", "NaN"


def nan_mask(tmp):
    root = _dataset(tmp)
    (root / "masks" / "0001.png").unlink()
    data = (_mask(1) > 0).astype(np.float32)
    data[0, 0] = np.nan
    tifffile.imwrite(root / "masks" / "0001.tif", data)
    return root, {}, root / "masks" / "0001.tif", "NaN"


def binary_image_as_image(tmp):
    root = _dataset(tmp)
    from PIL import Image

    Image.fromarray(_mask(0) > 0).save(root / "images" / "0000.png")
    return root, {}, root / "images" / "0000.png", "looks like a mask"


def greyscale_as_mask(tmp):
    root = _dataset(tmp)
    iio.imwrite(root / "masks" / "0001.png", _image(7))
    return root, {}, root / "masks" / "0001.png", "mask is not binary"


def instance_label_mask(tmp):
    root = _dataset(tmp)
    labels = (_mask(1) > 0).astype(np.uint8)
    labels[:5, :5] = 2
    labels[-5:, -5:] = 3
    iio.imwrite(root / "masks" / "0001.png", labels)
    return root, {}, root / "masks" / "0001.png", "instance label image"


def instance_label_mask_16bit(tmp):
    root = _dataset(tmp)
    (root / "masks" / "0001.png").unlink()
    labels = (_mask(1) > 0).astype(np.uint16) * 300
    labels[:5, :5] = 301
    tifffile.imwrite(root / "masks" / "0001.tif", labels)
    return root, {}, root / "masks" / "0001.tif", "instance label image"


def inverted_masks(tmp):
    root = _dataset(tmp)
    for z in range(3):
        iio.imwrite(root / "masks" / f"{z:04d}.png", 255 - _mask(z))
    return root, {"layout": "slices"}, root / "masks", "looks inverted"


def all_foreground_slice(tmp):
    root = _dataset(tmp, n=4)
    iio.imwrite(root / "masks" / "0002.png", np.full(SHAPE, 255, np.uint8))
    return root, {}, root / "masks" / "0002.png", "foreground everywhere"


def truncated_png(tmp):
    root = _dataset(tmp)
    data = (root / "images" / "0001.png").read_bytes()
    (root / "images" / "0001.png").write_bytes(data[: len(data) // 2])
    return root, {}, root / "images" / "0001.png", "corrupt, truncated or not an image"


def text_named_png(tmp):
    root = _dataset(tmp)
    (root / "masks" / "0002.png").write_text("not an image")
    return root, {}, root / "masks" / "0002.png", "cannot read the file"


def unsupported_format(tmp):
    root = _dataset(tmp)
    for p in (root / "images").iterdir():
        p.with_suffix(".dm3").write_bytes(b"\x00" * 64)
        p.unlink()
    return root, {}, root / "images", "unsupported format .dm3"


def duplicate_stem(tmp):
    root = _dataset(tmp)
    tifffile.imwrite(root / "images" / "0001.tif", _image(1))
    return root, {}, "0001", "two files share the stem '0001'"


def multipage_tiff_in_slice_folder(tmp):
    root = _dataset(tmp)
    (root / "images" / "0001.png").unlink()
    stack = np.stack([_image(1)] * 3)
    tifffile.imwrite(root / "images" / "0001.tif", stack, photometric="minisblack")
    return root, {}, root / "images" / "0001.tif", "multipage TIFF with 3 pages"


def epfl_page_count_mismatch(tmp):
    root = _epfl(tmp / "epfl", n=4, gt_pages=3)
    return root, {}, root / "training_groundtruth.tif", "has 3 pages but the image TIFF has 4"


def epfl_gt_page_shape(tmp):
    root = _epfl(tmp / "epfl", n=2, gt_shape=(20, 20))
    return root, {}, root / "training_groundtruth.tif", "differs from the image pages"


def epfl_truncated_tiff(tmp):
    root = _epfl(tmp / "epfl", n=4)
    data = (root / "training.tif").read_bytes()
    (root / "training.tif").write_bytes(data[:200])
    return root, {}, root / "training.tif", "corrupt or truncated"


def epfl_planar_rgb_stack(tmp):
    root = tmp / "epfl"
    root.mkdir()
    stack = np.stack([_image(z) for z in range(3)])  # tifffile's old default for 3 slices
    tifffile.imwrite(root / "training.tif", stack, photometric="rgb", planarconfig="separate")
    return root, {}, root / "training.tif", "one colour page with 3 separate planes"


def epfl_ground_truth_given_as_image(tmp):
    root = _epfl(tmp / "epfl", n=2)
    gt = root / "training_groundtruth.tif"
    return gt, {}, gt, "this is the ground-truth TIFF"


def broken_meta_json(tmp):
    root = _dataset(tmp)
    (root / "meta.json").write_text("{pixel_size_nm: 5")
    return root, {}, root / "meta.json", "cannot parse meta.json"


def meta_slice_names_mismatch(tmp):
    root = _dataset(tmp)
    (root / "meta.json").write_text(json.dumps({"slice_names": ["a", "b"]}))
    return root, {}, root / "meta.json", "lists 2 slice_names"


def interrupted_write(tmp):
    root = _dataset(tmp)
    (root / "meta.json").write_text(json.dumps({"complete": False, "pixel_size_nm": [5, 5]}))
    return root, {}, root / "meta.json", "not completely written"


def missing_mask_dir(tmp):
    root = _dataset(tmp)
    return root, {"mask_dir": "masks_epfl"}, root / "masks_epfl", "mask folder does not exist"


def no_layout(tmp):
    (tmp / "stuff").mkdir()
    (tmp / "notes.txt").write_text("hello")
    return tmp, {}, tmp, "no known dataset layout"


def unknown_layout(tmp):
    root = _dataset(tmp)
    return root, {"layout": "zarr"}, root, "unknown layout 'zarr'"


def missing_path(tmp):
    return tmp / "nowhere", {}, tmp / "nowhere", "does not exist"


CASES = [
    missing_mask, extra_mask, empty_images, empty_masks, image_shape_mismatch,
    mask_shape_mismatch, rgb_image, alpha_image, wide_16bit_image, float_image, nan_image,
    nan_mask, binary_image_as_image, greyscale_as_mask, instance_label_mask,
    instance_label_mask_16bit, inverted_masks, all_foreground_slice, truncated_png,
    text_named_png, unsupported_format, duplicate_stem, multipage_tiff_in_slice_folder,
    epfl_page_count_mismatch, epfl_gt_page_shape, epfl_truncated_tiff,
    epfl_planar_rgb_stack, epfl_ground_truth_given_as_image, broken_meta_json,
    meta_slice_names_mismatch, interrupted_write, missing_mask_dir, no_layout, unknown_layout,
    missing_path,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_malformed_input_names_file_and_fix(tmp_path, build):
    path, kwargs, offending, problem = build(tmp_path)
    with pytest.raises(EmsynthError) as info:
        read_volume(path, **kwargs)
    message = str(info.value)
    assert problem in message
    assert str(offending) in message
    assert ". Fix: " in message and len(message.split(". Fix: ")[1]) > 10
    assert "\n" not in message


def test_all_empty_mito_masks_warn_but_read(tmp_path):
    root = _dataset(tmp_path)
    for z in range(3):
        iio.imwrite(root / "masks" / f"{z:04d}.png", np.zeros(SHAPE, np.uint8))
    with pytest.warns(InputWarning, match=r"all 3 mito masks are empty"):
        vol = read_volume(root)
    assert not vol.labels["mito"].any()


def test_one_empty_slice_is_plausible(tmp_path, recwarn):
    root = _dataset(tmp_path)
    iio.imwrite(root / "masks" / "0001.png", np.zeros(SHAPE, np.uint8))
    read_volume(root)
    assert not [w for w in recwarn if w.category is InputWarning]


def test_explicit_polarity_accepts_dense_masks(tmp_path):
    root = _dataset(tmp_path)
    for z in range(3):
        iio.imwrite(root / "masks" / f"{z:04d}.png", 255 - _mask(z))
    dense = read_volume(root, layout="slices", polarity="foreground-white")
    assert dense.labels["mito"].mean() > 0.5
    flipped = read_volume(root, layout="slices", polarity="foreground-black")
    np.testing.assert_array_equal(flipped.labels["mito"], ~dense.labels["mito"])


def test_bad_polarity_and_label_values(tmp_path):
    root = _dataset(tmp_path)
    with pytest.raises(EmsynthError, match="unknown polarity 'white'.*Fix: use one of"):
        read_volume(root, polarity="white")
    with pytest.raises(EmsynthError, match="unknown label 'nucleus'.*Fix: use one of"):
        read_volume(root, mask_dir="masks", label="nucleus")


def test_dataset_root_points_at_its_subfolders(tmp_path):
    _dataset(tmp_path / "train")
    with pytest.raises(EmsynthError, match=r"subfolders hold datasets.*train \(slices\)"):
        detect_layout(tmp_path)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "emsynth.cli", "data", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize(
    "build", [missing_mask, greyscale_as_mask, inverted_masks, epfl_page_count_mismatch],
    ids=lambda c: c.__name__,
)
def test_cli_exits_2_with_one_line(tmp_path, build):
    path, kwargs, offending, problem = build(tmp_path)
    extra = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    result = _cli("info", str(path), *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(offending) in lines[0] and problem in lines[0]
    assert "Fix: " in lines[0]


def test_cli_show_rejects_bad_slice_list(tmp_path):
    root = _dataset(tmp_path / "data")
    result = _cli("show", str(root), "--out", str(tmp_path / "f.png"), "--slices", "0,x")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--slices" in result.stderr and "Fix: e.g. --slices 0,5,10" in result.stderr
    result = _cli("show", str(root), "--out", str(tmp_path / "f.png"), "--slices", "0,7")
    assert result.returncode == 2 and "slice index 7 out of range (3 slices)" in result.stderr
    assert not (tmp_path / "f.png").exists()


def test_cli_prints_conversion_notes_and_succeeds(tmp_path):
    root = _dataset(tmp_path / "data")
    grey = _image(0)
    iio.imwrite(root / "images" / "0000.png", np.stack([grey] * 3, axis=-1))
    result = _cli("info", str(root), "--json")
    assert result.returncode == 0, result.stderr
    assert "note:" in result.stderr and "identical channels read as greyscale" in result.stderr
    assert json.loads(result.stdout)["notes"][0].endswith("read as greyscale")

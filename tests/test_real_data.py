"""The three real EM datasets read with the values their README documents.

Fractions were measured with `emsynth data info` (see docs); tolerances cover rounding only,
so a change in thresholding or polarity handling fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emsynth.data.figures import save_slice_figure
from emsynth.data.readers import detect_layout, read_volume, volume_stats
from emsynth.data.volume import MEMBRANE, MITO, SYNAPSE


def test_drosophila_vnc(shared_data):
    path = shared_data / "drosophila_vnc"
    assert detect_layout(path) == "vnc"
    vol = read_volume(path)
    assert vol.shape == (20, 1024, 1024)
    assert vol.pixel_size_nm == (4.6, 4.6)
    assert vol.slice_names[0] == "00" and vol.slice_names[-1] == "19"
    fractions = vol.label_fractions()
    assert set(fractions) == {MITO, MEMBRANE, SYNAPSE}
    assert fractions[MEMBRANE] == pytest.approx(0.2038, abs=0.001)  # README: about 20%
    assert 0.19 < fractions[MEMBRANE] < 0.21
    assert fractions[MITO] == pytest.approx(0.0539, abs=0.001)
    assert fractions[SYNAPSE] == pytest.approx(0.0056, abs=0.0003)
    # Membranes are dark in the raw images; mitochondria are darker than the cytoplasm.
    background = ~(vol.labels[MEMBRANE] | vol.labels[MITO])
    assert vol.image[vol.labels[MEMBRANE]].mean() < vol.image[background].mean() - 30


def test_lucchi_pp_both_label_sets(shared_data):
    path = shared_data / "lucchi_pp" / "train"
    assert detect_layout(path) == "slices"
    lucchi_pp = read_volume(path)
    assert lucchi_pp.shape == (165, 768, 1024)
    assert lucchi_pp.slice_names[0] == "0000" and lucchi_pp.slice_names[-1] == "0164"
    assert lucchi_pp.label_fractions()[MITO] == pytest.approx(0.0669, abs=0.001)
    epfl = read_volume(path, mask_dir="masks_epfl")
    assert epfl.label_fractions()[MITO] == pytest.approx(0.0531, abs=0.001)
    np.testing.assert_array_equal(epfl.image, lucchi_pp.image)
    # README: the two label sets agree at about 0.78 foreground IoU.
    a, b = lucchi_pp.labels[MITO], epfl.labels[MITO]
    assert (a & b).sum() / (a | b).sum() == pytest.approx(0.78, abs=0.03)
    stats = volume_stats(lucchi_pp)["intensity"]
    assert stats["p1"] == 79 and stats["p99"] == 197


def test_isbi2012(shared_data):
    path = shared_data / "isbi2012" / "train"
    assert detect_layout(path) == "isbi"
    vol = read_volume(path)
    assert vol.shape == (30, 512, 512)
    assert list(vol.labels) == [MEMBRANE]
    assert vol.label_fractions()[MEMBRANE] == pytest.approx(0.2196, abs=0.001)  # README: ~22%
    assert vol.image[vol.labels[MEMBRANE]].mean() < vol.image[~vol.labels[MEMBRANE]].mean() - 30


def test_epfl_multipage_tiff_from_lucchi_slices(shared_data, tmp_path):
    """The official EPFL format: slices 0-9 of the training volume as multipage TIFFs."""
    slices = read_volume(shared_data / "lucchi_pp" / "train", mask_dir="masks_epfl",
                         indices=range(10))
    grey = {"photometric": "minisblack"}
    tifffile.imwrite(tmp_path / "training.tif", slices.image, **grey)
    gt = slices.labels[MITO].astype(np.uint8) * 255  # the official ground truth: 255 = mito
    tifffile.imwrite(tmp_path / "training_groundtruth.tif", gt, **grey)
    assert detect_layout(tmp_path) == "epfl-tiff"
    vol = read_volume(tmp_path, layout="epfl-tiff")
    assert vol.shape == (10, 768, 1024) and vol.pixel_size_nm == (5.0, 5.0)
    np.testing.assert_array_equal(vol.image, slices.image)
    np.testing.assert_array_equal(vol.labels[MITO], slices.labels[MITO])
    part = read_volume(tmp_path / "training.tif", indices=[9])
    np.testing.assert_array_equal(part.image[0], slices.image[9])


def test_real_figure_is_small(shared_data, tmp_path):
    vol = read_volume(shared_data / "drosophila_vnc", indices=[0, 9, 19])
    out = save_slice_figure(vol, tmp_path / "vnc.png", title="drosophila_vnc", z_numbers=[0, 9, 19])
    assert 20_000 < out.stat().st_size < 300_000


def test_one_bit_masks_read_as_canonical_bools(shared_data):
    """1-bit PNGs decode to bools stored as byte 255; the reader must hand back 0/1 bytes."""
    volume = read_volume(shared_data / "drosophila_vnc", indices=[0])
    for name in ("membrane", "synapse"):
        assert set(np.unique(volume.labels[name].view(np.uint8))) <= {0, 1}

"""The phantom EM generator, the slice-folder writer and `emsynth data phantom`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.data.phantom import (
    DOMAINS,
    MaskStatistics,
    fit_domain,
    generate_masks,
    generate_slice,
    generate_volume,
    get_domain,
    mask_statistics,
)
from emsynth.data.phantom.noise import EvolvingField, gaussian_noise_field
from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.data.writers import write_slice_folder
from emsynth.errors import EmsynthError

SHAPE = (512, 512)
SEEDS = range(4)


@pytest.fixture(scope="module")
def slices():
    """Four 512 px slices of each domain, generated once for the module."""
    return {name: [generate_slice(name, SHAPE, seed) for seed in SEEDS] for name in DOMAINS}


def _components(mask):
    labels, n = ndi.label(mask)
    return labels, n, np.bincount(labels.ravel())[1:]


def test_same_seed_same_arrays_and_other_seed_differs():
    a = generate_slice("vnc", (128, 160), seed=7)
    b = generate_slice("vnc", (128, 160), seed=7)
    c = generate_slice("vnc", (128, 160), seed=8)
    assert a.image.shape == (128, 160) and a.image.dtype == np.uint8
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mito, b.mito) and np.array_equal(a.membrane, b.membrane)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.membrane, c.membrane)


def test_masks_only_and_one_slice_volume_match_generate_slice():
    s = generate_slice("ca1", (96, 96), seed=3)
    mito, membrane = generate_masks("ca1", (96, 96), seed=3)
    assert np.array_equal(mito, s.mito) and np.array_equal(membrane, s.membrane)
    vol = generate_volume("ca1", 1, (96, 96), seed=3)
    assert np.array_equal(vol.image[0], s.image)
    assert np.array_equal(vol.labels[MITO][0], s.mito)


@pytest.mark.parametrize(
    ("name", "membrane_range", "mito_range"),
    [("vnc", (0.17, 0.27), (0.025, 0.08)), ("ca1", (0.13, 0.24), (0.04, 0.10))],
)
def test_label_fractions_are_realistic(slices, name, membrane_range, mito_range):
    # Real data: VNC membranes 20%, mitochondria 4.5%; CA1 (Lucchi++) mitochondria 6.7%.
    membrane = np.mean([s.membrane.mean() for s in slices[name]])
    mito = np.mean([s.mito.mean() for s in slices[name]])
    assert membrane_range[0] < membrane < membrane_range[1]
    assert mito_range[0] < mito < mito_range[1]
    assert all(s.mito.any() for s in slices[name])


@pytest.mark.parametrize("name", list(DOMAINS))
def test_mitochondria_sit_inside_cells_off_the_membranes(slices, name):
    for s in slices[name]:
        assert not (s.mito & s.membrane).any()
        # at least one pixel of cytoplasm between every mitochondrion and any membrane
        assert not (ndi.binary_dilation(s.mito) & s.membrane).any()
        cells, _, cell_area = _components(~s.membrane)
        mito_labels, n, mito_area = _components(s.mito)
        for i in range(1, n + 1):
            host = np.unique(cells[mito_labels == i])
            assert host.size == 1 and host[0] > 0
            assert cell_area[host[0] - 1] > 1.1 * mito_area[i - 1]  # cytoplasm around it


@pytest.mark.parametrize("name", list(DOMAINS))
def test_mitochondria_have_a_darker_border_than_their_centre(slices, name):
    ring, core = [], []
    for s in slices[name]:
        image = s.image.astype(float)
        ring.append(image[s.mito & ~ndi.binary_erosion(s.mito, iterations=2)].mean())
        centre = ndi.binary_erosion(s.mito, iterations=8)
        core.append(image[centre].mean())
    assert np.mean(ring) < np.mean(core) - 5


@pytest.mark.parametrize("name", list(DOMAINS))
def test_membranes_close_every_cell(slices, name):
    for s in slices[name]:
        cells, n, _ = _components(~s.membrane)
        # Every connected region of non-membrane belongs to exactly one generated cell:
        # a membrane gap would join two cells into one region.
        ids = s.cells[~s.membrane]
        regions = cells[~s.membrane]
        pairs = np.unique(np.stack([regions, ids]), axis=1)
        assert pairs.shape[1] == n
        # and the membranes form one network rather than loose fragments
        _, _, sizes = _components(s.membrane)
        assert sizes.max() > 0.9 * s.membrane.sum()
        assert 20 < n < 200  # a 512 px field holds tens of cells


def test_domains_differ_measurably(slices):
    def stats(name):
        images = np.stack([s.image for s in slices[name]]).astype(float)
        grain = np.mean([(im - ndi.gaussian_filter(im, 2)).std() for im in images])
        membrane = np.stack([s.membrane for s in slices[name]])
        mito = np.stack([s.mito for s in slices[name]])
        cyto = images[~membrane & ~mito].mean()
        # mitochondria are few per slice: measure them on more (mask-only) slices
        more = np.stack([generate_masks(name, SHAPE, seed)[0] for seed in range(10, 18)])
        areas = np.concatenate([_components(m)[2] for m in more])
        return {
            "membrane_contrast": cyto - images[membrane].mean(),
            "std": images.std(),
            "grain": grain,
            "membrane": membrane.mean(),
            "mito": more.mean(),
            "mito_area": np.median(areas[areas > 100]),
        }

    vnc, ca1 = stats("vnc"), stats("ca1")
    assert vnc["membrane_contrast"] > 1.25 * ca1["membrane_contrast"]
    assert vnc["std"] > 1.3 * ca1["std"]
    assert vnc["grain"] > 1.4 * ca1["grain"]  # ssTEM grainier than FIB-SEM
    assert vnc["membrane"] > ca1["membrane"] + 0.01
    assert ca1["mito"] > vnc["mito"] + 0.01
    assert ca1["mito_area"] > 1.1 * vnc["mito_area"]


def test_domain_parameters_control_the_masks():
    base = get_domain("vnc")
    _, membrane = generate_masks(base, (256, 256), 1)
    thick = base.model_copy(update={"membrane_thickness_px": 11.0})
    assert generate_masks(thick, (256, 256), 1)[1].mean() > membrane.mean() + 0.05
    none = base.model_copy(update={"mito_per_mpx": 0.0})
    assert not generate_masks(none, (256, 256), 1)[0].any()
    many = base.model_copy(update={"mito_per_mpx": 60.0})
    counts = [ndi.label(generate_masks(d, (512, 512), 2)[0])[1] for d in (base, many)]
    assert counts[1] > 1.8 * counts[0]


def test_mask_statistics_measure_known_shapes():
    mito = np.zeros((2, 200, 300), bool)
    yy, xx = np.mgrid[:200, :300]
    mito[0] |= ((yy - 100) / 10) ** 2 + ((xx - 100) / 20) ** 2 <= 1  # ellipse 20 x 40
    mito[1] |= ((yy - 50) / 10) ** 2 + ((xx - 150) / 20) ** 2 <= 1
    mito[1, :5, :5] = True  # a profile cut by the border counts, but not for its shape
    membrane = np.zeros_like(mito)
    membrane[:, :, 148:152] = True  # each slice split into two cells
    stats = mask_statistics(mito, membrane)
    assert stats.mito_per_mpx == pytest.approx(3 / (2 * 200 * 300 / 1e6))
    assert stats.mito_width_px == pytest.approx(20, abs=1)
    assert stats.mito_aspect == pytest.approx(2, abs=0.1)
    assert stats.membrane_fraction == pytest.approx(4 / 300)
    assert stats.cells_per_mpx == pytest.approx(4 / (2 * 200 * 300 / 1e6))
    assert mask_statistics(np.zeros((64, 64), bool)).mito_width_px is None


def test_fit_domain_matches_the_statistics_of_another_mask_set():
    def stats(domain, seeds):
        pairs = [generate_masks(domain, (256, 256), seed) for seed in seeds]
        return mask_statistics(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))

    # A narrow cell-size spread keeps the sampling noise of 256 px masks small.
    narrow = {"cell_size_spread": 0.2}
    odd = get_domain("ca1").model_copy(
        update={**narrow, "mito_per_mpx": 70.0, "mito_width_px": 26.0, "cell_size_px": 85.0}
    )
    base = get_domain("vnc").model_copy(update=narrow)
    target = stats(odd, range(100, 116))
    fitted = fit_domain(target, base, (256, 256), n_masks=8, iterations=4)
    before, after = stats(base, range(50, 58)), stats(fitted, range(50, 58))
    assert isinstance(after, MaskStatistics)
    for key in ("mito_per_mpx", "mito_width_px", "membrane_fraction", "cells_per_mpx"):
        want = getattr(target, key)
        assert abs(getattr(before, key) - want) > 0.3 * want, key  # the base is far off
        assert getattr(after, key) == pytest.approx(want, rel=0.3), key


def test_presets_resemble_the_real_mask_sets(shared_data):
    import imageio.v3 as iio

    def tiles(paths, threshold):  # 512 px tiles, the size the phantom stats are measured at
        planes = [iio.imread(p) >= threshold for p in paths]
        return np.stack([t for a in planes for t in (a[:512, :512], a[-512:, -512:])])

    vnc = shared_data / "drosophila_vnc"
    real_vnc = mask_statistics(
        tiles(sorted((vnc / "mitochondria").glob("*.png"))[::2], 128),
        tiles(sorted((vnc / "membranes").glob("*.png"))[::2], 1),  # 1-bit PNG, 1 = membrane
    )
    real_ca1 = mask_statistics(
        tiles(sorted((shared_data / "lucchi_pp/train/masks").glob("*.png"))[::16], 128)
    )
    for name, real in (("vnc", real_vnc), ("ca1", real_ca1)):
        pairs = [generate_masks(name, SHAPE, seed) for seed in range(8)]
        ours = mask_statistics(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        assert ours.mito_fraction == pytest.approx(real.mito_fraction, rel=0.4), name
        assert ours.mito_per_mpx == pytest.approx(real.mito_per_mpx, rel=0.3), name
        assert ours.mito_width_px == pytest.approx(real.mito_width_px, rel=0.25), name
        if real.membrane_fraction is not None:
            assert ours.membrane_fraction == pytest.approx(real.membrane_fraction, rel=0.2)
            assert ours.cells_per_mpx == pytest.approx(real.cells_per_mpx, rel=0.3)


def test_consecutive_slices_are_related():
    vol = generate_volume("vnc", 3, (256, 256), seed=4)
    other = generate_slice("vnc", (256, 256), seed=5)

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    membrane = vol.labels[MEMBRANE]
    assert vol.slice_names == ["0000", "0001", "0002"]
    assert vol.pixel_size_nm == (4.6, 4.6)
    neighbours = iou(membrane[0], membrane[1])
    assert neighbours > iou(membrane[0], other.membrane) + 0.15
    assert neighbours < 0.95  # the tissue evolves with z
    assert np.corrcoef(vol.image[0].ravel(), vol.image[1].ravel())[0, 1] > 0.3


def test_bad_arguments_are_user_errors():
    with pytest.raises(EmsynthError, match="unknown phantom domain 'hippo'"):
        generate_slice("hippo")
    with pytest.raises(EmsynthError, match="too small"):
        generate_slice("vnc", (8, 8))


def test_slice_folder_round_trip(tmp_path):
    vol = generate_volume("ca1", 3, (128, 128), seed=0)
    assert vol.labels[MITO].any(axis=(1, 2)).all()
    vol.slice_names = ["a", "b", "c"]
    out = write_slice_folder(vol, tmp_path / "phantom")
    assert sorted(p.name for p in out.iterdir()) == ["images", "masks", "membranes", "meta.json"]
    assert [p.name for p in sorted((out / "images").iterdir())] == ["0000.png", "0001.png",
                                                                  "0002.png"]
    assert not list(out.rglob(".*"))  # no temporary files left behind
    back = read_volume(out, layout="slices")
    assert np.array_equal(back.image, vol.image)
    assert set(back.labels) == {MITO, MEMBRANE}
    for name in (MITO, MEMBRANE):
        assert np.array_equal(back.labels[name], vol.labels[name])
    assert back.slice_names == ["a", "b", "c"]
    assert back.pixel_size_nm == (5.0, 5.0)
    assert "phantom:ca1:seed=0" in back.source


def test_writer_overwrites_its_own_folder_and_refuses_others(tmp_path):
    out = tmp_path / "out"
    write_slice_folder(generate_volume("vnc", 3, (64, 64), seed=1), out)
    smaller = generate_volume("vnc", 2, (128, 128), seed=5)
    assert smaller.labels[MITO].any()
    smaller.labels.pop(MEMBRANE)
    write_slice_folder(smaller, out)
    assert not (out / "membranes").exists()  # stale label folder of the old volume removed
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["0000.png", "0001.png"]
    back = read_volume(out, layout="slices")
    assert np.array_equal(back.image, smaller.image) and set(back.labels) == {MITO}
    assert json.loads((out / "meta.json").read_text())["complete"] is True

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(EmsynthError, match="not an emsynth slice folder"):
        write_slice_folder(smaller, user)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    odd = Volume(smaller.image, {"nucleus": smaller.labels[MITO]})
    with pytest.raises(EmsynthError, match="nucleus"):
        write_slice_folder(odd, tmp_path / "odd")


def test_cli_phantom_writes_a_readable_folder(tmp_path):
    runner = CliRunner()
    out = tmp_path / "ph"
    args = ["data", "phantom", "--domain", "ca1", "--slices", "2", "--size", "128", "--seed", "0",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "label fractions: mito" in result.stdout and "membrane" in result.stdout
    back = read_volume(out, layout="slices")
    expected = generate_volume("ca1", 2, (128, 128), seed=0)
    assert np.array_equal(back.image, expected.image)
    bad = runner.invoke(app, ["data", "phantom", "--domain", "nope", "--out", str(tmp_path / "x")])
    assert isinstance(bad.exception, EmsynthError)
    assert runner.invoke(app, ["data", "phantom", "--help"]).exit_code == 0


def test_noise_fields_have_unit_spread_and_their_correlation_length():
    """The fields the tissue draws from: zero mean, unit std, neighbours correlated over about
    `scale` px, and slice-to-slice fields that drift smoothly from slice 0."""
    rng = np.random.default_rng(0)

    def neighbour_correlation(field, lag):
        return np.corrcoef(field[:, :-lag].ravel(), field[:, lag:].ravel())[0, 1]

    white = gaussian_noise_field(rng, (128, 160), 0)
    smooth = gaussian_noise_field(rng, (128, 160), 6.0)
    for field in (white, smooth):
        assert field.shape == (128, 160) and field.dtype == np.float32
        assert abs(field.mean()) < 0.05 and field.std() == pytest.approx(1.0, abs=0.02)
    assert smooth.std() == pytest.approx(1.0, abs=1e-4)  # normalised after filtering
    assert abs(neighbour_correlation(white, 1)) < 0.05
    assert neighbour_correlation(smooth, 3) > 0.8 > neighbour_correlation(smooth, 20)
    drift = EvolvingField(rng, (64, 64), 4.0, 0.1, n_slices=10)
    assert drift.at(0) is drift.a
    near, far = (np.corrcoef(drift.at(0).ravel(), drift.at(z).ravel())[0, 1] for z in (1, 15))
    assert near > 0.99 and far < 0.3

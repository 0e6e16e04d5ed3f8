"""Mask sources for synthesis: deformed real masks, procedural (phantom) masks, the fit."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from emsynth.data.phantom import generate_volume, mask_statistics
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError
from emsynth.synthesis.masks import (
    deformed_masks,
    fitted_domain,
    mask_volume,
    phantom_masks,
    procedural_masks,
)


@pytest.fixture(scope="module")
def tissue() -> Volume:
    """One 384 px ca1 slice: 4 mitochondria (6% of pixels), membranes on 19%."""
    return generate_volume("ca1", 1, (384, 384), seed=2)


def _dihedral(plane: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(p, k) for p in (plane, plane[::-1]) for k in range(4)]


def test_elastic_deformation_keeps_mitochondria_and_membranes(tissue):
    """Crops of the whole slice, warped without zoom: every mitochondrion survives with its
    area within 10%, the membrane share within 10%, and mitochondria stay off membranes
    (both masks go through one warp)."""
    mito, membrane = tissue.labels[MITO][0], tissue.labels[MEMBRANE][0]
    assert not (mito & membrane).any()
    masks = deformed_masks(tissue, [MITO, MEMBRANE], count=6, size=384, seed=0,
                           elastic_sigma=6.0, elastic_spacing=32, scale_range=0.0)
    assert masks[MITO].shape == (6, 384, 384) and masks[MEMBRANE].dtype == bool
    n_objects = ndi.label(mito)[1]
    for m, b in zip(masks[MITO], masks[MEMBRANE], strict=True):
        assert abs(m.mean() / mito.mean() - 1) < 0.10
        assert abs(b.mean() / membrane.mean() - 1) < 0.10
        assert ndi.label(m)[1] == n_objects
        assert not (m & b).any()
        # Deformed, not only flipped or rotated.
        assert min(np.mean(m != d) for d in _dihedral(mito)) > 0.002


def test_deformation_with_zoom_keeps_the_mask_shares(tissue):
    mito, membrane = tissue.labels[MITO][0], tissue.labels[MEMBRANE][0]
    masks = deformed_masks(tissue, [MITO, MEMBRANE], 6, 384, 0, 6.0, 32, 0.1)
    rel_mito = masks[MITO].mean(axis=(1, 2)) / mito.mean() - 1
    rel_membrane = masks[MEMBRANE].mean(axis=(1, 2)) / membrane.mean() - 1
    assert np.abs(rel_mito).max() < 0.15 and abs(rel_mito.mean()) < 0.05
    assert np.abs(rel_membrane).max() < 0.10
    assert not (masks[MITO] & masks[MEMBRANE]).any()
    assert not np.array_equal(masks[MITO][0], masks[MITO][1])
    same = deformed_masks(tissue, [MITO, MEMBRANE], 6, 384, 0, 6.0, 32, 0.1)
    assert all(np.array_equal(same[k], masks[k]) for k in masks)  # seeded


def test_deformed_crops_shrink_to_the_slice_and_keep_channel_order():
    volume = generate_volume("ca1", 2, (128, 128), seed=1)
    only = deformed_masks(volume, [MITO], 2, 512, 0, 0.0, 32, 0.0)
    assert list(only) == [MITO] and only[MITO].shape == (2, 128, 128)
    # No elastic warp and no zoom: a dihedral copy of a whole slice, exactly.
    plain = deformed_masks(volume, [MEMBRANE, MITO], 2, 128, 0, 0.0, 32, 0.0)
    for m, b in zip(plain[MITO], plain[MEMBRANE], strict=True):
        assert any(np.array_equal(m, d) and np.array_equal(b, e)
                   for z in range(2)
                   for d, e in zip(_dihedral(volume.labels[MITO][z]),
                                   _dihedral(volume.labels[MEMBRANE][z]), strict=True))


def test_procedural_masks_fit_the_real_masks():
    volume = generate_volume("vnc", 2, (256, 256), seed=1)
    masks, label = procedural_masks(volume, [MITO, MEMBRANE], 2, 128, 0, "ca1", fit=False)
    assert label == "procedural (ca1)" and masks[MITO].shape == (2, 128, 128)
    assert not np.array_equal(masks[MEMBRANE][0], masks[MEMBRANE][1])  # independent tissues
    fitted, label = procedural_masks(volume, [MITO, MEMBRANE], 4, 256, 0, "ca1", fit=True)
    assert "fitted" in label
    plain, _ = procedural_masks(volume, [MITO, MEMBRANE], 4, 256, 0, "ca1", fit=False)
    got = mask_statistics(fitted[MITO], fitted[MEMBRANE])
    want = mask_statistics(volume.labels[MITO], volume.labels[MEMBRANE])
    ca1 = mask_statistics(plain[MITO], plain[MEMBRANE])
    # Fitting the ca1 geometry to vnc masks moves the membrane share towards vnc's.
    assert abs(got.membrane_fraction - want.membrane_fraction) < abs(
        ca1.membrane_fraction - want.membrane_fraction)
    only_mito, _ = procedural_masks(volume, [MITO], 1, 64, 0, "vnc", fit=False)
    assert list(only_mito) == [MITO]


def test_phantom_masks_and_procedural_masks_share_one_fit():
    like = generate_volume("vnc", 1, (128, 128), seed=4)
    fitted = fitted_domain("ca1", like, (128, 128))
    # phantom_masks fits on slices of like's size: the same domain, so the same masks.
    volume = phantom_masks("ca1", 1, (96, 96), seed=3, like=like)
    direct = phantom_masks(fitted, 1, (96, 96), seed=3)
    assert np.array_equal(volume.labels[MITO], direct.labels[MITO])
    assert np.array_equal(volume.labels[MEMBRANE], direct.labels[MEMBRANE])
    assert volume.image.shape == (1, 96, 96) and not volume.image.any()
    with pytest.raises(EmsynthError, match="no mito label"):
        fitted_domain("ca1", Volume(like.image, {MEMBRANE: like.labels[MEMBRANE]}), (64, 64))


def test_mask_volume_has_a_blank_image():
    masks = {MITO: np.ones((2, 8, 8), bool)}
    volume = mask_volume(masks, "test masks")
    assert volume.image.shape == (2, 8, 8) and not volume.image.any()
    assert volume.source == "test masks" and volume.labels[MITO].all()


# --- the study's mask layouts: deformed, remodel, procedural ------------------------------------

def _cells_hold_mito(mito: np.ndarray, membrane: np.ndarray) -> bool:
    """Every mitochondrion lies off the membranes, inside one cell (non-membrane region)."""
    for m, b in zip(mito, membrane, strict=True):
        if (m & b).any():
            return False
        cells_, _ = ndi.label(~b, structure=ndi.generate_binary_structure(2, 1))
        objects, n = ndi.label(m)
        for i in range(1, n + 1):
            if len(np.unique(cells_[objects == i])) != 1:
                return False
    return True


@pytest.fixture(scope="module")
def source() -> Volume:
    """Two 384 px ca1 slices: the 'regime' whose annotation every layout starts from."""
    return generate_volume("ca1", 2, (384, 384), seed=2)


@pytest.mark.parametrize("layout", ["deformed", "remodel", "procedural"])
def test_layouts_keep_mito_in_cells_and_membranes_closed(source, layout):
    """Stated bounds, per layout: mitochondria only inside cells; membranes as closed as the
    source's (open skeleton ends <= 10 per 1000 skeleton px; >= 95% of the cytoplasm in
    cell-sized regions); mean mito fraction within 20% of the source's (remodel, deformed)
    or a factor 2 (procedural: a fitted phantom); median profile area within a factor 1.6
    (remodel, deformed) or 2.5 (procedural)."""
    from emsynth.membranes.checks import check_membranes
    from emsynth.study.config import SynthesisConfig
    from emsynth.synthesis.masks import layout_masks, mito_instances

    masks, label = layout_masks(layout, source, [MITO, MEMBRANE], 6, 256, 0, SynthesisConfig())
    assert label and masks[MITO].shape == (6, 256, 256) == masks[MEMBRANE].shape
    assert _cells_hold_mito(masks[MITO], masks[MEMBRANE])
    check = check_membranes(masks[MEMBRANE], masks[MITO])
    assert check.endpoints_per_1k <= 10 and check.cell_area_share >= 0.95
    want = source.labels[MITO].mean()
    ratio = masks[MITO].mean() / want
    bound = 2.0 if layout == "procedural" else 1.2
    assert 1 / bound <= ratio <= bound, ratio
    src_area = np.median([i.area for i in mito_instances(source.labels[MITO])])
    got_area = np.median([i.area for i in mito_instances(masks[MITO])])
    bound = 2.5 if layout == "procedural" else 1.6
    assert 1 / bound <= got_area / src_area <= bound, (got_area, src_area)


def test_remodel_pastes_real_profiles_within_the_observed_range(source):
    """New layouts: the membranes are warped (not a dihedral copy), the mitochondria are the
    source's own profiles at new places, sizes within the observed range (10% slack for
    resampling), a margin from every membrane; seeded."""
    from emsynth.synthesis.masks import PASTE_MARGIN, mito_instances, remodel_masks

    masks = remodel_masks(source, [MITO, MEMBRANE], 4, 256, seed=1)
    areas = [i.area for i in mito_instances(source.labels[MITO])]
    for m, b in zip(masks[MITO], masks[MEMBRANE], strict=True):
        objects, n = ndi.label(m)
        assert n >= 1
        sizes = np.bincount(objects.ravel())[1:]
        assert sizes.min() >= 0.9 * min(areas) and sizes.max() <= 1.1 * max(areas)
        near = ndi.binary_dilation(m, ndi.generate_binary_structure(2, 2), iterations=PASTE_MARGIN)
        assert not (near & b).any()
        for z in range(len(source)):
            crop = source.labels[MEMBRANE][z]
            assert all(not np.array_equal(b, d[:256, :256]) for d in _dihedral(crop))
    again = remodel_masks(source, [MITO, MEMBRANE], 4, 256, seed=1)
    assert all(np.array_equal(again[k], masks[k]) for k in masks)
    other = remodel_masks(source, [MITO, MEMBRANE], 4, 256, seed=2)
    assert not np.array_equal(other[MITO], masks[MITO])
    # Mitochondria alone (no membrane channel): pasted anywhere, no overlaps.
    only = remodel_masks(source, [MITO], 2, 128, seed=0)
    assert list(only) == [MITO] and only[MITO].shape == (2, 128, 128) and only[MITO].any()


def test_layout_figure(tmp_path, source):
    from emsynth.study.config import SynthesisConfig
    from emsynth.synthesis.masks import layout_figure, layout_masks

    sets = {"real": {k: source.labels[k][:, :128, :128] for k in (MITO, MEMBRANE)}}
    for layout in ("deformed", "remodel"):
        sets[layout] = layout_masks(layout, source, [MITO, MEMBRANE], 2, 128, 0,
                                    SynthesisConfig())[0]
    out = layout_figure(tmp_path / "layouts.png", sets, rows=2, title="mask layouts")
    assert out.is_file() and out.stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown mask layout"):
        layout_masks("shuffled", source, [MITO], 1, 64, 0, SynthesisConfig())

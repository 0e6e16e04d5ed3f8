"""Patch sampling, z-block splits and augmentation of the segmentation stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emsynth.data.slices import evenly_spaced, parse_slices, split_blocks, training_slices
from emsynth.data.volume import Volume
from emsynth.errors import EmsynthError
from emsynth.segment import augment
from emsynth.segment.config import AugmentConfig
from emsynth.segment.sampling import MixedSampler, PatchSampler, SegmentData, segment_data


def _volume(z=6, h=80, w=96, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (z, h, w), dtype=np.uint8)
    mito = np.zeros((z, h, w), bool)
    mito[:, 10:14, 20:25] = True  # one small object per slice: 20 px of 7680
    membrane = rng.random((z, h, w)) < 0.1
    return Volume(image=image, labels={"mito": mito, "membrane": membrane})


def test_segment_data_stacks_named_channels():
    vol = _volume()
    data = segment_data(vol, ["image", "mito"], "membrane")
    assert data.inputs.shape == (6, 2, 80, 96) and data.inputs.dtype == np.uint8
    assert np.array_equal(data.inputs[:, 0], vol.image)
    assert set(np.unique(data.inputs[:, 1])) == {0, 255}
    assert np.array_equal(data.target, vol.labels["membrane"])
    with pytest.raises(EmsynthError, match="synapse"):
        segment_data(vol, ["image"], "synapse")


def test_sampling_is_fixed_by_the_seed():
    sampler = PatchSampler(segment_data(_volume(), ["image"], "mito"), 32, 0.5)
    a = sampler.sample(np.random.default_rng(7), 5)
    b = sampler.sample(np.random.default_rng(7), 5)
    c = sampler.sample(np.random.default_rng(8), 5)
    assert a[0].shape == (5, 1, 32, 32) and a[1].shape == (5, 1, 32, 32)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_foreground_bias_fraction(fraction):
    sampler = PatchSampler(segment_data(_volume(), ["image"], "mito"), 32, fraction)
    rng = np.random.default_rng(0)
    has_fg = [sampler.sample(rng, 4)[1].reshape(4, -1).any(axis=1) for _ in range(400)]
    share = np.concatenate(has_fg).mean()
    # A uniform crop (y0 in 0..48, x0 in 0..64) holds part of the object at rows 10-13,
    # columns 20-24 when y0 <= 13 and x0 <= 24.
    uniform = 14 / 49 * 25 / 65
    expected = fraction + (1 - fraction) * uniform
    assert share == pytest.approx(expected, abs=0.05)
    if fraction == 1.0:
        assert share == 1.0


def test_crops_align_image_and_target_and_small_slices_are_padded():
    vol = _volume(z=2, h=20, w=24)
    vol.image[:] = vol.labels["mito"] * 200
    sampler = PatchSampler(segment_data(vol, ["image"], "mito"), 32, 0.5)
    xs, ys = sampler.sample(np.random.default_rng(3), 6)
    assert xs.shape == (6, 1, 32, 32)
    assert np.array_equal(xs[:, 0] > 0, ys[:, 0] > 0)


def test_split_blocks_are_contiguous_and_disjoint():
    train, val, test = split_blocks(165, val=20, test=10, gap=2)
    assert train == list(range(131))
    assert val == list(range(133, 153))
    assert test == list(range(155, 165))
    # The default gap (DEFAULT_GAP, 5): slices 140-144 next to the validation block never train.
    train, val, _ = split_blocks(165, val=20)
    assert train == list(range(140)) and val == list(range(145, 165))
    assert split_blocks(165, val=20, gap=0)[0][-1] == 144
    assert split_blocks(5, val=0) == ([0, 1, 2, 3, 4], [], [])
    # One message for every stage; the caller names the volume and its own settings.
    with pytest.raises(EmsynthError) as err:
        split_blocks(10, val=10, gap=0, where="stack.tif", fix="lower data.val_block")
    assert str(err.value) == ("stack.tif: holding out 10 validation slices leaves no training "
                              "slices in a 10-slice volume. Fix: lower data.val_block")
    with pytest.raises(EmsynthError, match=r"6 validation \+ 3 test slices \(with gaps of 1\)"):
        split_blocks(11, val=6, test=3, gap=1)
    assert split_blocks(12, val=6, test=3, gap=1)[0] == [0]
    with pytest.raises(EmsynthError, match=r"20 validation slices \(with gaps of 5\) leaves no "
                       r"training slices in a 25-slice volume"):
        split_blocks(25, val=20)


def test_training_slices_leave_the_gap_out_on_both_sides():
    assert training_slices(20, [8, 9], gap=2) == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17,
                                                  18, 19]
    # Given training slices inside the gap are left out too; the others are kept in order.
    assert training_slices(20, [16, 17, 18, 19], 5, train=[0, 3, 10, 11, 15]) == [0, 3, 10]
    assert training_slices(6, [5], gap=0) == [0, 1, 2, 3, 4]
    with pytest.raises(EmsynthError, match="holding out 1 slices with a gap of 5 leaves no "
                       "training slices in a 6-slice volume. Fix: set data.val_gap=0"):
        training_slices(6, [5], 5, fix="set data.val_gap=0")


def test_mixed_sampler_draws_each_crop_from_its_source_at_the_given_shares():
    def constant(value: int, size: int) -> SegmentData:
        inputs = np.full((3, 1, size, size), value, np.uint8)
        return SegmentData(inputs, np.zeros((3, size, size), bool), ["image"], "mito",
                           ["a", "b", "c"])

    # Sources of different slice sizes, told apart by their constant value.
    sampler = MixedSampler([PatchSampler(constant(10, 48), 16),
                            PatchSampler(constant(200, 24), 16)], [3.0, 1.0])
    assert sampler.shares.tolist() == [0.75, 0.25]
    xs, ys = sampler.sample(np.random.default_rng(0), 4000)
    assert xs.shape == (4000, 1, 16, 16) and ys.shape == (4000, 1, 16, 16)
    values = xs.reshape(4000, -1)
    assert set(np.unique(values)) == {10, 200}
    assert (values.min(1) == values.max(1)).all()  # every crop from one source
    assert (values[:, 0] == 200).mean() == pytest.approx(0.25, abs=0.03)
    with pytest.raises(ValueError, match="shares"):
        MixedSampler([sampler.samplers[0]], [0.0])


def test_parse_slices_and_evenly_spaced():
    assert parse_slices("0-3,7", 10) == [0, 1, 2, 3, 7]
    with pytest.raises(EmsynthError, match="0-9"):
        parse_slices("5-12", 10)
    with pytest.raises(EmsynthError, match="not a slice range"):
        parse_slices("a-b", 10)
    assert evenly_spaced(list(range(145)), 5) == [0, 36, 72, 108, 144]
    assert evenly_spaced([1, 2], 5) == [1, 2]


EVERYTHING = AugmentConfig(
    dihedral=True,
    elastic_prob=1.0,
    elastic_sigma=6.0,
    elastic_spacing=16,
    rotate_prob=1.0,
    scale_range=0.2,
    noise_prob=1.0,
    intensity_prob=1.0,
)


def _blobs(b=6, size=48, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((b, 1, size, size), np.float32)
    for i in range(b):
        for _ in range(3):
            cy, cx = rng.uniform(8, size - 8, 2)
            radius = rng.uniform(3, 7)
            out[i, 0][(yy - cy) ** 2 + ((xx - cx) / 1.5) ** 2 < radius**2] = 1.0
        out[i, 0, :4, :10] = 1.0  # an asymmetric corner mark, so flips are visible
    return torch.from_numpy(out)


def test_geometric_augmentation_keeps_image_and_label_aligned():
    label = _blobs()
    image = label.clone()
    cfg = EVERYTHING.model_copy(update={"noise_prob": 0.0, "intensity_prob": 0.0})
    params = augment.draw_params(np.random.default_rng(0), cfg, 6, 48)
    out_image, out_label = augment.apply(image, label, params, [0])
    assert not torch.equal(out_label, label)  # something happened
    assert torch.equal((out_image >= 0.5).float(), out_label)
    assert set(out_label.unique().tolist()) <= {0.0, 1.0}


def test_dihedral_inverse_and_intensity_only_touches_image_channels():
    x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    for k in range(8):
        assert torch.equal(augment.inverse_dihedral(augment.dihedral(x, k), k), x)
    square = x[..., :3, :3]
    views = {tuple(augment.dihedral(square, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
    label = _blobs(4, 32)
    image = torch.cat([torch.full_like(label, 0.5), label], dim=1)  # EM channel + mask channel
    cfg = AugmentConfig(dihedral=False, noise_prob=1.0, intensity_prob=1.0)
    params = augment.draw_params(np.random.default_rng(1), cfg, 4, 32)
    out, out_label = augment.apply(image, label, params, [0])
    assert not torch.equal(out[:, 0], image[:, 0])
    assert torch.equal(out[:, 1], image[:, 1]) and torch.equal(out_label, label)
    assert out.min() >= 0 and out.max() <= 1


def test_augmentation_is_fixed_by_the_rng():
    label = _blobs()
    runs = []
    for seed in (5, 5, 6):
        params = augment.draw_params(np.random.default_rng(seed), EVERYTHING, 6, 48)
        runs.append(augment.apply(label.clone(), label.clone(), params, [0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])

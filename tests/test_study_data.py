"""The study's data helpers: z-block splits, regime selections, crops (mask sources for
synthesis: tests/test_synthesis_masks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError
from emsynth.io import resolve_path
from emsynth.study import data
from emsynth.study.config import RegimeConfig, SourceConfig, StudyConfig


def _regime(slices, crop=None) -> RegimeConfig:
    return RegimeConfig(name="r", slices=slices, crop=crop)


def _mito(z: int, h: int, w: int) -> np.ndarray:
    return np.zeros((z, h, w), bool)


def test_selection_is_evenly_spaced_seeded_and_inside_the_training_block():
    train = list(range(40))
    mito = _mito(50, 100, 100)
    picks = {seed: data.select(_regime(5), train, seed, mito) for seed in range(6)}
    for sel in picks.values():
        assert len(sel.slices) == 5 and set(sel.slices) <= set(train)
        gaps = np.diff(sel.slices)
        assert gaps.min() >= 7 and gaps.max() <= 9  # stride 8, rounded down from an offset
        assert sel.corners is None and sel.pixels((100, 100)) == 5 * 100 * 100
    assert len({tuple(s.slices) for s in picks.values()}) > 1  # the seed moves the grid
    assert data.select(_regime(5), train, 3, mito).slices == picks[3].slices
    assert data.select(_regime("all"), train, 0, mito).slices == train


def test_crops_are_seeded_and_fit():
    mito = _mito(10, 64, 80)
    sel = data.select(_regime(2, crop=32), list(range(10)), 1, mito)
    assert sel.crop == 32 and len(sel.corners) == 2
    assert all(0 <= y <= 32 and 0 <= x <= 48 for y, x in sel.corners)
    assert sel.pixels((64, 80)) == 2 * 32 * 32
    assert data.select(_regime(2, crop=32), list(range(10)), 1, mito) == sel
    with pytest.raises(EmsynthError, match="larger than"):
        data.select(_regime(1, crop=65), list(range(10)), 0, mito)
    with pytest.raises(EmsynthError, match="training block has 10"):
        data.select(_regime(11), list(range(10)), 0, mito)


def test_crops_contain_mitochondria():
    mito = _mito(4, 200, 200)
    mito[:, 150:190, 20:60] = True  # one object in a corner: 4% of a slice
    for seed in range(5):
        regime = RegimeConfig(name="c", slices=2, crop=64, min_foreground=0.05)
        sel = data.select(regime, [0, 1, 2, 3], seed, mito)
        for z, (y, x) in zip(sel.slices, sel.corners):
            assert mito[z, y:y + 64, x:x + 64].mean() >= 0.05
    # 0 accepts the first draw; an impossible share keeps the fullest of the draws.
    anywhere = data.select(RegimeConfig(name="c", slices=2, crop=64, min_foreground=0.0),
                           [0, 1, 2, 3], 0, mito)
    assert anywhere.crop == 64
    fullest = data.select(RegimeConfig(name="c", slices=1, crop=64, min_foreground=0.9),
                          [0, 1, 2, 3], 0, mito)
    (y, x), = fullest.corners
    assert mito[fullest.slices[0], y:y + 64, x:x + 64].mean() > 0.2


def test_selection_does_not_depend_on_the_regime_name_or_order():
    mito = _mito(30, 50, 50)
    a = data.select(RegimeConfig(name="x", slices=3, crop=16), list(range(30)), 2, mito)
    b = data.select(RegimeConfig(name="y", slices=3, crop=16), list(range(30)), 2, mito)
    assert a == b


def test_cut_crops_image_and_labels_alike():
    volume = generate_volume("ca1", 4, (64, 64), seed=0)
    sel = data.Selection(slices=[1, 3], corners=[(0, 10), (20, 5)], crop=16)
    extra = {"membrane": np.ones((2, 64, 64), bool)}
    part = data.cut(volume, sel, extra)
    assert part.shape == (2, 16, 16)
    assert np.array_equal(part.image[1], volume.image[3, 20:36, 5:21])
    assert np.array_equal(part.labels[MITO][0], volume.labels[MITO][1, 0:16, 10:26])
    assert part.labels[MEMBRANE].all()  # replaced by the given labels


def test_split_blocks_and_missing_test():
    cfg = StudyConfig.model_validate({
        "data": {"phantom": {"domain": "ca1"}}, "regimes": [{"name": "a", "slices": 1}],
        "split": {"val_block": 3, "test_block": 4, "gap": 1}})
    blocks = data.split(cfg, 20)
    assert blocks.train == list(range(11)) and blocks.val == [12, 13, 14]
    assert blocks.test == [16, 17, 18, 19]
    with pytest.raises(EmsynthError, match="leaves no training slices in a 9-slice volume") as err:
        data.split(cfg, 9)
    assert "split.val_block" in str(err.value)  # the fix names the study's own settings
    cfg.split.test_block = 0
    with pytest.raises(EmsynthError, match="nothing to score"):
        data.split(cfg, 20)


def test_resolve_path_falls_back_to_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = resolve_path("configs/study/demo.yaml", "config", "fix it")
    assert found.is_file() and found.is_absolute()
    with pytest.raises(EmsynthError, match="not found"):
        resolve_path("configs/none.yaml", "config", "fix it")


def test_phantom_source_is_deterministic():
    cfg = SourceConfig(phantom={"domain": "ca1", "slices": 3, "size": 64, "seed": 2})
    assert data.load_source(cfg).key == data.load_source(cfg).key
    other = SourceConfig(phantom={"domain": "ca1", "slices": 3, "size": 64, "seed": 3})
    assert data.load_source(other).key != data.load_source(cfg).key


def test_every_stage_splits_with_the_default_gap():
    """One rule (emsynth.data.slices.training_slices), one default gap (DEFAULT_GAP, 5) for the
    study, segment train, the membrane model and the GAN: slice 145 validates, 140-144 never
    train (before, segment train trained 144 beside the validation block)."""
    from emsynth.config import load_config
    from emsynth.data.slices import DEFAULT_GAP
    from emsynth.gan.config import GanConfig
    from emsynth.gan.train import split_volumes
    from emsynth.membranes.config import MembraneConfig
    from emsynth.segment.config import SegmentConfig
    from emsynth.segment.train import resolve_split

    assert DEFAULT_GAP == 5
    default = resolve_split(load_config(SegmentConfig, None, ["data.val_block=20"]), 165)
    assert default.train == list(range(140)) and default.val == list(range(145, 165))
    no_gap = resolve_split(load_config(SegmentConfig, None, [
        "data.val_block=20", "data.val_gap=0"]), 165)
    assert no_gap.train == list(range(145)) and no_gap.val == default.val
    middle = resolve_split(load_config(SegmentConfig, None, ["data.val_slices='50-59'"]), 100)
    assert middle.train == [*range(45), *range(65, 100)]
    # Given training slices: those inside the gap are left out (README: 0-15 with 16-17 held).
    given = resolve_split(load_config(SegmentConfig, None, [
        "data.train_slices='0-15'", "data.val_slices='16-17'"]), 20)
    assert given.train == list(range(11))
    with pytest.raises(EmsynthError, match="no training slices.*Fix: lower data.val_gap"):
        resolve_split(load_config(SegmentConfig, None, ["data.val_block=15"]), 20)
    # The membrane model: VNC 16-19 held out trains on 0-10.
    membranes = MembraneConfig().segment_config()
    assert resolve_split(membranes, 20).train == list(range(11))
    # The GAN: the last val_block slices of each volume validate, the gap before them is idle.
    phantom = generate_volume("ca1", 12, (32, 32), seed=0)
    gan = GanConfig().data
    (train,), (val,) = split_volumes([phantom], gan.val_block, gan.val_gap)
    assert (gan.val_block, gan.val_gap) == (2, 5)
    assert np.array_equal(train.image, phantom.image[:5])
    assert np.array_equal(val.image, phantom.image[10:])
    assert StudyConfig.model_validate(
        {"data": {"phantom": {"domain": "ca1"}}, "regimes": [{"name": "a", "slices": 1}]}
    ).split.gap == DEFAULT_GAP


def test_crop_membranes_are_predicted_from_the_crop_alone(tmp_path, monkeypatch):
    """The crop regime's membrane channel comes from the crop's own image and mito labels:
    changing the labels outside the crop changes nothing (a whole-slice prediction, then
    cropped, would let them leak in near the crop's edges)."""
    from types import SimpleNamespace

    from scipy import ndimage

    import emsynth.membranes.predict as membrane_predict
    from emsynth.study import runner
    from emsynth.study.cache import canonical_json, sha256_text

    def fake_membranes(mito: np.ndarray) -> np.ndarray:
        """A 'membrane model' with a 41 px receptive field: membranes near mitochondria."""
        return ndimage.uniform_filter(mito.astype(np.float32), size=(1, 41, 41)) > 0.05

    seen = []
    monkeypatch.setattr(membrane_predict.MembraneModel, "load",
                        classmethod(lambda cls, path, device="cpu": SimpleNamespace(threshold=0.5)))
    monkeypatch.setattr(membrane_predict, "predict_membranes",
                        lambda model, volume, mito, device, precision: seen.append(mito.shape)
                        or fake_membranes(mito).astype(np.float32))
    cfg = StudyConfig.model_validate({
        "data": {"phantom": {"domain": "ca1", "slices": 12, "size": 128, "seed": 3}},
        "split": {"val_block": 2, "test_block": 2, "gap": 1},
        "regimes": [{"name": "crop", "slices": 1, "crop": 64}], "seeds": [0],
        "conditions": ["real"]})

    regime = cfg.regimes[0]
    volume = data.load_source(cfg.data).volume
    selection = data.select(regime, data.split(cfg, len(volume)).train, 0, volume.labels[MITO])

    def membranes_of(volume, cache: str) -> np.ndarray:
        state = runner.prepare(cfg, tmp_path)
        state.source.volume = volume
        state.selections[(regime.name, 0)] = selection
        state.membrane_model_dir, state.membrane_cache = tmp_path / "model", tmp_path / cache
        return runner._regime_volume(state, regime, 0, True).labels[MEMBRANE]

    before = membranes_of(volume, "a")
    (z,), ((y, x),) = selection.slices, selection.corners
    assert seen == [(1, 64, 64)]  # the model saw the crop, nothing else
    (png,) = (tmp_path / "a").iterdir()
    assert png.name == f"{z:05d}_y{y}_x{x}_c64.png"
    changed = volume.labels[MITO].copy()
    inside = changed[z, y:y + 64, x:x + 64].copy()
    changed[z] = ~changed[z]  # every label outside the crop flipped
    changed[z, y:y + 64, x:x + 64] = inside
    other = Volume(volume.image, {**volume.labels, MITO: changed}, volume.pixel_size_nm)
    after = membranes_of(other, "b")
    assert np.array_equal(before, after) and before.any()
    # The test has teeth: predicting the whole slice, then cropping, differs.
    window = (slice(y, y + 64), slice(x, x + 64))
    assert not np.array_equal(fake_membranes(volume.labels[MITO][z:z + 1])[0][window],
                              fake_membranes(changed[z:z + 1])[0][window])
    # Cached: a second call predicts nothing.
    membranes_of(volume, "a")
    assert len(seen) == 2
    # GAN cell keys: crops are marked as predicted on the crop; whole slices keep their keys.
    identity = {"model": "m", "threshold": None, "thin_width": 0, "data": "d"}
    whole = data.Selection([3], None, None)
    assert runner.membrane_key(identity, whole) == sha256_text(canonical_json(
        {**identity, "selection": whole.as_dict()}))
    assert runner.membrane_key(identity, selection) != sha256_text(canonical_json(
        {**identity, "selection": selection.as_dict()}))

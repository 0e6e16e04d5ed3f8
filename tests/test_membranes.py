"""Membrane stage units: robustness augmentations, normalisation, plausibility checks, thinning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.morphology import skeletonize
from tiny import unet_micro

from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError
from emsynth.membranes.augment import RobustParams, apply_robust, draw_robust, gaussian_blur
from emsynth.membranes.checks import check_membranes, open_endpoints
from emsynth.membranes.config import INPUTS, TARGET, MembraneConfig, RobustConfig
from emsynth.membranes.normalize import (
    Normalizer,
    match_histogram,
    reference_histogram,
    standardize_slices,
)
from emsynth.membranes.predict import mito_mask, thin_membranes
from emsynth.membranes.task import MembraneTask, MixedSampler
from emsynth.segment.sampling import PatchSampler, segment_data


def _params(b: int, noise=0.0, blur=0.0, drop=False, seed=0) -> RobustParams:
    return RobustParams(np.full(b, noise), np.full(b, blur), np.full(b, drop), seed)


def _inputs(b: int = 2, size: int = 64, grey: float = 0.5) -> torch.Tensor:
    x = torch.full((b, 2, size, size), grey)
    x[:, 1, 16:40, 16:40] = 1.0  # a "mitochondrion" in the mask channel
    return x


# --- augmentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_noise_has_the_drawn_std_on_the_image_channel_only(sigma):
    x = _inputs(b=2, size=128)
    out = apply_robust(x, _params(2, noise=sigma, seed=3))
    measured = (out[:, 0] - x[:, 0]).std().item()
    assert measured == pytest.approx(sigma, rel=0.05)
    assert torch.equal(out[:, 1], x[:, 1])  # mito channel untouched
    assert torch.equal(x, _inputs(b=2, size=128))  # input not modified in place


def test_noise_sigma_is_drawn_up_to_noise_max_with_the_given_probability():
    cfg = RobustConfig(noise_prob=0.5, noise_max=0.1, blur_prob=0.0, mito_dropout=0.0)
    p = draw_robust(np.random.default_rng(0), cfg, 4000)
    noisy = p.noise_sigma[p.noise_sigma > 0]
    assert 0.45 < len(noisy) / 4000 < 0.55
    assert noisy.max() <= 0.1 and noisy.mean() == pytest.approx(0.05, abs=0.005)
    assert not p.drop_mito.any() and not (p.blur_sigma > 0).any()
    off = draw_robust(np.random.default_rng(0), RobustConfig(noise_prob=0.0, blur_prob=0.0), 100)
    assert not off.noise_sigma.any()


def test_blur_smooths_the_image_channel_and_zero_sigma_is_identity():
    rng = torch.Generator().manual_seed(0)
    x = _inputs(b=2, size=64)
    x[:, 0] = torch.rand((2, 64, 64), generator=rng)
    assert torch.equal(apply_robust(x, _params(2)), x)  # nothing drawn: unchanged
    blurred = apply_robust(x, RobustParams(np.zeros(2), np.array([0.0, 2.0]),
                                           np.zeros(2, bool), 0))
    assert torch.allclose(blurred[0], x[0])  # sigma 0 row unchanged
    assert blurred[1, 0].std() < 0.5 * x[1, 0].std()  # white noise strongly smoothed
    assert blurred[1, 0].mean().item() == pytest.approx(x[1, 0].mean().item(), abs=0.01)
    assert torch.equal(blurred[:, 1], x[:, 1])
    flat = gaussian_blur(torch.full((1, 1, 16, 16), 0.3), np.array([1.5]))
    assert torch.allclose(flat, torch.full_like(flat, 0.3), atol=1e-6)


def test_mito_dropout_zeroes_only_the_drawn_mito_channels():
    x = _inputs(b=3)
    out = apply_robust(x, RobustParams(np.zeros(3), np.zeros(3), np.array([True, False, True]), 0))
    assert out[0, 1].sum() == 0 and out[2, 1].sum() == 0
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[:, 0], x[:, 0])


def _phantom_like(n: int = 3, size: int = 64) -> Volume:
    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, (n, size, size), dtype=np.uint8)
    membrane = np.zeros((n, size, size), bool)
    membrane[:, :, 30:34] = True
    mito = np.zeros((n, size, size), bool)
    mito[:, 8:20, 8:20] = True
    return Volume(image=image, labels={MITO: mito, MEMBRANE: membrane})


def _task(**robust) -> MembraneTask:
    cfg = MembraneConfig.model_validate({
        "sampling": {"patch_size": 32, "batch_size": 16},
        "geometry": {"dihedral": False},
        "robust": robust,
        "model": unet_micro(),
        "infer": {"window": 32},
    })
    data = segment_data(_phantom_like(), INPUTS, TARGET)
    return MembraneTask(cfg, data)


def test_full_augmentation_chain_leaves_mito_channel_and_labels_untouched():
    task = _task(noise_prob=1.0, noise_max=0.1, intensity_prob=1.0, blur_prob=1.0, blur_max=2.0)
    batch = task.sample_batch(np.random.default_rng(1))
    x, y = task.augmented(batch, torch.device("cpu"))
    raw = torch.from_numpy(batch.inputs).float() / 255
    assert torch.equal(y, torch.from_numpy(batch.target).float())
    assert torch.equal(x[:, 1], raw[:, 1])
    assert (x[:, 0] - raw[:, 0]).abs().mean() > 0.02  # the image channel did change


def test_no_augmentation_means_inputs_pass_unchanged():
    task = _task(noise_prob=0.0, intensity_prob=0.0, blur_prob=0.0)
    batch = task.sample_batch(np.random.default_rng(1))
    x, _ = task.augmented(batch, torch.device("cpu"))
    assert torch.equal(x, torch.from_numpy(batch.inputs).float() / 255)


def test_mixed_sampler_draws_sources_in_their_shares():
    a = segment_data(_phantom_like(size=64), INPUTS, TARGET)
    b_volume = _phantom_like(size=48)
    b_volume.image[:] = 0  # marks crops from source b
    b = segment_data(b_volume, INPUTS, TARGET)
    sampler = MixedSampler([PatchSampler(a, 32), PatchSampler(b, 32)], [0.7, 0.3])
    inputs, target = sampler.sample(np.random.default_rng(0), 2000)
    from_b = (inputs[:, 0].reshape(len(inputs), -1).max(axis=1) == 0).mean()
    assert inputs.shape == (2000, 2, 32, 32) and target.shape == (2000, 1, 32, 32)
    assert from_b == pytest.approx(0.3, abs=0.03)


# --- normalisation --------------------------------------------------------------------------


def test_standardize_hits_the_target_statistics():
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 20, (3, 64, 64)), 0, 255).astype(np.uint8)
    out = standardize_slices(image, mean=128, std=48)
    assert out.dtype == np.uint8
    for plane in out:
        assert plane.mean() == pytest.approx(128, abs=1)
        assert plane.std() == pytest.approx(48, abs=1)
    assert (standardize_slices(np.full((1, 8, 8), 77, np.uint8)) == 128).all()


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.4, 1.6), shift=st.floats(-40, 40), seed=st.integers(0, 100))
def test_standardize_is_invariant_to_affine_exposure_and_idempotent(scale, shift, seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(128, 25, (2, 48, 48))
    image = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    exposed = np.clip(np.rint(base * scale + shift), 0, 255).astype(np.uint8)
    unclipped = (base * scale + shift > 0).all() and (base * scale + shift < 255).all()
    once = standardize_slices(image)
    if unclipped and (base > 0).all() and (base < 255).all():
        diff = np.abs(once.astype(int) - standardize_slices(exposed).astype(int))
        assert diff.max() <= 3 / min(scale, 1.0)  # equal up to the rounding of the exposures
    # idempotent up to rounding and the clipping of the few tail values beyond 0-255
    assert np.abs(standardize_slices(once).astype(int) - once.astype(int)).max() <= 2


def test_histogram_matching_to_own_histogram_is_identity_and_matches_a_reference():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    same = match_histogram(image[:1], reference_histogram(image[:1]))
    assert np.abs(same.astype(int) - image[:1].astype(int)).max() <= 1
    reference_image = np.clip(rng.normal(90, 15, (1, 128, 128)), 0, 255).astype(np.uint8)
    ref = reference_histogram(reference_image)
    matched = match_histogram(image, ref)
    for plane in matched:
        cdf_out = np.cumsum(np.bincount(plane.ravel(), minlength=256)) / plane.size
        assert np.abs(cdf_out - np.cumsum(ref)).max() < 0.05
        assert plane.mean() == pytest.approx(reference_image.mean(), abs=2)


def test_normalizer_round_trips_through_model_metadata():
    rng = np.random.default_rng(0)
    train = rng.integers(30, 220, (2, 32, 32), dtype=np.uint8)
    image = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    for method in ("none", "standardize", "histmatch"):
        cfg = MembraneConfig.model_validate({"normalize": {"method": method}}).normalize
        fitted = Normalizer.fit(cfg, train)
        restored = Normalizer.from_dict(fitted.as_dict())
        assert np.array_equal(fitted(image), restored(image))
        assert np.array_equal(fitted(image[0]), fitted(image)[0])
    assert np.array_equal(Normalizer()(image), image)


# --- config ---------------------------------------------------------------------------------


def test_config_is_a_two_channel_membrane_segmenter_and_rejects_bad_sizes():
    seg = MembraneConfig().segment_config()
    assert seg.data.inputs == ["image", "mito"] and seg.data.target == "membrane"
    assert seg.augment.noise_prob == 0.0  # noise is this stage's own (sigma drawn)
    with pytest.raises(ValueError, match="multiple of"):
        MembraneConfig.model_validate({"sampling": {"patch_size": 100}})


def test_mito_channel_sources():
    volume = _phantom_like()
    assert np.array_equal(mito_mask(volume, "labels"), volume.labels[MITO])
    assert not mito_mask(volume, "zeros").any()
    bare = Volume(image=volume.image, source="slices-without-masks")
    with pytest.raises(EmsynthError, match="--mito-from zeros"):
        mito_mask(bare, "labels")
    with pytest.raises(EmsynthError, match="neither labels, zeros"):
        mito_mask(bare, "/no/such/model")


# --- plausibility checks and thinning -------------------------------------------------------


def _grid(size: int = 120, spacing: int = 30, width: int = 3) -> np.ndarray:
    membrane = np.zeros((size, size), bool)
    for k in range(0, size, spacing):
        membrane[k : k + width, :] = True
        membrane[:, k : k + width] = True
    return membrane


def test_closed_boundaries_have_no_open_ends_and_cell_sized_regions():
    p = check_membranes(_grid(), min_region_px=150)
    assert p.endpoints_per_1k == 0.0
    assert p.fragment_share == 0.0 and p.cell_area_share == 1.0
    assert p.regions == 16
    assert not p.flags()


def test_broken_boundaries_show_open_ends_and_merged_regions():
    broken = _grid()
    broken[40:50, 60:63] = False  # gaps in two vertical walls
    broken[70:80, 30:33] = False
    p = check_membranes(broken, min_region_px=150)
    closed = check_membranes(_grid(), min_region_px=150)
    assert closed.endpoints_per_1k == 0.0 and p.endpoints_per_1k > 3.0
    assert open_endpoints(skeletonize(broken)) == 4  # two ends per gap
    assert p.regions == closed.regions - 2


def test_speckled_membranes_are_flagged_as_fragments():
    rng = np.random.default_rng(0)
    speckle = rng.random((120, 120)) < 0.45
    p = check_membranes(speckle)
    assert p.fragment_share > 0.5
    assert any("fragments" in f for f in p.flags())


def test_membrane_through_a_mitochondrion_is_flagged():
    membrane = _grid()
    mito = np.zeros_like(membrane)
    yy, xx = np.mgrid[:120, :120]
    mito[(yy - 45) ** 2 + (xx - 45) ** 2 < 12**2] = True  # centred in a cell: no crossing
    clean = check_membranes(membrane, mito)
    assert clean.mito_interior_on_membrane == 0.0 and not clean.flags()
    crossed = membrane.copy()
    crossed[43:47, 30:60] = True  # a membrane through it
    hit = check_membranes(crossed, mito)
    assert hit.mito_interior_on_membrane > 0.05
    assert any("cross mitochondria" in f for f in hit.flags())


def test_open_endpoints_ignore_lines_leaving_the_image():
    line = np.zeros((40, 40), bool)
    line[20, :] = True
    assert open_endpoints(line) == 0
    line[20, 25:] = False
    assert open_endpoints(line) == 1


def test_thinning_gives_the_requested_width_and_keeps_cells_closed():
    thick = _grid(width=9)[None]
    for width in (1, 3, 5):
        thin = thin_membranes(thick, width)
        assert thin.sum() < thick.sum()
        assert check_membranes(thin).regions == check_membranes(thick).regions
        # width measured across a wall, away from crossings
        assert thin[0, 15, 20:50].sum() == width
    bare = thin_membranes(thick, 1)[0]
    assert np.array_equal(skeletonize(bare), bare)  # width 1 is the skeleton itself
    with pytest.raises(ValueError):
        thin_membranes(thick, 0)


@pytest.mark.filterwarnings("ignore::emsynth.data.validate.InputWarning")  # no masks/: expected
def test_membrane_only_extra_slices_get_a_zero_mito_channel_and_join_the_sampler(tmp_path):
    from emsynth.data.writers import write_slice_folder
    from emsynth.membranes.task import load_extra

    extra_volume = _phantom_like(n=2, size=48)
    del extra_volume.labels[MITO]
    folder = write_slice_folder(extra_volume, tmp_path / "membranes_only")
    cfg = MembraneConfig.model_validate({
        "data": {"extra_path": str(folder), "extra_mito": "zeros", "extra_share": 0.5},
        "sampling": {"patch_size": 32, "batch_size": 8},
        "model": unet_micro(),
        "infer": {"window": 32},
    })
    extra = load_extra(cfg, Normalizer(), "cpu")
    assert extra.channel_names == INPUTS and extra.inputs.shape == (2, 2, 48, 48)
    assert not extra.inputs[:, 1].any()
    assert np.array_equal(extra.target, extra_volume.labels[MEMBRANE])
    task = MembraneTask(cfg, segment_data(_phantom_like(), INPUTS, TARGET), extra=extra)
    assert isinstance(task.sampler, MixedSampler)
    batch = task.sample_batch(np.random.default_rng(0))
    assert batch.inputs.shape == (8, 2, 32, 32)
    no_membranes = _phantom_like(n=1, size=48)
    del no_membranes.labels[MEMBRANE]
    bad = write_slice_folder(no_membranes, tmp_path / "no_membranes")
    with pytest.raises(EmsynthError, match="no membrane labels"):
        load_extra(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"extra_path": str(bad)})}), Normalizer(), "cpu")


def test_checks_and_thinning_accept_bools_stored_as_byte_255():
    """1-bit PNG masks can arrive as bools whose bytes are 255; skeletonize must not see them."""
    grid = _grid()
    odd = (grid.astype(np.uint8) * 255).view(bool)
    assert odd.view(np.uint8).max() == 255
    assert check_membranes(odd) == check_membranes(grid)
    assert np.array_equal(thin_membranes(odd[None], 3), thin_membranes(grid[None], 3))


# --- configs compose, prediction, the thin CLI ----------------------------------------------


def test_geometry_is_the_segment_stage_class_and_keeps_its_keys():
    from emsynth.segment.config import AugmentConfig, GeometryConfig

    cfg = MembraneConfig.model_validate({"geometry": {"elastic_prob": 0.3, "scale_range": 0.15}})
    assert type(cfg.geometry) is GeometryConfig
    assert set(cfg.geometry.model_dump()) == {"dihedral", "elastic_prob", "elastic_sigma",
                                              "elastic_spacing", "rotate_prob", "scale_range"}
    augment = cfg.segment_config().augment
    assert isinstance(augment, AugmentConfig)
    assert {k: getattr(augment, k) for k in cfg.geometry.model_dump()} == cfg.geometry.model_dump()
    assert augment.intensity_prob == cfg.robust.intensity_prob and augment.noise_prob == 0.0


def _membrane_model_run(tmp_path, threshold: float = 0.5):
    """A tiny untrained membrane model exported as `membranes train` does: run/model."""
    from emsynth.membranes.task import META_KEY
    from emsynth.segment.config import InferConfig, ModelConfig
    from emsynth.segment.model import MODEL_DIR, Segmenter, build_model

    model = ModelConfig(**unet_micro())
    torch.manual_seed(0)
    Segmenter(build_model(model, 2), model, list(INPUTS), TARGET, threshold,
              InferConfig(window=32, sw_batch_size=2),
              {META_KEY: {"normalizer": Normalizer().as_dict()}}).save(tmp_path / "run" / MODEL_DIR)
    return tmp_path / "run"


def test_predict_volume_thresholds_thins_scores_and_checks(tmp_path):
    from emsynth.membranes.predict import (
        MembraneModel,
        format_scores,
        membrane_scores,
        predict_membranes,
        predict_volume,
    )

    volume = _phantom_like(n=2, size=64)
    model = MembraneModel.load(_membrane_model_run(tmp_path))  # the run folder resolves
    assert model.path == tmp_path / "run" / "model"
    prob = predict_membranes(model, volume, volume.labels[MITO], precision="fp32")
    thr = float(np.median(prob))
    result = predict_volume(model, volume, "labels", threshold=thr, thin_width=3,
                            precision="fp32", data="somewhere")
    truth = volume.labels[MEMBRANE]
    binary = prob >= thr
    assert 0 < binary.mean() < 1
    np.testing.assert_array_equal(result.prob, prob)
    assert np.array_equal(result.membranes, thin_membranes(binary, 3))
    assert result.record["scores"] == membrane_scores(binary, truth)
    assert result.record["scores_thinned"] == membrane_scores(result.membranes, truth)
    assert result.record["threshold"] == thr and result.record["data"] == "somewhere"
    assert result.checks == check_membranes(result.membranes, volume.labels[MITO])
    assert result.record["plausibility"] == result.checks.as_dict()
    lines = format_scores(result.record)
    assert len(lines) == 2 and lines[0].startswith("scores vs") and f"{thr:.3f}" in lines[0]

    default = predict_volume(model, volume, precision="fp32")  # model's threshold, not thinned
    assert default.record["threshold"] == model.threshold == 0.5
    assert np.array_equal(default.membranes, prob >= 0.5)
    assert "scores_thinned" not in default.record
    del volume.labels[MEMBRANE]
    assert format_scores(predict_volume(model, volume, precision="fp32").record) == []


@pytest.mark.filterwarnings("ignore::emsynth.data.validate.InputWarning")
def test_cli_predict_needs_data_and_out_then_check_and_figure_read_its_folder(tmp_path):
    import json

    from typer.testing import CliRunner

    from emsynth.cli import app
    from emsynth.data.writers import write_slice_folder

    run = _membrane_model_run(tmp_path)
    data = write_slice_folder(_phantom_like(n=2, size=64), tmp_path / "data")
    out = tmp_path / "pred"
    missing = CliRunner().invoke(app, ["membranes", "predict", "-m", str(run), "-o", str(out)])
    assert missing.exit_code == 2 and "--data" in missing.output  # no dataset path default
    result = CliRunner().invoke(app, ["membranes", "predict", "-m", str(run), "-d", str(data),
                                      "-o", str(out), "--thin-width", "3"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "prediction.json").read_text())
    assert record["data"] == str(data) and record["thin_width"] == 3
    assert "scores thinned vs" in result.output
    check = CliRunner().invoke(app, ["membranes", "check", str(out), "--json",
                                     str(tmp_path / "check.json")])
    assert check.exit_code == 0, check.output
    numbers = json.loads((tmp_path / "check.json").read_text())
    assert {k: v for k, v in numbers.items() if k != "source"} == record["plausibility"]
    figure = CliRunner().invoke(app, ["membranes", "figure", str(out), "-o",
                                      str(tmp_path / "f.png"), "--truth", str(data)])
    assert figure.exit_code == 0, figure.output
    assert (tmp_path / "f.png").stat().st_size > 0
    bare = CliRunner().invoke(app, ["membranes", "check", str(tmp_path / "data" / "images")])
    assert bare.exit_code != 0

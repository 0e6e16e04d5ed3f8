"""GAN image-quality metrics: FID/KID, grey-level distance, SSIM/PSNR, FCN-score, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import BasicUNet, UNet
from scipy import ndimage
from tiny import GAN_TINY, GAN_TRAIN_ONLY, SEGMENT_TINY
from torch import nn
from typer.testing import CliRunner

from emsynth.cli import app
from emsynth.config import load_config
from emsynth.data.phantom import generate_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.data.writers import write_slice_folder
from emsynth.errors import EmsynthError
from emsynth.gan.config import GanConfig
from emsynth.gan.quality import (
    PSNR_CAP_DB,
    EncoderFeatures,
    _train_once,
    estimate_pixel_noise,
    evaluate_generator,
    frechet_distance,
    grey_level_distance,
    kernel_inception_distance,
    lattice_score,
    local_std_distance,
    random_crops,
    region_windows,
    spectrum_distance,
    ssim_psnr,
    texture_regions,
    texture_scores,
    tstr,
    tstr_real_key,
    tstr_split,
)
from emsynth.gan.train import train_gan
from emsynth.segment.config import SegmentConfig
from emsynth.segment.train import train_segmenter

SEGMENT_40_STEPS = [
    *SEGMENT_TINY, "engine.steps=40", "engine.val_every=40", "engine.log_every=10",
    "engine.image_every=0", "engine.num_threads=1",
]



def _features(seed: int, n: int = 200, d: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_fid_is_zero_for_a_set_and_its_copy_and_grows_with_a_shift():
    a = _features(0)
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-6)
    # A mean shift of 1 in each of 8 dimensions adds |shift|^2 = 8 to the FID.
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=1e-6)
    # A second sample of the same distribution is close; a scaled one is not.
    b = _features(1)
    assert frechet_distance(a, b) < 0.5
    assert frechet_distance(a, 2.0 * b) > 2.0


def test_kid_is_near_zero_on_itself_and_same_distribution_positive_on_a_shift():
    a = _features(0)
    mean, std = kernel_inception_distance(a, a, subsets=5, subset_size=200)
    # Full-set subsets: the unbiased estimate on one set is -2 (mean diagonal - mean
    # off-diagonal kernel) / n, a small negative number that shrinks with n.
    assert -0.1 < mean < 0 and std == pytest.approx(0.0, abs=1e-9)
    same, _ = kernel_inception_distance(a, _features(1), subsets=20, subset_size=100)
    shifted, _ = kernel_inception_distance(a, a + 1.0, subsets=5, subset_size=50)
    assert abs(same) < 0.1 and shifted > 1.0


def _brute_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, written out as loops."""

    def k(a, b):
        return (a @ b / x.shape[1] + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_brute_force_unbiased_mmd():
    x, y = _features(2, n=6, d=3), _features(3, n=5, d=3) + 0.3
    # Subset size 50 is clamped to 5 = len(y); draw the same subsets with the same generator.
    rng = np.random.default_rng(7)
    draws = [_brute_mmd2(x[rng.choice(6, 5, replace=False)], y[rng.choice(5, 5, replace=False)])
             for _ in range(4)]
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=50, seed=7)
    assert mean == pytest.approx(np.mean(draws), rel=1e-9)
    assert std == pytest.approx(np.std(draws), rel=1e-9) and std > 0
    # Subsets as large as both sets are permutations of them: the full-set MMD^2.
    full, _ = kernel_inception_distance(x[:5], y, subsets=2, subset_size=5)
    assert full == pytest.approx(_brute_mmd2(x[:5], y), rel=1e-9) and full > 0


class _Identity(nn.Module):
    """A 'feature network' that passes feature vectors through, to feed torchmetrics."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fid_and_kid_agree_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = _features(0, n=40), _features(1, n=40) * 1.5 + 0.2
    fid = FrechetInceptionDistance(feature=_Identity(), normalize=True).double()
    # Full-size subsets make torchmetrics' random subsets deterministic (permutations).
    kid = KernelInceptionDistance(feature=_Identity(), subsets=3, subset_size=40, normalize=True)
    for metric in (fid, kid):
        metric.update(torch.from_numpy(a), real=True)
        metric.update(torch.from_numpy(b), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=1e-5)
    ours, _ = kernel_inception_distance(a, b, subsets=3, subset_size=40)
    assert ours == pytest.approx(float(kid.compute()[0]), rel=1e-9) and ours > 0.05


def test_grey_level_distance():
    image = np.random.default_rng(0).integers(0, 200, size=(2, 32, 32), dtype=np.uint8)
    assert grey_level_distance(image, image.copy()) == 0.0
    assert grey_level_distance(image, image + 10) == pytest.approx(10.0)
    # Order of pixels does not matter, only the grey-level distribution.
    assert grey_level_distance(image, image[:, ::-1].copy()) == 0.0


def test_ssim_psnr_identical_and_noisy():
    rng = np.random.default_rng(0)
    image = generate_volume("vnc", 2, (64, 64), seed=0).image
    ssim, psnr = ssim_psnr(image, image.copy())
    assert ssim == pytest.approx(1.0) and psnr == PSNR_CAP_DB
    mild = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    strong = np.clip(image + rng.normal(0, 40, image.shape), 0, 255).astype(np.uint8)
    ssim_mild, psnr_mild = ssim_psnr(image, mild)
    ssim_strong, psnr_strong = ssim_psnr(image, strong)
    assert 1.0 > ssim_mild > ssim_strong and PSNR_CAP_DB > psnr_mild > psnr_strong
    assert psnr_mild == pytest.approx(34.2, abs=1.0)  # 20 log10(255 / ~5)


@pytest.mark.parametrize("arch", ["unet", "basicunet"])
def test_encoder_features_pool_the_deepest_level_and_leave_no_hook(arch):
    torch.manual_seed(0)
    if arch == "unet":
        net, depth = UNet(2, 1, 1, channels=(8, 16, 32), strides=(2, 2), num_res_units=1), 32
    else:
        net, depth = BasicUNet(2, 1, 1, features=(4, 4, 8, 8, 12, 4)), 12
    extractor = EncoderFeatures(net.eval())
    x = torch.rand(3, 1, 32, 32)
    features = extractor(x)
    assert features.shape == (3, 2 * depth)
    assert (features[:, depth:] > 0).all()  # the std half
    assert torch.allclose(features[1:2], extractor(x[1:2]), atol=1e-5)
    assert not extractor.block._forward_hooks


def test_random_crops_are_seeded_and_inside():
    stack = np.arange(2 * 1 * 10 * 12, dtype=np.uint8).reshape(2, 1, 10, 12)
    a, b = random_crops(stack, 5, 4, seed=1), random_crops(stack, 5, 4, seed=1)
    assert a.shape == (5, 1, 4, 4) and np.array_equal(a, b)
    assert not np.array_equal(a, random_crops(stack, 5, 4, seed=2))


def _blurred_and_cartoon(volume):
    """The same volume's images blurred (sigma 3) and flat-filled per class (the "cartoon" a
    textureless generator draws: each class at its mean grey)."""
    from scipy import ndimage

    blurred = np.stack([ndimage.gaussian_filter(s.astype(float), 3) for s in volume.image])
    cartoon = np.zeros(volume.shape)
    mito, membrane = volume.labels["mito"], volume.labels["membrane"]
    for region in (mito, membrane & ~mito, ~(mito | membrane)):
        cartoon[region] = volume.image[region].mean()
    return np.rint(blurred).astype(np.uint8), np.rint(cartoon).astype(np.uint8)


def test_texture_statistics_fail_flat_and_blurred_images():
    real = generate_volume("vnc", 2, (256, 256), seed=3)
    rng = np.random.default_rng(0)
    # A textured stand-in for a good generator: the real slice with a little fresh noise.
    textured = np.clip(real.image + rng.normal(0, 3, real.shape), 0, 255).astype(np.uint8)
    blurred, cartoon = _blurred_and_cartoon(real)
    assert spectrum_distance(real.image, real.image.copy()) == 0
    regions = texture_regions(real)
    assert regions["mito"].any() and regions["cytoplasm"].any()
    assert not (regions["mito"] & real.labels["membrane"]).any()
    good = texture_scores(real, textured, crops=8, crop_size=128)
    for flat in (blurred, cartoon):
        bad = texture_scores(real, flat, crops=8, crop_size=128)
        for key in ("spectrum_distance", "local_std_w1_cytoplasm", "local_std_w1_mito"):
            assert bad[key] > 2 * good[key], (key, bad[key], good[key])
        # flat images lose the pixel-level noise; the fresh noise adds to the real one
        assert bad["pixel_noise_cytoplasm"] < 0.5 * bad["pixel_noise_cytoplasm_real"]
    assert good["pixel_noise_cytoplasm"] > good["pixel_noise_cytoplasm_real"] + 1
    assert local_std_distance(real.image, real.image, regions["mito"]) == 0
    assert math.isnan(local_std_distance(real.image, real.image, np.zeros(real.shape, bool)))


def test_region_windows_lie_wholly_inside_the_region():
    region = np.zeros((2, 96, 96), bool)
    region[0, 10:42, 20:52] = True  # exactly one 32 px window, but off the 16 px grid
    region[1, 16:64, 0:48] = True  # 48 x 48 on the grid: corners (16|32, 0|16) = 4 windows
    stack = np.where(region, 1.0, 0.0)
    assert len(region_windows(stack, region)) == 4
    assert region_windows(stack, region).min() == 1.0  # nothing from outside the region
    region[1, 20, 40] = False  # a hole in one window (rows 16-47, columns 16-47) only
    assert len(region_windows(stack, region)) == 3
    assert region_windows(stack, np.zeros_like(region)).shape == (0, 32, 32)


def test_lattice_score_finds_a_regular_pattern_only_inside_its_region():
    """An 8 px lattice (like the grid the CA1 generators draw in mitochondria) on noise scores far
    above the noise alone; the same lattice outside the scored region does not count."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:128, :128]
    lattice = 20 * (np.cos(2 * np.pi * x / 8) + np.cos(2 * np.pi * y / 8))
    noise = 128 + rng.normal(0, 10, (1, 128, 128))
    region = np.zeros((1, 128, 128), bool)
    region[:, :, :64] = True
    inside = np.where(region, noise + lattice, noise)
    outside = np.where(region, noise, noise + lattice)
    assert lattice_score(noise, region) < 0.1
    assert lattice_score(inside, region) > 0.25  # 4 of its 8 peaks, each spread by the window
    assert lattice_score(outside, region) < 0.1
    assert math.isnan(lattice_score(noise, np.zeros_like(region)))


def test_estimate_pixel_noise_recovers_the_noise_of_its_region_and_ignores_smooth_signal():
    """Gaussian noise of std 6 on a smooth ramp and a blurred blob reads as ~6; the noise-free
    signal as ~0; noise of std 20 outside the region does not leak in; no pixel = NaN."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:96, :96]
    smooth = 60 + 0.8 * x + ndimage.gaussian_filter(80.0 * ((x - 48) ** 2 + (y - 48) ** 2 < 400), 4)
    smooth = np.broadcast_to(smooth, (2, 96, 96))
    region = np.zeros((2, 96, 96), bool)
    region[:, 8:88, 8:60] = True
    noisy = smooth + np.where(region, rng.normal(0, 6, region.shape), rng.normal(0, 20, region.shape))
    assert estimate_pixel_noise(noisy, region) == pytest.approx(6.0, rel=0.05)
    assert estimate_pixel_noise(smooth, region) < 0.6
    assert estimate_pixel_noise(noisy, ~region) > 15
    assert math.isnan(estimate_pixel_noise(noisy, np.zeros_like(region)))


def test_tstr_split_and_a_tiny_run(tmp_path):
    assert tstr_split(1) == ([0], [0]) and tstr_split(5) == ([0, 1, 2], [3, 4])
    volume = generate_volume("vnc", 4, (192, 192), seed=0)  # ~10% mito
    _, cartoon = _blurred_and_cartoon(volume)
    synthetic = Volume(cartoon, {k: v.copy() for k, v in volume.labels.items()})
    recipe = load_config(SegmentConfig, None, [*SEGMENT_TINY, "engine.num_threads=1"])
    scores = tstr(volume, synthetic, 3, recipe, work_dir=tmp_path / "tstr")
    assert scores["tstr_steps"] == 3 and scores["tstr_test_slices"] == [2, 3]
    assert (tmp_path / "tstr" / "synthetic" / "model").is_dir()
    assert (tmp_path / "tstr" / "real" / "model").is_dir()
    assert 0 <= scores["tstr_iou_synthetic"] <= 1 and 0 <= scores["tstr_iou_real"] <= 1
    if scores["tstr_iou_real"] > 0:
        assert scores["tstr_ratio"] == pytest.approx(
            scores["tstr_iou_synthetic"] / scores["tstr_iou_real"])


def test_tstr_tells_a_cue_real_slices_lack_from_a_segmenter_that_learned_nothing():
    """Synthetic images whose only cue is mito drawn bright (real mito are dark): the
    synthetic-trained segmenter finds them in synthetic images and not in real ones."""
    volume = generate_volume("vnc", 4, (192, 192), seed=0)  # ~10% mito
    mito = volume.labels["mito"]
    cue = np.where(mito, 230, 40).astype(np.uint8)
    synthetic = Volume(cue, {k: v.copy() for k, v in volume.labels.items()})
    recipe = load_config(SegmentConfig, None, [*SEGMENT_TINY, "engine.num_threads=1"])
    scores = tstr(volume, synthetic, 150, recipe)
    assert scores["tstr_iou_synthetic_on_synthetic"] > 0.8
    assert scores["tstr_iou_synthetic"] < 0.2


def test_tstr_cache_reuses_the_real_reference_only_for_the_same_slices_and_recipe(tmp_path):
    volume = generate_volume("vnc", 4, (192, 192), seed=0)  # ~10% mito
    _, cartoon = _blurred_and_cartoon(volume)
    synthetic = Volume(cartoon, {k: v.copy() for k, v in volume.labels.items()})
    recipe = load_config(SegmentConfig, None, [*SEGMENT_TINY, "engine.num_threads=1"])
    cache = tmp_path / "cache"
    first = tstr(volume, synthetic, 3, recipe, cache_dir=cache)
    (reference,) = cache.iterdir()
    stamp = (reference / "model" / "model.safetensors").stat().st_mtime_ns
    again = tstr(volume, synthetic, 3, recipe, cache_dir=cache)
    assert (reference / "model" / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert again["tstr_iou_real"] == first["tstr_iou_real"]
    # other real images or another step count: a new reference beside the first
    other = generate_volume("vnc", 4, (192, 192), seed=4)
    key = tstr_real_key(volume, [0, 1], recipe)
    assert tstr_real_key(other, [0, 1], recipe) != key
    assert tstr_real_key(volume, [0], recipe) != key
    longer = recipe.model_copy(deep=True)
    longer.engine.steps = 4
    assert tstr_real_key(volume, [0, 1], longer) != key
    # other membranes (which the mito recipe never reads) share it; other mitochondria do not
    thinned = Volume(volume.image,
                     {**volume.labels, MEMBRANE: np.zeros_like(volume.labels[MEMBRANE])})
    assert tstr_real_key(thinned, [0, 1], recipe) == key
    other_mito = volume.labels[MITO].copy()
    other_mito[0, :16, :16] = ~other_mito[0, :16, :16]
    assert tstr_real_key(Volume(volume.image, {**volume.labels, MITO: other_mito}), [0, 1],
                         recipe) != key
    reads_membranes = recipe.model_copy(deep=True)
    reads_membranes.data.inputs = ["image", MEMBRANE]
    assert tstr_real_key(thinned, [0, 1], reads_membranes) != tstr_real_key(
        volume, [0, 1], reads_membranes)


def test_cached_reference_is_trained_once_across_processes(tmp_path):
    """A reference another live process holds the lock on is waited for, not trained again;
    a lock left by a dead process is taken over; no lock is left behind."""
    folder = tmp_path / "tstr-real-key"
    lock = tmp_path / "tstr-real-key.lock"
    calls = []

    def train():
        calls.append(1)
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.json").write_text("{}")

    lock.mkdir()
    (lock / "pid").write_text(str(os.getpid()))  # alive: someone else is training
    threading.Timer(0.3, train).start()  # ... and finishes shortly
    _train_once(train, folder, poll_s=0.05)
    assert calls == [1] and lock.is_dir()  # waited; the owner's lock is the owner's to remove

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.rmtree(folder)
    (lock / "pid").write_text(str(dead.pid))
    _train_once(train, folder, poll_s=0.05)
    assert calls == [1, 1] and not lock.exists()


def test_evaluate_generator_end_to_end(tmp_path):
    volume = generate_volume("vnc", 6, (256, 256), seed=3)
    gan_cfg = load_config(GanConfig, GAN_TINY,
                          ["engine.steps=4", *GAN_TRAIN_ONLY, "data.val_block=1"])
    train_gan(gan_cfg, tmp_path / "gan", resume=False, volumes=[volume])
    seg_cfg = load_config(SegmentConfig, None, SEGMENT_40_STEPS)
    train_segmenter(seg_cfg, volume, tmp_path / "seg", resume=False)
    held_out = volume.select([4, 5])
    scores = evaluate_generator(tmp_path / "gan", held_out, tmp_path / "seg", crops=6,
                                crop_size=64, kid_subsets=5)
    numbers = {k: v for k, v in scores.items() if isinstance(v, float)}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert scores["fcn_iou_real"] > 0.05  # measured 0.129 after 40 steps
    assert scores["synthesis"] == "whole slices"
    assert scores["fcn_ratio"] == pytest.approx(
        scores["fcn_iou_synthetic"] / scores["fcn_iou_real"])
    assert scores["fid"] > 0 and 0 < scores["psnr_db"] < PSNR_CAP_DB and scores["ssim"] < 1
    assert scores["feature_dim"] == 64 and scores["crop_size"] == 64
    assert scores["kid_std"] > 0  # subsets of half the crops differ, so KID has a spread
    assert scores["fid_baseline"] > 0
    assert scores["fid_minus_baseline"] == pytest.approx(scores["fid"] - scores["fid_baseline"])
    assert scores["spectrum_distance"] > 0 and scores["local_std_w1_cytoplasm"] > 0
    assert "tstr_ratio" not in scores
    # The CLI on the same data as a slice folder gives the same numbers and writes the JSON.
    write_slice_folder(volume, tmp_path / "data")
    recipe_yaml = tmp_path / "recipe.yaml"
    recipe_yaml.write_text(yaml.safe_dump(seg_cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, [
        "gan", "evaluate", "--generator", str(tmp_path / "gan"), "--data",
        str(tmp_path / "data"), "--slices", "4-5", "--segmenter", str(tmp_path / "seg" / "model"),
        "--crops", "6", "--crop-size", "64", "--kid-subsets", "5", "--device", "cpu",
        "--json", str(tmp_path / "q.json"), "--tstr-steps", "2", "--tstr-config",
        str(recipe_yaml), "--whole-slice",
    ])
    assert result.exit_code == 0, result.output
    assert "FCN-score" in result.output and "TSTR ratio" in result.output
    assert "FID − FID(real, real)" in result.output
    saved = json.loads((tmp_path / "q.json").read_text())
    for key in ("fcn_iou_real", "fcn_iou_synthetic", "fid", "kid", "ssim", "grey_level_w1",
                "fid_baseline", "spectrum_distance", "local_std_w1_mito"):
        assert saved[key] == pytest.approx(scores[key], rel=1e-6), key
    assert saved["tstr_steps"] == 2 and saved["tstr_test_slices"] == [1]
    assert saved["synthesis"] == "whole slices"
    # Every saved score names the CPU kind and the precision it was computed in.
    from emsynth.engine.device import cpu_kind, resolve_precision
    assert saved["provenance"]["cpu"] == cpu_kind()
    assert saved["provenance"]["precision"] == resolve_precision("auto", torch.device("cpu"))
    # Without --whole-slice the CLI scores images made as `gan synthesize` makes them: tiles.
    tiled = CliRunner().invoke(app, [
        "gan", "evaluate", "--generator", str(tmp_path / "gan"), "--data",
        str(tmp_path / "data"), "--slices", "4-5", "--segmenter", str(tmp_path / "seg" / "model"),
        "--crops", "6", "--crop-size", "64", "--kid-subsets", "5", "--device", "cpu",
        "--json", str(tmp_path / "t.json")])
    assert tiled.exit_code == 0, tiled.output
    assert json.loads((tmp_path / "t.json").read_text())["synthesis"] == \
        "tiles of 256 px, overlap 0.25"
    bad = CliRunner().invoke(app, ["gan", "evaluate", "--generator", str(tmp_path / "gan"),
                                   "--data", str(tmp_path / "data"),
                                   "--segmenter", str(tmp_path / "nothing")])
    # (emsynth.cli.main turns this into one line and exit code 2.)
    assert isinstance(bad.exception, EmsynthError) and "no trained segmenter" in str(bad.exception)

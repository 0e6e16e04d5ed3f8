"""How good are the GAN's images? Offline quality metrics against real, paired EM slices.

- FCN-score: a segmenter trained on real images segments the synthetic ones; its foreground
  IoU (whole volume) against the conditioning mito masks, next to the same score on the real
  images of those masks. The ratio synthetic / real is the headline: 1 means the segmenter
  finds the mitochondria as well in synthetic images as in real ones.
- SSIM and PSNR against the paired real slice (mean over slices). pix2pix is not meant to
  reproduce the real slice pixel for pixel, so these measure structure more than realism.
- FID and KID on features of a domain network, the segmenter's encoder (per-channel spatial
  mean and standard deviation of its deepest level's activations), not an ImageNet Inception:
  no download, and the features are about EM texture. The standard deviation is there because
  the mean alone barely separates textures: on VNC slices with a trained segmenter, FID of
  real crops against blurred (sigma 3) crops was 1.8x the real-vs-real FID with mean pooling
  and 10x with mean and std. Values are therefore comparable only between runs scored with the same
  segmenter.
  Both come with a real-vs-real baseline at the same n: FID/KID of the scored real crops
  against a second set of real crops (other random positions, same seed stream); with few
  crops and many feature dimensions FID is dominated by bias (two samples of N(0, I_512) at
  n = 64 give ~738), so `fid_minus_baseline` is the comparable number.
- Texture statistics that flat images fail: the distance between radially averaged log power
  spectra of real and synthetic crops (a blurred or textureless image loses the high
  frequencies), and the Wasserstein-1 distance between the distributions of local standard
  deviation (7x7) inside cytoplasm and inside mitochondria (masks eroded by the window's
  radius, so that boundary contrast does not count as texture).
- Lattice: a regular pattern the generator draws (a block grid from its upsampling, visible
  inside CA1 mitochondria) and real slices lack. Scored as the share of a window's spectral
  power in its few strongest frequencies (`peak_share`), averaged over 32 px windows wholly
  inside mitochondria, and inside cytoplasm, for the synthetic and, as the baseline, the real
  images. Measured on CA1 it did not predict TSTR: an artefact, not the cue segmenters learn.
- Pixel noise: the standard deviation of pixel-level noise inside cytoplasm and inside
  mitochondria (Immerkaer's Laplacian-difference estimator, grey levels), synthetic and real.
  TSTR on CA1 found that segmenters trained on clean synthetic crops fail on real slices until
  noise is added to their crops; this measures how much cleaner the synthetic images are.
- Wasserstein-1 distance between the grey-level distributions (in grey levels, 0-255).
- TSTR (train on synthetic, test on real; opt-in, `tstr_steps`): the same segmenter recipe
  trained for the same steps on images synthesised from the first half of the slices' masks,
  and on the real images of those slices, both scored on the real second half; the ratio is
  what the study depends on (see `tstr`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from scipy import ndimage
from scipy.stats import wasserstein_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import input_error
from emsynth.gan.export import load_generator
from emsynth.gan.inference import Tiling, synthesize_volume
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import counts
from emsynth.segment.model import MODEL_DIR, SIDECAR, Segmenter, to_float
from emsynth.segment.sampling import segment_data

#: PSNR of identical images is infinite; this cap keeps means and JSON finite.
PSNR_CAP_DB = 100.0


def load_segmenter(path: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """A segmenter from its model folder or from the `emsynth segment train` run folder."""
    return Segmenter.load(path, device)


def deepest_encoder_block(net: nn.Module) -> nn.Module:
    """The bottom (deepest) block of a MONAI UNet or BasicUNet: where the features are."""
    if hasattr(net, "down_4"):  # BasicUNet
        return net.down_4
    block = getattr(net, "model", None)
    if block is None:
        raise TypeError(f"{type(net).__name__} is not a MONAI UNet or BasicUNet")
    # UNet nests Sequential(down, SkipConnection(inner), up); the innermost block is the bottom.
    while isinstance(block, nn.Sequential):
        skips = [m for m in block.children() if type(m).__name__ == "SkipConnection"]
        if not skips:
            break
        block = skips[0].submodule
    return block


class EncoderFeatures(nn.Module):
    """Images (n, c, h, w) float -> (n, 2 * channels): spatial mean, then spatial std, of
    each channel of the deepest level's activations.

    The whole network runs (the decoder's output is discarded): a forward hook on the bottom
    block catches its activations, which keeps this independent of MONAI's internal layout.
    The hook lives only during a forward call, so the segmenter is left as it was.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.block = deepest_encoder_block(net)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        caught: list[torch.Tensor] = []
        handle = self.block.register_forward_hook(lambda _m, _i, output: caught.append(output))
        try:
            self.net(x)
        finally:
            handle.remove()
        deepest = caught[-1].float()
        return torch.cat([deepest.mean(dim=(-2, -1)), deepest.std(dim=(-2, -1))], dim=1)


def random_crops(stack: np.ndarray, count: int, size: int, seed: int) -> np.ndarray:
    """`count` seeded random square crops (count, c, size, size) from a (z, c, y, x) stack."""
    z, _, h, w = stack.shape
    rng = np.random.default_rng(seed)
    out = np.empty((count, stack.shape[1], size, size), stack.dtype)
    for i in range(count):
        k, y, x = rng.integers(z), rng.integers(h - size + 1), rng.integers(w - size + 1)
        out[i] = stack[k, :, y:y + size, x:x + size]
    return out


def crop_side(shape: tuple[int, int], wanted: int, divisor: int) -> int:
    """The largest crop side <= `wanted` that fits the slices and the network's divisor."""
    side = min(wanted, *shape) // divisor * divisor
    if side < divisor:
        raise ValueError(f"slices of {shape} are smaller than the network's divisor {divisor}")
    return side


def encoder_features(segmenter: Segmenter, crops: np.ndarray, device: torch.device,
                     batch: int = 8) -> np.ndarray:
    """Features (n, 2 * channels) float64 of uint8 crops (n, c, s, s) through the segmenter."""
    was_training = segmenter.net.training
    segmenter.net.to(device).eval()
    extractor = EncoderFeatures(segmenter.net)
    try:
        parts = [extractor(to_float(torch.from_numpy(crops[i:i + batch]).to(device))).cpu()
                 for i in range(0, len(crops), batch)]
    finally:
        segmenter.net.train(was_training)
    return torch.cat(parts).double().numpy()


def frechet_distance(real: np.ndarray, fake: np.ndarray, eps: float = 1e-6) -> float:
    """FID: Frechet distance of Gaussians fitted to feature sets (n, d) (Heusel et al. 2017).

    With fewer samples than dimensions the covariances are singular; as pytorch-fid does, a
    small diagonal offset is added when the matrix square root comes out non-finite.
    """
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1 = np.atleast_2d(np.cov(real, rowvar=False))
    s2 = np.atleast_2d(np.cov(fake, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), 0.0))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) over random subsets, each without replacement, as torchmetrics does."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(real[rng.choice(len(real), size, replace=False)],
                              fake[rng.choice(len(fake), size, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def grey_level_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Wasserstein-1 distance (grey levels) between the uint8 intensity distributions."""
    levels = np.arange(256)
    return float(wasserstein_distance(
        levels, levels,
        np.bincount(np.asarray(real, np.uint8).ravel(), minlength=256),
        np.bincount(np.asarray(fake, np.uint8).ravel(), minlength=256),
    ))


def hann_power(images: np.ndarray) -> np.ndarray:
    """Power spectra (n, h, w), zero frequency centred, of mean-subtracted, Hann-windowed
    images (n, h, w): the window keeps the image border from adding a cross of power."""
    _, h, w = images.shape
    window = np.outer(np.hanning(h), np.hanning(w))
    centred = (images - images.mean(axis=(1, 2), keepdims=True)) * window
    return np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2))) ** 2


def radial_power_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean over images (n, s, s) of the radially averaged log10 power spectrum, per integer
    frequency radius 1 .. s // 2 (DC left out; each image mean-subtracted, Hann-windowed)."""
    images = np.asarray(images, np.float64)
    if images.ndim == 2:
        images = images[None]
    _, h, w = images.shape
    power = hann_power(images)
    fy, fx = np.meshgrid(np.arange(h) - h // 2, (np.arange(w) - w // 2) * h / w, indexing="ij")
    radius = np.rint(np.hypot(fy, fx)).astype(int).ravel()
    bins = min(h, w) // 2
    totals = np.stack([np.bincount(radius, p.ravel(), minlength=bins + 1) for p in power])
    count = np.bincount(radius, minlength=bins + 1)
    mean = totals[:, 1:bins + 1] / np.maximum(count[1:bins + 1], 1)
    return np.log10(mean + 1e-12).mean(0)


def spectrum_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean absolute difference (decades) between the radially averaged log power spectra of
    two image sets (n, s, s): 0 for the same textures; blur and flat fills raise it."""
    return float(np.abs(radial_power_spectrum(real) - radial_power_spectrum(fake)).mean())


def local_std(image: np.ndarray, size: int = 7) -> np.ndarray:
    """Standard deviation of the grey level in a size x size window around every pixel."""
    x = np.asarray(image, np.float64)
    mean = ndimage.uniform_filter(x, size)
    return np.sqrt(np.maximum(ndimage.uniform_filter(x * x, size) - mean * mean, 0.0))


def label_regions(volume: Volume) -> dict[str, np.ndarray]:
    """Boolean (z, y, x) masks of `cytoplasm` (neither mito nor membrane) and `mito`."""
    mito = volume.labels.get(MITO, np.zeros(volume.shape, bool)).astype(bool)
    other = mito | volume.labels.get(MEMBRANE, np.zeros(volume.shape, bool)).astype(bool)
    return {"cytoplasm": ~other, "mito": mito}


def texture_regions(volume: Volume, size: int = 7) -> dict[str, np.ndarray]:
    """`label_regions`, each eroded in-plane by the local window's radius (skipped where that
    would empty it)."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    regions = {}
    for name, region in label_regions(volume).items():
        eroded = ndimage.binary_erosion(region, structure, iterations=size // 2)
        regions[name] = eroded if eroded.any() else region
    return regions


def local_std_distance(real: np.ndarray, fake: np.ndarray, region: np.ndarray,
                       size: int = 7) -> float:
    """W1 (grey levels) between the local standard deviation distributions of real and fake
    (z, y, x) stacks inside `region`; NaN when the region is empty."""
    if not region.any():
        return float("nan")
    real_std = np.stack([local_std(r, size) for r in np.asarray(real)])[region]
    fake_std = np.stack([local_std(f, size) for f in np.asarray(fake)])[region]
    return float(wasserstein_distance(real_std, fake_std))


def region_windows(stack: np.ndarray, region: np.ndarray, size: int = 32,
                   stride: int = 16) -> np.ndarray:
    """Every size x size window of a (z, y, x) stack that lies wholly inside the boolean
    `region`, its corners on a `stride` grid: (n, size, size), n = 0 when none fits."""
    stack, region = np.asarray(stack), np.asarray(region, bool)
    inside = ndimage.uniform_filter(region.astype(np.float32), size=(1, size, size),
                                    mode="constant") > 1 - 0.5 / size**2
    # uniform_filter centres an even window at size // 2; keep corners whose window fits.
    corner = inside[:, size // 2:, size // 2:][:, ::stride, ::stride]
    z, y, x = np.nonzero(corner[:, : (region.shape[1] - size) // stride + 1,
                                : (region.shape[2] - size) // stride + 1])
    if not len(z):
        return np.zeros((0, size, size), np.float64)
    return np.stack([stack[k, r * stride:r * stride + size, c * stride:c * stride + size]
                     for k, r, c in zip(z, y, x)]).astype(np.float64)


def peak_share(windows: np.ndarray, min_radius: int = 3, peaks: int = 4) -> np.ndarray:
    """Per window (n, s, s): the share of its spectral power in its `peaks` strongest
    frequencies (each window mean-subtracted and Hann-windowed; frequencies of radius below
    `min_radius` cycles per window, shading and shape, left out). A regular lattice puts its
    power into a few frequencies (and their mirror images, hence 4); noise and natural texture
    spread it: white noise in 32 px windows scores ~0.025."""
    _, h, w = windows.shape
    power = hann_power(windows)
    fy, fx = np.meshgrid(np.arange(h) - h // 2, np.arange(w) - w // 2, indexing="ij")
    band = power[:, np.hypot(fy, fx) >= min_radius]
    top = np.sort(band, axis=1)[:, -peaks:].sum(axis=1)
    return top / np.maximum(band.sum(axis=1), 1e-12)


def lattice_score(stack: np.ndarray, region: np.ndarray, size: int = 32) -> float:
    """Mean `peak_share` of the 32 px windows of `stack` wholly inside `region`; NaN when no
    window fits (small objects: VNC mitochondria are often narrower than 32 px)."""
    windows = region_windows(stack, region, size)
    return float(peak_share(windows).mean()) if len(windows) else float("nan")


#: Immerkaer (1996) "Fast noise variance estimation": the difference of two Laplacians, which
#: cancels smooth signal (to second order) and leaves 36 sigma^2 of white noise's variance.
_NOISE_KERNEL = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def estimate_pixel_noise(stack: np.ndarray, region: np.ndarray) -> float:
    """Standard deviation (grey levels) of white pixel noise in a (z, y, x) stack, estimated
    inside the boolean `region` (pixels whose 3x3 neighbourhood lies in it) by Immerkaer's
    estimator: sqrt(pi / 2) / 6 * mean |image * kernel|. Texture finer than 3 px counts as
    noise, as it does for a segmenter; NaN when no pixel qualifies."""
    return pixel_noise_by_region(stack, {"region": region})["region"]


def pixel_noise_by_region(stack: np.ndarray,
                          regions: dict[str, np.ndarray]) -> dict[str, float]:
    """`estimate_pixel_noise` in each of several regions, convolving the stack once."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    response = np.abs(np.stack([ndimage.convolve(np.asarray(s, np.float64), _NOISE_KERNEL)
                                for s in np.asarray(stack)]))
    scores = {}
    for name, region in regions.items():
        inner = ndimage.binary_erosion(np.asarray(region, bool), structure)
        scores[name] = (float(np.sqrt(np.pi / 2) / 6 * response[inner].mean()) if inner.any()
                        else float("nan"))
    return scores


def texture_scores(volume: Volume, fake: np.ndarray, crops: int = 64, crop_size: int = 256,
                   seed: int = 0) -> dict[str, float]:
    """Texture statistics of synthetic slices `fake` (z, y, x) against the real images of
    `volume`, whose masks they were made from (see the module docstring)."""
    side = min(crop_size, *volume.shape[1:])
    real_crops = random_crops(volume.image[:, None], crops, side, seed)[:, 0]
    fake_crops = random_crops(np.asarray(fake)[:, None], crops, side, seed)[:, 0]
    regions = texture_regions(volume)
    whole = label_regions(volume)  # lattice windows must fit inside, so no erosion
    noise, noise_real = (pixel_noise_by_region(s, whole) for s in (fake, volume.image))
    return {
        "spectrum_distance": spectrum_distance(real_crops, fake_crops),
        "local_std_w1_cytoplasm": local_std_distance(volume.image, fake, regions["cytoplasm"]),
        "local_std_w1_mito": local_std_distance(volume.image, fake, regions["mito"]),
        "lattice_mito": lattice_score(fake, whole["mito"]),
        "lattice_mito_real": lattice_score(volume.image, whole["mito"]),
        "lattice_cytoplasm": lattice_score(fake, whole["cytoplasm"]),
        "lattice_cytoplasm_real": lattice_score(volume.image, whole["cytoplasm"]),
        "pixel_noise_cytoplasm": noise["cytoplasm"],
        "pixel_noise_cytoplasm_real": noise_real["cytoplasm"],
        "pixel_noise_mito": noise["mito"],
        "pixel_noise_mito_real": noise_real["mito"],
    }


def ssim_psnr(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """Mean per-slice SSIM and PSNR (dB, capped at PSNR_CAP_DB) of uint8 (z, y, x) stacks."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.shape != fake.shape:
        raise ValueError(f"real {real.shape} and synthetic {fake.shape} stacks differ in shape")
    if real.ndim == 2:
        real, fake = real[None], fake[None]
    ssims, psnrs = [], []
    for r, f in zip(real, fake):
        ssims.append(structural_similarity(r, f, data_range=255))
        if np.array_equal(r, f):
            psnrs.append(PSNR_CAP_DB)
        else:
            psnrs.append(min(peak_signal_noise_ratio(r, f, data_range=255), PSNR_CAP_DB))
    return float(np.mean(ssims)), float(np.mean(psnrs))


def fcn_iou(segmenter: Segmenter, volume: Volume, device: torch.device,
            precision: str = "auto") -> float:
    """Foreground IoU (whole volume) of the segmenter's mask of `volume` against its mito."""
    inputs = segment_data(volume, segmenter.channel_names, None).inputs
    prob = predict_with(segmenter, inputs, device, precision)
    return counts(prob >= segmenter.threshold, volume.labels[MITO]).iou


def evaluate_generator(
    generator_path: str | Path,
    volume: Volume,
    segmenter_path: str | Path,
    *,
    crops: int = 64,
    crop_size: int = 256,
    seed: int = 0,
    dropout: bool = True,
    kid_subsets: int = 100,
    device: str | torch.device = "cpu",
    precision: str = "auto",
    progress: bool = False,
    tstr_steps: int = 0,
    tstr_config: Any = None,
    tstr_dir: str | Path | None = None,
    tstr_cache: str | Path | None = None,
    tiling: Tiling | None = None,
    pixel_noise: float = 0.0,
) -> dict[str, Any]:
    """Synthesise an image for every mask slice of `volume` and score it against the real one.

    `volume` holds real images with their masks (mito plus whatever else the generator is
    conditioned on). Returns a flat dict of JSON-ready numbers (see the module docstring).
    Crops for FID/KID are drawn at the same seeded positions from real and synthetic slices;
    the real-vs-real baseline uses the next `crops` positions of the same seeded stream.
    tstr_steps > 0 adds TSTR (see `tstr`; tstr_config: its SegmentConfig recipe, tstr_dir:
    where its two segmenters are kept, a temporary folder when None; tstr_cache: where the
    real-trained reference is kept and reused across generators, see `tstr`). tiling: how
    the synthetic slices are made, as `emsynth gan synthesize` (None = whole slices);
    pixel_noise: std (grey levels) of the white noise added to them (`synthesize_volume`).
    """
    device = torch.device(device)
    if MITO not in volume.labels:
        raise input_error(volume.source or "data", "has no mito masks for the FCN-score",
                          "pass a dataset with mitochondria masks")
    generator, conditioning, _ = load_generator(generator_path, device)
    segmenter = load_segmenter(segmenter_path, device)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        job = bar.add_task("synthesising", total=6)
        synthetic = synthesize_volume(generator, volume, conditioning, dropout=dropout,
                                      seed=seed, device=device, precision=precision,
                                      tiling=tiling, pixel_noise=pixel_noise)
        bar.update(job, advance=1, description="segmenting real")
        fcn_real = fcn_iou(segmenter, volume, device, precision)
        bar.update(job, advance=1, description="segmenting synthetic")
        fcn_synthetic = fcn_iou(segmenter, synthetic, device, precision)
        bar.update(job, advance=1, description="encoder features")
        side = crop_side(volume.image.shape[1:], crop_size, segmenter.model.divisor)
        real_inputs = segment_data(volume, segmenter.channel_names, None).inputs
        fake_inputs = segment_data(synthetic, segmenter.channel_names, None).inputs
        # The first `crops` positions are the scored ones (paired with the synthetic crops),
        # the next `crops` the real-vs-real baseline set.
        both = encoder_features(segmenter, random_crops(real_inputs, 2 * crops, side, seed),
                                device)
        real_features, baseline_features = both[:crops], both[crops:]
        fake_features = encoder_features(segmenter, random_crops(fake_inputs, crops, side, seed),
                                         device)
        bar.update(job, advance=1, description="FID, KID, SSIM, texture")
        with warnings.catch_warnings():
            # sqrtm warns about singular covariances when crops < feature channels; handled.
            warnings.simplefilter("ignore", RuntimeWarning)
            fid = frechet_distance(real_features, fake_features)
            fid_baseline = frechet_distance(real_features, baseline_features)
        # Subsets of half the crops: with all of them every subset is the same set and the
        # spread over subsets, reported as KID's uncertainty, would be zero by construction.
        subset = max(2, crops // 2)
        kid, kid_std = kernel_inception_distance(real_features, fake_features, kid_subsets,
                                                 subset_size=subset, seed=seed)
        kid_baseline, _ = kernel_inception_distance(real_features, baseline_features,
                                                    kid_subsets, subset_size=subset, seed=seed)
        ssim, psnr = ssim_psnr(volume.image, synthetic.image)
        texture = texture_scores(volume, synthetic.image, crops, crop_size, seed)
        bar.update(job, advance=1, description="TSTR" if tstr_steps else "done")
        tstr_scores = {}
        if tstr_steps:
            tstr_scores = tstr(volume, synthetic, tstr_steps, tstr_config, device, precision,
                               seed, tstr_dir, tstr_cache)
        bar.update(job, advance=1)
    return {
        "fcn_iou_synthetic": fcn_synthetic,
        "fcn_iou_real": fcn_real,
        "fcn_ratio": fcn_synthetic / fcn_real if fcn_real > 0 else float("nan"),
        "ssim": ssim,
        "psnr_db": psnr,
        "fid": fid,
        "kid": kid,
        "kid_std": kid_std,
        "fid_baseline": fid_baseline,
        "fid_minus_baseline": fid - fid_baseline,
        "kid_baseline": kid_baseline,
        **texture,
        **tstr_scores,
        "grey_level_w1": grey_level_distance(volume.image, synthetic.image),
        "mean_grey_real": float(volume.image.mean()),
        "mean_grey_synthetic": float(synthetic.image.mean()),
        "slices": len(volume),
        "crops": crops,
        "crop_size": side,
        "feature_dim": int(real_features.shape[1]),
        "seed": seed,
        "dropout": dropout,
        "synthesis": f"tiles of {tiling.tile} px, overlap {tiling.overlap}" if tiling
        else "whole slices",
        "pixel_noise_added": pixel_noise,
        "generator": str(generator_path),
        "segmenter": str(segmenter_path),
        "data": volume.source,
    }


def tstr_split(n_slices: int) -> tuple[list[int], list[int]]:
    """(train, test) slice indices for TSTR: the first half (rounded up) and the rest; one
    slice is both (then the real-trained reference has seen its test slice)."""
    if n_slices < 2:
        return [0], [0]
    half = (n_slices + 1) // 2
    return list(range(half)), list(range(half, n_slices))


def tstr_real_key(volume: Volume, train_idx: list[int], cfg: Any) -> str:
    """Content key of TSTR's real-trained reference: the training slices' images, the labels the
    recipe reads (its target and label inputs) and the full recipe (steps and seed included).
    Generators scored on the same slices share it, whatever other masks (e.g. membranes) they
    were conditioned on."""
    digest = hashlib.sha256(cfg.model_dump_json().encode())
    train = volume.select(train_idx)
    digest.update(np.ascontiguousarray(train.image).tobytes())
    for name in sorted({cfg.data.target, *cfg.data.inputs} & set(train.labels)):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(train.labels[name]).tobytes())
    return digest.hexdigest()[:16]


def _train_once(train: Callable[[], Any], folder: Path, poll_s: float = 10.0) -> None:
    """Run `train` (which writes a model into `folder`) unless the model is there. Generators
    scored at once share one cached reference: the process training it holds `<folder>.lock`
    (its pid inside) and the others wait for its model instead of training into the same folder;
    a lock whose process has died is taken over."""
    done = folder / MODEL_DIR / SIDECAR
    lock = folder.with_name(folder.name + ".lock")
    while not done.is_file():
        try:
            lock.mkdir(parents=True)
        except FileExistsError:
            try:
                os.kill(int((lock / "pid").read_text()), 0)
            except ProcessLookupError:  # its trainer died: take the lock over
                shutil.rmtree(lock, ignore_errors=True)
                continue
            except (FileNotFoundError, ValueError, PermissionError):
                pass  # pid not written yet, or another user's live process
            time.sleep(poll_s)
            continue
        try:
            (lock / "pid").write_text(str(os.getpid()))
            if not done.is_file():
                train()
        finally:
            (lock / "pid").unlink(missing_ok=True)
            lock.rmdir()


def tstr(volume: Volume, synthetic: Volume, steps: int, recipe: Any = None,
         device: str | torch.device = "cpu", precision: str = "auto", seed: int = 0,
         work_dir: str | Path | None = None,
         cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train on synthetic, test on real: one segmenter trained only on `synthetic` images of
    the training slices (see `tstr_split`), one trained by the same recipe for the same steps
    on the real images of those slices; both scored (foreground IoU at threshold 0.5, no
    validation, so nothing is chosen on the scored slices) on the real test slices.
    The synthetic-trained one is also scored on the synthetic images of the test slices: high
    there while near 0 on the real ones means the images teach a cue real slices lack (a domain
    gap), not that the segmenter failed to learn.

    recipe: a SegmentConfig (None = its defaults); its steps, seed, validation and
    checkpointing are set here. Returns tstr_iou_synthetic, tstr_iou_synthetic_on_synthetic,
    tstr_iou_real, tstr_ratio and the slices used. cache_dir: the real-trained reference
    depends on the real slices and the recipe only, so it is kept there under its content key
    (`tstr_real_key`) and reused when an ablation scores several generators on the same slices.
    """
    from emsynth.segment.config import SegmentConfig
    from emsynth.segment.train import train_segmenter

    recipe = recipe if recipe is not None else SegmentConfig()
    cfg = recipe.model_copy(deep=True)
    cfg.engine.steps = steps
    cfg.engine.seed = seed
    cfg.engine.checkpoint_every = 0
    cfg.engine.val_every = 0
    cfg.engine.image_every = 0
    cfg.engine.max_time = None
    cfg.data.val_block, cfg.data.val_slices, cfg.data.train_slices = 0, None, None
    cfg.data.val_gap = 0  # no validation block: all training slices train
    cfg.threshold.choose = False
    train_idx, test_idx = tstr_split(len(volume))
    test = volume.select(test_idx)
    scores = {}
    with tempfile.TemporaryDirectory(prefix="emsynth-tstr-") as tmp:
        root = Path(work_dir) if work_dir is not None else Path(tmp)
        folders = {"synthetic": root / "synthetic", "real": root / "real"}
        if cache_dir is not None:
            folders["real"] = Path(cache_dir) / f"tstr-real-{tstr_real_key(volume, train_idx, cfg)}"
        for name, source in (("synthetic", synthetic), ("real", volume)):
            train = partial(train_segmenter, cfg, source.select(train_idx), folders[name],
                            resume=False)
            if name == "real" and cache_dir is not None:
                _train_once(train, folders[name])
            else:
                train()
            model = load_segmenter(folders[name], device)
            model.threshold = 0.5
            scores[name] = fcn_iou(model, test, torch.device(device), precision)
            if name == "synthetic":
                scores["own"] = fcn_iou(model, synthetic.select(test_idx), torch.device(device),
                                        precision)
    return {
        "tstr_iou_synthetic": scores["synthetic"],
        "tstr_iou_synthetic_on_synthetic": scores["own"],
        "tstr_iou_real": scores["real"],
        "tstr_ratio": (scores["synthetic"] / scores["real"] if scores["real"] > 0
                       else float("nan")),
        "tstr_steps": steps,
        "tstr_train_slices": train_idx,
        "tstr_test_slices": test_idx,
    }

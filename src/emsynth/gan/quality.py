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
- Wasserstein-1 distance between the grey-level distributions (in grey levels, 0-255).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from scipy.stats import wasserstein_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from emsynth.data.volume import MITO, Volume
from emsynth.errors import input_error
from emsynth.gan.export import load_generator
from emsynth.gan.inference import synthesize_volume
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import counts
from emsynth.segment.model import Segmenter, to_float
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
) -> dict[str, Any]:
    """Synthesise an image for every mask slice of `volume` and score it against the real one.

    `volume` holds real images with their masks (mito plus whatever else the generator is
    conditioned on). Returns a flat dict of JSON-ready numbers (see the module docstring).
    Crops for FID/KID are drawn at the same seeded positions from real and synthetic slices.
    """
    device = torch.device(device)
    if MITO not in volume.labels:
        raise input_error(volume.source or "data", "has no mito masks for the FCN-score",
                          "pass a dataset with mitochondria masks")
    generator, conditioning, _ = load_generator(generator_path, device)
    segmenter = load_segmenter(segmenter_path, device)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        job = bar.add_task("synthesising", total=5)
        synthetic = synthesize_volume(generator, volume, conditioning, dropout=dropout,
                                      seed=seed, device=device, precision=precision)
        bar.update(job, advance=1, description="segmenting real")
        fcn_real = fcn_iou(segmenter, volume, device, precision)
        bar.update(job, advance=1, description="segmenting synthetic")
        fcn_synthetic = fcn_iou(segmenter, synthetic, device, precision)
        bar.update(job, advance=1, description="encoder features")
        side = crop_side(volume.image.shape[1:], crop_size, segmenter.model.divisor)
        real_inputs = segment_data(volume, segmenter.channel_names, None).inputs
        fake_inputs = segment_data(synthetic, segmenter.channel_names, None).inputs
        real_features = encoder_features(segmenter, random_crops(real_inputs, crops, side, seed),
                                         device)
        fake_features = encoder_features(segmenter, random_crops(fake_inputs, crops, side, seed),
                                         device)
        bar.update(job, advance=1, description="FID, KID, SSIM")
        with warnings.catch_warnings():
            # sqrtm warns about singular covariances when crops < feature channels; handled.
            warnings.simplefilter("ignore", RuntimeWarning)
            fid = frechet_distance(real_features, fake_features)
        # Subsets of half the crops: with all of them every subset is the same set and the
        # spread over subsets, reported as KID's uncertainty, would be zero by construction.
        kid, kid_std = kernel_inception_distance(real_features, fake_features, kid_subsets,
                                                 subset_size=max(2, crops // 2), seed=seed)
        ssim, psnr = ssim_psnr(volume.image, synthetic.image)
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
        "grey_level_w1": grey_level_distance(volume.image, synthetic.image),
        "mean_grey_real": float(volume.image.mean()),
        "mean_grey_synthetic": float(synthetic.image.mean()),
        "slices": len(volume),
        "crops": crops,
        "crop_size": side,
        "feature_dim": int(real_features.shape[1]),
        "seed": seed,
        "dropout": dropout,
        "generator": str(generator_path),
        "segmenter": str(segmenter_path),
        "data": volume.source,
    }

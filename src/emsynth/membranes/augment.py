"""The membrane model's extra domain-robustness augmentations: blur, Gaussian noise with a
random strength (the study's method), and dropping the mitochondria channel.

They run after emsynth.segment.augment (geometry, brightness/contrast/gamma), on the training
device and vectorised over the batch. Like the segment stage, every random number is drawn up
front from the engine's numpy generator (`draw_robust`), so a seed fixes the batches.
Blur and noise touch only the EM image channel; the mitochondria channel is only ever zeroed
whole (`mito_dropout`), and the label is never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from emsynth.membranes.config import RobustConfig


@dataclass
class RobustParams:
    """Per-crop draws for one batch."""

    noise_sigma: np.ndarray  # (b,) Gaussian noise std on the 0-1 scale (0 = none)
    blur_sigma: np.ndarray  # (b,) blur std in pixels (0 = none)
    drop_mito: np.ndarray  # (b,) bool: zero the mitochondria channel
    noise_seed: int


def draw_robust(rng: np.random.Generator, cfg: RobustConfig, batch: int) -> RobustParams:
    """All random numbers of the robustness augmentations for `batch` crops."""
    noisy = rng.random(batch) < cfg.noise_prob
    noise = np.where(noisy, rng.uniform(0.0, cfg.noise_max, batch), 0.0)
    blurred = rng.random(batch) < cfg.blur_prob
    blur = np.where(blurred, rng.uniform(0.0, cfg.blur_max, batch), 0.0)
    drop = rng.random(batch) < cfg.mito_dropout
    return RobustParams(noise, blur, drop, int(rng.integers(0, 2**31 - 1)))


def gaussian_blur(images: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """Blur each (h, w) image of (b, 1, h, w) with its own sigma (0 leaves it unchanged)."""
    radius = max(1, math.ceil(3.0 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    sig = torch.as_tensor(sigmas, dtype=images.dtype, device=images.device).view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sig.clamp_min(1e-6)) ** 2)
    # sigma 0 -> a delta (the exp above underflows to exactly that away from the centre).
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    b, _, h, w = images.shape
    x = images.reshape(1, b, h, w)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(b, 1, 1, -1), groups=b)
    x = F.conv2d(x, kernel.view(b, 1, -1, 1), groups=b)
    return x.reshape(b, 1, h, w)


def apply_robust(
    inputs: torch.Tensor,
    params: RobustParams,
    image_channel: int = 0,
    mito_channel: int | None = 1,
) -> torch.Tensor:
    """Augment float inputs (b, c, h, w) in 0-1: blur, then noise on `image_channel`; zero
    `mito_channel` where drawn. Returns a new tensor; crops with nothing drawn are unchanged."""
    out = inputs.clone()
    blur_rows = np.flatnonzero(params.blur_sigma > 0)
    if len(blur_rows):
        rows = torch.as_tensor(blur_rows, device=inputs.device)
        em = out[rows, image_channel : image_channel + 1]
        out[rows, image_channel : image_channel + 1] = gaussian_blur(
            em, params.blur_sigma[blur_rows]
        )
    if (params.noise_sigma > 0).any():
        gen = torch.Generator(device=inputs.device).manual_seed(params.noise_seed)
        noise = torch.randn(
            (inputs.shape[0], *inputs.shape[-2:]), generator=gen, device=inputs.device,
            dtype=inputs.dtype,
        )
        sigma = torch.as_tensor(params.noise_sigma, dtype=inputs.dtype, device=inputs.device)
        out[:, image_channel] = (out[:, image_channel] + noise * sigma.view(-1, 1, 1)).clamp(0, 1)
    if mito_channel is not None and params.drop_mito.any():
        rows = torch.as_tensor(np.flatnonzero(params.drop_mito), device=inputs.device)
        out[rows, mito_channel] = 0.0
    return out

"""Batch-wise augmentation in torch, with every random number drawn up front from numpy.

`draw_params(rng, ...)` runs in `sample_batch` (so the engine's generator fixes it) and yields
small arrays; `apply(...)` runs on the training device in `train_step`, vectorised over the
batch (one `grid_sample` for all geometric warps), so augmentation stays a small share of a
step on 2 CPU cores and costs nearly nothing on a GPU.

Geometry (dihedral flips/rot90, Ronneberger-style elastic warp from a coarse grid of random
control-point displacements upsampled bicubically, free rotation, zoom) is applied identically
to every input channel and the label; labels are resampled bilinearly and re-thresholded at 0.5,
so an image equal to its label stays equal to it. Intensity changes (brightness, contrast,
gamma, Gaussian noise) touch only the EM image channels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from emsynth.segment.config import AugmentConfig


@dataclass
class AugmentParams:
    """Per-sample random draws for one batch (numpy, so they pickle and checkpoint simply)."""

    dihedral: np.ndarray  # (b,) int in 0..7: rot90 count = k % 4, then flip x if k >= 4
    warp: np.ndarray  # (b,) bool: crop goes through grid_sample
    angle: np.ndarray  # (b,) radians
    scale: np.ndarray  # (b,)
    displacement: np.ndarray | None  # (b, 2, g, g) control-point displacements in pixels
    intensity: np.ndarray  # (b,) bool
    brightness: np.ndarray  # (b,)
    contrast: np.ndarray  # (b,)
    gamma: np.ndarray  # (b,)
    noise: np.ndarray  # (b,) noise std per sample (0 = none)
    noise_seed: int


def draw_params(
    rng: np.random.Generator, cfg: AugmentConfig, batch: int, size: int
) -> AugmentParams:
    """All random numbers for a batch of `batch` crops of side `size`."""
    dihedral = rng.integers(0, 8, batch) if cfg.dihedral else np.zeros(batch, dtype=np.int64)
    elastic = (
        rng.random(batch) < cfg.elastic_prob if cfg.elastic_sigma > 0 else np.zeros(batch, bool)
    )
    rotate = rng.random(batch) < cfg.rotate_prob
    angle = np.where(rotate, rng.uniform(-np.pi, np.pi, batch), 0.0)
    scale = np.where(
        elastic | rotate, rng.uniform(1 - cfg.scale_range, 1 + cfg.scale_range, batch), 1.0
    )
    displacement = None
    if elastic.any():
        grid = size // cfg.elastic_spacing + 2
        displacement = rng.normal(0.0, cfg.elastic_sigma, (batch, 2, grid, grid)).astype(np.float32)
        displacement[~elastic] = 0.0
    intensity = rng.random(batch) < cfg.intensity_prob
    brightness = np.where(intensity, rng.uniform(-cfg.brightness, cfg.brightness, batch), 0.0)
    contrast = np.where(intensity, rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, batch), 1.0)
    gamma = np.where(intensity, np.exp(rng.uniform(-cfg.gamma, cfg.gamma, batch)), 1.0)
    noise = np.where(rng.random(batch) < cfg.noise_prob, cfg.noise_std, 0.0)
    return AugmentParams(
        dihedral=dihedral,
        warp=elastic | rotate | (scale != 1.0),
        angle=angle,
        scale=scale,
        displacement=displacement,
        intensity=intensity,
        brightness=brightness,
        contrast=contrast,
        gamma=gamma,
        noise=noise,
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flip/rot90 transforms of (..., h, w) tensors (k in 0..7)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def inverse_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo `dihedral(x, k)`."""
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def _apply_dihedral(x: torch.Tensor, codes: np.ndarray) -> torch.Tensor:
    out = torch.empty_like(x)
    for k in np.unique(codes):
        idx = torch.as_tensor(np.flatnonzero(codes == k), device=x.device)
        out[idx] = dihedral(x[idx], int(k))
    return out


@functools.lru_cache(maxsize=8)
def _base_coords(size: int) -> torch.Tensor:
    """Normalised pixel-centre coordinates of one side, as affine_grid(align_corners=False)."""
    return (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1


@functools.lru_cache(maxsize=8)
def _upsampler(points: int, size: int) -> torch.Tensor:
    """(size, points) matrix U with U @ v = bicubic upsampling of v (align_corners=True).

    Bicubic interpolation is separable, so a control-point field C upsamples as U @ C @ U.T:
    two small matmuls instead of F.interpolate, which is several times slower on CPU.
    """
    eye = torch.eye(points).reshape(points, 1, 1, points)
    rows = F.interpolate(eye, size=(1, size), mode="bicubic", align_corners=True)
    return rows.reshape(points, size).T.contiguous()


def _sampling_grid(
    p: AugmentParams, idx: np.ndarray, size: int, device: torch.device
) -> torch.Tensor:
    """Normalised (n, size, size, 2) grid: rotation+zoom as an affine, plus the elastic field."""
    n = len(idx)
    cos = torch.as_tensor(np.cos(p.angle[idx]) / p.scale[idx], dtype=torch.float32, device=device)
    sin = torch.as_tensor(np.sin(p.angle[idx]) / p.scale[idx], dtype=torch.float32, device=device)
    c = _base_coords(size).to(device)
    bx, by = c.view(1, 1, size), c.view(1, size, 1)
    cos, sin = cos.view(n, 1, 1), sin.view(n, 1, 1)
    # Rotation by angle and zoom by scale of the sampling positions (what affine_grid would do).
    gx = cos * bx - sin * by
    gy = sin * bx + cos * by
    if p.displacement is not None:
        coarse = torch.as_tensor(p.displacement[idx], device=device) * (2.0 / size)
        up = _upsampler(coarse.shape[-1], size).to(device)
        field = up @ coarse @ up.T  # (n, 2, size, size) normalised; channel 0 = x, 1 = y
        gx = gx + field[:, 0]
        gy = gy + field[:, 1]
    return torch.stack([gx, gy], dim=-1)


def apply(
    image: torch.Tensor,
    label: torch.Tensor,
    p: AugmentParams,
    intensity_channels: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment float inputs (b, c, h, w) in 0-1 and a float 0/1 label (b, 1, h, w).

    `intensity_channels`: indices of the EM image channels (default: channel 0 only).
    """
    image = _apply_dihedral(image, p.dihedral)
    label = _apply_dihedral(label, p.dihedral)
    if p.warp.any():
        idx = np.flatnonzero(p.warp)
        size = image.shape[-1]
        grid = _sampling_grid(p, idx, size, image.device)
        both = torch.cat([image[idx], label[idx]], dim=1)
        warped = F.grid_sample(
            both, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        t_idx = torch.as_tensor(idx, device=image.device)
        image = image.index_copy(0, t_idx, warped[:, : image.shape[1]])
        label = label.index_copy(0, t_idx, (warped[:, image.shape[1] :] >= 0.5).to(label.dtype))
    channels = intensity_channels if intensity_channels is not None else [0]
    if channels and (p.intensity.any() or (p.noise > 0).any()):
        image = image.clone()
        em = image[:, channels]
        shape = (-1, 1, 1, 1)
        dev = image.device

        def col(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=image.dtype, device=dev).view(shape)

        if p.intensity.any():
            em = em.clamp(0, 1) ** col(p.gamma)
            mean = em.mean(dim=(1, 2, 3), keepdim=True)
            em = (em - mean) * col(p.contrast) + mean + col(p.brightness)
        if (p.noise > 0).any():
            gen = torch.Generator(device=dev).manual_seed(p.noise_seed)
            em = em + torch.randn(em.shape, generator=gen, device=dev, dtype=em.dtype) * col(
                p.noise
            )
        image[:, channels] = em.clamp(0, 1)
    return image, label

"""DiffAugment (Zhao et al. 2020) for the discriminator's (masks, image) pairs.

Differentiable augmentations applied to every pair D sees, real and synthetic alike, in the D
and the G update, so that D cannot memorise a small training set and G's gradient flows back
through them. For a conditional GAN the pair must stay registered: translation moves the masks
and the image together; colour (brightness, contrast) and cutout touch the image only (the
last channel). Randomness comes from torch's global generator (the engine seeds it), one draw
per sample; an empty policy returns the input and draws nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def diff_augment(pairs: torch.Tensor, policy: Sequence[str], translation: float = 0.125,
                 cutout: float = 0.5) -> torch.Tensor:
    """Augment a batch of pairs (N, C + 1, H, W): masks then the image, values in [-1, 1]."""
    for name in policy:
        if name == "translation":
            pairs = translate(pairs, translation)
        elif name == "colour":
            pairs = torch.cat([pairs[:, :-1], colour(pairs[:, -1:])], 1)
        elif name == "cutout":
            pairs = torch.cat([pairs[:, :-1], cut_out(pairs[:, -1:], cutout)], 1)
        else:
            raise ValueError(f"unknown DiffAugment policy {name!r}")
    return pairs


def translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each sample by up to `ratio` of its side in y and x (reflect-padded borders)."""
    n, _, h, w = x.shape
    py, px = int(h * ratio + 0.5), int(w * ratio + 0.5)
    if py == 0 and px == 0:
        return x
    padded = F.pad(x, (px, px, py, py), mode="reflect")
    dy = torch.randint(0, 2 * py + 1, (n,)).tolist()
    dx = torch.randint(0, 2 * px + 1, (n,)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def colour(image: torch.Tensor) -> torch.Tensor:
    """Random brightness (+U(-0.5, 0.5)) then contrast (x U(0.5, 1.5) about the mean)."""
    n = image.shape[0]
    shape = (n, 1, 1, 1)
    image = image + (torch.rand(shape, device=image.device, dtype=image.dtype) - 0.5)
    mean = image.mean(dim=(1, 2, 3), keepdim=True)
    factor = torch.rand(shape, device=image.device, dtype=image.dtype) + 0.5
    return (image - mean) * factor + mean


def cut_out(image: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero (mid-grey) one random square of side `ratio` x side per sample."""
    n, _, h, w = image.shape
    sy, sx = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    cy = torch.randint(0, h + (1 - sy % 2), (n, 1, 1), device=image.device)
    cx = torch.randint(0, w + (1 - sx % 2), (n, 1, 1), device=image.device)
    ys = torch.arange(h, device=image.device).view(1, h, 1)
    xs = torch.arange(w, device=image.device).view(1, 1, w)
    inside = ((ys - cy).abs() * 2 < sy) & ((xs - cx).abs() * 2 < sx)
    return image * (~inside).unsqueeze(1).to(image.dtype)

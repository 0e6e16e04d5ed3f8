"""Mask sources for synthesis: the masks the GAN turns into new images.

- `deformed_masks`: random crops of a real mask set, flipped/rotated and elastically deformed
  with the segmentation stage's augmentation;
- `procedural_masks`: independent phantom mask sets (one tissue each), optionally with the
  geometry fitted to a real mask set;
- `phantom_masks`: consecutive slices of one phantom mask volume, optionally fitted likewise.

The phantom's tissue model draws mitochondria and membrane masks without rendering an image;
fitted to a real mask set (`emsynth.data.phantom.fit_domain`), it gives masks with that set's
object counts, sizes and membrane density. `mask_volume` wraps masks as a Volume with a blank
image for `emsynth.synthesis.synthesize_volume`.
"""

from __future__ import annotations

import numpy as np
import torch

from emsynth.data.phantom import (
    PhantomDomain,
    fit_domain,
    generate_masks,
    get_domain,
    iter_slices,
    mask_statistics,
)
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import input_error
from emsynth.segment import augment
from emsynth.segment.config import AugmentConfig


def fitted_domain(domain: str | PhantomDomain, like: Volume, shape: tuple[int, int]
                  ) -> PhantomDomain:
    """`domain` with its mask geometry fitted to `like`'s mito (and membrane) labels,
    measured on generated slices of `shape`."""
    if MITO not in like.labels:
        raise input_error(like.source or "volume", "has no mito label to fit the masks to",
                          "pass a dataset with mitochondria masks")
    target = mask_statistics(like.labels[MITO], like.labels.get(MEMBRANE))
    return fit_domain(target, get_domain(domain), shape=shape)


def phantom_masks(
    domain: str = "vnc",
    n_slices: int = 8,
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    *,
    like: Volume | None = None,
) -> Volume:
    """A mask volume (labels mito and membrane, consecutive slices related) from the phantom.

    like: first fit the domain's mask geometry to this volume's mito (and membrane) labels,
    measured on slices of its size. The image is blank (zeros): only the masks are meant to
    be used, by `synthesize_volume`, which replaces it.
    """
    base = get_domain(domain)
    source = f"phantom-masks:{base.name}:seed={seed}"
    if like is not None:
        base = fitted_domain(base, like, tuple(like.shape[1:]))
        source += f":fitted-to={like.source}"
    slices = list(iter_slices(base, n_slices, shape, seed, with_image=False))
    return Volume(
        image=np.zeros((n_slices, *shape), np.uint8),
        labels={MITO: np.stack([s.mito for s in slices]),
                MEMBRANE: np.stack([s.membrane for s in slices])},
        pixel_size_nm=(base.pixel_size_nm, base.pixel_size_nm),
        source=source,
    )


def procedural_masks(volume: Volume, channels: list[str], count: int, size: int, seed: int,
                     domain: str, fit: bool) -> tuple[dict[str, np.ndarray], str]:
    """`count` independent phantom mask sets of `size` px (one tissue seed each, so unlike the
    slices of one phantom volume they are not near-duplicates), from `domain`, with its
    geometry first fitted to the volume's masks when `fit`. Returns the masks and a label."""
    chosen = get_domain(domain)
    if fit:
        side = min(size, *volume.shape[1:])
        chosen = fitted_domain(chosen, volume, (side, side))
    pairs = [generate_masks(chosen, (size, size), seed * 1_000_003 + i) for i in range(count)]
    found = {MITO: np.stack([p[0] for p in pairs]), MEMBRANE: np.stack([p[1] for p in pairs])}
    label = f"procedural ({domain}{', fitted to the real masks' if fit else ''})"
    return {name: found[name] for name in channels}, label


def deformed_masks(volume: Volume, channels: list[str], count: int, size: int, seed: int,
                   elastic_sigma: float, elastic_spacing: int, scale_range: float
                   ) -> dict[str, np.ndarray]:
    """`count` random square crops of the volume's masks, each flipped/rotated and elastically
    deformed with the segmentation stage's augmentation (labels re-thresholded at 0.5)."""
    side = min(size, *volume.shape[1:])
    rng = np.random.default_rng([seed, 0x5EED])
    aug = AugmentConfig(dihedral=True, elastic_prob=1.0 if elastic_sigma > 0 else 0.0,
                        elastic_sigma=elastic_sigma, elastic_spacing=elastic_spacing,
                        scale_range=scale_range)
    out = {name: np.empty((count, side, side), bool) for name in channels}
    for i in range(count):
        z = rng.integers(0, len(volume))
        y0 = rng.integers(0, volume.shape[1] - side + 1)
        x0 = rng.integers(0, volume.shape[2] - side + 1)
        crop = np.stack([volume.labels[name][z, y0:y0 + side, x0:x0 + side]
                         for name in channels]).astype(np.float32)[None]
        params = augment.draw_params(rng, aug, 1, side)
        # apply() warps "image" channels bilinearly and thresholds the "label": pass the first
        # mask as the label and threshold the rest here, with no intensity changes.
        rest, first = augment.apply(torch.from_numpy(crop[:, 1:]),
                                    torch.from_numpy(crop[:, :1]), params, [])
        warped = torch.cat([first, rest], 1)[0].numpy() >= 0.5
        for c, name in enumerate(channels):
            out[name][i] = warped[c]
    return out


def mask_volume(masks: dict[str, np.ndarray], source: str) -> Volume:
    """Masks as a Volume (blank image) for emsynth.synthesis.synthesize_volume."""
    shape = next(iter(masks.values())).shape
    return Volume(np.zeros(shape, np.uint8), masks, source=source)

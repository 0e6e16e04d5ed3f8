"""What the GAN sees: masks encoded as input channels, images scaled to [-1, 1], paired crops.

`Conditioning` is the one definition of the generator's input encoding, shared by training
(crops) and synthesis (whole slices), and stored with the exported generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from emsynth.data.volume import Volume
from emsynth.errors import input_error


@dataclass(frozen=True)
class Conditioning:
    """Which label channels condition the generator, in order, and their value range."""

    channels: tuple[str, ...]
    mask_range: str = "-1,1"  # label pixels -> 1, others -> -1 (pix2pix's input scaling); or "0,1"

    def check(self, volume: Volume, what: str = "volume") -> None:
        """Raise a user error naming the volume when a conditioning label is missing."""
        missing = [c for c in self.channels if c not in volume.labels]
        if missing:
            raise input_error(
                volume.source or what,
                f"has no {missing[0]!r} label (it has {sorted(volume.labels) or 'none'}) but the "
                f"generator is conditioned on {list(self.channels)}",
                "add that mask folder (membranes can be predicted with emsynth membranes), or "
                'condition on the labels present (e.g. --set data.channels=["mito"])',
            )

    def encode(self, labels: list[np.ndarray]) -> np.ndarray:
        """Boolean masks (one per channel, same shape) -> float32 stack (C, ...)."""
        stack = np.stack(labels).astype(np.float32)
        return stack * 2.0 - 1.0 if self.mask_range == "-1,1" else stack

    def encode_slice(self, volume: Volume, z: int) -> np.ndarray:
        return self.encode([volume.labels[c][z] for c in self.channels])


def image_to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (the generator's tanh range)."""
    return image.astype(np.float32) / 127.5 - 1.0


def unit_to_image(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 (rounded, clipped)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.clip(np.rint((values + 1.0) * 127.5), 0, 255).astype(np.uint8)


class PairSampler:
    """Random paired (masks, image) square crops from volumes held in memory.

    Slices are drawn uniformly over all slices of all volumes, positions uniformly, and with
    `augment` one of the 8 flips/rotations by 90 degrees (EM sections have no preferred
    in-plane orientation). All randomness comes from the generator passed to `sample`.
    """

    def __init__(self, volumes: list[Volume], conditioning: Conditioning, crop: int,
                 augment: bool = True) -> None:
        if not volumes:
            raise ValueError("PairSampler needs at least one volume")
        for v in volumes:
            conditioning.check(v)
            if min(v.shape[1:]) < crop:
                raise input_error(
                    v.source or "volume", f"slices are {v.shape[1]}x{v.shape[2]}, smaller than "
                    f"the {crop}x{crop} training crop",
                    "use a smaller data.crop (a multiple of 256)",
                )
        self.volumes = volumes
        self.conditioning = conditioning
        self.crop = crop
        self.augment = augment
        self._slice_owner = np.concatenate(
            [np.stack([np.full(len(v), i), np.arange(len(v))], 1) for i, v in enumerate(volumes)]
        )

    def sample(self, rng: np.random.Generator, batch_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masks (B, C, crop, crop), image (B, 1, crop, crop)) float32 tensors."""
        masks, images = zip(*(self._one(rng) for _ in range(batch_size)))
        return torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(images))

    def fixed(self, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A reproducible set of un-augmented crops (validation, image grids)."""
        rng = np.random.default_rng(seed)
        pairs = [self._one(rng, augment=False) for _ in range(count)]
        masks, images = zip(*pairs)
        return torch.from_numpy(np.stack(masks)), torch.from_numpy(np.stack(images))

    def _one(self, rng: np.random.Generator, augment: bool | None = None):
        vol_index, z = self._slice_owner[rng.integers(len(self._slice_owner))]
        volume = self.volumes[vol_index]
        h, w = volume.shape[1:]
        y0 = int(rng.integers(h - self.crop + 1))
        x0 = int(rng.integers(w - self.crop + 1))
        window = (slice(y0, y0 + self.crop), slice(x0, x0 + self.crop))
        masks = self.conditioning.encode(
            [volume.labels[c][z][window] for c in self.conditioning.channels]
        )
        image = image_to_unit(volume.image[z][window])[None]
        if self.augment if augment is None else augment:
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            masks, image = (_dihedral(a, k, flip) for a in (masks, image))
        return masks, image


def _dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(array, k, axes=(-2, -1))
    if flip:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)

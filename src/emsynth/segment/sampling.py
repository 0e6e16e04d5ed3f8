"""Training data in memory: stacking input channels and random patch sampling.

Everything here is numpy on uint8/bool arrays (a full Lucchi volume is ~130 MB), and every
random choice comes from the `numpy.random.Generator` the engine passes, so a seed fixes the
batches. Slice ranges and the z-block splits live in `emsynth.data.slices`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emsynth.data.volume import Volume
from emsynth.errors import EmsynthError

#: Input channel name that means "the EM image" (any other name is a label of the volume).
IMAGE = "image"


@dataclass
class SegmentData:
    """Model inputs and target of a stack of slices.

    inputs: (z, c, y, x) uint8, channel order as in `channel_names`; label channels as 0/255.
    target: (z, y, x) bool, or None where only inference is wanted.
    """

    inputs: np.ndarray
    target: np.ndarray | None
    channel_names: list[str]
    target_name: str
    slice_names: list[str]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def segment_data(volume: Volume, inputs: list[str], target: str | None) -> SegmentData:
    """Stack `inputs` ("image" or label names) from `volume` and pick `target` as the label."""
    channels = []
    for name in inputs:
        if name == IMAGE:
            channels.append(volume.image)
        elif name in volume.labels:
            channels.append(volume.labels[name].astype(np.uint8) * 255)
        else:
            raise EmsynthError(
                f"{volume.source or 'volume'}: has no label {name!r} for input channel (has "
                f"{sorted(volume.labels)}). Fix: choose data.inputs from image, "
                f"{', '.join(sorted(volume.labels))}"
            )
    truth = None
    if target is not None:
        if target not in volume.labels:
            raise EmsynthError(
                f"{volume.source or 'volume'}: has no label {target!r} to train on (has "
                f"{sorted(volume.labels)}). Fix: pass a dataset with {target} masks or set "
                "data.target"
            )
        truth = volume.labels[target]
    return SegmentData(
        inputs=np.ascontiguousarray(np.stack(channels, axis=1)),
        target=truth,
        channel_names=list(inputs),
        target_name=target or "",
        slice_names=list(volume.slice_names),
    )


class PatchSampler:
    """Random square crops of side `patch_size` from a stack of slices.

    A random share of each batch (expected value `foreground_fraction`, stochastic rounding) is
    centred on a uniformly drawn foreground pixel; the rest are uniform over all slices and
    positions. Slices smaller than the patch are reflect-padded once up front.
    """

    def __init__(self, data: SegmentData, patch_size: int, foreground_fraction: float = 0.0):
        if data.target is None:
            raise ValueError("training needs a target")
        self.patch = patch_size
        self.fg_fraction = foreground_fraction
        inputs, target = data.inputs, data.target
        pad_y = max(0, patch_size - inputs.shape[2])
        pad_x = max(0, patch_size - inputs.shape[3])
        if pad_y or pad_x:
            pads = ((0, pad_y), (0, pad_x))
            inputs = np.pad(inputs, ((0, 0), (0, 0), *pads), mode="symmetric")
            target = np.pad(target, ((0, 0), *pads), mode="symmetric")
        self.inputs = inputs
        self.target = target
        # Flat indices of foreground pixels (int32 where they fit: ~30 MB for all of Lucchi).
        index_dtype = np.int32 if target.size < 2**31 else np.int64
        found = np.flatnonzero(target) if foreground_fraction > 0 else np.empty(0, np.int64)
        self.foreground = found.astype(index_dtype)

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (b, c, p, p) uint8, target (b, 1, p, p) uint8 0/1)."""
        z_n, _, h, w = self.inputs.shape
        p = self.patch
        n_fg = 0
        if self.fg_fraction > 0 and len(self.foreground):
            n_fg = int(np.floor(self.fg_fraction * batch_size + rng.random()))
            n_fg = min(n_fg, batch_size)
        z = rng.integers(0, z_n, batch_size)
        y0 = rng.integers(0, h - p + 1, batch_size)
        x0 = rng.integers(0, w - p + 1, batch_size)
        if n_fg:
            picks = self.foreground[rng.integers(0, len(self.foreground), n_fg)].astype(np.int64)
            fz, rem = np.divmod(picks, h * w)
            fy, fx = np.divmod(rem, w)
            z[:n_fg] = fz
            y0[:n_fg] = np.clip(fy - p // 2, 0, h - p)
            x0[:n_fg] = np.clip(fx - p // 2, 0, w - p)
        xs = np.empty((batch_size, self.inputs.shape[1], p, p), dtype=np.uint8)
        ys = np.empty((batch_size, 1, p, p), dtype=np.uint8)
        for i in range(batch_size):
            xs[i] = self.inputs[z[i], :, y0[i] : y0[i] + p, x0[i] : x0[i] + p]
            ys[i, 0] = self.target[z[i], y0[i] : y0[i] + p, x0[i] : x0[i] + p]
        return xs, ys


class MixedSampler:
    """Draws each crop of a batch from one of several `PatchSampler`s with given shares
    (sources may have different slice sizes, e.g. 1024 px VNC and 512 px ISBI)."""

    def __init__(self, samplers: list[PatchSampler], shares: list[float]):
        total = float(sum(shares))
        if total <= 0:
            raise ValueError("shares must not all be zero")
        self.samplers = samplers
        self.shares = np.asarray(shares, dtype=np.float64) / total

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        sources = rng.choice(len(self.samplers), size=batch_size, p=self.shares)
        parts = [
            self.samplers[i].sample(rng, int(n))
            for i, n in enumerate(np.bincount(sources, minlength=len(self.samplers)))
            if n
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

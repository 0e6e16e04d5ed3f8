"""Training data in memory: stacking input channels, z-block splits and random patch sampling.

Everything here is numpy on uint8/bool arrays (a full Lucchi volume is ~130 MB), and every
random choice comes from the `numpy.random.Generator` the engine passes, so a seed fixes the
batches. Validation is always a contiguous z block: neighbouring EM slices are nearly identical,
so interleaved validation slices would measure memorisation, not generalisation.
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


def parse_slices(spec: str, n_slices: int, what: str = "slices") -> list[int]:
    """Slice indices from "a-b" (inclusive), "a", or comma-joined parts: "0-9,20-29"."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise EmsynthError(
                f"{what} {spec!r} is not a slice range. Fix: write e.g. 0-144 or 0-9,20-29"
            ) from None
    if not out:
        raise EmsynthError(f"{what} {spec!r} selects no slices. Fix: write e.g. 0-144")
    bad = [i for i in out if not 0 <= i < n_slices]
    if bad:
        raise EmsynthError(
            f"{what} {spec!r} names slice {bad[0]} but the volume has {n_slices} "
            f"(0-{n_slices - 1})."
            " Fix: use indices inside the volume"
        )
    return sorted(set(out))


def split_blocks(
    n_slices: int, val: int, test: int = 0, gap: int = 0
) -> tuple[list[int], list[int], list[int]]:
    """Contiguous z blocks: train = the first slices, then val, then test, in z order.

    `gap` slices are left out between neighbouring blocks so the last training slice and the
    first validation slice are not near-duplicates.
    """
    used = val + test + gap * ((val > 0) + (test > 0))
    if used >= n_slices:
        raise EmsynthError(
            f"a {n_slices}-slice volume cannot hold val={val}, test={test}, gap={gap} plus "
            "training slices. Fix: use smaller blocks"
        )
    n_train = n_slices - used
    train = list(range(n_train))
    start = n_train + (gap if val else 0)
    val_idx = list(range(start, start + val))
    start = start + val + (gap if test else 0)
    test_idx = list(range(start, start + test))
    return train, val_idx, test_idx


def evenly_spaced(indices: list[int], count: int) -> list[int]:
    """`count` indices spread evenly over `indices` (first and last included)."""
    if count >= len(indices):
        return list(indices)
    picks = np.round(np.linspace(0, len(indices) - 1, count)).astype(int)
    return [indices[i] for i in picks]


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

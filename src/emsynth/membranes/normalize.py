"""Per-slice intensity normalisation, the same at train and predict time.

VNC ssTEM and CA1 FIB-SEM differ first in grey-level statistics (CA1: about half the contrast).
Normalising every slice removes that part of the domain gap before the network sees it:

- "standardize": each slice linearly to a fixed mean and standard deviation (grey levels), so
  any slice and its affine re-exposure `a * x + b` (a > 0) give the same result (up to rounding);
- "histmatch": each slice's grey-level CDF mapped onto the pooled histogram of the training
  slices (stored with the model, so prediction matches to the same reference).

Outputs stay uint8, so the segmentation stage's data pipeline is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emsynth.membranes.config import NormalizeConfig

LEVELS = np.arange(256, dtype=np.float64)


def slice_histograms(image) -> np.ndarray:
    """Grey-level counts (z, 256) of each slice of a (z, y, x) uint8 stack, read chunk by chunk
    (any lazily sliced array), so a volume of any size is never in memory whole."""
    from emsynth.data.blocks import iter_blocks

    tile = tuple(getattr(image, "chunks", None) or (16, 1024, 1024))[-3:]
    out = np.zeros((image.shape[0], 256), np.int64)
    for block in iter_blocks(image.shape, tile):
        for k, plane in enumerate(np.asarray(image[block.slices])):
            out[block.z[0] + k] += np.bincount(plane.ravel(), minlength=256)
    return out


def standardize_lut(hist: np.ndarray, mean: float = 128.0, std: float = 48.0) -> np.ndarray:
    """Grey level -> level (uint8[256]) taking a slice with grey-level counts `hist` to mean
    `mean` and std `std`; a constant slice goes to `mean`, values beyond 0-255 are clipped."""
    n = float(hist.sum())
    m = float((hist * LEVELS).sum()) / n
    s = float(np.sqrt((hist * (LEVELS - m) ** 2).sum() / n))
    scaled = (LEVELS - m) / max(s, 1e-6) * std + mean if s > 0 else np.full(256, float(mean))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def standardize_slices(image: np.ndarray, mean: float = 128.0, std: float = 48.0) -> np.ndarray:
    """Each (y, x) slice of a (z, y, x) uint8 stack to mean `mean` and std `std`, as uint8."""
    return Normalizer("standardize", mean, std)(image)


def reference_histogram(image: np.ndarray) -> np.ndarray:
    """Pooled grey-level histogram (256 probabilities) of a uint8 stack."""
    hist = np.bincount(image.ravel(), minlength=256).astype(np.float64)
    return hist / hist.sum()


def _cdf_at_centres(hist: np.ndarray) -> np.ndarray:
    """CDF evaluated at the middle of each level's mass (so level k maps to level k)."""
    cdf = np.cumsum(hist)
    return cdf - 0.5 * hist


def histmatch_lut(hist: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Grey level -> level (uint8[256]) giving a slice with counts `hist` the histogram
    `reference` (256 probabilities)."""
    ref = np.asarray(reference, dtype=np.float64)
    ref_levels = np.flatnonzero(ref > 0)
    ref_cdf = _cdf_at_centres(ref)[ref_levels]
    src = np.asarray(hist, dtype=np.float64)
    src = src / src.sum()
    lut = np.interp(_cdf_at_centres(src), ref_cdf, ref_levels.astype(np.float64))
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)


def match_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each slice of a (z, y, x) uint8 stack mapped so its histogram matches `reference`."""
    return Normalizer("histmatch", reference=list(np.asarray(reference, dtype=np.float64)))(image)


@dataclass
class Normalizer:
    """A normalisation with its reference, savable in a model's metadata (`as_dict`)."""

    method: str = "none"
    mean: float = 128.0
    std: float = 48.0
    reference: list[float] | None = None  # histmatch: 256 probabilities

    @classmethod
    def fit(cls, cfg: NormalizeConfig, train_images: np.ndarray) -> Normalizer:
        """The normaliser of `cfg`; histmatch takes the pooled histogram of `train_images`."""
        ref = reference_histogram(train_images).tolist() if cfg.method == "histmatch" else None
        return cls(cfg.method, cfg.mean, cfg.std, ref)

    def lut(self, hist: np.ndarray) -> np.ndarray:
        """The grey-level map (uint8[256]) of a slice with grey-level counts `hist`: every
        method is a per-slice lookup table, which is what lets blockwise prediction normalise
        a block exactly as the whole slice (`slice_histograms` first)."""
        if self.method == "standardize":
            return standardize_lut(hist, self.mean, self.std)
        if self.method == "histmatch":
            if self.reference is None:
                raise ValueError("histmatch normaliser has no reference histogram")
            return histmatch_lut(hist, np.asarray(self.reference))
        return np.arange(256, dtype=np.uint8)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """Normalise a (z, y, x) uint8 stack (a (y, x) slice is accepted too)."""
        if image.ndim == 2:
            return self(image[None])[0]
        if self.method == "none":
            return image
        out = np.empty_like(image)
        for z, plane in enumerate(image):
            out[z] = self.lut(np.bincount(plane.ravel(), minlength=256))[plane]
        return out

    def as_dict(self) -> dict:
        return {"method": self.method, "mean": self.mean, "std": self.std,
                "reference": self.reference}

    @classmethod
    def from_dict(cls, data: dict | None) -> Normalizer:
        data = data or {}
        return cls(data.get("method", "none"), float(data.get("mean", 128.0)),
                   float(data.get("std", 48.0)), data.get("reference"))

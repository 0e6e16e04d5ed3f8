"""Fitting the phantom's mask geometry to a real mask set: statistics measured the same way
on real and phantom masks, and the domain whose masks match them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from emsynth.config import StrictModel
from emsynth.data.phantom.domains import PhantomDomain, get_domain
from emsynth.data.phantom.generate import generate_masks


class MaskStatistics(StrictModel):
    """What `fit_domain` matches: measured the same way on real and on phantom masks.

    Counts are per 1e6 pixels of the measured slices (profiles cut by the border count too, so
    compare sets of similar slice size). Widths and aspects are medians over profiles of at
    least 30 px that do not touch the border. Membrane fields are None without membrane masks.
    """

    mito_fraction: float
    mito_per_mpx: float
    mito_width_px: float | None
    mito_aspect: float | None
    membrane_fraction: float | None = None
    cells_per_mpx: float | None = None


def mask_statistics(mito: np.ndarray, membrane: np.ndarray | None = None) -> MaskStatistics:
    """Statistics of boolean masks, (y, x) or (z, y, x)."""
    from skimage.measure import regionprops_table

    mito = np.asarray(mito, bool)
    mito = mito[None] if mito.ndim == 2 else mito
    pixels = mito.size / 1e6
    count, widths, aspects = 0, [], []
    for plane in mito:
        labels, n = ndi.label(plane)
        count += n
        if n == 0:
            continue
        props = regionprops_table(
            labels, properties=("area", "bbox", "axis_major_length", "axis_minor_length")
        )
        inside = (
            (props["bbox-0"] > 0)
            & (props["bbox-1"] > 0)
            & (props["bbox-2"] < plane.shape[0])
            & (props["bbox-3"] < plane.shape[1])
            & (props["area"] >= 30)
        )
        widths += list(props["axis_minor_length"][inside])
        aspects += list(props["axis_major_length"][inside] / props["axis_minor_length"][inside])
    stats = {
        "mito_fraction": float(mito.mean()),
        "mito_per_mpx": count / pixels,
        "mito_width_px": float(np.median(widths)) if widths else None,
        "mito_aspect": float(np.median(aspects)) if aspects else None,
    }
    if membrane is not None:
        membrane = np.asarray(membrane, bool)
        membrane = membrane[None] if membrane.ndim == 2 else membrane
        cells = sum(ndi.label(~plane)[1] for plane in membrane)
        stats["membrane_fraction"] = float(membrane.mean())
        stats["cells_per_mpx"] = cells / (membrane.size / 1e6)
    return MaskStatistics(**stats)


def fit_domain(
    target: MaskStatistics,
    base: str | PhantomDomain = "vnc",
    shape: tuple[int, int] = (512, 512),
    n_masks: int = 8,
    iterations: int = 6,
) -> PhantomDomain:
    """A copy of `base` whose masks match `target`: mitochondrion count, width and aspect, and
    (when the target has membranes) cell count and membrane fraction.

    Each iteration generates `n_masks` mask pairs of `shape` (use the target slices' size) and
    scales every geometry parameter by target / measured, damped to [0.5, 2] per step. The
    measured counts carry sampling noise (a 512 px slice holds a handful of mitochondria), so
    the result is the geometric mean of the parameters over the second half of the iterations.
    """

    def ratio(want, got):
        if want is None or got is None or got <= 0:
            return 1.0
        return float(np.clip(want / got, 0.5, 2.0))

    domain = get_domain(base)
    history: list[dict[str, float]] = []
    for _ in range(iterations):
        pairs = [generate_masks(domain, shape, seed) for seed in range(n_masks)]
        got = mask_statistics(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
        update = {
            "mito_per_mpx": domain.mito_per_mpx * ratio(target.mito_per_mpx, got.mito_per_mpx),
            "mito_width_px": domain.mito_width_px * ratio(target.mito_width_px, got.mito_width_px),
        }
        if target.mito_aspect is not None and got.mito_aspect is not None:
            elongation = ratio(target.mito_aspect - 1, got.mito_aspect - 1)
            update["mito_aspect"] = 1 + (domain.mito_aspect - 1) * elongation
        if target.mito_per_mpx > 0 and got.mito_per_mpx == 0:
            update["mito_per_mpx"] = max(domain.mito_per_mpx, 1.0) * 2
        if target.cells_per_mpx is not None:
            cell_scale = ratio(got.cells_per_mpx, target.cells_per_mpx) ** 0.5
            update["cell_size_px"] = domain.cell_size_px * cell_scale
            # membrane share ~ thickness / cell size: correct for the cell-size change too
            thickness = ratio(target.membrane_fraction, got.membrane_fraction) * cell_scale
            update["membrane_thickness_px"] = domain.membrane_thickness_px * thickness
        domain = PhantomDomain.model_validate({**domain.model_dump(), **update})
        history.append(update)
    settled = history[len(history) // 2 :]
    # A key can be missing from some iterations (the aspect, where a small slice held no
    # measurable mitochondrion): average each over the iterations that set it.
    keys = list(dict.fromkeys(k for h in settled for k in h))
    mean = {k: float(np.exp(np.mean([np.log(h[k]) for h in settled if k in h]))) for k in keys}
    if "mito_aspect" in mean:  # average the elongation, not the aspect itself
        mean["mito_aspect"] = 1 + float(
            np.exp(np.mean([np.log(h["mito_aspect"] - 1) for h in settled if "mito_aspect" in h]))
        )
    return PhantomDomain.model_validate({**domain.model_dump(), **mean})

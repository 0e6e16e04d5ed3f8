"""The GAN's figure (as the study's Figures 4-5): per slice, masks | real EM | synthetic EM of
one or more generators, so that conditioning variants (e.g. with and without membranes) can be
judged by eye on the same masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emsynth.data.figures import OVERLAY_COLOURS, centre_crop, default_slices, image_grid
from emsynth.data.volume import Volume


def mask_rgb(labels: dict[str, np.ndarray]) -> np.ndarray:
    """(y, x, 3) float RGB of the conditioning masks on black, in the overlay colours."""
    shape = next(iter(labels.values())).shape
    rgb = np.zeros((*shape, 3), np.float32)
    for name, (_, colour, _) in OVERLAY_COLOURS.items():  # mitochondria drawn over membranes
        if name in labels:
            rgb[labels[name]] = colour
    return rgb


def comparison_figure(
    out_path: str | Path,
    real: Volume,
    synthetic: dict[str, np.ndarray],
    rows: Sequence[int] | None = None,
    crop: int | None = 512,
    title: str = "",
) -> Path:
    """Write a grid, one row per slice of `real` in `rows` (default: up to 3 evenly spread).

    `real` holds the real images and the masks shown in the first column (keep only the
    conditioning labels there); `synthetic` maps a column title to a (z, y, x) uint8 stack
    synthesised from those masks. `crop`: centre crop side in px, so that texture stays visible
    at figure size (None = whole slice).
    """
    rows = list(rows) if rows is not None else default_slices(len(real))
    channels = ", ".join(name for name in OVERLAY_COLOURS if name in real.labels)
    masks = [mask_rgb({name: centre_crop(lab[z], crop) for name, lab in real.labels.items()})
             for z in rows]
    columns = [(f"masks ({channels})", masks, 1.0)]
    columns += [(label, [centre_crop(stack[z], crop) for z in rows], 255.0)
                for label, stack in [("real", real.image), *synthetic.items()]]
    return image_grid(out_path, columns, [f"slice {real.slice_names[z]}" for z in rows], title)

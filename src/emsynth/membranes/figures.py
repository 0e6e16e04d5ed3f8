"""The membrane stage's figure (as the study's Figure 3): per slice, EM | mitochondria |
predicted membranes [| ground-truth membranes], as a small PNG for docs/."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emsynth.data.figures import centre_crop, default_slices, image_grid


def prediction_figure(
    out_path: str | Path,
    image: np.ndarray,
    mito: np.ndarray,
    predicted: np.ndarray,
    truth: np.ndarray | None = None,
    rows: list[int] | None = None,
    names: list[str] | None = None,
    crop: int | None = 512,
    title: str = "",
) -> Path:
    """Write a grid (one row per slice in `rows`, default 3 evenly spread) to `out_path`.

    Arrays are (z, y, x); `predicted` may be bool or a 0-1 probability. `crop`: centre crop
    side in px so membranes stay visible at figure size (None = whole slice).
    """
    rows = rows if rows is not None else default_slices(len(image))
    names = names or [str(i) for i in range(len(image))]
    # (title, stack, grey value of white): EM as recorded (0-255), masks and probabilities 0-1
    stacks = [("EM", image, 255.0), ("mitochondria", mito, 1.0),
              ("predicted membranes", predicted, 1.0)]
    if truth is not None:
        stacks.append(("true membranes", truth, 1.0))
    columns = [(label, [centre_crop(stack[z], crop) for z in rows], white)
               for label, stack, white in stacks]
    return image_grid(out_path, columns, [f"slice {names[z]}" for z in rows], title, inches=2.3)

"""The GAN's figure (as the study's Figures 4-5): per slice, masks | real EM | synthetic EM of
one or more generators, so that conditioning variants (e.g. with and without membranes) can be
judged by eye on the same masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emsynth.data.figures import OVERLAY_COLOURS, centre_crop
from emsynth.data.volume import Volume
from emsynth.io import atomic_path


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

    `real` holds the real images and the masks shown in the first column; `synthetic` maps a
    column title to a (z, y, x) uint8 stack synthesised from those masks. `crop`: centre crop
    side in px, so that texture stays visible at figure size (None = whole slice).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows is None:
        spread = np.linspace(0, len(real) - 1, min(3, len(real)))
        rows = sorted({int(v) for v in np.rint(spread)})
    channels = " + ".join(OVERLAY_COLOURS[n][0] for n in OVERLAY_COLOURS if n in real.labels)
    columns = [(f"masks ({channels})", None), ("real", real.image), *synthetic.items()]
    fig, axes = plt.subplots(len(rows), len(columns),
                             figsize=(2.4 * len(columns), 2.4 * len(rows) + 0.4), squeeze=False)
    for r, z in enumerate(rows):
        for c, (label, stack) in enumerate(columns):
            ax = axes[r][c]
            if stack is None:
                labels = {name: centre_crop(lab[z], crop) for name, lab in real.labels.items()}
                ax.imshow(mask_rgb(labels), interpolation="nearest")
            else:
                ax.imshow(centre_crop(stack[z], crop), cmap="gray", vmin=0, vmax=255,
                          interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"slice {real.slice_names[z]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return out_path

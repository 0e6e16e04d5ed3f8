"""The membrane stage's figure (as the study's Figure 3): per slice, EM | mitochondria |
predicted membranes [| ground-truth membranes], as a small PNG for docs/."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emsynth.data.figures import centre_crop
from emsynth.io import atomic_path


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows is None:
        spread = np.linspace(0, len(image) - 1, min(3, len(image)))
        rows = sorted({int(v) for v in np.rint(spread)})
    names = names or [str(i) for i in range(len(image))]
    # (title, stack, grey value of white): EM as recorded (0-255), masks and probabilities 0-1
    columns = [("EM", image, 255.0), ("mitochondria", mito, 1.0),
               ("predicted membranes", predicted, 1.0)]
    if truth is not None:
        columns.append(("true membranes", truth, 1.0))
    fig, axes = plt.subplots(
        len(rows), len(columns), figsize=(2.3 * len(columns), 2.3 * len(rows) + 0.3),
        squeeze=False,
    )
    for r, z in enumerate(rows):
        for c, (label, stack, white) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(centre_crop(np.asarray(stack[z], dtype=np.float32), crop), cmap="gray",
                      vmin=0.0, vmax=white, interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"slice {names[z]}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return out_path

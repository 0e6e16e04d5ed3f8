"""Side-by-side slice figures with label overlays (`emsynth data show`).

Each column is one slice: the EM image alone on top, the same image with its labels blended
in below (mitochondria red, membranes green, synapses blue), as in the study's Figures 1-2.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from emsynth.data.volume import MEMBRANE, MITO, SYNAPSE, Volume
from emsynth.errors import input_error
from emsynth.io import atomic_write_bytes

#: label -> (legend name, RGB colour in 0..1, blend weight). Synapses are small and dark, so
#: they get a stronger weight to stay visible.
OVERLAY_COLOURS = {
    MEMBRANE: ("membranes", (0.1, 0.9, 0.1), 0.45),
    MITO: ("mitochondria", (1.0, 0.1, 0.1), 0.45),
    SYNAPSE: ("synapses", (0.15, 0.35, 1.0), 0.75),
}
COLUMN_INCHES = 3.0
DPI = 90


def default_slices(n_slices: int, count: int = 3) -> list[int]:
    """Evenly spread slice indices (first, middle, last for count 3)."""
    return sorted({round(i) for i in np.linspace(0, n_slices - 1, min(count, n_slices))})


def centre_crop(plane: np.ndarray, crop: int | None) -> np.ndarray:
    """The central crop x crop window of a 2-D plane (the whole plane for None or a small one)."""
    if crop is None:
        return plane
    h, w = plane.shape[:2]
    y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
    return plane[y0 : y0 + crop, x0 : x0 + crop]


def image_grid(
    out_path: str | Path,
    columns: Sequence[tuple[str, Sequence[np.ndarray], float]],
    row_labels: Sequence[str],
    title: str = "",
    inches: float = 2.4,
) -> Path:
    """Write a PNG grid of 2-D images: `columns` are (title, one image per row, white value).

    Grey planes are drawn from 0 (black) to the white value (255 for EM, 1 for masks and
    probabilities); (y, x, 3) RGB planes as they are. Shared by the membrane and GAN figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(row_labels)
    fig, axes = plt.subplots(n_rows, len(columns),
                             figsize=(inches * len(columns), inches * n_rows + 0.4), squeeze=False)
    for c, (label, planes, white) in enumerate(columns):
        for r in range(n_rows):
            ax = axes[r][c]
            plane = np.asarray(planes[r])
            if plane.ndim == 3:
                ax.imshow(plane, interpolation="nearest")
            else:
                ax.imshow(plane.astype(np.float32), cmap="gray", vmin=0.0, vmax=white,
                          interpolation="antialiased")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_path, _palette_png(Image.open(buffer).convert("RGB")))
    return out_path


def _palette_png(image: Image.Image, method: Image.Quantize = Image.Quantize.MEDIANCUT) -> bytes:
    """PNG bytes quantised to 256 colours, so figures stay small. Median cut keeps grey ramps
    smooth (octree bands them by up to 8 grey levels); octree keeps many blended overlay hues."""
    buffer = io.BytesIO()
    image.quantize(256, method=method).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def overlay(image: np.ndarray, labels: dict[str, np.ndarray]) -> np.ndarray:
    """(y, x, 3) float RGB: the grey image with each label blended in its colour.

    Membranes are drawn first so that mitochondria and synapses stay visible on top.
    """
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    for name, (_, colour, alpha) in OVERLAY_COLOURS.items():
        if name in labels:
            mask = labels[name]
            rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour)
    return rgb


def save_slice_figure(
    volume: Volume,
    out: str | Path,
    title: str = "",
    z_numbers: Sequence[int] | None = None,
) -> Path:
    """Write a PNG with one column per slice of `volume` (image above, overlay below).

    Select the slices first (`read_volume(..., indices=...)` or `volume.select`); z_numbers are
    their positions in the full stack, shown in the column titles. The PNG is quantised to a
    256-colour palette (octree keeps the overlay hues) so three columns stay well under 300 KB.
    """
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise input_error(out, "the figure is written as PNG", "give an output path ending in .png")
    n = len(volume)
    z_numbers = list(z_numbers) if z_numbers is not None else list(range(n))
    height, width = volume.shape[1:]
    # Lay the axes out in inches so that rows touch exactly whatever the slice aspect ratio.
    cell_w, cell_h = COLUMN_INCHES, COLUMN_INCHES * height / width
    left, right, gap, top, bottom = 0.3, 0.05, 0.05, 0.65, 0.4 if volume.labels else 0.1
    fig_w = left + n * cell_w + (n - 1) * gap + right
    fig_h = top + 2 * cell_h + gap + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    canvas = FigureCanvasAgg(fig)  # a bare Agg canvas: no pyplot state, no display
    for col in range(n):
        x0 = (left + col * (cell_w + gap)) / fig_w
        rows = [
            (fig_h - top - cell_h) / fig_h,
            (fig_h - top - 2 * cell_h - gap) / fig_h,
        ]
        top_ax, bottom_ax = (fig.add_axes((x0, y0, cell_w / fig_w, cell_h / fig_h)) for y0 in rows)
        labels = {name: lab[col] for name, lab in volume.labels.items()}
        top_ax.imshow(volume.image[col], cmap="gray", vmin=0, vmax=255)
        bottom_ax.imshow(overlay(volume.image[col], labels))
        top_ax.set_title(f"slice {volume.slice_names[col]} (z={z_numbers[col]})", fontsize=9)
        for ax in (top_ax, bottom_ax):
            ax.set_xticks([])
            ax.set_yticks([])
        if col == 0:
            top_ax.set_ylabel("image", fontsize=9)
            bottom_ax.set_ylabel("labels overlaid", fontsize=9)
    fractions = volume.label_fractions()
    handles = [
        Patch(color=colour, label=f"{legend} ({fractions[name]:.1%} of these pixels)")
        for name, (legend, colour, _) in OVERLAY_COLOURS.items()
        if name in volume.labels
    ]
    if handles:
        fig.legend(
            handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False
        )
    pixel = f", {volume.pixel_size_nm[1]:g} nm/pixel" if volume.pixel_size_nm else ""
    fig.suptitle(f"{title or volume.source} ({height}x{width} px{pixel})", fontsize=10, y=0.99)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    atomic_write_bytes(out, _palette_png(Image.fromarray(rgb), Image.Quantize.FASTOCTREE))
    return out

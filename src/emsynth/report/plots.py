"""The report's figures as PNG bytes (matplotlib Agg, no pyplot state): scores against regime
size, and image grids of real data, synthetic data and test predictions."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from emsynth.data.figures import overlay
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.report.collect import METRIC_NAMES, StudyResults
from emsynth.study.layout import MIXED, REAL, SYNTHETIC

COLOURS = {REAL: "#1f77b4", MIXED: "#d62728", SYNTHETIC: "#2ca02c"}
MARKERS = {REAL: "o", MIXED: "s", SYNTHETIC: "^"}
DPI = 100


def _png(fig: Figure) -> bytes:
    """PNG bytes, quantised to a 256-colour palette (as emsynth.data.figures does): image
    grids shrink about threefold, which matters for the HTML that embeds them."""
    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(DPI)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    buffer = io.BytesIO()
    rgb.quantize(256, method=Image.Quantize.FASTOCTREE).save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def _error_bar(summary) -> tuple[float, float]:
    if summary.low is None:
        return 0.0, 0.0
    return summary.mean - summary.low, summary.high - summary.mean


def score_plot(results: StudyResults, metric: str = "iou") -> bytes:
    """Left: the metric per condition against annotated pixels (log x), mean and 95% CI over
    seeds; a steps control (real-only, same data, more steps) as an open marker beside the
    regime it controls. Right: the paired differences per regime with their CIs and the zero
    line."""
    controls = results.controls
    regimes = [r for r in results.regimes if results.pixels.get(r) and r not in controls]
    pixels = np.array([results.pixels[r] for r in regimes], dtype=float)
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    n_cond = len(results.conditions)
    for i, condition in enumerate(results.conditions):
        # Spread the conditions a little along x so overlapping bars stay readable.
        shift = 1.0 + 0.04 * (i - (n_cond - 1) / 2)
        rows = [(p * shift, results.summary(metric, r, condition))
                for p, r in zip(pixels, regimes)]
        rows = [(x, s) for x, s in rows if s.n]
        if not rows:
            continue
        xs = [x for x, _ in rows]
        means = [s.mean for _, s in rows]
        errors = np.array([_error_bar(s) for _, s in rows]).T
        left.errorbar(xs, means, yerr=errors, label=condition, color=COLOURS.get(condition),
                      marker=MARKERS.get(condition, "o"), capsize=3, linewidth=1.5)
    for control, regime in controls.items():
        s = results.summary(metric, control, REAL)
        if s.n and results.pixels.get(regime):
            left.errorbar([results.pixels[regime] * 1.12], [s.mean], yerr=np.array(
                [_error_bar(s)]).T, color=COLOURS.get(REAL), marker="o", mfc="white",
                capsize=3, linestyle="none",
                label=f"real, {results.regime_settings[control].get('steps')} steps ({control})")
    if metric in ("iou", "dice"):
        left.set_ylim(0.0, 1.0)  # intervals of 2-3 seeds can reach past the scale: clip
    left.set_xscale("log")
    left.set_xticks(pixels, [f"{r}\n{p / 1e6:.2g} Mpx" for r, p in zip(regimes, pixels)],
                    fontsize=8)
    left.minorticks_off()
    left.set_xlabel("annotated real data (regime)")
    left.set_ylabel(f"test {METRIC_NAMES[metric]}")
    left.set_title(f"{METRIC_NAMES[metric]} by regime (mean ± 95% CI over seeds)", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    compared = [r for r in regimes if any(
        results.difference(metric, r, b, a).n for b, a in results.differences)]
    positions = np.arange(len(compared))
    width = 0.8 / max(len(results.differences), 1)
    for j, (b, a) in enumerate(results.differences):
        summaries = [results.difference(metric, r, b, a) for r in compared]
        xs = [p + (j - (len(results.differences) - 1) / 2) * width for p in positions]
        shown = [(x, s) for x, s in zip(xs, summaries) if s.n]
        if shown:
            errors = np.array([_error_bar(s) for _, s in shown]).T
            right.errorbar([x for x, _ in shown], [s.mean for _, s in shown], yerr=errors,
                           fmt=MARKERS.get(b, "o"), color=COLOURS.get(b), capsize=3,
                           label=f"{b} − {a}")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(positions, compared, fontsize=8)
    right.set_ylabel(f"paired difference in {METRIC_NAMES[metric]}")
    right.set_title("paired difference over seeds (95% CI)", fontsize=10)
    right.grid(alpha=0.3)
    if results.differences:
        right.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _tile(image: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    return overlay(image, {k: v for k, v in masks.items() if k in (MITO, MEMBRANE)})


def tile_rows(rows: list[tuple[str, list[np.ndarray]]], title: str,
               columns_titles: list[str] | None = None) -> bytes:
    """One row of RGB/grey tiles per (label, tiles) entry."""
    columns = max(len(tiles) for _, tiles in rows)
    fig = Figure(figsize=(2.2 * columns + 1.4, 2.2 * len(rows) + 0.5))
    for r, (label, tiles) in enumerate(rows):
        for c in range(columns):
            ax = fig.add_subplot(len(rows), columns, r * columns + c + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(tiles):
                tile = tiles[c]
                ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0,
                          vmax=255 if tile.ndim == 2 else None, interpolation="nearest")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and columns_titles and c < len(columns_titles):
                ax.set_title(columns_titles[c], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def preview_rows(label: str, preview: dict[str, np.ndarray]
                 ) -> list[tuple[str, list[np.ndarray]]]:
    """Two rows of a preview: the grey images, then with their masks (red mitochondria, green
    membranes)."""
    images = list(preview["image"])
    masks = [{k: preview[k][i] for k in (MITO, MEMBRANE) if k in preview}
             for i in range(len(images))]
    return [(label, images), (f"{label} + masks", [_tile(im, m) for im, m in zip(images, masks)])]


def data_grid(regime: str, real: dict[str, np.ndarray] | None,
              synthetic: dict[str, np.ndarray] | None) -> bytes:
    """Real and synthetic images of a regime: grey image, then with masks (red mito, green
    membranes)."""
    rows = [row for label, preview in (("real", real), ("synthetic", synthetic))
            if preview is not None for row in preview_rows(label, preview)]
    return tile_rows(rows, f"regime {regime}: images (masks: red mitochondria, green membranes)")


def layout_grid(layout: str, previews: list[tuple[str, dict[str, np.ndarray]]]) -> bytes:
    """One mask layout's synthetic images, per regime (label, preview): the images, then with
    the layout's masks they were drawn from."""
    rows = [row for regime, preview in previews for row in preview_rows(regime, preview)]
    return tile_rows(rows, f"mask layout {layout}: synthetic images and their masks (red "
                     "mitochondria, green membranes)")


def prediction_tile(image: np.ndarray, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Grey image with true positives yellow, false positives red, false negatives blue."""
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    for mask, colour in ((truth & pred, (1.0, 0.85, 0.0)), (~truth & pred, (1.0, 0.1, 0.1)),
                         (truth & ~pred, (0.1, 0.4, 1.0))):
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.asarray(colour)
    return rgb

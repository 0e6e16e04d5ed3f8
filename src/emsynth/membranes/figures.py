"""The membrane stage's figure (as the study's Figure 3): per slice, EM | mitochondria |
predicted membranes [| ground-truth membranes], as a small PNG for docs/; drawn with the
shared grid writer `emsynth.data.figures.image_grid`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from emsynth.data.figures import centre_crop, default_slices, image_grid
from emsynth.data.readers import read_volume
from emsynth.data.slices import parse_slices
from emsynth.data.volume import MEMBRANE, MITO
from emsynth.errors import input_error
from emsynth.membranes.predict import RECORD_FILE


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


def prediction_folder_figure(
    prediction: str | Path,
    out_path: str | Path,
    truth: str | Path | None = None,
    truth_slices: str | None = None,
    rows: str | None = None,
    crop: int | None = 512,
) -> Path:
    """`prediction_figure` of the output folder of `emsynth membranes predict`, with the true
    membranes of dataset `truth` (its slices `truth_slices`, e.g. "16-19") as a fourth column;
    `rows`: slice positions to draw, e.g. "0,2" (default: 3 spread)."""
    prediction = Path(prediction)
    pred = read_volume(prediction, "slices")
    if MEMBRANE not in pred.labels or MITO not in pred.labels:
        raise input_error(prediction, "has no masks/ and membranes/ folders",
                          "pass the --out folder of `emsynth membranes predict`")
    true_membranes = None
    if truth is not None:
        volume = read_volume(truth)
        if truth_slices is not None:
            volume = volume.select(parse_slices(truth_slices, len(volume), "--truth-slices"))
        if MEMBRANE not in volume.labels or volume.shape != pred.shape:
            raise input_error(truth, f"has no membrane labels of shape {pred.shape}",
                              "pass the dataset and --truth-slices the prediction was made from")
        true_membranes = volume.labels[MEMBRANE]
    picks = None if rows is None else parse_slices(rows, len(pred), "--rows")
    record = prediction / RECORD_FILE
    meta = json.loads(record.read_text()) if record.is_file() else {}
    title = f"{meta.get('data', pred.source)}: membranes predicted from EM + mitochondria"
    return prediction_figure(out_path, pred.image, pred.labels[MITO], pred.labels[MEMBRANE],
                             true_membranes, rows=picks, names=meta.get("slice_names"),
                             crop=crop, title=title)

"""Applying a trained membrane model to whole volumes of any slice size.

The mitochondria channel comes from the volume's own labels (CA1, VNC), from zeros (a volume
without mitochondria, e.g. ISBI 2012: the model then sees "no mitochondria here"), or from a
mitochondria segmenter trained with `emsynth segment train` (its thresholded prediction).
The output for the GAN stage is an emsynth slice folder: images/ + masks/ + membranes/.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects, skeletonize

from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.data.writers import write_slice_folder
from emsynth.errors import EmsynthError, input_error
from emsynth.io import atomic_write_text
from emsynth.membranes.config import INPUTS, TARGET
from emsynth.membranes.normalize import Normalizer
from emsynth.segment.infer import predict_with, probability_to_uint8, write_tiff_stack
from emsynth.segment.metrics import counts
from emsynth.segment.model import SIDECAR, Segmenter
from emsynth.segment.train import MODEL_DIR

PROB_FILE = "membrane_prob.tif"
RECORD_FILE = "prediction.json"


def _model_folder(path: Path) -> Path:
    """A run folder (holding model/) or the model folder itself."""
    return path / MODEL_DIR if (path / MODEL_DIR / SIDECAR).is_file() else path


@dataclass
class MembraneModel:
    """A trained membrane segmenter plus the intensity normaliser it was trained with."""

    segmenter: Segmenter
    normalizer: Normalizer
    path: Path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> MembraneModel:
        folder = _model_folder(Path(path))
        segmenter = Segmenter.load(folder, device)
        if segmenter.channel_names != INPUTS or segmenter.target_name != TARGET:
            raise input_error(
                folder,
                f"is a {segmenter.target_name!r} model with inputs {segmenter.channel_names}, "
                "not a membrane model",
                "pass the run folder of `emsynth membranes train`",
            )
        settings = segmenter.meta.get("membranes", {})
        return cls(segmenter, Normalizer.from_dict(settings.get("normalizer")), folder)

    @property
    def threshold(self) -> float:
        return self.segmenter.threshold


def mito_mask(
    volume: Volume, source: str, device: str = "cpu", precision: str = "bf16"
) -> np.ndarray:
    """The (z, y, x) bool mitochondria channel for `volume` from `source` (MITO_FROM_HELP)."""
    if source == "labels":
        if MITO not in volume.labels:
            raise EmsynthError(
                f"{volume.source or 'volume'}: has no mitochondria labels for the model's mito "
                "channel. Fix: pass --mito-from zeros, or --mito-from MODEL_DIR (a mitochondria "
                "model from `emsynth segment train`)"
            )
        return volume.labels[MITO]
    if source == "zeros":
        return np.zeros(volume.shape, dtype=bool)
    folder = _model_folder(Path(source))
    if not folder.exists():
        raise input_error(
            source, "is neither labels, zeros nor an existing model folder",
            "pass --mito-from labels, zeros or a mitochondria model folder",
        )
    segmenter = Segmenter.load(folder, device)
    if segmenter.target_name != MITO or segmenter.channel_names != ["image"]:
        raise input_error(
            folder, f"predicts {segmenter.target_name!r} from {segmenter.channel_names}, not "
            "mitochondria from the image", "pass a model from `emsynth segment train`",
        )
    prob = predict_with(segmenter, volume.image, device=device, precision=precision)
    return prob >= segmenter.threshold


def predict_membranes(
    model: MembraneModel,
    volume: Volume,
    mito: np.ndarray,
    device: str = "cpu",
    precision: str = "bf16",
    tta: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Membrane probabilities (z, y, x) float32 for `volume` with mitochondria channel `mito`."""
    if mito.shape != volume.shape:
        raise ValueError(f"mito shape {mito.shape} != volume {volume.shape}")
    image = model.normalizer(volume.image)
    inputs = np.stack([image, mito.astype(np.uint8) * 255], axis=1)
    return predict_with(model.segmenter, inputs, device, precision, tta, progress)


def thin_membranes(membranes: np.ndarray, width: int, min_length: int = 10) -> np.ndarray:
    """A thin boundary map of constant `width` px: per-slice skeleton, with skeleton pieces
    shorter than `min_length` px dropped, dilated back to `width` (1 = the bare skeleton).

    Skeletonisation keeps the topology of the mask, so closed cells stay closed. Slices are
    mirror-padded first, so membranes that leave the image still reach its edge when thinned.
    """
    if width < 1:
        raise ValueError("width must be >= 1")
    out = np.empty_like(membranes, dtype=bool)
    radius = (width - 1) / 2.0
    pad = 16
    for z, plane in enumerate(np.asarray(membranes) != 0):  # canonical bools (see checks.py)
        padded = np.pad(plane, pad, mode="symmetric")
        skeleton = skeletonize(padded)[pad:-pad, pad:-pad]
        skeleton = remove_small_objects(skeleton, max_size=min_length - 1, connectivity=2)
        out[z] = ndi.distance_transform_edt(~skeleton) <= radius if skeleton.any() else skeleton
    return out


def membrane_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pixel-wise scores on the membrane class over the whole volume (F1 = Dice)."""
    c = counts(pred, truth)
    return {
        "f1": c.dice, "iou": c.iou, "precision": c.precision, "recall": c.recall,
        "fraction_pred": float(np.mean(pred)), "fraction_truth": float(np.mean(truth)),
    }


def write_prediction(
    out_dir: str | Path,
    volume: Volume,
    mito: np.ndarray,
    prob: np.ndarray,
    membranes: np.ndarray,
    record: dict,
) -> Path:
    """Write the slice folder (images/ + masks/ + membranes/) the GAN reads, the membrane
    probabilities as a uint8 TIFF stack, and prediction.json; returns the folder."""
    out = Path(out_dir)
    labelled = Volume(
        image=volume.image,
        labels={MITO: mito, MEMBRANE: membranes},
        pixel_size_nm=volume.pixel_size_nm,
        source=f"{volume.source} + predicted membranes",
        slice_names=list(volume.slice_names),
    )
    write_slice_folder(labelled, out)
    write_tiff_stack(out / PROB_FILE, probability_to_uint8(prob))
    atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2))
    return out


def evaluate_volume(
    model: MembraneModel,
    volume: Volume,
    mito_from: str = "labels",
    device: str = "cpu",
    precision: str = "bf16",
    tta: bool | None = None,
) -> dict:
    """Predict `volume` and report plausibility numbers, plus membrane F1/IoU (at the model's
    threshold and at 0.5) where the volume has membrane labels."""
    from emsynth.membranes.checks import check_membranes

    mito = mito_mask(volume, mito_from, device, precision)
    prob = predict_membranes(model, volume, mito, device, precision, tta)
    binary = prob >= model.threshold
    report: dict = {
        "source": volume.source, "slices": len(volume), "mito_from": mito_from,
        "threshold": model.threshold, "plausibility": check_membranes(binary, mito).as_dict(),
    }
    if MEMBRANE in volume.labels:
        report["scores"] = membrane_scores(binary, volume.labels[MEMBRANE])
        report["scores@0.5"] = membrane_scores(prob >= 0.5, volume.labels[MEMBRANE])
    return report

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
from emsynth.membranes.checks import Plausibility, check_membranes
from emsynth.membranes.config import INPUTS, TARGET
from emsynth.membranes.normalize import Normalizer
from emsynth.segment.infer import predict_with, probability_to_uint8, write_tiff_stack
from emsynth.segment.metrics import counts
from emsynth.segment.model import Segmenter, model_folder

PROB_FILE = "membrane_prob.tif"
RECORD_FILE = "prediction.json"


@dataclass
class MembraneModel:
    """A trained membrane segmenter plus the intensity normaliser it was trained with."""

    segmenter: Segmenter
    normalizer: Normalizer
    path: Path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> MembraneModel:
        folder = model_folder(path)
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
    volume: Volume, source: str, device: str = "cpu", precision: str = "auto"
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
    folder = model_folder(source)
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
    precision: str = "auto",
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


@dataclass
class Prediction:
    """Membranes predicted for a volume, as `predict_volume` returns them."""

    mito: np.ndarray  # (z, y, x) bool: the model's mitochondria channel
    prob: np.ndarray  # (z, y, x) float32 membrane probabilities
    membranes: np.ndarray  # (z, y, x) bool: thresholded, thinned when thin_width
    checks: Plausibility
    record: dict  # what prediction.json holds


def binarize(prob: np.ndarray, threshold: float, thin_width: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """(prob >= threshold, the same thinned to `thin_width` px; unthinned when 0)."""
    binary = prob >= threshold
    return binary, thin_membranes(binary, thin_width) if thin_width else binary


def predict_volume(
    model: MembraneModel,
    volume: Volume,
    mito_from: str = "labels",
    threshold: float | None = None,
    thin_width: int = 0,
    device: str = "cpu",
    precision: str = "auto",
    tta: bool | None = None,
    progress: Callable[[int], None] | None = None,
    data: str | None = None,
    mito: np.ndarray | None = None,
) -> Prediction:
    """Predict, threshold (the model's threshold unless given) and thin `volume`'s membranes;
    score them against its membrane labels where it has some, and measure their plausibility.
    `data` names the input in the record (default: the volume's source). `mito`: the
    mitochondria channel when the caller already has it from `mito_mask(volume, mito_from)`."""
    if mito is None:
        mito = mito_mask(volume, mito_from, device=device, precision=precision)
    prob = predict_membranes(model, volume, mito, device, precision, tta, progress)
    thr = model.threshold if threshold is None else threshold
    binary, membranes = binarize(prob, thr, thin_width)
    record: dict = {
        "data": data or volume.source, "source": volume.source, "model": str(model.path),
        "mito_from": mito_from, "threshold": thr, "thin_width": thin_width,
        "slice_names": volume.slice_names,
    }
    truth = volume.labels.get(MEMBRANE)
    if truth is not None:
        record["scores"] = membrane_scores(binary, truth)
        if thin_width:
            record["scores_thinned"] = membrane_scores(membranes, truth)
    checks = check_membranes(membranes, mito)
    record["plausibility"] = checks.as_dict()
    return Prediction(mito, prob, membranes, checks, record)


def format_scores(record: dict) -> list[str]:
    """One line per membrane score set of a prediction record (none without true membranes)."""
    lines = []
    for key in ("scores", "scores_thinned"):
        if key in record:
            s = record[key]
            lines.append(f"{key.replace('_', ' ')} vs {record['source']} membranes: F1 "
                         f"{s['f1']:.4f}, IoU {s['iou']:.4f} (precision {s['precision']:.4f}, "
                         f"recall {s['recall']:.4f}, threshold {record['threshold']:.3f})")
    return lines


def evaluate_volume(
    model: MembraneModel,
    volume: Volume,
    mito_from: str = "labels",
    device: str = "cpu",
    precision: str = "auto",
    tta: bool | None = None,
) -> dict:
    """Predict `volume` and report plausibility numbers, plus membrane F1/IoU (at the model's
    threshold and at 0.5) where the volume has membrane labels."""
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

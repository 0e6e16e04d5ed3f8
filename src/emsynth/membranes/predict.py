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
from typing import Any

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


def _no_mito_labels(source: object) -> EmsynthError:
    return EmsynthError(
        f"{source or 'volume'}: has no mitochondria labels for the model's mito "
        "channel. Fix: pass --mito-from zeros, or --mito-from MODEL_DIR (a mitochondria "
        "model from `emsynth segment train`)"
    )


def load_mito_segmenter(source: str, device: str = "cpu") -> Segmenter:
    """The mitochondria segmenter of `--mito-from MODEL_DIR`, checked to read the image."""
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
    return segmenter


def mito_mask(
    volume: Volume, source: str, device: str = "cpu", precision: str = "auto"
) -> np.ndarray:
    """The (z, y, x) bool mitochondria channel for `volume` from `source` (MITO_FROM_HELP)."""
    if source == "labels":
        if MITO not in volume.labels:
            raise _no_mito_labels(volume.source)
        return volume.labels[MITO]
    if source == "zeros":
        return np.zeros(volume.shape, dtype=bool)
    segmenter = load_mito_segmenter(source, device)
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


# --- blockwise: volumes of any size into an OME-Zarr ----------------------------------------------


@dataclass(eq=False)
class MembraneInputs:
    """The membrane model's input (z, 2, y, x) uint8, read lazily region by region: channel 0
    the EM image normalised per slice (lookup tables from whole-slice histograms, so a block
    is normalised as its whole slice is), channel 1 the mitochondria channel x 255: labels
    (non-zero), zeros (`mito` None), or a mitochondria model's mask predicted for just the
    region read (with its own halo, so it too equals the whole-slice prediction)."""

    image: Any  # (z, y, x) uint8, sliced lazily
    luts: np.ndarray | None = None  # (z, 256) uint8 per-slice normalisation; None = as is
    mito: Any | None = None  # (z, y, x) mitochondria labels
    mito_model: Any | None = None  # a segment.blockwise.BlockwiseModel
    mito_threshold: float = 0.5

    @property
    def shape(self) -> tuple[int, int, int, int]:
        z, y, x = self.image.shape
        return (z, 2, y, x)

    dtype = np.dtype(np.uint8)
    ndim = 4

    def mito_region(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        """The bool mitochondria channel of a region (the last model region is reused)."""
        z, height, width = self.image.shape
        key = (*zs.indices(z)[:2], *ys.indices(height)[:2], *xs.indices(width)[:2])
        if self.mito is not None:
            return np.asarray(self.mito[zs, ys, xs]) != 0
        if self.mito_model is None:
            return np.zeros((key[1] - key[0], key[3] - key[2], key[5] - key[4]), bool)
        cached = self.__dict__.get("_cache")
        if cached is not None:
            (z0, z1, y0, y1, x0, x1), mask = cached
            if z0 <= key[0] and key[1] <= z1 and y0 <= key[2] and key[3] <= y1 \
                    and x0 <= key[4] and key[5] <= x1:
                return mask[key[0] - z0 : key[1] - z0, key[2] - y0 : key[3] - y0,
                            key[4] - x0 : key[5] - x0]
        z0, z1 = key[:2]
        prob = self.mito_model.region(
            lambda ry, rx: np.asarray(self.image[z0:z1, ry, rx])[:, None],
            key[2:4], key[4:6], (height, width))
        mask = prob >= self.mito_threshold
        self.__dict__["_cache"] = (key, mask)
        return mask

    def __getitem__(self, key: tuple) -> np.ndarray:
        zs, _, ys, xs = key
        raw = np.asarray(self.image[zs, ys, xs])
        image = raw
        if self.luts is not None:
            z0 = zs.indices(self.image.shape[0])[0]
            image = np.stack([self.luts[z0 + k][plane] for k, plane in enumerate(raw)])
        mito = self.mito_region(zs, ys, xs).astype(np.uint8) * 255
        return np.stack([image, mito], axis=1)

    def label_block(self, name: str, block: Any) -> np.ndarray:
        if name != MITO:
            raise KeyError(name)
        return self.mito_region(*block.slices)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}


def normalization_luts(normalizer: Normalizer, image: Any) -> np.ndarray | None:
    """Per-slice lookup tables (z, 256) of `normalizer` for a lazily read image (None: none)."""
    from emsynth.membranes.normalize import slice_histograms

    if normalizer.method == "none":
        return None
    return np.stack([normalizer.lut(h) for h in slice_histograms(image)])


def lazy_mito_labels(data: str | Path, layout: str = "auto") -> Any:
    """The mitochondria labels of a dataset: lazily from an OME-Zarr, else read whole."""
    from emsynth.data.omezarr import open_ome_zarr
    from emsynth.data.readers import read_volume, resolve_layout

    if resolve_layout(Path(data), layout, None) == "ome-zarr":
        image = open_ome_zarr(data)
        if MITO not in image.labels:
            raise _no_mito_labels(data)
        return image.label(MITO).array
    volume = read_volume(data, layout)
    if MITO not in volume.labels:
        raise _no_mito_labels(volume.source)
    return volume.labels[MITO]


def open_membrane_inputs(data: str | Path, layout: str, luts: np.ndarray | None,
                         mito_from: str, device: str = "auto", precision: str = "auto",
                         image: Any = None) -> MembraneInputs:
    """The MembraneInputs of a dataset (what each dask worker opens): its image (given, or
    opened lazily) and the mitochondria channel of `mito_from` (MITO_FROM_HELP)."""
    from emsynth.data.blocks import input_array
    from emsynth.engine.device import resolve_device
    from emsynth.segment.blockwise import blockwise_model

    if image is None:
        image = input_array(data, layout)
    if mito_from == "labels":
        mito = lazy_mito_labels(data, layout)
        if tuple(mito.shape) != tuple(image.shape):
            raise input_error(data, f"mitochondria labels {tuple(mito.shape)} differ from the "
                              f"image {tuple(image.shape)}", "write them at the image's size")
        return MembraneInputs(image, luts, mito)
    if mito_from == "zeros":
        return MembraneInputs(image, luts)
    dev = resolve_device(device)
    segmenter = load_mito_segmenter(mito_from, str(dev))
    return MembraneInputs(image, luts, None, blockwise_model(segmenter, image.shape, dev, precision),
                          segmenter.threshold)


def load_membrane_blockwise(path: str | Path, shape: Any, device: str = "auto",
                            precision: str = "auto", tta: bool | None = None) -> Any:
    """A membrane model as a segment BlockwiseModel (what each dask worker loads)."""
    from emsynth.engine.device import resolve_device
    from emsynth.segment.blockwise import blockwise_model

    dev = resolve_device(device)
    return blockwise_model(MembraneModel.load(path, str(dev)).segmenter, shape, dev, precision,
                           tta)


def predict_membranes_to_ome_zarr(model: Any, inputs: Any, out: str | Path, *, threshold: float,
                                  block: Any, shape: Any = None, **kwargs: Any) -> dict:
    """Membranes of `inputs` (MembraneInputs, or `Lazy`) blockwise into the OME-Zarr `out`:
    image = membrane probabilities, labels/membrane = mask at `threshold`, labels/mito = the
    mitochondria channel the model read. `model`: a segment BlockwiseModel of the membrane
    model (or `Lazy`); kwargs as `emsynth.segment.blockwise.predict_to_ome_zarr`."""
    from emsynth.segment.blockwise import predict_to_ome_zarr

    return predict_to_ome_zarr(model, inputs, out, threshold=threshold, label=MEMBRANE,
                               block=block, shape=shape, extra_labels=(MITO,),
                               image_name="membrane_prob", **kwargs)

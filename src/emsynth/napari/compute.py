"""What the napari widgets compute, free of Qt so it is testable anywhere.

Layer conventions: images are (y, x) or (z, y, x) uint8-able arrays; the *Synthesize EM*
labels layer paints classes MITO_CLASS (1), MEMBRANE_CLASS (2) and SYNAPSE_CLASS (3).
Each function yields the number of slices finished (for progress and cancelling between
slices) and returns its result (a generator's return value)."""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path

import numpy as np

from emsynth.data.volume import MEMBRANE, MITO, Volume

MITO_CLASS, MEMBRANE_CLASS, SYNAPSE_CLASS = 1, 2, 3
CLASSES = {"mito": MITO_CLASS, "membrane": MEMBRANE_CLASS, "synapse": SYNAPSE_CLASS}


def saved_threshold(model: str | Path) -> float | None:
    """The threshold stored with a segmenter (run folder or model/), None if there is none."""
    from emsynth.segment.model import SIDECAR, model_folder

    try:
        sidecar = model_folder(model) / SIDECAR
        return float(json.loads(sidecar.read_text())["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def as_stack(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """(a (z, y, x) uint8 stack, whether the input was one 2D slice). Non-uint8 images are
    rescaled from their own range to 0-255."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D grey image, got shape {image.shape}")
    if image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = np.zeros(image.shape, np.uint8) if hi <= lo else np.rint(
            (image.astype(np.float64) - lo) / (hi - lo) * 255).astype(np.uint8)
    return (image[None], True) if image.ndim == 2 else (image, False)


def _unstack(x: np.ndarray, single: bool) -> np.ndarray:
    return x[0] if single else x


def segment(image: np.ndarray, model: str | Path, threshold: float | None = None,
            tta: bool = False) -> Generator[int, None, tuple[np.ndarray, np.ndarray]]:
    """(probabilities float32, labels uint8 with 1 = mitochondrion) of an EM image."""
    from emsynth.segment.infer import predict_with
    from emsynth.segment.model import Segmenter

    stack, single = as_stack(image)
    segmenter = Segmenter.load(model)
    thr = segmenter.threshold if threshold is None else threshold
    prob = np.empty(stack.shape, np.float32)
    for z in range(len(stack)):
        prob[z] = predict_with(segmenter, stack[z:z + 1], precision="fp32", tta=tta)[0]
        yield z + 1
    return _unstack(prob, single), _unstack((prob >= thr).astype(np.uint8), single)


def membranes(image: np.ndarray, mito: np.ndarray | None, model: str | Path,
              threshold: float | None = None, tta: bool = False
              ) -> Generator[int, None, np.ndarray]:
    """Labels uint8 (2 = membrane) of an EM image, given its mitochondria (labels > 0; None =
    no mitochondria)."""
    from emsynth.membranes.predict import MembraneModel, predict_membranes

    stack, single = as_stack(image)
    mito_stack = (np.zeros(stack.shape, bool) if mito is None
                  else np.asarray(mito).reshape(stack.shape) > 0)
    model_ = MembraneModel.load(model)
    thr = model_.threshold if threshold is None else threshold
    out = np.empty(stack.shape, np.uint8)
    for z in range(len(stack)):
        volume = Volume(image=stack[z:z + 1], labels={})
        prob = predict_membranes(model_, volume, mito_stack[z:z + 1], precision="fp32", tta=tta)
        out[z] = (prob[0] >= thr).astype(np.uint8) * MEMBRANE_CLASS
        yield z + 1
    return _unstack(out, single)


def synthesize(labels: np.ndarray, generator: str | Path, seed: int = 0, dropout: bool = True
               ) -> Generator[int, None, np.ndarray]:
    """A synthetic EM image (uint8, the labels' shape) from painted classes (1 mito,
    2 membrane, 3 synapse) with a trained generator (GAN run folder or generator file)."""
    from emsynth.gan.export import load_generator
    from emsynth.gan.inference import synthesize_volume

    stack = np.asarray(labels)
    single = stack.ndim == 2
    stack = stack[None] if single else stack
    net, conditioning, _ = load_generator(generator)
    out = np.empty(stack.shape, np.uint8)
    for z in range(len(stack)):
        masks = Volume(image=np.zeros(stack.shape[1:], np.uint8)[None], labels={
            name: (stack[z:z + 1] == value) for name, value in CLASSES.items()},
            source="napari labels")
        out[z] = synthesize_volume(net, masks, conditioning, dropout=dropout, seed=seed).image[0]
        yield z + 1
    return _unstack(out, single)


__all__ = ["CLASSES", "MEMBRANE", "MITO", "as_stack", "membranes", "saved_threshold",
           "segment", "synthesize"]

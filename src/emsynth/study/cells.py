"""The work inside each kind of study cell, built from the stages' own functions.

- membrane-model: trains the membrane model (emsynth.membranes) when the config names a
  training config instead of a trained model;
- membranes: predicted membrane masks of the data's slices, cached slice by slice;
- gan: trains pix2pix on one regime x seed's real data only, then synthesises S images;
- segment: trains one mitochondria U-Net (real, real+synthetic or synthetic data) and
  chooses its threshold on the validation block;
- eval: scores one trained segmenter on the test set.

Each function does the work into its cell folder and returns the result the runner records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch

from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.data.writers import write_slice_folder
from emsynth.engine.config import EngineConfig
from emsynth.engine.device import resolve_device, resolve_precision
from emsynth.errors import EmsynthError, input_error
from emsynth.io import atomic_path
from emsynth.segment.config import SegmentConfig
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import score_volume
from emsynth.segment.model import MODEL_DIR, SIDECAR, WEIGHTS, Segmenter, model_folder
from emsynth.segment.sampling import (
    IMAGE,
    MixedSampler,
    PatchSampler,
    SegmentData,
    segment_data,
)
from emsynth.segment.task import SegmentTask
from emsynth.segment.train import fit_task
from emsynth.study import data as study_data
from emsynth.study.cache import Cell, hash_arrays
from emsynth.study.config import StudyConfig
from emsynth.study.layout import MIXED, PREVIEW, REAL, REAL_PREVIEW, SYNTHETIC, save_preview

GAN_RUN = "gan"
SYNTHETIC_DIR = "synthetic"
SEGMENT_RUN = "run"
MEMBRANE_RUN = "run"
#: Crops kept in previews for the report's figure grids.
PREVIEW_COUNT = 4
PREVIEW_SIDE = 256


class StudyInterrupted(EmsynthError):
    """A cell's work was stopped by Ctrl-C or SIGTERM: the cell stays unfinished."""

    exit_code = 130


def check_finished(result: dict[str, Any], where: Path) -> None:
    """A training stopped by a signal is not a result (its checkpoint lets a rerun resume)."""
    reason = str(result.get("stop_reason", ""))
    if reason.startswith("signal"):
        raise StudyInterrupted(f"{where}: training stopped ({reason}). Fix: rerun the same "
                               "command to resume; finished cells are kept")


def inference_device(engine: EngineConfig) -> torch.device:
    return resolve_device(engine.device)


def preview_of(volume: Volume, channels: list[str], count: int = PREVIEW_COUNT,
               side: int = PREVIEW_SIDE) -> dict[str, np.ndarray]:
    """The first `count` slices of a volume, top-left `side` px: image plus label channels."""
    n = min(count, len(volume))
    window = (slice(0, n), slice(0, side), slice(0, side))
    out = {"image": volume.image[window]}
    out.update({name: volume.labels[name][window] for name in channels if name in volume.labels})
    return out


# --- membranes -------------------------------------------------------------------------------

def train_membrane_model(cell: Cell, config_path: Path) -> dict[str, Any]:
    """Train the membrane model of `config_path` into the cell (emsynth.membranes)."""
    from emsynth.config import load_config
    from emsynth.membranes.config import MembraneConfig
    from emsynth.membranes.task import train_membranes

    cfg = load_config(MembraneConfig, config_path)
    if cfg.data.phantom is None:  # its data path is relative to the repo, like ours
        path = study_data.resolve_path(cfg.data.path, "membrane training data",
                                       f"fix data.path in {config_path}")
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(path)})})
    result = train_membranes(cfg, cell.dir / MEMBRANE_RUN)
    check_finished(result, cell.dir)
    return {"final_validation": result["final"], "threshold": result["threshold"],
            "steps": result["step"], "train_s": result["elapsed_s"],
            "stop_reason": result["stop_reason"], "model_dir": f"{MEMBRANE_RUN}/{MODEL_DIR}"}


def membrane_model_files(model_dir: Path) -> list[Path]:
    """The weight and sidecar files of a membrane model (a run folder or its model/), whose
    content hash stands for the model in cell keys."""
    folder = model_folder(model_dir)
    files = [folder / WEIGHTS, folder / SIDECAR]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise input_error(model_dir, "is not a trained membrane model (no "
                          f"{missing[0].name})", "pass the run folder of emsynth membranes train")
    return files


def predicted_membranes(cache_dir: Path, model_dir: Path, volume: Volume, slices: list[int],
                        threshold: float | None, thin_width: int, device: torch.device,
                        precision: str) -> np.ndarray:
    """Binary membranes (len(slices), y, x) of whole slices, predicted by the membrane model
    from the image and the mitochondria labels; each slice is cached as a PNG in `cache_dir`
    (whose name is the hash of model, data and settings), so every slice is predicted once."""
    from emsynth.membranes.predict import MembraneModel, predict_membranes, thin_membranes

    out = np.empty((len(slices), *volume.shape[1:]), bool)
    missing = []
    for i, z in enumerate(slices):
        path = cache_dir / f"{z:05d}.png"
        if path.is_file():
            out[i] = iio.imread(path) > 127
        else:
            missing.append(i)
    if not missing:
        return out
    model = MembraneModel.load(model_dir, str(device))
    cut_level = model.threshold if threshold is None else threshold
    chunk = 8
    for start in range(0, len(missing), chunk):
        part = [slices[i] for i in missing[start:start + chunk]]
        sub = volume.select(part)
        prob = predict_membranes(model, sub, sub.labels[MITO], str(device), precision)
        binary = prob >= cut_level
        if thin_width:
            binary = thin_membranes(binary, thin_width)
        for z, plane, i in zip(part, binary, missing[start:start + chunk], strict=True):
            out[i] = plane
            with atomic_path(cache_dir / f"{z:05d}.png") as tmp:
                iio.imwrite(tmp, plane.astype(np.uint8) * 255, extension=".png")
    return out


def folder_membranes(folder: Path, volume: Volume) -> np.ndarray:
    """Membranes of every slice of `volume` from a precomputed slice folder."""
    found = read_volume(folder, "slices")
    if MEMBRANE not in found.labels:
        raise input_error(folder, "has no membranes/ folder", "pass a slice folder written by "
                          "emsynth membranes predict")
    if found.shape != volume.shape:
        raise input_error(folder, f"holds {found.shape} slices, the study data {volume.shape}",
                          "predict membranes for exactly the study's data source")
    return found.labels[MEMBRANE]


# --- GAN and synthesis -----------------------------------------------------------------------

def run_gan(cell: Cell, cfg: StudyConfig, real: Volume, seed: int, device: torch.device
            ) -> dict[str, Any]:
    """Train the GAN on `real` alone (its conditioning labels included), then synthesise
    `cfg.synthesis.count` images from deformed real masks or procedural masks."""
    from emsynth.gan.export import load_generator
    from emsynth.gan.inference import synthesize_volume
    from emsynth.gan.train import train_gan
    from emsynth.synthesis import masks as mask_sources

    gan_cfg = cfg.gan_config()
    gan_cfg = gan_cfg.model_copy(update={"engine": gan_cfg.engine.model_copy(
        update={"seed": seed})})
    channels = list(gan_cfg.data.channels)
    if min(real.shape[1:]) < gan_cfg.data.crop:
        raise EmsynthError(
            f"the real data ({real.shape[1]}x{real.shape[2]} px) is smaller than the GAN's "
            f"{gan_cfg.data.crop} px training crop. Fix: use regimes.crop >= gan.data.crop"
        )
    conditioned = Volume(real.image, {name: real.labels[name] for name in channels},
                         real.pixel_size_nm, real.source, real.slice_names)
    result = train_gan(gan_cfg, cell.dir / GAN_RUN, volumes=[conditioned])
    check_finished(result, cell.dir)
    generator, conditioning, _ = load_generator(cell.dir / GAN_RUN, device)

    s = cfg.synthesis
    if s.masks == "real":
        masks = mask_sources.deformed_masks(real, channels, s.count, s.size, seed,
                                            s.elastic_sigma, s.elastic_spacing, s.scale_range)
        mask_source = "real masks, deformed"
    else:
        masks, mask_source = mask_sources.procedural_masks(
            real, channels, s.count, s.size, seed, s.procedural_domain, s.procedural_fit)
    volume = mask_sources.mask_volume(masks, mask_source)
    precision = resolve_precision(gan_cfg.engine.precision, device)
    synthetic = synthesize_volume(generator, volume, conditioning, dropout=s.dropout, seed=seed,
                                  device=device, precision=precision)
    write_slice_folder(synthetic, cell.dir / SYNTHETIC_DIR)
    save_preview(cell.dir / PREVIEW, **preview_of(synthetic, channels))
    save_preview(cell.dir / REAL_PREVIEW, **preview_of(conditioned, channels))
    return {
        "gan": {k: v for k, v in result.items() if isinstance(v, (int, float, str))},
        "synthetic_count": len(synthetic),
        "synthetic_size": list(synthetic.shape[1:]),
        "mask_source": mask_source,
        "mito_fraction_real": float(real.labels[MITO].mean()),
        "mito_fraction_synthetic": float(synthetic.labels[MITO].mean()),
        "mean_intensity_real": float(real.image.mean()),
        "mean_intensity_synthetic": float(synthetic.image.mean()),
        "synthetic_key": hash_arrays(synthetic.image, synthetic.labels[MITO]),
    }


def synthetic_data(gan_cell: Cell) -> SegmentData:
    volume = read_volume(gan_cell.dir / SYNTHETIC_DIR, "slices")
    return segment_data(volume, [IMAGE], MITO)


# --- segmenters ------------------------------------------------------------------------------

def segment_config(cfg: StudyConfig, seed: int) -> SegmentConfig:
    """The segmenter config of every condition of one seed: same budget, augmentation and
    initialisation seed, so conditions differ only in their data."""
    engine = cfg.segment.engine.model_copy(update={"seed": seed})
    return cfg.segment.model_copy(update={"engine": engine})


def run_segment(cell: Cell, cfg: StudyConfig, condition: str, seed: int, real: SegmentData,
                synthetic: SegmentData | None, val: SegmentData) -> dict[str, Any]:
    """Train one segmenter with the segment stage's `fit_task` (threshold chosen on `val`),
    exporting the model to the cell's model/ beside its run/.

    real+synthetic draws each crop of a batch from the synthetic images with probability
    `mix.synthetic_share` (a MixedSampler), else from the real data. Only the regime's real
    data, the synthetic images and the validation block reach the task: never the test block.
    """
    seg_cfg = segment_config(cfg, seed)
    if condition != REAL and synthetic is None:
        raise ValueError(f"condition {condition} needs synthetic data")
    task = SegmentTask(seg_cfg, synthetic if condition == SYNTHETIC else real, val)
    if condition == MIXED:
        p = seg_cfg.sampling
        share = cfg.mix.synthetic_share
        task.sampler = MixedSampler(
            [task.sampler, PatchSampler(synthetic, p.patch_size, p.foreground_fraction)],
            [1.0 - share, share],
        )
    result = fit_task(task, cell.dir / SEGMENT_RUN, resume=True,
                      meta={"condition": condition, "seed": seed}, model_dir=cell.dir / MODEL_DIR)
    check_finished(result, cell.dir)
    return {
        "condition": condition,
        "threshold": result["threshold"],
        "validation": result["final"],
        "steps": result["step"],
        "train_s": result["elapsed_s"],
        "stop_reason": result["stop_reason"],
        "loss": result.get("loss"),
        "threshold_rule": result["threshold_rule"],
        "real_images": 0 if condition == SYNTHETIC else len(real),
        "synthetic_images": 0 if condition == REAL else len(synthetic),
    }


def run_eval(cell: Cell, segment_cell: Cell, test: Volume, device: torch.device,
             precision: str) -> dict[str, Any]:
    """Foreground scores of a trained segmenter on the test volume at its chosen threshold."""
    segmenter = Segmenter.load(segment_cell.dir / MODEL_DIR, device)
    prob = predict_with(segmenter, test.image, device, precision)
    pred = prob >= segmenter.threshold
    truth = test.labels[MITO]
    scores = score_volume(pred, truth)
    middle = len(test) // 2
    window = (middle, slice(0, 2 * PREVIEW_SIDE), slice(0, 2 * PREVIEW_SIDE))
    save_preview(cell.dir / PREVIEW, image=test.image[window], truth=truth[window],
                 pred=pred[window])
    return {"iou": scores.iou, "dice": scores.dice, "precision": scores.precision,
            "recall": scores.recall, "threshold": segmenter.threshold,
            "per_slice_iou": scores.per_slice_iou,
            "foreground_fraction_pred": scores.foreground_fraction_pred,
            "foreground_fraction_truth": scores.foreground_fraction_truth}

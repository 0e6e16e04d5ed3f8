"""Training the membrane model: the segmentation stage's `SegmentTask` with inputs (EM image,
mitochondria mask), target "membrane", and the robustness augmentations of
emsynth.membranes.augment added after the segment stage's own augmentation.

`train_membranes(cfg, run_dir)` reads the training data (a dataset folder or a phantom domain,
plus optional membrane-only extra slices such as ISBI 2012), normalises intensities, runs the
shared engine and exports the model to run_dir/model (a segment-stage `Segmenter` whose
metadata carries the normaliser, so prediction repeats it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emsynth.data.readers import read_volume
from emsynth.data.volume import MEMBRANE, MITO, Volume
from emsynth.errors import EmsynthError
from emsynth.membranes.augment import RobustParams, apply_robust, draw_robust
from emsynth.membranes.config import INPUTS, TARGET, MembraneConfig
from emsynth.membranes.normalize import Normalizer
from emsynth.segment import augment
from emsynth.segment.sampling import MixedSampler, PatchSampler, SegmentData, segment_data
from emsynth.segment.task import SegmentTask
from emsynth.segment.train import fit_task, resolve_split

#: Key of the membrane model's settings inside the exported Segmenter's metadata.
META_KEY = "membranes"


@dataclass
class MembraneBatch:
    inputs: np.ndarray
    target: np.ndarray
    params: augment.AugmentParams
    robust: RobustParams


class MembraneTask(SegmentTask):
    """SegmentTask on (image, mito) -> membrane with blur/noise/mito-dropout added."""

    def __init__(
        self,
        cfg: MembraneConfig,
        train_data: SegmentData,
        val_data: SegmentData | None = None,
        extra: SegmentData | None = None,
    ):
        if train_data.channel_names != INPUTS or train_data.target_name != TARGET:
            raise ValueError(f"membrane data must have inputs {INPUTS} and target {TARGET!r}")
        super().__init__(cfg.segment_config(), train_data, val_data)
        self.membrane_cfg = cfg
        if extra is not None and cfg.data.extra_share > 0:
            extra_sampler = PatchSampler(extra, cfg.sampling.patch_size)
            share = cfg.data.extra_share
            self.sampler = MixedSampler([self.sampler, extra_sampler], [1.0 - share, share])

    def task_config(self) -> dict[str, Any]:
        config = super().task_config()
        c = self.membrane_cfg
        config.update(
            robust=c.robust.model_dump(mode="json"),
            normalize=c.normalize.model_dump(mode="json"),
            geometry=c.geometry.model_dump(mode="json"),
            data=c.data.model_dump(mode="json"),
        )
        return config

    def sample_batch(self, rng: np.random.Generator) -> MembraneBatch:
        base = super().sample_batch(rng)
        robust = draw_robust(rng, self.membrane_cfg.robust, len(base.inputs))
        return MembraneBatch(base.inputs, base.target, base.params, robust)

    def augmented(
        self, batch: MembraneBatch, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float inputs (b, 2, p, p) and target (b, 1, p, p) after every augmentation: the
        segment stage's (geometry, brightness/contrast/gamma), then blur, noise, mito dropout."""
        x, y = super().augmented(batch, device)
        return apply_robust(x, batch.robust, image_channel=0, mito_channel=1), y


def load_training_volume(cfg: MembraneConfig) -> Volume:
    """The labelled training volume: a phantom domain or the dataset at cfg.data.path."""
    d = cfg.data
    if d.phantom is not None:
        return d.phantom.generate()
    volume = read_volume(d.path, d.layout)
    missing = [name for name in (MITO, MEMBRANE) if name not in volume.labels]
    if missing:
        raise EmsynthError(
            f"{d.path}: has no {' or '.join(missing)} labels (has {sorted(volume.labels)}); the "
            "membrane model trains on both. Fix: pass a dataset with membrane and mitochondria "
            "masks (e.g. drosophila_vnc), or --phantom vnc"
        )
    return volume


def with_image(volume: Volume, image: np.ndarray) -> Volume:
    return replace(volume, image=image, labels=dict(volume.labels))


def load_extra(cfg: MembraneConfig, normalizer: Normalizer, device: str) -> SegmentData | None:
    """The membrane-only extra training slices with their mitochondria channel filled."""
    from emsynth.membranes.predict import mito_mask

    path = cfg.data.extra_path
    if path is None:
        return None
    volume = read_volume(path)
    if MEMBRANE not in volume.labels:
        raise EmsynthError(
            f"{path}: has no membrane labels to train on. Fix: pass membrane-labelled slices "
            "(e.g. isbi2012/train) as --add-slices"
        )
    mito = mito_mask(volume, cfg.data.extra_mito, device=device)
    labelled = Volume(
        image=normalizer(volume.image),
        labels={MITO: mito, MEMBRANE: volume.labels[MEMBRANE]},
        pixel_size_nm=volume.pixel_size_nm,
        source=volume.source,
        slice_names=volume.slice_names,
    )
    return segment_data(labelled, INPUTS, TARGET)


def train_membranes(
    cfg: MembraneConfig, run_dir: str | Path, resume: bool = True
) -> dict[str, Any]:
    """Train per `cfg`, export run_dir/model, write run_dir/final_metrics.json.

    Returns the engine's result plus `final` (held-out scores: fg_dice is the membrane F1,
    fg_iou the membrane IoU, at the chosen threshold; `@0.5` variants at 0.5) and `threshold`.
    """
    volume = load_training_volume(cfg)
    seg_cfg = cfg.segment_config()
    split = resolve_split(seg_cfg, len(volume))
    normalizer = Normalizer.fit(cfg.normalize, volume.image[split.train])
    normalized = with_image(volume, normalizer(volume.image))
    train_data = segment_data(normalized.select(split.train), INPUTS, TARGET)
    val_data = segment_data(normalized.select(split.val), INPUTS, TARGET) if split.val else None
    device = "cuda" if cfg.engine.device != "cpu" and torch.cuda.is_available() else "cpu"
    extra = load_extra(cfg, normalizer, device)
    task = MembraneTask(cfg, train_data, val_data, extra)
    meta = {
        META_KEY: {
            "normalizer": normalizer.as_dict(),
            "source": volume.source,
            "extra_source": cfg.data.extra_path,
            "extra_mito": cfg.data.extra_mito if cfg.data.extra_path else None,
            "robust": cfg.robust.model_dump(mode="json"),
        },
        "source": volume.source,
        "train_slices": split.train,
        "val_slices": split.val,
    }
    return fit_task(task, run_dir, resume, meta)

"""Training a segmenter end to end: split a volume, run the engine, choose the threshold, export.

`fit_task` is the one fit-and-export path of every segmenter: the segment stage, the membrane
model (emsynth.membranes) and the study's segmenter cells. The exported model lands in
`run_dir/model` (see `emsynth.segment.model`) and the final validation scores in
`run_dir/final_metrics.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emsynth.data.slices import parse_slices, split_blocks, training_slices
from emsynth.data.volume import Volume
from emsynth.engine.task import step_context
from emsynth.engine.trainer import train
from emsynth.errors import EmsynthError
from emsynth.io import atomic_write_text
from emsynth.segment.config import SegmentConfig
from emsynth.segment.model import MODEL_DIR
from emsynth.segment.sampling import SegmentData, segment_data
from emsynth.segment.task import SegmentTask

__all__ = ["FINAL_METRICS", "MODEL_DIR", "fit", "fit_task", "resolve_split", "train_segmenter"]

FINAL_METRICS = "final_metrics.json"


@dataclass
class SliceSplit:
    train: list[int]
    val: list[int]


def resolve_split(cfg: SegmentConfig, n_slices: int) -> SliceSplit:
    """Train/val slice indices from the data config (val: a contiguous block, never
    interleaved; data.val_gap slices on each side of it never train)."""
    d = cfg.data
    fix = "lower data.val_gap or data.val_block, or pass other --val-slices"
    if d.val_slices is not None:
        val = parse_slices(d.val_slices, n_slices, "validation slices")
    else:
        val = split_blocks(n_slices, d.val_block, gap=d.val_gap, fix=fix)[1]
    given = None
    if d.train_slices is not None:
        given = parse_slices(d.train_slices, n_slices, "training slices")
        overlap = sorted(set(given) & set(val))
        if overlap:
            raise EmsynthError(
                f"slice {overlap[0]} is in both the training and the validation slices. Fix: "
                "make --train-slices and --val-slices disjoint"
            )
    if val and val != list(range(val[0], val[-1] + 1)):
        raise EmsynthError(
            f"validation slices {d.val_slices!r} are not one contiguous block. Fix: give a range "
            "such as 145-164 (neighbouring slices are near-duplicates, so interleaving leaks)"
        )
    train_idx = training_slices(n_slices, val, d.val_gap, given, fix=fix)
    return SliceSplit(train=train_idx, val=val)


def train_segmenter(
    cfg: SegmentConfig,
    volume: Volume,
    run_dir: str | Path,
    resume: bool = True,
    meta: dict | None = None,
) -> dict[str, Any]:
    """Split `volume` per cfg.data (train slices, contiguous val block) and `fit` on it."""
    split = resolve_split(cfg, len(volume))
    train_data = segment_data(volume.select(split.train), cfg.data.inputs, cfg.data.target)
    val_data = None
    if split.val:
        val_data = segment_data(volume.select(split.val), cfg.data.inputs, cfg.data.target)
    info = {"source": volume.source, "train_slices": split.train, "val_slices": split.val}
    return fit(cfg, train_data, val_data, run_dir, resume, {**info, **(meta or {})})


def fit(
    cfg: SegmentConfig,
    train_data: SegmentData,
    val_data: SegmentData | None,
    run_dir: str | Path,
    resume: bool = True,
    meta: dict | None = None,
) -> dict[str, Any]:
    """Train a `SegmentTask` on the data with the engine and export it (see `fit_task`)."""
    return fit_task(SegmentTask(cfg, train_data, val_data), run_dir, resume, meta)


def fit_task(
    task: SegmentTask,
    run_dir: str | Path,
    resume: bool = True,
    meta: dict | None = None,
    model_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train `task` (a SegmentTask or subclass) with the engine, export run_dir/model (or
    `model_dir`, e.g. a study cell's model/ beside its run/).

    The returned dict holds the engine's result plus `final` (validation scores of the exported
    model, with test-time augmentation when cfg.infer.tta, which also re-chooses the threshold
    on those probabilities), `threshold` and `threshold_rule`; run_dir/final_metrics.json holds
    the first two. Only the main process exports.
    """
    run_dir = Path(run_dir)
    model_dir = run_dir / MODEL_DIR if model_dir is None else Path(model_dir)
    cfg = task.cfg
    result = train(task, cfg.engine, run_dir, resume=resume)
    ctx = step_context(cfg.engine)
    final: dict[str, float] = {}
    if not ctx.is_main:
        return {**result, "final": final, "threshold": task.threshold, "threshold_rule": None}
    if task.val_data is not None:
        if cfg.infer.tta:
            final = task.evaluate(ctx, tta=True)
        else:
            final = {k.removeprefix("val/"): v for k, v in result.items() if k.startswith("val/")}
    choice = task.threshold_choice
    rule = choice.reason if choice else "fixed 0.5"
    if choice is None and cfg.threshold.choose and task.val_data is not None:
        rule = "restored from the checkpoint"
    info = {**(meta or {}), "threshold_rule": rule, "final_validation": final}
    task.segmenter(info).save(model_dir)
    record = {"final": final, "threshold": task.threshold, "engine": _scalars(result)}
    atomic_write_text(run_dir / FINAL_METRICS, json.dumps(record, indent=2))
    return {**result, "final": final, "threshold": task.threshold, "threshold_rule": rule}


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}

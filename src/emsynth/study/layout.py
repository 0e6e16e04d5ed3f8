"""The files of a study folder: what `emsynth study run` writes and `emsynth study report`
reads. The study (the writer) and the report (the reader, a layer above it) both take the
names from here, so the report needs none of the study's internals.

    STUDY_DIR/study.json        index: format, config, planned cells, regimes
    STUDY_DIR/study.yaml        the resolved config
    STUDY_DIR/previews/         real_<regime>.npz preview crops
    STUDY_DIR/cells/<name>/     cell.json (record), result.json, done.json, preview*.npz
                                (a GAN cell: one preview per mask layout, `layout_preview`),
                                lock.json while a process runs it
    STUDY_DIR/logs/worker-<k>.log  the output of `study run --workers N`'s helper processes

An export (`emsynth study export`) has the same files without the cells' subfolders (models,
synthetic images, runs): study.json, study.yaml and each finished cell's JSON files (with
--previews also the .npz previews); its records say `"artifacts": false`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emsynth.io import atomic_path

CELLS_DIR = "cells"
STUDY_JSON = "study.json"
STUDY_YAML = "study.yaml"
PREVIEWS_DIR = "previews"
LOGS_DIR = "logs"
FORMAT = "emsynth-study-1"
RECORD = "cell.json"
RESULT = "result.json"
DONE = "done.json"
LOCK = "lock.json"
#: Record key, false in an exported cell: its result is there, its models and images are not.
ARTIFACTS = "artifacts"
PREVIEW = "preview.npz"
#: The GAN cell's real training data as the GAN saw it (with predicted membranes, if any).
REAL_PREVIEW = "preview_real.npz"

#: The study's training conditions, in their canonical order.
REAL = "real"
MIXED = "real+synthetic"
SYNTHETIC = "synthetic"
CONDITIONS = (REAL, MIXED, SYNTHETIC)


def canonical_layout(name: str) -> str:
    """A mask layout's name: "real" is the older name of "deformed" (synthesis.masks)."""
    return "deformed" if name == "real" else name


def variant_name(layout: str, strategy: str, share: float | None) -> str:
    """A real+synthetic recipe's label: layout/strategy, with the synthetic share where it
    applies (the ablation's variants; the report names the main recipe the same way)."""
    return f"{layout}/{strategy}" + ("" if strategy == "pretrain" else f" {share:g}")


def layout_preview(layout: str, main: str) -> str:
    """The GAN cell's preview of one layout's synthetic images: PREVIEW for the study's own
    layout `main` (synthesis.masks), preview-<layout>.npz for the ablation's others."""
    return PREVIEW if layout == main else f"preview-{layout}.npz"


def save_preview(path: Path, **arrays: np.ndarray) -> None:
    """Small uint8/bool arrays for the report's figures, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def load_preview(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays `save_preview` wrote, or None when there is no such file."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}

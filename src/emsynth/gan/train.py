"""Training the GAN end to end: load the data, hold out validation slices, run the engine,
export the generator to `run_dir/generator.safetensors` for `emsynth gan synthesize`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emsynth.data.readers import read_volume
from emsynth.data.slices import DEFAULT_GAP, split_blocks
from emsynth.data.volume import Volume
from emsynth.engine.task import step_context
from emsynth.engine.trainer import train
from emsynth.gan.config import GanConfig
from emsynth.gan.export import GENERATOR_FILE, export_generator
from emsynth.gan.task import GanTask


def load_volumes(cfg: GanConfig) -> list[Volume]:
    """The configured datasets, or the phantom when no path is given."""
    data = cfg.data
    if data.paths:
        return [read_volume(path, data.layout) for path in data.paths]
    return [data.phantom.generate()]


def split_volumes(volumes: list[Volume], val_block: int, gap: int = DEFAULT_GAP
                  ) -> tuple[list[Volume], list[Volume]]:
    """Last `val_block` slices of every volume for validation (a contiguous z block, so that
    near-identical neighbouring slices do not land on both sides), `gap` slices before it left
    out, the rest for training."""
    train_parts, val_parts = [], []
    for volume in volumes:
        train, val, _ = split_blocks(len(volume), val_block, gap=gap, where=volume.source,
                                     fix="lower data.val_block or data.val_gap")
        train_parts.append(volume.select(train))
        if val:
            val_parts.append(volume.select(val))
    return train_parts, val_parts


def train_gan(cfg: GanConfig, run_dir: str | Path, resume: bool = True,
              volumes: list[Volume] | None = None) -> dict[str, Any]:
    """Train per `cfg` (on `volumes` if given, else the configured data); returns the engine's
    final metrics plus `generator`, the exported file."""
    run_dir = Path(run_dir)
    train_volumes, val_volumes = split_volumes(volumes or load_volumes(cfg), cfg.data.val_block,
                                               cfg.data.val_gap)
    task = GanTask(cfg, train_volumes, val_volumes)
    result = train(task, cfg.engine, run_dir, resume=resume)
    if step_context(cfg.engine).is_main:
        info = {"step": result["step"], "sources": [v.source for v in train_volumes]}
        result["generator"] = str(export_generator(run_dir / GENERATOR_FILE,
                                                   task.modules["generator"],
                                                   task.conditioning, info))
    return result

"""The contract between the shared training engine and a model (segmenter, membrane model, GAN).

The engine owns everything generic: device, precision, seeding, the step loop, budgets,
progress, logging, checkpoints, resume and data parallelism. A `Task` owns the model-specific
parts: how to build its networks and optimisers, how to draw a batch, what one step does.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from emsynth.engine.config import EngineConfig
from emsynth.engine.device import autocast_factory, resolve_device, resolve_precision
from emsynth.engine.distributed import Distributed, launched_by_torchrun, wrap_module


@dataclass
class StepContext:
    """What the engine hands a task: where to run and how.

    autocast: a zero-argument factory returning the autocast context for forward passes
    (bf16 autocast on CPU and bf16-capable GPUs, or a null context for fp32).
    wrap: wraps a module for data parallelism (DistributedDataParallel) or returns it as is;
    keyword arguments go to DDP (e.g. `find_unused_parameters=True` for a GAN discriminator
    whose parameters are frozen during the generator step).
    precision: the resolved precision, "bf16" or "fp32".
    """

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    wrap: Callable[..., nn.Module]
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"

    @property
    def is_main(self) -> bool:
        """Only the main process (rank 0) writes files."""
        return self.rank == 0


def step_context(cfg: EngineConfig, distributed: Distributed | None = None) -> StepContext:
    """The context for running a task under `cfg` on this process.

    With `distributed` (the process group the engine joined), what `train` hands the task:
    `wrap` applies DistributedDataParallel. Without it, a context for work after `train` has
    returned (final evaluation, export): the same device and precision as training, rank and
    world size from the torchrun environment, and `wrap` returns modules as they are.
    """
    after_training = distributed is None
    if distributed is None:
        torchrun = launched_by_torchrun()
        rank = int(os.environ["RANK"]) if torchrun else 0
        world_size = int(os.environ["WORLD_SIZE"]) if torchrun else 1
        distributed = Distributed(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)))
    dist = distributed
    device = resolve_device(cfg.device, dist.local_rank)
    precision = resolve_precision(cfg.precision, device)

    def wrap(module: nn.Module, **options: Any) -> nn.Module:
        if after_training:  # the process group is gone: nothing to average
            return module
        return wrap_module(module, distributed=dist, device=device, **options)

    return StepContext(
        device=device,
        autocast=autocast_factory(device, precision),
        wrap=wrap,
        rank=dist.rank,
        world_size=dist.world_size,
        precision=precision,
    )


class Task(ABC):
    """One trainable model. Subclasses fill `modules`, `optimizers`, `schedulers` in `setup`.

    Everything in those three dicts is checkpointed and restored by the engine; schedulers are
    stepped by the engine once per training step. `sample_batch` must draw all its randomness
    from the generator it is given, so that a seed (and a resumed RNG state) fixes the data.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    # Images per step on one process; when set, the progress bar also shows images/s.
    batch_size: int | None = None

    def task_config(self) -> dict[str, Any]:
        """JSON-able settings that define the model (architecture, losses, data); recorded in
        config.yaml/run.json, and resuming a checkpoint written with other settings is refused."""
        return {}

    @abstractmethod
    def setup(self, ctx: StepContext) -> None:
        """Build networks on ctx.device (wrap them with ctx.wrap), optimisers and schedulers."""

    @abstractmethod
    def sample_batch(self, rng: np.random.Generator) -> Any:
        """Draw one training batch (with augmentation) using only `rng` for randomness."""

    @abstractmethod
    def train_step(self, batch: Any, ctx: StepContext) -> dict[str, float]:
        """Forward, backward and optimiser step(s) on one batch; return scalar losses."""

    def validate(self, ctx: StepContext) -> dict[str, float]:
        """Validation metrics (every `val_every` steps and at the end); none by default.

        Runs on every rank under torch.no_grad, with the RNG states and the modules' train/eval
        modes saved and restored around it; use `emsynth.engine.unwrap(module)` to skip DDP."""
        return {}

    def log_images(self, step: int, writer: Any, out_dir: Any, ctx: StepContext) -> None:
        """Write image grids (TensorBoard `writer`, PNGs in `out_dir`); nothing by default.

        Rank 0 only (call `unwrap(module)`: a DDP forward on one rank alone can hang), isolated
        like `validate`; `ctx` is the training step's context (device, autocast)."""

    def extra_state(self) -> dict[str, Any]:
        """Task state beyond modules/optimisers/schedulers to checkpoint (tensors, numbers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned (called on resume, after `setup`)."""

"""The contract between the shared training engine and a model (segmenter, membrane model, GAN).

The engine owns everything generic: device, precision, seeding, the step loop, budgets,
progress, logging, checkpoints, resume and data parallelism. A `Task` owns the model-specific
parts: how to build its networks and optimisers, how to draw a batch, what one step does.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


@dataclass
class StepContext:
    """What the engine hands a task: where to run and how.

    autocast: a zero-argument factory returning the autocast context for forward passes
    (bf16 on CPU, fp16/bf16 AMP on CUDA, or a null context for fp32).
    wrap: wraps a module for data parallelism (DistributedDataParallel) or returns it as is.
    """

    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    wrap: Callable[[nn.Module], nn.Module]
    rank: int = 0
    world_size: int = 1


class Task(ABC):
    """One trainable model. Subclasses fill `modules`, `optimizers`, `schedulers` in `setup`.

    Everything in those three dicts is checkpointed and restored by the engine; schedulers are
    stepped by the engine once per training step. `sample_batch` must draw all its randomness
    from the generator it is given, so that a seed (and a resumed RNG state) fixes the data.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]

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
        """Validation metrics (run every `val_every` steps and at the end); none by default."""
        return {}

    def log_images(self, step: int, writer: Any, out_dir: Any) -> None:
        """Write image grids (TensorBoard `writer`, PNGs in `out_dir`); nothing by default."""

    def extra_state(self) -> dict[str, Any]:
        """Task state beyond modules/optimisers/schedulers to checkpoint (tensors, numbers)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

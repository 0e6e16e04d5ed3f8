"""The one training engine shared by the segmenter, the membrane model and the GAN.

A model implements `Task` (task.py); `train(task, EngineConfig, run_dir)` runs it; stage CLIs
expose the same training options through `emsynth.engine.cli.train_options`.
"""

from emsynth.engine.checkpoint import load_weights, save_weights, unwrap
from emsynth.engine.config import EngineConfig
from emsynth.engine.task import StepContext, Task
from emsynth.engine.trainer import train

__all__ = [
    "EngineConfig",
    "StepContext",
    "Task",
    "load_weights",
    "save_weights",
    "train",
    "unwrap",
]

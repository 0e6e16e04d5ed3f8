"""The one training engine shared by the segmenter, the membrane model and the GAN."""

from emsynth.engine.task import StepContext, Task

__all__ = ["StepContext", "Task"]

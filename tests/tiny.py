"""The tiny configurations the tests train, in one place.

Module constants rather than fixtures: most are needed at import time (module-level override
lists, CLI argument lists, module-scoped fixtures). Import them with `from tiny import ...`
(tests/ is on sys.path, as for engine_tasks). Each test adds its own step counts and
test-specific overrides next to these; the constants are tuples so that nobody edits them in
place by accident.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: The tiny pix2pix preset (ngf/ndf 8, 256 crops of a 4-slice phantom).
GAN_TINY = CONFIGS / "gan" / "tiny.yaml"

#: GAN runs that only train: no checkpoints, no validation, no image logs (add engine.steps).
GAN_TRAIN_ONLY = ("engine.checkpoint_every=0", "engine.val_every=0", "engine.image_every=0")

#: The small U-Net the segmenter tests train: 8-16-32 channels, one residual unit per level.
UNET_SMALL = ("model.channels=[8,16,32]", "model.strides=[2,2]", "model.num_res_units=1")

#: A segmenter that learns a 192 px phantom in 40-300 steps on a CPU, bitwise repeatably
#: (add engine.steps, engine.val_every/log_every/image_every and anything test-specific).
SEGMENT_TINY = (
    *UNET_SMALL,
    "optim.lr=0.003",
    "optim.warmup_steps=5",
    "sampling.patch_size=64",
    "sampling.batch_size=8",
    "sampling.foreground_fraction=0.3",
    "infer.window=64",
    "data.val_block=2",
    "data.val_gap=0",  # 4-6 slice phantoms: too short for the default gap of 5
    "engine.checkpoint_every=0",
    "engine.deterministic=true",
    "engine.precision=fp32",
)


def unet_micro() -> dict:
    """The smallest U-Net (4-8 channels, one level, no residual units) as a config mapping, for
    tests that only need a model to exist (a fresh dict each call: callers may change it)."""
    return {"channels": [4, 8], "strides": [2], "num_res_units": 0}

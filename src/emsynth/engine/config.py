"""`EngineConfig`: the generic training settings every stage embeds as its `engine` section."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from emsynth.config import StrictModel

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(d|h|m|s)?", re.IGNORECASE)
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, None: 1.0}


def parse_duration(value: str | float | None) -> float | None:
    """Seconds from a number or a string like "90s", "20m", "1.5h", "1h30m" (None stays None)."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else float(value)
    text = str(value).strip().lower()
    if text in ("", "none", "null"):
        return None
    parts = list(_DURATION_PART.finditer(text))
    if not parts or "".join(p.group(0) for p in parts).replace(" ", "") != text.replace(" ", ""):
        raise ValueError(f"{value!r} is not a duration; write seconds or e.g. 90s, 20m, 1h, 1h30m")
    if len(parts) > 1 and any(p.group(2) is None for p in parts):
        raise ValueError(f"{value!r}: give every part of a multi-part duration a unit (1h30m)")
    return sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)


class EngineConfig(StrictModel):
    """How to train, independent of what is trained.

    Budgets: training stops at `steps` or when `max_time` (wall-clock seconds of training,
    summed over resumed sessions) is spent, whichever comes first, always with a checkpoint.
    `*_every` intervals are in steps; 0 turns the periodic action off (validation, images and
    a checkpoint still happen once at the end).
    """

    seed: int = Field(0, ge=0, description="Seeds torch, numpy, random and the batch generator.")
    steps: int = Field(1000, ge=0, description="Total optimisation steps.")
    max_time: float | None = Field(
        None, gt=0, description='Wall-clock budget in seconds, or "90s", "20m", "1h"; None = none.'
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto = bf16 autocast on CPU and on bf16-capable GPUs, else fp32."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available.")
    checkpoint_every: int = Field(500, ge=0, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(10, ge=0, description="Steps between metric rows (CSV, TensorBoard).")
    val_every: int = Field(500, ge=0, description="Steps between task.validate calls.")
    image_every: int = Field(1000, ge=0, description="Steps between task.log_images calls.")
    deterministic: bool = Field(
        False, description="Bitwise repeatable runs (deterministic kernels, fixed thread count)."
    )
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = default.")

    @field_validator("max_time", mode="before")
    @classmethod
    def _parse_max_time(cls, value: object) -> float | None:
        if value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool)):
            return parse_duration(value)
        raise PydanticCustomError("duration", "{value!r} is not a duration", {"value": value})

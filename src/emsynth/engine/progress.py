"""How progress lines show time: one formatter for the trainer's ETA, the study's progress
line and the report's durations."""

from __future__ import annotations

import math


def format_duration(seconds: float) -> str:
    """"M:SS", or "H:MM:SS" from an hour on; "--:--" for an unknown (inf/nan) duration."""
    if not math.isfinite(seconds):
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"

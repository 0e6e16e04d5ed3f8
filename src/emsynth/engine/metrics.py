"""Metric logging to metrics.csv (long format: step, elapsed_s, name, value) and TensorBoard.

On resume both logs are cut back to the checkpoint's step, so a resumed run's logs read like
those of an uninterrupted one (no duplicated or orphaned steps).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from emsynth.io import atomic_write_text

METRICS_CSV = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
CSV_HEADER = ["step", "elapsed_s", "name", "value"]


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.csv as dicts with typed values (step int, elapsed_s/value float)."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({"step": int(row["step"]), "elapsed_s": float(row["elapsed_s"]),
                         "name": row["name"], "value": float(row["value"])})
    return rows


class MetricsLog:
    """Appends metric rows to the CSV and TensorBoard of `run_dir` (a no-op when disabled)."""

    def __init__(self, run_dir: Path, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.csv_path = run_dir / METRICS_CSV
        self.writer: Any = None  # a TensorBoard SummaryWriter on the main process
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # slow import: only where it is used

        self._truncate_csv(start_step)
        # purge_step makes TensorBoard drop events a killed session wrote after the checkpoint.
        self.writer = SummaryWriter(
            log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None
        )

    def _truncate_csv(self, start_step: int) -> None:
        """Keep only complete rows up to `start_step` (a kill can leave later or partial rows)."""
        kept = io.StringIO()
        out = csv.writer(kept)
        out.writerow(CSV_HEADER)
        if start_step and self.csv_path.is_file():
            for row in self.csv_path.read_text().splitlines()[1:]:
                fields = next(csv.reader([row]), [])
                if len(fields) == 4 and fields[0].isdigit() and int(fields[0]) <= start_step:
                    out.writerow(fields)
        atomic_write_text(self.csv_path, kept.getvalue())

    def log(self, step: int, elapsed_s: float, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="") as handle:
            rows = csv.writer(handle)
            for name, value in values.items():
                rows.writerow([step, f"{elapsed_s:.3f}", name, repr(float(value))])
        if self.writer is not None:
            for name, value in values.items():
                if math.isfinite(value):
                    self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

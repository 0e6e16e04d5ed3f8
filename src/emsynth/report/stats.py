"""Summaries over seeds: mean with a t-distribution confidence interval, and paired differences.

Seeds are the replicates of the study: each seed re-draws the annotated data, the GAN and the
segmenters' initialisation. With a handful of seeds the normal approximation is far too
narrow, so intervals use Student's t with n - 1 degrees of freedom. Differences between two
conditions are paired over seeds (condition b of seed s minus condition a of the same seed),
which removes the seed-to-seed variation both conditions share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean of `n` values with a two-sided confidence interval (None when n < 2)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        return None if self.high is None else (self.high - self.low) / 2

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (for differences)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3) -> str:
        """"0.712 ± 0.031 (n=3)", or "0.712 (n=1, no CI)"."""
        if self.n == 0:
            return "n/a"
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n={self.n}, no CI)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n={self.n})"

    def as_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "ci_low": self.low,
                "ci_high": self.high, "level": self.level}


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """Mean and t-interval of independent values (NaNs are an error, not skipped)."""
    data = np.asarray(list(values), dtype=np.float64)
    if np.isnan(data).any():
        raise ValueError("values contain NaN")
    n = len(data)
    if n == 0:
        return Summary(0, math.nan, None, None, None, level)
    mean = float(data.mean())
    if n == 1:
        return Summary(1, mean, None, None, None, level)
    sd = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, level)


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> Summary:
    """Summary of b[seed] - a[seed] over the seeds present in both."""
    seeds = sorted(set(a) & set(b))
    return summarize([b[s] - a[s] for s in seeds], level)

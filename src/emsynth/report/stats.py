"""Summaries over seeds: mean with a t-distribution confidence interval, paired differences
with a p-value, and the Holm adjustment over all the comparisons a report makes.

Seeds are the replicates of the study: each seed re-draws the annotated data, the GAN and the
segmenters' initialisation. With a handful of seeds the normal approximation is far too
narrow, so intervals use Student's t with n - 1 degrees of freedom. Differences between two
conditions are paired over seeds (condition b of seed s minus condition a of the same seed),
which removes the seed-to-seed variation both conditions share.

p-values are two-sided paired t-tests (a one-sample t-test of the per-seed differences
against 0): the same t distribution as the intervals, so a 95% interval excludes 0 exactly
when p < 0.05. An exact sign-flip permutation test was not used: over n seeds its smallest
two-sided p is 2 / 2^n (0.25 at 3 seeds, 0.0625 at 5), so it could never reject at 5%.
Many comparisons in one report (regimes x conditions, plus the ablation) make some small
p-values likely by chance; `holm` adjusts them for that (family-wise error rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

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
    #: Two-sided p of "mean = 0" (paired differences only; None when n < 2).
    p: float | None = None

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
                "ci_high": self.high, "level": self.level, "p": self.p}


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


def t_test_p(values: Sequence[float]) -> float | None:
    """Two-sided p of a one-sample t-test of mean = 0 (None for fewer than 2 values; with no
    spread: 1 when every value is 0, else 0)."""
    data = np.asarray(list(values), dtype=np.float64)
    if len(data) < 2:
        return None
    sd = float(data.std(ddof=1))
    mean = float(data.mean())
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(len(data)))
    return float(2.0 * stats.t.sf(abs(t), len(data) - 1))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95
) -> Summary:
    """Summary of b[seed] - a[seed] over the seeds present in both, with its paired t-test p."""
    seeds = sorted(set(a) & set(b))
    differences = [b[s] - a[s] for s in seeds]
    return replace(summarize(differences, level), p=t_test_p(differences))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment, in the input order: the i-th smallest p (from 1) becomes
    max over j <= i of min(1, (m - j + 1) p_(j)), m = len(p_values). Rejecting where the
    adjusted p < alpha keeps the chance of any false rejection among all m at most alpha."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def holm_tested(p_values: Sequence[float | None]) -> list[float | None]:
    """`holm` over the p-values that exist, in the input order; None (a comparison without a
    p: fewer than 2 seeds) stays None and does not count as a comparison."""
    tested = [i for i, p in enumerate(p_values) if p is not None]
    adjusted = dict(zip(tested, holm([p_values[i] for i in tested]), strict=True))
    return [adjusted.get(i) for i in range(len(p_values))]


def p_text(p: float | None) -> str:
    """A p-value as the report prints it: 3 decimals, "< 0.001", or "n/a" (None)."""
    if p is None:
        return "n/a"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"

"""Two studies side by side: the same regime, condition and seed under two recipes.

A study's report compares conditions within one recipe. Changing the recipe itself (the
segmenters' augmentation, the synthetic images' pixel noise) makes a second study; its cells
pair with the first one's by (regime, condition, seed), which keeps the data a seed draws and
the test block fixed, so the per-seed difference isolates the recipe. Pairs are made only where
both studies scored the same test volume and drew the same data for the regime.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from emsynth.errors import input_error
from emsynth.report.collect import StudyResults
from emsynth.report.stats import Summary, holm_tested, paired_difference, summarize


@dataclass(frozen=True)
class RecipeDifference:
    """Study b minus study a at one regime and condition, paired over their common seeds."""

    regime: str
    condition: str
    a: Summary
    b: Summary
    difference: Summary
    p_holm: float | None


def _same_test(a: StudyResults, b: StudyResults) -> bool:
    keys = [(r.index.get("test") or {}).get("key") for r in (a, b)]
    return None not in keys and keys[0] == keys[1]


def _draws(results: StudyResults, regime: str) -> dict | None:
    entry = next((r for r in results.index.get("regimes", []) if r["name"] == regime), None)
    return None if entry is None else entry.get("per_seed")


def compare_studies(a: StudyResults, b: StudyResults,
                    metric: str = "iou") -> tuple[list[RecipeDifference], list[str]]:
    """Paired differences b - a for every (regime, condition) both studies scored on the same
    test volume, Holm-adjusted over the rows; and the regimes left out (their data differ)."""
    if not _same_test(a, b):
        raise input_error(b.study_dir, f"was not scored on the same test volume as {a.study_dir}",
                          "compare studies of the same data and split (or the same --test-data)")
    rows, skipped = [], []
    for where, b_scores in b.scores[metric].items():
        a_scores = a.scores[metric].get(where)
        if a_scores is None:
            continue
        regime, condition = where
        a_draws, b_draws = _draws(a, regime), _draws(b, regime)
        seeds = sorted(set(a_scores) & set(b_scores))
        if a_draws is None or b_draws is None or any(
                a_draws.get(str(s)) != b_draws.get(str(s)) for s in seeds):
            if regime not in skipped:
                skipped.append(regime)
            continue
        rows.append(RecipeDifference(
            regime, condition, summarize([a_scores[s] for s in seeds]),
            summarize([b_scores[s] for s in seeds]),
            paired_difference(a_scores, b_scores), None))
    adjusted = holm_tested([row.difference.p for row in rows])
    rows = [replace(row, p_holm=p) for row, p in zip(rows, adjusted, strict=True)]
    order = {name: k for k, name in enumerate(b.regimes)}
    rows.sort(key=lambda r: (order.get(r.regime, len(order)), r.condition))
    return rows, skipped

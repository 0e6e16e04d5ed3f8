"""The report's plain-language answer, generated from the numbers.

For each regime the real+synthetic recipe (the main recipe, mix.*, or an ablation variant) is
chosen by its mean validation IoU over seeds: the validation block picks, the test block only
scores the pick, so choosing among many recipes does not inflate the test figure. The answer
says where that recipe helps (paired 95% CI of test IoU minus real-only's above zero), hurts
(below zero) or is within noise, by how much (with the Holm-adjusted p over every comparison of
the report), and whether issue 13's targets are met:

- at the crop and the 1-slice regimes, real+synthetic recovers >= 50% of the gap between
  real-only there and real-only on all slices, with the paired CI above zero and >= 5 seeds;
- no loss on all slices: difference >= -0.005, or a CI that includes zero;
- real-only on all slices within 0.02 of the segmentation preset's validation IoU on the same
  split (study config `reference_iou`), compared on validation IoU; else not checked.

A steps control: where a real-only regime has the same data as a regime with a chosen recipe
but more steps (e.g. 1slice-2x: what `add` at share 0.5 trains), the answer also compares the
recipe with it, so a gain that more steps of real data give as well is not credited to the
synthetic images.
"""

from __future__ import annotations

from dataclasses import dataclass

from emsynth.report.collect import Comparison, StudyResults
from emsynth.report.stats import Summary, p_text, paired_difference, summarize
from emsynth.study.layout import MIXED, REAL, SYNTHETIC, canonical_layout, variant_name

METRIC = "iou"
#: The targets' thresholds (issue 13).
GAP_SHARE = 0.5
MIN_SEEDS = 5
NO_LOSS = -0.005
REFERENCE_TOLERANCE = 0.02
ALPHA = 0.05


@dataclass(frozen=True)
class Choice:
    """The real+synthetic recipe of one regime chosen on validation, with its test result."""

    regime: str
    condition: str  # the scores' key: MIXED, or "real+synthetic [<variant>]"
    recipe: str  # e.g. "main recipe: remodel/add 0.5", or a variant "deformed/pretrain"
    validation: Summary  # its validation IoU over seeds (n = 0: none recorded)
    candidates: int
    difference: Summary  # test IoU minus real-only's, paired over seeds
    comparison: Comparison | None


def main_recipe(config: dict) -> str:
    """The main recipe's label from the study config (mix.*, synthesis.masks)."""
    mix = config.get("mix", {})
    strategy = mix.get("strategy", "replace")
    layout = canonical_layout(config.get("synthesis", {}).get("masks", "real"))
    share = None if strategy == "pretrain" else mix.get("synthetic_share", 0.5)
    return f"main recipe: {variant_name(layout, strategy, share)}"


def choose(results: StudyResults, regime: str) -> Choice | None:
    """The recipe with the highest mean validation IoU among those with test scores at
    `regime` (the main recipe first, so it wins ties); the main recipe when none has a
    validation score. Test scores are never looked at."""
    candidates = [MIXED] + [c for r, c in results.variants if r == regime]
    candidates = [c for c in candidates if results.scores[METRIC].get((regime, c))]
    if not candidates:
        return None
    validation = {c: summarize(list(results.validation.get((regime, c), {}).values()))
                  for c in candidates}
    scored = [c for c in candidates if validation[c].n]
    best = max(scored, key=lambda c: validation[c].mean) if scored else candidates[0]
    recipe = main_recipe(results.index["config"]) if best == MIXED else \
        best.split(" [", 1)[1].rstrip("]")
    comparison = results.comparisons(METRIC).get((regime, best, REAL))
    return Choice(regime, best, recipe, validation[best], len(candidates),
                  results.difference(METRIC, regime, best, REAL), comparison)


def verdict(difference: Summary) -> str:
    """helps / hurts / within noise by the paired 95% CI; undecided below 2 seeds."""
    if difference.low is None:
        return "undecided"
    if difference.low > 0:
        return "helps"
    if difference.high < 0:
        return "hurts"
    return "within noise"


def _amount(d: Summary, comparison: Comparison | None) -> str:
    text = f"{d.mean:+.3f} IoU"
    if d.low is not None:
        text += f" [95% CI {d.low:+.3f}, {d.high:+.3f}]"
    text += f", n={d.n}"
    if comparison is not None and comparison.p_holm is not None:
        text += f", Holm p {p_text(comparison.p_holm)}"
        if d.excludes_zero and comparison.p_holm >= ALPHA:
            text += " (not significant after adjusting for the report's comparisons)"
    return text


def _real_mean(results: StudyResults, regime: str) -> float | None:
    summary = results.summary(METRIC, regime, REAL)
    return summary.mean if summary.n else None


def gap_target(results: StudyResults, choice: Choice, all_regime: str | None) -> str:
    """The crop / 1-slice target for one regime: met, missed, or why it is not checked."""
    what = (f"Target at {choice.regime}: real+synthetic recovers >= {GAP_SHARE:.0%} of the gap "
            f"to real-only on all slices, paired CI above zero, >= {MIN_SEEDS} seeds")
    if all_regime is None:
        return f"{what}: target not checked (the study has no regime with all slices)."
    here, top = _real_mean(results, choice.regime), _real_mean(results, all_regime)
    if here is None or top is None or choice.difference.n == 0:
        return f"{what}: target not checked (scores missing)."
    gap = top - here
    if gap <= 0:
        return (f"{what}: target not checked (real-only here, {here:.3f}, is not below "
                f"real-only on all slices, {top:.3f}).")
    share = choice.difference.mean / gap
    reasons = []
    if share < GAP_SHARE:
        reasons.append(f"recovers {share:.0%}")
    if not (choice.difference.low is not None and choice.difference.low > 0):
        reasons.append("CI not above zero")
    if choice.difference.n < MIN_SEEDS:
        reasons.append(f"{choice.difference.n} seeds")
    status = "target missed" if reasons else "target met"
    detail = f"recovers {share:.0%} of a {gap:.3f} gap ({here:.3f} -> {top:.3f})"
    if reasons:
        detail += "; missed on: " + ", ".join(reasons)
    control = matched_by_steps(results, choice)
    if control is not None:
        detail += (f"; but real-only with as many steps ({control}) does as well: the gain is "
                   "one of steps, not of synthetic images")
    return f"{what}: {status} ({detail})."


def control_difference(results: StudyResults, choice: Choice) -> tuple[str, Summary] | None:
    """(control regime, the recipe's test IoU minus the control's, paired over seeds), or None
    when `choice.regime` has no steps control."""
    control = results.steps_control(choice.regime)
    if control is None:
        return None
    table = results.scores[METRIC]
    return control, paired_difference(table.get((control, REAL), {}),
                                      table.get((choice.regime, choice.condition), {}))


def matched_by_steps(results: StudyResults, choice: Choice) -> str | None:
    """The control's name where the recipe helps over real-only but not over real-only with
    as many steps (its gain is one of steps, not of synthetic images); else None."""
    found = control_difference(results, choice)
    if found is None or verdict(choice.difference) != "helps" or found[1].n == 0:
        return None
    return found[0] if verdict(found[1]) != "helps" else None


def steps_control(results: StudyResults, choice: Choice) -> str | None:
    """The recipe against real-only on the same data with more steps (a regime whose only
    condition is real), paired over seeds; None when the study has no such regime."""
    found = control_difference(results, choice)
    if found is None:
        return None
    control, d = found
    if d.n == 0:
        return f"Steps control at {choice.regime}: {control} has no scores yet."
    real = results.summary(METRIC, control, REAL)
    steps = results.regime_settings[control]["steps"]
    return (f"Steps control at {choice.regime}: real-only with {steps} steps ({control}) "
            f"scores {real.mean:.3f}; "
            f"real+synthetic ({choice.recipe}) minus it: {_amount(d, None)} ({verdict(d)}: a "
            f"gain over {choice.regime}'s real-only that this control matches comes from more "
            "steps, not from the synthetic images).")


def no_loss_target(choice: Choice) -> str:
    what = (f"Target at {choice.regime} (all slices): no loss, difference >= {NO_LOSS} or a CI "
            "that includes zero")
    d = choice.difference
    if d.n == 0:
        return f"{what}: target not checked (scores missing)."
    includes_zero = d.low is not None and d.low <= 0 <= d.high
    met = d.mean >= NO_LOSS or includes_zero
    return f"{what}: {'target met' if met else 'target missed'} ({_amount(d, None)})."


def reference_target(results: StudyResults, all_regime: str | None) -> str:
    what = (f"Target: real-only on all slices within {REFERENCE_TOLERANCE} of the segmentation "
            "preset's validation IoU")
    reference = results.index["config"].get("reference_iou")
    if reference is None:
        return f"{what}: target not checked (the study config gives no reference_iou)."
    if all_regime is None:
        return f"{what}: target not checked (the study has no regime with all slices)."
    real = summarize(list(results.validation.get((all_regime, REAL), {}).values()))
    if real.n == 0:
        return f"{what}: target not checked (no validation scores of real-only at {all_regime})."
    met = real.mean >= reference - REFERENCE_TOLERANCE
    return (f"{what}: {'target met' if met else 'target missed'} (validation IoU "
            f"{real.mean:.3f} over {real.n} seeds against {reference:.3f}: "
            f"{real.mean - reference:+.3f}).")


def answer(results: StudyResults) -> list[str]:
    """The answer's sentences, in order: how recipes were chosen, one per regime, the summary
    of where synthetic images help and hurt, synthetic-only, then each target."""
    if REAL not in results.conditions or (MIXED not in results.conditions
                                          and not results.variants):
        return [("The study has no real-only and real+synthetic conditions to compare: nothing "
                "to answer about adding synthetic images.")]
    choices = [c for c in (choose(results, r) for r in results.regimes) if c is not None]
    if not choices:
        return ["No real+synthetic segmenter has been scored yet."]
    most = max(c.candidates for c in choices)
    lines = [(f"Test foreground IoU of real+synthetic minus real-only, paired over seeds; at each "
             f"regime the real+synthetic recipe is the one with the best mean validation IoU "
             f"(up to {most} candidate{'s' if most > 1 else ''}; the test block chooses "
             "nothing).")]
    verdicts: dict[str, list[str]] = {}
    for c in choices:
        word = verdict(c.difference)
        control = matched_by_steps(results, c)
        if control is None:
            verdicts.setdefault(word, []).append(c.regime)
        else:
            verdicts.setdefault("steps", []).append(f"{c.regime} (as much as {control})")
        phrase = {"within noise": "is within noise",
                  "undecided": "is undecided (fewer than 2 seeds)"}.get(word, word)
        lines.append(f"{c.regime}: real+synthetic ({c.recipe}) {phrase}: "
                     f"{_amount(c.difference, c.comparison)}.")
    short = "; ".join(f"{said} at {', '.join(verdicts.get(word, [])) or 'no regime'}"
                      for word, said in (("helps", "help"), ("hurts", "hurt"),
                                         ("within noise", "within noise")))
    if verdicts.get("steps"):
        short += ("; help only as much as real-only trained with as many steps at "
                  + ", ".join(verdicts["steps"]))
    few = verdicts.get("undecided")
    lines.append(f"In short: synthetic images {short}"
                 + (f"; undecided (fewer than 2 seeds) at {', '.join(few)}." if few else "."))
    if SYNTHETIC in results.conditions:
        ratios = []
        for r in results.regimes:
            alone, real = (results.summary(METRIC, r, c) for c in (SYNTHETIC, REAL))
            if alone.n and real.n and real.mean > 0:
                ratios.append((r, alone.mean / real.mean))
        if ratios:
            lines.append("Trained on synthetic images alone, segmenters reach "
                         + ", ".join(f"{ratio:.0%} ({r})" for r, ratio in ratios)
                         + " of real-only's test IoU.")
    regimes = results.regime_settings
    all_regime = next((n for n in results.regimes if regimes.get(n, {}).get("slices") == "all"),
                      None)
    by_regime = {c.regime: c for c in choices}
    for c in choices:
        control = steps_control(results, c)
        if control is not None:
            lines.append(control)
    for name in results.regimes:
        info = regimes.get(name, {})
        if name in by_regime and (info.get("crop") is not None or info.get("slices") == 1):
            lines.append(gap_target(results, by_regime[name], all_regime))
    if all_regime is not None and all_regime in by_regime:
        lines.append(no_loss_target(by_regime[all_regime]))
    lines.append(reference_target(results, all_regime))
    return lines

"""Choosing the probability threshold on validation, robustly.

Why not the arg-max: the IoU-vs-threshold curve of a trained segmenter is nearly flat over a
wide band around its optimum, so the arg-max on a 20-slice validation block mostly reflects
noise in that block; a threshold of 0.7 picked that way scored worse than 0.5 on unseen slices.

The rule (`choose_threshold`):
1. Only thresholds inside [low, high] (default 0.3-0.7) are candidates: outside it the
   model is miscalibrated and the fix is training, not thresholding.
2. If 0.5 (the natural threshold of a sigmoid trained with cross-entropy) scores within
   `tolerance` IoU of the best candidate, keep 0.5: the validation block gives no evidence
   worth the risk of over-fitting it.
3. Otherwise take the plateau: the contiguous run of candidates within `tolerance` of the
   best that contains the best, and use its centre (the choice furthest from the edges where
   IoU starts to fall, so it is least sensitive to a shift of the curve on new data).
4. Shrink that centre halfway towards 0.5 (`shrink`), as a prior that the shift seen on
   validation is partly noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emsynth.segment.metrics import threshold_curve


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    iou_at_threshold: float
    iou_at_half: float
    best_iou: float
    best_threshold: float
    reason: str


def choose_threshold_from_curve(
    thresholds: np.ndarray,
    iou: np.ndarray,
    *,
    low: float = 0.3,
    high: float = 0.7,
    tolerance: float = 0.005,
    shrink: float = 0.5,
) -> ThresholdChoice:
    """Apply the module's rule to an IoU curve sampled at increasing `thresholds`."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    iou = np.asarray(iou, dtype=np.float64)
    if not (0.0 < low <= 0.5 <= high < 1.0):
        raise ValueError("need 0 < low <= 0.5 <= high < 1")
    inside = (thresholds >= low - 1e-9) & (thresholds <= high + 1e-9)
    if not inside.any():
        raise ValueError("no candidate threshold inside [low, high]")
    cand_t, cand_iou = thresholds[inside], iou[inside]
    half = int(np.argmin(np.abs(cand_t - 0.5)))
    best = int(np.argmax(cand_iou))
    iou_half = float(cand_iou[half])
    best_iou = float(cand_iou[best])

    def result(t: float, reason: str) -> ThresholdChoice:
        at = float(np.interp(t, cand_t, cand_iou))
        return ThresholdChoice(t, at, iou_half, best_iou, float(cand_t[best]), reason)

    if iou_half >= best_iou - tolerance:
        return result(0.5, f"0.5 within {tolerance} IoU of the best")
    good = cand_iou >= best_iou - tolerance
    lo = best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    hi = best
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    centre = 0.5 * (cand_t[lo] + cand_t[hi])
    chosen = float(np.clip(0.5 + (1.0 - shrink) * (centre - 0.5), low, high))
    return result(
        round(chosen, 4),
        f"plateau {cand_t[lo]:.2f}-{cand_t[hi]:.2f} centre {centre:.3f} shrunk towards 0.5",
    )


def choose_threshold(
    prob: np.ndarray,
    truth: np.ndarray,
    *,
    low: float = 0.3,
    high: float = 0.7,
    tolerance: float = 0.005,
    shrink: float = 0.5,
    step: float = 0.01,
) -> ThresholdChoice:
    """Choose the threshold for validation probabilities `prob` (0-1) against `truth`."""
    thresholds = np.round(np.arange(low, high + step / 2, step), 6)
    curve = threshold_curve(prob, truth, thresholds)
    return choose_threshold_from_curve(
        curve["threshold"], curve["iou"], low=low, high=high, tolerance=tolerance, shrink=shrink
    )

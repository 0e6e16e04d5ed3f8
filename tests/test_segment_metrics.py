"""Foreground metrics and the threshold rule on hand-made arrays with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from emsynth.segment.metrics import IOU_NAME, counts, format_scores, score_volume, threshold_curve
from emsynth.segment.threshold import choose_threshold, choose_threshold_from_curve


def test_counts_and_scores_known_values():
    truth = np.zeros((2, 4, 4), bool)
    pred = np.zeros((2, 4, 4), bool)
    truth[0, :2, :2] = True  # 4 px
    pred[0, :2, :3] = True  # 6 px, 4 of them right
    truth[1, 0, 0] = True  # 1 px, missed
    c = counts(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (4, 2, 1, 25)
    s = score_volume(pred, truth)
    assert s.iou == pytest.approx(4 / 7)
    assert s.dice == pytest.approx(8 / 11)
    assert s.precision == pytest.approx(4 / 6)
    assert s.recall == pytest.approx(4 / 5)
    assert s.per_slice_iou == pytest.approx([4 / 6, 0.0])


def test_whole_volume_iou_is_not_a_mean_of_slices_nor_of_classes():
    truth = np.zeros((2, 10, 10), bool)
    pred = np.zeros((2, 10, 10), bool)
    truth[0, :5] = True  # 50 px, found exactly
    pred[0, :5] = True
    truth[1, 0, :2] = True  # 2 px, half found
    pred[1, 0, 0] = True
    s = score_volume(pred, truth)
    assert s.iou == pytest.approx(51 / 52)  # total intersection / total union
    assert np.mean(s.per_slice_iou) == pytest.approx(0.75)  # what it must not be
    # Averaging with the background class would lift a poor prediction far up; we don't.
    empty = score_volume(np.zeros_like(truth), truth)
    assert empty.iou == 0.0


def test_empty_slices_count_as_perfect_and_shapes_must_match():
    z = np.zeros((1, 3, 3), bool)
    assert score_volume(z, z).per_slice_iou == [1.0]
    with pytest.raises(ValueError):
        counts(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


def test_format_scores_says_foreground_whole_volume():
    s = score_volume(np.eye(4, dtype=bool), np.eye(4, dtype=bool))
    text = format_scores(s)
    assert IOU_NAME in text and "foreground IoU (whole volume)" in text
    assert "1.0000" in text


def test_threshold_curve_matches_direct_thresholding():
    rng = np.random.default_rng(0)
    truth = rng.random((3, 40, 50)) < 0.2
    prob = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1).astype(np.float32)
    thresholds = np.array([0.25, 0.5, 0.75])
    curve = threshold_curve(prob, truth, thresholds)
    for t, iou, dice in zip(thresholds, curve["iou"], curve["dice"]):
        direct = counts(prob >= t, truth)
        assert iou == pytest.approx(direct.iou, abs=2e-3)
        assert dice == pytest.approx(direct.dice, abs=2e-3)


def test_rule_keeps_half_when_it_is_within_tolerance():
    t = np.round(np.arange(0.3, 0.701, 0.01), 2)
    iou = 0.90 - 0.5 * (t - 0.55) ** 2  # best at 0.55, 0.5 only 0.00125 below
    choice = choose_threshold_from_curve(t, iou, tolerance=0.005)
    assert choice.threshold == 0.5
    assert choice.best_threshold == pytest.approx(0.55)


def test_rule_takes_shrunk_plateau_centre_not_the_argmax():
    t = np.round(np.arange(0.3, 0.701, 0.01), 2)
    iou = np.full_like(t, 0.80)
    iou[(t >= 0.58) & (t <= 0.66)] = 0.85  # plateau 0.58-0.66
    iou[t == 0.66] = 0.852  # noisy arg-max at the plateau's edge
    choice = choose_threshold_from_curve(t, iou, tolerance=0.005, shrink=0.5)
    # centre 0.62, shrunk halfway towards 0.5 -> 0.56 (not the arg-max 0.66)
    assert choice.threshold == pytest.approx(0.56)
    assert choice.best_threshold == pytest.approx(0.66)
    no_shrink = choose_threshold_from_curve(t, iou, tolerance=0.005, shrink=0.0)
    assert no_shrink.threshold == pytest.approx(0.62)


def test_rule_ignores_optima_outside_the_sane_range():
    t = np.round(np.arange(0.05, 0.951, 0.01), 2)
    iou = np.where(t > 0.9, 0.99, 0.5 + 0.3 * t)  # spurious peak at 0.95
    choice = choose_threshold_from_curve(t, iou, low=0.3, high=0.7, tolerance=0.005, shrink=0.0)
    # Only 0.3-0.7 are candidates: best 0.71 at 0.70, within 0.005 of it 0.69 (0.707) but not
    # 0.68 (0.704), so the plateau is 0.69-0.70 and its centre 0.695 is the threshold. A rule
    # that looked at the peak beyond 0.9 first and clipped afterwards would give 0.7.
    assert choice.threshold == pytest.approx(0.695)
    assert choice.best_threshold == pytest.approx(0.7)
    assert choice.iou_at_half == pytest.approx(0.65) and choice.best_iou == pytest.approx(0.71)


def test_choose_threshold_on_probabilities_of_a_biased_model():
    rng = np.random.default_rng(1)
    truth = rng.random((2, 64, 64)) < 0.3
    # A model that is over-confident on background: foreground needs a low threshold.
    prob = np.where(truth, rng.uniform(0.32, 0.9, truth.shape), rng.uniform(0.0, 0.3, truth.shape))
    choice = choose_threshold(prob.astype(np.float32), truth)
    # Every threshold in (0.30, 0.32] separates the classes: the curve is ~1.0 at 0.30-0.32 and
    # 0.98 from 0.33 on (1.7% of the foreground lost), so the plateau is 0.30-0.32, its centre
    # 0.31, shrunk halfway towards 0.5: 0.405.
    assert choice.threshold == pytest.approx(0.405)
    assert choice.best_threshold == pytest.approx(0.3) and choice.best_iou == 1.0
    assert choice.iou_at_threshold > choice.iou_at_half


def test_lucchi_label_sets_agree_at_the_documented_iou(shared_data):
    """The data README: Lucchi++ and the original EPFL labels agree at ~0.78 foreground IoU."""
    from emsynth.data.readers import read_volume

    folder = shared_data / "lucchi_pp" / "train"
    lucchi_pp = read_volume(folder).labels["mito"]
    epfl = read_volume(folder, mask_dir="masks_epfl").labels["mito"]
    scores = score_volume(epfl, lucchi_pp)
    assert scores.iou == pytest.approx(0.781, abs=0.005)
    assert scores.precision > 0.98  # EPFL outlines lie inside the wider Lucchi++ ones

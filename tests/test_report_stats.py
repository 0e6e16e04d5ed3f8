"""Statistics of the study report: means with t-intervals over seeds, paired differences with
their t-test p, and the Holm adjustment."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from emsynth.report.stats import holm, paired_difference, summarize, t_test_p


def test_mean_and_interval_match_scipy_t():
    values = [0.61, 0.65, 0.58, 0.70]
    s = summarize(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                                 scale=stats.sem(values))
    assert s.n == 4
    assert s.mean == pytest.approx(0.635)
    assert s.sd == pytest.approx(np.std(values, ddof=1))
    assert s.low == pytest.approx(low)
    assert s.high == pytest.approx(high)
    # By hand: t(0.975, 3) = 3.182446, sd = sqrt(0.0081 / 3) = 0.0519615, half = t * sd / 2.
    assert s.half_width == pytest.approx(3.182446 * 0.0519615 / 2, rel=1e-5)


def test_two_seeds_give_a_wide_interval():
    s = summarize([0.5, 0.7])
    # t(0.975, 1) = 12.706: the interval is 12.7 times the standard error on each side.
    assert s.half_width == pytest.approx(12.7062047 * 0.1, rel=1e-6)
    assert s.text() == "0.600 ± 1.271 (n=2)"


def test_other_levels():
    values = [1.0, 2.0, 4.0]
    s = summarize(values, level=0.9)
    low, high = stats.t.interval(0.9, 2, loc=np.mean(values), scale=stats.sem(values))
    assert (s.low, s.high) == pytest.approx((low, high))


def test_one_seed_has_no_interval():
    s = summarize([0.42])
    assert s.n == 1 and s.mean == 0.42
    assert s.low is None and s.high is None and s.half_width is None
    assert s.text() == "0.420 (n=1, no CI)"
    assert not s.excludes_zero


def test_empty_and_nan():
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)
    assert summarize([]).text() == "n/a"
    with pytest.raises(ValueError):
        summarize([0.5, float("nan")])


def test_paired_difference_uses_per_seed_differences():
    a = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.40}
    b = {0: 0.55, 1: 0.64, 2: 0.76, 5: 0.99}  # seed 3 and 5 unpaired: left out
    d = paired_difference(a, b)
    diffs = [0.05, 0.04, 0.06]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert d.n == 3
    assert d.mean == pytest.approx(0.05)
    assert (d.low, d.high) == pytest.approx((low, high))
    assert d.excludes_zero  # consistent small gains: the interval is above 0
    # Pairing matters: the unpaired interval of the same numbers would straddle 0.
    unpaired_half = stats.t.ppf(0.975, 4) * math.sqrt(
        np.var([0.5, 0.6, 0.7], ddof=1) / 3 + np.var([0.55, 0.64, 0.76], ddof=1) / 3)
    assert unpaired_half > 0.05 > d.half_width


def test_paired_difference_sign_and_zero():
    same = {0: 0.3, 1: 0.5}
    d = paired_difference(same, same)
    assert d.mean == 0 and d.half_width == 0
    worse = paired_difference({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.52, 2: 0.49})
    assert worse.mean < 0 and worse.high < 0 and worse.excludes_zero


def test_paired_p_by_hand_and_against_scipy():
    # Differences 0.05, 0.04, 0.06: t = 0.05 / (0.01 / sqrt 3) = 8.660, 2 degrees of freedom,
    # where the two-sided p has the closed form 1 - t / sqrt(t^2 + 2) = 0.013072.
    d = paired_difference({0: 0.60, 1: 0.62, 2: 0.64}, {0: 0.65, 1: 0.66, 2: 0.70})
    t = 0.05 / (0.01 / math.sqrt(3))
    assert d.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert d.p == pytest.approx(0.013072, abs=1e-6)
    a, b = [0.61, 0.55, 0.70, 0.48, 0.66], [0.60, 0.59, 0.69, 0.55, 0.64]
    expected = stats.ttest_rel(b, a).pvalue
    assert paired_difference(dict(enumerate(a)), dict(enumerate(b))).p == pytest.approx(expected)
    assert t_test_p([0.01, -0.02, 0.03]) == pytest.approx(
        stats.ttest_1samp([0.01, -0.02, 0.03], 0.0).pvalue)
    # The 95% interval excludes 0 exactly when p < 0.05 (the same t distribution).
    for values in ([0.05, 0.04, 0.06], [0.01, -0.02, 0.03], [0.02, 0.0, 0.05, 0.01]):
        s = summarize(values)
        assert s.excludes_zero == (t_test_p(values) < 0.05)


def test_paired_p_edge_cases():
    assert t_test_p([0.3]) is None and paired_difference({0: 0.5}, {0: 0.6}).p is None
    assert summarize([0.1, 0.2]).p is None  # a plain summary is not a test
    assert t_test_p([0.0, 0.0, 0.0]) == 1.0  # no difference at all
    assert t_test_p([0.02, 0.02]) == 0.0  # the same gain every seed: no spread


def test_holm_by_hand():
    # m = 4. Sorted: 0.005 -> 4 x 0.005 = 0.02; 0.01 -> 3 x 0.01 = 0.03; 0.03 -> 2 x 0.03 =
    # 0.06; 0.04 -> 1 x 0.04 = 0.04, raised to 0.06 (adjusted p never falls down the order).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []
    assert holm([0.01, 0.01]) == [0.02, 0.02]
    # Never below the raw p, never above Bonferroni's m p.
    raw = [0.001, 0.2, 0.04, 0.012, 0.3]
    for p, adjusted in zip(raw, holm(raw)):
        assert p <= adjusted <= min(1.0, len(raw) * p)

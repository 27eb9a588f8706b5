"""Metric functions of the validation stage against known values.

AUC by hand, a bootstrap CI that covers the truth on simulated scores, the calibration error on
calibrated and miscalibrated data, and DeLong's test against R pROC's published reference values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from tasks.validate.compare import BETTER, NO_DIFFERENCE, NOT_ASSESSABLE, WORSE, verdict
from tasks.validate.delong import delong_covariance, delong_test
from tasks.validate.metrics import (
    _mann_whitney_auc,
    auc,
    auc_bootstrap_ci,
    binary_metrics,
    brier,
    calibration_bins,
    expected_calibration_error,
    operating_point,
)
from tasks.validate.subgroups import age_bands, subgroup_aucs

# --------------------------------------------------------------------------------------------
# AUC
# --------------------------------------------------------------------------------------------


def test_auc_by_hand_equals_sklearn() -> None:
    """Three positives, three negatives, one tie: the pair count done on paper.

    Positives 0.35, 0.8, 0.9; negatives 0.1, 0.4, 0.35. Pairs won: 0.35 beats 0.1 and ties 0.35
    (1.5), 0.8 and 0.9 beat all three (3 + 3): AUC = 7.5 / 9.
    """
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.35, 0.9])
    assert auc(y, s) == pytest.approx(7.5 / 9, abs=1e-12)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert float(_mann_whitney_auc(s[y == 1], s[y == 0])) == pytest.approx(7.5 / 9, abs=1e-12)


def test_auc_is_none_without_both_classes() -> None:
    assert auc(np.zeros(4, int), np.linspace(0, 1, 4)) is None
    assert auc_bootstrap_ci(np.array([1, 0, 0, 0]), np.linspace(0, 1, 4)) == (None, None)


def test_stratified_bootstrap_ci_covers_the_true_auc() -> None:
    """Binormal scores with known AUC = Phi(d / sqrt 2): the 95 % CI covers it in most runs."""
    d = 1.0
    truth = float(stats.norm.cdf(d / math.sqrt(2)))
    rng = np.random.default_rng(2024)
    covered, widths = 0, []
    runs = 50
    for k in range(runs):
        y = np.r_[np.ones(40, int), np.zeros(60, int)]
        s = np.r_[rng.normal(d, 1, 40), rng.normal(0, 1, 60)]
        low, high = auc_bootstrap_ci(y, s, resamples=200, confidence=0.95, seed=k)
        assert low is not None and high is not None and low <= auc(y, s) <= high
        covered += low <= truth <= high
        widths.append(high - low)
    assert covered >= 0.84 * runs, f"coverage {covered}/{runs}"
    assert float(np.mean(widths)) < 0.3  # not trivially wide


def test_bootstrap_ci_is_reproducible_for_a_seed() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.4).astype(int)
    s = rng.random(80) + 0.3 * y
    a = auc_bootstrap_ci(y, s, resamples=100, seed=5)
    assert a == auc_bootstrap_ci(y, s, resamples=100, seed=5)
    assert a != auc_bootstrap_ci(y, s, resamples=100, seed=6)


# --------------------------------------------------------------------------------------------
# Operating point, Brier, calibration
# --------------------------------------------------------------------------------------------


def test_operating_point_counts_a_score_at_the_threshold_as_positive() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.5, 0.49, 0.2, 0.5, 0.1, 0.3, 0.2, 0.05])
    op = operating_point(y, s, 0.5)
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (2, 2, 1, 4)
    assert op["sensitivity"] == pytest.approx(0.5)
    assert op["specificity"] == pytest.approx(0.8)
    none = operating_point(np.zeros(3, int), np.array([0.1, 0.6, 0.7]), 0.5)
    assert none["sensitivity"] is None and none["specificity"] == pytest.approx(1 / 3)


def test_brier_is_the_mean_squared_error() -> None:
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.2, 0.6, 0.5])
    assert brier(y, s) == pytest.approx(np.mean((s - y) ** 2))


def test_calibration_bins_match_sklearn_calibration_curve() -> None:
    rng = np.random.default_rng(1)
    s = rng.random(400)
    s[:4] = [0.0, 0.1, 0.5, 1.0]  # scores exactly on bin edges
    y = (rng.random(400) < s).astype(int)
    table = calibration_bins(y, s, 10)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(table["fraction_positive"], prob_true, atol=1e-12)
    np.testing.assert_allclose(table["mean_predicted"], prob_pred, atol=1e-12)
    assert int(table["count"].sum()) == 400


def test_ece_small_when_calibrated_large_when_not() -> None:
    rng = np.random.default_rng(3)
    s = rng.random(20_000)
    y = (rng.random(20_000) < s).astype(int)
    assert expected_calibration_error(y, s, 10) < 0.02
    overconfident = np.clip(0.5 + 1.8 * (s - 0.5), 0, 1)  # same ranking, pushed to 0 and 1
    assert expected_calibration_error(y, overconfident, 10) > 0.1
    assert expected_calibration_error(y, s**3, 10) > 0.15  # systematically too low
    # hand example: one bin [0.8, 0.9) with scores 0.8, 0.8 and one positive: |0.8 - 0.5|
    assert expected_calibration_error(np.array([1, 0]), np.array([0.8, 0.8]), 10) == \
        pytest.approx(0.3)


def test_binary_metrics_on_a_set_with_one_class_reports_counts_only() -> None:
    m = binary_metrics(np.zeros(6, int), np.linspace(0.1, 0.6, 6), 0.5, bootstrap=100,
                       confidence=0.95, bins=10, seed=0)
    assert m["n"] == 6 and m["positives"] == 0
    assert m["auc"] is None and m["auc_ci_low"] is None and m["sensitivity"] is None
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["brier"] is not None and m["ece"] is not None


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------

# pROC's aSAH data set (Turck et al. 2010, Intensive Care Med 36:107-115; 113 patients with an
# aneurysmal subarachnoid haemorrhage, shipped with the R package pROC as `data(aSAH)`), in the
# package's row order. y = outcome == "Poor" (41 of 113); wfns is the 5-level WFNS grade.
_ASAH_POOR = (
    "0000110100101100101110100000000010011011000000000110001000101001110110111100011010000001"
    "0000000000001111110001000"
)
_ASAH_S100B = """
0.13 0.14 0.10 0.04 0.13 0.10 0.47 0.16 0.18 0.10 0.12 0.10 0.44 0.71 0.04 0.08 0.49 0.04 0.07
0.33 0.09 0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48 0.09
0.96 0.25 0.50 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.10 0.14
0.15 0.07 0.06 0.77 0.05 0.09 0.30 0.03 0.09 0.04 0.23 0.70 0.09 0.27 0.71 0.08 0.26 0.08 0.16
0.09 0.13 0.10 0.08 0.11 0.33 0.11 0.28 0.07 0.10 0.32 0.22 0.07 0.05 0.24 0.38 0.10 0.15 0.08
0.14 0.10 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.50 0.48
"""
_ASAH_WFNS = (
    "1111325412525512522521111212113421454142551124112552125122215112521452441412142123242145"
    "1154221113125225552445111"
)
_ASAH_NDKA = """
3.01 8.54 8.09 10.42 17.40 12.75 6.00 13.20 15.54 6.01 15.96 17.86 5.18 8.90 13.41 20.75 11.60
16.11 32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.30 80.30 12.80 9.80 9.81 9.85 18.21
5.03 14.04 21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87 9.44
7.66 12.98 419.19 27.19 22.27 9.95 21.22 11.73 10.40 58.83 6.39 11.09 12.22 13.67 17.21 22.63
12.90 9.70 21.57 8.23 72.57 15.54 10.51 10.60 14.57 5.19 9.63 4.61 21.48 17.30 12.71 9.44 11.07
19.46 10.83 5.37 11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.90 46.83 11.68 12.67 9.01 9.57 34.06
11.72 14.26 47.61 11.67 24.58 10.33 13.87 15.89 22.43 6.79 13.45
"""


def _asah() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    y = np.array([int(c) for c in _ASAH_POOR])
    preds = {"s100b": np.array(_ASAH_S100B.split(), dtype=float),
             "wfns": np.array([int(c) for c in _ASAH_WFNS], dtype=float),
             "ndka": np.array(_ASAH_NDKA.split(), dtype=float)}
    return y, preds


def test_asah_data_is_the_published_data_set() -> None:
    """113 patients, 41 with a poor outcome; AUCs as pROC computes them.

    Reference AUCs: pROC's test suite, tests/testthat/helper-deLongPlacementsCpp-expected.R
    (``theta`` of the forward placements of ndka, wfns and s100b).
    """
    y, preds = _asah()
    assert {k: v.size for k, v in preds.items()} == {"s100b": 113, "wfns": 113, "ndka": 113}
    assert (y.size, int(y.sum())) == (113, 41)
    assert auc(y, preds["ndka"]) == pytest.approx(0.611957994579946, abs=1e-12)
    assert auc(y, preds["wfns"]) == pytest.approx(0.823678861788618, abs=1e-12)
    assert auc(y, preds["s100b"]) == pytest.approx(0.731368563685637, abs=1e-12)


@pytest.mark.parametrize(("a", "b", "z", "p", "ci_low", "ci_high"), [
    ("wfns", "s100b", 2.20898359144091, 0.0271757822291882,
     0.0104061769564846, 0.174214419249478),
    ("wfns", "ndka", 2.79777591868904, 0.00514557970691098,
     0.0634011709339876, 0.3600405634833566),
    ("ndka", "s100b", -1.39077002573558, 0.164295175223054,
     -0.2876917446341914, 0.0488706064228094),
])
def test_delong_matches_r_proc_roc_test(a: str, b: str, z: float, p: float, ci_low: float,
                                        ci_high: float) -> None:
    """DeLong's test equals R pROC's ``roc.test`` (paired, two-sided, 95 % CI of the difference).

    Reference values: pROC's own test suite (github.com/xrobin/pROC,
    tests/testthat/test-roc.test.R, "roc.test statistic and p are as expected with defaults"),
    for ``roc.test(roc(aSAH$outcome, aSAH$<a>), roc(aSAH$outcome, aSAH$<b>))``; the first is
    also the example printed in pROC's ``roc.test`` documentation (Z = 2.209, p = 0.02718,
    with the curves in the other order Z = -2.209).
    """
    y, preds = _asah()
    result = delong_test(y, preds[a], preds[b], confidence=0.95)
    assert result.z == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    assert result.ci_low == pytest.approx(ci_low, rel=1e-9)
    assert result.ci_high == pytest.approx(ci_high, rel=1e-9)
    assert result.delta == pytest.approx(auc(y, preds[a]) - auc(y, preds[b]), abs=1e-12)
    # as printed in the documentation's example
    doc = delong_test(y, preds["s100b"], preds["wfns"])
    assert (round(doc.z, 3), round(doc.p_value, 5)) == (-2.209, 0.02718)


def _brute_force_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) straight from the definition: the m x n kernel table."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    cov = np.cov(v10) / pos.shape[1] + np.cov(v01) / neg.shape[1]
    return psi.mean(axis=(1, 2)), cov


def test_fast_delong_equals_the_definition_with_ties() -> None:
    rng = np.random.default_rng(11)
    y = (rng.random(60) < 0.35).astype(int)
    scores = np.round(np.vstack([rng.random(60) + 0.4 * y, rng.random(60),
                                 rng.random(60) + 0.2 * y]), 1)  # rounding makes ties
    aucs, cov = delong_covariance(y, scores)
    ref_aucs, ref_cov = _brute_force_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-14)


def test_delong_of_identical_scores_is_no_difference() -> None:
    y, preds = _asah()
    result = delong_test(y, preds["wfns"], preds["wfns"])
    assert (result.delta, result.z, result.p_value) == (0.0, 0.0, 1.0)


def test_delong_refuses_too_few_cases_of_a_class() -> None:
    with pytest.raises(ValueError, match="two cases of both classes"):
        delong_test(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]),
                    np.array([0.5, 0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        delong_covariance(np.array([1, 0, 1, 0]), np.ones((2, 3)))


def test_verdict_words() -> None:
    assert verdict(0.05, 0.01, 0.05) == BETTER
    assert verdict(-0.05, 0.01, 0.05) == WORSE
    assert verdict(0.05, 0.2, 0.05) == NO_DIFFERENCE
    assert verdict(None, None, 0.05) == NOT_ASSESSABLE


# --------------------------------------------------------------------------------------------
# Subgroups
# --------------------------------------------------------------------------------------------


def test_age_bands_are_half_open_with_unknown_and_outside() -> None:
    bands = age_bands(np.array([0, 59.9, 60, 79.99, 80, 149, 150, np.nan, -1]),
                      [0, 60, 80, 150])
    assert list(bands) == ["0-60", "0-60", "60-80", "60-80", "80-150", "80-150", "outside",
                           "unknown", "outside"]


def test_subgroup_auc_left_out_below_five_of_a_class() -> None:
    rng = np.random.default_rng(4)
    n = 80
    y = np.r_[np.ones(20, int), np.zeros(60, int)]
    s = rng.random(n) + 0.5 * y
    sex = np.where(np.arange(n) % 2 == 0, "F", "M")
    age = np.full(n, 65.0)
    age[:3] = 85.0  # three old patients, all positive: too few for an AUC
    rows = {(r["variable"], r["group"]): r for r in subgroup_aucs(y, s, sex, age, [0, 70, 150])}
    assert rows[("sex", "F")]["auc"] == pytest.approx(auc(y[sex == "F"], s[sex == "F"]))
    assert rows[("age", "70-150")]["n"] == 3 and rows[("age", "70-150")]["auc"] is None
    assert rows[("age", "70-150")]["note"]
    assert rows[("age", "0-70")]["positives"] == 17

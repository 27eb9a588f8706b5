"""Per-model metrics on one evaluation set: discrimination, operating point, calibration.

Point estimates come from scikit-learn (``roc_auc_score``, ``roc_curve``, ``brier_score_loss``,
``confusion_matrix``); the stratified bootstrap is scipy's (``scipy.stats.bootstrap`` resampling
positives and negatives separately). Only the expected calibration error is written here: no
maintained library computes it for a binary classifier with equal-width bins and counts.

A case is called positive when ``score >= threshold`` (the threshold the training stage chose
on the internal validation split; it is never re-fitted here).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve


def _arrays(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-D of one length")
    return y, s


def has_both_classes(labels: np.ndarray) -> bool:
    """Whether ``labels`` holds at least one positive and one negative (AUC is defined)."""
    y = np.asarray(labels)
    return bool(y.size) and 0 < int(y.sum()) < y.size


def auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (scikit-learn); ``None`` when one class is absent."""
    y, s = _arrays(labels, scores)
    if not has_both_classes(y):
        return None
    return float(roc_auc_score(y, s))


def _mann_whitney_auc(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC as the Mann-Whitney U of positives over negatives, vectorised over resamples."""
    u = stats.mannwhitneyu(pos, neg, axis=axis, method="asymptotic").statistic
    return u / (pos.shape[axis] * neg.shape[axis])


def auc_bootstrap_ci(labels: np.ndarray, scores: np.ndarray, *, resamples: int = 1000,
                     confidence: float = 0.95, seed: int = 0
                     ) -> tuple[float | None, float | None]:
    """Percentile confidence interval of the AUC from a stratified bootstrap.

    Why stratified: positives and negatives are resampled separately, so every resample keeps
    the set's prevalence and has both classes (a plain bootstrap of a set with few positives
    draws resamples without any, where the AUC is undefined). This is pROC's default for
    ``ci.auc``. Returns ``(None, None)`` when a class has fewer than two cases.
    """
    y, s = _arrays(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size < 2 or neg.size < 2:
        return None, None
    result = stats.bootstrap((pos, neg), _mann_whitney_auc, n_resamples=resamples,
                             paired=False, vectorized=True, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed),
                             batch=max(1, min(resamples, 2_000_000 // max(s.size, 1))))
    ci = result.confidence_interval
    return float(ci.low), float(ci.high)


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity (and the confusion counts) at a fixed threshold.

    ``None`` for sensitivity when the set has no positives, for specificity when it has no
    negatives: a rate over zero cases is not a number a reader should see.
    """
    y, s = _arrays(labels, scores)
    predicted = (s >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, predicted, labels=[0, 1]).ravel())
    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None}


def brier(labels: np.ndarray, scores: np.ndarray) -> float:
    """Brier score: mean squared difference between predicted probability and outcome."""
    y, s = _arrays(labels, scores)
    return float(brier_score_loss(y, s, labels=[0, 1]))


def calibration_bins(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Reliability table: equal-width probability bins with mean score, positive rate, count.

    The bin assignment is scikit-learn's ``calibration_curve(strategy="uniform")`` (a score on
    an inner edge belongs to the lower bin), so the curve plotted and the error reported agree
    with the library; empty bins are left out, as there.
    """
    y, s = _arrays(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], s)
    count = np.bincount(ids, minlength=bins)
    score_sum = np.bincount(ids, weights=s, minlength=bins)
    pos_sum = np.bincount(ids, weights=y.astype(np.float64), minlength=bins)
    keep = count > 0
    return pd.DataFrame({
        "bin": np.arange(bins)[keep],
        "lower": edges[:-1][keep],
        "upper": edges[1:][keep],
        "count": count[keep].astype(np.int64),
        "mean_predicted": score_sum[keep] / count[keep],
        "fraction_positive": pos_sum[keep] / count[keep],
    })


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: bin-size-weighted mean |mean score - positive rate|.

    Why it matters: a model can rank cases well (high AUC) while its probabilities are far from
    the observed frequencies, e.g. after moving to a site with another prevalence.
    """
    table = calibration_bins(labels, scores, bins)
    if table.empty:
        return math.nan
    weights = table["count"].to_numpy() / table["count"].sum()
    gap = np.abs(table["mean_predicted"].to_numpy() - table["fraction_positive"].to_numpy())
    return float(np.sum(weights * gap))


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve (scikit-learn, corners kept)."""
    y, s = _arrays(labels, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=True)
    return fpr, tpr


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                   bootstrap: int, confidence: float, bins: int, seed: int) -> dict[str, Any]:
    """Every number the report shows for one model (or seed ensemble) on one evaluation set."""
    y, s = _arrays(labels, scores)
    low, high = auc_bootstrap_ci(y, s, resamples=bootstrap, confidence=confidence, seed=seed)
    positives = int(y.sum())
    out: dict[str, Any] = {"n": int(y.size), "positives": positives,
                           "negatives": int(y.size) - positives,
                           "auc": auc(y, s), "auc_ci_low": low, "auc_ci_high": high}
    out.update(operating_point(y, s, threshold))
    out["brier"] = brier(y, s) if y.size else None
    out["ece"] = expected_calibration_error(y, s, bins) if y.size else None
    return out

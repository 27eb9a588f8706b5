"""DeLong's test for two correlated ROC curves (the same cases scored by two models).

Why hand-written: scikit-learn and torchmetrics give an AUC but no variance for it and no paired
test. The fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21(11)) computes
DeLong, DeLong & Clarke-Pearson's (1988) structural components from midranks in
O(N log N) instead of the O(m n) pair table; the numbers equal R pROC's ``roc.test`` (checked in
``tests/test_validate_metrics.py`` against pROC's published reference values).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class DeLongResult:
    """Paired comparison of two AUCs on the same cases (``delta = auc_a - auc_b``)."""

    auc_a: float
    auc_b: float
    delta: float
    variance: float
    se: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    n: int
    positives: int

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (for JSON)."""
        return asdict(self)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    x = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if y.ndim != 1 or x.shape[1] != y.shape[0]:
        raise ValueError(f"scores shape {x.shape} does not match labels shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    if not np.isfinite(x).all():
        raise ValueError("scores must be finite")
    positives = int(y.sum())
    if positives < 2 or len(y) - positives < 2:
        raise ValueError("DeLong needs at least two cases of both classes, got "
                         f"{positives} positive and {len(y) - positives} negative")
    return y.astype(bool), x


def delong_covariance(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of ``k`` score vectors on the same cases and their DeLong covariance matrix.

    Args:
        labels: shape (N,), 0/1 ground truth.
        scores: shape (k, N) or (N,); higher means more likely positive. Ties count one half.

    Returns:
        ``(aucs, cov)``: shape (k,) and (k, k). ``cov[i, i]`` is the variance of AUC ``i``.

    Why midranks: the structural component of a positive case is the share of negatives it
    out-scores; its rank among all cases minus its rank among the positives counts exactly those
    negatives (ties half), so three ``rankdata`` calls replace the m x n comparison table.
    """
    y, x = _check(labels, scores)
    pos, neg = x[:, y], x[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    rank_pos = stats.rankdata(pos, axis=1)
    rank_neg = stats.rankdata(neg, axis=1)
    rank_all = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = rank_all[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v_pos = (rank_all[:, :m] - rank_pos) / n          # per positive: share of negatives below
    v_neg = 1.0 - (rank_all[:, m:] - rank_neg) / m    # per negative: share of positives above
    cov = np.atleast_2d(np.cov(v_pos)) / m + np.atleast_2d(np.cov(v_neg)) / n
    return aucs, cov


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                confidence: float = 0.95) -> DeLongResult:
    """Two-sided DeLong test of ``AUC(a) == AUC(b)`` with a normal CI of the difference.

    The same cases must be scored by both models (paired). When the variance of the difference
    is zero (identical scores) the test reports z = 0 and p = 1, as pROC does.
    """
    aucs, cov = delong_covariance(labels, np.vstack([scores_a, scores_b]))
    delta = float(aucs[0] - aucs[1])
    variance = float(max(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1], 0.0))
    se = math.sqrt(variance)
    if se > 0:
        z = delta / se
        p = float(2.0 * stats.norm.sf(abs(z)))
    elif delta == 0:
        z, p = 0.0, 1.0
    else:
        z, p = math.copysign(math.inf, delta), 0.0
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * se
    y = np.asarray(labels)
    return DeLongResult(auc_a=float(aucs[0]), auc_b=float(aucs[1]), delta=delta,
                        variance=variance, se=se, z=float(z), p_value=p,
                        ci_low=delta - half, ci_high=delta + half, confidence=confidence,
                        n=int(y.shape[0]), positives=int(np.sum(y == 1)))

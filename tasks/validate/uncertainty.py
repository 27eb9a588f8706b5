"""Uncertainty of a seed ensemble, the abstention threshold, and risk-coverage.

Uncertainty of a case is the disagreement of a regime's seed models about it: the standard
deviation (over seeds, ddof 0) of their calibrated probabilities. Why this measure: on the
study profile's real outputs (benchmarks/RESULTS.md, 2026-12-07) referring the cases the seeds
disagree on raised the accuracy of the rest at every external site for every regime with an
AUC above 0.7, more than referring the cases nearest the threshold did. One seed gives zero
uncertainty everywhere: nothing is referred and the report says so. Test-time augmentation was
not added: validation sees predictions, not images, and seed disagreement already did the job.

Abstention: a case is referred to a reader ("abstain") when its uncertainty exceeds a threshold
chosen on the internal validation split so that ``coverage`` of those cases are accepted; the
threshold is then applied unchanged to the test and external sets, where the achieved coverage
is reported (it differs where a site is harder or easier than the validation split).

Risk-coverage: cases accepted in order of increasing uncertainty; risk is the error rate of the
accepted cases at the operating threshold; AURC is the area under that curve (lower is better;
equal to the overall error rate when the uncertainty says nothing about errors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


def seed_mean_sd(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-case mean and sd (ddof 0) over the seeds (rows) of probabilities ``(seeds, cases)``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"expected probabilities of shape (seeds, cases), got {p.shape}")
    return p.mean(axis=0), p.std(axis=0)


def abstention_threshold(uncertainty: np.ndarray, coverage: float) -> float | None:
    """The uncertainty at or below which at least ``coverage`` of these cases are accepted.

    The empirical ``coverage`` quantile (``inverted_cdf``: an observed value, so accepting
    ``u <= threshold`` keeps at least that share; ties at the threshold are all kept).
    ``None`` without cases: nothing to choose it on.
    """
    u = np.asarray(uncertainty, dtype=np.float64)
    if not u.size:
        return None
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return float(np.quantile(u, coverage, method="inverted_cdf"))


def accepted(uncertainty: np.ndarray, threshold: float | None) -> np.ndarray:
    """Mask of accepted cases (``uncertainty <= threshold``; every case when no threshold)."""
    u = np.asarray(uncertainty, dtype=np.float64)
    if threshold is None:
        return np.ones(u.shape, dtype=bool)
    return u <= threshold


def risk_coverage(errors: np.ndarray, uncertainty: np.ndarray) -> pd.DataFrame:
    """Risk-coverage curve: one row per distinct uncertainty, accepting every case up to it.

    Columns ``threshold, coverage, risk``; tied uncertainties enter together (any order among
    them would be arbitrary), so the curve does not depend on the row order.
    """
    e = np.asarray(errors, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64)
    if e.shape != u.shape or e.ndim != 1:
        raise ValueError(f"errors {e.shape} and uncertainty {u.shape} must be 1-D of one length")
    if not e.size:
        return pd.DataFrame({"threshold": [], "coverage": [], "risk": []}, dtype=np.float64)
    values, inverse = np.unique(u, return_inverse=True)
    count = np.cumsum(np.bincount(inverse, minlength=values.size))
    wrong = np.cumsum(np.bincount(inverse, weights=e, minlength=values.size))
    return pd.DataFrame({"threshold": values, "coverage": count / e.size,
                         "risk": wrong / count})


def aurc(errors: np.ndarray, uncertainty: np.ndarray) -> float | None:
    """Area under the risk-coverage curve; ``None`` without cases.

    The mean over k = 1..n of the error rate of the k most certain cases. Tied uncertainties
    are taken in every order equally (each tied case counts its group's mean error), so ties
    neither help nor hurt and the value does not depend on the row order; without ties this is
    the usual definition. An uncertainty that says nothing (all equal) gives the error rate.
    """
    e = np.asarray(errors, dtype=np.float64)
    u = np.asarray(uncertainty, dtype=np.float64)
    if e.shape != u.shape or e.ndim != 1:
        raise ValueError(f"errors {e.shape} and uncertainty {u.shape} must be 1-D of one length")
    if not e.size:
        return None
    values, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    group_mean = np.bincount(inverse, weights=e, minlength=values.size) / counts
    ordered = np.repeat(group_mean, counts)  # cases by increasing uncertainty
    return float(np.mean(np.cumsum(ordered) / np.arange(1, e.size + 1)))


def selective_metrics(labels: np.ndarray, predicted: np.ndarray, keep: np.ndarray
                      ) -> dict[str, Any]:
    """Accuracy, sensitivity and specificity of the decisions on the cases in ``keep``.

    ``None`` for a rate over zero cases (no accepted positives: no sensitivity).
    """
    y = np.asarray(labels).astype(bool)[keep]
    p = np.asarray(predicted).astype(bool)[keep]
    pos, neg = int(y.sum()), int((~y).sum())
    return {"n": int(y.size), "positives": pos,
            "accuracy": float(np.mean(y == p)) if y.size else None,
            "sensitivity": float(np.sum(p & y) / pos) if pos else None,
            "specificity": float(np.sum(~p & ~y) / neg) if neg else None}


@dataclass(frozen=True)
class SelectiveResult:
    """Abstention at one evaluation set: what was accepted and how the decisions fared."""

    coverage: float | None
    aurc: float | None
    all: dict[str, Any]
    accepted: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"coverage": self.coverage, "aurc": self.aurc, "all": self.all,
                "accepted": self.accepted}


def selective_result(labels: np.ndarray, predicted: np.ndarray, uncertainty: np.ndarray,
                     threshold: float | None) -> SelectiveResult:
    """Abstention numbers of one set: coverage achieved, AURC, all cases vs accepted cases."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predicted).astype(bool)
    keep = accepted(uncertainty, threshold)
    every = np.ones(y.shape, dtype=bool)
    return SelectiveResult(coverage=float(keep.mean()) if y.size else None,
                           aurc=aurc((y != p).astype(np.float64), uncertainty),
                           all=selective_metrics(y, p, every),
                           accepted=selective_metrics(y, p, keep))

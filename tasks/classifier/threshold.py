"""The operating threshold, chosen on the internal validation split only.

Why here and only here: a threshold tuned on test or external cases would report the
sensitivity and specificity a model could never have been deployed with. The validation stage
applies this threshold unchanged.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_curve

RULES = ("youden", "sensitivity_90", "balanced_accuracy")


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
    """A probability threshold (positive when ``score >= threshold``) for the rule.

    Args:
        labels: 0/1 ground truth of the validation cases.
        scores: predicted probabilities of the same cases.
        rule: ``youden`` (max sensitivity + specificity - 1; the same point as
            ``balanced_accuracy``), ``sensitivity_90`` (the highest threshold that keeps
            sensitivity >= 0.9, the usual screening choice), ``balanced_accuracy``.

    Returns:
        The threshold; 0.5 when the validation set lacks one of the classes (nothing to
        tune on, so the model's own calibration is the best guess).
    """
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r} (expected one of {RULES})")
    if y.size == 0 or y.min() == y.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first threshold is +inf (nobody positive)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "sensitivity_90":
        ok = np.flatnonzero(tpr >= 0.9)
        return float(thresholds[ok[0]])  # thresholds decrease: the first is the highest
    # Youden's J and balanced accuracy pick the same point: J = 2 * BA - 1.
    best = int(np.argmax(tpr - fpr))
    return float(thresholds[best])

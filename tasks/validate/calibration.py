"""Scores to probabilities: one calibrator per classifier, fitted on internal validation only.

Why: the classifiers are trained with a balanced sampler (half of each batch positive), so a
score of 0.5 means "as likely as not" under a 50 % prevalence that no site has; their scores rank
cases well but overstate the probability of the finding. A calibrator is a monotone map fitted
on the internal validation split (the split that already chose each model's threshold and
checkpoint, never a test or external case) and applied unchanged everywhere else.

Methods (``validation.calibration.method`` in params.yaml):

- ``platt``: ``sigmoid(a * logit(s) + b)``; the slope is a temperature, the bias undoes the
  sampler's prior shift (a temperature alone cannot move the point where the odds are even).
- ``temperature``: ``sigmoid(logit(s) / T)``, one parameter.
- ``isotonic``: scikit-learn's ``IsotonicRegression`` (out-of-range scores clipped); stored as
  its breakpoints, applied by linear interpolation, which is what ``predict`` does.
- ``none``: the score as it is.

The logistic fits minimise the log-loss with scipy (L-BFGS-B, bounded so that a perfectly
separated validation split cannot send the slope to infinity). A calibrator is a small JSON
object (:meth:`Calibrator.as_dict`) that travels with the registered champion;
tasks/validate/champion_pyfunc.py applies the same formulas to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.isotonic import IsotonicRegression

from tasks.artifacts.classifier_folder import PREDICTIONS_FILE
from tasks.validate.inputs import TaskCases, ValidationInputError

METHODS = ("platt", "temperature", "isotonic", "none")
EPS = 1e-7
"""Scores are clipped to [EPS, 1 - EPS] before the logit (a float32 sigmoid reaches 0 and 1)."""
LOG_SLOPE_BOUND = math.log(100.0)
"""The logistic slope stays in [1/100, 100]: a separable validation split has no finite optimum."""
BIAS_BOUND = 50.0


def logit(scores: np.ndarray) -> np.ndarray:
    """Log-odds of clipped scores."""
    s = np.clip(np.asarray(scores, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(s) - np.log1p(-s)


def _log_loss(z: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of labels ``y`` under log-odds ``z`` (numerically stable)."""
    return float(-np.mean(y * log_expit(z) + (1.0 - y) * log_expit(-z)))


@dataclass(frozen=True)
class Calibrator:
    """A fitted score-to-probability map and what it was fitted on.

    ``params``: ``{"slope", "bias"}`` for platt and temperature (temperature = 1 / slope, bias 0),
    ``{"x", "y"}`` breakpoints for isotonic, ``{}`` for none. ``note`` says why a requested
    method fell back to ``none`` (``None`` when it did not).
    """

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    positives: int = 0
    note: str | None = None

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of ``scores`` (any shape)."""
        s = np.asarray(scores, dtype=np.float64)
        if self.method in ("platt", "temperature"):
            return expit(self.params["slope"] * logit(s) + self.params["bias"])
        if self.method == "isotonic":
            return np.interp(s, self.params["x"], self.params["y"])
        return s.copy()

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON: the method, its parameters and what it was fitted on."""
        params = {k: (list(map(float, v)) if isinstance(v, list | np.ndarray) else float(v))
                  for k, v in self.params.items()}
        out: dict[str, Any] = {"method": self.method, "params": params, "n": self.n,
                               "positives": self.positives, "note": self.note}
        if self.method in ("platt", "temperature"):
            out["temperature"] = 1.0 / float(self.params["slope"])
        return out

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Calibrator:
        """Inverse of :meth:`as_dict`."""
        return cls(method=str(doc["method"]), params=dict(doc.get("params") or {}),
                   n=int(doc.get("n", 0)), positives=int(doc.get("positives", 0)),
                   note=doc.get("note"))


def _fit_logistic(scores: np.ndarray, labels: np.ndarray, with_bias: bool
                  ) -> dict[str, float]:
    z = logit(scores)
    y = labels.astype(np.float64)

    def loss(p: np.ndarray) -> float:
        return _log_loss(np.exp(p[0]) * z + (p[1] if with_bias else 0.0), y)

    bounds = [(-LOG_SLOPE_BOUND, LOG_SLOPE_BOUND),
              (-BIAS_BOUND, BIAS_BOUND) if with_bias else (0.0, 0.0)]
    result = minimize(loss, np.zeros(2), method="L-BFGS-B", bounds=bounds)
    return {"slope": float(np.exp(result.x[0])),
            "bias": float(result.x[1]) if with_bias else 0.0}


def fit_calibrator(scores: np.ndarray, labels: np.ndarray, method: str) -> Calibrator:
    """Fit ``method`` on validation ``scores`` and ``labels`` (0/1).

    Falls back to ``none`` (with a ``note``) when the validation cases hold only one class:
    no map can be fitted from them, and guessing one would be calibration on nothing.

    Raises:
        ValueError: an unknown method or mismatched arrays.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-D of one length")
    n, positives = int(y.size), int(y.sum())
    if method == "none":
        return Calibrator("none", n=n, positives=positives)
    if not 0 < positives < n:
        return Calibrator("none", n=n, positives=positives,
                          note=f"{method} not fitted: the validation split has "
                               f"{positives} positive(s) in {n} case(s)")
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(s, y)
        return Calibrator("isotonic", {"x": iso.X_thresholds_.tolist(),
                                       "y": iso.y_thresholds_.tolist()}, n, positives)
    return Calibrator(method, _fit_logistic(s, y, with_bias=method == "platt"), n, positives)


@dataclass(frozen=True)
class ValidationScores:
    """One task's internal validation cases, every model's score on them in the same order."""

    labels: np.ndarray
    scores: dict[tuple[str, int], np.ndarray]


def validation_scores(cases: TaskCases) -> ValidationScores:
    """The validation rows of every model of a task, aligned by ``study_uid``.

    Why here and not in :func:`tasks.validate.inputs.align_task`: those rows are not a test (they
    chose each model's threshold), so the held-out case table leaves them out; calibration and
    the abstention threshold are fitted on exactly them.

    Raises:
        ValidationInputError: two models of the task were scored on different validation cases.
    """
    reference: pd.DataFrame | None = None
    ref_key: tuple[str, int] | None = None
    scores: dict[tuple[str, int], np.ndarray] = {}
    for key, model in sorted(cases.models.items()):
        frame = model.predictions
        frame = frame[frame["split"] == "val"].sort_values("study_uid").reset_index(drop=True)
        if reference is None:
            reference, ref_key = frame, key
        elif not frame[["study_uid", "label"]].equals(reference[["study_uid", "label"]]):
            raise ValidationInputError(
                f"{model.path / PREDICTIONS_FILE}: its validation cases (study_uid, label) "
                f"differ from those of {cases.models[ref_key].path / PREDICTIONS_FILE}; "
                "every model of a task must be scored on the same validation cases")
        scores[key] = frame["score"].to_numpy(dtype=np.float64)
    labels = (reference["label"].to_numpy(dtype=np.int64) if reference is not None
              else np.zeros(0, dtype=np.int64))
    return ValidationScores(labels=labels, scores=scores)


def fit_task_calibrators(val: ValidationScores, method: str
                         ) -> dict[tuple[str, int], Calibrator]:
    """One calibrator per (regime, seed) model, each on its own validation scores."""
    return {key: fit_calibrator(s, val.labels, method) for key, s in val.scores.items()}

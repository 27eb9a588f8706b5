"""Metrics of every model and of every regime's seed ensemble, on every evaluation set.

Seeds are aggregated two ways, because they answer two questions: the mean +- sd of the per-seed
AUCs says how much a result depends on the training seed; the seed ensemble (per-case mean score
across seeds, at the mean threshold) is the regime's best single estimate and is what the
paired comparison between regimes uses.

Calibrated numbers sit beside the raw ones: each model's calibrator (tasks/validate/calibration.py,
fitted on internal validation) gives ``ece_calibrated`` / ``brier_calibrated``; a regime's
calibrated probability is the mean of its seeds' calibrated probabilities and its uncertainty
their standard deviation (tasks/validate/uncertainty.py), which decides what is referred.
Discrimination (AUC) and the operating point stay those of the raw scores: a monotone calibrator
does not reorder cases, and the threshold was fixed on validation before it.
"""

from __future__ import annotations

import statistics
import zlib
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from tasks.config import RegimeName, ValidateConfig
from tasks.validate.calibration import Calibrator, ValidationScores
from tasks.validate.evalsets import EvalSet
from tasks.validate.inputs import TaskCases
from tasks.validate.metrics import (
    binary_metrics,
    brier,
    calibration_bins,
    expected_calibration_error,
)
from tasks.validate.uncertainty import (
    abstention_threshold,
    accepted,
    seed_mean_sd,
    selective_result,
)

REGIME_ORDER: tuple[str, ...] = get_args(RegimeName)


def stable_seed(base: int, *parts: object) -> int:
    """Random seed for one bootstrap, fixed by the config seed and what is being resampled.

    Why: the same model on the same set gets the same interval whatever else is in the run
    (adding a regime does not change another regime's CI).
    """
    key = "/".join(str(p) for p in parts).encode("utf-8")
    return (int(base) ^ zlib.crc32(key)) % 2**32


def ordered_regimes(names: set[str] | list[str]) -> list[str]:
    """Regimes in the config's canonical order, unknown names after them alphabetically."""
    known = [r for r in REGIME_ORDER if r in names]
    return known + sorted(set(names) - set(REGIME_ORDER))


def mean_sd(values: list[float]) -> dict[str, Any]:
    """Mean, sample sd (``None`` for fewer than two values) and count of finite values."""
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    return {"mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


@dataclass(frozen=True)
class Ensemble:
    """A regime's seed ensemble: per-case mean score over its seeds, at the mean threshold."""

    regime: str
    seeds: list[int]
    scores: np.ndarray
    threshold: float


def ensemble(cases: TaskCases, regime: str) -> Ensemble:
    """Average the seeds of ``regime`` case by case (their thresholds too)."""
    seeds = sorted(seed for (r, seed) in cases.scores if r == regime)
    if not seeds:
        raise KeyError(f"no model of regime {regime!r} for task {cases.task!r}")
    scores = np.mean([cases.scores[(regime, s)] for s in seeds], axis=0)
    threshold = float(np.mean([cases.thresholds[(regime, s)] for s in seeds]))
    return Ensemble(regime=regime, seeds=seeds, scores=scores, threshold=threshold)


@dataclass(frozen=True)
class CalibratedEnsemble:
    """A regime's calibrated seed ensemble on the held-out cases, and its abstention rule.

    ``probability``: mean of the seeds' calibrated probabilities; ``uncertainty``: their sd;
    ``predicted``: the raw ensemble's decision at its operating threshold; a case is accepted
    when ``uncertainty <= uncertainty_threshold`` (chosen on validation; ``None``: no
    validation cases, every case accepted); ``val_coverage``: share accepted there.
    """

    regime: str
    seeds: list[int]
    probability: np.ndarray
    uncertainty: np.ndarray
    predicted: np.ndarray
    uncertainty_threshold: float | None
    val_coverage: float | None


def calibrated_ensemble(cases: TaskCases, regime: str, calibrators: dict[tuple[str, int],
                        Calibrator], val: ValidationScores, coverage: float
                        ) -> CalibratedEnsemble:
    """Calibrate each seed of ``regime``, average, and choose its abstention threshold on val."""
    ens = ensemble(cases, regime)
    held_out = np.stack([calibrators[(regime, s)].apply(cases.scores[(regime, s)])
                         for s in ens.seeds])
    probability, uncertainty = seed_mean_sd(held_out)
    threshold, val_coverage = None, None
    if val.labels.size:
        on_val = np.stack([calibrators[(regime, s)].apply(val.scores[(regime, s)])
                           for s in ens.seeds])
        val_uncertainty = seed_mean_sd(on_val)[1]
        threshold = abstention_threshold(val_uncertainty, coverage)
        val_coverage = float(accepted(val_uncertainty, threshold).mean())
    return CalibratedEnsemble(regime=regime, seeds=ens.seeds, probability=probability,
                              uncertainty=uncertainty, predicted=ens.scores >= ens.threshold,
                              uncertainty_threshold=threshold, val_coverage=val_coverage)


def _calibrated_metrics(labels: np.ndarray, probability: np.ndarray, bins: int
                        ) -> dict[str, Any]:
    return {"ece_calibrated": expected_calibration_error(labels, probability, bins)
            if labels.size else None,
            "brier_calibrated": brier(labels, probability) if labels.size else None}


def assess_models(cases: TaskCases, sets: list[EvalSet], cfg: ValidateConfig,
                  calibrators: dict[tuple[str, int], Calibrator]) -> list[dict[str, Any]]:
    """Metrics of every (regime, seed) model on every set, at its own threshold.

    Beside the raw metrics, each set has the ECE and Brier score of the model's calibrated
    probabilities; the model carries its calibrator (``calibrator``, fitted on validation).
    """
    y = cases.labels
    out = []
    regimes = ordered_regimes({r for r, _ in cases.scores})
    for regime in regimes:
        for seed in sorted(s for r, s in cases.scores if r == regime):
            model = cases.models[(regime, seed)]
            scores = cases.scores[(regime, seed)]
            calibrator = calibrators[(regime, seed)]
            calibrated = calibrator.apply(scores)
            per_set = {}
            for es in sets:
                keep = es.mask(cases.cases)
                per_set[es.key] = binary_metrics(
                    y[keep], scores[keep], model.threshold, bootstrap=cfg.bootstrap,
                    confidence=cfg.confidence, bins=cfg.calibration_bins,
                    seed=stable_seed(cfg.seed, cases.task, regime, seed, es.key))
                per_set[es.key].update(_calibrated_metrics(y[keep], calibrated[keep],
                                                           cfg.calibration_bins))
            out.append({"regime": regime, "seed": seed, "threshold": model.threshold,
                        "threshold_rule": model.info.get("threshold_rule"),
                        "calibrator": calibrator.as_dict(), "sets": per_set})
    return out


def assess_ensembles(cases: TaskCases, sets: list[EvalSet], cfg: ValidateConfig,
                     models: list[dict[str, Any]], calibrated: dict[str, CalibratedEnsemble]
                     ) -> list[dict[str, Any]]:
    """Metrics of every regime's seed ensemble, with the per-seed AUC mean +- sd beside them.

    ``models`` is :func:`assess_models`' output (the per-seed AUCs are taken from it);
    ``calibrated`` the regimes' :class:`CalibratedEnsemble` (calibrated ECE / Brier, the
    reliability table after calibration, and abstention per set).
    """
    y = cases.labels
    out = []
    bins = cfg.calibration_bins
    for regime in ordered_regimes({r for r, _ in cases.scores}):
        ens = ensemble(cases, regime)
        cal = calibrated[regime]
        per_set = {}
        for es in sets:
            keep = es.mask(cases.cases)
            metrics = binary_metrics(
                y[keep], ens.scores[keep], ens.threshold, bootstrap=cfg.bootstrap,
                confidence=cfg.confidence, bins=cfg.calibration_bins,
                seed=stable_seed(cfg.seed, cases.task, regime, "ensemble", es.key))
            seed_aucs = [m["sets"][es.key]["auc"] for m in models if m["regime"] == regime]
            summary = mean_sd(seed_aucs)
            metrics["seed_auc_mean"] = summary["mean"]
            metrics["seed_auc_sd"] = summary["sd"]
            metrics["seed_aucs"] = seed_aucs
            table = calibration_bins(y[keep], ens.scores[keep], cfg.calibration_bins)
            metrics["calibration"] = table[["bin", "count", "mean_predicted",
                                            "fraction_positive"]].to_dict(orient="records")
            metrics.update(_calibrated_metrics(y[keep], cal.probability[keep], bins))
            after = calibration_bins(y[keep], cal.probability[keep], bins)
            metrics["calibration_calibrated"] = after[["bin", "count", "mean_predicted",
                                                       "fraction_positive"]].to_dict(
                                                           orient="records")
            metrics["abstention"] = selective_result(
                y[keep], cal.predicted[keep], cal.uncertainty[keep],
                cal.uncertainty_threshold).as_dict()
            per_set[es.key] = metrics
        methods = sorted({m["calibrator"]["method"] for m in models if m["regime"] == regime})
        out.append({"regime": regime, "seeds": ens.seeds, "threshold": ens.threshold,
                    "calibration_methods": methods,
                    "uncertainty_threshold": cal.uncertainty_threshold,
                    "val_coverage": cal.val_coverage, "sets": per_set})
    return out

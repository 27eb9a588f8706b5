"""Metrics of every model and of every regime's seed ensemble, on every evaluation set.

Seeds are aggregated two ways, because they answer two questions: the mean +- sd of the per-seed
AUCs says how much a result depends on the training seed; the seed ensemble (per-case mean score
across seeds, at the mean threshold) is the regime's best single estimate and is what the
paired comparison between regimes uses.
"""

from __future__ import annotations

import statistics
import zlib
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from tasks.config import RegimeName, ValidateConfig
from tasks.validate.evalsets import EvalSet
from tasks.validate.inputs import TaskCases
from tasks.validate.metrics import binary_metrics, calibration_bins

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


def assess_models(cases: TaskCases, sets: list[EvalSet], cfg: ValidateConfig
                  ) -> list[dict[str, Any]]:
    """Metrics of every (regime, seed) model on every set, at its own threshold."""
    y = cases.labels
    out = []
    regimes = ordered_regimes({r for r, _ in cases.scores})
    for regime in regimes:
        for seed in sorted(s for r, s in cases.scores if r == regime):
            model = cases.models[(regime, seed)]
            scores = cases.scores[(regime, seed)]
            per_set = {}
            for es in sets:
                keep = es.mask(cases.cases)
                per_set[es.key] = binary_metrics(
                    y[keep], scores[keep], model.threshold, bootstrap=cfg.bootstrap,
                    confidence=cfg.confidence, bins=cfg.calibration_bins,
                    seed=stable_seed(cfg.seed, cases.task, regime, seed, es.key))
            out.append({"regime": regime, "seed": seed, "threshold": model.threshold,
                        "threshold_rule": model.info.get("threshold_rule"),
                        "sets": per_set})
    return out


def assess_ensembles(cases: TaskCases, sets: list[EvalSet], cfg: ValidateConfig,
                     models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics of every regime's seed ensemble, with the per-seed AUC mean +- sd beside them.

    ``models`` is :func:`assess_models`' output (the per-seed AUCs are taken from it).
    """
    y = cases.labels
    out = []
    for regime in ordered_regimes({r for r, _ in cases.scores}):
        ens = ensemble(cases, regime)
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
            per_set[es.key] = metrics
        out.append({"regime": regime, "seeds": ens.seeds, "threshold": ens.threshold,
                    "sets": per_set})
    return out

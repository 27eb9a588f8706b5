"""AUC by sex, by age band and by finding, each with its CI, to show where a model is weaker.

A subgroup AUC from a handful of cases of one class is noise, so it is left out (``None``) below
:data:`MIN_PER_CLASS` cases of either class, with a note saying why; its size is reported anyway.
Above that, the AUC always comes with its stratified-bootstrap CI: an AUC of 1.0 on six
positives means little, and the interval says how little.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks.validate.metrics import auc, auc_bootstrap_ci

MIN_PER_CLASS = 5
"""Fewest positives and fewest negatives for which a subgroup AUC is reported."""


def age_band_labels(edges: Sequence[float]) -> list[str]:
    """Readable names of the bands ``[edges[i], edges[i+1])``, e.g. ``"60-70"``."""
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def age_bands(age: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Band name of every age: ``[lo, hi)`` bands, ``"unknown"`` for NaN, ``"outside"`` else."""
    age = np.asarray(age, dtype=np.float64)
    names = np.array(age_band_labels(edges), dtype=object)
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), age, side="right") - 1
    out = np.full(age.shape, "outside", dtype=object)
    inside = (idx >= 0) & (idx < len(names)) & np.isfinite(age)
    out[inside] = names[idx[inside]]
    out[~np.isfinite(age)] = "unknown"
    return out


@dataclass(frozen=True)
class Interval:
    """How subgroup AUC intervals are computed (the validation config's settings)."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


def _row(variable: str, group: str, y: np.ndarray, s: np.ndarray, min_per_class: int,
         interval: Interval) -> dict[str, Any]:
    positives = int(y.sum())
    negatives = int(y.size) - positives
    enough = positives >= min_per_class and negatives >= min_per_class
    note = None if enough else (f"AUC not shown: fewer than {min_per_class} positive or "
                                f"negative cases")
    low = high = None
    if enough:
        low, high = auc_bootstrap_ci(y, s, resamples=interval.resamples,
                                     confidence=interval.confidence, seed=interval.seed)
    return {"variable": variable, "group": group, "n": int(y.size), "positives": positives,
            "auc": auc(y, s) if enough else None, "auc_ci_low": low, "auc_ci_high": high,
            "note": note}


def subgroup_aucs(labels: np.ndarray, scores: np.ndarray, sex: np.ndarray, age: np.ndarray,
                  edges: Sequence[float], min_per_class: int = MIN_PER_CLASS,
                  interval: Interval | None = None,
                  findings: Mapping[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """One row per sex, per age band (in band order) and per finding: n, positives, AUC, CI.

    Args:
        labels: 0/1 truth of the evaluation set's cases.
        scores: the model's scores for the same cases.
        sex: sex of every case.
        age: age of every case (NaN when unknown).
        edges: age band edges.
        min_per_class: fewest positives and negatives for which an AUC is shown.
        interval: bootstrap settings of the CIs (defaults when ``None``).
        findings: ``{finding: mask}`` from :func:`finding_groups` (positives with the
            finding and every negative), for the same cases.
    """
    interval = interval or Interval()
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    rows = []
    sex = pd.Series(sex).astype(str).to_numpy()
    for group in sorted(set(sex)):
        keep = sex == group
        rows.append(_row("sex", group, y[keep], s[keep], min_per_class, interval))
    bands = age_bands(age, edges)
    order = age_band_labels(edges) + ["outside", "unknown"]
    for group in order:
        keep = bands == group
        if keep.any():
            rows.append(_row("age", group, y[keep], s[keep], min_per_class, interval))
    for group, keep in (findings or {}).items():
        rows.append(_row("finding", group, y[keep], s[keep], min_per_class, interval))
    return rows


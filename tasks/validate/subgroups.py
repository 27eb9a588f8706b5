"""AUC by sex and by age band, to show where a model is weaker.

A subgroup AUC from a handful of cases of one class is noise, so it is left out (``None``) below
:data:`MIN_PER_CLASS` cases of either class; its size is reported anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tasks.validate.metrics import auc

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


def _row(variable: str, group: str, y: np.ndarray, s: np.ndarray,
         min_per_class: int) -> dict[str, Any]:
    positives = int(y.sum())
    negatives = int(y.size) - positives
    enough = positives >= min_per_class and negatives >= min_per_class
    note = None if enough else (f"AUC not shown: fewer than {min_per_class} positive or "
                                f"negative cases")
    return {"variable": variable, "group": group, "n": int(y.size), "positives": positives,
            "auc": auc(y, s) if enough else None, "note": note}


def subgroup_aucs(labels: np.ndarray, scores: np.ndarray, sex: np.ndarray, age: np.ndarray,
                  edges: Sequence[float], min_per_class: int = MIN_PER_CLASS
                  ) -> list[dict[str, Any]]:
    """One row per sex and per age band (in band order): n, positives and AUC."""
    y = np.asarray(labels).astype(np.int64)
    s = np.asarray(scores, dtype=np.float64)
    rows = []
    sex = pd.Series(sex).astype(str).to_numpy()
    for group in sorted(set(sex)):
        keep = sex == group
        rows.append(_row("sex", group, y[keep], s[keep], min_per_class))
    bands = age_bands(age, edges)
    order = age_band_labels(edges) + ["outside", "unknown"]
    for group in order:
        keep = bands == group
        if keep.any():
            rows.append(_row("age", group, y[keep], s[keep], min_per_class))
    return rows

"""Which images each training regime trains on.

Regimes (params ``classifier.regimes``):

``real``                    every image of the internal site's training split.
``real_limited``            a stratified fraction of it (``classifier.limited_fraction``; the
                            data-constrained setting of the published study), drawn per seed.
``synthetic``               only the audited, released synthetic images.
``real_limited+synthetic``  the seed's limited draw plus every released synthetic image.
``real+synthetic``          the whole training split plus every released synthetic image.

The limited draw depends only on the seed and the training split, so ``real_limited`` and
``real_limited+synthetic`` of one seed share the same real images: their paired comparison
measures the synthetic images and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.classifier.labels import task_labels

REAL, SYNTHETIC = "real", "synthetic"
USES_SYNTHETIC = {"synthetic", "real_limited+synthetic", "real+synthetic"}
USES_LIMITED = {"real_limited", "real_limited+synthetic"}
LIMITED_SEED_OFFSET = 104_729
"""Keeps the limited draw's random stream apart from the training seed's."""


@dataclass(frozen=True)
class SourceRows:
    """Rows of one dataset folder that a model trains on."""

    source: str
    root: Path
    indices: np.ndarray
    labels: np.ndarray
    pseudo_ids: list[str]

    def summary(self) -> dict[str, Any]:
        """Counts for provenance: images, positives, and the dataset folder."""
        return {"source": self.source, "root": str(self.root), "images": int(len(self.indices)),
                "positives": int(self.labels.sum())}


@dataclass(frozen=True)
class TrainingSet:
    """The composition of one model's training set."""

    task: str
    regime: str
    seed: int
    parts: list[SourceRows]

    @property
    def labels(self) -> np.ndarray:
        """Labels of every training image, parts in order."""
        return np.concatenate([p.labels for p in self.parts])

    def summary(self) -> dict[str, Any]:
        """What MLflow and model.json record: totals and per-source counts."""
        labels = self.labels
        return {"task": self.task, "regime": self.regime, "seed": self.seed,
                "images": int(len(labels)), "positives": int(labels.sum()),
                "prevalence": float(labels.mean()) if len(labels) else None,
                "sources": [p.summary() for p in self.parts]}


def stratified_fraction(strata: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions of a stratified random ``fraction`` of the rows, sorted.

    Each stratum keeps ``round(fraction * n)`` rows, and at least one: a data-constrained
    training set still has some of every finding, as a real small centre would.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        k = min(len(members), max(1, round(fraction * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def limited_positions(train: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """The seed's data-constrained draw from the training rows (positions into ``train``).

    Stratified by the combination of both findings (Perugini grade >= 2, metastasis), the
    same strata as ingest's splits, so the draw does not depend on the task: both tasks of
    one seed train on the same small centre.
    """
    strata = (task_labels(train, "amyloidosis", "training split") * 2
              + task_labels(train, "metastasis", "training split"))
    return stratified_fraction(strata, fraction, seed + LIMITED_SEED_OFFSET)


def _rows(source: str, root: Path, frame: pd.DataFrame, task: str) -> SourceRows:
    id_column = "pseudo_id" if "pseudo_id" in frame.columns else "sample_id"
    ids = frame[id_column] if id_column in frame.columns else frame["index"]
    return SourceRows(source=source, root=root,
                      indices=frame["index"].to_numpy(dtype=np.int64),
                      labels=task_labels(frame, task, f"{root} ({source})"),
                      pseudo_ids=[str(v) for v in ids])


def compose(task: str, regime: str, seed: int, real_root: Path, real: pd.DataFrame,
            synthetic_root: Path | None, synthetic: pd.DataFrame | None,
            limited_fraction: float) -> TrainingSet:
    """The training set of one (task, regime, seed).

    Args:
        task: downstream task.
        regime: training regime (see the module docstring).
        seed: the model's seed (also picks the limited draw).
        real_root: processed dataset folder.
        real: its manifest.
        synthetic_root: released synthetic folder (needed only by regimes with synthetic
            images).
        synthetic: its manifest.
        limited_fraction: the fraction of ``real_limited``.

    Raises:
        ValueError: an unknown regime, an empty training split, or a synthetic regime without
            a synthetic set (the message says which).
    """
    train = real[real["split"] == "train"].sort_values("index").reset_index(drop=True)
    parts: list[SourceRows] = []
    if regime in ("real", "real+synthetic"):
        parts.append(_rows(REAL, real_root, train, task))
    elif regime in USES_LIMITED:
        picked = train.iloc[limited_positions(train, limited_fraction, seed)]
        parts.append(_rows(REAL, real_root, picked, task))
    elif regime != "synthetic":
        raise ValueError(f"unknown training regime {regime!r}")
    if regime != "synthetic" and train.empty:
        raise ValueError(f"{real_root}: the training split is empty; regime {regime!r} needs it")
    if regime in USES_SYNTHETIC:
        if synthetic is None or synthetic_root is None or synthetic.empty:
            raise ValueError(f"regime {regime!r} needs the released synthetic set, but "
                             f"{synthetic_root or 'classifier.synthetic'} has no images")
        parts.append(_rows(SYNTHETIC, synthetic_root,
                           synthetic.sort_values("index").reset_index(drop=True), task))
    return TrainingSet(task=task, regime=regime, seed=seed, parts=parts)

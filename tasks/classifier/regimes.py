"""Which images each training regime trains on.

Regimes (params ``classifier.regimes``):

``real``                    every image of the internal site's training split.
``real_limited``            a stratified fraction of it (``classifier.limited_fraction``; the
                            data-constrained setting of the published study), drawn per seed.
``synthetic``               only the audited, released synthetic images.
``real_limited+synthetic``  the seed's limited draw plus the released synthetic images.
``real+synthetic``          the whole training split plus the released synthetic images.

The limited draw depends only on the seed and the training split, so ``real_limited`` and
``real_limited+synthetic`` of one seed share the same real images: their paired comparison
measures the synthetic images and nothing else.

**Dose** (``classifier.synthetic_per_real``). Unset (null), every regime with synthetic images
takes the whole released set. Set to ``r >= 0``, a mixed regime takes ``round(r * n_real)``
synthetic images (Python's ``round``, half to even), ``n_real`` being its own real part: the
limited draw for ``real_limited+synthetic``, the whole training split for ``real+synthetic``.
Why a ratio and not a count: the published question is "how much synthetic data per real
scan helps", and a ratio keeps its meaning when ``limited_fraction`` changes. The pure
``synthetic`` regime has no real part; with the ratio set it takes ``round(r * n_limited)``
images, ``n_limited`` being the size of the seed's limited draw, so that at one dose it trains
on exactly the synthetic images of ``real_limited+synthetic`` (the same draw, see below) and
the two differ only by the real images.

The synthetic draw keeps the released set's class mix for the task (stratified by the task
label: positives get ``round-half-up(count * positives / N)`` of the images) and is seeded by
the model seed alone: each class is shuffled once per seed and the first images taken, so a
smaller dose is a subset of a larger one and doses differ only by the added images. A dose
larger than the released set uses all of it and records the shortfall in ``model.json``
(``training_set.synthetic_dose`` and ``training_set.notes``); ratio 0 trains on no synthetic
image at all, which makes the regime equal to its real-only counterpart (recorded the same
way). A ratio 0 for the pure ``synthetic`` regime is an error: nothing to train on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
SYNTHETIC_SEED_OFFSET = 130_363
"""Keeps the synthetic draw's random stream apart from the limited draw's and the training's."""
REAL_COUNTERPART = {"real_limited+synthetic": "real_limited", "real+synthetic": "real"}
"""The real-only regime a mixed regime equals when it gets no synthetic image."""

log = logging.getLogger("synthdx.classifier")


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
    synthetic_dose: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        """Labels of every training image, parts in order."""
        return np.concatenate([p.labels for p in self.parts])

    def summary(self) -> dict[str, Any]:
        """What MLflow and model.json record: totals and per-source counts."""
        labels = self.labels
        out = {"task": self.task, "regime": self.regime, "seed": self.seed,
               "images": int(len(labels)), "positives": int(labels.sum()),
               "prevalence": float(labels.mean()) if len(labels) else None,
               "sources": [p.summary() for p in self.parts]}
        if self.synthetic_dose is not None:
            out["synthetic_dose"] = dict(self.synthetic_dose)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


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


def class_mix_counts(sizes: np.ndarray, count: int) -> np.ndarray:
    """How many of ``count`` images each stratum of ``sizes`` rows gets, keeping the mix.

    Cumulative round-half-up of the strata shares in integer arithmetic (no float ties): the
    counts sum to ``min(count, sizes.sum())`` exactly, no stratum gets more rows than it has,
    and with two strata (a binary task label) each count grows with ``count``, so the draws
    of increasing doses are nested.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(len(sizes), dtype=np.int64)
    count = min(int(count), total)
    cumulative = np.concatenate([[0], np.cumsum(sizes)])
    edges = (2 * count * cumulative + total) // (2 * total)
    return np.diff(edges)


def synthetic_positions(strata: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Positions of ``count`` rows drawn with the strata's mix kept, sorted.

    Each stratum is shuffled once by a generator seeded with ``seed`` alone and its first rows
    are taken, so the draw for a smaller ``count`` is a subset of the draw for a larger one
    (a dose-response then compares doses, not different random subsets).
    """
    rng = np.random.default_rng([int(seed), SYNTHETIC_SEED_OFFSET])
    values, sizes = np.unique(strata, return_counts=True)
    wanted = class_mix_counts(sizes, count)
    chosen = [rng.permutation(np.flatnonzero(strata == value))[:k]
              for value, k in zip(values, wanted, strict=True)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _rows(source: str, root: Path, frame: pd.DataFrame, task: str) -> SourceRows:
    id_column = "pseudo_id" if "pseudo_id" in frame.columns else "sample_id"
    ids = frame[id_column] if id_column in frame.columns else frame["index"]
    return SourceRows(source=source, root=root,
                      indices=frame["index"].to_numpy(dtype=np.int64),
                      labels=task_labels(frame, task, f"{root} ({source})"),
                      pseudo_ids=[str(v) for v in ids])


def _dose(task: str, regime: str, seed: int, synthetic: pd.DataFrame, label_source: str,
          per_real: float | None, n_real: int | None) -> tuple[pd.DataFrame, dict[str, Any],
                                                           list[str]]:
    """The synthetic rows one model trains on, and what model.json records about the dose.

    Args:
        task: downstream task (its label stratifies the draw).
        regime: training regime (names the real-only counterpart at dose 0).
        seed: the model seed (seeds the draw).
        synthetic: the released manifest, sorted by ``index``.
        label_source: what the manifest is, for label errors.
        per_real: ``classifier.synthetic_per_real`` (None: the whole set).
        n_real: the size the dose is relative to (None when ``per_real`` is None).
    """
    available = len(synthetic)
    if per_real is None:
        return synthetic, {"per_real": None, "relative_to": None, "n_real": None,
                           "requested": None, "available": available, "used": available,
                           "shortfall": 0}, []
    assert n_real is not None
    requested = round(per_real * n_real)
    relative_to = "training split" if regime == "real+synthetic" else "real_limited draw"
    labels = task_labels(synthetic, task, label_source)
    picked = synthetic.iloc[synthetic_positions(labels, requested, seed)]
    used = len(picked)
    dose = {"per_real": float(per_real), "relative_to": relative_to, "n_real": int(n_real),
            "requested": int(requested), "available": available, "used": used,
            "shortfall": int(requested - used), "stratified_by": f"{task} label",
            "class_mix_available": {"positives": int(labels.sum()), "images": available},
            "draw_seed": [int(seed), SYNTHETIC_SEED_OFFSET]}
    notes = []
    if requested == 0:
        counterpart = REAL_COUNTERPART.get(regime)
        dose["same_as_regime"] = counterpart
        notes.append(f"classifier.synthetic_per_real = {per_real:g}: no synthetic images; "
                     f"this training set equals regime {counterpart!r} of seed {seed}")
    if used < requested:
        notes.append(f"asked for {requested} synthetic images (synthetic_per_real {per_real:g}"
                     f" x {n_real} real), but the released set has only {available}: all "
                     f"{used} used, {requested - used} short")
        log.warning("%s/%s seed %d: %s", task, regime, seed, notes[-1])
    return picked, dose, notes


def compose(task: str, regime: str, seed: int, real_root: Path, real: pd.DataFrame,
            synthetic_root: Path | None, synthetic: pd.DataFrame | None,
            limited_fraction: float, synthetic_per_real: float | None = None) -> TrainingSet:
    """The training set of one (task, regime, seed).

    Args:
        task: downstream task.
        regime: training regime (see the module docstring).
        seed: the model's seed (also picks the limited draw and the synthetic draw).
        real_root: processed dataset folder.
        real: its manifest.
        synthetic_root: released synthetic folder (needed only by regimes with synthetic
            images).
        synthetic: its manifest.
        limited_fraction: the fraction of ``real_limited``.
        synthetic_per_real: synthetic images per real image of the regime (the dose; None:
            the whole released set; see the module docstring).

    Raises:
        ValueError: an unknown regime, an empty training split, a synthetic regime without
            a synthetic set, or a dose that leaves no training image (the message says which).
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
    if (regime != "synthetic" or synthetic_per_real is not None) and train.empty:
        why = "" if regime != "synthetic" else " (classifier.synthetic_per_real is relative to it)"
        raise ValueError(f"{real_root}: the training split is empty; regime {regime!r} "
                         f"needs it{why}")
    if regime not in USES_SYNTHETIC:
        return TrainingSet(task=task, regime=regime, seed=seed, parts=parts)
    if synthetic is None or synthetic_root is None or synthetic.empty:
        raise ValueError(f"regime {regime!r} needs the released synthetic set, but "
                         f"{synthetic_root or 'classifier.synthetic'} has no images")
    n_real = None
    if synthetic_per_real is not None:
        n_real = (len(parts[0].indices) if parts
                  else len(limited_positions(train, limited_fraction, seed)))
    rows, dose, notes = _dose(task, regime, seed,
                              synthetic.sort_values("index").reset_index(drop=True),
                              f"{synthetic_root} (synthetic)", synthetic_per_real, n_real)
    if rows.empty and not parts:
        raise ValueError(f"regime 'synthetic' with classifier.synthetic_per_real = "
                         f"{synthetic_per_real:g} has no training image (0 synthetic images "
                         f"per {n_real} real); drop 'synthetic' from classifier.regimes or "
                         "raise the ratio")
    if not rows.empty:
        parts.append(_rows(SYNTHETIC, synthetic_root, rows, task))
    return TrainingSet(task=task, regime=regime, seed=seed, parts=parts, synthetic_dose=dose,
                       notes=notes)

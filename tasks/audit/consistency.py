"""Label consistency: withhold synthetic images whose finding a real-data classifier does not see.

A class-conditional generator does not always render what it was asked for. On the study
profile a metastasis classifier trained on the real training split scores the generator's own
images with an AUC of only 0.68 against their condition labels (0.85 on real validation
images), and about half of the images asked to be metastasis-free score above the 90th
percentile of real metastasis-free scans: they carry hot spots that look like lesions. A
downstream model trained on them learns that such spots mean "no metastasis".

The check trains one small CNN per task on the real training split (the data the generator was
trained on, nothing else), scores the real validation split and every synthetic image, and
flags a synthetic positive that scores below the ``quantile`` of real positives, or a synthetic
negative above the ``1 - quantile`` of real negatives: an image less typical of its label than
all but that share of real scans. Flagged images are withheld from the released set (beside
the privacy check's), never deleted: the whole set stays in the synthesize output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from tasks.audit.tstr import TASKS, score, train_classifier
from tasks.config import AuditConsistencyConfig, AuditTstrConfig


@dataclass(frozen=True)
class ConsistencyCheck:
    """What the check decided: one flag per synthetic image and the audit.json section."""

    inconsistent: np.ndarray
    """Boolean per synthetic image: its label is not what the real-data classifier sees."""
    doc: dict[str, Any]


def off(note: str, n: int) -> ConsistencyCheck:
    """No check: nothing flagged, with the reason in the document."""
    return ConsistencyCheck(np.zeros(n, dtype=bool), {"note": note, "withheld": 0, "tasks": {}})


def thresholds(val_scores: np.ndarray, val_labels: np.ndarray, quantile: float
               ) -> tuple[float, float]:
    """``(lowest positive score, highest negative score)`` a synthetic image may have.

    The ``quantile`` of real positives' scores and the ``1 - quantile`` of real negatives'.
    """
    return (float(np.quantile(val_scores[val_labels], quantile)),
            float(np.quantile(val_scores[~val_labels], 1.0 - quantile)))


def flag(scores: np.ndarray, labels: np.ndarray, low_positive: float, high_negative: float
         ) -> np.ndarray:
    """Per image: a positive below ``low_positive`` or a negative above ``high_negative``."""
    return np.where(labels, scores < low_positive, scores > high_negative)


def task_check(synthetic: torch.Tensor, syn_labels: np.ndarray, train: torch.Tensor,
               train_labels: np.ndarray, val: torch.Tensor, val_labels: np.ndarray,
               cfg: AuditConsistencyConfig, device: torch.device
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """Flags and the report of one task.

    Returns:
        The per-image flags (none when a split lacks a class) and the task's entry: the
        classifier's AUC on the real validation split and on the synthetic set's own labels,
        the two thresholds, and per class how many synthetic images were kept.
    """
    lacking = [name for name, labels in (("real training split", train_labels),
                                         ("real validation split", val_labels))
               if not 0 < int(labels.sum()) < len(labels)]
    if lacking:
        return (np.zeros(len(syn_labels), dtype=bool),
                {"note": f"no positives or no negatives in the {', '.join(lacking)}"})
    model = train_classifier(train, train_labels, AuditTstrConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed), device)
    val_scores, syn_scores = score(model, val), score(model, synthetic)
    low, high = thresholds(val_scores, val_labels, cfg.quantile)
    flags = flag(syn_scores, syn_labels, low, high)
    both = 0 < int(syn_labels.sum()) < len(syn_labels)
    entry = {
        "auc_real_val": float(roc_auc_score(val_labels, val_scores)),
        "auc_synthetic_labels": float(roc_auc_score(syn_labels, syn_scores)) if both else None,
        "threshold_positive": low, "threshold_negative": high,
        "positives": int(syn_labels.sum()), "negatives": int((~syn_labels).sum()),
        "kept_positives": int((syn_labels & ~flags).sum()),
        "kept_negatives": int((~syn_labels & ~flags).sum()),
        "flagged": int(flags.sum())}
    return flags, entry


def check_consistency(synthetic: torch.Tensor, syn_manifest: pd.DataFrame, train: torch.Tensor,
                      train_manifest: pd.DataFrame, val: torch.Tensor,
                      val_manifest: pd.DataFrame, cfg: AuditConsistencyConfig,
                      device: torch.device) -> ConsistencyCheck:
    """Flag the synthetic images whose label a real-data classifier does not see (every task).

    Args:
        synthetic: synthetic images in ``syn_manifest`` row order.
        syn_manifest: their manifest (``perugini_grade``, ``metastasis``).
        train: real training images in ``train_manifest`` row order.
        train_manifest: the real training split's rows.
        val: real validation images in ``val_manifest`` row order.
        val_manifest: the real validation split's rows.
        cfg: steps and settings of the classifiers, the quantile and the tasks (steps 0: off).
        device: where to train.

    Returns:
        The flags (an image is flagged when any task flags it) and the audit.json section.
    """
    n = len(syn_manifest)
    if cfg.steps == 0 or not cfg.tasks:
        return off("off (audit.consistency.steps = 0 or no tasks)", n)
    if not all(c in syn_manifest.columns for c in ("perugini_grade", "metastasis")):
        return off("the synthetic manifest has no perugini_grade / metastasis labels", n)
    if len(val_manifest) == 0:
        return off("the real dataset has no validation split to set the thresholds on", n)
    flags = np.zeros(n, dtype=bool)
    tasks: dict[str, Any] = {}
    for task in cfg.tasks:
        rule = TASKS[task]
        task_flags, tasks[task] = task_check(synthetic, rule(syn_manifest), train,
                                             rule(train_manifest), val, rule(val_manifest),
                                             cfg, device)
        flags |= task_flags
    doc = {"quantile": cfg.quantile, "steps": cfg.steps, "tasks": tasks,
           "withheld": int(flags.sum()),
           "rule": "a synthetic positive scoring below the quantile of real validation "
                   "positives, or a negative above 1 - quantile of real negatives, is withheld"}
    return ConsistencyCheck(flags, doc)

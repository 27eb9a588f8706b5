"""Label consistency (tasks/audit/consistency.py): synthetic images whose finding is missing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tasks.audit.consistency import check_consistency, flag, thresholds
from tasks.config import AuditConsistencyConfig


def test_thresholds_and_flags():
    scores = np.array([0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0])
    labels = np.array([False] * 4 + [True] * 4)
    low, high = thresholds(scores, labels, 0.25)
    assert low == pytest.approx(10.75) and high == pytest.approx(2.25)
    flags = flag(np.array([10.0, 11.0, 2.0, 3.0]), np.array([True, True, False, False]), low,
                 high)
    assert flags.tolist() == [True, False, False, True]


def _scans(n: int, spot: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """(n, 2, 32, 16) noisy scans in [0, 1]; rows with ``spot`` get a bright 2 x 2 lesion."""
    images = rng.normal(0.1, 0.03, size=(n, 2, 32, 16)).astype(np.float32)
    for i in np.flatnonzero(spot):
        r, c = rng.integers(4, 28), rng.integers(2, 14)
        images[i, :, r:r + 2, c:c + 2] += 0.8
    return torch.from_numpy(images.clip(0.0, 1.0))


def _manifest(metastasis: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"perugini_grade": np.zeros(len(metastasis), dtype=np.int64),
                         "metastasis": metastasis.astype(bool)})


def test_a_finding_the_generator_did_not_draw_is_withheld():
    """Synthetic "metastatic" scans without a lesion, and "clean" ones with one, are flagged.

    The real splits show the lesion exactly when labelled metastatic; of the synthetic set, a
    quarter carries the wrong picture for its label. A classifier trained on the real split
    sees the difference, so the wrong ones are withheld and nearly all right ones kept.
    """
    rng = np.random.default_rng(0)
    train_y = np.arange(240) % 2 == 0
    val_y = np.arange(80) % 2 == 0
    syn_y = np.arange(120) % 2 == 0
    wrong = np.arange(120) % 4 < 2  # half of each class: positives 0, 4, ...; negatives 1, 5, ...
    wrong &= np.arange(120) < 60
    syn_spot = np.where(wrong, ~syn_y, syn_y)
    cfg = AuditConsistencyConfig(steps=150, batch_size=32, lr=0.003, seed=1, quantile=0.1,
                                 tasks=["metastasis"])
    check = check_consistency(_scans(120, syn_spot, rng), _manifest(syn_y),
                              _scans(240, train_y, rng), _manifest(train_y),
                              _scans(80, val_y, rng), _manifest(val_y), cfg,
                              torch.device("cpu"))
    entry = check.doc["tasks"]["metastasis"]
    assert entry["auc_real_val"] > 0.85, entry
    assert check.inconsistent[wrong].mean() >= 0.9
    assert check.inconsistent[~wrong].mean() <= 0.2
    assert check.doc["withheld"] == int(check.inconsistent.sum())
    assert entry["kept_positives"] + entry["kept_negatives"] == 120 - entry["flagged"]


def test_off_and_unusable_inputs_flag_nothing():
    rng = np.random.default_rng(1)
    y = np.arange(20) % 2 == 0
    images = _scans(20, y, rng)
    on = AuditConsistencyConfig(steps=5, batch_size=8, lr=0.001, seed=1, quantile=0.1,
                                tasks=["metastasis"])
    off = on.model_copy(update={"steps": 0})
    cpu = torch.device("cpu")
    assert "off" in check_consistency(images, _manifest(y), images, _manifest(y), images,
                                      _manifest(y), off, cpu).doc["note"]
    unlabelled = _manifest(y).drop(columns="metastasis")
    check = check_consistency(images, unlabelled, images, _manifest(y), images, _manifest(y),
                              on, cpu)
    assert "no perugini_grade / metastasis" in check.doc["note"] and not check.inconsistent.any()
    one_class = _manifest(np.zeros(20, dtype=bool))
    check = check_consistency(images, _manifest(y), images, one_class, images, _manifest(y),
                              on, cpu)
    assert "no positives or no negatives in the real training split" in (
        check.doc["tasks"]["metastasis"]["note"])
    assert not check.inconsistent.any()


def test_bad_settings_are_named():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="quantile"):
        AuditConsistencyConfig(steps=5, batch_size=8, lr=0.001, seed=1, quantile=0.6,
                               tasks=["metastasis"])
    with pytest.raises(ValidationError, match="tasks"):
        AuditConsistencyConfig(steps=5, batch_size=8, lr=0.001, seed=1, quantile=0.1,
                               tasks=["fracture"])

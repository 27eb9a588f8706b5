"""Patient-level, site-aware splits.

The internal site is split into train / val / test by patient (all studies of a patient land
in one split) and stratified by label (amyloid x metastasis), so every split has the rare
combinations; the external sites are held out whole (split "external") to measure how a model
trained on one centre transfers to others, which is the point of the platform.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from tasks.config import SplitConfig


def _holdout(strata: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Mask of rows held out: about ``fraction`` of the rows, whole groups, stratified.

    StratifiedGroupKFold with k = round(1 / fraction) folds; its first fold is the holdout.
    """
    n_groups = len(np.unique(groups))
    if fraction <= 0 or n_groups < 2:
        return np.zeros(len(groups), dtype=bool)
    n_splits = min(max(2, round(1.0 / fraction)), n_groups)
    mask = np.zeros(len(groups), dtype=bool)
    if np.unique(strata, return_counts=True)[1].max() >= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # strata with fewer than k members
            _, held = next(splitter.split(np.zeros(len(groups)), strata, groups))
        mask[held] = True
        return mask
    # Too few images per label to stratify (tiny sites): hold out whole random groups.
    rng = np.random.default_rng(seed)
    target = max(1, round(fraction * len(groups)))
    for group in rng.permutation(np.unique(groups)):
        if mask.sum() >= target or (~mask).sum() - (groups == group).sum() <= 0:
            break
        mask |= groups == group
    return mask


def assign_splits(manifest: pd.DataFrame, internal_site: str, cfg: SplitConfig) -> pd.Series:
    """Return the split of every manifest row: train, val, test or external.

    Args:
        manifest: needs columns ``site``, ``pseudo_id``, ``amyloid``, ``metastasis``.
        internal_site: the site that is split; every other site is "external".
        cfg: fractions (of the internal site's images) and seed.
    """
    split = pd.Series("external", index=manifest.index, dtype=object)
    internal = manifest.index[manifest["site"] == internal_site]
    if len(internal) == 0:
        return split
    rows = manifest.loc[internal]
    strata = (rows["amyloid"].astype(int) * 2 + rows["metastasis"].astype(int)).to_numpy()
    groups = rows["pseudo_id"].to_numpy()
    test = _holdout(strata, groups, cfg.test_fraction, cfg.seed)
    rest = ~test
    val = np.zeros(len(rows), dtype=bool)
    if cfg.val_fraction > 0 and rest.any():
        share = cfg.val_fraction / (1.0 - cfg.test_fraction)
        val[rest] = _holdout(strata[rest], groups[rest], share, cfg.seed + 1)
    labels = np.where(test, "test", np.where(val, "val", "train"))
    split.loc[internal] = labels
    return split

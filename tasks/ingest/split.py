"""Patient-level, site-aware splits that stay put as the archive grows.

The internal site is split into train / val / test by patient (all studies of a patient land
in one split); the external sites are held out whole (split "external") to measure how a model
trained on one centre transfers to others, which is the point of the platform.

Why a hash and not a stratified draw over the whole archive: a nightly archive grows, and a
draw over all patients reshuffles old patients whenever new ones arrive, so yesterday's test
patients would train today's model. Here a patient's split is a pure function of their
pseudonym (itself a keyed hash of site and hospital ID, tasks/ingest/pseudonym.py) and the
split seed: SHA-256 of both, read as a number in [0, 1), below ``test_fraction`` is test, below
``test_fraction + val_fraction`` val, the rest train. A patient never moves, a new patient's
split needs no other patient, and an incremental ingest gives exactly the split of a full one.
The price is that the fractions hold in expectation (per patient), not exactly, and labels are
not stratified: the ingest report counts every label per split, and the study profile's
counts are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from tasks.config import SplitConfig

_SCALE = float(1 << 64)


def patient_draw(pseudo_id: str, seed: int) -> float:
    """The patient's fixed number in [0, 1): SHA-256 of seed and pseudonym, first 8 bytes."""
    digest = hashlib.sha256(f"synthdx-split\x1f{seed}\x1f{pseudo_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def patient_split(pseudo_id: str, cfg: SplitConfig) -> str:
    """The split of one internal-site patient: train, val or test."""
    draw = patient_draw(pseudo_id, cfg.seed)
    if draw < cfg.test_fraction:
        return "test"
    if draw < cfg.test_fraction + cfg.val_fraction:
        return "val"
    return "train"


def assign_splits(manifest: pd.DataFrame, internal_site: str, cfg: SplitConfig) -> pd.Series:
    """Return the split of every manifest row: train, val, test or external.

    Args:
        manifest: needs columns ``site`` and ``pseudo_id``.
        internal_site: the site that is split; every other site is "external".
        cfg: fractions (of the internal site's patients, in expectation) and seed.
    """
    split = pd.Series("external", index=manifest.index, dtype=object)
    internal = manifest["site"] == internal_site
    if not internal.any():
        return split
    patients = manifest.loc[internal, "pseudo_id"].astype(str)
    by_patient = {p: patient_split(p, cfg) for p in np.unique(patients.to_numpy())}
    split.loc[internal] = patients.map(by_patient).to_numpy()
    return split

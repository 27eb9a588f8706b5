"""A class-matched subsample of the synthetic set for the overall quality metrics.

The synthetic class mix is whatever ``synthesize.groups`` asked for (the demo: a third
amyloid, a third metastases), the real one is the population's (about a tenth and a fifth).
The encoder is trained to see findings, so an overall real-vs-synthetic comparison of the two
sets as they are would separate a perfect generator by its class mix alone. The overall
metrics are therefore computed on the largest subsample of the synthetic set, drawn without
replacement and with a fixed seed, whose joint (Perugini grade, metastasis) stratum proportions
equal the real reference's. Strata the synthetic set lacks cannot be matched and are reported;
the real reference keeps them, so a generator that never draws a class still loses recall
and coverage for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tasks.audit.data import LABEL_COLUMNS

GRADES = 4


def strata(manifest: pd.DataFrame) -> np.ndarray:
    """Joint stratum code of every row: 2 * perugini_grade + metastasis (0..7)."""
    grade = manifest["perugini_grade"].to_numpy(dtype=np.int64).clip(0, GRADES - 1)
    return 2 * grade + manifest["metastasis"].to_numpy(dtype=bool).astype(np.int64)


def stratum_name(code: int) -> str:
    """Readable name of a stratum code, e.g. ``grade2_metastasis``."""
    grade, metastasis = divmod(int(code), 2)
    return f"grade{grade}_{'metastasis' if metastasis else 'no_metastasis'}"


@dataclass
class ClassMatch:
    """Which synthetic rows the overall metrics use, and the record of how they were chosen."""

    mask: np.ndarray
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def applied(self) -> bool:
        """Whether a class-matched subsample was drawn (False: all synthetic rows, unlabelled)."""
        return bool(self.doc.get("applied"))


def _apportion(total: int, fractions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * fractions`` (largest remainder)."""
    exact = np.round(total * fractions, 9)  # 0.7 * 10 is 7, not 7.000000000000001
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:total - int(counts.sum())]] += 1
    return counts


def class_matched(real: pd.DataFrame, synthetic: pd.DataFrame, seed: int) -> ClassMatch:
    """The largest synthetic subsample with the real reference's stratum proportions.

    Args:
        real: manifest rows of the real reference (the training images in the metrics).
        synthetic: the synthetic manifest, in image order.
        seed: seed of the draw within each stratum.

    Returns:
        The row mask and ``{applied, n_used, n_synthetic, strata, missing_strata,
        synthetic_only_strata}``; strata proportions are those of the real strata the
        synthetic set has (renormalised), so the missing ones are left out, not faked.
        Without labels in the synthetic manifest: every row, ``applied`` False and a note.
    """
    n_syn = len(synthetic)
    if not all(c in synthetic.columns for c in LABEL_COLUMNS):
        return ClassMatch(np.ones(n_syn, bool), {
            "applied": False, "n_used": n_syn, "n_synthetic": n_syn,
            "note": "the synthetic manifest has no perugini_grade / metastasis labels: the "
                    "overall metrics compare the whole synthetic set, class mix included"})
    real_codes, syn_codes = strata(real), strata(synthetic)
    real_counts = np.bincount(real_codes, minlength=2 * GRADES)
    syn_counts = np.bincount(syn_codes, minlength=2 * GRADES)
    shared = (real_counts > 0) & (syn_counts > 0)
    target = np.where(shared, real_counts, 0) / max(1, int(real_counts[shared].sum()))
    n_used = int(min(np.floor(syn_counts[shared] / target[shared] + 1e-9).min(), n_syn)
                 if shared.any() else 0)
    counts = np.minimum(_apportion(n_used, target), syn_counts)
    n_used = int(counts.sum())
    rng = np.random.default_rng(seed)
    mask = np.zeros(n_syn, bool)
    for code in np.flatnonzero(counts):
        mask[rng.choice(np.flatnonzero(syn_codes == code), size=counts[code], replace=False)] = True
    per_stratum = {
        stratum_name(code): {
            "real": int(real_counts[code]),
            "real_fraction": float(real_counts[code] / max(1, len(real_codes))),
            "target_fraction": float(target[code]),
            "synthetic": int(syn_counts[code]), "used": int(counts[code]),
            "used_fraction": float(counts[code] / n_used) if n_used else 0.0}
        for code in np.flatnonzero((real_counts > 0) | (syn_counts > 0))}
    return ClassMatch(mask, {
        "applied": True, "n_used": n_used, "n_synthetic": n_syn, "seed": seed,
        "strata": per_stratum,
        "missing_strata": [stratum_name(c) for c in np.flatnonzero((real_counts > 0)
                                                                   & (syn_counts == 0))],
        "synthetic_only_strata": [stratum_name(c) for c in np.flatnonzero((real_counts == 0)
                                                                          & (syn_counts > 0))],
        "missing_real_fraction": float(real_counts[~shared & (real_counts > 0)].sum()
                                       / max(1, len(real_codes)))})

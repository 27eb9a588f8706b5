"""Subgroups by finding: how well a model finds one kind of positive among all the negatives.

A task's positives are not one thing. Cardiac amyloidosis positives are Perugini grade 2 or 3,
and grade 3 (intense cardiac uptake, faint bones) is the rare, striking one; metastasis
positives are mostly focal hot spots, and a few are superscans (diffuse skeletal uptake, faint
kidneys), which a model trained on few of them may miss. Enriching the synthetic set in a rare
finding (``synthesize.groups``) is meant to help exactly that subgroup, so the report scores each
finding on its own: that finding's positives against every negative of the same evaluation set
(the negatives are shared, so the AUCs of two findings are directly comparable).

The finding columns come from the classifier's ``predictions.parquet`` (``perugini_grade``,
``superscan``); an archive that does not record them gets no finding subgroups.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FINDING_COLUMNS = ("perugini_grade", "metastasis", "superscan")
"""Optional prediction columns that describe what a positive case shows."""


def finding_groups(cases: pd.DataFrame, task: str) -> dict[str, np.ndarray]:
    """Per finding of ``task``, the mask of the cases it is scored on (its positives + negatives).

    Args:
        cases: the task's aligned cases (``label`` and, when recorded, the finding columns).
        task: ``amyloidosis`` (groups by Perugini grade of the positives) or ``metastasis``
            (superscan vs focal metastases).

    Returns:
        ``{group name: boolean mask}`` in a fixed order; empty when the columns are absent or
        no positive records the finding.
    """
    positive = cases["label"].to_numpy() == 1
    negative = ~positive
    groups: dict[str, np.ndarray] = {}
    if task == "amyloidosis" and "perugini_grade" in cases.columns:
        grade = pd.to_numeric(cases["perugini_grade"], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
        for value in sorted({int(g) for g in grade[positive] if np.isfinite(g)}):
            groups[f"Perugini {value}"] = negative | (positive & (grade == value))
    elif task == "metastasis" and "superscan" in cases.columns:
        flag = pd.to_numeric(cases["superscan"].astype("Float64"), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
        if np.isfinite(flag[positive]).any():
            superscan = flag == 1.0
            groups["superscan"] = negative | (positive & superscan)
            groups["focal (no superscan)"] = negative | (positive & ~superscan)
    return groups

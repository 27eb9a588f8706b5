"""Binary targets of the downstream tasks, from the dataset's label columns.

Both real (ingest) and synthetic (synthesize) manifests carry ``perugini_grade`` and
``metastasis``; the targets are derived here in one place so that real and synthetic images
of the same condition get the same label.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

AMYLOID_POSITIVE_GRADE = 2
"""Perugini grade >= 2 is the usual positive threshold for ATTR cardiac amyloidosis."""


class LabelError(ValueError):
    """A manifest whose labels cannot give the task's target; names the dataset and column."""


def task_labels(manifest: pd.DataFrame, task: str, source: str = "dataset") -> np.ndarray:
    """0/1 target of ``task`` for every manifest row.

    Args:
        manifest: rows of a processed or synthetic manifest.
        task: ``amyloidosis`` (Perugini grade >= 2) or ``metastasis`` (any).
        source: what the manifest is, for the error message.

    Raises:
        LabelError: an unknown task, a missing column or a missing / invalid value.
    """
    if task == "amyloidosis":
        column = "perugini_grade"
    elif task == "metastasis":
        column = "metastasis"
    else:
        raise LabelError(f"unknown task {task!r} (expected amyloidosis or metastasis)")
    if column not in manifest.columns:
        raise LabelError(f"{source}: no {column!r} column, needed for the {task} task")
    values = pd.to_numeric(manifest[column].astype("Float64"), errors="coerce")
    if values.isna().any():
        row = int(np.flatnonzero(values.isna().to_numpy())[0])
        raise LabelError(f"{source}: {column!r} is missing in row {row} ({task} task)")
    values = values.to_numpy(dtype=np.float64)
    if task == "amyloidosis":
        if ((values < 0) | (values > 3) | (values != np.round(values))).any():
            raise LabelError(f"{source}: {column!r} must be an integer grade 0-3")
        return (values >= AMYLOID_POSITIVE_GRADE).astype(np.int64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise LabelError(f"{source}: {column!r} must be 0/1 or true/false")
    return values.astype(np.int64)

"""Which condition a scan has, and its opposite, for each explained finding.

Amyloidosis: a scan with cardiac uptake (Perugini >= 1) is regenerated at Perugini 0; one
without at ``positive_grade``. Metastasis: with metastases (focal or superscan) -> none;
without -> focal metastases. Factors the model was also trained on (sex, site, ...) keep the
scan's own values, so only the finding changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from models.conditioning import ConditionSpec

Task = Literal["amyloid", "metastasis"]
TASKS: tuple[Task, ...] = ("amyloid", "metastasis")

_CONTROLS: dict[Task, tuple[str, ...]] = {
    "amyloid": ("perugini_grade", "amyloid"),
    "metastasis": ("metastasis",),
}


def explainable(spec: ConditionSpec, task: Task) -> bool:
    """Whether the model is conditioned on the finding at all (else nothing can change it)."""
    return any(name in spec.names for name in _CONTROLS[task])


def has_finding(row: Mapping[str, Any], task: Task) -> bool:
    """Whether the scan shows the finding the counterfactual removes."""
    if task == "amyloid":
        return int(row["perugini_grade"]) >= 1
    return bool(row["metastasis"])


def opposite(row: Mapping[str, Any], task: Task, positive_grade: int) -> dict[str, Any]:
    """The scan's manifest values with the finding removed (or added, for a scan without it)."""
    out = dict(row)
    present = has_finding(row, task)
    if task == "amyloid":
        grade = 0 if present else int(positive_grade)
        out["perugini_grade"] = grade
        out["amyloid"] = grade >= 2
    else:
        out["metastasis"] = not present
        out["superscan"] = False
    return out


def direction(row: Mapping[str, Any], task: Task, positive_grade: int) -> str:
    """A caption for the change: ``Perugini 3 -> 0``, ``metastasis -> none``, ..."""
    if task == "amyloid":
        grade = int(row["perugini_grade"])
        return f"Perugini {grade} -> {0 if grade >= 1 else positive_grade}"
    return "metastasis -> none" if bool(row["metastasis"]) else "none -> metastasis"


def encode_pair(spec: ConditionSpec, row: Mapping[str, Any], task: Task, positive_grade: int
                ) -> tuple[list[int], list[int]]:
    """The model's condition indices of the scan and of its counterfactual.

    Raises:
        ValueError: a condition value the model does not know (named by the factor).
    """
    other = opposite(row, task, positive_grade)
    return (spec.encode_row({name: row.get(name) for name in spec.names}),
            spec.encode_row({name: other.get(name) for name in spec.names}))

"""The champion / challenger decisions of one validation: ``<validation.output>/promotion.json``.

Written by the validate stage after the registry has been updated; read by the pipeline summary
(flows/orchestration/summary.py) for the console, the Prefect artifact and the MLflow parent run.

Layout::

    {"schema_version": 1,
     "settings": {"tolerance", "margin", "alpha"},
     "tasks": {task: {"decision": "promoted" | "challenger" | "kept", "reason": str,
                      "name": registered model, "version": str | null,
                      "candidate": {"regime", "seed", "run_id"},
                      "champion": {"version", "run_id", "regime", "seed"} | null,
                      "sites": [{"site", "internal", "n", "positives", "auc_new",
                                 "auc_champion", "delta", "p_value", "blocks", "note"}],
                      "pooled": {... as a site ..., "site": "pooled"} | null}},
     "note": str}   # only when "tasks" is empty: why nothing was registered

The file is written on every validation, registration off included (``tasks`` empty and a
``note`` saying why): dvc.yaml declares it as the stage's output, so a ``dvc exp`` grid point
that turns registration off must still produce it, and last run's decisions must not be read
as this run's.

Not a cached DVC output: the decision depends on the registry's state as well as on the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts.json_file import read_json_object
from tasks.common.atomic import atomic_write_text

PROMOTION_JSON = "promotion.json"
SCHEMA_VERSION = 1
DECISIONS = ("promoted", "challenger", "kept")
"""promoted: now ``@champion``; challenger: registered as ``@challenger``, the champion stays;
kept: the champion is this model already (validation rerun without retraining)."""


def write_promotion(path: Path, settings: dict[str, Any], tasks: dict[str, dict[str, Any]],
                    note: str | None = None) -> dict[str, Any]:
    """Write promotion.json atomically and return the document written.

    Args:
        path: where (``<validation.output>/promotion.json``).
        settings: ``validation.promotion`` as JSON.
        tasks: each registered task's decision; empty when nothing was registered.
        note: why ``tasks`` is empty (written only then).

    Raises:
        ValueError: a task's decision is not one of ``DECISIONS``.
    """
    for task, doc in tasks.items():
        if doc.get("decision") not in DECISIONS:
            raise ValueError(f"{path}: task {task}: decision {doc.get('decision')!r} is not one "
                             f"of {DECISIONS}")
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "settings": settings,
                           "tasks": tasks}
    if not tasks and note:
        doc["note"] = note
    atomic_write_text(Path(path), json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def read_promotion(path: Path) -> dict[str, Any] | None:
    """The decisions of the last validation, or None (validate has not run, or unreadable)."""
    try:
        doc = read_json_object(path)
    except ValueError:  # missing, unreadable, not JSON or not an object
        return None
    return doc if isinstance(doc.get("tasks"), dict) else None


def promotion_lines(doc: dict[str, Any]) -> list[str]:
    """One line per task: the decision, the registry version and the reason (or the note)."""
    if not doc.get("tasks") and doc.get("note"):
        return [f"none: {doc['note']}"]
    lines = []
    for task, entry in sorted(doc.get("tasks", {}).items()):
        version = entry.get("version")
        where = f" {entry.get('name')} v{version}" if version else ""
        lines.append(f"{task}: {entry.get('decision')}{where}: {entry.get('reason')}")
    return lines

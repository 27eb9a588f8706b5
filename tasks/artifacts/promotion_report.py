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
                      "pooled": {... as a site ..., "site": "pooled"} | null}}}

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


def write_promotion(path: Path, settings: dict[str, Any], tasks: dict[str, dict[str, Any]]
                    ) -> None:
    """Write promotion.json atomically.

    Raises:
        ValueError: a task's decision is not one of ``DECISIONS``.
    """
    for task, doc in tasks.items():
        if doc.get("decision") not in DECISIONS:
            raise ValueError(f"{path}: task {task}: decision {doc.get('decision')!r} is not one "
                             f"of {DECISIONS}")
    doc = {"schema_version": SCHEMA_VERSION, "settings": settings, "tasks": tasks}
    atomic_write_text(Path(path), json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read_promotion(path: Path) -> dict[str, Any] | None:
    """The decisions of the last validation, or None (validate has not run, or unreadable)."""
    try:
        doc = read_json_object(path)
    except ValueError:  # missing, unreadable, not JSON or not an object
        return None
    return doc if isinstance(doc.get("tasks"), dict) else None


def promotion_lines(doc: dict[str, Any]) -> list[str]:
    """One line per task: the decision, the registry version and the reason."""
    lines = []
    for task, entry in sorted(doc.get("tasks", {}).items()):
        version = entry.get("version")
        where = f" {entry.get('name')} v{version}" if version else ""
        lines.append(f"{task}: {entry.get('decision')}{where}: {entry.get('reason')}")
    return lines

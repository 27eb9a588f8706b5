"""The validation report (``validation.reports_dir``): what validate hands to people and tools.

Layout::

    validation.json             every number (schema: tasks/validate/validation.schema.json)
    validation_metrics.json     the key numbers for ``dvc metrics show`` / ``diff``
    validation.html             the self-contained page a clinician reads
    validation/                 ROC and calibration tables (dvc plots) and figures

No timestamp in validation.json or the page: both are DVC outputs, and the same classifiers
validated twice must give the same bytes (when it ran is in the MLflow run).

Readers outside the validate stage (the pipeline summary's headline) use
:func:`read_validation_report` and :func:`headline_table` from here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common.atomic import atomic_write_text

VALIDATION_JSON = "validation.json"
METRICS_JSON = "validation_metrics.json"
HTML_FILE = "validation.html"
PLOTS_DIR = "validation"


def write_report_json(path: Path, report: dict[str, Any]) -> None:
    """Write a JSON document atomically; NaN is refused (the schema has no place for it)."""
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def read_validation_report(reports_dir: Path) -> dict[str, Any] | None:
    """``<reports_dir>/validation.json``, or None before validate has run (or if unreadable).

    Why None and not an error: the readers (a pipeline summary, a dashboard) show what there
    is; a missing report is the normal state before the first full run.
    """
    try:
        report = json.loads((Path(reports_dir) / VALIDATION_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def headline_table(report: dict[str, Any]) -> str:
    """Plain-text regime x site table of seed-ensemble AUCs, one block per task."""
    sets = [s["key"] for s in report["eval_sets"]]
    internal = {s["key"] for s in report["eval_sets"] if s["internal"]}
    lines = []
    for task, doc in report["tasks"].items():
        names = [s for s in sets if s in doc["eval_sets"]]
        header = "".join(f"{(s + '*' if s in internal else s):>11}" for s in names)
        lines.append(f"  {task:<24}{header}")
        for ens in doc["ensembles"]:
            cells = "".join(f"{_fmt(ens['sets'].get(s, {}).get('auc')):>11}" for s in names)
            lines.append(f"    {ens['regime']:<22}{cells}")
    lines.append("  AUC of each regime's seed ensemble; * internal test split, others external")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"

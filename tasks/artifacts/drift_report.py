"""The drift stage's per-site table (``drift.output``, reports/drift.json), and its rendering.

Written by the drift stage; read by the pipeline summary (console, Prefect artifact, MLflow
parent run). Layout::

    {"schema_version": 1,
     "reference": {"model", "version", "processed", "images", ...} | null,
     "note": str,                   # e.g. why there is nothing to compare with
     "thresholds": {...},           # the drift section of params
     "sites": [{"site", "status", "n_reference", "n_now", "n_new", "new_cameras",
                "new_tracers", "cameras", "intensity_smd", "raw_intensity_smd",
                "counts_smd", "pixel_mm_change", "metastasis_change", "amyloid_change",
                "feature_shift", "judged", "flags", "flagged"}],
     "flagged": [site, ...]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts.json_file import read_json_object
from tasks.common.atomic import atomic_write_text

SCHEMA_VERSION = 1
COLUMNS = (("intensity_smd", "intensity SMD", "+.2f"), ("raw_intensity_smd", "raw SMD", "+.2f"),
           ("counts_smd", "counts SMD", "+.2f"), ("pixel_mm_change", "pixel mm", "+.1%"),
           ("metastasis_change", "metastasis", "+.2f"), ("amyloid_change", "amyloid", "+.2f"),
           ("feature_shift", "features", ".2f"))
"""The numeric columns of the table: key, header, format."""


def write_drift(path: Path, doc: dict[str, Any]) -> None:
    """Write the drift table atomically (with ``schema_version``)."""
    body = {"schema_version": SCHEMA_VERSION, **doc}
    atomic_write_text(Path(path), json.dumps(body, indent=2, allow_nan=False) + "\n")


def read_drift(path: Path) -> dict[str, Any] | None:
    """The last drift table, or None (the stage has not run, or the file is unreadable)."""
    try:
        doc = read_json_object(path)
    except ValueError:  # missing, unreadable, not JSON or not an object
        return None
    return doc if isinstance(doc.get("sites"), list) else None


def _cell(value: Any, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def drift_markdown(doc: dict[str, Any]) -> str:
    """The table as Markdown: one row per site, flags spelled out."""
    ref = doc.get("reference")
    head = (f"Reference: {ref.get('model')} version {ref.get('version')} "
            f"({ref.get('images')} images)" if ref else "Reference: none")
    lines = [head + (f". {doc['note']}" if doc.get("note") else ""), "",
             "| site | status | new / now | " + " | ".join(h for _, h, _ in COLUMNS)
             + " | flags |", "|---" * (4 + len(COLUMNS)) + "|"]
    for row in doc.get("sites", []):
        cells = [_cell(row.get(key), fmt) for key, _, fmt in COLUMNS]
        flags = "; ".join(row.get("flags", [])) or ("not judged" if not row.get("judged")
                                                    else "")
        lines.append(f"| {row['site']} | {row['status']} | {row['n_new']} / {row['n_now']} | "
                     + " | ".join(cells) + f" | {'**DRIFT** ' if row.get('flagged') else ''}"
                     f"{flags.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def drift_lines(doc: dict[str, Any]) -> list[str]:
    """Short console lines: one per flagged site (or a line saying nothing moved)."""
    ref = doc.get("reference")
    if not ref:
        return [f"drift: {doc.get('note') or 'no reference'}"]
    flagged = [r for r in doc.get("sites", []) if r.get("flagged")]
    if not flagged:
        return [f"drift: no site beyond the thresholds (against {ref.get('model')} "
                f"version {ref.get('version')})"]
    return [f"drift: {r['site']} FLAGGED: {'; '.join(r['flags'])}" for r in flagged]

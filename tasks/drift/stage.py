"""The drift stage: today's processed dataset against the current champion's reference.

The reference is the profile of the data the current ``@champion`` classifier was trained on,
recorded with it in MLflow when it was promoted (tasks/validate/stage.py,
tasks/artifacts/drift_reference.py). When several tasks have a champion, the newest one's
reference is used (the most recent data a champion has seen); the table names it. Without a
champion (the first night) there is nothing to compare with: the table lists the sites and
says so.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts.drift_reference import (
    Reference,
    profile_dataset,
    read_reference,
)
from tasks.artifacts.drift_report import drift_lines, drift_markdown, write_drift
from tasks.config import Config
from tasks.drift.compare import compare_sites, first_night

NO_REFERENCE = ("first night: no champion yet, so no reference to compare with (the first "
                "promoted champion records one)")


@dataclass
class DriftResult:
    """What the drift stage found and wrote."""

    doc: dict[str, Any]
    path: Path
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> list[str]:
        """The sites beyond a threshold or named (new site, camera, tracer)."""
        return list(self.doc["flagged"])

    def describe(self) -> str:
        """The drift table as the console shows it."""
        return "\n".join([f"drift: {self.seconds:.1f} s, table {self.path}",
                          *(f"  {line}" for line in drift_lines(self.doc))])


def champion_reference(cfg: Config, into: Path) -> Reference | None:
    """Download the newest task champion's drift reference into ``into``, or None if none.

    Raises:
        ReferenceError: the champion names a reference that cannot be read.
    """
    prefix = cfg.classifier.registered_model_prefix
    if not prefix:
        return None
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    uri = cfg.mlflow.resolved_uri()
    client = MlflowClient(tracking_uri=uri)
    found = []
    for task in cfg.classifier.tasks:
        try:
            version = client.get_model_version_by_alias(f"{prefix}-{task}", "champion")
        except MlflowException:
            continue
        if version.tags.get("drift_reference"):
            found.append(version)
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.creation_timestamp or 0))
    local = download_artifacts(artifact_uri=newest.tags["drift_reference"], dst_path=str(into),
                               tracking_uri=uri)
    reference = read_reference(Path(local))
    reference.about = {**reference.about, "model": newest.name, "version": str(newest.version)}
    return reference


def run_drift(cfg: Config) -> DriftResult:
    """Compare every site of the processed dataset with the champion's reference; write the table.

    Raises:
        DatasetError: the processed dataset cannot be read (named).
        ReferenceError: the champion's reference cannot be read (named).
    """
    started = time.perf_counter()
    processed = Path(cfg.ingest.output)
    with tempfile.TemporaryDirectory(prefix="synthdx-drift-") as tmp:
        reference = champion_reference(cfg, Path(tmp))
        if reference is None:
            rows, note, about = first_night(profile_dataset(processed)), NO_REFERENCE, None
        else:
            today = profile_dataset(processed, reference.encoder)
            rows = compare_sites(reference.profile, today, cfg.drift)
            note = "" if reference.encoder else "the reference has no encoder: no feature shift"
            about = reference.about
    doc = {"reference": about, "note": note,
           "thresholds": cfg.drift.model_dump(mode="json", exclude={"output"}),
           "sites": [r.as_dict() for r in rows],
           "flagged": [r.site for r in rows if r.flagged]}
    path = Path(cfg.drift.output)
    write_drift(path, doc)
    metrics = {f"drift.{r.site}.{key}": float(value) for r in rows
               for key, value in r.as_dict().items()
               if key in ("n_new", "n_now", "intensity_smd", "raw_intensity_smd", "counts_smd",
                          "pixel_mm_change", "metastasis_change", "amyloid_change",
                          "feature_shift") and value is not None}
    metrics |= {f"drift.{r.site}.flagged": float(r.flagged) for r in rows}
    return DriftResult(doc={"schema_version": 1, **doc}, path=path,
                       seconds=time.perf_counter() - started, metrics=metrics)


__all__ = ["DriftResult", "champion_reference", "drift_markdown", "run_drift"]

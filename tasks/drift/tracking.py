"""The drift stage's MLflow run: per-site numbers as metrics, flags as tags, the table itself."""

from __future__ import annotations

from dataclasses import replace

from tasks.artifacts.drift_report import drift_markdown
from tasks.common.tracking import log_params, stage_run
from tasks.config import Config
from tasks.drift.stage import DriftResult


def log_drift(cfg: Config, result: DriftResult) -> DriftResult:
    """Record a drift table in one MLflow run; return the result with its run id.

    Tags: ``synthdx.drift.flagged`` (the flagged sites, or "none"), one
    ``synthdx.drift.<site>`` per flagged site with its flags, and the reference's model version.
    """
    import mlflow

    doc = result.doc
    ref = doc.get("reference") or {}
    tags = {"synthdx.drift.flagged": ",".join(doc["flagged"]) or "none",
            "synthdx.drift.reference": (f"{ref.get('model')} version {ref.get('version')}"
                                        if ref else "none")}
    for row in doc["sites"]:
        if row["flagged"]:
            tags[f"synthdx.drift.{row['site']}"] = "; ".join(row["flags"])[:4900]
    with stage_run(cfg.mlflow, "drift", tags) as run:
        log_params({"drift": cfg.drift.model_dump(mode="json")})
        if result.metrics:
            mlflow.log_metrics(result.metrics)
        mlflow.log_metric("seconds", result.seconds)
        mlflow.log_artifact(str(result.path))
        mlflow.log_text(drift_markdown(doc), "drift.md")
    return replace(result, mlflow_run_id=run.info.run_id)

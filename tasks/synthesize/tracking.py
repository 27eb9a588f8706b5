"""The synthesize stage's MLflow run: settings, model version, counts, speed, montage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tasks.common.tracking import log_params, stage_run
from tasks.config import Config
from tasks.synthesize.pipeline import REPORT_NAME, SynthesizeResult


def log_synthesis(cfg: Config, result: SynthesizeResult) -> SynthesizeResult:
    """Record a finished synthesize run in MLflow; return the result with its run id."""
    import mlflow

    report = result.extra.get("report", {})
    model = report.get("model", {})
    tags = {"synthdx.model_version": result.model_version,
            "synthdx.model_sha256": str(model.get("sha256", ""))}
    with stage_run(cfg.mlflow, "synthesize", tags) as run:
        log_params({"synthesize": cfg.synthesize.model_dump(mode="json"),
                    "model": {"version": result.model_version,
                              "global_step": model.get("global_step"),
                              "conditions": model.get("conditions")}})
        metrics = {"images": float(result.images), "seconds": result.seconds,
                   "images_per_second": result.images_per_second,
                   "world_size": float(result.world_size),
                   "reused_shards": float(result.reused_shards)}
        metrics.update({f"images/{k}": float(v) for k, v in result.per_group.items()})
        mlflow.log_metrics(metrics)
        for name in (REPORT_NAME, "montage.png"):
            path = Path(result.output) / name
            if path.is_file():
                mlflow.log_artifact(str(path))
    return replace(result, mlflow_run_id=run.info.run_id)

"""Prefect flow for the phantom stage (wiring only; the work is tasks.phantom.generate)."""

from __future__ import annotations

from prefect import flow

from tasks.common.tracking import check_tracking_server, log_params, stage_run
from tasks.config import Config
from tasks.phantom.generate import PhantomSummary, generate_phantom


@flow(name="phantom", log_prints=True)
def phantom_flow(cfg: Config) -> PhantomSummary:
    """Generate the demo dataset and log it as an MLflow run."""
    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    summary = generate_phantom(cfg.phantom)
    import mlflow

    with stage_run(cfg.mlflow, "phantom"):
        params = cfg.phantom.model_dump(mode="json")
        log_params({"phantom": params})
        mlflow.log_metrics({"studies": summary.studies, "patients": summary.patients,
                            "seconds": summary.seconds,
                            **{f"positives.{k.replace('>=', '_ge_').replace('=', '_eq_')}": v
                               for k, v in summary.positives.items()}})
        mlflow.log_artifact(str(summary.montage))
    return summary

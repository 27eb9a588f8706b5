"""The phantom stage's entry: generate the demo dataset, then record it as one MLflow run.

Why this lives in flows/ for now: tasks/phantom/ has no MLflow adapter of its own yet (the
other stages keep theirs in their package, e.g. tasks/synthesize/tracking.py); the registry
(flows/stages.py) points at this function, and moves with it when the adapter moves.
"""

from __future__ import annotations

from tasks.common.tracking import log_params, stage_run
from tasks.config import Config
from tasks.phantom.generate import PhantomSummary, generate_phantom


def run_phantom(cfg: Config) -> PhantomSummary:
    """Generate the phantom dataset of ``cfg.phantom`` and log it as the stage's MLflow run."""
    import mlflow

    summary = generate_phantom(cfg.phantom)
    with stage_run(cfg.mlflow, "phantom"):
        log_params({"phantom": cfg.phantom.model_dump(mode="json")})
        mlflow.log_metrics({"studies": summary.studies, "patients": summary.patients,
                            "seconds": summary.seconds,
                            **{f"positives.{k.replace('>=', '_ge_').replace('=', '_eq_')}": v
                               for k, v in summary.positives.items()}})
        mlflow.log_artifact(str(summary.montage))
    return summary

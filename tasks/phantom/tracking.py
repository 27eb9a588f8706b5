"""The phantom stage's entry and its MLflow run: generate the demo dataset, then record it.

Why here: like every stage, the phantom's work is a plain function of its section
(tasks/phantom/generate.py) and its MLflow run an adapter the stage registry calls from the
edge (flows/stages.py: ``run`` and ``track``).
"""

from __future__ import annotations

from tasks.common.tracking import log_params, stage_run
from tasks.config import Config
from tasks.phantom.generate import PhantomSummary, generate_phantom


def run_phantom(cfg: Config) -> PhantomSummary:
    """Generate the phantom dataset of ``cfg.phantom`` (no MLflow: see ``log_phantom``)."""
    return generate_phantom(cfg.phantom)


def log_phantom(cfg: Config, summary: PhantomSummary) -> PhantomSummary:
    """Record a generated phantom dataset as the stage's MLflow run: settings, counts, montage."""
    import mlflow

    with stage_run(cfg.mlflow, "phantom"):
        log_params({"phantom": cfg.phantom.model_dump(mode="json")})
        mlflow.log_metrics({"studies": summary.studies, "patients": summary.patients,
                            "seconds": summary.seconds,
                            **{f"positives.{k.replace('>=', '_ge_').replace('=', '_eq_')}": v
                               for k, v in summary.positives.items()}})
        mlflow.log_artifact(str(summary.montage))
    return summary

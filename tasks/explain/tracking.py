"""The MLflow run of ``synthdx explain --evaluate``: settings, per-finding scores, the report.

Why its own run (``explain``), not the pipeline's: explanations are asked for after the
pipeline, of whichever model is trained; the run records which (``model.version``).
"""

from __future__ import annotations

from tasks.common.tracking import log_params, stage_run
from tasks.config import Config
from tasks.explain.run import Evaluation

SCORES = ("n", "pointing_game", "energy_fraction_mean", "energy_fraction_median",
          "mask_share_mean")


def log_evaluation(cfg: Config, evaluation: Evaluation) -> str:
    """Log an evaluation as an ``explain`` run; returns its run id."""
    import mlflow

    report = evaluation.report
    with stage_run(cfg.mlflow, "explain") as run:
        log_params({"explain": cfg.explain.model_dump(mode="json"),
                    "model_version": report["model"]["version"]})
        metrics = {f"{task}.{key}": float(value)
                   for task, t in report["tasks"].items() for key in SCORES
                   if (value := t.get(key)) is not None}
        mlflow.log_metrics({**metrics, "seconds": evaluation.seconds})
        mlflow.log_artifact(str(evaluation.json_path))
        mlflow.log_artifact(str(evaluation.html_path))
        for path in evaluation.figures:
            mlflow.log_artifact(str(path), artifact_path="examples")
        return str(run.info.run_id)

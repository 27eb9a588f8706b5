"""The validate stage as the pipeline runs it: report files, the MLflow run, the champions.

:func:`tasks.validate.pipeline.run_validation` does the numbers and files; this module adds what
a stage process does around them: resolve paths from params, log the run (metrics, report,
plots) to MLflow nested under the pipeline's run, and register each task's champion (chosen on
internal validation AUC) in the Model Registry.

``headline_table`` is re-exported from tasks.artifacts.validation_report, where it now lives:
flows/orchestration/summary.py imports it from here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts.classifier_folder import read_model_infos
from tasks.artifacts.validation_report import headline_table as headline_table
from tasks.common.tracking import check_tracking_server, log_params, stage_run
from tasks.config import Config
from tasks.validate.champions import pick_champions, register_champions
from tasks.validate.pipeline import ValidationResult, mlflow_payload, run_validation

STAGE = "validate"


@dataclass
class ValidateSummary:
    """What the validate stage wrote and registered."""

    result: ValidationResult
    champions: dict[str, dict[str, str]] = field(default_factory=dict)
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def describe(self) -> str:
        """The headline table (seed-ensemble AUC per regime and site) and where things are."""
        return "\n".join([f"validate: {self.seconds:.1f} s", headline_table(self.result.report),
                          *(f"  champion {task}: {c['model_uri']} (version {c['version']}, "
                            f"{c['regime']} seed {c['seed']})"
                            for task, c in sorted(self.champions.items())),
                          f"  report: {self.result.html_path}",
                          f"  numbers: {self.result.json_path}",
                          f"  MLflow run: {self.mlflow_run_id}"])


def champion_external(report: dict[str, Any], infos: list[dict[str, Any]]
                      ) -> dict[str, dict[str, float | None]]:
    """Mean external and internal-test AUC of every single model, keyed for the registry tags."""
    internal = {s["key"] for s in report["eval_sets"] if s["internal"]}
    out: dict[str, dict[str, float | None]] = {}
    for task, doc in report["tasks"].items():
        for model in doc["models"]:
            ext = [m["auc"] for k, m in model["sets"].items()
                   if k not in internal and m["auc"] is not None]
            test = [m["auc"] for k, m in model["sets"].items()
                    if k in internal and m["auc"] is not None]
            out[f"{task}/{model['regime']}/{model['seed']}"] = {
                "external_auc_mean": statistics.fmean(ext) if ext else None,
                "internal_test_auc": statistics.fmean(test) if test else None}
    return out


def validate_stage(cfg: Config) -> ValidateSummary:
    """Validate every trained classifier, log the run and register the champions.

    Raises:
        ValidationInputError: a missing or corrupt model folder (named in the message).
    """
    import mlflow

    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    v = cfg.validation
    root = Path(v.classifiers or cfg.classifier.output)
    started = time.perf_counter()
    result = run_validation(root, Path(v.output), v)
    infos = read_model_infos(root)
    per_model = champion_external(result.report, infos)
    with stage_run(cfg.mlflow, STAGE) as run:
        log_params({"validation": v.model_dump(mode="json"), "classifiers": str(root)})
        metrics, artifacts = mlflow_payload(result)
        items = sorted(metrics.items())
        for i in range(0, len(items), 500):
            mlflow.log_metrics(dict(items[i:i + 500]))
        reports = Path(v.output)
        for path in artifacts:
            rel = path.parent.relative_to(reports) if path.is_relative_to(reports) else Path()
            mlflow.log_artifact(str(path), artifact_path=str(rel) if str(rel) != "." else None)
        champions = register_champions(cfg, infos, external={
            info["task"]: per_model.get(f"{info['task']}/{info['regime']}/{info['seed']}", {})
            for info in _champion_infos(infos)})
        mlflow.log_dict(champions, "champions.json")
        summary = ValidateSummary(result=result, champions=champions,
                                  seconds=time.perf_counter() - started,
                                  mlflow_run_id=run.info.run_id)
        mlflow.log_metric("seconds", summary.seconds)
    return summary


def _champion_infos(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(pick_champions(infos).values())

"""Register the best classifier of each task in the MLflow Model Registry as ``champion``.

The validate stage's job, not train_classifier's: it is the first stage that sees every regime
of a task. It reads the classifier folders through tasks.artifacts.classifier_folder.

"Best" is the highest AUC on the internal validation split (ties: the earlier regime in the
canonical order, then the lower seed). Never a test or external number: choosing the champion
on the data it is reported on would make its reported performance optimistic.

The best new model does not become ``champion`` by being new: tasks/validate/promotion.py
compares it with the current champion on today's evaluation sets, and a model that does not
earn the place is registered as ``challenger`` (the version's ``promotion`` and
``promotion_reason`` tags say which and why).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

from tasks.artifacts.classifier_folder import INFO_FILE, MODEL_FILE
from tasks.common.mlflow_logger import quiet_model_logging
from tasks.config import Config, RegimeName
from tasks.validate.calibrators_file import champion_artifacts
from tasks.validate.promotion import Decision, judge

CHAMPION = "champion"
CHALLENGER = "challenger"
ARTIFACT_NAME = "classifier"
PYFUNC_FILE = Path(__file__).with_name("champion_pyfunc.py")
REGIME_ORDER = get_args(RegimeName)


def pick_champions(infos: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The champion model info of each task (by internal validation AUC)."""
    best: dict[str, dict[str, Any]] = {}

    def key(info: dict[str, Any]) -> tuple[float, int, int]:
        regime = info["regime"]
        order = REGIME_ORDER.index(regime) if regime in REGIME_ORDER else len(REGIME_ORDER)
        auc = info.get("val_auc")
        return (float(auc) if auc is not None else -1.0, -order, -int(info["seed"]))

    for info in infos:
        task = info["task"]
        if task not in best or key(info) > key(best[task]):
            best[task] = info
    return best


def register_champions(cfg: Config, infos: list[dict[str, Any]],
                       external: dict[str, dict[str, float | None]] | None = None
                       ) -> dict[str, dict[str, str]]:
    """Register each task's best model (a pyfunc in its training run) as champion or challenger.

    Args:
        cfg: parameters (``classifier.registered_model_prefix``, ``mlflow``,
            ``validation.promotion``; ``ingest.output`` when a model.json names no processed
            dataset).
        infos: every model.json (with ``path``), as read from the classifiers folder.
        external: optional ``{task: {metric: value}}`` written as version tags (the validation
            stage's external AUCs), for a reader of the registry.

    Returns:
        ``{task: {"name", "version", "model_uri", "alias", "regime", "seed", "run_id",
        "decision", "reason", "gate", "previous", "processed"}}`` (``gate``: the per-site
        comparison as JSON text; ``previous``: the champion version it was compared with, or "";
        ``processed``: the dataset it was trained and scored on); empty when
        registration is off (prefix null) or a model has no MLflow run.
    """
    prefix = cfg.classifier.registered_model_prefix
    if not prefix:
        return {}
    import mlflow
    from mlflow import MlflowClient

    import models.classifier

    uri = cfg.mlflow.resolved_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    registered: dict[str, dict[str, str]] = {}
    for task, info in sorted(pick_champions(infos).items()):
        run_id = info.get("mlflow_run_id")
        if not run_id:
            continue
        name = f"{prefix}-{task}"
        current = _alias_version(client, name, CHAMPION)
        version = _version_of_run(client, name, run_id)
        if version is None:
            folder = Path(info["path"])
            # nested: the validate run is active; reopening the training run adds no parent.
            with mlflow.start_run(run_id=run_id, nested=True), quiet_model_logging():
                logged = mlflow.pyfunc.log_model(
                    name=ARTIFACT_NAME, python_model=str(PYFUNC_FILE),
                    artifacts={"weights": str(folder / MODEL_FILE),
                               "info": str(folder / INFO_FILE),
                               **champion_artifacts(cfg, info)},  # calibration, seed ensemble
                    code_paths=[str(Path(models.classifier.__file__).parent)],
                    pip_requirements=_requirements(), registered_model_name=name,
                    signature=_signature(), await_registration_for=30)
            version = str(logged.registered_model_version)
        decision = (Decision("kept", "the champion is this model already")
                    if current is not None and current.run_id == run_id else
                    judge(uri, name, current, Path(info["path"]), _processed(cfg, info),
                          cfg.validation.promotion))
        alias = CHAMPION if decision.promote else CHALLENGER
        client.set_registered_model_alias(name, alias, version)
        tags = {"task": task, "regime": info["regime"], "seed": str(info["seed"]),
                "val_auc": str(info.get("val_auc")), "threshold": str(info["threshold"]),
                "selected_by": "internal validation AUC", "promotion": decision.decision,
                "promotion_reason": decision.reason[:4900],
                "compared_with": "" if current is None else f"version {current.version}"}
        for metric, value in (external or {}).get(task, {}).items():
            tags[metric] = "n/a" if value is None else f"{value:.4f}"
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        registered[task] = {"name": name, "version": version, "alias": alias,
                            "model_uri": f"models:/{name}@{alias}", "regime": info["regime"],
                            "seed": str(info["seed"]), "run_id": run_id,
                            "decision": decision.decision, "reason": decision.reason,
                            "gate": json.dumps(decision.as_dict()),
                            "previous": "" if current is None else str(current.version),
                            "processed": str(_processed(cfg, info))}
    return registered


def _processed(cfg: Config, info: dict[str, Any]) -> Path:
    """The processed dataset the model was trained and scored on (its lineage), else ingest's."""
    lineage = info.get("lineage")
    recorded = lineage.get("processed") if isinstance(lineage, dict) else None
    return Path(recorded or cfg.classifier.processed or cfg.ingest.output)


def _alias_version(client: Any, name: str, alias: str) -> Any:
    """The ModelVersion behind ``alias`` of ``name``, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_of_run(client: Any, name: str, run_id: str) -> str | None:
    """The version of ``name`` already registered from ``run_id`` (a validation rerun), or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in found)) if found else None


def _signature() -> Any:
    """Input: float32 images (n, 2, H, W), any H and W; output: score, decision, calibration.

    Output columns: ``score``, ``positive``, ``probability``, ``uncertainty``, ``abstain``
    (tasks/validate/champion_pyfunc.py).

    H and W are left open: the model area-resizes to its own input size (``image_size`` in
    model.json), so scans at the archive's resolution can be passed as they are.
    """
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2, -1, -1))]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "positive"),
                        ColSpec("double", "probability"), ColSpec("double", "uncertainty"),
                        ColSpec("boolean", "abstain")]))


def _requirements() -> list[str]:
    from importlib import metadata

    return [f"{p}=={metadata.version(p)}" for p in ("torch", "monai", "lightning", "pandas",
                                                    "numpy", "mlflow", "torchmetrics")]

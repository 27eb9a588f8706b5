"""The project's MLflow experiment opens on its runs: it is marked a model-training experiment."""

from __future__ import annotations

from pathlib import Path

import mlflow

from tasks.common.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, use_experiment


def test_experiment_is_marked_for_model_training(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        first = use_experiment("synthdx-kind")
        again = use_experiment("synthdx-kind")
        experiment = mlflow.MlflowClient(uri).get_experiment(first)
    finally:
        mlflow.set_tracking_uri(None)
    assert first == again
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

"""Prefect flow for the train_classifier stage (wiring only; the work is tasks.classifier)."""

from __future__ import annotations

from prefect import flow

from tasks.classifier.pipeline import ClassifierRunSummary, run_train_classifier
from tasks.config import Config


@flow(name="train_classifier", log_prints=True)
def train_classifier_flow(cfg: Config, tasks: list[str] | None = None,
                          regimes: list[str] | None = None) -> ClassifierRunSummary:
    """Train every seed of the chosen (task, regime) models; one MLflow run per model."""
    return run_train_classifier(cfg, tasks, regimes)

"""MLflow runs for the stages: one run per stage process, nested under the pipeline's run.

Always an explicit tracking URI (MLflow >= 3.13 refuses the implicit ./mlruns store): the
params' SQLite file by default, MLFLOW_TRACKING_URI when a team server is configured. The
pipeline hands its run id to each stage through SYNTHDX_PARENT_RUN_ID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tasks.config import MlflowConfig

PARENT_ENV = "SYNTHDX_PARENT_RUN_ID"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested mapping into dotted keys (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out


@contextmanager
def stage_run(cfg: MlflowConfig, stage: str, tags: Mapping[str, str] | None = None
              ) -> Iterator[Any]:
    """Start (and end) the MLflow run of one stage.

    Args:
        cfg: tracking settings.
        stage: stage name; becomes the run name and the ``synthdx.stage`` tag.
        tags: extra tags.

    Yields:
        The active ``mlflow.ActiveRun``.
    """
    import mlflow

    mlflow.set_tracking_uri(cfg.resolved_uri())
    mlflow.set_experiment(cfg.experiment)
    all_tags = {"synthdx.stage": stage, **(tags or {})}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    """Log flattened params, batched (MLflow caps values at 6000 chars and 100 per batch)."""
    import mlflow

    flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))

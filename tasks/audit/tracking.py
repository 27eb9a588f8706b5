"""The audit stage's MLflow run: settings, every audit metric, timings and the reports.

Why an adapter: the audit's work (tasks/audit/pipeline.py) is a plain function of its inputs
that writes its outputs; this records what it found, called from the edge (the stage registry's
``track``), the same way as every other stage's adapter.
"""

from __future__ import annotations

import json
from dataclasses import replace

from tasks.artifacts.audit_output import AUDIT_JSON, released_dir
from tasks.audit.gate import record_generator
from tasks.audit.pipeline import AuditResult
from tasks.common.flatten import metric_values
from tasks.common.tracking import log_params, stage_run
from tasks.config import Config


def log_audit(cfg: Config, result: AuditResult) -> AuditResult:
    """Record a finished audit in one MLflow run; return the result with its run id.

    Args:
        cfg: the validated parameters (``mlflow`` is used).
        result: what ``run_audit`` returned (its ``tracking`` holds what the run records).

    Raises:
        ValueError: the result carries nothing to record (it did not come from ``run_audit``).
    """
    import mlflow

    if result.tracking is None:
        raise ValueError("audit result without tracking data: log the result run_audit returns")
    t = result.tracking
    with stage_run(cfg.mlflow, "audit", t.tags) as run:
        log_params(t.params)
        mlflow.log_metrics(metric_values(t.metrics))
        mlflow.log_metrics({f"seconds/{k}": v for k, v in t.timings.items()})
        for path in t.artifacts:
            mlflow.log_artifact(str(path))
        gate = json.loads((result.output / AUDIT_JSON).read_text()).get("generator_gate")
        if gate:  # the generator's alias and tags; a promoted one's released set is kept
            record_generator(cfg, gate, run.info.run_id, released_dir(result.output))
    return replace(result, mlflow_run_id=run.info.run_id)

"""Prefect flow for the audit stage (wiring only; the work is tasks.audit)."""

from __future__ import annotations

from prefect import flow

from tasks.audit.pipeline import AuditResult, run_audit
from tasks.config import Config


@flow(name="audit", log_prints=True)
def audit_flow(cfg: Config) -> AuditResult:
    """Audit the synthetic set: quality, privacy, the released subset; logs one MLflow run."""
    return run_audit(cfg)

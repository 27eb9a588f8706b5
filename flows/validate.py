"""Prefect flow for the validate stage (wiring only; the work is tasks.validate)."""

from __future__ import annotations

from prefect import flow

from tasks.config import Config
from tasks.validate.stage import ValidateSummary, validate_stage


@flow(name="validate", log_prints=True)
def validate_flow(cfg: Config) -> ValidateSummary:
    """Validate every classifier per site, write the reports, register the champions."""
    return validate_stage(cfg)

"""Prefect flow for the synthesize stage (wiring only; the work is tasks.synthesize)."""

from __future__ import annotations

from prefect import flow

from tasks.common.tracking import check_tracking_server
from tasks.config import Config
from tasks.synthesize.pipeline import SynthesizeResult, synthesize
from tasks.synthesize.tracking import log_synthesis


def run_synthesize(cfg: Config) -> SynthesizeResult | None:
    """Generate (every rank) and, on rank 0, record the run in MLflow."""
    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    result = synthesize(cfg)
    return log_synthesis(cfg, result) if result is not None else None


@flow(name="synthesize", log_prints=True)
def synthesize_flow(cfg: Config) -> SynthesizeResult | None:
    """Sample the synthetic dataset (distributed over the configured devices)."""
    return run_synthesize(cfg)

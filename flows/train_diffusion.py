"""Prefect flow for the train_diffusion stage (wiring only; the work is tasks.diffusion)."""

from __future__ import annotations

from prefect import flow

from tasks.config import Config
from tasks.diffusion.train import TrainSummary, train_diffusion


@flow(name="train_diffusion", log_prints=True)
def train_diffusion_flow(cfg: Config) -> TrainSummary:
    """Train or resume the conditional diffusion model; Lightning logs to MLflow itself."""
    return train_diffusion(cfg)

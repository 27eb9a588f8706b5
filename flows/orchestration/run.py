"""The pipeline's work as a plain function: each stage in order, skipped when up to date.

The Prefect flow (flows/pipeline.py) hands in how one stage is run (a Prefect task with
retries); everything else, the MLflow parent run and its lineage tags, lives here so it can
be tested without Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.orchestration.dag import StageInfo, pipeline_stages, select_stages, stale_reason
from flows.orchestration.lineage import lineage_tags, tag_key
from flows.orchestration.runner import StageFailed, begin_stages, stop_stages
from flows.orchestration.schedule import run_scheduled
from flows.orchestration.summary import (
    PipelineSummary,
    headline,
    headline_metrics,
    load_report,
    loop_results,
)
from tasks.common.tracking import use_experiment
from tasks.config import Config

RunStage = Callable[[str, bool, str | None, int], float]
"""Runs one stage: (stage, force, parent MLflow run id, CPU threads) -> seconds.

Raises StageFailed when the stage fails (after the caller's retries).
"""


class PipelineFailed(RuntimeError):
    """A stage failed after its retries; carries the summary of what did run."""

    def __init__(self, summary: PipelineSummary, failure: StageFailed) -> None:
        self.summary = summary
        self.failure = failure
        super().__init__(str(failure))


@dataclass(frozen=True)
class PipelineRequest:
    """What ``synthdx run`` was asked to do."""

    root: Path = Path(".")
    from_stage: str | None = None
    only: Sequence[str] | None = None
    force: bool = False


def plan(request: PipelineRequest) -> list[StageInfo]:
    """The stages this request covers, in pipeline order (validated before anything runs)."""
    return select_stages(pipeline_stages(request.root), request.from_stage, request.only)


def run_pipeline(cfg: Config, request: PipelineRequest, run_stage: RunStage,
                 attempts: Callable[[str], int] | None = None,
                 log: Callable[[str], None] = print) -> PipelineSummary:
    """Run the requested stages in DAG order inside one MLflow parent run.

    Independent stages run side by side, up to ``pipeline.max_parallel`` at once, except
    the ``pipeline.exclusive`` ones, which run alone.

    Args:
        cfg: the validated parameters (tracking store, profile, reports folder).
        request: which stages and whether to force them.
        run_stage: runs one stage in its own process (with the caller's retry policy).
        attempts: how many attempts a stage took (from the retry machinery), if known.
        log: where progress lines go.

    Raises:
        PipelineFailed: a stage failed; later stages were not run.
    """
    import mlflow

    stages = plan(request)
    summary = PipelineSummary(profile=cfg.profile, tracking_uri=cfg.mlflow.resolved_uri())
    started = time.perf_counter()
    mlflow.set_tracking_uri(summary.tracking_uri)
    use_experiment(cfg.mlflow.experiment)
    tags = {"synthdx.stage": "pipeline", "synthdx.profile": cfg.profile,
            "synthdx.request": _describe_request(request)}
    with mlflow.start_run(run_name=f"pipeline-{cfg.profile}", tags=tags) as parent:
        summary.mlflow_run_id = parent.info.run_id
        parent_id = parent.info.run_id

        def launch(info: StageInfo, threads: int) -> float:
            return run_stage(info.name, request.force, parent_id, threads)

        def stale(name: str) -> str | None:
            return "forced" if request.force else stale_reason(request.root, name)

        begin_stages()
        try:
            result = run_scheduled(stages, stale, launch, cfg.pipeline.max_parallel, log,
                                   on_abort=stop_stages, exclusive=cfg.pipeline.exclusive)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: stopped, not failed
                mlflow.end_run("KILLED")
            raise
        failure = result.failure
        for outcome in result.outcomes:
            if outcome.outcome in ("ran", "failed"):
                outcome.attempts = attempts(outcome.stage) if attempts else 1
                mlflow.log_metric(f"seconds/{tag_key(outcome.stage)}", outcome.seconds)
        summary.stages = result.outcomes
        summary.seconds = time.perf_counter() - started
        _finish_parent(cfg, request.root, summary, failure)
    if failure is not None:
        raise PipelineFailed(summary, failure)
    return summary


def _finish_parent(cfg: Config, root: Path, summary: PipelineSummary,
                   failure: StageFailed | None) -> None:
    """Lineage tags, headline table and metrics, and the summary on the parent run."""
    import mlflow

    mlflow.set_tags(lineage_tags(root, cfg.profile))
    summary.headline, summary.report = headline(root / cfg.validation.output)
    summary.promotion, summary.drift, loop_tags = loop_results(
        root / cfg.validation.output, root / cfg.drift.output, root / cfg.audit.output /
        "audit.json")
    if loop_tags:
        mlflow.set_tags(loop_tags)
    mlflow.set_tags({"synthdx.stages_ran": ",".join(summary.ran) or "none",
                     "synthdx.stages_skipped": ",".join(summary.skipped) or "none"})
    if summary.headline:
        mlflow.set_tag("synthdx.headline", summary.headline[:7900])
        report = load_report(root / cfg.validation.output / "validation.json") or {}
        metrics = headline_metrics(report)
        if metrics:
            mlflow.log_metrics(metrics)
    if summary.report:
        mlflow.set_tag("synthdx.report", str(summary.report))
    if failure is not None:
        summary.error = str(failure)
        mlflow.set_tag("synthdx.failed_stage", failure.stage)
    mlflow.log_metric("seconds/pipeline", summary.seconds)
    mlflow.log_text(summary.markdown(), "pipeline_summary.md")
    if failure is not None:
        mlflow.end_run(status="FAILED")


def _describe_request(request: PipelineRequest) -> str:
    parts = ["synthdx run"]
    if request.from_stage:
        parts.append(f"--from {request.from_stage}")
    for name in request.only or []:
        parts.append(f"--only {name}")
    if request.force:
        parts.append("--force")
    return " ".join(parts)

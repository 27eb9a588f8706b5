"""The end-to-end Prefect pipeline flow (wiring only; the work is flows.orchestration).

Each stage is a Prefect task whose body runs the stage as its own process
(``dvc repro --single-item``), so every stage is also its own Prefect flow run and MLflow
run; the task's retries come from ``pipeline.retries`` in params.yaml.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.orchestration.lock import project_lock
from flows.orchestration.profile import set_profile
from flows.orchestration.run import PipelineFailed, PipelineRequest, run_pipeline
from flows.orchestration.runner import StageFailed, run_stage_process, stage_env, stopping
from flows.orchestration.summary import PipelineSummary
from tasks.config import DEFAULT_PARAMS, load_config

ARTIFACT_KEY = "synthdx-pipeline"


class _StageErrorOnly(logging.Filter):
    """Drop the traceback Prefect attaches to a failed stage: it shows the wrapper only.

    The stage printed its own error (relayed above), and StageFailed carries it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StageFailed | PipelineFailed):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_wrapper_tracebacks() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine",
                 "prefect.flow_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _StageErrorOnly) for f in logger.filters):
            logger.addFilter(_StageErrorOnly())


def _retry_unless_stopping(task: object, task_run: object, state: object) -> bool:
    """A stage terminated because the pipeline is stopping (SIGTERM, Ctrl-C) is not retried."""
    return not stopping()


@task(name="stage", task_run_name="{stage}", persist_result=False,
      retry_condition_fn=_retry_unless_stopping)
def stage_task(stage: str, root: str, force: bool, parent_run_id: str | None,
               threads: int | None = None) -> float:
    """Run one stage in its own process; a failure raises StageFailed (Prefect retries it)."""
    return run_stage_process(stage, Path(root), stage_env(parent_run_id, threads=threads),
                             force).seconds


@flow(name="pipeline", log_prints=True, validate_parameters=True)
def pipeline_flow(params: str = str(DEFAULT_PARAMS), profile: str | None = None,
                  from_stage: str | None = None, only: list[str] | None = None,
                  force: bool = False, root: str = ".") -> PipelineSummary:
    """Run the dvc.yaml stages in DAG order, skipping the up-to-date ones, under one MLflow run.

    Independent stages (the classifier matrix) run side by side, ``pipeline.max_parallel``
    at a time.

    Args:
        params: the parameter file (its ``profile`` key picks the profile).
        profile: switch params.yaml to this profile first (as ``dvc exp run -S`` would).
        from_stage: start at this stage (or matrix group) and run everything after it.
        only: run just these stages (or matrix groups).
        force: rerun the chosen stages even when DVC reports them up to date.
        root: the project folder (dvc.yaml, params.yaml).
    """
    _quiet_wrapper_tracebacks()
    # synthdx run holds the lock already (re-entry is free); a deployment's or `synthdx serve`'s
    # run takes it here, so a scheduled run never overlaps a run started by hand.
    with project_lock(Path(root)):
        return _pipeline(params, profile, from_stage, only, force, root)


def _pipeline(params: str, profile: str | None, from_stage: str | None,
              only: list[str] | None, force: bool, root: str) -> PipelineSummary:
    if profile is not None and set_profile(Path(root) / params, profile):
        print(f"params: profile set to {profile} in {params}")
    cfg = load_config(Path(root) / params)
    request = PipelineRequest(root=Path(root), from_stage=from_stage, only=only, force=force)
    runner = stage_task.with_options(retries=cfg.pipeline.retries,
                                     retry_delay_seconds=cfg.pipeline.retry_delay_seconds)
    tries: Counter[str] = Counter()

    def run_stage(stage: str, force_it: bool, parent_run_id: str | None, threads: int) -> float:
        state = runner(stage, root, force_it, parent_run_id, threads, return_state=True)
        tries[stage] = _run_count(state)
        return state.result()

    try:
        summary = run_pipeline(cfg, request, run_stage, attempts=lambda s: tries[s])
    except PipelineFailed as exc:
        _artifact(exc.summary)
        raise
    _artifact(summary)
    return summary


def _run_count(state: object) -> int:
    """How many attempts the task run took (Prefect counts them on the task run)."""
    from prefect.client.orchestration import get_client

    task_run_id = getattr(getattr(state, "state_details", None), "task_run_id", None)
    if task_run_id is None:
        return 1
    with get_client(sync_client=True) as client:
        return int(client.read_task_run(task_run_id).run_count or 1)


def _artifact(summary: PipelineSummary) -> None:
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary.markdown(),
                             description="synthdx pipeline: stages run or skipped, headline")

"""The ingest stage as a Prefect flow: wiring only; the work is in tasks/ingest/.

Steps show up as tasks in the Prefect UI. None caches or persists its result: the inputs are
files that change without Prefect knowing, and some values (labels, key) hold identity that
must not be hashed into cache keys or stored as results.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks.common.tracking import check_tracking_server
from tasks.config import Config, IngestConfig, MlflowConfig
from tasks.ingest.outputs import metrics_path, write_metrics
from tasks.ingest.pipeline import finish, prepare, process
from tasks.ingest.reader import FileResult
from tasks.ingest.result import IngestPlan, IngestResult
from tasks.ingest.tracking import log_ingest_result


@task(name="prepare inputs", cache_policy=NO_CACHE, persist_result=False)
def prepare_inputs(cfg: IngestConfig) -> IngestPlan:
    """Check paths, read and validate the labels, find the key, list the files."""
    return prepare(cfg)


@task(name="process files", cache_policy=NO_CACHE, persist_result=False)
def process_files(plan: IngestPlan) -> quote[dict[str, FileResult]]:
    """Read, validate, de-identify and normalise every file in worker processes.

    Returned quoted: Prefect would otherwise walk every field of every file's result to link
    it to this task run (seconds on a large archive, more than a night's whole work).
    """
    return quote(process(plan))


@task(name="write dataset", cache_policy=NO_CACHE, persist_result=False)
def write_outputs(plan: IngestPlan, results: dict[str, FileResult]) -> IngestResult:
    """Split, then write the quarantine and the processed dataset atomically."""
    return finish(plan, results)


@task(name="write metrics", cache_policy=NO_CACHE, persist_result=False)
def write_stage_metrics(result: IngestResult, path: Path | None) -> Path | None:
    """Write the stage's DVC metrics (reports/ingest_metrics.json), if this run has any.

    None when the output is not the project's: see tasks/common/stage_metrics.py.
    """
    if path is not None:
        write_metrics(path, result)
    return path


@task(name="log to MLflow", cache_policy=NO_CACHE, persist_result=False)
def log_run(result: IngestResult, ingest_cfg: IngestConfig, mlflow_cfg: MlflowConfig) -> str:
    """Record params, counts, the dataset version and the report in one MLflow run."""
    return log_ingest_result(result, ingest_cfg, mlflow_cfg)


@flow(name="ingest")
def ingest_flow(cfg: Config) -> IngestResult:
    """DICOM archive + labels CSV -> de-identified, normalised, split dataset (see README)."""
    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    plan = prepare_inputs(cfg.ingest)  # warns itself when it falls back to the demo key
    # The plan (every labels row) and the results (every file's) are passed quoted: Prefect
    # does not walk them looking for futures, which took seconds per night on 2,000 files.
    results = process_files(quote(plan))
    result = write_outputs(quote(plan), results)
    result.metrics_path = write_stage_metrics(result, metrics_path(cfg))
    result.mlflow_run_id = log_run(result, cfg.ingest, cfg.mlflow)
    get_run_logger().info("ingested %d of %d files, quarantined %d in %.1f s; dataset %s",
                          result.ingested, result.files_total, result.quarantined,
                          result.elapsed_seconds, result.digest)
    return result

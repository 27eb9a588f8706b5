"""Log an ingest run to MLflow: parameters, counts, the dataset version and the report.

Only what ingest itself wrote to the processed output reaches MLflow (the configuration,
counts, the DVC digest, ingest_report.json and montage.png); none of it holds identity.
The client is created with the tracking URI spelled out, never from MLflow's process-wide
default (which, unset, is a ./mlruns file store that MLflow >= 3.13 refuses).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from tasks.common.flatten import param_values
from tasks.config import IngestConfig, MlflowConfig
from tasks.ingest.result import IngestResult

PARENT_RUN_ENV = "SYNTHDX_PARENT_RUN_ID"
DATASET_NAME = "synthdx-processed"

_DTYPES = {"b": DataType.boolean, "i": DataType.long, "u": DataType.long, "f": DataType.double}


def manifest_schema(dtypes: dict[str, str]) -> Schema:
    """MLflow schema of the manifest from its column dtypes (numpy kind letters)."""
    return Schema([ColSpec(type=_DTYPES.get(kind, DataType.string), name=name)
                   for name, kind in dtypes.items()])


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def log_ingest_result(result: IngestResult, ingest_cfg: IngestConfig,
                      mlflow_cfg: MlflowConfig) -> str:
    """Log a finished ingest run (params, counts, dataset, report, montage); return its ID."""
    metrics = {
        "files_total": result.files_total,
        "ingested": result.ingested,
        "quarantined": result.quarantined,
        "elapsed_seconds": result.elapsed_seconds,
        "files_per_second": result.files_total / max(result.elapsed_seconds, 1e-9),
        "files_reused": result.reused,
        **{f"images_{split}": n for split, n in result.splits.items()},
        **{f"images_site_{site}": n for site, n in result.sites.items()},
    }
    return log_ingest_run(
        mlflow_cfg, ingest_cfg, output=result.output, digest=result.digest, metrics=metrics,
        extra_params={"ingest.key_origin": result.key_origin,
                      "ingest.internal_site_resolved": result.internal_site},
        manifest_dtypes=result.manifest_dtypes,
        artifacts=[result.report_path, result.output / "montage.png"],
        archive_digest=result.archive_digest,
    )


def log_ingest_run(
    mlflow_cfg: MlflowConfig,
    ingest_cfg: IngestConfig,
    *,
    output: Path,
    digest: str,
    metrics: dict[str, float],
    extra_params: dict[str, str],
    manifest_dtypes: dict[str, str],
    artifacts: list[Path],
    archive_digest: str | None = None,
) -> str:
    """Create the "ingest" run and return its ID.

    The processed dataset is logged as an input whose digest is the DVC hash of the output
    folder, so the run names the exact data version that dvc.lock records. Runs nest under
    the pipeline's run when SYNTHDX_PARENT_RUN_ID is set.
    """
    client = MlflowClient(tracking_uri=mlflow_cfg.resolved_uri())
    tags = {"synthdx.stage": "ingest", "synthdx.dataset_digest": digest}
    if archive_digest:  # the archive version read (DVC's hash of ingest.source)
        tags["synthdx.archive_digest"] = archive_digest
    parent = os.environ.get(PARENT_RUN_ENV, "").strip()
    if parent:
        tags[MLFLOW_PARENT_RUN_ID] = parent
    run = client.create_run(_experiment_id(client, mlflow_cfg.experiment), run_name="ingest",
                            tags=tags)
    run_id = run.info.run_id
    try:
        params = {**param_values(ingest_cfg.model_dump(mode="json"), "ingest."),
                  **extra_params}
        client.log_batch(run_id, params=[_param(k, v) for k, v in sorted(params.items())])
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in sorted(metrics.items())])
        with warnings.catch_warnings():  # "file" and "" schemes both map to the local source
            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
            source = resolve_dataset_source(Path(output).resolve().as_uri())
        meta = MetaDataset(source=source, name=DATASET_NAME, digest=digest,
                           schema=manifest_schema(manifest_dtypes))
        info = meta.to_dict()
        entity = DatasetEntity(name=info["name"], digest=info["digest"],
                               source_type=info["source_type"], source=info["source"],
                               schema=info.get("schema"), profile=info.get("profile"))
        client.log_inputs(run_id, datasets=[DatasetInput(
            dataset=entity, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value="processed")])])
        for path in artifacts:
            client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _param(key: str, value: str) -> Param:
    return Param(key, value[:6000])


def _metric(key: str, value: float) -> Metric:
    return Metric(key, float(value), int(time.time() * 1000), 0)

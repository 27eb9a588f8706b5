"""The ingest Prefect flow with MLflow: the run it logs, and no identity anywhere downstream."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from mlflow import MlflowClient
from test_ingest_helpers import add_duplicate, build_archive, scan_for_secrets
from typer.testing import CliRunner

from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _config(archive, tmp_path: Path, **extra: str):
    overrides = {
        "ingest.source": archive.source, "ingest.labels": archive.labels,
        "ingest.output": tmp_path / "processed", "ingest.quarantine": tmp_path / "quarantine",
        "ingest.image_rows": 48, "ingest.image_cols": 16, "ingest.workers": 2,
        "reports_dir": tmp_path / "reports", **extra,
    }
    return load_config(REPO / "params.yaml", [f"{k}={v}" for k, v in overrides.items()])


def test_ingest_flow_logs_one_run_and_leaks_no_identity(
    prefect_harness: None, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.ingest import ingest_flow

    archive = build_archive(tmp_path / "archive")
    add_duplicate(archive)
    key_file = tmp_path / "key.txt"
    key_file.write_text("flow-test-key-0123456789abcdef")
    artifacts = tmp_path / "mlartifacts"
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.create_experiment("synthdx", artifact_location=artifacts.as_uri())
    parent = client.create_run(experiment, run_name="pipeline")
    monkeypatch.setenv("SYNTHDX_PARENT_RUN_ID", parent.info.run_id)
    cfg = _config(archive, tmp_path, **{"ingest.key_file": key_file})

    result = ingest_flow(cfg)

    assert result.ingested == len(archive.good) and result.quarantined == len(archive.bad)
    assert "quarantined" in result.describe() and str(result.report_path) in result.describe()
    run = client.get_run(result.mlflow_run_id)
    assert run.info.run_name == "ingest" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["ingest.image_rows"] == "48"
    assert run.data.params["ingest.split.seed"] == "17"
    assert run.data.metrics["ingested"] == len(archive.good)
    assert run.data.metrics["quarantined"] == len(archive.bad)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == result.digest == dvc_dir_hash(cfg.ingest.output)
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "processed"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert logged == {"ingest_report.json", "montage.png"}
    metrics = json.loads((tmp_path / "reports" / "ingest_metrics.json").read_text())
    assert metrics["ingested"] == len(archive.good)

    # Every byte downstream of ingest: processed output, DVC metrics, MLflow DB and artifacts.
    secrets = archive.secrets()
    assert len(secrets) > 100
    downstream = [Path(cfg.ingest.output), tmp_path / "reports", artifacts,
                  Path(urlparse(mlflow_uri).path)]
    assert scan_for_secrets(downstream, secrets) == []
    # The scan does find identity where it is allowed to be (it really looks).
    assert scan_for_secrets([Path(cfg.ingest.quarantine)], secrets)
    manifest = pd.read_parquet(Path(cfg.ingest.output) / "manifest.parquet")
    assert not set(manifest["pseudo_id"]) & {s.patient for s in archive.good}


def test_cli_ingest_reports_a_missing_key(prefect_harness: None, mlflow_uri: str,
                                          tmp_path: Path) -> None:
    from flows.cli import app

    archive = build_archive(tmp_path / "archive", bad_files=False)
    args = ["ingest", "--params", str(REPO / "params.yaml"), "--source", str(archive.source),
            "--labels", str(archive.labels), "--output", str(tmp_path / "processed"),
            "--set", f"ingest.quarantine={tmp_path / 'quarantine'}"]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 1
    assert "no pseudonymisation key" in outcome.output
    assert "SYNTHDX_PSEUDONYM_KEY" in outcome.output
    assert not (tmp_path / "processed").exists()

"""Quarantined files are named without identity, even when the archive's folders are names.

Archives are often exported one folder per patient. Such a folder name must not reach the
ingest report, the quarantine folder's file names, the log or the MLflow run; the operator
still finds each file (its copy by name, its original path in the quarantine's reasons.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from mlflow import MlflowClient
from test_ingest_helpers import TEST_KEY, Archive, build_archive, scan_for_secrets
from typer.testing import CliRunner

from tasks.ingest.errors import IngestError
from tasks.ingest.pipeline import run_ingest

REPO = Path(__file__).resolve().parents[1]

# Name-bearing paths, as an export tool writes them; the tokens are what must never leak.
CORRUPT = "DOE^JOHN_1962/study1/img.dcm"
NOTE = "DOE^JOHN_1962/study1/DOE_JOHN_referral.txt"
ORIGINAL = "ROE^RICHARD_1970/a/IMG0001.dcm"  # sorts before alpha/: ingested, the others repeat it
REPEAT = "ROE^RICHARD_1970/b/IMG0001.dcm"
TOKENS = ["DOE^JOHN", "DOE_JOHN", "JOHN_1962", "ROE^RICHARD", "RICHARD_1970",
          "DOE%5EJOHN", "ROE%5ERICHARD"]


def _named_archive(root: Path) -> Archive:
    """The fixture archive plus a corrupt file, a note and duplicates in patient folders."""
    archive = build_archive(root, bad_files=False)
    source = archive.source
    (source / CORRUPT).parent.mkdir(parents=True)
    rng = np.random.default_rng(3)
    (source / CORRUPT).write_bytes(
        b"\0" * 128 + b"DICM" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (source / NOTE).write_text("referral letter\n")
    for rel in (ORIGINAL, REPEAT):
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / archive.good[0].relpath, source / rel)
    return archive


def _leaks(text: str) -> list[str]:
    return [t for t in TOKENS if t in text]


def test_names_in_folders_never_leave_the_quarantine_folder(
    prefect_harness: None, mlflow_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.cli import app

    archive = _named_archive(tmp_path / "archive")
    key_file = tmp_path / "key.txt"
    key_file.write_text(TEST_KEY)
    artifacts = tmp_path / "mlartifacts"
    client = MlflowClient(tracking_uri=mlflow_uri)
    client.create_experiment("synthdx", artifact_location=artifacts.as_uri())
    # What the CLI would set itself (see flows.cli._project_prefect_home), undone afterwards.
    monkeypatch.setenv("PREFECT_HOME", os.environ.get("PREFECT_HOME", str(REPO / ".prefect")))
    output, quarantine = tmp_path / "processed", tmp_path / "quarantine"
    args = ["ingest", "--params", str(REPO / "params.yaml"), "--source", str(archive.source),
            "--labels", str(archive.labels), "--output", str(output), "--workers", "2"]
    for override in (f"ingest.quarantine={quarantine}", f"ingest.key_file={key_file}",
                     "ingest.image_rows=48", "ingest.image_cols=16",
                     f"reports_dir={tmp_path / 'reports'}"):
        args += ["--set", override]

    caplog.set_level(logging.INFO)
    outcome = CliRunner().invoke(app, args)

    assert outcome.exit_code == 0, outcome.output
    report = json.loads((output / "ingest_report.json").read_text())
    local = {e["source"]: e for e in json.loads((quarantine / "reasons.json").read_text())}
    # The operator's way back to each file: report name -> copy -> original path.
    expected = {CORRUPT: "file is truncated or corrupt", NOTE: "not a DICOM file",
                REPEAT: "duplicate of an already ingested image",
                archive.good[0].relpath: "duplicate of an already ingested image"}
    assert set(local) == set(expected)
    for rel, reason in expected.items():
        assert local[rel]["reason"].startswith(reason)
        copy = quarantine / local[rel]["file"]
        assert copy.read_bytes() == (archive.source / rel).read_bytes()
        assert {"file": copy.name, "reason": local[rel]["reason"]} in report["quarantined"]
    assert local[REPEAT]["duplicate_of"] == ORIGINAL
    assert local[NOTE]["file"].endswith(".txt") and local[CORRUPT]["file"].endswith(".dcm")

    # Nowhere outside the quarantine's reasons.json: report, outputs, copies' names, the
    # CLI's output, every log record, the MLflow database and artifacts.
    assert _leaks(json.dumps(report)) == []
    assert scan_for_secrets([output, tmp_path / "reports", artifacts,
                             Path(urlparse(mlflow_uri).path)], TOKENS) == []
    assert _leaks(" ".join(p.name for p in quarantine.rglob("*"))) == []
    assert _leaks(outcome.output) == []
    logged = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "")
                       for r in caplog.records)
    assert "ingested" in logged  # the flow's own log line was captured: the check is real
    assert _leaks(logged) == []
    runs = client.search_runs([client.get_experiment_by_name("synthdx").experiment_id])
    (run,) = runs
    assert run.data.metrics["quarantined"] == len(expected)
    assert _leaks(json.dumps([run.data.params, run.data.tags])) == []
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "ingest_report.json", "montage.png"}
    # The scans do look: the local reasons.json is the one place the paths are written.
    assert _leaks((quarantine / "reasons.json").read_text())


def test_strict_mode_error_names_copies_not_paths(tmp_path: Path) -> None:
    archive = _named_archive(tmp_path / "archive")
    cfg = archive.config(tmp_path, strict=True)
    with pytest.raises(IngestError, match="strict mode: 4 of") as failure:
        run_ingest(cfg)
    message = str(failure.value)
    assert _leaks(message) == [] and "reasons.json" in message
    names = {e["file"] for e in json.loads((Path(cfg.quarantine) / "reasons.json").read_text())}
    assert sum(name in message for name in names) == 3  # the first three, by their copies

"""A stage writes only where it is told: its DVC metrics file follows its output.

``synthdx ingest --output DIR`` must leave the project's reports/ingest_metrics.json alone:
overwriting it with numbers about another dataset makes DVC rerun the stage on the next
``synthdx run``. (The audit's side is in tests/test_audit.py.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from test_ingest_helpers import TEST_KEY, build_archive
from typer.testing import CliRunner

from tasks.common.stage_metrics import PROJECT_REPORTS_DIR, stage_metrics_path
from tasks.config import AuditConfig, IngestConfig

REPO = Path(__file__).resolve().parents[1]


def test_metrics_follow_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    project = Path("data/processed")
    name = "ingest_metrics.json"
    assert stage_metrics_path("reports", "data/processed", project, name) == Path(
        "reports/ingest_metrics.json")
    # The same folders spelled absolutely are still the project's.
    assert stage_metrics_path(tmp_path / "reports", tmp_path / "data/processed", project,
                              name) == tmp_path / "reports" / name
    assert stage_metrics_path("reports", tmp_path / "elsewhere", project, name) is None
    assert stage_metrics_path(tmp_path / "r2", tmp_path / "elsewhere", project,
                              name) == tmp_path / "r2" / name


def test_dvc_yaml_declares_the_paths_the_rule_calls_the_projects() -> None:
    """The rule compares with the config defaults; dvc.yaml and params.yaml must agree."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Path(params["reports_dir"]) == PROJECT_REPORTS_DIR
    for stage, default, name in (
        ("ingest", IngestConfig.model_fields["output"].default, "ingest_metrics.json"),
        ("audit", AuditConfig.model_fields["output"].default, "audit_metrics.json"),
    ):
        (out,) = stages[stage]["outs"]  # a path, or {path: options} (ingest: persist)
        assert (out if isinstance(out, str) else next(iter(out))) == default.as_posix()
        assert Path(params[stage]["output"]) == default
        (declared,) = stages[stage]["metrics"]
        assert list(declared) == [(PROJECT_REPORTS_DIR / name).as_posix()]


def test_cli_ingest_to_another_output_leaves_the_project_metrics_alone(
    prefect_harness: None, mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.cli import app

    archive = build_archive(tmp_path / "archive", bad_files=False)
    key_file = tmp_path / "key.txt"
    key_file.write_text(TEST_KEY)
    project = tmp_path / "project"
    project.mkdir()
    # What the CLI would set itself (flows.cli._project_prefect_home), undone afterwards.
    monkeypatch.setenv("PREFECT_HOME", os.environ.get("PREFECT_HOME", str(REPO / ".prefect")))
    monkeypatch.chdir(project)
    base = ["ingest", "--params", str(REPO / "params.yaml"), "--source", str(archive.source),
            "--labels", str(archive.labels), "--workers", "2",
            "--set", f"ingest.key_file={key_file}", "--set", "ingest.image_rows=48",
            "--set", "ingest.image_cols=16"]

    # The project's own run (dvc.yaml's command, relative default paths) writes the metrics.
    first = CliRunner().invoke(app, base)
    assert first.exit_code == 0, first.output
    metrics = project / "reports" / "ingest_metrics.json"
    assert json.loads(metrics.read_text())["ingested"] == len(archive.good)
    assert f"DVC metrics: {Path('reports/ingest_metrics.json')}" in first.output
    before = metrics.read_bytes(), metrics.stat().st_mtime_ns

    other = tmp_path / "other"
    second = CliRunner().invoke(app, [*base, "--output", str(other / "processed"), "--set",
                                      f"ingest.quarantine={other / 'quarantine'}"])

    assert second.exit_code == 0, second.output
    assert (other / "processed" / "ingest_report.json").is_file()
    assert (metrics.read_bytes(), metrics.stat().st_mtime_ns) == before
    assert sorted(p.name for p in (project / "reports").iterdir()) == ["ingest_metrics.json"]
    assert "DVC metrics: not written" in second.output
    # Moving reports_dir too is how a run elsewhere asks for its own metrics file.
    third = CliRunner().invoke(app, [*base, "--output", str(other / "processed"), "--set",
                                     f"ingest.quarantine={other / 'quarantine'}", "--set",
                                     f"reports_dir={other / 'reports'}"])
    assert third.exit_code == 0, third.output
    assert (other / "reports" / "ingest_metrics.json").read_bytes() == before[0]


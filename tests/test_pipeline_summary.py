"""The summary `synthdx run` prints and the Prefect artifact it writes."""

from __future__ import annotations

from pathlib import Path

from flows.orchestration.summary import PipelineSummary, StageOutcome


def _summary(uri: str) -> PipelineSummary:
    return PipelineSummary(
        profile="demo",
        stages=[StageOutcome("phantom", "skipped"), StageOutcome("ingest", "ran", 12.5, 1),
                StageOutcome("validate", "failed", 3.0, 2, "exit 1")],
        seconds=16.0, report=Path("reports/validation.md"), mlflow_run_id="abc123",
        tracking_uri=uri, error="validate failed")


def test_terminal_summary_names_what_ran_and_failed() -> None:
    text = _summary("sqlite:///mlflow.db").describe()
    assert "2 stage(s) ran" not in text and "1 stage(s) ran, 1 up to date" in text
    assert "ingest" in text and "validate" in text and "phantom" not in text
    assert "reports/validation.md" in text


def test_local_store_points_at_synthdx_ui_and_a_server_at_itself() -> None:
    assert "(browse: synthdx ui)" in _summary("sqlite:///mlflow.db").describe()
    served = _summary("https://mlflow.team.example:5000/").describe()
    assert "(browse: https://mlflow.team.example:5000)" in served
    assert "synthdx ui" not in served


def test_markdown_artifact_has_a_row_per_stage() -> None:
    md = _summary("sqlite:///mlflow.db").markdown()
    for stage in ("phantom", "ingest", "validate"):
        assert f"`{stage}`" in md

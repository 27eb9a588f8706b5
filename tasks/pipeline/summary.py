"""What one pipeline run did, for the terminal, the Prefect artifact and the MLflow parent run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Outcome = Literal["ran", "skipped", "failed", "not run"]


@dataclass
class StageOutcome:
    """One stage in one pipeline run."""

    stage: str
    outcome: Outcome
    seconds: float = 0.0
    attempts: int = 0
    reason: str = ""


@dataclass
class PipelineSummary:
    """The stages of a pipeline run and where its results are."""

    profile: str
    stages: list[StageOutcome] = field(default_factory=list)
    seconds: float = 0.0
    headline: str | None = None
    report: Path | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    error: str | None = None

    @property
    def ran(self) -> list[str]:
        """Names of the stages that ran in this pipeline run."""
        return [s.stage for s in self.stages if s.outcome == "ran"]

    @property
    def skipped(self) -> list[str]:
        """Names of the stages DVC reported up to date."""
        return [s.stage for s in self.stages if s.outcome == "skipped"]

    def describe(self) -> str:
        """The short summary printed at the end of ``synthdx run``."""
        lines = []
        if not self.ran and not self.error:
            lines.append(f"pipeline: all {len(self.stages)} stages up to date, nothing to run "
                         f"(profile {self.profile}; --force reruns)")
        else:
            lines.append(f"pipeline ({self.profile}): {len(self.ran)} stage(s) ran, "
                         f"{len(self.skipped)} up to date, in {self.seconds:.0f} s")
            lines += [f"  {s.stage:<52}{_cell(s)}" for s in self.stages if s.outcome != "skipped"]
        if self.headline:
            lines += ["", self.headline]
        if self.report:
            lines.append(f"  report: {self.report}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow: run {self.mlflow_run_id} in {self.tracking_uri} "
                         f"(browse: {_browse_hint(self.tracking_uri)})")
        return "\n".join(lines)

    def markdown(self) -> str:
        """The Prefect artifact: a table of stages, the headline results, the report path."""
        rows = "\n".join(f"| `{s.stage}` | {s.outcome} | {s.seconds:.1f} | {s.attempts} | "
                         f"{s.reason.replace('|', '/')[:120]} |" for s in self.stages)
        parts = [f"# synthdx pipeline ({self.profile})", "",
                 f"{len(self.ran)} stage(s) ran, {len(self.skipped)} up to date, "
                 f"{self.seconds:.1f} s in all.", "",
                 "| stage | outcome | seconds | attempts | why |", "|---|---|---|---|---|", rows]
        if self.error:
            parts += ["", "## Failure", "", "```", self.error, "```"]
        if self.headline:
            parts += ["", "## Headline results", "", "```", self.headline, "```"]
        if self.report:
            parts += ["", f"Report: `{self.report}`"]
        if self.mlflow_run_id:
            parts += [f"MLflow parent run: `{self.mlflow_run_id}` ({self.tracking_uri})"]
        return "\n".join(parts) + "\n"


def _cell(s: StageOutcome) -> str:
    extra = f", {s.attempts} attempts" if s.attempts > 1 else ""
    return f"{s.outcome} ({s.seconds:.1f} s{extra})" if s.outcome != "not run" else s.outcome


def load_report(path: Path) -> dict[str, Any] | None:
    """The validation report's numbers, or None before validate has run (or if unreadable)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline(reports_dir: Path) -> tuple[str | None, Path | None]:
    """The headline table from ``<reports>/validation.json`` and the HTML report's path."""
    from tasks.validate.stage import headline_table

    report = load_report(reports_dir / "validation.json")
    if report is None:
        return None, None
    try:
        table = headline_table(report)
    except (KeyError, TypeError):
        return None, None
    html = reports_dir / "validation.html"
    return table, html if html.is_file() else None


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Ensemble AUC per task, regime and evaluation set, as MLflow metric names."""
    from tasks.pipeline.lineage import tag_key

    out: dict[str, float] = {}
    for task, doc in report.get("tasks", {}).items():
        for ens in doc.get("ensembles", []):
            for key, values in ens.get("sets", {}).items():
                if values.get("auc") is not None:
                    out[tag_key(f"auc/{task}/{ens['regime']}/{key}")] = float(values["auc"])
    return out


def _browse_hint(tracking_uri: str | None) -> str:
    """How to look at the runs: a tracking server has its own UI, a local store needs ours."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return "synthdx ui"

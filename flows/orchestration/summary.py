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
    promotion: list[str] = field(default_factory=list)
    drift: dict[str, Any] | None = None

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
        lines += [f"  promotion {line}" for line in self.promotion]
        if self.drift is not None:
            from tasks.artifacts.drift_report import drift_lines

            lines += [f"  {line}" for line in drift_lines(self.drift)]
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
        if self.promotion:
            parts += ["", "## Champion / challenger", "",
                      *(f"- {line.replace('|', '/')}" for line in self.promotion)]
        if self.drift is not None:
            from tasks.artifacts.drift_report import drift_markdown

            parts += ["", "## Drift per site", "", drift_markdown(self.drift).rstrip("\n")]
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
    from tasks.artifacts.validation_report import headline_table

    report = load_report(reports_dir / "validation.json")
    if report is None:
        return None, None
    try:
        table = headline_table(report)
    except (KeyError, TypeError):
        return None, None
    pooled = pooled_lines(report)
    if pooled:
        table += "\n" + "\n".join(pooled)
    html = reports_dir / "validation.html"
    return table, html if html.is_file() else None


def _pooled(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(task, "<with>_vs_<without>", pooled)`` of every comparison with a pooled object.

    ``.get`` throughout: a report written before the pooled comparison existed has none, and the
    headline must still show its AUC table.
    """
    out = []
    for task, doc in report.get("tasks", {}).items():
        for comp in doc.get("comparisons", []):
            pooled = comp.get("pooled")
            if isinstance(pooled, dict):
                out.append((task, f"{comp.get('with')}_vs_{comp.get('without')}", pooled))
    return out


def _signed(value: Any) -> str:
    return "n/a" if not isinstance(value, int | float) else f"{value:+.3f}"


def pooled_lines(report: dict[str, Any]) -> list[str]:
    """One line per task and comparison: pooled external Delta AUC [CI], p, verdict, sites."""
    rows = _pooled(report)
    if not rows:
        return []
    level = report.get("config", {}).get("confidence", 0.95)
    lines = [f"  pooled external Delta AUC (mean over sites, {level * 100:g} % CI, p):"]
    for task, name, pooled in rows:
        p = pooled.get("p_value")
        p_text = "p n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")
        estimate = (f"{_signed(pooled.get('delta_auc'))} "
                    f"[{_signed(pooled.get('delta_auc_ci_low'))}, "
                    f"{_signed(pooled.get('delta_auc_ci_high'))}] {p_text}"
                    if pooled.get("delta_auc") is not None else "n/a")
        lines.append(f"    {task:<14}{name:<44}{estimate}  {pooled.get('verdict', '')} "
                     f"({len(pooled.get('sites', []))} sites)")
    return lines


def headline_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Ensemble AUC per task, regime and set; pooled external Delta AUC [CI] per comparison.

    Names: ``auc/<task>/<regime>/<set>`` and ``pooled_delta_auc/<task>/<with>_vs_<without>``
    with ``/ci_low`` and ``/ci_high`` beside it (MLflow metric names, ``+`` spelled out).
    """
    from flows.orchestration.lineage import tag_key

    out: dict[str, float] = {}
    for task, doc in report.get("tasks", {}).items():
        for ens in doc.get("ensembles", []):
            for key, values in ens.get("sets", {}).items():
                if values.get("auc") is not None:
                    out[tag_key(f"auc/{task}/{ens['regime']}/{key}")] = float(values["auc"])
    for task, name, pooled in _pooled(report):
        base = f"pooled_delta_auc/{task}/{name}"
        for suffix, key in (("", "delta_auc"), ("/ci_low", "delta_auc_ci_low"),
                            ("/ci_high", "delta_auc_ci_high")):
            if isinstance(pooled.get(key), int | float):
                out[tag_key(base + suffix)] = float(pooled[key])
    return out


def loop_results(reports_dir: Path, drift_path: Path, audit_json: Path | None = None
                 ) -> tuple[list[str], dict[str, Any] | None, dict[str, str]]:
    """The nightly loop's results: promotion lines, the drift table, and their MLflow tags.

    Args:
        reports_dir: the validation output folder (promotion.json).
        drift_path: the drift stage's table (drift.output).
        audit_json: the audit's audit.json, whose ``generator_gate`` is the diffusion model's
            champion / challenger decision.

    Returns:
        ``(lines, drift, tags)``: one line per task's champion / challenger decision, the drift
        document (None before the drift stage has run), and the parent run's tags
        (``synthdx.promotion.<task>``, ``synthdx.drift.flagged``).
    """
    from flows.orchestration.lineage import tag_key
    from tasks.artifacts.drift_report import read_drift
    from tasks.artifacts.promotion_report import PROMOTION_JSON, promotion_lines, read_promotion

    promotion = read_promotion(reports_dir / PROMOTION_JSON)
    lines = promotion_lines(promotion) if promotion else []
    tags = {tag_key(f"synthdx.promotion.{task}"): f"{entry.get('decision')}: "
            f"{entry.get('reason')}"[:4900]
            for task, entry in (promotion or {}).get("tasks", {}).items()}
    gate = (load_report(audit_json) or {}).get("generator_gate") if audit_json else None
    if isinstance(gate, dict) and gate.get("decision"):
        where = f" {gate.get('name')} v{gate.get('version')}" if gate.get("version") else ""
        lines.append(f"generator: {gate['decision']}{where}: {gate.get('reason')}")
        tags["synthdx.promotion.generator"] = f"{gate['decision']}: {gate.get('reason')}"[:4900]
    drift = read_drift(drift_path)
    if drift is not None:
        tags["synthdx.drift.flagged"] = ",".join(drift.get("flagged", [])) or "none"
    return lines, drift, tags


def _browse_hint(tracking_uri: str | None) -> str:
    """How to look at the runs: a tracking server has its own UI, a local store needs ours."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return "synthdx ui"

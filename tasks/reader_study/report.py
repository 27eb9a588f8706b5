"""Write the reader study's report (JSON and HTML) and log it to MLflow beside the audit.

The MLflow run goes to the project's experiment, tagged with the audit run that released the
synthetic set (found by the synthetic set's digest the audit recorded) and the generator's model
version, so the Turing test's numbers sit next to the audit's metrics for the same model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from tasks.common.atomic import atomic_write_text
from tasks.config import Config
from tasks.reader_study.scoring import headline_metrics, score_study
from tasks.reader_study.study import OpenStudy

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ReportResult:
    """Where the report went and its headline."""

    json_path: Path
    html_path: Path
    document: dict[str, Any]
    mlflow_run_id: str | None
    audit_run_id: str | None

    def describe(self) -> str:
        """A few lines for the CLI."""
        t = self.document["turing"]
        pooled, kappa = t["pooled"], t["fleiss_kappa"]
        lines = [f"reader study {self.document['study']['id']}: "
                 f"{self.document['study']['answers']} answers from "
                 f"{len(self.document['study']['readers'])} readers"]
        if pooled["accuracy"] is not None:
            lo, hi = pooled["ci"]
            lines.append(f"  real vs synthetic accuracy {pooled['accuracy']:.3f} "
                         f"[{lo:.3f}, {hi:.3f}] (0.5 = chance)")
        if kappa["kappa"] is not None:
            lines.append(f"  Fleiss' kappa {kappa['kappa']:.3f} on {kappa['cases']} cases read "
                         f"by all {kappa['readers']} readers")
        for name, block in t["per_reader"].items():
            if block["accuracy"] is not None:
                lines.append(f"  {name}: {block['accuracy']:.3f} on {block['answered']} cases")
        lines.append(f"  report: {self.json_path}, {self.html_path}")
        if self.mlflow_run_id:
            lines.append(f"  MLflow run {self.mlflow_run_id}"
                         + (f" (audit run {self.audit_run_id})" if self.audit_run_id else
                            " (no audit run found for this released set)"))
        return "\n".join(lines)


def write_report(document: dict[str, Any], base: Path) -> tuple[Path, Path]:
    """``<base>.json`` and ``<base>.html``, each written atomically."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path, html_path = base.with_suffix(".json"), base.with_suffix(".html")
    atomic_write_text(json_path, json.dumps(document, indent=1) + "\n")
    pages = Environment(loader=FileSystemLoader(HERE / "templates"),
                        autoescape=select_autoescape(default=True))
    atomic_write_text(html_path, pages.get_template("report.html").render(doc=document))
    return json_path, html_path


def audit_run_id(details: dict[str, Any]) -> str | None:
    """The newest audit run of the active experiment that audited this study's synthetic set."""
    import mlflow

    digest = details.get("synthetic_digest")
    if not digest:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[mlflow.active_run().info.experiment_id], max_results=1,
        output_format="list",
        filter_string=f"tags.`synthdx.stage` = 'audit' and "
                      f"tags.`synthdx.synthetic_digest` = '{digest}'",
        order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def report_study(cfg: Config, study: OpenStudy, log: bool = True) -> ReportResult:
    """Score the study, write the report, and (``log``) record it in MLflow.

    Raises:
        TrackingUnreachable: the tracking server does not answer (the files are written).
    """
    rs = cfg.reader_study
    document = score_study(study, rs.confidence)
    json_path, html_path = write_report(document, rs.report)
    if not log:
        return ReportResult(json_path, html_path, document, None, None)
    import mlflow

    from tasks.common.tracking import log_params, stage_run

    details = study.details
    tags = {"synthdx.study_id": study.study.id,
            "synthdx.synthetic_digest": str(details.get("synthetic_digest") or ""),
            "synthdx.model_version": str(details.get("model_version") or "")}
    with stage_run(cfg.mlflow, "reader_study", tags) as run:
        audit = audit_run_id(details)
        if audit:
            mlflow.set_tag("synthdx.audit_run_id", audit)
        log_params({"reader_study": {"cases": study.study.cases, "seed": details.get("seed"),
                                     "readers": len(document["study"]["readers"]),
                                     "real_splits": details.get("real_splits"),
                                     "confidence": rs.confidence}})
        mlflow.log_metrics(headline_metrics(document))
        mlflow.log_artifact(str(json_path), "reader_study")
        mlflow.log_artifact(str(html_path), "reader_study")
    return ReportResult(json_path, html_path, document, run.info.run_id, audit)

"""The validate stage as the pipeline runs it: report files, the MLflow run, the champions.

:func:`tasks.validate.pipeline.run_validation` does the numbers and files; this module adds what
a stage process does around them: resolve paths from params, log the run (metrics, report,
plots) to MLflow nested under the pipeline's run, and register each task's best model (chosen on
internal validation AUC) in the Model Registry: as ``champion`` when it beats the current one
(tasks/validate/promotion.py), as ``challenger`` otherwise. The decisions and their reasons are
written to ``<validation.output>/promotion.json``, a section of the HTML report, MLflow tags
(``synthdx.promotion.<task>``) and the registry version's tags.

``headline_table`` is re-exported from tasks.artifacts.validation_report, where it now lives:
flows/orchestration/summary.py imports it from here.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.artifacts.classifier_folder import read_model_infos
from tasks.artifacts.promotion_report import PROMOTION_JSON, promotion_lines, write_promotion
from tasks.artifacts.validation_report import headline_table as headline_table
from tasks.common.atomic import atomic_write_text
from tasks.common.tracking import check_tracking_server, log_params, stage_run
from tasks.config import Config
from tasks.validate.champions import pick_champions, register_champions
from tasks.validate.pipeline import ValidationResult, mlflow_payload, run_validation

STAGE = "validate"


@dataclass
class ValidateSummary:
    """What the validate stage wrote and registered."""

    result: ValidationResult
    champions: dict[str, dict[str, str]] = field(default_factory=dict)
    promotion: dict[str, Any] | None = None
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def describe(self) -> str:
        """The headline table (seed-ensemble AUC per regime and site) and where things are."""
        return "\n".join([f"validate: {self.seconds:.1f} s", headline_table(self.result.report),
                          *(f"  {c.get('alias', 'champion')} {task}: {c['model_uri']} "
                            f"(version {c['version']}, {c['regime']} seed {c['seed']})"
                            for task, c in sorted(self.champions.items())),
                          *(f"  promotion {line}" for line in
                            promotion_lines(self.promotion or {})),
                          f"  report: {self.result.html_path}",
                          f"  numbers: {self.result.json_path}",
                          f"  MLflow run: {self.mlflow_run_id}"])


def champion_external(report: dict[str, Any], infos: list[dict[str, Any]]
                      ) -> dict[str, dict[str, float | None]]:
    """Mean external and internal-test AUC of every single model, keyed for the registry tags."""
    internal = {s["key"] for s in report["eval_sets"] if s["internal"]}
    out: dict[str, dict[str, float | None]] = {}
    for task, doc in report["tasks"].items():
        for model in doc["models"]:
            ext = [m["auc"] for k, m in model["sets"].items()
                   if k not in internal and m["auc"] is not None]
            test = [m["auc"] for k, m in model["sets"].items()
                    if k in internal and m["auc"] is not None]
            out[f"{task}/{model['regime']}/{model['seed']}"] = {
                "external_auc_mean": statistics.fmean(ext) if ext else None,
                "internal_test_auc": statistics.fmean(test) if test else None}
    return out


def validate_stage(cfg: Config) -> ValidateSummary:
    """Validate every trained classifier, log the run and register the champions.

    Raises:
        ValidationInputError: a missing or corrupt model folder (named in the message).
    """
    import mlflow

    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    v = cfg.validation
    root = Path(v.classifiers or cfg.classifier.output)
    started = time.perf_counter()
    result = run_validation(root, Path(v.output), v)
    infos = read_model_infos(root)
    per_model = champion_external(result.report, infos)
    with stage_run(cfg.mlflow, STAGE) as run:
        log_params({"validation": v.model_dump(mode="json"), "classifiers": str(root)})
        metrics, artifacts = mlflow_payload(result)
        items = sorted(metrics.items())
        for i in range(0, len(items), 500):
            mlflow.log_metrics(dict(items[i:i + 500]))
        reports = Path(v.output)
        for path in artifacts:
            rel = path.parent.relative_to(reports) if path.is_relative_to(reports) else Path()
            mlflow.log_artifact(str(path), artifact_path=str(rel) if str(rel) != "." else None)
        champions = register_champions(cfg, infos, external={
            info["task"]: per_model.get(f"{info['task']}/{info['regime']}/{info['seed']}", {})
            for info in _champion_infos(infos)})
        mlflow.log_dict(champions, "champions.json")
        promotion = record_promotion(cfg, champions, Path(v.output), result.html_path)
        record_drift_references(cfg, champions)
        summary = ValidateSummary(result=result, champions=champions, promotion=promotion,
                                  seconds=time.perf_counter() - started,
                                  mlflow_run_id=run.info.run_id)
        mlflow.log_metric("seconds", summary.seconds)
    return summary


def record_promotion(cfg: Config, champions: dict[str, dict[str, str]], reports: Path,
                     html_path: Path) -> dict[str, Any]:
    """Write promotion.json, tag the active run and add the decisions to the HTML report.

    When nothing was registered the file is still written, with no task and a note saying
    why: dvc.yaml declares it, and a stale file from an earlier run must not stand for this one.

    Returns:
        promotion.json's document (no task, and its note, when nothing was registered).
    """
    import mlflow

    settings = cfg.validation.promotion.model_dump(mode="json")
    if not champions:
        doc = write_promotion(reports / PROMOTION_JSON, settings, {},
                              note=_unregistered_reason(cfg))
        mlflow.log_artifact(str(reports / PROMOTION_JSON))
        return doc
    tasks = {}
    for task, entry in champions.items():
        gate = json.loads(entry["gate"])
        tasks[task] = {**gate, "name": entry["name"], "version": entry["version"],
                       "candidate": {"regime": entry["regime"], "seed": int(entry["seed"]),
                                     "run_id": entry["run_id"]},
                       "champion": ({"version": entry["previous"]} if entry["previous"]
                                    else None)}
        mlflow.set_tags({f"synthdx.promotion.{task}": entry["decision"],
                         f"synthdx.promotion.{task}.reason": entry["reason"][:4900]})
    doc = write_promotion(reports / PROMOTION_JSON, settings, tasks)
    mlflow.log_artifact(str(reports / PROMOTION_JSON))
    if html_path.is_file():
        page = html_path.read_text(encoding="utf-8")
        if "</body>" in page:
            atomic_write_text(html_path, page.replace("</body>", promotion_html(doc) + "</body>",
                                                      1))
            mlflow.log_artifact(str(html_path))
    return doc


def _unregistered_reason(cfg: Config) -> str:
    if not cfg.classifier.registered_model_prefix:
        return ("registration is off (classifier.registered_model_prefix is null): no model "
                "was registered or compared with a champion")
    return "no model was registered: no classifier folder names its MLflow training run"


def record_drift_references(cfg: Config, champions: dict[str, dict[str, str]]) -> None:
    """Record, with each newly promoted champion, the profile of the data it was trained on.

    The drift stage compares every later ingest with it (tasks/artifacts/drift_reference.py):
    an MLflow artifact folder ``drift_reference/`` of the champion's run, named by the
    version's ``drift_reference`` tag. The audit's current encoder travels with it, so later
    images are embedded in the same feature space.
    """
    import tempfile

    from mlflow import MlflowClient

    from tasks.artifacts.audit_output import ENCODER_FILE
    from tasks.artifacts.drift_reference import ARTIFACT_PATH, profile_dataset, write_reference

    client = MlflowClient(tracking_uri=cfg.mlflow.resolved_uri())
    encoder = Path(cfg.audit.output) / ENCODER_FILE
    encoder_file = encoder if encoder.is_file() else None
    profiles: dict[str, Any] = {}
    for task, entry in sorted(champions.items()):
        if entry["decision"] != "promoted":
            continue
        processed = entry["processed"]
        if processed not in profiles:
            profiles[processed] = profile_dataset(Path(processed), encoder_file)
        with tempfile.TemporaryDirectory(prefix="synthdx-reference-") as tmp:
            write_reference(Path(tmp), profiles[processed], encoder_file,
                            {"processed": processed, "task": task, "model": entry["name"],
                             "version": entry["version"],
                             "encoder": str(encoder_file) if encoder_file else None})
            client.log_artifacts(entry["run_id"], tmp, ARTIFACT_PATH)
        client.set_model_version_tag(entry["name"], entry["version"], "drift_reference",
                                     f"runs:/{entry['run_id']}/{ARTIFACT_PATH}")


def promotion_html(doc: dict[str, Any]) -> str:
    """The report's "Champion / challenger" section: each task's decision, reason and sites."""
    from html import escape

    def num(value: Any, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    s = doc["settings"]
    parts = ['<section id="promotion"><h2>Champion / challenger</h2>',
             f"<p>The best new model of each task against the registry's champion on the same "
             f"cases (paired DeLong): no site worse by more than {s['tolerance']:g} "
             f"(significant at {s['alpha']:g}), pooled AUC better by more than "
             f"{s['margin']:+g}.</p>"]
    for task, entry in sorted(doc["tasks"].items()):
        parts.append(f"<h3>{escape(task)}: {escape(entry['decision'])} "
                     f"({escape(str(entry['name']))} version {escape(str(entry['version']))})"
                     f"</h3><p>{escape(entry['reason'])}</p>")
        rows = [*entry["sites"], *([entry["pooled"]] if entry["pooled"] else [])]
        if rows:
            parts.append("<table><tr><th>set</th><th>n</th><th>AUC new</th>"
                         "<th>AUC champion</th><th>delta</th><th>p</th><th>blocks</th></tr>")
            parts += [f"<tr><td>{escape(r['site'])}</td><td>{r['n']}</td>"
                      f"<td>{num(r['auc_new'], '.3f')}</td>"
                      f"<td>{num(r['auc_champion'], '.3f')}</td>"
                      f"<td>{num(r['delta'], '+.3f')}</td><td>{num(r['p_value'], '.3g')}</td>"
                      f"<td>{'yes' if r['blocks'] else escape(r['note']) or 'no'}</td></tr>"
                      for r in rows]
            parts.append("</table>")
    return "\n".join(parts) + "</section>\n"


def _champion_infos(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return list(pick_champions(infos).values())

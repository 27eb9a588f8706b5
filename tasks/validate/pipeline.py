"""The validation stage end to end: prediction folders in, report files out (atomically).

Outputs under ``reports_dir``::

    validation.json             every number (schema: tasks/validate/validation.schema.json)
    validation_metrics.json     the key numbers for ``dvc metrics show`` / ``diff``
    validation.html             the self-contained page a clinician reads
    validation/roc/<task>_<site>.csv          regime,fpr,tpr            (dvc plots)
    validation/calibration/<task>_<site>.csv  regime,bin,mean_predicted,fraction_positive,count
    validation/calibrated/<task>_<site>.csv   the same after calibration (fitted on validation)
    validation/risk_coverage/<task>_<site>.csv  regime,threshold,coverage,risk
    validation/figures/roc_<task>_<site>.png, calibration_<task>_<site>.png (before | after),
        risk_coverage_<task>_<site>.png
    validation/calibrators/<task>_<regime>.json  the seeds' calibrators and abstention threshold
        (tasks/validate/calibrators_file.py; the registered champion carries its regime's)

The ``validation/`` folder is replaced as a whole (temporary sibling, then rename) and every file
is written through a temporary name, so a killed run never leaves a half-written report. The
JSON is checked against its schema before anything is written. No timestamp: the report is a
DVC output, and validating the same models twice gives the same bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts.validation_report import (
    HTML_FILE,
    METRICS_JSON,
    PLOTS_DIR,
    VALIDATION_JSON,
    write_report_json,
)
from tasks.common.atomic import atomic_dir, atomic_write_text
from tasks.config import ValidateConfig
from tasks.validate.assess import (
    CalibratedEnsemble,
    Ensemble,
    assess_ensembles,
    assess_models,
    calibrated_ensemble,
    ensemble,
    ordered_regimes,
)
from tasks.validate.calibration import fit_task_calibrators, validation_scores
from tasks.validate.calibrators_file import write_calibrators
from tasks.validate.clinical_checks import abstention_check, calibration_goal
from tasks.validate.compare import compare_regimes
from tasks.validate.evalsets import EvalSet, eval_sets
from tasks.validate.figures import SetFigures, write_set_figures
from tasks.validate.findings import finding_groups
from tasks.validate.html import render_html
from tasks.validate.inputs import ModelRun, TaskCases, align_task, discover_models
from tasks.validate.schema import validate_report
from tasks.validate.subgroups import Interval, subgroup_aucs

POSITIVE_RULE = "score >= threshold"
SCHEMA_VERSION = 3
"""2: no `generated` timestamp and no per-model `created` (the report is a DVC output).
3: calibrated probabilities (per-model calibrator, ``ece_calibrated``, ``brier_calibrated``,
the reliability table after calibration), abstention per ensemble and set, and the task's
``calibration_goal`` and ``abstention_check`` verdict rows (issue 17)."""
POOLED_METRICS = ("delta_auc", "delta_auc_ci_low", "delta_auc_ci_high", "p_value")
"""The pooled external comparison's numbers logged to MLflow (``<...>.pooled_external.<key>``)."""


@dataclass(frozen=True)
class ValidationResult:
    """What one validation run wrote, and the report it wrote."""

    report: dict[str, Any]
    json_path: Path
    metrics_path: Path
    html_path: Path
    plots_dir: Path
    figures: dict[tuple[str, str], SetFigures] = field(default_factory=dict)
    calibrators: list[Path] = field(default_factory=list)


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf as null, floats to 6 significant digits.

    Why round: the last digits are bootstrap and float noise; without them ``dvc metrics diff``
    and a reader see the changes that matter.
    """
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _optional_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def provenance(model: ModelRun) -> dict[str, Any]:
    """Where one model came from: its model.json fields the report shows, and a digest.

    The training stage's ``lineage`` (dataset digests, diffusion model version) and
    ``training_set`` composition are copied as they are; the SHA-256 of the predictions file
    ties the report's numbers to the exact file they were computed from.
    """
    info = model.info
    training = info.get("training_set")
    lineage = info.get("lineage")
    return {"task": model.task, "regime": model.regime, "seed": model.seed,
            "path": str(model.path), "threshold": model.threshold,
            "threshold_rule": _optional_str(info.get("threshold_rule")),
            "val_auc": _optional_number(info.get("val_auc")),
            "mlflow_run_id": _optional_str(info.get("mlflow_run_id")),
            "model_uri": _optional_str(info.get("model_uri")),
            "training_set": training if isinstance(training, dict) else {},
            "lineage": lineage if isinstance(lineage, dict) else {},
            "predictions_sha256": model.predictions_sha256}


def _subgroups(cases: TaskCases, sets: list[EvalSet], ensembles: list[Ensemble],
               cfg: ValidateConfig) -> list[dict[str, Any]]:
    interval = Interval(resamples=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    findings = finding_groups(cases.cases, cases.task)
    rows = []
    for ens in ensembles:
        for es in sets:
            keep = es.mask(cases.cases)
            part = cases.cases.loc[keep]
            local = {group: mask[keep] for group, mask in findings.items()}
            for row in subgroup_aucs(part["label"].to_numpy(), ens.scores[keep],
                                     part["sex"].to_numpy(), part["age"].to_numpy(),
                                     list(cfg.age_bands), interval=interval, findings=local):
                rows.append({"regime": ens.regime, "set": es.key, **row})
    return rows


@dataclass(frozen=True)
class TaskAssessment:
    """One task's aligned cases, evaluation sets and calibrated seed ensembles (for figures)."""

    cases: TaskCases
    sets: list[EvalSet]
    calibrated: dict[str, CalibratedEnsemble]


def assess_task(cases: TaskCases, cfg: ValidateConfig) -> tuple[dict[str, Any], TaskAssessment]:
    """Every number of one task: models, seed ensembles, comparisons, subgroups, calibration.

    Calibrators and the abstention threshold are fitted on the task's internal validation cases.
    """
    sets = eval_sets(cases.cases)
    regimes = ordered_regimes({r for r, _ in cases.scores})
    val = validation_scores(cases)
    calibrators = fit_task_calibrators(val, cfg.calibration.method)
    calibrated = {r: calibrated_ensemble(cases, r, calibrators, val, cfg.abstention.coverage)
                  for r in regimes}
    models = assess_models(cases, sets, cfg, calibrators)
    ensembles_doc = assess_ensembles(cases, sets, cfg, models, calibrated)
    pairs = [(str(a), str(b)) for a, b in cfg.comparisons]
    comparisons, skipped = compare_regimes(cases, pairs, sets, cfg.confidence,
                                           resamples=cfg.bootstrap, seed=cfg.seed)
    ensembles = [ensemble(cases, r) for r in regimes]
    doc = {"regimes": regimes, "seeds": sorted({s for _, s in cases.scores}),
           "eval_sets": [es.key for es in sets], "models": models,
           "ensembles": ensembles_doc, "comparisons": comparisons,
           "skipped_comparisons": skipped,
           "subgroups": _subgroups(cases, sets, ensembles, cfg)}
    internal = [es.key for es in sets if es.internal]
    doc["calibration_goal"] = calibration_goal(doc, internal, cfg.calibration.target_ece,
                                               cfg.calibration_bins)
    doc["abstention_check"] = abstention_check(doc, [es.key for es in sets if not es.internal],
                                               cfg.abstention.min_auc)
    return doc, TaskAssessment(cases=cases, sets=sets, calibrated=calibrated)


def build_report(models: list[ModelRun], cfg: ValidateConfig, classifiers_root: Path
                 ) -> tuple[dict[str, Any], dict[str, TaskAssessment]]:
    """The validation report (JSON-ready, schema-checked) and the aligned cases behind it."""
    tasks: dict[str, Any] = {}
    assessed: dict[str, TaskAssessment] = {}
    all_sets: dict[str, EvalSet] = {}
    for task in sorted({m.task for m in models}):
        cases = align_task([m for m in models if m.task == task])
        doc, assessment = assess_task(cases, cfg)
        tasks[task], assessed[task] = doc, assessment
        for es in assessment.sets:
            all_sets.setdefault(es.key, es)
    ordered = sorted(all_sets.values(), key=lambda s: (not s.internal, s.key))
    report = _jsonable({
        "schema_version": SCHEMA_VERSION,
        "classifiers_root": str(classifiers_root),
        "config": cfg.model_dump(mode="json"),
        "positive_rule": POSITIVE_RULE,
        "eval_sets": [es.as_dict() for es in ordered],
        "tasks": tasks,
        "provenance": [provenance(m) for m in models],
    })
    validate_report(report)
    return report, assessed


def comparison_name(with_: str, without: str) -> str:
    """Key of a comparison in the metrics files: ``<with>_vs_<without>``."""
    return f"{with_}_vs_{without}"


def dvc_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The key numbers for ``dvc metrics show``: AUC, calibrated ECE, Delta AUC per comparison.

    ``{"auc": {task: {regime: {site: auc}}}, "ece_calibrated": (same shape), "delta_auc":
    {task: {"<with>_vs_<without>": {site: delta, "external_mean": mean,
    "pooled_external": pooled}}}}``. ``pooled_external`` is
    the pooled comparison's estimate (equal to ``external_mean`` when every site is assessable,
    null when one is not). No timings, p-values or bootstrap bounds: ``dvc metrics diff`` should
    show changes of the models, not noise.
    """
    auc: dict[str, Any] = {}
    ece: dict[str, Any] = {}
    delta: dict[str, Any] = {}
    for task, doc in report["tasks"].items():
        auc[task] = {e["regime"]: {k: m["auc"] for k, m in e["sets"].items()}
                     for e in doc["ensembles"]}
        ece[task] = {e["regime"]: {k: m["ece_calibrated"] for k, m in e["sets"].items()}
                     for e in doc["ensembles"]}
        delta[task] = {}
        for comp in doc["comparisons"]:
            row = {k: d["delta_auc"] for k, d in comp["sets"].items()}
            if comp["external"] is not None:
                row["external_mean"] = comp["external"]["delta_auc_mean"]
            if comp.get("pooled") is not None:
                row["pooled_external"] = comp["pooled"]["delta_auc"]
            delta[task][comparison_name(comp["with"], comp["without"])] = row
    return {"auc": auc, "ece_calibrated": ece, "delta_auc": delta}


def mlflow_metric_name(*parts: str) -> str:
    """Join name parts with dots in the characters MLflow accepts (``+`` becomes ``_plus_``)."""
    cleaned = [re.sub(r"[^\w.\- /]", "_", p.replace("+", "_plus_")) for p in parts]
    return ".".join(cleaned)


def mlflow_payload(result: ValidationResult) -> tuple[dict[str, float], list[Path]]:
    """What the caller logs to MLflow: flat metrics and the artifact files.

    Metrics: ``<task>.<regime>.<site>.auc`` (seed ensemble) plus ``.auc_ci_low``,
    ``.auc_ci_high``, ``.sensitivity``, ``.specificity``, ``.brier``, ``.ece``,
    ``.ece_calibrated``, ``.brier_calibrated``, abstention's ``.coverage``, ``.aurc``,
    ``.accuracy_all``, ``.accuracy_accepted``, and
    ``<task>.<with>_vs_<without>.<site>.delta_auc`` / ``.p_value``,
    ``...external_mean.delta_auc`` and the pooled comparison
    ``...pooled_external.delta_auc`` / ``.delta_auc_ci_low`` / ``.delta_auc_ci_high`` /
    ``.p_value``, and per finding subgroup ``...pooled_external.<finding>.<key>``. Undefined
    numbers (None) are left out: MLflow has no null.
    """
    metrics: dict[str, float] = {}
    keys = ("auc", "auc_ci_low", "auc_ci_high", "sensitivity", "specificity", "brier", "ece",
            "ece_calibrated", "brier_calibrated")
    for task, doc in result.report["tasks"].items():
        for ens in doc["ensembles"]:
            for site, m in ens["sets"].items():
                for key in keys:
                    if m[key] is not None:
                        metrics[mlflow_metric_name(task, ens["regime"], site, key)] = m[key]
                ab = m["abstention"]
                for key, value in (("coverage", ab["coverage"]), ("aurc", ab["aurc"]),
                                   ("accuracy_all", ab["all"]["accuracy"]),
                                   ("accuracy_accepted", ab["accepted"]["accuracy"])):
                    if value is not None:
                        metrics[mlflow_metric_name(task, ens["regime"], site, key)] = value
        for comp in doc["comparisons"]:
            name = comparison_name(comp["with"], comp["without"])
            for site, d in comp["sets"].items():
                for key in ("delta_auc", "p_value", "relative_change_pct"):
                    if d[key] is not None:
                        metrics[mlflow_metric_name(task, name, site, key)] = d[key]
            ext = comp["external"]
            if ext is not None and ext["delta_auc_mean"] is not None:
                metrics[mlflow_metric_name(task, name, "external_mean", "delta_auc")] = \
                    ext["delta_auc_mean"]
            pooled = comp.get("pooled") or {}
            for key in POOLED_METRICS:
                if pooled.get(key) is not None:
                    metrics[mlflow_metric_name(task, name, "pooled_external", key)] = pooled[key]
            for finding in comp.get("findings", []):
                pooled = finding["pooled"] or {}
                for key in POOLED_METRICS:
                    if pooled.get(key) is not None:
                        metrics[mlflow_metric_name(task, name, "pooled_external",
                                                   finding["group"], key)] = pooled[key]
    artifacts = [result.json_path, result.metrics_path, result.html_path]
    for files in result.figures.values():
        artifacts += files.paths()
    return metrics, artifacts + result.calibrators


def _relocate(files: SetFigures, old: Path, new: Path) -> SetFigures:
    return SetFigures(*(new / p.relative_to(old) for p in files.paths()))


def run_validation(classifiers_root: Path, reports_dir: Path, cfg: ValidateConfig
                   ) -> ValidationResult:
    """Validate every model under ``classifiers_root`` and write the reports into ``reports_dir``.

    Raises:
        ValidationInputError: a missing or corrupt model folder (the message names the file).
        ReportSchemaError: the report does not match its schema (a bug; nothing is written).
    """
    classifiers_root, reports_dir = Path(classifiers_root), Path(reports_dir)
    models = discover_models(classifiers_root)
    report, assessed = build_report(models, cfg, classifiers_root)
    plots_dir = reports_dir / PLOTS_DIR
    figures: dict[tuple[str, str], SetFigures] = {}
    with atomic_dir(plots_dir) as tmp:
        for task, part in assessed.items():
            regimes = report["tasks"][task]["regimes"]
            ensembles = [ensemble(part.cases, r) for r in regimes]
            calibrated = [part.calibrated[r] for r in regimes]
            for es in part.sets:
                figures[(task, es.key)] = write_set_figures(
                    tmp, task, es, part.cases.labels, part.cases.cases, ensembles, calibrated,
                    cfg.calibration_bins)
        calibrators = [plots_dir / p.relative_to(tmp) for p in write_calibrators(tmp, report)]
        html = render_html(report, figures)
        figures = {k: _relocate(v, tmp, plots_dir) for k, v in figures.items()}
    metrics_path = reports_dir / METRICS_JSON
    json_path = reports_dir / VALIDATION_JSON
    html_path = reports_dir / HTML_FILE
    atomic_write_text(metrics_path, json.dumps(dvc_metrics(report), indent=2) + "\n")
    atomic_write_text(html_path, html)
    write_report_json(json_path, report)
    return ValidationResult(report=report, json_path=json_path, metrics_path=metrics_path,
                            html_path=html_path, plots_dir=plots_dir, figures=figures,
                            calibrators=calibrators)

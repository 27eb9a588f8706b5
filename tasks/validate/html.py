"""The clinician-readable report: one self-contained HTML page (reports/validation.html).

Self-contained means one file that opens anywhere, offline, and can be attached to an email or
archived with the study: CSS inline, figures embedded as base64 PNG data URIs, no scripts, no
links out. The template is ``templates/validation.html.j2`` (Jinja2, autoescaped).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from tasks.validate.figures import SetFigures
from tasks.validate.subgroups import MIN_PER_CLASS

TEMPLATE_DIR = Path(__file__).with_name("templates")
TEMPLATE = "validation.html.j2"


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}"


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f} %"


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _mean_sd(summary: Mapping[str, Any] | None, fmt: str = "num") -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    f = {"num": _num, "signed": _signed, "pct": _pct}[fmt]
    sd = summary.get("sd")
    text = f(summary["mean"])
    if sd is not None:
        text += f" ± {_num(sd) if fmt != 'pct' else f'{sd:.1f} %'}"
    return f"{text} (n={summary.get('n', 0)})"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATE_DIR)),
                      autoescape=select_autoescape(["html", "j2"], default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_num, signed=_signed, pct=_pct, pvalue=_p, mean_sd=_mean_sd)
    return env


def _subgroup_rows(task_doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Pivot the subgroup list: one row per (regime, variable, group), one cell per set."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in task_doc["subgroups"]:
        key = (item["regime"], item["variable"], item["group"])
        row = rows.setdefault(key, {"regime": key[0], "variable": key[1], "group": key[2],
                                    "cells": {}})
        row["cells"][item["set"]] = item
    order = {r: i for i, r in enumerate(task_doc["regimes"])}
    variables = {"sex": 0, "age": 1, "finding": 2}
    return sorted(rows.values(), key=lambda r: (order.get(r["regime"], 99),
                                                variables.get(r["variable"], 3)))


def _pooled_sentence(pooled: Mapping[str, Any] | None, confidence: float) -> str:
    """The pooled external comparison in words: estimate, CI, p and verdict first."""
    if not pooled:
        return ""
    sites = len(pooled["sites"])
    if pooled["delta_auc"] is None:
        return (f"Pooled over the {sites} external site(s): not assessable "
                f"({pooled['note'] or 'no estimate'}). ")
    p = _p(pooled["p_value"])
    p_text = f"p {p}" if p.startswith("<") else f"p = {p}"
    return (f"Pooled over the {sites} external site(s) (each site weighted equally), the change "
            f"in AUC was {_signed(pooled['delta_auc'])} "
            f"({confidence * 100:g} % CI {_signed(pooled['delta_auc_ci_low'])} to "
            f"{_signed(pooled['delta_auc_ci_high'])}, {p_text}), "
            f"{_pct(pooled['relative_change_pct'])} of the mean AUC without: "
            f"{pooled['verdict']}. ")


def _headline(comparison: Mapping[str, Any], confidence: float = 0.95) -> str:
    """One sentence per comparison over the external sites, in plain words.

    The pooled estimate with its interval and p comes first: it is the one number that answers
    "did it help at other hospitals?"; the per-site counts follow, because a mean can hide a
    site where it did not.
    """
    ext = comparison.get("external")
    if not ext or not ext["n_sites"]:
        return (_pooled_sentence(comparison.get("pooled"), confidence)
                + "No external site could be compared.")
    return (_pooled_sentence(comparison.get("pooled"), confidence)
            + f"At {ext['sites_better']} of {len(ext['sites'])} external sites the model with "
            f"{comparison['with']} was significantly better, at {ext['sites_worse']} "
            f"significantly worse; mean change in AUC over external sites "
            f"{_signed(ext['delta_auc_mean'])} ({_pct(ext['relative_change_pct_mean'])}; "
            f"per seed {_mean_sd(ext['seed_relative_change_pct'], 'pct')}).")


def _calibration_notes(doc: Mapping[str, Any]) -> list[str]:
    """Why a model's calibrator fell back to none (e.g. one class in validation), once each."""
    notes = []
    for model in doc["models"]:
        note = model["calibrator"]["note"]
        if note:
            notes.append(f"{model['regime']} seed {model['seed']}: {note}")
    return notes


def _abstention_lines(doc: Mapping[str, Any], sets: Mapping[str, Any]) -> list[str]:
    """The abstention check in words: one line per regime over the external sites.

    Where accepted cases are not more accurate than all cases, the sites are named: a reader
    should know where referring uncertain cases did not help.
    """
    lines = []
    by_regime: dict[str, list[Mapping[str, Any]]] = {}
    for row in doc["abstention_check"]:
        by_regime.setdefault(row["regime"], []).append(row)
    for regime, rows in by_regime.items():
        judged = [r for r in rows if r["verdict"] != "not applicable"]
        skipped = [sets[r["set"]]["site"] for r in rows if r["verdict"] == "not applicable"]
        worse = [r for r in judged if r["verdict"] == "not higher"]
        text = f"Abstention, {regime}: "
        if not judged:
            text += "not judged at any external site (AUC at most "
            text += f"{_num(rows[0]['min_auc'], 2)} or no cases)." if rows else "no sites)."
            lines.append(text)
            continue
        higher = len(judged) - len(worse)
        text += (f"accuracy on accepted cases higher than on all cases at {higher} of "
                 f"{len(judged)} external site(s) with AUC > {_num(judged[0]['min_auc'], 2)}")
        if worse:
            text += "; NOT higher at " + ", ".join(
                f"{r['set']} ({_num(r['accuracy_accepted'])} vs {_num(r['accuracy_all'])})"
                for r in worse)
        if skipped:
            text += f"; not judged at {', '.join(skipped)} (AUC at most the limit)"
        lines.append(text + ".")
    return lines


def render_html(report: Mapping[str, Any],
                figures: Mapping[tuple[str, str], SetFigures]) -> str:
    """Render the report page from the validation JSON and the figure files it refers to."""
    sets_by_key = {s["key"]: s for s in report["eval_sets"]}
    tasks = []
    for task, doc in report["tasks"].items():
        sets = [sets_by_key[k] for k in doc["eval_sets"]]
        plots = []
        for es in sets:
            files = figures.get((task, es["key"]))
            if files is not None:
                plots.append({"set": es, "roc": _data_uri(files.roc_png),
                              "calibration": _data_uri(files.calibration_png),
                              "risk_coverage": _data_uri(files.risk_coverage_png)})
        confidence = float(report["config"]["confidence"])
        comparisons = [dict(c, headline=_headline(c, confidence)) for c in doc["comparisons"]]
        tasks.append({"name": task, "doc": doc, "sets": sets, "plots": plots,
                      "comparisons": comparisons,
                      "subgroups": _subgroup_rows(doc),
                      "calibration_notes": _calibration_notes(doc),
                      "abstention_lines": _abstention_lines(doc, sets_by_key),
                      "provenance": [p for p in report["provenance"] if p["task"] == task]})
    return _environment().get_template(TEMPLATE).render(report=report, tasks=tasks,
                                                         min_per_class=MIN_PER_CLASS)

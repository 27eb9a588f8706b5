"""Score a reader study: real-vs-synthetic accuracy with CIs, Fleiss' kappa, diagnosis by origin.

Accuracy CIs are Wilson score intervals (scipy's ``binomtest``): right at the 0.5 a visual
Turing test hopes for and at the small counts of one reader. The pooled interval treats every
answer as independent, which the same case read by several readers is not; it is the figure the
published study reports, and the per-reader intervals and kappa show the spread. Fleiss' kappa
is the agreement of all readers on the cases every reader answered (statsmodels has one, but
is not a dependency of this project; the formula is a few lines, checked against Fleiss' own
worked example in the tests).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select

from tasks.reader_study.store import Answer, Case, Reader, transaction
from tasks.reader_study.study import OpenStudy


def wilson(correct: int, total: int, confidence: float) -> tuple[float, float] | None:
    """Wilson score interval of ``correct / total`` (None when there is no answer)."""
    if total == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence,
                                                            method="wilson")
    return float(ci.low), float(ci.high)


def proportion(hits: np.ndarray, confidence: float) -> dict[str, Any]:
    """Share of true values in ``hits`` with its Wilson interval."""
    n, k = int(len(hits)), int(np.sum(hits))
    ci = wilson(k, n, confidence)
    return {"n": n, "correct": k, "accuracy": k / n if n else None,
            "ci": list(ci) if ci else None}


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of a (subjects, categories) table of rater counts.

    Every subject must be rated by the same number of raters (at least two). None when the
    chance agreement is 1 (every rating in one category: kappa is undefined).

    Raises:
        ValueError: rows with different rater counts, or fewer than two raters.
    """
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(axis=1)
    if len(counts) == 0 or not np.allclose(raters, raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of raters on every subject")
    n = raters[0]
    p_j = counts.sum(axis=0) / counts.sum()
    p_i = (np.sum(counts ** 2, axis=1) - n) / (n * (n - 1))
    p_bar, p_e = float(p_i.mean()), float(np.sum(p_j ** 2))
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def answers_table(study: OpenStudy) -> tuple[pd.DataFrame, list[str]]:
    """Every answer beside its case's truth, and every reader's name (answered or not)."""
    with transaction(study.engine) as session:
        rows = session.execute(
            select(Reader.name, Answer.case_id, Answer.origin, Answer.perugini_grade,
                   Answer.metastasis, Answer.confidence, Case.origin, Case.perugini_grade,
                   Case.metastasis)
            .join(Reader, Reader.id == Answer.reader_id)
            .join(Case, Case.case_id == Answer.case_id)
            .order_by(Reader.id, Answer.answered_at)).all()
        names = list(session.scalars(select(Reader.name).order_by(Reader.id)))
    table = pd.DataFrame(rows, columns=["reader", "case_id", "said_origin", "said_grade",
                                        "said_metastasis", "confidence", "origin", "grade",
                                        "metastasis"])
    return table, names


def _diagnosis(part: pd.DataFrame, confidence: float) -> dict[str, Any]:
    positive = part["metastasis"].astype(bool).to_numpy()
    said = part["said_metastasis"].astype(bool).to_numpy()
    return {
        "answers": int(len(part)),
        "perugini_grade": proportion(part["said_grade"].to_numpy() == part["grade"].to_numpy(),
                                     confidence),
        "amyloid": proportion((part["said_grade"].to_numpy() > 0)
                              == (part["grade"].to_numpy() > 0), confidence),
        "metastasis": proportion(said == positive, confidence),
        "metastasis_sensitivity": proportion(said[positive], confidence),
        "metastasis_specificity": proportion(~said[~positive], confidence),
    }


def _turing(part: pd.DataFrame, confidence: float) -> dict[str, Any]:
    correct = part["said_origin"].to_numpy() == part["origin"].to_numpy()
    said_synthetic = part["said_origin"].to_numpy() == "synthetic"
    return {**proportion(correct, confidence),
            "said_synthetic": float(said_synthetic.mean()) if len(part) else None,
            "real_called_real": proportion(
                ~said_synthetic[part["origin"].to_numpy() == "real"], confidence),
            "synthetic_called_synthetic": proportion(
                said_synthetic[part["origin"].to_numpy() == "synthetic"], confidence),
            "mean_confidence": float(part["confidence"].mean()) if len(part) else None}


def score_study(study: OpenStudy, confidence: float) -> dict[str, Any]:
    """The report document of a study's answers so far.

    Returns:
        ``study`` (id, cases, readers, provenance), ``turing`` (pooled, per reader, Fleiss'
        kappa) and ``diagnosis`` (pooled and per reader, on real and on synthetic images).
    """
    table, names = answers_table(study)
    per_reader = {name: table[table["reader"] == name] for name in names}
    complete = table.groupby("case_id")["reader"].nunique()
    raters = [n for n, part in per_reader.items() if len(part)]
    shared = complete[complete == len(raters)].index if len(raters) >= 2 else []
    kappa = None
    if len(shared):
        votes = table[table["case_id"].isin(shared)]
        counts = pd.crosstab(votes["case_id"], votes["said_origin"]).reindex(
            columns=["real", "synthetic"], fill_value=0).to_numpy()
        kappa = fleiss_kappa(counts)
    return {
        "study": {"id": study.study.id, "cases": study.study.cases, "readers": names,
                  "answers": int(len(table)),
                  **{k: v for k, v in study.details.items() if k != "study_id"}},
        "confidence": confidence,
        "turing": {
            "pooled": _turing(table, confidence),
            "per_reader": {n: {**_turing(p, confidence), "answered": int(len(p))}
                           for n, p in per_reader.items()},
            "fleiss_kappa": {"kappa": kappa, "cases": int(len(shared)),
                             "readers": len(raters)},
        },
        "diagnosis": {
            "pooled": {o: _diagnosis(table[table["origin"] == o], confidence)
                       for o in ("real", "synthetic")},
            "per_reader": {n: {o: _diagnosis(p[p["origin"] == o], confidence)
                               for o in ("real", "synthetic")}
                           for n, p in per_reader.items()},
        },
    }


def headline_metrics(document: dict[str, Any]) -> dict[str, float]:
    """The numbers MLflow records: flat names, finite values only."""
    metrics: dict[str, float] = {}

    def put(name: str, block: dict[str, Any] | None) -> None:
        if block and block.get("accuracy") is not None:
            metrics[name] = float(block["accuracy"])
            metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = map(float, block["ci"])

    turing = document["turing"]
    put("reader_study/real_vs_synthetic_accuracy", turing["pooled"])
    for name, block in turing["per_reader"].items():
        put(f"reader_study/reader/{name}/real_vs_synthetic_accuracy", block)
    if turing["fleiss_kappa"]["kappa"] is not None:
        metrics["reader_study/fleiss_kappa"] = float(turing["fleiss_kappa"]["kappa"])
    for origin, block in document["diagnosis"]["pooled"].items():
        for what in ("perugini_grade", "amyloid", "metastasis", "metastasis_sensitivity",
                     "metastasis_specificity"):
            put(f"reader_study/diagnosis/{origin}/{what}_accuracy", block[what])
    metrics["reader_study/answers"] = float(document["study"]["answers"])
    return metrics

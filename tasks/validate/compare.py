"""Paired comparison of two training regimes on the same cases: did adding synthetic data help?

For each (with, without) pair and each evaluation set: the difference of the seed ensembles'
AUCs with DeLong's test (correlated ROC curves: the same cases scored by both), its relative
size in percent of the AUC without (how the published study reports it, e.g. "+33 +- 10 %"),
and the per-seed differences, seeds paired by seed value, as mean +- sd. Over all external
sites together: one pooled Delta AUC with a paired, patient-clustered bootstrap CI
(:mod:`tasks.validate.pooled`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.validate.assess import ensemble, mean_sd, stable_seed
from tasks.validate.delong import delong_test
from tasks.validate.evalsets import EvalSet
from tasks.validate.findings import finding_groups
from tasks.validate.inputs import TaskCases
from tasks.validate.metrics import auc
from tasks.validate.pooled import SiteScores, cluster_index, pooled_comparison
from tasks.validate.verdicts import (
    BETTER,
    NO_DIFFERENCE,
    NOT_ASSESSABLE,
    VERDICTS,
    WORSE,
    relative_pct,
    verdict,
)

__all__ = ["BETTER", "NO_DIFFERENCE", "NOT_ASSESSABLE", "VERDICTS", "WORSE", "compare_on_set",
           "compare_regimes", "external_summary", "pooled_external", "relative_pct", "verdict"]


def _per_seed(cases: TaskCases, with_: str, without: str, seeds: list[int],
              keep: np.ndarray) -> list[dict[str, Any]]:
    y = cases.labels[keep]
    rows = []
    for seed in seeds:
        a = auc(y, cases.scores[(with_, seed)][keep])
        b = auc(y, cases.scores[(without, seed)][keep])
        delta = a - b if a is not None and b is not None else None
        rows.append({"seed": seed, "auc_with": a, "auc_without": b, "delta_auc": delta,
                     "relative_change_pct": relative_pct(delta, b)})
    return rows


def compare_on_set(cases: TaskCases, with_: str, without: str, es: EvalSet,
                   confidence: float) -> dict[str, Any]:
    """Ensemble DeLong comparison plus per-seed differences of one regime pair on one set."""
    keep = es.mask(cases.cases)
    y = cases.labels[keep]
    ens_with, ens_without = ensemble(cases, with_), ensemble(cases, without)
    seeds = sorted(set(ens_with.seeds) & set(ens_without.seeds))
    per_seed = _per_seed(cases, with_, without, seeds, keep)
    doc: dict[str, Any] = {
        "n": int(y.size), "positives": int(y.sum()),
        "auc_with": auc(y, ens_with.scores[keep]),
        "auc_without": auc(y, ens_without.scores[keep]),
        "delta_auc": None, "delta_ci_low": None, "delta_ci_high": None, "se": None,
        "z": None, "p_value": None, "relative_change_pct": None, "note": None,
    }
    try:
        test = delong_test(y, ens_with.scores[keep], ens_without.scores[keep], confidence)
    except ValueError as exc:
        doc["note"] = f"DeLong test not possible: {exc}"
    else:
        doc.update(delta_auc=test.delta, delta_ci_low=test.ci_low, delta_ci_high=test.ci_high,
                   se=test.se, z=test.z if np.isfinite(test.z) else None,
                   p_value=test.p_value,
                   relative_change_pct=relative_pct(test.delta, test.auc_b))
    doc["verdict"] = verdict(doc["delta_auc"], doc["p_value"], 1.0 - confidence)
    doc["seed_delta_auc"] = mean_sd([r["delta_auc"] for r in per_seed])
    doc["seed_relative_change_pct"] = mean_sd([r["relative_change_pct"] for r in per_seed])
    doc["per_seed"] = per_seed
    return doc


def external_summary(per_set: dict[str, dict[str, Any]], sets: list[EvalSet]
                     ) -> dict[str, Any] | None:
    """Mean over external sites: ensemble Delta AUC and relative change, sites by verdict.

    ``seed_relative_change_pct`` first averages each seed's relative change over the external
    sites, then takes mean +- sd over seeds: the spread a reader should judge the mean against.
    """
    external = [es.key for es in sets if not es.internal]
    if not external:
        return None
    docs = [per_set[k] for k in external if per_set[k]["delta_auc"] is not None]
    by_seed: dict[int, list[float]] = {}
    by_seed_delta: dict[int, list[float]] = {}
    for key in external:
        for row in per_set[key]["per_seed"]:
            if row["relative_change_pct"] is not None:
                by_seed.setdefault(row["seed"], []).append(row["relative_change_pct"])
            if row["delta_auc"] is not None:
                by_seed_delta.setdefault(row["seed"], []).append(row["delta_auc"])
    delta = mean_sd([d["delta_auc"] for d in docs])
    rel = mean_sd([d["relative_change_pct"] for d in docs])
    verdicts = [per_set[k]["verdict"] for k in external]
    return {
        "sites": external, "n_sites": delta["n"],
        "delta_auc_mean": delta["mean"], "delta_auc_sd": delta["sd"],
        "relative_change_pct_mean": rel["mean"], "relative_change_pct_sd": rel["sd"],
        "sites_better": verdicts.count(BETTER), "sites_worse": verdicts.count(WORSE),
        "sites_no_difference": verdicts.count(NO_DIFFERENCE),
        "seed_delta_auc": mean_sd([float(np.mean(v)) for v in by_seed_delta.values()]),
        "seed_relative_change_pct": mean_sd([float(np.mean(v)) for v in by_seed.values()]),
    }


def pooled_external(cases: TaskCases, with_: str, without: str, sets: list[EvalSet], *,
                    confidence: float, resamples: int, seed: int,
                    subset: np.ndarray | None = None) -> dict[str, Any] | None:
    """The pooled comparison over every external set of one regime pair (``None`` if none).

    The seed ensembles are the same as the per-site comparison's, so the pooled estimate is
    exactly the mean of the per-site ``delta_auc`` values. ``subset`` (a case mask) restricts
    every site to those cases: a finding subgroup's positives and all negatives.
    """
    external = [es for es in sets if not es.internal]
    if not external:
        return None
    ens_with, ens_without = ensemble(cases, with_), ensemble(cases, without)
    clusters, clustered = cluster_index(cases.cases)
    y = cases.labels
    sites = []
    for es in external:
        keep = es.mask(cases.cases)
        if subset is not None:
            keep = keep & subset
        _, local = np.unique(clusters[keep], return_inverse=True)
        sites.append(SiteScores(key=es.key, labels=y[keep], scores_with=ens_with.scores[keep],
                                scores_without=ens_without.scores[keep],
                                clusters=local.astype(np.int64)))
    return pooled_comparison(sites, resamples=resamples, confidence=confidence, seed=seed,
                             clustered=clustered)


def compare_regimes(cases: TaskCases, pairs: list[tuple[str, str]], sets: list[EvalSet],
                    confidence: float, *, resamples: int = 1000, seed: int = 0
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every configured (with, without) pair present for this task.

    Args:
        cases: the task's aligned cases and scores.
        pairs: (with, without) regime names.
        sets: the evaluation sets (internal first, then external).
        confidence: level of every interval; the verdicts' alpha is ``1 - confidence``.
        resamples: bootstrap resamples of the pooled external comparison.
        seed: base seed of that bootstrap (each task and pair derives its own from it).

    Returns:
        ``(comparisons, skipped)``: a pair with a regime absent from the task's models is
        listed in ``skipped`` with the reason, not silently dropped.
    """
    present = {r for r, _ in cases.scores}
    done, skipped = [], []
    for with_, without in pairs:
        missing = [r for r in (with_, without) if r not in present]
        if missing:
            skipped.append({"with": with_, "without": without,
                            "reason": "no model of regime " + " or ".join(missing)})
            continue
        per_set = {es.key: compare_on_set(cases, with_, without, es, confidence)
                   for es in sets}
        seeds = sorted({s for r, s in cases.scores if r == with_}
                       & {s for r, s in cases.scores if r == without})
        pooled = pooled_external(
            cases, with_, without, sets, confidence=confidence, resamples=resamples,
            seed=stable_seed(seed, cases.task, with_, without, "pooled_external"))
        done.append({"with": with_, "without": without, "paired_seeds": seeds,
                     "sets": per_set, "external": external_summary(per_set, sets),
                     "pooled": pooled,
                     "findings": finding_comparisons(cases, with_, without, sets,
                                                     confidence=confidence,
                                                     resamples=resamples, seed=seed)})
    return done, skipped


def finding_comparisons(cases: TaskCases, with_: str, without: str, sets: list[EvalSet], *,
                        confidence: float, resamples: int, seed: int) -> list[dict[str, Any]]:
    """The pooled external comparison within each finding subgroup of the task.

    Why: enriching the synthetic set in a rare finding (Perugini 3, superscans) is meant to
    help that finding, and the task-level Delta AUC hides it (few such positives). Each
    finding's positives are scored against all negatives of every external site; a site with
    fewer than two such positives makes the finding not assessable (the report says so).
    """
    external = [es for es in sets if not es.internal]
    out = []
    for group, mask in finding_groups(cases.cases, cases.task).items():
        positives = {es.key: int((cases.labels[es.mask(cases.cases) & mask] == 1).sum())
                     for es in external}
        pooled = pooled_external(
            cases, with_, without, sets, confidence=confidence, resamples=resamples,
            seed=stable_seed(seed, cases.task, with_, without, "finding", group), subset=mask)
        out.append({"group": group, "external_positives": positives, "pooled": pooled})
    return out

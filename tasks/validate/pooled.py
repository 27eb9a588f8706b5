"""One pooled comparison of two regimes over all external sites, with a paired 95 % CI.

The per-site DeLong tests say where adding synthetic data helped; a reader (and the published
study: "+33 +- 10 % over four sites") also wants one number for "external sites in general" with
its uncertainty. Estimand: the mean over external sites of each site's seed-ensemble
Delta AUC (AUC with minus AUC without), sites weighted equally. Why not one AUC over the pooled
scores: every camera and population shifts the score distribution, and an AUC over mixed sites
rewards or punishes that shift (a positive from a "hot" site out-ranks a negative from a "cold"
one) instead of measuring discrimination within a site.

Two intervals, because they rest on different assumptions:

- bootstrap (the reported ``delta_auc_ci_*``): patients are resampled with replacement within
  each site (sites are the strata, the patient pseudonym ``pseudo_id`` the cluster: all studies
  of a patient move together, since they are not independent); every site's Delta AUC is
  recomputed on the same resample for both regimes (paired) and averaged over sites; percentile
  interval. A resample in which a site has no positive or no negative study is redrawn for that
  site and counted (``bootstrap_redrawn``). When the case table has no patient column, each case
  is its own cluster (studies resampled independently) and the method sentence says so.
- DeLong fixed effect (``delong_ci_*`` and the p-value): sites are independent samples, so the
  variance of the mean is ``sum(var_k) / K**2`` from the per-site DeLong variances;
  ``z = mean / se``. It treats studies as independent, hence the bootstrap is the headline CI and
  this one the cross-check.

The verdict uses the DeLong p-value, like the per-site verdicts. ``relative_change_pct`` is the
pooled Delta AUC in percent of the mean AUC without over the same sites (the ratio of the two
means, so that it matches ``delta_auc``; the per-site relative changes are averaged in
``external.relative_change_pct_mean``). Why hand-written: no maintained
library computes a clustered, stratified, paired bootstrap of a mean of AUC differences; the
resamples are vectorised as per-case weights (how often the case's patient was drawn), so one
sort per site and regime serves all resamples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from tasks.validate.delong import delong_test
from tasks.validate.verdicts import NOT_ASSESSABLE, relative_pct, verdict

CLUSTER_COLUMN = "pseudo_id"
MAX_ROUNDS = 50
"""Redraw rounds per site before giving up on resamples with both classes (a site this short of
one class is already refused by the DeLong check; this bounds a pathological loop)."""
CHUNK_ELEMENTS = 4_000_000
"""Resamples x cases held in memory at once (about 16 MB per int32 array)."""


@dataclass(frozen=True)
class SiteScores:
    """One external site's cases: labels, both regimes' ensemble scores, patient clusters.

    ``clusters`` holds, per case, the index of its patient in ``0..n_clusters-1``.
    """

    key: str
    labels: np.ndarray
    scores_with: np.ndarray
    scores_without: np.ndarray
    clusters: np.ndarray

    @property
    def n_clusters(self) -> int:
        """Number of distinct patients (resampling units) at the site."""
        return int(self.clusters.max()) + 1 if self.clusters.size else 0


def cluster_index(cases: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """Per case, the index of its patient; ``(indices, True)``, or one cluster per case.

    Returns ``(np.arange(n), False)`` when the table has no :data:`CLUSTER_COLUMN`. A case with
    an empty or missing pseudonym is a cluster of its own: lumping every such case into one
    "patient" would make the bootstrap move them all together.
    """
    if CLUSTER_COLUMN not in cases.columns:
        return np.arange(len(cases)), False
    column = cases[CLUSTER_COLUMN]
    ids = column.astype(str).to_numpy(dtype=object)
    unknown = column.isna().to_numpy() | np.isin(ids, ["", "nan", "None", "<NA>"])
    ids[unknown] = [f"\0case{i}" for i in np.flatnonzero(unknown)]
    _, inverse = np.unique(ids.astype(str), return_inverse=True)
    return inverse.astype(np.int64), True


def weighted_aucs(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC (Mann-Whitney, ties one half) of one score vector under many case weightings.

    Args:
        labels: shape (N,), 0/1.
        scores: shape (N,).
        weights: shape (B, N); row ``b`` is how often each case occurs in resample ``b``.

    Returns:
        shape (B,); NaN where a row has no positive or no negative weight.

    Why weights: a bootstrap resample is the original cases with multiplicities, so one sort of
    the scores and one cumulative sum of the negatives' weights give, for every positive, the
    weight of negatives scored below it (ties half: the mean of "below" and "below or tied"),
    for all resamples at once: O(B N) instead of B sorts.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    is_pos = labels[order].astype(bool)
    new_group = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], s.size]
    group = (np.cumsum(new_group) - 1)[is_pos]
    neg_before = np.r_[0, np.cumsum(~is_pos)]          # negatives among the first i sorted cases
    w = weights[:, order]
    w_pos, w_neg = w[:, is_pos], w[:, ~is_pos]
    neg_cum = np.zeros((w.shape[0], w_neg.shape[1] + 1), dtype=np.result_type(w, np.int64))
    np.cumsum(w_neg, axis=1, out=neg_cum[:, 1:])
    below = neg_cum[:, neg_before[starts[group]]]      # negatives scored strictly lower
    not_above = neg_cum[:, neg_before[ends[group]]]    # ... lower or tied
    wins = 0.5 * np.sum(w_pos * (below + not_above), axis=1)
    pairs = w_pos.sum(axis=1) * neg_cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)


def _draw_counts(rng: np.random.Generator, n_clusters: int, resamples: int) -> np.ndarray:
    """How often each patient is drawn in each resample: shape (resamples, n_clusters).

    Integers (int32): the weighted AUC is then exact integer arithmetic until the last division,
    and the arrays are half the size of float64 ones.
    """
    picks = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    flat = picks + (np.arange(resamples)[:, None] * n_clusters)
    return np.bincount(flat.ravel(), minlength=resamples * n_clusters).reshape(
        resamples, n_clusters).astype(np.int32)


def site_bootstrap_deltas(site: SiteScores, resamples: int, rng: np.random.Generator
                          ) -> tuple[np.ndarray, int]:
    """Delta AUC (with - without) of one site on ``resamples`` patient resamples.

    Returns:
        ``(deltas, redrawn)``: ``deltas`` has ``resamples`` entries unless a site kept drawing
        one-class resamples for :data:`MAX_ROUNDS` rounds (then fewer); ``redrawn`` counts the
        one-class resamples that were replaced.
    """
    y = site.labels.astype(bool)
    k = site.n_clusters
    pos_per_cluster = np.bincount(site.clusters[y], minlength=k)
    neg_per_cluster = np.bincount(site.clusters[~y], minlength=k)
    kept: list[np.ndarray] = []
    need, redrawn = resamples, 0
    for _ in range(MAX_ROUNDS):
        if need <= 0:
            break
        counts = _draw_counts(rng, k, need)
        ok = (counts @ pos_per_cluster > 0) & (counts @ neg_per_cluster > 0)
        kept.append(counts[ok])
        redrawn += int(np.sum(~ok))
        need -= int(np.sum(ok))
    counts = np.concatenate(kept) if kept else np.empty((0, k), dtype=np.int32)
    chunk = max(1, CHUNK_ELEMENTS // max(site.labels.size, 1))
    deltas = []
    for start in range(0, counts.shape[0], chunk):
        weights = counts[start:start + chunk][:, site.clusters]
        deltas.append(weighted_aucs(site.labels, site.scores_with, weights)
                      - weighted_aucs(site.labels, site.scores_without, weights))
    return (np.concatenate(deltas) if deltas else np.empty(0)), redrawn


def fixed_effect(deltas: list[float], variances: list[float], confidence: float
                 ) -> tuple[float, float, float, float]:
    """Mean of independent per-site differences, its two-sided p and normal CI.

    ``var(mean) = sum(var_k) / K**2``; with zero variance p is 1 for a zero mean (identical
    scores everywhere, as :func:`~tasks.validate.delong.delong_test` does) and 0 otherwise.

    Returns:
        ``(mean, p_value, ci_low, ci_high)``.
    """
    mean = float(np.mean(deltas))
    se = math.sqrt(float(np.sum(variances))) / len(deltas)
    zero_se_p = 1.0 if mean == 0 else 0.0
    p = float(2.0 * stats.norm.sf(abs(mean / se))) if se > 0 else zero_se_p
    half = float(stats.norm.ppf(0.5 + confidence / 2.0)) * se
    return mean, p, mean - half, mean + half


def _method(n_sites: int, resamples: int, confidence: float, clustered: bool) -> str:
    unit = ("patients (all studies of a pseudonym together)" if clustered
            else "studies (no patient column in the predictions)")
    return (f"Mean over {n_sites} external site(s) of the seed-ensemble Delta AUC, sites "
            f"weighted equally; {confidence * 100:g} % CI: percentile bootstrap of {resamples} "
            f"paired resamples of {unit} within each site; p: fixed-effect combination of the "
            "per-site DeLong tests.")


def _empty(sites: list[SiteScores], resamples: int, confidence: float, clustered: bool,
           note: str) -> dict[str, Any]:
    return {"sites": [s.key for s in sites],
            "n": int(sum(s.labels.size for s in sites)),
            "positives": int(sum(int(s.labels.sum()) for s in sites)),
            "patients": int(sum(s.n_clusters for s in sites)),
            "delta_auc": None, "delta_auc_ci_low": None, "delta_auc_ci_high": None,
            "p_value": None, "relative_change_pct": None,
            "delong_ci_low": None, "delong_ci_high": None,
            "bootstrap": 0, "bootstrap_redrawn": 0,
            "method": _method(len(sites), resamples, confidence, clustered),
            "verdict": NOT_ASSESSABLE, "note": note}


def pooled_comparison(sites: list[SiteScores], *, resamples: int, confidence: float, seed: int,
                      clustered: bool = True) -> dict[str, Any] | None:
    """The pooled external comparison of one regime pair (the ``pooled`` object of the report).

    Args:
        sites: the external sites, in report order; an empty list gives ``None``.
        resamples: bootstrap resamples (``validation.bootstrap``).
        confidence: level of both intervals; the verdict's alpha is ``1 - confidence``.
        seed: seeds the bootstrap (derived from ``validation.seed``).
        clustered: whether ``sites[k].clusters`` are patients (only changes the method text).

    Returns:
        The JSON-ready dict; numbers ``None`` and verdict ``not assessable`` (with a ``note``)
        when a site lacks two cases of a class or a bootstrap could not be drawn.
    """
    if not sites:
        return None
    tests = []
    for site in sites:
        try:
            tests.append(delong_test(site.labels, site.scores_with, site.scores_without,
                                     confidence))
        except ValueError as exc:
            return _empty(sites, resamples, confidence, clustered,
                          f"site {site.key} cannot be assessed: {exc}")
    delta, p, delong_low, delong_high = fixed_effect([t.delta for t in tests],
                                                     [t.variance for t in tests], confidence)
    rng = np.random.default_rng(seed)
    per_site, redrawn = [], 0
    for site in sites:
        deltas, extra = site_bootstrap_deltas(site, resamples, rng)
        per_site.append(deltas)
        redrawn += extra
    used = min(d.size for d in per_site)
    if used == 0:
        return _empty(sites, resamples, confidence, clustered,
                      "no bootstrap resample had both classes at every site")
    pooled = np.mean([d[:used] for d in per_site], axis=0)
    alpha = 1.0 - confidence
    low, high = np.quantile(pooled, [alpha / 2.0, 1.0 - alpha / 2.0])
    short = (f"only {used} of {resamples} resamples had both classes at every site"
             if used < resamples else None)
    doc = _empty(sites, used, confidence, clustered, "")
    doc.update(delta_auc=delta, delta_auc_ci_low=float(low), delta_auc_ci_high=float(high),
               p_value=p,
               relative_change_pct=relative_pct(delta, float(np.mean([t.auc_b for t in tests]))),
               delong_ci_low=delong_low, delong_ci_high=delong_high,
               bootstrap=int(used), bootstrap_redrawn=int(redrawn),
               verdict=verdict(delta, p, alpha), note=short)
    return doc

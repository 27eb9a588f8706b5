"""The pooled comparison over external sites: estimate, paired clustered bootstrap, DeLong p.

Real behaviour on simulated scores with a known truth: binormal scores whose AUC is
``Phi(d / sqrt 2)`` exactly, so the true Delta AUC of a simulated pair of models is known.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from tasks.validate.compare import compare_regimes, pooled_external
from tasks.validate.delong import delong_test
from tasks.validate.evalsets import eval_sets
from tasks.validate.inputs import TaskCases
from tasks.validate.pooled import (
    SiteScores,
    cluster_index,
    fixed_effect,
    pooled_comparison,
    weighted_aucs,
)


def separation(auc: float) -> float:
    """Binormal separation ``d`` (unit-variance classes) whose AUC is ``auc``."""
    return math.sqrt(2.0) * float(stats.norm.ppf(auc))


def simulated_site(rng: np.random.Generator, key: str, n: int, auc_with: float,
                   auc_without: float, *, prevalence: float = 0.3, shift: float = 0.0,
                   rho: float = 0.6) -> SiteScores:
    """One site: two models' scores on the same cases, noise correlated ``rho`` between models.

    ``shift`` moves every score of the site (another camera): it must not change the result.
    """
    y = (rng.random(n) < prevalence).astype(np.int64)
    shared = rng.normal(size=n)
    noise_a = rho * shared + math.sqrt(1 - rho**2) * rng.normal(size=n)
    noise_b = rho * shared + math.sqrt(1 - rho**2) * rng.normal(size=n)
    return SiteScores(key=key, labels=y,
                      scores_with=y * separation(auc_with) + noise_a + shift,
                      scores_without=y * separation(auc_without) + noise_b + shift,
                      clusters=np.arange(n))


def four_sites(seed: int, gain: float) -> list[SiteScores]:
    """Four external sites of 400 cases; the with-model's true AUC is higher by ``gain``."""
    rng = np.random.default_rng(seed)
    base = {"alpine": 0.74, "coastal": 0.78, "northgate": 0.72, "riverside": 0.76}
    shifts = {"alpine": -1.0, "coastal": 0.0, "northgate": 2.0, "riverside": 0.5}
    prevalence = {"alpine": 0.2, "coastal": 0.3, "northgate": 0.4, "riverside": 0.25}
    return [simulated_site(rng, k, 400, auc + gain, auc, prevalence=prevalence[k],
                           shift=shifts[k]) for k, auc in base.items()]


def test_weighted_auc_equals_sklearn_on_the_repeated_cases_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 250)
    s = np.round(rng.normal(size=250) + y, 1)  # many ties, across classes too
    w = rng.integers(0, 4, size=(6, 250))
    got = weighted_aucs(y, s, w)
    for row, value in zip(w, got, strict=True):
        assert value == pytest.approx(roc_auc_score(np.repeat(y, row), np.repeat(s, row)),
                                      abs=1e-12)
    only_negatives = np.where(y == 1, 0, 1)[None, :]
    assert np.isnan(weighted_aucs(y, s, only_negatives))[0]


def test_known_difference_is_covered_and_zero_excluded() -> None:
    sites = four_sites(11, gain=0.05)
    pooled = pooled_comparison(sites, resamples=1000, confidence=0.95, seed=5)
    assert pooled is not None
    per_site = [delong_test(s.labels, s.scores_with, s.scores_without).delta for s in sites]
    assert pooled["delta_auc"] == pytest.approx(np.mean(per_site))
    assert pooled["delta_auc_ci_low"] < 0.05 < pooled["delta_auc_ci_high"]
    assert pooled["delta_auc_ci_low"] > 0
    assert pooled["delong_ci_low"] < 0.05 < pooled["delong_ci_high"]
    assert pooled["p_value"] < 0.01 and pooled["verdict"] == "better"
    assert pooled["bootstrap"] == 1000 and pooled["bootstrap_redrawn"] == 0
    assert pooled["sites"] == ["alpine", "coastal", "northgate", "riverside"]
    assert pooled["n"] == 1600
    # the two intervals answer the same question: their widths agree within a third
    boot = pooled["delta_auc_ci_high"] - pooled["delta_auc_ci_low"]
    normal = pooled["delong_ci_high"] - pooled["delong_ci_low"]
    assert 0.67 < boot / normal < 1.5


def test_site_score_shifts_do_not_move_the_pooled_estimate() -> None:
    """Sites are compared within themselves: a camera's offset cannot leak into the estimate."""
    sites = four_sites(11, gain=0.05)
    moved = [SiteScores(s.key, s.labels, s.scores_with + 5.0 * i, s.scores_without - 3.0 * i,
                        s.clusters) for i, s in enumerate(sites)]
    a = pooled_comparison(sites, resamples=200, confidence=0.95, seed=5)
    b = pooled_comparison(moved, resamples=200, confidence=0.95, seed=5)
    assert a is not None and b is not None
    for key in ("delta_auc", "delta_auc_ci_low", "delta_auc_ci_high", "p_value"):
        assert b[key] == pytest.approx(a[key], abs=1e-12)


def test_identical_scores_give_zero_and_a_high_p() -> None:
    sites = [SiteScores(s.key, s.labels, s.scores_with, s.scores_with.copy(), s.clusters)
             for s in four_sites(2, gain=0.0)]
    pooled = pooled_comparison(sites, resamples=500, confidence=0.95, seed=1)
    assert pooled is not None
    assert pooled["delta_auc"] == 0.0
    # paired: the same resample for both models, so every resampled difference is exactly 0
    assert pooled["delta_auc_ci_low"] == 0.0 == pooled["delta_auc_ci_high"]
    assert pooled["p_value"] == 1.0 and pooled["verdict"] == "no significant difference"


def test_equally_good_models_cover_zero() -> None:
    pooled = pooled_comparison(four_sites(21, gain=0.0), resamples=1000, confidence=0.95,
                               seed=2)
    assert pooled is not None
    assert pooled["delta_auc_ci_low"] < 0 < pooled["delta_auc_ci_high"]
    assert pooled["delong_ci_low"] < 0 < pooled["delong_ci_high"]
    assert pooled["p_value"] > 0.2 and pooled["verdict"] == "no significant difference"


def test_interval_covers_the_truth_in_about_95_percent_of_studies() -> None:
    """Coverage over repeated simulated studies (two sites of 300 cases, true gain 0.04)."""
    covered = 0
    reps = 60
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        sites = [simulated_site(rng, k, 300, 0.80, 0.76) for k in ("a", "b")]
        pooled = pooled_comparison(sites, resamples=400, confidence=0.95, seed=rep)
        assert pooled is not None
        covered += pooled["delta_auc_ci_low"] <= 0.04 <= pooled["delta_auc_ci_high"]
    assert covered / reps >= 0.85


def _patients(seed: int, n_patients: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Two sites, one study per patient: (labels, scores with, scores without) per site."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        s = simulated_site(rng, "x", n_patients, 0.80, 0.76)
        out.append((s.labels, s.scores_with, s.scores_without))
    return out


def test_studies_of_one_patient_are_resampled_together() -> None:
    """Each patient read five times (identical studies): the evidence is that of one study.

    Resampled by patient, the weighted AUC of a resample is exactly the one-study-per-patient
    resample's AUC, so the interval is identical; studies resampled one by one would treat the
    five copies as independent and give an interval about sqrt(5) times narrower.
    """
    copies = 5
    data = _patients(8, 200)
    single = [SiteScores(f"s{i}", y, a, b, np.arange(y.size)) for i, (y, a, b) in enumerate(data)]
    clustered = [SiteScores(f"s{i}", np.repeat(y, copies), np.repeat(a, copies),
                            np.repeat(b, copies), np.repeat(np.arange(y.size), copies))
                 for i, (y, a, b) in enumerate(data)]
    split = [SiteScores(s.key, s.labels, s.scores_with, s.scores_without,
                        np.arange(s.labels.size)) for s in clustered]
    kwargs = {"resamples": 500, "confidence": 0.95, "seed": 4}
    one, many, apart = (pooled_comparison(x, **kwargs) for x in (single, clustered, split))
    assert one is not None and many is not None and apart is not None
    assert many["patients"] == one["patients"] == 400 and many["n"] == 2000
    assert many["delta_auc"] == pytest.approx(one["delta_auc"])
    assert many["delta_auc_ci_low"] == pytest.approx(one["delta_auc_ci_low"], abs=1e-12)
    assert many["delta_auc_ci_high"] == pytest.approx(one["delta_auc_ci_high"], abs=1e-12)
    width = many["delta_auc_ci_high"] - many["delta_auc_ci_low"]
    assert apart["delta_auc_ci_high"] - apart["delta_auc_ci_low"] < 0.7 * width


def _task_cases(sites: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]],
                ) -> TaskCases:
    """A TaskCases of external sites only: per site labels, two regimes' scores, pseudonyms."""
    frames, with_, without = [], [], []
    for site, (y, a, b, pids) in sites.items():
        frames.append(pd.DataFrame({"study_uid": [f"{site}.{i}" for i in range(y.size)],
                                    "pseudo_id": pids, "site": site, "split": "external",
                                    "sex": "F", "age": 70.0, "label": y}))
        with_.append(a)
        without.append(b)
    cases = pd.concat(frames, ignore_index=True)
    scores = {("real_limited+synthetic", 0): 1 / (1 + np.exp(-np.concatenate(with_))),
              ("real_limited", 0): 1 / (1 + np.exp(-np.concatenate(without)))}
    return TaskCases(task="metastasis", cases=cases, scores=scores,
                     thresholds={k: 0.5 for k in scores}, models={})


def test_the_report_resamples_by_the_pseudonym_column() -> None:
    copies = 4
    data = _patients(9, 150)
    single = _task_cases({f"site{i}": (y, a, b, [f"P{i}-{j:04d}" for j in range(y.size)])
                          for i, (y, a, b) in enumerate(data)})
    repeated = _task_cases({f"site{i}": (np.repeat(y, copies), np.repeat(a, copies),
                                         np.repeat(b, copies),
                                         [f"P{i}-{j:04d}" for j in range(y.size)
                                          for _ in range(copies)])
                            for i, (y, a, b) in enumerate(data)})
    args = ("real_limited+synthetic", "real_limited")
    kwargs = {"confidence": 0.95, "resamples": 300, "seed": 17}
    one = pooled_external(single, *args, eval_sets(single.cases), **kwargs)
    many = pooled_external(repeated, *args, eval_sets(repeated.cases), **kwargs)
    assert one is not None and many is not None
    assert many["patients"] == 300 and many["n"] == 1200 and "pseudonym" in many["method"]
    assert many["delta_auc_ci_low"] == pytest.approx(one["delta_auc_ci_low"], abs=1e-12)
    assert many["delta_auc_ci_high"] == pytest.approx(one["delta_auc_ci_high"], abs=1e-12)


def test_missing_pseudonyms_are_clusters_of_their_own() -> None:
    cases = pd.DataFrame({"pseudo_id": ["a", "b", "a", None, "", "nan", "b"]})
    index, clustered = cluster_index(cases)
    assert clustered
    assert index[0] == index[2] and index[1] == index[6]
    assert len(set(index[[3, 4, 5]].tolist())) == 3
    assert len(set(index.tolist())) == 5
    no_column, clustered = cluster_index(pd.DataFrame({"study_uid": ["x", "y"]}))
    assert not clustered and no_column.tolist() == [0, 1]


def test_site_with_one_class_is_not_assessable_not_a_crash() -> None:
    rng = np.random.default_rng(5)
    good = simulated_site(rng, "alpine", 200, 0.8, 0.75)
    bad = simulated_site(rng, "coastal", 200, 0.8, 0.75)
    bad = SiteScores(bad.key, np.zeros_like(bad.labels), bad.scores_with, bad.scores_without,
                     bad.clusters)
    pooled = pooled_comparison([good, bad], resamples=200, confidence=0.95, seed=0)
    assert pooled is not None
    assert pooled["verdict"] == "not assessable" and pooled["delta_auc"] is None
    assert pooled["p_value"] is None and pooled["delta_auc_ci_low"] is None
    assert "coastal" in pooled["note"] and pooled["bootstrap"] == 0
    cases = _task_cases({s.key: (s.labels, s.scores_with, s.scores_without,
                                 [f"{s.key}{i}" for i in range(s.labels.size)])
                         for s in (good, bad)})
    comps, _ = compare_regimes(cases, [("real_limited+synthetic", "real_limited")],
                               eval_sets(cases.cases), 0.95, resamples=100, seed=1)
    assert comps[0]["pooled"]["verdict"] == "not assessable"
    assert comps[0]["sets"]["coastal"]["verdict"] == "not assessable"


def test_no_external_site_gives_null() -> None:
    assert pooled_comparison([], resamples=100, confidence=0.95, seed=0) is None


def test_one_class_resamples_are_redrawn_and_counted() -> None:
    """A site with 3 positive patients of 60: about 5 % of resamples draw none of them."""
    rng = np.random.default_rng(6)
    y = np.zeros(60, dtype=np.int64)
    y[:3] = 1
    site = SiteScores("tiny", y, y + rng.normal(size=60), y * 0.5 + rng.normal(size=60),
                      np.arange(60))
    pooled = pooled_comparison([site], resamples=1000, confidence=0.95, seed=3)
    assert pooled is not None
    assert pooled["bootstrap"] == 1000 and pooled["bootstrap_redrawn"] > 10
    assert pooled["delta_auc_ci_low"] is not None


def test_fixed_effect_combines_independent_sites() -> None:
    mean, p, low, high = fixed_effect([0.04, 0.06], [0.02**2, 0.02**2], 0.95)
    se = math.sqrt(2 * 0.02**2) / 2
    assert mean == pytest.approx(0.05)
    assert p == pytest.approx(2 * stats.norm.sf(0.05 / se))
    assert (low, high) == pytest.approx((0.05 - 1.959964 * se, 0.05 + 1.959964 * se))


def test_bootstrap_runs_at_a_realistic_size() -> None:
    """Five sites x 1,500 cases (1,100 patients each) x 1,000 resamples, clustered by patient.

    Its speed is measured by benchmarks/bench_pooled_bootstrap.py, not here: a wall-clock
    limit in a test fails on a loaded machine.
    """
    rng = np.random.default_rng(0)
    sites = []
    for k in range(5):
        s = simulated_site(rng, f"site{k}", 1500, 0.8, 0.77)
        _, patients = np.unique(rng.integers(0, 1100, 1500), return_inverse=True)
        sites.append(SiteScores(s.key, s.labels, s.scores_with, s.scores_without, patients))
    pooled = pooled_comparison(sites, resamples=1000, confidence=0.95, seed=0)
    assert pooled is not None and pooled["bootstrap"] == 1000

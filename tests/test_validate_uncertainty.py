"""Uncertainty and abstention (issue 17.2): seed disagreement, threshold on validation, AURC.

The curve arithmetic is checked by hand on small cases; the whole rule on a simulated task where
the seeds disagree exactly on the hard cases (where a single model errs): referring the most
uncertain tenth of validation must raise the accuracy of what is kept at every site.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.validate.assess import calibrated_ensemble
from tasks.validate.calibration import fit_task_calibrators, validation_scores
from tasks.validate.clinical_checks import abstention_check
from tasks.validate.html import _abstention_lines
from tasks.validate.inputs import ModelRun, TaskCases
from tasks.validate.uncertainty import (
    abstention_threshold,
    accepted,
    aurc,
    risk_coverage,
    seed_mean_sd,
    selective_metrics,
    selective_result,
)


def test_risk_coverage_and_aurc_by_hand() -> None:
    errors = np.array([0, 1, 0, 1], dtype=float)
    u = np.array([0.1, 0.4, 0.3, 0.2])
    curve = risk_coverage(errors, u)
    np.testing.assert_allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(curve["risk"], [0, 0.5, 1 / 3, 0.5])
    assert aurc(errors, u) == pytest.approx(np.mean([0, 0.5, 1 / 3, 0.5]))
    # Ties: an uninformative uncertainty gives the overall error rate; a perfect one (with
    # ties) the least area there is, that of any perfect ranking; the reverse the most.
    assert aurc(errors, np.zeros(4)) == pytest.approx(0.5)
    assert len(risk_coverage(errors, np.zeros(4))) == 1
    assert aurc(errors, errors) == pytest.approx(np.mean([0, 0, 1 / 3, 0.5]))
    assert aurc(errors, 1 - errors) == pytest.approx(np.mean([1, 1, 2 / 3, 0.5]))
    shuffled = np.random.default_rng(1).permutation(4)
    assert aurc(errors[shuffled], errors[shuffled]) == aurc(errors, errors)
    assert aurc(np.zeros(0), np.zeros(0)) is None


def test_threshold_keeps_the_coverage_on_the_cases_it_was_chosen_on() -> None:
    u = np.random.default_rng(0).gamma(2.0, 0.05, 501)
    for coverage in (0.5, 0.9, 1.0):
        t = abstention_threshold(u, coverage)
        assert accepted(u, t).mean() >= coverage
        assert accepted(u, t).mean() - coverage < 2 / u.size
    ties = np.array([0.0] * 8 + [0.3, 0.5])
    assert accepted(ties, abstention_threshold(ties, 0.5)).sum() == 8  # ties all kept
    assert abstention_threshold(np.zeros(0), 0.9) is None
    assert accepted(np.ones(3), None).all()
    with pytest.raises(ValueError):
        abstention_threshold(u, 0.0)


def test_selective_metrics_and_result() -> None:
    y = np.array([1, 1, 0, 0, 0, 1])
    pred = np.array([1, 0, 0, 1, 0, 1])
    out = selective_metrics(y, pred, np.ones(6, dtype=bool))
    assert out == {"n": 6, "positives": 3, "accuracy": pytest.approx(4 / 6),
                   "sensitivity": pytest.approx(2 / 3), "specificity": pytest.approx(2 / 3)}
    none_pos = selective_metrics(y, pred, y == 0)
    assert none_pos["sensitivity"] is None and none_pos["specificity"] == pytest.approx(2 / 3)
    u = np.array([0.0, 0.9, 0.1, 0.8, 0.2, 0.05])  # the two errors are the least certain
    res = selective_result(y, pred, u, 0.5)
    assert res.coverage == pytest.approx(4 / 6)
    assert res.accepted["accuracy"] == 1.0 and res.all["accuracy"] == pytest.approx(4 / 6)
    mean, sd = seed_mean_sd(np.array([[0.2, 0.4], [0.4, 0.4]]))
    np.testing.assert_allclose(mean, [0.3, 0.4])
    np.testing.assert_allclose(sd, [0.1, 0.0])


def _task(seed: int = 3) -> TaskCases:
    """Two seeds that agree on easy cases and scatter on hard ones (where errors happen)."""
    rng = np.random.default_rng(seed)
    sizes = {("aurelia", "val"): 600, ("aurelia", "test"): 600, ("north", "external"): 800}
    frames, scores = [], {0: [], 1: []}
    for (site, split), n in sizes.items():
        y = (rng.random(n) < 0.3).astype(np.int64)
        hard = rng.random(n) < 0.25
        signal = np.where(hard, 0.3, 3.0) * (2 * y - 1)
        for k in (0, 1):
            noise = rng.normal(0, np.where(hard, 2.0, 0.3))
            scores[k].append(1 / (1 + np.exp(-(signal + noise))))
        frames.append(pd.DataFrame({"study_uid": [f"{site}.{split}.{i:04d}" for i in range(n)],
                                    "site": site, "split": split, "label": y}))
    cases = pd.concat(frames, ignore_index=True)
    models, held = {}, {}
    for k in (0, 1):
        pred = cases.assign(score=np.concatenate(scores[k]))
        models[("real", k)] = ModelRun(task="metastasis", regime="real", seed=k, path=None,
                                       info={"threshold": 0.5}, predictions=pred)
        held[("real", k)] = pred.loc[pred["split"] != "val", "score"].to_numpy()
    table = cases[cases["split"] != "val"].reset_index(drop=True)
    return TaskCases(task="metastasis", cases=table, scores=held,
                     thresholds={key: 0.5 for key in held}, models=models)


def test_referring_the_seeds_disagreement_raises_accuracy_where_errors_are_hard() -> None:
    cases = _task()
    val = validation_scores(cases)
    cal = calibrated_ensemble(cases, "real", fit_task_calibrators(val, "platt"), val, 0.9)
    assert cal.val_coverage == pytest.approx(0.9, abs=0.01)
    y = cases.labels
    for site in ("aurelia", "north"):
        keep = (cases.cases["site"] == site).to_numpy()
        res = selective_result(y[keep], cal.predicted[keep], cal.uncertainty[keep],
                               cal.uncertainty_threshold)
        assert 0.85 < res.coverage < 0.95
        assert res.accepted["accuracy"] > res.all["accuracy"] + 0.01
        errors = (cal.predicted[keep] != y[keep].astype(bool)).astype(float)
        assert res.aurc < errors.mean()  # better than referring at random
    one_seed = TaskCases(task="metastasis", cases=cases.cases,
                         scores={("real", 0): cases.scores[("real", 0)]},
                         thresholds={("real", 0): 0.5}, models={("real", 0): cases.models[
                             ("real", 0)]})
    val1 = validation_scores(one_seed)
    single = calibrated_ensemble(one_seed, "real", fit_task_calibrators(val1, "platt"), val1,
                                 0.9)
    assert not single.uncertainty.any() and accepted(single.uncertainty,
                                                     single.uncertainty_threshold).all()


def test_the_abstention_verdict_names_the_sites_where_it_did_not_help() -> None:
    def ens(regime: str, auc: float, acc_all: float, acc_kept: float) -> dict:
        ab = {"coverage": 0.9, "aurc": 0.1, "all": {"accuracy": acc_all},
              "accepted": {"accuracy": acc_kept}}
        return {"regime": regime, "sets": {"north": {"auc": auc, "abstention": ab},
                                           "coast": {"auc": auc, "abstention": ab}}}
    doc = {"ensembles": [ens("real", 0.85, 0.80, 0.78), ens("synthetic", 0.62, 0.5, 0.4),
                         ens("real+synthetic", 0.9, 0.8, 0.85)]}
    doc["abstention_check"] = abstention_check(doc, ["north", "coast"], 0.7)
    verdicts = {(r["regime"], r["set"]): r["verdict"] for r in doc["abstention_check"]}
    assert verdicts[("real", "north")] == "not higher"
    assert verdicts[("synthetic", "coast")] == "not applicable"
    assert verdicts[("real+synthetic", "coast")] == "higher"
    sets = {k: {"site": k} for k in ("north", "coast")}
    lines = _abstention_lines(doc, sets)
    assert "NOT higher at north (0.780 vs 0.800), coast" in lines[0]
    assert "not judged at any external site" in lines[1]
    assert "higher than on all cases at 2 of 2" in lines[2]

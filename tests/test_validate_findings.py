"""Subgroups by finding (Perugini grade, superscan) and a CI on every subgroup AUC.

Simulated scores with a known truth: the "with" regime finds Perugini-3 positives far better
than the "without" regime and Perugini-2 positives equally well, so the finding comparison must
show a gain for grade 3 (CI above 0) and none for grade 2 (CI covering 0), while the report
stays schema-valid and the HTML shows every interval.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import ValidateConfig
from tasks.validate.compare import finding_comparisons
from tasks.validate.evalsets import eval_sets
from tasks.validate.findings import finding_groups
from tasks.validate.inputs import TaskCases
from tasks.validate.metrics import auc
from tasks.validate.pipeline import ValidationResult, mlflow_payload, run_validation
from tasks.validate.subgroups import Interval, subgroup_aucs

WITH, WITHOUT = "real_limited+synthetic", "real_limited"
SITES = {"val": 60, "test": 300, "northgate": 500, "coastal": 400, "alpine": 450}


def _amyloid_cases(rng: np.random.Generator) -> pd.DataFrame:
    """Cases of every split; grade 0/1 negatives, grade 2/3 positives."""
    frames = []
    for name, n in SITES.items():
        split = name if name in ("val", "test") else "external"
        site = "aurelia" if split != "external" else name
        grade = rng.choice([0, 1, 2, 3], size=n, p=[0.7, 0.1, 0.1, 0.1])
        frames.append(pd.DataFrame({
            "study_uid": [f"{site}.{split}.{i}" for i in range(n)],
            "pseudo_id": [f"{site}-{split}-{i}" for i in range(n)], "site": site,
            "split": split, "sex": rng.choice(["F", "M"], n), "age": rng.uniform(50, 90, n),
            "label": (grade >= 2).astype(np.int64), "perugini_grade": grade,
            "metastasis": False, "superscan": False}))
    return pd.concat(frames, ignore_index=True)


def _scores(rng: np.random.Generator, grade: np.ndarray, grade3_shift: float) -> np.ndarray:
    """Binormal scores: grade 2 shifted by 1.5, grade 3 by ``grade3_shift``."""
    latent = rng.normal(size=grade.size)
    latent[grade == 2] += 1.5
    latent[grade == 3] += grade3_shift
    return 1.0 / (1.0 + np.exp(-latent))


def _write(root: Path, cases: pd.DataFrame, rng: np.random.Generator) -> Path:
    grade = cases["perugini_grade"].to_numpy()
    for regime, shift in ((WITH, 3.0), (WITHOUT, 0.8)):
        for seed in (0, 1):
            folder = root / "amyloidosis" / regime / f"seed{seed}"
            folder.mkdir(parents=True)
            frame = cases.copy()
            frame["score"] = _scores(rng, grade, shift)
            frame.to_parquet(folder / "predictions.parquet", index=False)
            info = {"task": "amyloidosis", "regime": regime, "seed": seed, "threshold": 0.5}
            (folder / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> ValidationResult:
    base = tmp_path_factory.mktemp("findings")
    rng = np.random.default_rng(3)
    classifiers = _write(base / "classifiers", _amyloid_cases(rng), rng)
    return run_validation(classifiers, base / "reports",
                          ValidateConfig(bootstrap=300, comparisons=[[WITH, WITHOUT]]))


def test_finding_groups_pair_each_finding_with_all_negatives() -> None:
    cases = pd.DataFrame({"label": [0, 0, 1, 1, 1, 0],
                          "perugini_grade": [0, 1, 2, 3, 3, 1],
                          "superscan": [False, False, True, False, pd.NA, False]})
    amyloid = finding_groups(cases, "amyloidosis")
    assert list(amyloid) == ["Perugini 2", "Perugini 3"]
    assert amyloid["Perugini 3"].tolist() == [True, True, False, True, True, True]
    meta = finding_groups(cases, "metastasis")
    assert meta["superscan"].tolist() == [True, True, True, False, False, True]
    assert meta["focal (no superscan)"].tolist() == [True, True, False, True, True, True]
    assert finding_groups(cases.drop(columns=["perugini_grade", "superscan"]),
                          "amyloidosis") == {}


def test_every_subgroup_auc_has_a_ci_that_contains_it() -> None:
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(40, int), np.zeros(120, int)]
    s = rng.random(y.size) + 0.4 * y
    sex = np.where(np.arange(y.size) % 2 == 0, "F", "M")
    age = np.full(y.size, 65.0)
    age[:4] = 85.0
    rows = subgroup_aucs(y, s, sex, age, [0, 70, 150], interval=Interval(resamples=200))
    shown = [r for r in rows if r["auc"] is not None]
    assert shown and all(r["auc_ci_low"] <= r["auc"] <= r["auc_ci_high"] for r in shown)
    assert all(r["auc_ci_high"] - r["auc_ci_low"] > 0.02 for r in shown)
    hidden = [r for r in rows if r["auc"] is None]
    assert hidden and all(r["auc_ci_low"] is None and r["note"] for r in hidden)


def test_finding_subgroups_are_in_the_report_with_cis(result: ValidationResult) -> None:
    doc = result.report["tasks"]["amyloidosis"]
    rows = [r for r in doc["subgroups"] if r["variable"] == "finding"]
    assert {r["group"] for r in rows} == {"Perugini 2", "Perugini 3"}
    assert all(r["auc_ci_low"] <= r["auc"] <= r["auc_ci_high"] for r in rows)
    g3 = {(r["regime"], r["set"]): r["auc"] for r in rows if r["group"] == "Perugini 3"}
    assert all(g3[(WITH, s)] > g3[(WITHOUT, s)] for s in ("northgate", "coastal", "alpine"))


def test_finding_comparison_finds_the_gain_where_it_is(result: ValidationResult) -> None:
    comp = result.report["tasks"]["amyloidosis"]["comparisons"][0]
    by = {f["group"]: f for f in comp["findings"]}
    g3, g2 = by["Perugini 3"]["pooled"], by["Perugini 2"]["pooled"]
    assert g3["delta_auc_ci_low"] > 0.05 and g3["verdict"] == "better"
    assert g2["delta_auc_ci_low"] < 0 < g2["delta_auc_ci_high"]
    assert sum(by["Perugini 3"]["external_positives"].values()) == g3["positives"]


def test_html_and_mlflow_show_the_finding_numbers(result: ValidationResult) -> None:
    html = result.html_path.read_text(encoding="utf-8")
    assert "By finding, pooled over external sites" in html and "Perugini 3" in html
    assert "AUC by sex, age band and finding" in html
    row = next(r for r in result.report["tasks"]["amyloidosis"]["subgroups"]
               if r["auc"] is not None)
    assert f"[{row['auc_ci_low']:.3f}, {row['auc_ci_high']:.3f}]" in html
    metrics, _ = mlflow_payload(result)
    key = f"amyloidosis.{WITH}_vs_{WITHOUT}.pooled_external.Perugini 3.delta_auc"
    assert key.replace("+", "_plus_") in metrics


def test_finding_comparison_without_enough_positives_is_not_assessable() -> None:
    rng = np.random.default_rng(1)
    cases = _amyloid_cases(rng)
    cases = cases[~((cases["perugini_grade"] == 3) & (cases["site"] == "coastal"))]
    cases = cases.reset_index(drop=True)
    grade = cases["perugini_grade"].to_numpy()
    scores = {(WITH, 0): _scores(rng, grade, 3.0), (WITHOUT, 0): _scores(rng, grade, 0.8)}
    task = TaskCases(task="amyloidosis", cases=cases, scores=scores,
                     thresholds={k: 0.5 for k in scores}, models={})
    out = {f["group"]: f for f in finding_comparisons(
        task, WITH, WITHOUT, eval_sets(cases), confidence=0.95, resamples=100, seed=0)}
    assert out["Perugini 3"]["external_positives"]["coastal"] == 0
    assert out["Perugini 3"]["pooled"]["delta_auc"] is None
    assert "coastal" in out["Perugini 3"]["pooled"]["note"]
    assert out["Perugini 2"]["pooled"]["delta_auc"] is not None


def test_subgroup_auc_matches_sklearn_on_the_finding_cases() -> None:
    rng = np.random.default_rng(11)
    cases = _amyloid_cases(rng)
    grade = cases["perugini_grade"].to_numpy()
    s = _scores(rng, grade, 2.0)
    groups = finding_groups(cases, "amyloidosis")
    rows = subgroup_aucs(cases["label"].to_numpy(), s, cases["sex"].to_numpy(),
                         cases["age"].to_numpy(), [0, 150], interval=Interval(resamples=50),
                         findings=groups)
    g3 = next(r for r in rows if r["group"] == "Perugini 3")
    keep = groups["Perugini 3"]
    assert g3["auc"] == pytest.approx(auc(cases["label"].to_numpy()[keep], s[keep]))
    assert g3["n"] == int(keep.sum())

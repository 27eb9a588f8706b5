"""Calibrated probabilities (issue 17.1): fitted on internal validation, carried by the champion.

The calibrators are checked against a known miscalibration (a balanced-sampler-like prior shift
plus overconfidence); the report on simulated prediction folders (the shape train_classifier
writes) gains its calibrated numbers and calibrators files; and a registered-style pyfunc built
from two real (untrained) ScanClassifier networks returns the probability, uncertainty and
abstain flag the validate code computes for the same calibrators.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

import models.classifier
from models.classifier import ScanClassifier, predict_scores
from models.module_file import save_module_file
from tasks.artifacts.validation_report import PLOTS_DIR
from tasks.config import ValidateConfig, load_config
from tasks.validate.calibration import (
    Calibrator,
    fit_calibrator,
    validation_scores,
)
from tasks.validate.calibrators_file import calibrators_file, champion_artifacts
from tasks.validate.champion_pyfunc import apply_calibrator
from tasks.validate.champions import PYFUNC_FILE, _signature
from tasks.validate.inputs import ValidationInputError, align_task, discover_models
from tasks.validate.metrics import expected_calibration_error
from tasks.validate.pipeline import dvc_metrics, mlflow_payload, run_validation
from tasks.validate.schema import ReportSchemaError, validate_report
from tests.test_validate_report import write_models

REPO = Path(__file__).resolve().parents[1]


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels from a true probability, and scores that overstate it (odds x e^2, too sharp)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.5, 1.5, n)
    labels = (rng.random(n) < expit(z)).astype(np.int64)
    return expit(1.6 * z + 2.0), labels


def test_platt_undoes_a_prior_shift_that_a_temperature_cannot() -> None:
    s_val, y_val = _shifted(3000, 0)
    s_test, y_test = _shifted(3000, 1)
    before = expected_calibration_error(y_test, s_test)
    after = {m: expected_calibration_error(y_test, fit_calibrator(s_val, y_val, m).apply(s_test))
             for m in ("platt", "temperature", "isotonic")}
    assert before > 0.2
    assert after["platt"] < 0.03 and after["isotonic"] < 0.04
    assert after["temperature"] > 2 * after["platt"]  # no bias term: the shift stays
    platt = fit_calibrator(s_val, y_val, "platt")
    assert platt.params["slope"] == pytest.approx(1 / 1.6, rel=0.15)
    assert platt.as_dict()["temperature"] == pytest.approx(1 / platt.params["slope"])


def test_isotonic_is_sklearns_and_every_method_survives_json_and_the_pyfunc() -> None:
    s, y = _shifted(500, 2)
    probe = np.concatenate([np.linspace(0, 1, 101), [0.0, 1.0, 1e-12, 1 - 1e-12]])
    sk = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s, y)
    iso = fit_calibrator(s, y, "isotonic")
    np.testing.assert_allclose(iso.apply(probe), sk.predict(probe), atol=1e-12)
    for method in ("platt", "temperature", "isotonic", "none"):
        cal = fit_calibrator(s, y, method)
        doc = json.loads(json.dumps(cal.as_dict()))
        again = Calibrator.from_dict(doc)
        np.testing.assert_allclose(again.apply(probe), cal.apply(probe), atol=1e-12)
        np.testing.assert_allclose(apply_calibrator(doc, probe), cal.apply(probe), atol=1e-12)
        assert np.all((cal.apply(probe) >= 0) & (cal.apply(probe) <= 1))
        if method != "none":  # monotone: calibration never reorders cases
            assert np.all(np.diff(cal.apply(np.linspace(0, 1, 101))) >= -1e-12)


def test_a_validation_split_with_one_class_leaves_scores_alone_and_says_why() -> None:
    cal = fit_calibrator(np.array([0.2, 0.7, 0.9]), np.array([0, 0, 0]), "platt")
    assert cal.method == "none" and "0 positive(s) in 3" in cal.note
    np.testing.assert_array_equal(cal.apply(np.array([0.3])), [0.3])
    with pytest.raises(ValueError, match="unknown calibration method"):
        fit_calibrator(np.array([0.2]), np.array([1]), "beta")
    with pytest.raises(Exception, match="method"):
        ValidateConfig(calibration={"method": "beta", "target_ece": 0.05})


@pytest.fixture(scope="module")
def small_report(tmp_path_factory: pytest.TempPathFactory):
    """One validation run: one task, two regimes, two seeds, three external sites."""
    base = tmp_path_factory.mktemp("calib")
    classifiers = write_models(base / "classifiers", tasks=("metastasis",),
                               regimes=("real", "real_limited"))
    return run_validation(classifiers, base / "reports", ValidateConfig(bootstrap=100))


def test_the_report_carries_calibrated_numbers_fitted_on_validation(small_report) -> None:
    report = small_report.report
    assert report["schema_version"] == 3
    doc = report["tasks"]["metastasis"]
    cases = align_task(discover_models(Path(report["classifiers_root"])))
    val = validation_scores(cases)
    assert val.labels.size == 40  # the validation rows, which the held-out table leaves out
    for model in doc["models"]:
        cal = model["calibrator"]
        assert cal["method"] == "platt" and cal["n"] == 40 and cal["note"] is None
        refit = fit_calibrator(val.scores[(model["regime"], model["seed"])], val.labels, "platt")
        assert cal["params"]["slope"] == pytest.approx(refit.params["slope"], rel=1e-4)
        for m in model["sets"].values():
            assert 0 <= m["ece_calibrated"] <= 1 and 0 <= m["brier_calibrated"] <= 1
    for ens in doc["ensembles"]:
        assert ens["calibration_methods"] == ["platt"]
        for key, m in ens["sets"].items():
            assert sum(b["count"] for b in m["calibration_calibrated"]) == m["n"], key
    goal = doc["calibration_goal"]
    assert [(g["regime"], g["set"]) for g in goal] == [("real", "aurelia"),
                                                       ("real_limited", "aurelia")]
    for g in goal:
        expected = "met" if g["ece_calibrated"] <= 0.05 else "not met"
        assert g["verdict"] == (expected if g["positives"] >= 10 else "not measurable")
    metrics = dvc_metrics(report)
    assert metrics["ece_calibrated"]["metastasis"]["real"]["aurelia"] == \
        doc["ensembles"][0]["sets"]["aurelia"]["ece_calibrated"]
    flat, artifacts = mlflow_payload(small_report)
    assert "metastasis.real.northgate.ece_calibrated" in flat
    assert all(p in artifacts for p in small_report.calibrators)
    html = small_report.html_path.read_text(encoding="utf-8")
    assert "Calibration goal, real on aurelia" in html and "before (left) and after" in html
    broken = json.loads(json.dumps(report))
    broken["tasks"]["metastasis"]["models"][0]["calibrator"]["method"] = "magic"
    with pytest.raises(ReportSchemaError):
        validate_report(broken)


def test_calibrators_file_and_champion_artifacts(small_report, tmp_path: Path) -> None:
    plots = small_report.plots_dir
    path = calibrators_file(plots, "metastasis", "real")
    assert path in small_report.calibrators
    doc = json.loads(path.read_text(encoding="utf-8"))
    ens = small_report.report["tasks"]["metastasis"]["ensembles"][0]
    assert doc["uncertainty_threshold"] == ens["uncertainty_threshold"]
    assert [s["seed"] for s in doc["seeds"]] == [0, 1]
    cfg = load_config(REPO / "params.yaml",
                      [f"validation.output={small_report.json_path.parent}"])
    info = {"task": "metastasis", "regime": "real", "seed": 0}
    with pytest.raises(FileNotFoundError, match="seed1/model.pt"):
        champion_artifacts(cfg, info)  # the simulated folders hold no weights
    for s in doc["seeds"]:
        Path(s["model_file"]).write_bytes(b"weights")
    assert champion_artifacts(cfg, info) == {"calibration": str(path),
                                             "seed1_weights": doc["seeds"][1]["model_file"]}
    elsewhere = load_config(REPO / "params.yaml", [f"validation.output={tmp_path}"])
    assert champion_artifacts(elsewhere, info) == {}  # no calibrators: the pyfunc's fallback


def test_models_must_share_their_validation_cases(tmp_path: Path) -> None:
    root = write_models(tmp_path / "c", tasks=("metastasis",), regimes=("real",))
    odd = root / "metastasis" / "real" / "seed1" / "predictions.parquet"
    frame = pd.read_parquet(odd)
    frame.loc[frame["split"] == "val", "label"] = 1 - frame.loc[frame["split"] == "val", "label"]
    frame.to_parquet(odd, index=False)
    with pytest.raises(ValidationInputError, match="validation cases"):
        validation_scores(align_task(discover_models(root)))


def _seed_folder(folder: Path, seed: int) -> ScanClassifier:
    torch.manual_seed(seed)
    module = ScanClassifier(layers=(1, 1, 1, 1), widths=(4, 4, 8, 8), dropout=0.0,
                            task="metastasis").eval()
    folder.mkdir(parents=True)
    save_module_file(folder / "model.pt", module, dict(module.hparams), (32, 16))
    info = {"task": "metastasis", "regime": "real", "seed": seed, "threshold": 0.5}
    (folder / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return module


def test_champion_pyfunc_returns_probability_uncertainty_and_abstain(
        tmp_path: Path, mlflow_uri: str) -> None:
    """A pyfunc logged as champions.py logs it, loaded back, against the validate code."""
    seeds = {k: _seed_folder(tmp_path / "real" / f"seed{k}", k) for k in (0, 1)}
    images = torch.rand(12, 2, 64, 32)
    small = torch.nn.functional.interpolate(images, size=(32, 16), mode="area")
    scores = {k: predict_scores(m, small).numpy().astype(np.float64) for k, m in seeds.items()}
    calibrators = {0: Calibrator("platt", {"slope": 0.7, "bias": -1.0}, 40, 12),
                   1: Calibrator("isotonic", {"x": [0.0, 0.5, 1.0], "y": [0.05, 0.3, 0.9]},
                                 40, 12)}
    probs = np.stack([calibrators[k].apply(scores[k]) for k in (0, 1)])
    uncertainty = probs.std(axis=0)
    limit = float(np.median(uncertainty))
    reports = tmp_path / "reports"
    doc = {"task": "metastasis", "regime": "real", "method": "platt", "coverage": 0.9,
           "uncertainty_threshold": limit, "val_coverage": 0.9,
           "seeds": [{"seed": k, "model_file": str(tmp_path / "real" / f"seed{k}" / "model.pt"),
                      "calibrator": calibrators[k].as_dict()} for k in (0, 1)]}
    path = calibrators_file(reports / PLOTS_DIR, "metastasis", "real")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc), encoding="utf-8")
    cfg = load_config(REPO / "params.yaml", [f"validation.output={reports}"])
    champion = tmp_path / "real" / "seed0"
    artifacts = {"weights": str(champion / "model.pt"), "info": str(champion / "model.json"),
                 **champion_artifacts(cfg, {"task": "metastasis", "regime": "real", "seed": 0})}
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("synthdx")  # not an experiment id left active by an earlier test
    with mlflow.start_run():
        logged = mlflow.pyfunc.log_model(
            name="classifier", python_model=str(PYFUNC_FILE), artifacts=artifacts,
            code_paths=[str(Path(models.classifier.__file__).parent)], signature=_signature(),
            pip_requirements=["mlflow"])  # no inference run: the test is about predict
    out = mlflow.pyfunc.load_model(logged.model_uri).predict(images.numpy())
    assert list(out.columns) == ["score", "positive", "probability", "uncertainty", "abstain"]
    np.testing.assert_allclose(out["score"], scores[0], rtol=1e-6)
    np.testing.assert_allclose(out["probability"], probs[0], rtol=1e-6)
    np.testing.assert_allclose(out["uncertainty"], uncertainty, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(out["abstain"], uncertainty > limit)
    assert 0 < out["abstain"].sum() < len(out)
    np.testing.assert_array_equal(out["positive"], scores[0] >= 0.5)

"""The validation stage end to end on simulated prediction folders.

The folders are fake but shaped like the training stage's outputs (binormal scores, several
sites, two tasks, three regimes, two seeds): what is tested is the validation code, not a
classifier. One run is shared by the module's tests to keep them fast.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.config import ValidateConfig
from tasks.validate.inputs import ValidationInputError, discover_models, load_model
from tasks.validate.pipeline import (
    ValidationResult,
    dvc_metrics,
    mlflow_payload,
    run_validation,
)
from tasks.validate.schema import ReportSchemaError, validate_report

TASKS = ("amyloidosis", "metastasis")
REGIMES = ("real", "real_limited", "real_limited+synthetic")
SEEDS = (0, 1)
INTERNAL = "aurelia"
EXTERNAL = ("northgate", "coastal", "alpine")
SIZES = {"val": 40, "test": 100, "northgate": 160, "coastal": 90, "alpine": 90}
SEPARATION = {"real": 1.4, "real_limited": 0.7, "real_limited+synthetic": 1.2,
              "real+synthetic": 1.5, "synthetic": 1.0}
"""Binormal separation d of each regime's scores (AUC = Phi(d / sqrt 2) before noise)."""
BOOST_SITE = "northgate"
"""At this site the synthetic regime separates far better and the others worse: a large effect."""


def _cases(rng: np.random.Generator, task: str) -> pd.DataFrame:
    rows = []
    for name, n in SIZES.items():
        split = name if name in ("val", "test") else "external"
        site = INTERNAL if split != "external" else name
        rows += [(f"1.2.826.{task[:3]}.{site}.{split}.{i}", site, split) for i in range(n)]
    frame = pd.DataFrame(rows, columns=["study_uid", "site", "split"])
    n = len(frame)
    frame["pseudo_id"] = [f"P{i:05d}" for i in range(n)]
    frame["sex"] = rng.choice(["F", "M"], n)
    age = rng.uniform(45, 92, n)
    age[rng.random(n) < 0.05] = np.nan
    frame["age"] = age
    frame["label"] = (rng.random(n) < 0.3).astype(np.int64)
    return frame


def write_models(root: Path, tasks: tuple[str, ...] = TASKS,
                 regimes: tuple[str, ...] = REGIMES, seeds: tuple[int, ...] = SEEDS,
                 seed: int = 7) -> Path:
    """Write ``<root>/<task>/<regime>/seed<k>/{predictions.parquet,model.json}``."""
    rng = np.random.default_rng(seed)
    for task in tasks:
        frame = _cases(rng, task)
        shared = rng.normal(size=len(frame))  # case difficulty every model sees
        for regime in regimes:
            d = np.full(len(frame), SEPARATION[regime])
            boost = frame["site"].to_numpy() == BOOST_SITE
            d[boost] *= 1.8 if "synthetic" in regime else 0.6
            for k in seeds:
                latent = (frame["label"] - 0.5) * d + 0.6 * shared + 0.5 * rng.normal(
                    size=len(frame))
                out = frame.copy()
                out["score"] = 1.0 / (1.0 + np.exp(-latent))
                folder = root / task / regime / f"seed{k}"
                folder.mkdir(parents=True)
                out.to_parquet(folder / "predictions.parquet", index=False)
                info = {"task": task, "regime": regime, "seed": k, "threshold": 0.5,
                        "threshold_rule": "youden", "val_auc": 0.81,
                        "mlflow_run_id": f"run{k}{len(regime)}", "model_uri": f"runs:/r{k}/model",
                        "training_set": {"n_real": 400, "n_synthetic": 200 * ("synth" in regime),
                                         "n_positive": 120, "n_negative": 480},
                        "lineage": {"processed_digest": "md5:0f0f", "synthetic_digest": "md5:a1a1",
                                    "diffusion_model": "synthdx-bone-scan-diffusion/3"}}
                (folder / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def validation(tmp_path_factory: pytest.TempPathFactory) -> ValidationResult:
    """One validation run over two tasks x three regimes x two seeds x four sites."""
    base = tmp_path_factory.mktemp("validate")
    classifiers = write_models(base / "classifiers")
    return run_validation(classifiers, base / "reports", ValidateConfig(bootstrap=100))


def _sets() -> list[str]:
    return [INTERNAL, *EXTERNAL]


def test_report_files_are_written_atomically(validation: ValidationResult) -> None:
    reports = validation.json_path.parent
    assert validation.json_path.name == "validation.json"
    assert validation.metrics_path.name == "validation_metrics.json"
    assert validation.html_path.name == "validation.html"
    assert validation.plots_dir == reports / "validation"
    assert not [p for p in reports.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_json_has_every_task_site_and_regime(validation: ValidationResult) -> None:
    report = json.loads(validation.json_path.read_text(encoding="utf-8"))
    keys = [s["key"] for s in report["eval_sets"]]
    assert keys[0] == INTERNAL and sorted(keys) == sorted(_sets())
    assert [s["internal"] for s in report["eval_sets"]] == [True, False, False, False]
    assert set(report["tasks"]) == set(TASKS)
    for task in TASKS:
        doc = report["tasks"][task]
        assert doc["regimes"] == list(REGIMES) and doc["seeds"] == list(SEEDS)
        assert len(doc["models"]) == len(REGIMES) * len(SEEDS)
        for entry in doc["models"] + doc["ensembles"]:
            assert set(entry["sets"]) == set(_sets())
        for ens in doc["ensembles"]:
            internal = ens["sets"][INTERNAL]
            assert internal["n"] == SIZES["test"]  # validation rows never counted
            assert internal["auc_ci_low"] <= internal["auc"] <= internal["auc_ci_high"]
            assert internal["seed_auc_sd"] is not None and len(internal["seed_aucs"]) == 2
        subgroup_sets = {(g["regime"], g["set"]) for g in doc["subgroups"]}
        assert subgroup_sets == {(r, s) for r in REGIMES for s in _sets()}
        assert {g["variable"] for g in doc["subgroups"]} == {"sex", "age"}
    assert len(report["provenance"]) == len(TASKS) * len(REGIMES) * len(SEEDS)
    assert report["provenance"][0]["lineage"]["diffusion_model"].startswith("synthdx")


def test_comparisons_present_and_skipped_listed(validation: ValidationResult) -> None:
    doc = validation.report["tasks"]["metastasis"]
    assert [(c["with"], c["without"]) for c in doc["comparisons"]] == [
        ("real_limited+synthetic", "real_limited")]
    skipped = {(s["with"], s["without"]) for s in doc["skipped_comparisons"]}
    assert skipped == {("real+synthetic", "real"), ("synthetic", "real_limited")}
    comp = doc["comparisons"][0]
    assert comp["paired_seeds"] == list(SEEDS)
    ext = comp["external"]
    assert ext["sites"] == sorted(EXTERNAL) and ext["n_sites"] == 3
    deltas = [comp["sets"][s]["delta_auc"] for s in EXTERNAL]
    assert ext["delta_auc_mean"] == pytest.approx(np.mean(deltas), rel=1e-4)


def test_synthetic_regime_is_better_where_the_simulated_effect_is_large(
        validation: ValidationResult) -> None:
    for task in TASKS:
        comp = validation.report["tasks"][task]["comparisons"][0]
        at_site = comp["sets"][BOOST_SITE]
        assert at_site["verdict"] == "better"
        assert at_site["p_value"] < 0.05
        assert at_site["delta_auc"] > 0.1
        assert at_site["delta_ci_low"] > 0
        assert at_site["relative_change_pct"] == pytest.approx(
            100 * at_site["delta_auc"] / at_site["auc_without"], rel=1e-3)
        assert at_site["seed_delta_auc"]["n"] == 2 and at_site["seed_delta_auc"]["mean"] > 0


def test_json_matches_its_schema_and_a_corrupted_one_does_not(
        validation: ValidationResult) -> None:
    report = json.loads(validation.json_path.read_text(encoding="utf-8"))
    validate_report(report)
    missing = copy.deepcopy(report)
    del missing["tasks"]["amyloidosis"]["ensembles"][0]["sets"][INTERNAL]["auc"]
    wrong_type = copy.deepcopy(report)
    wrong_type["tasks"]["metastasis"]["models"][0]["sets"][INTERNAL]["auc"] = 1.7
    bad_verdict = copy.deepcopy(report)
    bad_verdict["tasks"]["metastasis"]["comparisons"][0]["sets"][BOOST_SITE]["verdict"] = "maybe"
    no_provenance = copy.deepcopy(report)
    no_provenance.pop("provenance")
    for broken in (missing, wrong_type, bad_verdict, no_provenance):
        with pytest.raises(ReportSchemaError):
            validate_report(broken)


def test_pooled_external_comparison_in_every_comparison(validation: ValidationResult) -> None:
    """One pooled Delta AUC over the external sites, its CI, p; the schema holds it to its shape."""
    report = json.loads(validation.json_path.read_text(encoding="utf-8"))
    for task in TASKS:
        comp = report["tasks"][task]["comparisons"][0]
        pooled = comp["pooled"]
        assert pooled["sites"] == sorted(EXTERNAL)
        assert pooled["n"] == sum(SIZES[s] for s in EXTERNAL)
        assert pooled["patients"] == pooled["n"]  # one study per pseudonym in this simulation
        assert pooled["delta_auc"] == pytest.approx(comp["external"]["delta_auc_mean"], rel=1e-4)
        assert pooled["delta_auc_ci_low"] < pooled["delta_auc"] < pooled["delta_auc_ci_high"]
        assert pooled["delong_ci_low"] < pooled["delta_auc"] < pooled["delong_ci_high"]
        assert pooled["bootstrap"] == 100 and pooled["note"] is None
        assert 0 <= pooled["p_value"] <= 1
        assert pooled["verdict"] in ("better", "worse", "no significant difference")
        assert "patients" in pooled["method"]
    for corrupt in ({"verdict": "maybe"}, {"bootstrap": -1}, {"extra": 1}, {"sites": []}):
        broken = copy.deepcopy(report)
        broken["tasks"]["metastasis"]["comparisons"][0]["pooled"].update(corrupt)
        with pytest.raises(ReportSchemaError):
            validate_report(broken)
    missing = copy.deepcopy(report)
    del missing["tasks"]["metastasis"]["comparisons"][0]["pooled"]["delta_auc_ci_low"]
    with pytest.raises(ReportSchemaError):
        validate_report(missing)
    no_external = copy.deepcopy(report)
    no_external["tasks"]["metastasis"]["comparisons"][0]["pooled"] = None
    validate_report(no_external)


def test_html_headline_states_the_pooled_result_first(validation: ValidationResult) -> None:
    html = validation.html_path.read_text(encoding="utf-8")
    sentences = re.findall(r"<p>(Pooled over the 3 external site\(s\)[^<]*)</p>", html)
    assert len(sentences) == len(TASKS)
    for task, text in zip(validation.report["tasks"], sentences, strict=True):
        pooled = validation.report["tasks"][task]["comparisons"][0]["pooled"]
        assert f"{pooled['delta_auc']:+.3f}" in text and "95 % CI" in text
        assert f"{pooled['delta_auc_ci_low']:+.3f} to {pooled['delta_auc_ci_high']:+.3f}" in text
        assert text.index("95 % CI") < text.index(" p ") < text.index("At ")
    assert "Pooled over external sites" in html  # the table row


def test_validating_the_same_models_again_gives_the_same_bytes(
        validation: ValidationResult, tmp_path: Path) -> None:
    """The reports are DVC outputs: no timestamp, so a rerun leaves their hashes alone."""
    assert "generated" not in validation.report
    assert not any("created" in p for p in validation.report["provenance"])
    again = run_validation(Path(validation.report["classifiers_root"]), tmp_path / "reports",
                           ValidateConfig(bootstrap=100))
    for first, second in ((validation.json_path, again.json_path),
                          (validation.metrics_path, again.metrics_path),
                          (validation.html_path, again.html_path)):
        assert first.read_bytes() == second.read_bytes(), first.name
    csvs = sorted(p.relative_to(validation.plots_dir)
                  for p in validation.plots_dir.rglob("*.csv"))
    assert csvs and all((validation.plots_dir / p).read_bytes()
                        == (again.plots_dir / p).read_bytes() for p in csvs)


def test_pipeline_headline_shows_the_pooled_delta_with_its_interval(
        validation: ValidationResult) -> None:
    from flows.orchestration.summary import headline, headline_metrics

    table, html = headline(validation.json_path.parent)
    assert table is not None and html == validation.html_path
    assert "aurelia*" in table  # the AUC table is still there
    pooled = validation.report["tasks"]["amyloidosis"]["comparisons"][0]["pooled"]
    line = next(x for x in table.splitlines()
                if "amyloidosis" in x and "real_limited+synthetic_vs_real_limited" in x)
    assert (f"{pooled['delta_auc']:+.3f} [{pooled['delta_auc_ci_low']:+.3f}, "
            f"{pooled['delta_auc_ci_high']:+.3f}]") in line
    metrics = headline_metrics(validation.report)
    base = "pooled_delta_auc/amyloidosis/real_limited_plus_synthetic_vs_real_limited"
    assert metrics[base] == pooled["delta_auc"]
    assert metrics[base + "/ci_low"] == pooled["delta_auc_ci_low"]
    assert metrics[base + "/ci_high"] == pooled["delta_auc_ci_high"]
    assert metrics["auc/metastasis/real/aurelia"] == \
        validation.report["tasks"]["metastasis"]["ensembles"][0]["sets"]["aurelia"]["auc"]
    old = copy.deepcopy(validation.report)  # a report written before the pooled comparison
    for doc in old["tasks"].values():
        for comp in doc["comparisons"]:
            del comp["pooled"]
    assert not any(k.startswith("pooled") for k in headline_metrics(old))


def test_html_is_self_contained_and_shows_every_site_and_regime(
        validation: ValidationResult) -> None:
    html = validation.html_path.read_text(encoding="utf-8")
    images = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(images) == 3 * len(TASKS) * len(_sets())  # ROC, calibration, risk-coverage
    assert all(src.startswith("data:image/png;base64,") for src in images)
    without_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert "http" not in without_data and "//" not in re.sub(r"<style>.*?</style>", "",
                                                             without_data, flags=re.S)
    assert not re.search(r"<(script|link|iframe)\b", html)
    for name in (*_sets(), *REGIMES, *TASKS, "internal test", "DeLong", "Provenance"):
        assert name in html, name
    assert "run01" in html  # an MLflow run id from the provenance


def test_dvc_metrics_and_plot_files(validation: ValidationResult) -> None:
    metrics = json.loads(validation.metrics_path.read_text(encoding="utf-8"))
    assert metrics == dvc_metrics(validation.report)
    for task in TASKS:
        assert set(metrics["auc"][task]) == set(REGIMES)
        assert set(metrics["auc"][task]["real"]) == set(_sets())
        delta = metrics["delta_auc"][task]["real_limited+synthetic_vs_real_limited"]
        assert set(delta) == {*_sets(), "external_mean", "pooled_external"}
        assert delta["pooled_external"] == pytest.approx(delta["external_mean"], rel=1e-4)
        for site in _sets():
            roc = pd.read_csv(validation.plots_dir / "roc" / f"{task}_{site}.csv")
            assert list(roc.columns) == ["regime", "fpr", "tpr"]
            assert set(roc["regime"]) == set(REGIMES)
            assert roc["fpr"].between(0, 1).all() and roc["tpr"].between(0, 1).all()
            cal = pd.read_csv(validation.plots_dir / "calibration" / f"{task}_{site}.csv")
            assert list(cal.columns) == ["regime", "bin", "mean_predicted", "fraction_positive",
                                         "count"]
            for kind in ("roc", "calibration"):
                png = validation.plots_dir / "figures" / f"{kind}_{task}_{site}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_payload_names_are_loggable(validation: ValidationResult) -> None:
    metrics, artifacts = mlflow_payload(validation)
    assert metrics["metastasis.real.northgate.auc"] == \
        validation.report["tasks"]["metastasis"]["ensembles"][0]["sets"]["northgate"]["auc"]
    assert "amyloidosis.real_limited_plus_synthetic.aurelia.auc" in metrics
    assert "amyloidosis.real_limited_plus_synthetic_vs_real_limited.external_mean.delta_auc" \
        in metrics
    for key in ("delta_auc", "delta_auc_ci_low", "delta_auc_ci_high", "p_value"):
        name = f"metastasis.real_limited_plus_synthetic_vs_real_limited.pooled_external.{key}"
        assert metrics[name] == validation.report["tasks"]["metastasis"]["comparisons"][0][
            "pooled"][key]
    assert all(re.fullmatch(r"[/\w.\- :]+", name) for name in metrics)  # MLflow's rule
    assert all(isinstance(v, float) for v in metrics.values())
    assert validation.json_path in artifacts and validation.html_path in artifacts
    assert all(p.is_file() for p in artifacts)


def test_any_subset_of_tasks_regimes_and_seeds(tmp_path: Path) -> None:
    """One task, two regimes, one seed; and an external site without a single positive case."""
    classifiers = write_models(tmp_path / "c", tasks=("metastasis",),
                               regimes=("real", "real+synthetic"), seeds=(3,))
    for path in classifiers.glob("*/*/seed*/predictions.parquet"):
        frame = pd.read_parquet(path)
        frame.loc[frame["site"] == "alpine", "label"] = 0
        frame.to_parquet(path, index=False)
    cfg = ValidateConfig(bootstrap=100, comparisons=[("real+synthetic", "real")])
    result = run_validation(classifiers, tmp_path / "reports", cfg)
    doc = result.report["tasks"]["metastasis"]
    alpine = doc["ensembles"][0]["sets"]["alpine"]
    assert alpine["positives"] == 0 and alpine["auc"] is None and alpine["sensitivity"] is None
    assert alpine["specificity"] is not None
    assert doc["comparisons"][0]["sets"]["alpine"]["verdict"] == "not assessable"
    assert doc["comparisons"][0]["external"]["n_sites"] == 2
    pooled = doc["comparisons"][0]["pooled"]
    assert pooled["verdict"] == "not assessable" and pooled["delta_auc"] is None
    assert "alpine" in pooled["note"] and pooled["bootstrap"] == 0
    assert "alpine cannot be assessed" in result.html_path.read_text(encoding="utf-8")
    assert list(result.report["tasks"]) == ["metastasis"]
    assert doc["seeds"] == [3] and doc["regimes"] == ["real", "real+synthetic"]
    assert doc["ensembles"][0]["sets"][INTERNAL]["seed_auc_sd"] is None
    comp = doc["comparisons"][0]
    assert comp["sets"][INTERNAL]["seed_delta_auc"]["n"] == 1
    assert comp["sets"][INTERNAL]["seed_delta_auc"]["sd"] is None
    assert doc["skipped_comparisons"] == []
    validate_report(json.loads(result.json_path.read_text(encoding="utf-8")))


@pytest.fixture
def one_model(tmp_path: Path) -> Path:
    """A single small model folder to damage."""
    write_models(tmp_path / "c", tasks=("amyloidosis",), regimes=("real",), seeds=(0,))
    return tmp_path / "c" / "amyloidosis" / "real" / "seed0"


def test_missing_predictions_names_the_path(one_model: Path) -> None:
    (one_model / "predictions.parquet").unlink()
    with pytest.raises(ValidationInputError, match="predictions.parquet: missing") as err:
        discover_models(one_model.parents[2])
    assert str(one_model / "predictions.parquet") in str(err.value)


def test_corrupt_inputs_are_refused_with_the_reason(one_model: Path) -> None:
    predictions = one_model / "predictions.parquet"
    frame = pd.read_parquet(predictions)
    bad = frame.copy()
    bad.loc[3, "score"] = 1.5
    bad.to_parquet(predictions, index=False)
    with pytest.raises(ValidationInputError, match=r"score must be a probability"):
        load_model(one_model)
    frame.drop(columns=["label"]).to_parquet(predictions, index=False)
    with pytest.raises(ValidationInputError, match=r"missing column\(s\) \['label'\]"):
        load_model(one_model)
    predictions.write_bytes(b"not a parquet file")
    with pytest.raises(ValidationInputError, match="not a readable parquet file") as err:
        load_model(one_model)
    assert str(predictions) in str(err.value)
    frame.to_parquet(predictions, index=False)
    info = json.loads((one_model / "model.json").read_text(encoding="utf-8"))
    (one_model / "model.json").write_text(json.dumps({**info, "regime": "synthetic"}))
    with pytest.raises(ValidationInputError, match="says task/regime/seed"):
        load_model(one_model)
    (one_model / "model.json").write_text("{truncated")
    with pytest.raises(ValidationInputError, match="model.json: not valid JSON"):
        load_model(one_model)
    shutil.rmtree(one_model.parents[2])
    with pytest.raises(ValidationInputError, match="classifiers folder not found"):
        discover_models(one_model.parents[2])


def test_models_of_a_task_must_share_their_cases(tmp_path: Path) -> None:
    root = write_models(tmp_path / "c", tasks=("amyloidosis",), regimes=("real", "real_limited"),
                        seeds=(0,))
    path = root / "amyloidosis" / "real_limited" / "seed0" / "predictions.parquet"
    frame = pd.read_parquet(path)
    test_row = frame.index[frame["split"] == "test"][0]
    frame.loc[test_row, "label"] = 1 - frame.loc[test_row, "label"]
    frame.to_parquet(path, index=False)
    with pytest.raises(ValidationInputError, match="differ from those of") as err:
        run_validation(root, tmp_path / "reports", ValidateConfig(bootstrap=100))
    assert str(path) in str(err.value)
    assert not (tmp_path / "reports").exists()  # nothing half-written

"""Champion / challenger: a new classifier becomes @champion only when it beats the current one.

The gate's rules on fixed scores (no registry), then the registry path on small real model
folders: the first model is promoted ("no champion yet"), the champion is re-scored from its
registered weights on today's images, an equal model and one that is worse at one site stay
challengers with the reason, a better one is promoted; the validate stage writes the decisions
to promotion.json, the HTML report and MLflow tags.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from models.classifier import ScanClassifier
from tasks.artifacts.classifier_folder import write_classifier_folder
from tasks.artifacts.dataset import write_dataset
from tasks.artifacts.promotion_report import read_promotion
from tasks.config import PromotionConfig, load_config
from tasks.validate.champions import register_champions
from tasks.validate.promotion import gate, score_version
from tests.conftest import PARAMS

SITES = (("aurelia", "test"), ("northgate", "external"), ("coastal", "external"))
PER_SITE = 30
SIZE = (64, 16)


def _cases(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for site, split in SITES:
        labels = rng.permutation(np.arange(PER_SITE) % 3 == 0).astype(int)
        for i, label in enumerate(labels):
            rows.append({"study_uid": f"1.2.{site}.{i}", "pseudo_id": f"p-{site}-{i}",
                         "site": site, "split": split, "sex": "F", "age": 60.0,
                         "label": int(label)})
    return pd.DataFrame(rows)


def _perfect(cases: pd.DataFrame, rng: np.random.Generator, flip: str | None = None
             ) -> np.ndarray:
    label = cases["label"].to_numpy(dtype=float)
    if flip is not None:
        label = np.where(cases["site"] == flip, 1 - label, label)
    return np.clip(0.15 + 0.7 * label + rng.normal(0, 0.05, len(label)), 0, 1)


def test_gate_promotes_only_a_model_better_overall_and_not_worse_anywhere():
    rng = np.random.default_rng(0)
    cases = _cases(rng)
    cfg = PromotionConfig(tolerance=0.02, margin=0.0, alpha=0.05)
    old = rng.random(len(cases))
    better = gate(cases, _perfect(cases, rng), old, cfg)
    assert better.decision == "promoted" and better.reason.startswith("better overall")
    assert [s.site for s in better.sites] == ["aurelia", "coastal", "northgate"]
    assert better.pooled is not None and better.pooled.delta > 0.3
    same = gate(cases, old, old, cfg)
    assert same.decision == "challenger" and "not better overall" in same.reason
    assert same.pooled.delta == 0 and same.pooled.p_value == 1
    worse_at_one = gate(cases, _perfect(cases, rng, flip="coastal"), _perfect(cases, rng), cfg)
    assert worse_at_one.decision == "challenger"
    assert "worse than the champion at coastal" in worse_at_one.reason
    assert [s.site for s in worse_at_one.sites if s.blocks] == ["coastal"]
    # alpha 1.0: any drop beyond the tolerance blocks; a large tolerance lets it through.
    lenient = PromotionConfig(tolerance=1.0, margin=-1.0, alpha=1.0)
    assert gate(cases, _perfect(cases, rng, flip="coastal"), old, lenient).promote


def test_a_site_without_two_cases_of_each_class_is_named_not_counted():
    rng = np.random.default_rng(1)
    cases = _cases(rng)
    cases.loc[cases["site"] == "northgate", "label"] = 0
    cases.loc[cases.index[cases["site"] == "northgate"][0], "label"] = 1
    decision = gate(cases, _perfect(cases, rng), rng.random(len(cases)),
                    PromotionConfig(tolerance=0.02, margin=0.0, alpha=0.05))
    northgate = next(s for s in decision.sites if s.site == "northgate")
    assert northgate.delta is None and "not assessable (1 positive, 29 negative" in northgate.note
    assert decision.decision == "promoted" and "not assessable at northgate" in decision.reason


@pytest.fixture
def world(tmp_path: Path, mlflow_uri: str):
    """A processed dataset (three sites) and a way to write a trained-model folder for it."""
    rng = np.random.default_rng(7)
    cases = _cases(rng)
    processed = tmp_path / "processed"
    processed.mkdir()
    manifest = cases.assign(index=np.arange(len(cases)))
    images = rng.random((len(cases), 2, 128, 32)).astype(np.float16)
    write_dataset(processed, images, manifest)
    cfg = load_config(PARAMS, [f"ingest.output={processed}", f"mlflow.tracking_uri={mlflow_uri}",
                               f"validation.output={tmp_path / 'reports'}",
                               "validation.bootstrap=100", "validation.comparisons=[]"])
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("synthdx")

    def model(night: str, scores: np.ndarray | None, seed: int = 0) -> tuple[Path, dict]:
        torch_seed = 100 + len(night)
        import torch

        torch.manual_seed(torch_seed)
        module = ScanClassifier(widths=(8, 8, 16, 16), task="metastasis")
        with mlflow.start_run(run_name=f"train-{night}") as run:
            pass
        root = tmp_path / night
        folder = root / "metastasis" / "real" / f"seed{seed}"
        folder.mkdir(parents=True)
        info = {"task": "metastasis", "regime": "real", "seed": seed, "threshold": 0.5,
                "val_auc": 0.7, "image_size": list(SIZE), "mlflow_run_id": run.info.run_id,
                "lineage": {"processed": str(processed)}}
        predictions = cases.assign(score=0.5 if scores is None else scores)
        write_classifier_folder(folder, module, info, predictions)
        return root, {**info, "path": str(folder)}

    return cfg, cases, processed, model, rng


def test_registry_keeps_the_champion_until_a_model_earns_the_place(world):
    cfg, cases, processed, model, rng = world
    client = mlflow.MlflowClient()
    name = "synthdx-classifier-metastasis"

    _, first = model("night1", None)
    done = register_champions(cfg, [first])["metastasis"]
    assert (done["decision"], done["reason"], done["alias"]) == ("promoted", "no champion yet",
                                                                 "champion")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == first["mlflow_run_id"] and champion.tags["promotion"] == "promoted"
    # The champion as the registry holds it, scored on today's images (what the gate does).
    old = score_version(Path(first["path"]) / "model.pt", processed, cases["study_uid"])
    assert old.shape == (len(cases),) and np.isfinite(old).all()

    _, equal = model("night2", old)
    done = register_champions(cfg, [equal])["metastasis"]
    assert done["decision"] == "challenger" and "not better overall" in done["reason"]
    assert "delta AUC +0.000" in done["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == champion.version
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert challenger.run_id == equal["mlflow_run_id"]
    assert challenger.tags["promotion"] == "challenger"
    assert challenger.tags["compared_with"] == f"version {champion.version}"

    _, flipped = model("night3", _perfect(cases, rng, flip="coastal"))
    done = register_champions(cfg, [flipped])["metastasis"]
    assert done["decision"] == "challenger" and "at coastal" in done["reason"]
    assert client.get_model_version_by_alias(name, "champion").version == champion.version

    _, better = model("night4", _perfect(cases, rng))
    done = register_champions(cfg, [better])["metastasis"]
    assert done["decision"] == "promoted" and done["reason"].startswith("better overall")
    assert client.get_model_version_by_alias(name, "champion").run_id == better["mlflow_run_id"]
    again = register_champions(cfg, [better])["metastasis"]  # validation rerun, same models
    assert again["decision"] == "kept" and again["version"] == done["version"]


def test_validate_stage_reports_the_decision(world):
    from tasks.validate.stage import validate_stage

    cfg, cases, _, model, rng = world
    root, _ = model("night1", _perfect(cases, rng))
    cfg.validation.classifiers = root
    summary = validate_stage(cfg)
    assert "promotion metastasis: promoted" in summary.describe()
    doc = read_promotion(Path(cfg.validation.output) / "promotion.json")
    assert doc is not None and doc["settings"] == {"tolerance": 0.02, "margin": 0.0,
                                                   "alpha": 0.05}
    assert doc["tasks"]["metastasis"]["reason"] == "no champion yet"
    assert 'id="promotion"' in summary.result.html_path.read_text()
    run = mlflow.MlflowClient().get_run(summary.mlflow_run_id)
    assert run.data.tags["synthdx.promotion.metastasis"] == "promoted"
    assert json.loads(json.dumps(doc))["tasks"]["metastasis"]["champion"] is None


def _declared_outputs(stage: str) -> list[str]:
    """Every path dvc.yaml declares as the stage's output or metrics file."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())
    entries = spec["stages"][stage].get("outs", []) + spec["stages"][stage].get("metrics", [])
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def test_validate_with_registration_off_writes_every_declared_output(world):
    """A ``dvc exp`` grid point turns registration off; validate must still write all it
    declares, and last run's decisions must not stand for this run's."""
    from tasks.validate.stage import validate_stage

    cfg, cases, _, model, rng = world
    root, _ = model("night1", _perfect(cases, rng))
    cfg.validation.classifiers = root
    validate_stage(cfg)  # registration on: a decision for metastasis
    reports = Path(cfg.validation.output)
    assert read_promotion(reports / "promotion.json")["tasks"]

    cfg.classifier.registered_model_prefix = None
    summary = validate_stage(cfg)
    declared = _declared_outputs("validate")
    assert "reports/promotion.json" in declared
    missing = [p for p in declared if not (reports / Path(p).relative_to("reports")).exists()]
    assert missing == []
    doc = read_promotion(reports / "promotion.json")
    assert doc["tasks"] == {} and "registration is off" in doc["note"]
    assert "promotion none: registration is off" in summary.describe()
    assert summary.champions == {}

# --- the generator's gate (on its audit) --------------------------------------------------------

GEN = {"quality": {"fid": 10.0, "precision": 0.8, "recall": 0.7, "two_sample_auc": 0.6},
       "privacy": {"median_ncc": 0.5}, "withheld_fraction": 0.05}


def _worse(**changes: float) -> dict:
    doc = json.loads(json.dumps(GEN))
    for key, value in changes.items():
        (doc if key == "withheld_fraction" else
         doc["privacy"] if key == "median_ncc" else doc["quality"])[key] = value
    return doc


def test_generator_gate_rules():
    from tasks.audit.gate import compare, gate_metrics
    from tasks.config import AuditPromotionConfig

    cfg = AuditPromotionConfig(fid_tolerance=0.1, quality_tolerance=0.05,
                               privacy_tolerance=0.02, margin=0.0)
    old = gate_metrics(GEN)
    assert compare(gate_metrics(_worse(fid=9.0)), old, cfg)[0] == "promoted"
    decision, reason, _ = compare(gate_metrics(_worse(fid=9.0, withheld_fraction=0.2)), old, cfg)
    assert decision == "challenger" and "withheld_fraction 0.2 vs 0.05" in reason
    decision, reason, _ = compare(gate_metrics(_worse(fid=9.0, two_sample_auc=0.3)), old, cfg)
    assert decision == "challenger" and "two_sample_gap" in reason
    decision, reason, _ = compare(gate_metrics(_worse(fid=10.5)), old, cfg)
    assert decision == "challenger" and reason.startswith("not better overall: FID 10.5")
    # Values equal to four digits are shown with the digits that tell them apart.
    near = GEN["quality"]["fid"] * (1 + 2e-6)
    decision, reason, _ = compare(gate_metrics(_worse(fid=near)), old, cfg)
    shown, old_shown = reason.split("FID ")[1].split(" (")[0].split(" vs the champion's ")
    assert decision == "challenger" and shown != old_shown and float(shown) > float(old_shown)


def test_distinct_digits():
    from tasks.audit.gate import distinct

    assert distinct(5559.2, 5559.3) == ("5559.2", "5559.3")
    assert distinct(5559.0, 5559.0) == ("5559", "5559")
    assert distinct(12.5, 9.0) == ("12.5", "9")


def test_a_refused_generator_releases_the_champions_set(tmp_path: Path, mlflow_uri: str):
    from tasks.audit.gate import fetch_champion_released, gate_generator, record_generator

    cfg = load_config(PARAMS, [f"mlflow.tracking_uri={mlflow_uri}"])
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_experiment("synthdx")
    client = mlflow.MlflowClient()
    name = "synthdx-bone-scan-diffusion"
    client.create_registered_model(name)
    versions = []
    for _ in range(2):
        with mlflow.start_run() as run:
            mlflow.log_text("w", "diffusion_model/w.txt")
        versions.append(client.create_model_version(name, f"runs:/{run.info.run_id}/"
                                                    "diffusion_model", run.info.run_id).version)
    synthesis = {"model": {"registered_name": name, "registered_version": str(versions[0])}}
    first = gate_generator(cfg, synthesis, GEN)
    assert (first.decision, first.reason) == ("promoted", "no champion yet")
    released = tmp_path / "released"
    released.mkdir()
    write_dataset(released, np.zeros((3, 2, 8, 4), np.float16),
                  pd.DataFrame({"index": [0, 1, 2], "sample_id": ["a", "b", "c"]}))
    with mlflow.start_run() as audit_run:
        record_generator(cfg, first.as_dict(), audit_run.info.run_id, released)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["audit.fid"] == "10.0" and champion.tags["promotion"] == "promoted"

    synthesis["model"]["registered_version"] = str(versions[1])
    second = gate_generator(cfg, synthesis, _worse(fid=9.0, withheld_fraction=0.3))
    assert second.decision == "challenger" and "withheld_fraction" in second.reason
    assert second.champion_audit_run == audit_run.info.run_id
    fetched = fetch_champion_released(cfg, second, tmp_path / "out" / "released")
    assert fetched == tmp_path / "out" / "released"
    assert pd.read_parquet(fetched / "manifest.parquet")["sample_id"].tolist() == ["a", "b", "c"]
    with mlflow.start_run() as audit_run2:
        record_generator(cfg, second.as_dict(), audit_run2.info.run_id, released)
    assert str(client.get_model_version_by_alias(name, "challenger").version) == str(versions[1])
    assert str(client.get_model_version_by_alias(name, "champion").version) == str(versions[0])
    tags = client.get_run(audit_run2.info.run_id).data.tags
    assert tags["synthdx.generator_gate"] == "challenger"

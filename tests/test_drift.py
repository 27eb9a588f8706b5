"""Drift per site: each ingest's sites against the data the current champion was trained on.

The comparison on small real profiles (a new camera at a known site, a new site, a few new
studies that are not judged), then the stage end to end: without a champion it says there is
no reference; a promoted champion records its reference (with the audit's encoder) and the next
ingest's new camera is flagged by name in drift.json and in MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from models.audit_encoder import AuditEncoder
from tasks.artifacts.audit_output import ENCODER_FILE, write_encoder
from tasks.artifacts.dataset import write_dataset
from tasks.artifacts.drift_report import drift_markdown, read_drift
from tasks.config import DriftConfig, load_config
from tasks.drift.compare import compare_sites, first_night, smd
from tasks.drift.stage import NO_REFERENCE, run_drift
from tasks.drift.tracking import log_drift
from tests.conftest import PARAMS

CAMERAS = {"aurelia": ("Siemens", "Symbia Intevo", 2.4, 1.0),
           "northgate": ("GE Healthcare", "Discovery NM/CT 670", 2.21, 1.0)}
NEW_CAMERA = ("Philips", "Forte", 4.8, 2.5)


def _studies(rng: np.random.Generator, site: str, n: int, start: int,
             camera: tuple[str, str, float, float]) -> tuple[pd.DataFrame, np.ndarray]:
    maker, model, pixel_mm, scale = camera
    images = np.clip(rng.random((n, 2, 64, 16)) * 0.4 * scale, 0, 1).astype(np.float16)
    rows = pd.DataFrame({
        "study_uid": [f"1.2.{site}.{start + i}" for i in range(n)], "site": site,
        "split": "external", "manufacturer": maker, "model": model, "tracer": "HMDP",
        "pixel_mm": pixel_mm, "counts_anterior": rng.normal(1e6, 1e5, n) * scale,
        "counts_posterior": rng.normal(1e6, 1e5, n) * scale,
        "intensity_reference": rng.normal(40, 4, n) * scale,
        "metastasis": rng.random(n) < 0.3, "perugini_grade": (rng.random(n) < 0.1) * 2})
    return rows, images


def _dataset(folder: Path, parts: list[tuple[pd.DataFrame, np.ndarray]]) -> Path:
    folder.mkdir(parents=True)
    manifest = pd.concat([p[0] for p in parts], ignore_index=True)
    manifest.insert(0, "index", np.arange(len(manifest)))
    write_dataset(folder, np.concatenate([p[1] for p in parts]), manifest)
    return folder


def _profile(rows: pd.DataFrame, features: np.ndarray):
    from tasks.artifacts.drift_reference import DataProfile

    return DataProfile(rows=rows.reset_index(drop=True), features=features)


def _rows(site: str, n: int, start: int, camera: str, level: float, rng) -> pd.DataFrame:
    return pd.DataFrame({"study_uid": [f"{site}.{start + i}" for i in range(n)], "site": site,
                         "split": "external", "camera": camera, "tracer": "DPD",
                         "pixel_mm": 2.4, "counts": rng.normal(2e6, 2e5, n),
                         "intensity_reference": rng.normal(40, 4, n),
                         "mean_intensity": rng.normal(level, 0.01, n),
                         "metastasis": (rng.random(n) < 0.3).astype(float),
                         "amyloid": (rng.random(n) < 0.1).astype(float)})


def test_sites_are_compared_by_their_new_studies_and_named_when_new():
    rng = np.random.default_rng(0)
    cfg = DriftConfig(output=Path("x"), min_new_studies=5, smd=0.5, pixel_mm=0.05,
                      prevalence=0.15, feature_shift=0.5)
    ref_rows = pd.concat([_rows("aurelia", 40, 0, "Siemens Symbia", 0.20, rng),
                          _rows("northgate", 40, 0, "GE Discovery", 0.20, rng)])
    ref_feats = rng.normal(size=(80, 8))
    new_rows = pd.concat([ref_rows,
                          _rows("aurelia", 3, 100, "Siemens Symbia", 0.20, rng),
                          _rows("northgate", 8, 100, "Philips Forte", 0.30, rng),
                          _rows("harbour", 6, 0, "Mediso AnyScan", 0.20, rng)])
    new_feats = np.concatenate([ref_feats, rng.normal(size=(3, 8)),
                                rng.normal(2.0, 1.0, size=(8, 8)), rng.normal(size=(6, 8))])
    table = {r.site: r for r in compare_sites(_profile(ref_rows, ref_feats),
                                              _profile(new_rows, new_feats), cfg)}
    assert set(table) == {"aurelia", "harbour", "northgate"}
    aurelia = table["aurelia"]
    assert (aurelia.status, aurelia.n_new, aurelia.n_now, aurelia.judged) == ("known", 3, 43,
                                                                              False)
    assert not aurelia.flagged and aurelia.intensity_smd is not None  # shown, not judged
    northgate = table["northgate"]
    assert northgate.new_cameras == ["Philips Forte"] and northgate.judged
    assert "new camera at northgate: Philips Forte" in northgate.flags
    assert any(f.startswith("intensity shift") for f in northgate.flags)
    assert any(f.startswith("feature shift") for f in northgate.flags)
    assert northgate.feature_shift > 1.5
    assert table["harbour"].status == "new site"
    assert table["harbour"].flags[0] == "new site harbour (camera Mediso AnyScan)"
    # A night with nothing new at a site: no numbers, no flags.
    quiet = {r.site: r for r in compare_sites(_profile(ref_rows, ref_feats),
                                              _profile(ref_rows, ref_feats), cfg)}
    assert quiet["aurelia"].status == "no new studies" and not quiet["aurelia"].flagged
    assert smd([1, 1], [1, 1]) == 0.0 and smd([2, 2], [1, 1]) == 99.0
    rows = first_night(_profile(new_rows, new_feats))
    assert [r.status for r in rows] == ["no reference"] * 3 and not any(r.flagged for r in rows)


@pytest.fixture
def project(tmp_path: Path, mlflow_uri: str):
    rng = np.random.default_rng(3)
    night1 = [_studies(rng, site, 24, 0, cam) for site, cam in CAMERAS.items()]
    processed = _dataset(tmp_path / "processed", night1)
    audit = tmp_path / "audit"
    audit.mkdir()
    torch.manual_seed(0)
    write_encoder(audit / ENCODER_FILE, AuditEncoder(2, 16, {"grade": 4, "metastasis": 1}).eval(),
                  (64, 16))
    cfg = load_config(PARAMS, [f"ingest.output={processed}", f"audit.output={audit}",
                               f"drift.output={tmp_path / 'reports/drift.json'}",
                               f"mlflow.tracking_uri={mlflow_uri}"])
    return cfg, processed, night1, rng


def test_drift_stage_flags_a_new_camera_against_the_champions_reference(project, tmp_path):
    from tasks.validate.stage import record_drift_references

    cfg, processed, night1, rng = project
    first = log_drift(cfg, run_drift(cfg))
    assert first.doc["reference"] is None and first.doc["note"] == NO_REFERENCE
    assert [s["site"] for s in first.doc["sites"]] == ["aurelia", "northgate"]
    assert first.flagged == [] and "no champion yet" in first.describe()

    # A champion is promoted: the validate stage records the data it was trained on.
    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "classifier/model.txt")
    name = "synthdx-classifier-metastasis"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/classifier",
                                          run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)
    record_drift_references(cfg, {"metastasis": {
        "decision": "promoted", "processed": str(processed), "name": name,
        "version": str(version), "run_id": run.info.run_id}})
    assert client.get_model_version(name, version).tags["drift_reference"].endswith(
        "/drift_reference")

    # The next ingest: northgate bought a new camera; aurelia adds two studies.
    night2 = [*night1, _studies(rng, "northgate", 10, 100, NEW_CAMERA),
              _studies(rng, "aurelia", 2, 100, CAMERAS["aurelia"])]
    import shutil

    shutil.rmtree(processed)
    _dataset(processed, night2)
    result = log_drift(cfg, run_drift(cfg))
    assert result.flagged == ["northgate"]
    sites = {s["site"]: s for s in result.doc["sites"]}
    assert sites["northgate"]["flags"][0] == "new camera at northgate: Philips Forte"
    assert sites["northgate"]["n_new"] == 10 and sites["northgate"]["feature_shift"] is not None
    assert sites["aurelia"]["n_new"] == 2 and not sites["aurelia"]["judged"]
    assert result.doc["reference"]["model"] == name
    on_disk = read_drift(Path(cfg.drift.output))
    assert on_disk is not None and on_disk["flagged"] == ["northgate"]
    assert "**DRIFT** new camera at northgate: Philips Forte" in drift_markdown(on_disk)
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags["synthdx.drift.flagged"] == "northgate"
    assert "new camera at northgate" in tags["synthdx.drift.northgate"]
    assert client.get_run(result.mlflow_run_id).data.metrics["drift.northgate.flagged"] == 1.0


def test_pipeline_summary_shows_decisions_and_the_drift_table(tmp_path: Path):
    from flows.orchestration.summary import PipelineSummary, StageOutcome, loop_results
    from tasks.artifacts.drift_report import write_drift
    from tasks.artifacts.promotion_report import write_promotion

    assert loop_results(tmp_path, tmp_path / "drift.json") == ([], None, {})
    write_promotion(tmp_path / "promotion.json", {"tolerance": 0.02, "margin": 0.0,
                                                  "alpha": 0.05},
                    {"metastasis": {"decision": "challenger", "name": "m", "version": "2",
                                    "reason": "not better overall: pooled delta AUC -0.010"}})
    write_drift(tmp_path / "drift.json", {
        "reference": {"model": "m", "version": "1", "images": 80}, "note": "",
        "sites": [{"site": "northgate", "status": "known", "n_new": 9, "n_now": 30,
                   "judged": True, "flagged": True,
                   "flags": ["new camera at northgate: Philips Forte"]}],
        "flagged": ["northgate"]})
    (tmp_path / "audit.json").write_text(json.dumps({"generator_gate": {
        "decision": "promoted", "reason": "no champion yet", "name": "g", "version": "1"}}))
    lines, drift, tags = loop_results(tmp_path, tmp_path / "drift.json", tmp_path / "audit.json")
    assert lines == ["metastasis: challenger m v2: not better overall: pooled delta AUC -0.010",
                     "generator: promoted g v1: no champion yet"]
    assert tags == {"synthdx.promotion.metastasis": "challenger: not better overall: pooled "
                    "delta AUC -0.010", "synthdx.promotion.generator": "promoted: no champion yet",
                    "synthdx.drift.flagged": "northgate"}
    summary = PipelineSummary(profile="tiny", stages=[StageOutcome("drift", "ran", 1.0, 1)],
                              promotion=lines, drift=drift)
    markdown = summary.markdown()
    assert "## Champion / challenger" in markdown and "- metastasis: challenger m v2" in markdown
    assert "| northgate | known | 9 / 30 |" in markdown
    assert "**DRIFT** new camera at northgate: Philips Forte" in markdown
    assert "drift: northgate FLAGGED: new camera at northgate" in summary.describe()

"""The audit stage: metric units, input errors, and whole audits that pass and that fail.

The data are small structured images drawn in the test (a faint body band, random smooth
blobs, cardiac uptake growing with the Perugini grade, focal spots for metastases), so two
independent draws are never near-identical while planted copies of training images are.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from tasks.audit.data import AuditInputError, AuditInputMissing, open_processed, open_synthetic
from tasks.audit.pipeline import run_audit
from tasks.audit.privacy import nearest_ncc, normalise
from tasks.audit.quality import (
    frechet_distance,
    msssim_pairs,
    msssim_setup,
    prdc,
    two_sample_auc,
)
from tasks.audit.tracking import log_audit
from tasks.config import load_config
from tests.conftest import PARAMS

REAL_SIZE = (128, 32)
SYN_SIZE = (64, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(rng: np.random.Generator, grade: int, metastasis: bool,
          size: tuple[int, int] = REAL_SIZE) -> np.ndarray:
    """One two-view image in [0, 1] with the findings drawn in."""
    rows, cols = size
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)

    def blob(y: float, x: float, sigma: float) -> np.ndarray:
        return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma ** 2))

    view = 0.12 * np.exp(-((xx - cols / 2 + rng.normal(0, 1)) / rng.uniform(5, 8)) ** 2)
    for _ in range(int(rng.integers(5, 9))):
        view += rng.uniform(0.15, 0.45) * blob(rng.uniform(4, rows - 4), rng.uniform(3, cols - 3),
                                               rng.uniform(2.0, 4.5))
    view += 0.25 * grade * blob(0.3 * rows, 0.6 * cols, 3.0)
    if metastasis:
        for _ in range(3):
            view += 0.8 * blob(rng.uniform(4, rows - 4), rng.uniform(3, cols - 3), 1.0)
    image = np.stack([view, 0.9 * view[:, ::-1]])
    return np.clip(image + rng.normal(0, 0.01, image.shape), 0.0, 1.0)


def _labels(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    grade = rng.choice(4, size=n, p=[0.55, 0.15, 0.15, 0.15])
    return grade, rng.random(n) < 0.3


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return F.interpolate(torch.from_numpy(images).float(), size=size, mode="area").numpy()


def _write_synthetic(root: Path, images: np.ndarray, grade: np.ndarray, metastasis: np.ndarray,
                     ids: list[str]) -> Path:
    root.mkdir(parents=True)
    np.save(root / "images.npy", images.astype(np.float16))
    pd.DataFrame({
        "index": np.arange(len(images)), "sample_id": ids, "split": "synthetic",
        "group": "all", "site": "aurelia", "perugini_grade": grade.astype(np.int64),
        "amyloid": grade > 0, "metastasis": metastasis, "sex": None,
        "seed": np.arange(len(images)), "sampler": "ddim", "steps": 10,
        "guidance_scale": 3.0, "model_version": "test",
    }).to_parquet(root / "manifest.parquet", index=False)
    (root / "synthesis.json").write_text(json.dumps({"generator": "test"}))
    return root


def _fresh(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` independent draws from the real generator, at the synthetic resolution."""
    rng = np.random.default_rng(seed)
    grade, met = _labels(n, rng)
    images = np.stack([_draw(rng, int(g), bool(m)) for g, m in zip(grade, met, strict=True)])
    return _resize(images, SYN_SIZE), grade, met


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed folder: 100 train, 30 val, 30 test images at 128 x 32."""
    root = tmp_path_factory.mktemp("audit") / "processed"
    root.mkdir()
    rng = np.random.default_rng(0)
    n = 160
    grade, met = _labels(n, rng)
    images = np.stack([_draw(rng, int(g), bool(m)) for g, m in zip(grade, met, strict=True)])
    np.save(root / "images.npy", images.astype(np.float16))
    pd.DataFrame({
        "index": np.arange(n), "pseudo_id": [f"P{i:04d}" for i in range(n)],
        "split": ["train"] * 100 + ["val"] * 30 + ["test"] * 30, "site": "aurelia",
        "perugini_grade": grade.astype(np.int64), "amyloid": grade > 0, "metastasis": met,
        "sex": "F",
    }).to_parquet(root / "manifest.parquet", index=False)
    return root


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory: pytest.TempPathFactory):
    """One temporary SQLite store for the audits whose MLflow runs are not inspected.

    Creating a store costs seconds; the MLflow test itself uses conftest's private store.
    """
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("SYNTHDX_PARENT_RUN_ID", raising=False)
        yield uri


def _cfg(tmp_path: Path, processed: Path, synthetic: Path, reports: bool = True):
    """Audit settings for the small test sets; ``reports=False`` keeps the project's reports_dir."""
    return load_config(PARAMS, _overrides(tmp_path, processed, synthetic, reports))


def _overrides(tmp_path: Path, processed: Path, synthetic: Path, reports: bool = True
               ) -> list[str]:
    return [
        f"ingest.output={processed}", f"audit.synthetic={synthetic}",
        f"audit.output={tmp_path / 'audit'}",
        *([f"reports_dir={tmp_path / 'reports'}"] if reports else []),
        "audit.encoder.epochs=4", "audit.encoder.batch_size=32", "audit.encoder.feature_dim=32",
        "audit.two_sample_folds=3", "audit.pixel_critic_steps=60", "audit.msssim_pairs=40",
        "audit.privacy.pairs_shown=4", "audit.tstr.steps=0"]  # TSTR: tests/test_audit_tstr.py


# --- metric units -------------------------------------------------------------------------


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    x = np.random.default_rng(1).normal(size=(400, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(x, x + 2.0)
    assert shifted == pytest.approx(8 * 2.0 ** 2, rel=1e-3)  # |mean difference|^2
    small = frechet_distance(x[:20], x[:20] * 3.0)  # 20 points in 8-D: still finite, > 0
    assert np.isfinite(small) and small > 1.0


def test_prdc_of_a_set_with_itself_is_perfect_and_mode_collapse_loses_coverage():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(300, 8))
    same = prdc(real, real, k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    fresh = prdc(real, rng.normal(size=(300, 8)), k=5)
    assert fresh["coverage"] > 0.8 and fresh["precision"] > 0.8
    collapsed = prdc(real, real[0] + 0.05 * rng.normal(size=(300, 8)), k=5)
    assert collapsed["coverage"] < 0.1 and collapsed["recall"] < 0.1
    assert collapsed["precision"] > 0.9  # every collapsed sample is still realistic
    assert prdc(real[:4], real[:3], k=5)["k"] == 2  # k capped by the set size


def test_two_sample_auc_is_chance_for_one_distribution_and_high_for_two():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    assert abs(two_sample_auc(a, b, folds=5, seed=0) - 0.5) < 0.08
    assert two_sample_auc(a, b + 1.5, folds=5, seed=0) > 0.95
    assert two_sample_auc(a[:1], b, folds=5, seed=0) is None


def test_msssim_fits_the_image_size_and_measures_diversity():
    assert msssim_setup((512, 128)) == (7, pytest.approx(
        (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), abs=1e-4))
    kernel, weights = msssim_setup((128, 32))
    assert kernel == 7 and len(weights) == 3 and sum(weights) == pytest.approx(1.0)
    assert len(msssim_setup((64, 16))[1]) == 2
    with pytest.raises(ValueError, match="too small"):
        msssim_setup((4, 2))
    rng = np.random.default_rng(4)
    one = torch.from_numpy(_draw(rng, 1, False)).float()
    collapsed = one.expand(10, -1, -1, -1).clone()
    varied = torch.from_numpy(np.stack([_draw(rng, 1, False) for _ in range(10)])).float()
    assert msssim_pairs(collapsed, 30, seed=0) == pytest.approx(1.0, abs=1e-4)
    assert msssim_pairs(varied, 30, seed=0) < 0.9
    assert msssim_pairs(varied[:1], 30, seed=0) is None


def test_nearest_ncc_matches_brute_force_and_ignores_brightness():
    torch.manual_seed(5)
    ref = torch.rand(30, 2, 16, 8)
    queries = torch.cat([ref[7:8] * 0.4 + 0.1, torch.rand(5, 2, 16, 8)])
    idx, ncc = nearest_ncc(queries, ref, torch.device("cpu"), chunk=4)
    assert idx[0] == 7 and ncc[0] == pytest.approx(1.0, abs=1e-5)
    q = normalise(queries).numpy()
    r = normalise(ref).numpy()
    brute = q @ r.T
    assert np.array_equal(idx, brute.argmax(1))
    np.testing.assert_allclose(ncc, brute.max(1), atol=1e-5)
    assert np.all(ncc <= 1.0)


# --- input errors ---------------------------------------------------------------------------


def test_missing_or_mismatched_inputs_name_the_path(tmp_path, processed):
    real = open_processed(processed)
    with pytest.raises(AuditInputMissing, match=str(tmp_path / "nowhere")):
        open_synthetic(tmp_path / "nowhere", real)
    with pytest.raises(FileNotFoundError, match="processed dataset"):
        open_processed(tmp_path / "no_processed")
    images, grade, met = _fresh(4, seed=9)
    three = np.concatenate([images, images[:, :1]], axis=1)
    bad = _write_synthetic(tmp_path / "three_channels", three, grade, met,
                           [f"s{i}" for i in range(4)])
    with pytest.raises(AuditInputError, match=r"three_channels.*images\.npy.*shape"):
        open_synthetic(bad, real)
    dup = _write_synthetic(tmp_path / "dup", images, grade, met, ["a", "a", "b", "c"])
    with pytest.raises(AuditInputError, match="sample_id is not unique"):
        open_synthetic(dup, real)
    nan = images.copy()
    nan[2, 0, 3, 3] = np.nan
    nan_root = _write_synthetic(tmp_path / "nan", nan, grade, met, [f"s{i}" for i in range(4)])
    with pytest.raises(AuditInputError, match=r"nan.*images\.npy: non-finite.*row\(s\) 2"):
        open_synthetic(nan_root, real).load(None, SYN_SIZE)


def test_processed_without_held_out_split_is_refused(tmp_path, processed):
    root = tmp_path / "train_only"
    root.mkdir()
    (root / "images.npy").write_bytes((processed / "images.npy").read_bytes())
    manifest = pd.read_parquet(processed / "manifest.parquet")
    manifest["split"] = "train"
    manifest.to_parquet(root / "manifest.parquet")
    with pytest.raises(AuditInputError, match="no held-out split"):
        open_processed(root)


# --- whole audits -----------------------------------------------------------------------------


def test_fresh_draws_pass_and_planted_copies_are_withheld(tmp_path, processed, mlflow_uri):
    fresh, grade, met = _fresh(60, seed=11)
    real = np.load(processed / "images.npy").astype(np.float32)
    real_manifest = pd.read_parquet(processed / "manifest.parquet")
    sources = np.array([3, 17, 42, 58, 71, 99])  # training rows (train = rows 0..99)
    copies = _resize(real[sources], SYN_SIZE)
    noised = np.clip(copies + np.random.default_rng(12).normal(0, 0.02, copies.shape), 0, 1)
    shifted = np.roll(copies, shift=(1, 1), axis=(-2, -1))
    planted = np.concatenate([copies, noised, shifted])
    planted_ids = ([f"copy-{s}" for s in sources] + [f"noised-{s}" for s in sources]
                   + [f"shifted-{s}" for s in sources])
    src_grade = real_manifest["perugini_grade"].to_numpy()[sources]
    src_met = real_manifest["metastasis"].to_numpy()[sources]
    synthetic = _write_synthetic(
        tmp_path / "synthetic", np.concatenate([fresh, planted]),
        np.concatenate([grade, np.tile(src_grade, 3)]), np.concatenate([met, np.tile(src_met, 3)]),
        [f"syn-{i:07d}" for i in range(60)] + planted_ids)

    cfg = _cfg(tmp_path, processed, synthetic)
    work = run_audit(cfg)
    assert work.mlflow_run_id is None  # the work opens no MLflow run: the adapter does
    result = log_audit(cfg, work)

    out = tmp_path / "audit"
    withheld = pd.read_csv(out / "withheld.csv")
    assert set(planted_ids) <= set(withheld["sample_id"])  # every copy caught
    fresh_withheld = set(withheld["sample_id"]) - set(planted_ids)
    assert len(fresh_withheld) <= 2  # ~1 % of new images by construction of the threshold
    exact = withheld.set_index("sample_id").loc[[f"copy-{s}" for s in sources]]
    assert list(exact["nearest_train_index"]) == list(sources)
    assert list(exact["nearest_train_pseudo_id"]) == [f"P{s:04d}" for s in sources]
    assert (exact["ncc"] > 0.999).all() and (exact["ssim"] > 0.99).all()

    released = pd.read_parquet(out / "released" / "manifest.parquet")
    released_images = np.load(out / "released" / "images.npy")
    assert not set(released["sample_id"]) & set(withheld["sample_id"])
    assert len(released) == result.released == 78 - len(withheld)
    assert list(released["index"]) == list(range(len(released)))
    original = np.load(synthetic / "images.npy")
    positions = [int(s.split("-")[1]) for s in released["sample_id"]]
    assert np.array_equal(released_images, original[positions])
    assert (out / "released" / "synthesis.json").is_file()
    assert (out / "nearest_pairs.png").stat().st_size > 10_000

    doc = json.loads((out / "audit.json").read_text())
    privacy = doc["privacy"]
    assert privacy["withheld"] == len(withheld) == result.withheld
    assert privacy["heldout"]["n"] == 60
    assert privacy["threshold_ncc"] < 0.999 and result.max_ncc > privacy["threshold_ncc"]
    assert {c["sample_id"] for c in privacy["closest"]} <= set(withheld["sample_id"])
    assert set(doc["quality"]["per_class"]) == {"normal", "amyloid", "amyloid_grade1",
                                                "amyloid_grade2", "amyloid_grade3",
                                                "metastasis"}
    metrics = json.loads((tmp_path / "reports" / "audit_metrics.json").read_text())
    assert metrics["withheld"] == result.withheld
    assert "seconds" not in json.dumps(metrics)
    # audit.json is a DVC output: nothing that differs between two runs on the same inputs.
    assert not {"timings_seconds", "mlflow_run_id"} & set(doc)
    assert "seconds" not in doc["encoder"] and "seconds" not in doc["quality"]["tstr"]

    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.tags["synthdx.stage"] == "audit"
    assert run.data.metrics["withheld"] == result.withheld
    assert {"quality/fid", "quality/two_sample_auc_pixels", "privacy/threshold_ncc",
            "per_class/normal/coverage"} <= set(run.data.metrics)
    assert run.data.params["audit.privacy.quantile"] == "0.99"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"audit.json", "nearest_pairs.png", "withheld.csv"} <= artifacts
    assert {"seconds/total", "seconds/encoder_training"} <= set(run.data.metrics)
    assert "withheld" in result.describe() and str(result.withheld) in result.describe()


def test_a_generator_overfit_on_a_handful_of_images_fails_the_audit(tmp_path, processed,
                                                                       shared_mlflow):
    rng = np.random.default_rng(31)
    real = np.load(processed / "images.npy").astype(np.float32)
    manifest = pd.read_parquet(processed / "manifest.parquet")
    sources = np.array([5, 6, 7, 8])[np.arange(40) % 4]  # 40 outputs, 4 memorised scans
    images = _resize(real[sources], SYN_SIZE) + rng.normal(0, 0.02, (40, 2, *SYN_SIZE))
    images = np.roll(np.clip(images, 0, 1), shift=1, axis=-1)
    synthetic = _write_synthetic(
        tmp_path / "synthetic", images, manifest["perugini_grade"].to_numpy()[sources],
        manifest["metastasis"].to_numpy()[sources], [f"syn-{i:07d}" for i in range(40)])
    result = run_audit(_cfg(tmp_path, processed, synthetic))
    assert result.withheld == 40 and result.released == 0
    assert pd.read_parquet(tmp_path / "audit" / "released" / "manifest.parquet").empty
    withheld = pd.read_csv(tmp_path / "audit" / "withheld.csv")
    assert set(withheld["nearest_train_index"]) == {5, 6, 7, 8}
    overall = json.loads((tmp_path / "audit" / "audit.json").read_text())["quality"]["overall"]
    assert result.coverage < 0.3  # four modes cannot cover the training set
    assert overall["msssim_synthetic"] > overall["msssim_real"] + 0.1  # collapse


def test_quality_tells_a_faithful_generator_from_a_blurry_one(tmp_path, processed,
                                                              shared_mlflow):
    fresh, grade, met = _fresh(80, seed=21)
    ids = [f"syn-{i:07d}" for i in range(80)]
    good = run_audit(_cfg(tmp_path / "good", processed,
                          _write_synthetic(tmp_path / "good_syn", fresh, grade, met, ids)))
    blurry = F.avg_pool2d(torch.from_numpy(fresh), 5, stride=1, padding=2,
                          count_include_pad=False).numpy() * 0.6
    bad = run_audit(_cfg(tmp_path / "bad", processed,
                         _write_synthetic(tmp_path / "bad_syn", blurry, grade, met, ids)))
    assert good.withheld <= 2
    assert good.two_sample_auc_features < 0.8 and good.two_sample_auc_pixels < 0.8
    assert bad.two_sample_auc_features > 0.9 and bad.two_sample_auc_pixels > 0.9
    assert good.fid < 2 * good.fid_reference
    assert bad.fid > 4 * good.fid
    assert bad.recall < 0.6 < good.recall


def test_audit_elsewhere_leaves_the_project_metrics_alone(tmp_path, processed, shared_mlflow,
                                                          monkeypatch):
    """``synthdx audit --output DIR`` must not overwrite reports/audit_metrics.json."""
    monkeypatch.chdir(tmp_path)
    project_metrics = tmp_path / "reports" / "audit_metrics.json"
    project_metrics.parent.mkdir()
    project_metrics.write_text('{"withheld": 0}\n')
    fresh, grade, met = _fresh(40, seed=41)
    synthetic = _write_synthetic(tmp_path / "synthetic", fresh, grade, met,
                                 [f"syn-{i:07d}" for i in range(40)])

    result = run_audit(_cfg(tmp_path / "elsewhere", processed, synthetic, reports=False))

    assert project_metrics.read_text() == '{"withheld": 0}\n'
    assert result.metrics_path is None and "DVC metrics: not written" in result.describe()
    assert (tmp_path / "elsewhere" / "audit" / "audit.json").is_file()


def test_audit_flow_is_the_audit_prefect_flow():
    from flows.stage_flow import flow_of
    from flows.stages import stage

    assert flow_of(stage("audit")).name == "audit"


def test_label_inconsistent_images_are_withheld_from_the_released_set(tmp_path, processed,
                                                                     shared_mlflow):
    """With the consistency check on, images whose lesions contradict their label are withheld.

    Twelve of sixty fresh draws get the opposite metastasis label (lesions drawn, labelled
    free, or the reverse): what a generator that ignores its condition produces. They leave
    the released set with ``label_inconsistent`` in withheld.csv; the audit reports the check
    and the TSTR of what is released.
    """
    fresh, grade, met = _fresh(60, seed=21)
    flipped = np.zeros(60, dtype=bool)
    flipped[np.flatnonzero(met)[:6]] = True
    flipped[np.flatnonzero(~met)[:6]] = True
    ids = [f"syn-{i:07d}" for i in range(60)]
    synthetic = _write_synthetic(tmp_path / "synthetic", fresh, grade, met ^ flipped, ids)
    cfg = load_config(PARAMS, [*_overrides(tmp_path, processed, synthetic),
                               "audit.tstr.steps=40", "audit.consistency.steps=150",
                               "audit.consistency.lr=0.003", "audit.consistency.quantile=0.1"])
    result = run_audit(cfg)
    out = tmp_path / "audit"
    doc = json.loads((out / "audit.json").read_text())
    entry = doc["consistency"]["tasks"]["metastasis"]
    assert entry["auc_real_val"] > 0.8
    withheld = pd.read_csv(out / "withheld.csv").set_index("sample_id")
    caught = withheld.index[withheld["label_inconsistent"]]
    flipped_ids = {ids[i] for i in np.flatnonzero(flipped)}
    # 30 validation images make noisy thresholds: the flipped ones are caught far more often.
    assert len(flipped_ids & set(caught)) >= 9
    assert len(set(caught) - flipped_ids) / 48 < 0.5 * len(flipped_ids & set(caught)) / 12
    released = pd.read_parquet(out / "released" / "manifest.parquet")
    assert not set(released["sample_id"]) & set(withheld.index)
    assert len(released) == result.released == doc["released"] == 60 - len(withheld)
    assert result.consistency_withheld == doc["consistency"]["withheld"] == len(caught)
    assert doc["quality"]["tstr_released"]["tasks"]["metastasis"]["n_train"] == 60 - len(caught)
    metrics = json.loads((tmp_path / "reports" / "audit_metrics.json").read_text())
    assert metrics["consistency_withheld"] == len(caught)
    assert "label-inconsistent" in result.describe()

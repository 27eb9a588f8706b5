"""The audit's train-on-synthetic / test-on-real check and its class-matched overall metrics.

Real behaviour on small data: the images come from test_audit's drawing (cardiac uptake
growing with the Perugini grade, bright focal spots for metastases), so both downstream tasks
are learnable in a hundred steps at 64 x 16. "Synthetic" sets are held-out real images, the
perfect generator: with their own labels they must teach as much as real training images,
with shuffled labels nothing; with an enriched class mix, the class-matched overall metrics
must still find them indistinguishable.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tasks.audit.matching import class_matched, strata, stratum_name
from tasks.audit.pipeline import run_audit
from tasks.audit.tracking import log_audit
from tasks.audit.tstr import TASKS, matched_draw, run_tstr
from tasks.config import AuditTstrConfig, load_config
from tests.conftest import PARAMS
from tests.test_audit import SYN_SIZE, _draw, _resize, _write_synthetic

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 120
ENRICHED = {"grade": [0.3, 0.2, 0.25, 0.25], "metastasis": 0.5}
"""The class mix of the "synthetic" sets: amyloid and metastases over-represented, as
``synthesize.groups`` asks for."""


def _draw_set(n: int, rng: np.random.Generator, grade_p: list[float], met_p: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    grade = rng.choice(4, size=n, p=grade_p)
    met = rng.random(n) < met_p
    images = np.stack([_draw(rng, int(g), bool(m)) for g, m in zip(grade, met, strict=True)])
    return images, grade, met


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed folder at 128 x 32: 240 train, 80 val, 40 test (the population's mix), and
    200 'external' images with the enriched mix, which the audit never reads: the pool the
    'synthetic' sets are taken from."""
    root = tmp_path_factory.mktemp("tstr") / "processed"
    root.mkdir()
    rng = np.random.default_rng(7)
    internal = _draw_set(360, rng, [0.55, 0.15, 0.15, 0.15], 0.3)
    external = _draw_set(200, rng, ENRICHED["grade"], ENRICHED["metastasis"])
    images, grade, met = (np.concatenate(pair) for pair in zip(internal, external, strict=True))
    np.save(root / "images.npy", images.astype(np.float16))
    pd.DataFrame({
        "index": np.arange(len(images)), "pseudo_id": [f"P{i:04d}" for i in range(len(images))],
        "split": ["train"] * 240 + ["val"] * 80 + ["test"] * 40 + ["external"] * 200,
        "site": ["aurelia"] * 360 + ["borealis"] * 200, "perugini_grade": grade.astype(np.int64),
        "amyloid": grade > 0, "metastasis": met, "sex": "F",
    }).to_parquet(root / "manifest.parquet", index=False)
    return root


def _split(pool: Path, split: str) -> tuple[torch.Tensor, pd.DataFrame]:
    """One split of the pool at the synthetic resolution, with its manifest rows."""
    manifest = pd.read_parquet(pool / "manifest.parquet")
    rows = manifest[manifest["split"] == split].reset_index(drop=True)
    images = np.load(pool / "images.npy")[rows["index"].to_numpy()].astype(np.float32)
    return torch.from_numpy(_resize(images, SYN_SIZE)), rows


def test_held_out_real_images_are_indistinguishable_and_as_useful_as_real(tmp_path, pool,
                                                                          mlflow_uri):
    images, rows = _split(pool, "external")
    synthetic = _write_synthetic(tmp_path / "synthetic", images.numpy(),
                                 rows["perugini_grade"].to_numpy(),
                                 rows["metastasis"].to_numpy(),
                                 [f"syn-{i:07d}" for i in range(len(rows))])
    cfg = load_config(PARAMS, [
        f"ingest.output={pool}", f"audit.synthetic={synthetic}",
        f"audit.output={tmp_path / 'audit'}", f"reports_dir={tmp_path / 'reports'}",
        "audit.encoder.epochs=4", "audit.encoder.batch_size=32", "audit.encoder.feature_dim=32",
        "audit.two_sample_folds=3", "audit.pixel_critic_steps=40", "audit.msssim_pairs=20",
        f"audit.tstr.steps={STEPS}"])

    result = log_audit(cfg, run_audit(cfg))

    quality = json.loads((tmp_path / "audit" / "audit.json").read_text())["quality"]
    tstr = quality["tstr"]
    assert tstr["target_ratio"] == 0.9 and tstr["settings"]["steps"] == STEPS
    real_train = _split(pool, "train")[1]
    for task, rule in TASKS.items():
        entry = tstr["tasks"][task]
        assert entry["n_train"] == entry["n_train_real"] == 200
        assert entry["n_val"] == 80 and 0 < entry["positives_val"] < 80
        # the real draw has the synthetic set's positives, as far as the real split has them
        assert entry["positives_real"] == min(entry["positives_synthetic"],
                                              int(rule(real_train).sum()))
        assert entry["auc_real"] > 0.85
        assert entry["ratio"] > 0.85, entry  # a perfect generator: TSTR ~ TRTR
        assert entry["ratio"] == pytest.approx(entry["auc_synthetic"] / entry["auc_real"],
                                               abs=1e-5)
    assert tstr["meets_target"] is all(e["ratio"] >= 0.9 for e in tstr["tasks"].values())

    overall, unmatched = quality["overall"], quality["overall_unmatched"]
    matched = overall["class_matched"]
    assert matched["applied"] and matched["n_synthetic"] == 200
    assert overall["n_synthetic"] == matched["n_used"] < 200
    assert overall["two_sample_auc"] < 0.7  # like with like: indistinguishable
    assert overall["two_sample_auc_pixels"] < 0.75
    assert unmatched["n_synthetic"] == 200 and unmatched["two_sample_auc"] is not None
    # the enriched mix alone moves the unmatched set away (here: FID 3.8 against 1.1)
    assert unmatched["fid"] > 1.5 * overall["fid"]
    for entry in matched["strata"].values():
        if entry["used"]:
            assert entry["used_fraction"] == pytest.approx(entry["target_fraction"],
                                                           abs=1.0 / matched["n_used"])

    metrics = json.loads((tmp_path / "reports" / "audit_metrics.json").read_text())
    assert set(metrics["tstr"]) == set(TASKS)
    assert metrics["tstr"]["metastasis"]["ratio"] == tstr["tasks"]["metastasis"]["ratio"]
    assert metrics["quality"]["n_synthetic_used"] == matched["n_used"]
    assert metrics["overall_unmatched"]["two_sample_auc"] == unmatched["two_sample_auc"]
    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.metrics["tstr/amyloidosis/ratio"] == pytest.approx(
        tstr["tasks"]["amyloidosis"]["ratio"], abs=1e-6)
    assert {"tstr/metastasis/auc_synthetic", "tstr/metastasis/auc_real",
            "overall_unmatched/two_sample_auc", "seconds/tstr"} <= set(run.data.metrics)
    text = result.describe()
    assert "TSTR" in text and "amyloidosis" in text and "target ratio >= 0.9" in text
    assert f"class-matched subsample of {matched['n_used']}" in text


def test_shuffled_labels_teach_nothing_while_real_labels_do(pool):
    syn, syn_rows = _split(pool, "external")
    train, train_rows = _split(pool, "train")
    val, val_rows = _split(pool, "val")
    # a shuffle whose labels carry no information about the images (|correlation| < 0.03)
    shuffled = syn_rows.sample(frac=1.0, random_state=18).reset_index(drop=True)
    for rule in TASKS.values():
        assert abs(np.corrcoef(rule(shuffled), rule(syn_rows))[0, 1]) < 0.03

    doc = run_tstr(syn, shuffled, train, train_rows, val, val_rows,
                   AuditTstrConfig(steps=STEPS), torch.device("cpu"))

    for task, entry in doc["tasks"].items():
        assert abs(entry["auc_synthetic"] - 0.5) < 0.15, (task, entry)
        assert entry["auc_real"] > 0.85, (task, entry)
        assert entry["ratio"] < 0.8 and entry["meets_target"] is False
    assert doc["meets_target"] is False


def test_a_task_without_positives_is_null_with_a_note_and_steps_zero_is_off(pool):
    syn, syn_rows = _split(pool, "external")
    train, train_rows = _split(pool, "train")
    val, val_rows = _split(pool, "val")
    no_metastasis = syn_rows.assign(metastasis=False)
    doc = run_tstr(syn, no_metastasis, train, train_rows, val, val_rows,
                   AuditTstrConfig(steps=4), torch.device("cpu"))
    entry = doc["tasks"]["metastasis"]
    assert entry["auc_synthetic"] is None and entry["ratio"] is None
    assert entry["positives_synthetic"] == 0 and "synthetic set" in entry["note"]
    assert doc["tasks"]["amyloidosis"]["auc_synthetic"] is not None
    assert doc["meets_target"] in (None, False)  # no verdict from a task without a ratio

    off = run_tstr(syn, syn_rows, train, train_rows, val, val_rows, AuditTstrConfig(steps=0),
                   torch.device("cpu"))
    assert off["tasks"] == {"amyloidosis": None, "metastasis": None} and "off" in off["note"]
    unlabelled = run_tstr(syn, syn_rows[["index"]], train, train_rows, val, val_rows,
                          AuditTstrConfig(steps=4), torch.device("cpu"))
    assert "no perugini_grade" in unlabelled["note"] and unlabelled["meets_target"] is None


def test_matched_draw_keeps_the_count_and_the_fraction_the_real_data_allow():
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(30, bool), np.zeros(170, bool)]
    rows = matched_draw(labels, 100, 0.2, rng)
    assert len(rows) == len(set(rows)) == 100 and labels[rows].sum() == 20
    scarce = matched_draw(labels, 100, 0.5, rng)  # 50 positives wanted, 30 exist
    assert len(scarce) == 100 and labels[scarce].sum() == 30
    assert len(matched_draw(labels, 500, 0.2, rng)) == 200  # capped at the pool


def test_class_matched_subsample_has_the_real_strata_proportions():
    rng = np.random.default_rng(1)
    real = pd.DataFrame({"perugini_grade": rng.choice(4, 600, p=[0.7, 0.1, 0.1, 0.1]),
                         "metastasis": rng.random(600) < 0.2})
    real = real[~((real["perugini_grade"] == 3) & real["metastasis"])]  # keep one stratum out
    real = pd.concat([real, pd.DataFrame({"perugini_grade": [2], "metastasis": [True]})])
    synthetic = pd.DataFrame({"perugini_grade": rng.choice(4, 400, p=[0.25, 0.25, 0.25, 0.25]),
                              "metastasis": rng.random(400) < 0.5})
    synthetic = synthetic[~((synthetic["perugini_grade"] == 2) & synthetic["metastasis"])]

    match = class_matched(real, synthetic, seed=5)

    doc = match.doc
    assert match.applied and doc["n_synthetic"] == len(synthetic)
    assert doc["missing_strata"] == ["grade2_metastasis"]  # in real, never generated
    assert doc["synthetic_only_strata"] == ["grade3_metastasis"]
    assert match.mask.sum() == doc["n_used"] > 50
    used = strata(synthetic[match.mask])
    real_codes = strata(real)
    shared = [c for c in range(8) if (real_codes == c).any() and (strata(synthetic) == c).any()]
    real_shared = np.isin(real_codes, shared)
    for code in shared:  # proportions equal, up to one image of rounding
        want = (real_codes[real_shared] == code).mean()
        assert (used == code).mean() == pytest.approx(want, abs=1.0 / doc["n_used"])
        assert doc["strata"][stratum_name(code)]["used"] == (used == code).sum()
    assert not np.isin(used, [7]).any()  # the synthetic-only stratum is left out
    # largest possible: one more image would break a stratum's proportion
    ratios = [(strata(synthetic) == c).sum() / (real_codes[real_shared] == c).mean()
              for c in shared]
    assert doc["n_used"] == pytest.approx(min(ratios), abs=len(shared))
    again = class_matched(real, synthetic, seed=5)
    assert np.array_equal(again.mask, match.mask)  # fixed seed

    unlabelled = class_matched(real, synthetic.drop(columns="metastasis"), seed=5)
    assert not unlabelled.applied and unlabelled.mask.all() and "no perugini_grade" in (
        unlabelled.doc["note"])

"""Superscan as a condition factor: enrich a rare finding through a synthesize group.

Ingest writes ``superscan`` as a nullable boolean column (empty when the archive did not
assess it); a model conditioned on it must encode that column, a group may ask for
``{metastasis: true, superscan: true}``, and the synthetic manifest (and its DICOM) must carry
the label so the classifiers and the audit see it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from models.conditioning import ConditionSpec
from tasks.config import ConfigError, SampleGroup, load_config
from tasks.synthesize.plan import PlanError, build_plan, typed_labels
from tests.conftest import PARAMS
from tests.test_diffusion_models import _make_dataset
from tests.test_synthesize import _sets

CONDITIONS = "diffusion.conditions=[perugini_grade, metastasis, superscan]"
GROUPS = ("synthesize.groups=[{name: normal, count: 2, condition: {perugini_grade: 0, "
          "metastasis: false}}, {name: superscan, count: 3, condition: {metastasis: true, "
          "superscan: true}}]")


def _manifest() -> pd.DataFrame:
    """Training labels as ingest writes them: superscan nullable boolean, one cell unknown."""
    return pd.DataFrame({
        "perugini_grade": [0, 0, 1, 3, 0, 2, 0],
        "metastasis": [False, True, False, False, True, True, True],
        "superscan": pd.array([False, False, None, False, True, True, False], dtype="boolean"),
        "site": ["a"] * 7, "split": ["train"] * 7,
    })


def test_spec_encodes_the_nullable_boolean_column() -> None:
    manifest = _manifest()
    spec = ConditionSpec.from_manifest(manifest, ["perugini_grade", "metastasis", "superscan"])
    codes = spec.encode(manifest)
    superscan = spec.factors[2]
    assert superscan.values == (False, True)
    assert codes[:, 2].tolist() == [0, 0, superscan.null_index, 0, 1, 1, 0]
    assert ConditionSpec.from_dict(spec.to_dict()) == spec  # survives the checkpoint


def test_superscan_group_is_planned_with_drawn_grades_and_typed_labels() -> None:
    spec = ConditionSpec.build(["perugini_grade", "metastasis", "superscan"])
    groups = [SampleGroup(name="normal", count=20, condition={"perugini_grade": 0}),
              SampleGroup(name="superscan", count=30,
                          condition={"metastasis": True, "superscan": True})]
    plan = build_plan(groups, spec, _manifest(), seed=5)
    rare = plan[plan["group"] == "superscan"]
    assert len(rare) == 30
    assert rare["superscan"].tolist() == [True] * 30 and rare["metastasis"].all()
    # the unnamed grade comes from training superscans (grades 0 and 2), never another grade
    assert set(rare["perugini_grade"]) == {0, 2}
    # unnamed superscan is drawn from the training labels given the grade (grade-0 rows
    # include one superscan and no unknown cell)
    normal = plan[plan["group"] == "normal"]
    assert set(normal["superscan"]) == {False, True}
    typed = typed_labels(plan.drop(columns=["cond_index"]))
    assert str(typed["superscan"].dtype) == "boolean"
    assert typed.loc[typed["group"] == "superscan", "superscan"].all()


def test_superscan_without_metastasis_is_refused() -> None:
    spec = ConditionSpec.build(["perugini_grade", "metastasis", "superscan"])
    bad = SampleGroup(name="odd", count=2, condition={"metastasis": False, "superscan": True})
    with pytest.raises(PlanError, match="'odd'.*contradiction"):
        build_plan([bad], spec, _manifest(), seed=0)
    not_trained = ConditionSpec.build(["perugini_grade", "metastasis"])
    with pytest.raises(PlanError, match="not conditioned on \\['superscan'\\]"):
        build_plan([SampleGroup(name="rare", count=1, condition={"superscan": True})],
                   not_trained, _manifest(), seed=0)


def test_config_accepts_superscan_condition_and_group() -> None:
    cfg = load_config(PARAMS, [CONDITIONS, GROUPS])
    assert cfg.diffusion.conditions[-1] == "superscan"
    assert cfg.synthesize.groups[1].condition == {"metastasis": True, "superscan": True}
    with pytest.raises(ConfigError, match="conditions"):
        load_config(PARAMS, ["diffusion.conditions=[perugini_grade, lesion_count]"])


def test_superscan_conditioned_model_synthesizes_labelled_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train a tiny model on a manifest with superscans, then generate a superscan group."""
    from tasks.diffusion.train import train_diffusion
    from tasks.synthesize.pipeline import synthesize

    processed = _make_dataset(tmp_path / "processed")
    manifest = pd.read_parquet(processed / "manifest.parquet")
    superscan = manifest["metastasis"] & (manifest["index"] % 3 == 0)
    manifest["superscan"] = pd.array(superscan, dtype="boolean")
    manifest.loc[1, "superscan"] = pd.NA  # not assessed: the null index
    manifest.to_parquet(processed / "manifest.parquet")
    assert manifest.loc[manifest["split"] == "train", "superscan"].fillna(False).any()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sets = [*_sets(tmp_path), CONDITIONS, GROUPS, "synthesize.dicom.enabled=true"]
    cfg = load_config(PARAMS, sets)
    train_diffusion(cfg)
    result = synthesize(cfg)
    assert result is not None and result.per_group == {"normal": 2, "superscan": 3}
    out = pd.read_parquet(tmp_path / "synthetic" / "manifest.parquet")
    assert str(out["superscan"].dtype) == "boolean"
    rare = out[out["group"] == "superscan"]
    assert rare["superscan"].all() and rare["metastasis"].all()
    assert np.load(tmp_path / "synthetic" / "images.npy").shape[0] == 5
    comment = pydicom.dcmread(next((tmp_path / "synthetic" / "dicom" / "superscan")
                                   .glob("*.dcm"))).ImageComments
    assert "superscan=True" in comment

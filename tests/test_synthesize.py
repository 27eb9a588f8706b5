"""The synthesize stage: plan, reproducible per-seed sampling, dataset format, DICOM, 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from models.conditioning import ConditionSpec
from models.sampling import sample
from tasks.artifacts.diffusion_model import load_model
from tasks.config import SampleGroup, load_config
from tasks.diffusion.train import train_diffusion
from tasks.synthesize.plan import PlanError, build_plan
from tests.conftest import PARAMS
from tests.test_diffusion_models import COLS, ROWS, _make_dataset

NET = ["diffusion.network.channels=[16, 32]", "diffusion.network.attention_levels=[false, false]",
       "diffusion.network.norm_num_groups=8", "diffusion.network.num_head_channels=16"]
GROUPS = ("[{name: normal, count: 3, condition: {perugini_grade: 0, metastasis: false}}, "
          "{name: amyloid_g3, count: 2, condition: {perugini_grade: 3}}, "
          "{name: metastasis, count: 3, condition: {metastasis: true}}]")


def _sets(root: Path) -> list[str]:
    return [f"ingest.output={root / 'processed'}", f"diffusion.output={root / 'model'}",
            f"diffusion.work_dir={root / 'work'}", f"diffusion.image_rows={ROWS}",
            f"diffusion.image_cols={COLS}", *NET, "diffusion.num_train_timesteps=50",
            "diffusion.batch_size=4", "diffusion.warmup_steps=2", "diffusion.max_steps=4",
            "diffusion.accelerator=cpu", "diffusion.registered_model_name=null",
            f"synthesize.output={root / 'synthetic'}", f"synthesize.work_dir={root / 'swork'}",
            "synthesize.steps=5", "synthesize.guidance_scale=2.0", "synthesize.batch_size=3",
            "synthesize.accelerator=cpu", f"synthesize.groups={GROUPS}",
            "synthesize.seed=100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained model over the structured test dataset (a few steps: enough to sample)."""
    root = tmp_path_factory.mktemp("synth")
    _make_dataset(root / "processed")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    try:
        train_diffusion(load_config(PARAMS, _sets(root)))
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    return root


def _train_manifest() -> pd.DataFrame:
    return pd.DataFrame({"perugini_grade": [0, 0, 1, 3, 3, 2], "sex": ["F", "M", "F", "M",
                                                                       None, "M"],
                         "metastasis": [False, True, False, False, True, False],
                         "site": ["a"] * 6})


def test_plan_counts_seeds_and_drawn_factors() -> None:
    spec = ConditionSpec.build(["perugini_grade", "metastasis", "sex"])
    groups = [SampleGroup(name="g3", count=40, condition={"perugini_grade": 3}),
              SampleGroup(name="men", count=5, condition={"sex": "M", "metastasis": False})]
    plan = build_plan(groups, spec, _train_manifest(), seed=10)
    assert list(plan["group"].value_counts()[["g3", "men"]]) == [40, 5]
    assert list(plan["seed"]) == list(range(10, 55)) and list(plan["index"]) == list(range(45))
    g3 = plan[plan["group"] == "g3"]
    # Unnamed factors come from training rows with grade 3: metastasis True/False, sex M/None.
    assert set(g3["metastasis"]) == {False, True} and set(g3["sex"]) <= {"M", None}
    assert set(g3["amyloid"]) == {True}
    men = plan[plan["group"] == "men"]
    assert set(men["perugini_grade"]) <= {0, 2, 3} and set(men["site"]) == {"synthetic"}
    again = build_plan(groups, spec, _train_manifest(), seed=10)
    pd.testing.assert_frame_equal(plan, again)


@pytest.mark.parametrize(("condition", "message"), [
    ({"site": "a"}, "not conditioned on"),
    ({"perugini_grade": 7}, "value 7 is not one of"),
    ({"perugini_grade": 1, "metastasis": True}, "no training image has"),
])
def test_plan_rejects_groups_the_model_cannot_make(condition: dict, message: str) -> None:
    spec = ConditionSpec.build(["perugini_grade", "metastasis", "sex"])
    with pytest.raises(PlanError, match=message) as err:
        build_plan([SampleGroup(name="bad", count=2, condition=condition)], spec,
                   _train_manifest(), seed=0)
    assert "'bad'" in str(err.value)


def test_synthesize_writes_dataset_and_dicom_that_regenerate(trained: Path,
                                                             mlflow_uri: str) -> None:
    from flows.stage_flow import run_stage
    from flows.stages import stage

    cfg = load_config(PARAMS, [*_sets(trained), "synthesize.dicom.enabled=true"])
    result = run_stage(stage("synthesize"), cfg)
    assert result is not None and result.images == 8 and result.world_size == 1
    out = trained / "synthetic"
    images = np.load(out / "images.npy")
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert images.shape == (8, 2, ROWS, COLS) and images.dtype == np.float16
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert list(manifest["index"]) == list(range(8)) and set(manifest["split"]) == {"synthetic"}
    assert manifest["sample_id"].is_unique and manifest["synthetic"].all()
    assert manifest["model_version"].nunique() == 1
    assert manifest["model_sha256"].str.len().min() == 64
    assert (manifest.loc[manifest["group"] == "amyloid_g3", "perugini_grade"] == 3).all()
    assert (manifest.loc[manifest["group"] == "metastasis", "metastasis"]).all()
    report = json.loads((out / "synthesis.json").read_text())
    assert report["per_group"] == {"normal": 3, "amyloid_g3": 2, "metastasis": 3}
    assert not {"seconds", "images_per_second", "reused_shards"} & set(report)  # DVC-tracked
    assert (out / "montage.png").stat().st_size > 2_000

    # Any image regenerates from its manifest row alone (condition + seed + model).
    module = load_model(trained / "model")
    row = manifest.iloc[6]
    cond = torch.tensor([module.spec.encode_row(row.to_dict())])
    again = sample(module.unet, "ddim", int(row["steps"]), cond, float(row["guidance_scale"]),
                   [int(row["seed"])], (2, ROWS, COLS), "cpu",
                   null_cond=module.spec.null_indices, intensity=module.intensity,
                   **module.noise_schedule)
    np.testing.assert_allclose(again[0].numpy(), images[6].astype(np.float32), atol=1e-3)

    # DICOM: one file per image, marked synthetic, no identity, pixels as in the array.
    files = sorted((out / "dicom").rglob("*.dcm"))
    assert len(files) == 8 == result.dicom_files
    ds = pydicom.dcmread(out / "dicom" / "metastasis" / f"{row['sample_id']}.dcm")
    assert ds.ConversionType == "SYN" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.3"
    assert "SYNTHETIC" in ds.SeriesDescription and str(ds.PatientName).startswith("SYNTHETIC")
    assert ds.PatientIdentityRemoved == "YES" and not ds.PatientBirthDate and not ds.StudyDate
    assert ds.NumberOfFrames == 2 and f"seed={int(row['seed'])}" in ds.ImageComments
    assert ds.SOPInstanceUID.startswith("2.25.")
    pixels = ds.pixel_array * float(ds.RescaleSlope)
    np.testing.assert_allclose(pixels, images[6].astype(np.float32), atol=1 / 4095 + 1e-3)
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == 8

    run = mlflow.get_run(result.mlflow_run_id)
    assert run.data.tags["synthdx.stage"] == "synthesize"
    assert run.data.metrics["images"] == 8 and run.data.metrics["images/amyloid_g3"] == 2
    assert run.data.tags["synthdx.model_version"] == result.model_version


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    from tasks.synthesize.pipeline import synthesize

    cfg = load_config(PARAMS, [f"synthesize.model={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="no trained diffusion model"):
        synthesize(cfg)


def test_two_process_generation_on_cpu_matches_one_process(trained: Path, tmp_path: Path
                                                           ) -> None:
    """`synthdx synthesize` over 2 CPU ranks: each rank its share, merged on rank 0."""
    base = _sets(trained)
    single = load_config(PARAMS, [*base, f"synthesize.output={tmp_path / 'one'}",
                                  f"synthesize.work_dir={tmp_path / 'w1'}"])
    from tasks.synthesize.pipeline import synthesize

    one = synthesize(single)
    assert one is not None
    sets = [*base, f"synthesize.output={tmp_path / 'two'}",
            f"synthesize.work_dir={tmp_path / 'w2'}", "synthesize.devices=2",
            "synthesize.strategy=ddp"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([str(Path(sys.executable).parent / "synthdx"), "synthesize",
                           "--params", str(PARAMS), *[a for s in sets for a in ("--set", s)]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads((tmp_path / "two" / "synthesis.json").read_text())
    assert report["world_size"] == 2
    two = np.load(tmp_path / "two" / "images.npy")
    np.testing.assert_allclose(two.astype(np.float32),
                               np.load(tmp_path / "one" / "images.npy").astype(np.float32),
                               atol=2e-3)
    assert not any((tmp_path / "w2").iterdir())  # shards removed after the merge


def test_a_killed_generation_resumes_from_its_saved_parts(trained: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 1 batch (3 images): a run killed in its second part keeps the first, and the
    rerun generates only the rest and gives the same images as an uninterrupted run."""
    import tasks.synthesize.pipeline as pipeline

    monkeypatch.setattr(pipeline, "PART_BATCHES", 1)
    base = [*_sets(trained), f"synthesize.work_dir={tmp_path / 'work'}"]
    whole = pipeline.synthesize(load_config(PARAMS, [*base, f"synthesize.output={tmp_path / 'a'}"]))
    assert whole is not None and whole.reused_shards == 0

    real_generate, calls = pipeline.generate_rows, []

    def dies_in_part_two(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_generate(*args, **kwargs)

    resumed_cfg = load_config(PARAMS, [*base, f"synthesize.output={tmp_path / 'b'}"])
    monkeypatch.setattr(pipeline, "generate_rows", dies_in_part_two)
    with pytest.raises(KeyboardInterrupt):
        pipeline.synthesize(resumed_cfg)
    assert not (tmp_path / "b").exists()
    saved = list((tmp_path / "work").rglob("rank-0-part-*.npz"))
    assert len(saved) == 1

    monkeypatch.setattr(pipeline, "generate_rows", real_generate)
    resumed = pipeline.synthesize(resumed_cfg)
    assert resumed is not None and resumed.reused_shards == 1
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "images.npy"),
                                  np.load(tmp_path / "b" / "images.npy"))

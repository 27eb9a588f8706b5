"""Ground-truth finding masks: the phantom draws them where the findings are, ingest carries them.

The masks are what ``synthdx explain`` is measured against (tests/test_explain.py), so they
must sit on the finding itself, at the geometry of the processed images, and never leave the
scan's pixels changed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from tasks.artifacts import dataset
from tasks.artifacts.truth_masks import FINDINGS, TRUTH_META, mask_path, read_study_masks
from tasks.config import IngestConfig, load_config
from tasks.ingest.pipeline import run_ingest
from tasks.phantom.population import StudySpec
from tasks.phantom.render import render_study, render_study_with_truth
from tests.conftest import PARAMS

SITES = {s.name: s for s in load_config(PARAMS).phantom.sites}
KEY = "truth-mask-test-key-0123456789abcdef"


def _spec(**kw: object) -> StudySpec:
    base = StudySpec(0, 0, 0, "aurelia", 11, "M", 70.0, 1.76, 26.0, 0, False, False,
                     dt.date(2022, 1, 1), 5, dt.date(1952, 1, 1))
    return dataclasses.replace(base, **kw)


def _inside_vs_ring(view: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean counts inside a mask and in a 6-pixel ring around it."""
    ring = binary_dilation(mask, iterations=6) & ~mask
    return float(view[mask].mean()), float(view[ring].mean())


@pytest.mark.parametrize("kw,kind", [
    ({"metastasis": True, "seed": 3}, "metastasis"),
    ({"perugini_grade": 3, "seed": 5}, "amyloid"),
    ({"perugini_grade": 2, "seed": 8, "site": "northgate"}, "amyloid"),
])
def test_masks_sit_on_the_finding_and_change_no_pixel(kw: dict, kind: str) -> None:
    spec = _spec(**kw)
    site = SITES[spec.site]
    views, rec, _, masks = render_study_with_truth(spec, site, 512, 128)
    plain, _, _ = render_study(spec, site, 512, 128)
    assert np.array_equal(views, plain)  # asking for the truth draws no random number
    other = "amyloid" if kind == "metastasis" else "metastasis"
    assert masks is not None and not masks[other].any()
    mask = masks[kind]
    assert mask.shape == (2, 512, 128) and mask[0].sum() > 20
    inside, ring = _inside_vs_ring(views[0].astype(float), mask[0])
    assert inside > 1.3 * ring, (inside, ring)  # the finding is hotter than what surrounds it
    if kind == "metastasis":
        assert rec.lesion_count >= 1


def test_no_finding_no_mask() -> None:
    _, _, _, masks = render_study_with_truth(_spec(seed=9), SITES["aurelia"], 512, 128)
    assert masks is not None and not any(m.any() for m in masks.values())


@pytest.fixture(scope="module")
def ingested(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("truth_ingest")
    key = out / "key.txt"
    key.write_text(KEY)
    cfg = IngestConfig(source=tiny_phantom / "dicom", labels=tiny_phantom / "labels.csv",
                       output=out / "processed", quarantine=out / "quarantine",
                       image_rows=64, image_cols=16, workers=2, key_file=key,
                       truth=tiny_phantom.parent / "truth")
    run_ingest(cfg)
    return out / "processed"


def test_phantom_writes_a_mask_file_per_dicom_file(tiny_phantom: Path) -> None:
    truth = tiny_phantom.parent / "truth"
    meta = json.loads((truth / TRUTH_META).read_text())
    assert meta["findings"] == list(FINDINGS)
    dicoms = sorted((tiny_phantom / "dicom").rglob("*.dcm"))
    assert sorted(truth.rglob("*.npz")) == sorted(
        mask_path(truth, p.relative_to(tiny_phantom / "dicom").as_posix()) for p in dicoms)
    assert not list((tiny_phantom / "dicom").rglob("*.npz"))  # never inside the archive
    one = read_study_masks(mask_path(truth, dicoms[0].relative_to(tiny_phantom / "dicom")
                                     .as_posix()))
    assert one["amyloid"].shape == (2, 512, 128)


def test_ingest_carries_masks_to_the_processed_geometry(ingested: Path) -> None:
    images, manifest = dataset.open_dataset(ingested, "processed dataset")
    masks = dataset.read_masks(ingested, images.shape)
    assert masks is not None and set(masks) == set(FINDINGS)
    report = json.loads((ingested / "ingest_report.json").read_text())
    assert report["truth"]["masks"] is True
    has = {k: (m.reshape(len(m), -1) > 0).any(axis=1) for k, m in masks.items()}
    np.testing.assert_array_equal(has["metastasis"], manifest["metastasis"].to_numpy(bool))
    np.testing.assert_array_equal(has["amyloid"], manifest["perugini_grade"].to_numpy() >= 1)
    assert has["metastasis"].any() and has["amyloid"].any()
    assert float(masks["metastasis"].max()) <= 1.0 and float(masks["metastasis"].min()) >= 0.0
    # At the processed size too the masked pixels are the hot ones of their image.
    for kind in FINDINGS:
        for i in np.flatnonzero(has[kind]):
            cover = masks[kind][i, 0].astype(float) >= 0.5
            if cover.sum() >= 2:
                inside, ring = _inside_vs_ring(images[i, 0].astype(float), cover)
                assert inside > ring, (kind, i, inside, ring)


def test_masks_of_other_labels_are_not_used(tiny_phantom: Path, tmp_path: Path) -> None:
    truth = tmp_path / "truth"
    shutil.copytree(tiny_phantom.parent / "truth", truth)
    meta = json.loads((truth / TRUTH_META).read_text())
    meta["labels_sha256"] = "0" * 64
    (truth / TRUTH_META).write_text(json.dumps(meta))
    key = tmp_path / "key.txt"
    key.write_text(KEY)
    cfg = IngestConfig(source=tiny_phantom / "dicom", labels=tiny_phantom / "labels.csv",
                       output=tmp_path / "processed", quarantine=tmp_path / "quarantine",
                       image_rows=64, image_cols=16, workers=1, key_file=key, truth=truth)
    run_ingest(cfg)
    assert not (tmp_path / "processed" / dataset.MASKS_FILE).exists()
    report = json.loads((tmp_path / "processed" / "ingest_report.json").read_text())
    assert report["truth"]["masks"] is False and "labels" in report["truth"]["why"]

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import NuclearMedicineImageStorage

from tasks.config import load_config
from tasks.phantom.generate import LABEL_COLUMNS, generate_phantom
from tasks.phantom.population import StudySpec, sample_studies, site_counts
from tasks.phantom.render import render_study
from tests.conftest import PARAMS, tiny_overrides

SITES = {s.name: s for s in load_config(PARAMS).phantom.sites}


def _spec(**kw) -> StudySpec:
    base = StudySpec(0, 0, 0, "aurelia", 11, "M", 70.0, 1.76, 26.0, 0, False, False,
                     dt.date(2022, 1, 1), 5, dt.date(1952, 1, 1))
    return dataclasses.replace(base, **kw)


def _render(site: str = "aurelia", **kw) -> np.ndarray:
    views, _, _ = render_study(_spec(site=site, **kw), SITES[site], 1024, 256, confounders=False)
    return views


def test_archive_is_valid_nm_dicom(tiny_phantom):
    labels = pd.read_csv(tiny_phantom / "labels.csv")
    assert list(labels.columns) == LABEL_COLUMNS
    files = sorted((tiny_phantom / "dicom").rglob("*.dcm"))
    assert len(files) == len(labels)
    syntaxes = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == NuclearMedicineImageStorage
        assert ds.Modality == "NM"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
        assert int(ds.NumberOfFrames) == 2
        px = ds.pixel_array
        assert px.shape == (2, 512, 128) and px.dtype == np.uint16
        assert px.sum() > 0
        views = [d.ViewCodeSequence[0].CodeMeaning for d in ds.DetectorInformationSequence]
        assert views == ["antero-posterior", "postero-anterior"]
        assert ds.StudyInstanceUID in set(labels.study_uid)
        assert ds.PatientName and ds.PatientBirthDate and ds.AccessionNumber
        syntaxes.add(ds.file_meta.TransferSyntaxUID.name)
    assert len(syntaxes) == 5, syntaxes  # one per site in params.yaml
    meta = json.loads((tiny_phantom / "PHANTOM.json").read_text())
    assert meta["labels_sha256"] == hashlib.sha256(
        (tiny_phantom / "labels.csv").read_bytes()).hexdigest()
    assert meta["internal_site"] == "aurelia"
    assert (tiny_phantom / "montage.png").stat().st_size > 10_000


def test_same_seed_same_bytes_regardless_of_workers(tmp_path):
    a = load_config(PARAMS, tiny_overrides(tmp_path / "a", patients=6))
    b = load_config(PARAMS, [*tiny_overrides(tmp_path / "b", patients=6), "phantom.workers=2"])
    generate_phantom(a.phantom)
    generate_phantom(b.phantom)
    assert (tmp_path / "a/labels.csv").read_bytes() == (tmp_path / "b/labels.csv").read_bytes()
    for fa in sorted((tmp_path / "a/dicom").rglob("*.dcm")):
        fb = tmp_path / "b/dicom" / fa.relative_to(tmp_path / "a/dicom")
        assert fa.read_bytes() == fb.read_bytes(), fa


def test_other_seed_other_data():
    cfg = load_config(PARAMS, ["phantom.patients=30"]).phantom
    a = sample_studies(cfg)
    b = sample_studies(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert [s.seed for s in a] != [s.seed for s in b]
    assert not np.array_equal(_render(seed=1), _render(seed=2))


def test_site_counts_follow_shares():
    sites = load_config(PARAMS).phantom.sites
    counts = site_counts(2000, sites)
    assert sum(counts) == 2000
    assert counts[0] == 1000 and all(c == 250 for c in counts[1:])


def test_follow_up_study_keeps_the_patients_identity(tiny_phantom):
    labels = pd.read_csv(tiny_phantom / "labels.csv")
    by_id = {}
    for f in sorted((tiny_phantom / "dicom").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = labels[labels.study_uid == ds.StudyInstanceUID].iloc[0]
        assert ds.PatientID == row.patient_id
        by_id.setdefault(ds.PatientID, set()).add((str(ds.PatientName), ds.PatientBirthDate))
    assert all(len(v) == 1 for v in by_id.values())  # one name and birth date per patient


def test_population_has_follow_ups_and_all_labels():
    studies = sample_studies(load_config(PARAMS, ["phantom.patients=600"]).phantom)
    patients = {s.patient_index for s in studies}
    assert len(studies) > len(patients)  # some patients have a follow-up study
    grades = {s.perugini_grade for s in studies}
    assert grades == {0, 1, 2, 3}
    assert any(s.superscan for s in studies) and any(s.metastasis for s in studies)
    males = [s for s in studies if s.sex == "M"]
    females = [s for s in studies if s.sex == "F"]
    assert np.mean([s.perugini_grade > 0 for s in males]) > np.mean(
        [s.perugini_grade > 0 for s in females])


def _heart_to_spine(views: np.ndarray) -> float:
    """Anterior heart-region counts relative to posterior thoracic spine counts."""
    ant, post = views[0].astype(float), views[1].astype(float)
    prof = ant.sum(1)
    top = int(np.argmax(prof > prof.max() * 0.05))
    rows = slice(top + 180, top + 240)  # ~0.29 H: the heart / mid-thoracic level
    heart = ant[rows, 128 + 4: 128 + 34].mean()
    spine = post[rows, 120:136].mean()
    return heart / spine


def test_perugini_grades_are_ordered():
    ratios = [np.mean([_heart_to_spine(_render(perugini_grade=g, seed=s)) for s in (1, 2, 3)])
              for g in (0, 1, 2, 3)]
    assert ratios[0] < ratios[1] < ratios[2] < ratios[3], ratios


def test_metastases_add_focal_uptake_and_superscan_intensifies_bone():
    normal = _render(seed=4).astype(float)
    mets = _render(seed=4, metastasis=True).astype(float)
    assert (mets - normal).max() > 5 * np.sqrt(normal.max())
    superscan = _render(seed=4, metastasis=True, superscan=True).astype(float)
    # with the skeleton taking up the tracer, bone-to-background contrast rises
    def contrast(v):
        return np.percentile(v[1], 99.5) / max(np.percentile(v[1][v[1] > 0], 50), 1)
    assert contrast(superscan) > 1.3 * contrast(normal)


def test_posterior_view_shows_spine_and_kidneys_stronger():
    v = _render(seed=9).astype(float)
    prof = v[0].sum(1)
    top = int(np.argmax(prof > prof.max() * 0.05))
    lumbar = slice(top + int(0.40 * 733), top + int(0.50 * 733))  # 1.76 m at 2.4 mm/pixel
    spine = slice(120, 136)
    assert v[1][lumbar, spine].sum() > 1.5 * v[0][lumbar, spine].sum()


def test_projection_attenuates_blurs_and_mirrors_by_depth():
    from tasks.phantom.canvas import Canvas
    from tasks.phantom.physics import Acquisition, project

    cv = Canvas(128, 64, 2.4, (32.0, 10.0))
    cv.blob("back", (30.0, 100.0), 3.0, 1.0)  # behind the mid-plane, patient's left
    acq = Acquisition(8.0, 2.4, 1e5, 0.0, 1.0)
    ant, post = project(cv, 24.0, acq)
    assert post.max() > 3 * ant.max()  # less tissue in front of the posterior head
    # sharper on the posterior view: a larger share of the counts in the peak pixel
    assert post.max() / post.sum() > ant.max() / ant.sum()
    # patient's left is on the viewer's right anteriorly, on the viewer's left posteriorly
    assert np.unravel_index(ant.argmax(), ant.shape)[1] > 32
    assert np.unravel_index(post.argmax(), post.shape)[1] < 32


def test_sites_differ_in_resolution_and_counts():
    def sharpness(v):
        img = v[1].astype(float)
        return np.abs(np.diff(img, axis=1)).mean() / img.mean()
    sharp = np.mean([sharpness(_render("alpine", seed=s)) for s in (1, 2)])
    blurry = np.mean([sharpness(_render("coastal", seed=s)) for s in (1, 2)])
    assert sharp != pytest.approx(blurry, rel=0.05)
    alpine_counts = _render("alpine", seed=1)[0].sum()
    valley_counts = _render("valley", seed=1)[0].sum()
    assert alpine_counts > 1.8 * valley_counts

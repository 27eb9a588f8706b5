"""Every DICOM file the project writes passes dciodvfy (dicom3tools) without an error.

pydicom writes whatever it is given; only a validator that knows the IODs catches a missing
Type 2 attribute, a value the NM IOD does not allow or an LO longer than 64 characters, and a
PACS or viewer that rejects such a file would be the first to tell otherwise. The two writers
are checked on the files they really write: the phantom archive (all five sites, so every
transfer syntax) and a synthetic export (the stage's own manifest format, with both the
default and an over-long registered model name, since the name ends up in LO attributes).

dciodvfy is Debian's dicom3tools. Without it these tests skip, unless
``SYNTHDX_REQUIRE_DCIODVFY`` is set (CI sets it after installing the package): then they fail.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom import config

from models.conditioning import ConditionSpec
from tasks.artifacts.diffusion_model import ModelRef
from tasks.config import SampleGroup, load_config
from tasks.phantom.dicom_writer import StudyHeader, write_study
from tasks.phantom.identity import make_identity
from tasks.synthesize import dicom_export
from tasks.synthesize.pipeline import _manifest
from tasks.synthesize.plan import build_plan
from tests.conftest import PARAMS

REQUIRE_ENV = "SYNTHDX_REQUIRE_DCIODVFY"
DEFAULT_NAME = load_config(PARAMS).diffusion.registered_model_name or "synthdx-bone-scan-diffusion"
# MLflow allows registered-model names far longer than an LO (64 characters).
LONG_NAME = "hospital-nuclear-medicine-team-whole-body-bone-scan-conditional-diffusion-model"


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """The validator's path; skip (or fail, when CI requires it) where it is not installed.

    Session-scoped and requested first, so a test skips before it writes any files.
    """
    path = shutil.which("dciodvfy")
    if path:
        return path
    reason = ("dciodvfy not found (Debian package dicom3tools: "
              "apt-get install --no-install-recommends dicom3tools)")
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason}, and {REQUIRE_ENV} is set")
    pytest.skip(reason)


def _verify(tool: str, files: list[Path], iod: str) -> None:
    """Run dciodvfy on each file; fail listing every error line of every file.

    ``iod`` is the IOD dciodvfy must have recognised, so a file it could not parse at all (it
    reports that as an error too, but a missing name means the check did not run) cannot pass.
    """
    assert files, "no DICOM files to verify"
    problems = []
    for path in files:
        proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines
                  if line.startswith("Error - ") or " - Error - " in line]
        recognised = iod in [line.strip() for line in lines]
        if errors or not recognised:
            problems.append(f"{path} (IOD {iod} {'found' if recognised else 'NOT found'}):"
                            + "".join(f"\n  {line}" for line in errors))
    assert not problems, f"dciodvfy: {len(problems)} of {len(files)} files fail:\n" + (
        "\n".join(problems))


def test_phantom_archive_passes_dciodvfy(dciodvfy: str, tiny_phantom: Path) -> None:
    files = sorted((tiny_phantom / "dicom").rglob("*.dcm"))
    syntaxes = {pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
                for f in files}
    assert len(syntaxes) == 5, syntaxes  # every transfer syntax the phantom writes is checked
    _verify(dciodvfy, files, "NMImage")


def _synthetic_manifest(registered_name: str) -> pd.DataFrame:
    """The synthesize stage's manifest for a small plan, built by the stage's own code."""
    train = pd.DataFrame({"perugini_grade": [0, 0, 1, 3, 3, 2],
                          "sex": ["F", "M", "F", "M", None, "M"],
                          "metastasis": [False, True, False, False, True, False],
                          "site": ["a"] * 6})
    groups = [SampleGroup(name="normal", count=2, condition={"perugini_grade": 0,
                                                             "metastasis": False}),
              SampleGroup(name="amyloid_g3", count=2, condition={"perugini_grade": 3}),
              SampleGroup(name="metastasis", count=1, condition={"metastasis": True})]
    plan = build_plan(groups, ConditionSpec.build(["perugini_grade", "metastasis", "sex"]),
                      train, seed=100)
    ref = ModelRef(path=Path("model"), sha256="0123456789abcdef" * 4,
                   registered_name=registered_name, registered_version="12", global_step=4000)
    return _manifest(plan, load_config(PARAMS).synthesize, ref)


@pytest.mark.parametrize("registered_name", [DEFAULT_NAME, LONG_NAME])
def test_synthetic_export_passes_dciodvfy(dciodvfy: str, tmp_path: Path,
                                          registered_name: str) -> None:
    manifest = _synthetic_manifest(registered_name)
    version = str(manifest["model_version"].iloc[0])
    images = np.random.default_rng(0).random((len(manifest), 2, 64, 32)).astype(np.float16)
    images[0] = 0.0  # the extremes of the stored range, too
    images[1] = 1.0
    assert dicom_export.export_dicom(images, manifest, tmp_path, version) == len(manifest)
    files = sorted(tmp_path.rglob("*.dcm"))
    assert len(files) == len(manifest)
    _verify(dciodvfy, files, "MultiframeGrayscaleWordSCImage")
    # The whole model version still travels in the header (the LO attributes may be clipped).
    assert all(version in pydicom.dcmread(f).DerivationDescription for f in files)


def _modes() -> tuple[int, int]:
    return config.settings.reading_validation_mode, config.settings.writing_validation_mode


def test_synthetic_writer_raises_on_an_invalid_value(tmp_path: Path) -> None:
    """An over-long value raises instead of being written (pydicom would only warn)."""
    manifest = _synthetic_manifest(DEFAULT_NAME).iloc[:1].copy()
    manifest["sample_id"] = "x" * 70  # PatientName's components and PatientID: 64 at most
    images = np.zeros((1, 2, 8, 8), dtype=np.float16)
    before = _modes()
    with pytest.raises(ValueError, match="exceeds the maximum"):
        dicom_export.export_dicom(images, manifest, tmp_path / "out", "v1")
    assert _modes() == before  # the strictness does not leak into the rest of the process
    assert not list(tmp_path.rglob("*.dcm"))


def test_phantom_writer_raises_on_an_invalid_value(tmp_path: Path) -> None:
    ident = make_identity(1, 2, "F", dt.date(1950, 3, 4), "internal", dt.date(2022, 5, 6))
    head = StudyHeader(sex="F", age_years=72, weight_kg=61.0, height_m=1.62,
                       institution="x" * 70,  # InstitutionName is an LO: 64 at most
                       institution_address="1 Hospital Road", manufacturer="ACME",
                       model="Gamma 2", tracer="DPD", dose_mbq=700.0, pixel_mm=2.4,
                       scan_speed_cm_min=15.0, frame_duration_ms=400_000, uid_seed="t")
    views = np.ones((2, 16, 8), dtype=np.uint16)
    before = _modes()
    with pytest.raises(ValueError, match=r"a\.dcm: .*exceeds the maximum"):
        write_study(tmp_path / "a.dcm", views, ident, head)
    assert _modes() == before
    assert not (tmp_path / "a.dcm").exists()


@pytest.mark.parametrize("patient_seed", [303, 10071])  # Faker en_US draws 66 and 65 characters
def test_phantom_writes_patients_whose_drawn_address_is_too_long(tmp_path: Path,
                                                                 patient_seed: int) -> None:
    """A fake address over the LO limit is fitted, so the study's 7,800 patients all write."""
    ident = make_identity(patient_seed, 2, "F", dt.date(1950, 3, 4), "internal",
                          dt.date(2022, 5, 6))
    assert 50 < len(ident.address) <= 64, ident.address
    assert "Suite" not in ident.address  # the unit went, the street and city stayed
    head = StudyHeader(sex="F", age_years=72, weight_kg=61.0, height_m=1.62,
                       institution="St Aurelia University Hospital",
                       institution_address="1 Hospital Road", manufacturer="ACME",
                       model="Gamma 2", tracer="DPD", dose_mbq=700.0, pixel_mm=2.4,
                       scan_speed_cm_min=15.0, frame_duration_ms=400_000, uid_seed="t")
    write_study(tmp_path / "a.dcm", np.ones((2, 16, 8), dtype=np.uint16), ident, head)
    assert pydicom.dcmread(tmp_path / "a.dcm").PatientAddress == ident.address

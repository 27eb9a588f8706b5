"""Synthetic images as DICOM files that say, everywhere a viewer or PACS looks, that they are.

One Multi-frame Grayscale Word Secondary Capture instance per synthetic image, frame 1 the
anterior and frame 2 the posterior view. Secondary Capture is the IOD DICOM defines for
images not acquired from a patient by a modality; ConversionType ``SYN`` (synthetic image)
marks how it was made. Every UID is new, the "patient" is the sample id, and there is no
date, institution or person anywhere: nothing links a file to the real patients the model
learned from. The image comments and the private-free standard attributes carry the
condition, seed and model version, so any file can be regenerated from its header alone.

The files pass dciodvfy (dicom3tools) without errors; tests/test_dicom_conformance.py checks
it. Its remaining warnings are deliberate: Study Date and Study Time are empty (a DICOMDIR
builder would want them), because a date would be the one thing that is not the same when the
same dataset is exported again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom import config
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

#: Multi-frame Grayscale Word Secondary Capture Image Storage.
SC_MULTIFRAME_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
MAX_STORED = 4095  # 12 bits stored: the usual NM/SC range, exact for float16 sources
SYNTHETIC_MARK = "SYNTHETIC"
LO_MAX = 64  # characters in a Long String (LO) value
DEIDENTIFICATION_METHOD = "synthetic image: never held patient identity"  # LO


@contextmanager
def strict_values() -> Iterator[None]:
    """Make pydicom raise on a value its VR does not allow, while a file is built and saved.

    pydicom only warns by default, and writes the invalid value anyway. In pydicom 3 values
    are checked when they are assigned, under the *reading* validation mode (the writing mode
    covers only person-name components and character sets), so both are set to RAISE. They
    are restored afterwards: ingest reads other people's files and must stay lenient.
    """
    settings = config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _fit_lo(prefix: str, version: str) -> str:
    """``prefix + version`` within an LO's 64 characters, clipping the version's start.

    A registered model's version is ``name/vN@sha12`` and the name can be as long as MLflow
    allows; its end (the digest of the weights) is what identifies the model. The whole
    version stays in DerivationDescription (ST, 1024 characters).
    """
    room = LO_MAX - len(prefix)
    if len(version) > room:
        version = "..." + version[len(version) - room + 3:]
    return prefix + version


def _uid(entropy: list[str] | None) -> str:
    """A 2.25.<uuid> UID derived from ``entropy``.

    New (no source UID survives), yet the same image exported twice gets the same UID.
    """
    return generate_uid(prefix=None, entropy_srcs=entropy)


@strict_values()
def build_dataset(image: np.ndarray, row: pd.Series, model_version: str, series_uid: str,
                  study_uid: str, instance: int) -> FileDataset:
    """The DICOM dataset of one synthetic image (2, rows, cols) in [0, 1].

    Raises:
        ValueError: a value its VR does not allow (e.g. a sample id longer than an LO).
    """
    sop_uid = _uid([model_version, str(row["sample_id"]), str(row["seed"]), "sop"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_MULTIFRAME_WORD
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "SYNTHDX"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SC_MULTIFRAME_WORD
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD  # required with the YES above
    ds.PatientName = f"{SYNTHETIC_MARK}^{row['sample_id']}"
    ds.PatientID = str(row["sample_id"])
    ds.PatientBirthDate = ""
    ds.PatientSex = str(row["sex"]) if isinstance(row.get("sex"), str) else ""
    ds.StudyID = "SYN"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = ds.StudyTime = ds.ContentDate = ds.ContentTime = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.StudyDescription = f"{SYNTHETIC_MARK} whole-body bone scan"
    ds.SeriesDescription = _fit_lo(f"{SYNTHETIC_MARK} model ", model_version)
    # Whole body: an unpaired part, so no Laterality (without Body Part Examined a reader
    # cannot tell, and dciodvfy asks for Laterality).
    ds.BodyPartExamined = "WHOLEBODY"
    ds.Manufacturer = "synthdx"
    ds.SecondaryCaptureDeviceManufacturer = "synthdx"
    ds.SecondaryCaptureDeviceManufacturerModelName = "conditional diffusion model"
    ds.SecondaryCaptureDeviceSoftwareVersions = _fit_lo("", model_version)
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.PatientOrientation = ""  # Type 2C: one value per image, and the two frames differ
    ds.DerivationDescription = (f"Generated by synthdx from model {model_version}: "
                                f"{row['sampler']} {int(row['steps'])} steps, guidance "
                                f"{float(row['guidance_scale'])}, seed {int(row['seed'])}")
    condition = ", ".join(f"{k}={row[k]}" for k in ("perugini_grade", "metastasis",
                                                      "superscan", "sex", "site")
                          if pd.notna(row.get(k)))
    ds.ImageComments = (f"{SYNTHETIC_MARK} image, not a patient. group={row['group']}; "
                        f"{condition}; seed={int(row['seed'])}")
    ds.FrameIncrementPointer = 0x00181063  # Frame Time: harmless, required by the module
    ds.FrameTime = 0
    ds.NumberOfFrames = int(image.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(image.shape[1]), int(image.shape[2])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "IDENTITY"  # required for MONOCHROME2
    # A DS holds 16 characters: 0.00024420024420, within 1e-12 of 1 / 4095.
    ds.RescaleIntercept, ds.RescaleSlope = 0, format_number_as_ds(1.0 / MAX_STORED)
    ds.RescaleType = "US"
    pixels = np.clip(np.rint(np.asarray(image, dtype=np.float32) * MAX_STORED), 0, MAX_STORED)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def export_dicom(images: np.ndarray, manifest: pd.DataFrame, folder: Path,
                 model_version: str) -> int:
    """Write one SC file per synthetic image under ``folder/<group>/``.

    The caller writes into a temporary dataset folder that is renamed into place as a whole,
    so a killed export never leaves half a set. All images of one export share a study; each
    group is a series. UIDs derive from the model version, sample id and seed, so
    re-exporting the same dataset gives the same files.

    Returns:
        The number of files written.

    Raises:
        ValueError: a value its VR does not allow; pydicom raises instead of writing it
            (:func:`strict_values`).
    """
    study_uid = _uid([model_version, "study"])
    for number, (group, rows) in enumerate(manifest.groupby("group", sort=False)):
        series_uid = _uid([model_version, str(group), "series"])
        target = Path(folder) / str(group)
        target.mkdir(parents=True)
        for instance, (_, row) in enumerate(rows.iterrows(), start=1):
            ds = build_dataset(images[int(row["index"])], row, model_version, series_uid,
                               study_uid, instance)
            with strict_values():
                ds.SeriesNumber = number + 1
                ds.save_as(target / f"{row['sample_id']}.dcm", enforce_file_format=True)
    return len(manifest)

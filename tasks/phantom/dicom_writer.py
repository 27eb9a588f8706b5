"""Write a whole-body bone scan as a Nuclear Medicine Image Storage object.

One NM image with two frames (anterior, posterior), as dual-head cameras store a whole-body
sweep; EnergyWindowVector and DetectorVector are the frame increment pointers (what the NM
IOD prescribes for WHOLE BODY images) and each detector carries a View Code Sequence, which is
how ingest tells the views apart.

The files pass dciodvfy (dicom3tools) without errors; tests/test_dicom_conformance.py checks
it. Its remaining warnings are deliberate: the private block and the attributes outside the
NM IOD (Patient's Address and Telephone Numbers, Requesting Physician) repeat identity where
real PACS exports do, so that ingest's de-identification is tested on it.
"""

from __future__ import annotations

import datetime as dt
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    NuclearMedicineImageStorage,
    RLELossless,
    generate_uid,
)

from tasks.common.dicom_values import strict_values
from tasks.phantom.identity import FakeIdentity

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit_le": ExplicitVRLittleEndian,
    "implicit_le": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg_ls": JPEGLSLossless,
    "jpeg2000": JPEG2000Lossless,
}

# SNOMED CT projection codes used in DICOM CID 26 (Nuclear Medicine Projection).
VIEW_CODES = {
    "anterior": ("399348003", "antero-posterior"),
    "posterior": ("399300004", "postero-anterior"),
}

# Direction cosines (patient LPS axes) of a frame's rows and columns: the head is at the top;
# the posterior view is stored mirrored, as displayed (patient's left on the viewer's left).
IMAGE_ORIENTATION = {
    "anterior": (1, 0, 0, 0, 0, -1),
    "posterior": (-1, 0, 0, 0, 0, -1),
}
# Patient position on the table (SNOMED CT, CIDs 19, 20 and 21): supine, head first.
PATIENT_ORIENTATION = ("102538003", "recumbent")
PATIENT_ORIENTATION_MODIFIER = ("40199007", "supine")
PATIENT_GANTRY_RELATIONSHIP = ("102540008", "headfirst")

TRACER_NAMES = {"DPD": "Tc99m DPD", "HMDP": "Tc99m HMDP", "MDP": "Tc99m MDP"}

# A private block of the kind PACS vendors add; it repeats identity, so it must be stripped.
PRIVATE_CREATOR = "SYNTHDX PACS 1.0"


@dataclass(frozen=True)
class StudyHeader:
    """Non-identity acquisition facts written into the header."""

    sex: str
    age_years: int
    weight_kg: float
    height_m: float
    institution: str
    institution_address: str
    manufacturer: str
    model: str
    tracer: str
    dose_mbq: float
    pixel_mm: float
    scan_speed_cm_min: float
    frame_duration_ms: int
    uid_seed: str


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(seed: str, what: str) -> UID:
    return generate_uid(entropy_srcs=[seed, what])


@strict_values()
def build_dataset(views: np.ndarray, ident: FakeIdentity, head: StudyHeader) -> Dataset:
    """Build the NM dataset (uncompressed pixel data) for one patient.

    Args:
        views: uint16 array (2, rows, cols): anterior then posterior, as stored on the camera
            (posterior already mirrored the way it is displayed).
        ident: the fake identity to put in the header.
        head: acquisition facts.
    """
    if views.ndim != 3 or views.shape[0] != 2 or views.dtype != np.uint16:
        raise ValueError(f"views must be uint16 (2, rows, cols), got {views.dtype} {views.shape}")
    sop_uid = _uid(head.uid_seed, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = NuclearMedicineImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    date = ident.study_date.strftime("%Y%m%d")

    # SOP common, patient, study, series, equipment
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.IssuerOfPatientID = head.institution
    ds.OtherPatientIDsSequence = Sequence([Dataset()])
    ds.OtherPatientIDsSequence[0].PatientID = ident.other_patient_id
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    ds.PatientBirthDate = ident.birth_date.strftime("%Y%m%d")
    ds.PatientSex = head.sex
    ds.PatientAge = f"{head.age_years:03d}Y"
    ds.PatientWeight = f"{head.weight_kg:.1f}"
    ds.PatientSize = f"{head.height_m:.2f}"
    ds.PatientAddress = ident.address
    ds.PatientTelephoneNumbers = ident.phone
    ds.PatientComments = f"Pt {ident.patient_name.replace('^', ' ')} ph {ident.phone}"
    ds.StudyInstanceUID = _uid(head.uid_seed, "study")
    ds.StudyDate = date
    ds.StudyTime = ident.study_time
    ds.ReferringPhysicianName = ident.referring_physician
    ds.StudyID = ident.study_id
    ds.AccessionNumber = ident.accession_number
    ds.StudyDescription = "NM BONE WHOLE BODY"
    ds.RequestingPhysician = ident.referring_physician
    ds.Modality = "NM"
    ds.SeriesInstanceUID = _uid(head.uid_seed, "series")
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = ident.study_time
    ds.SeriesDescription = "WB ANT/POST"
    # Whole body: an unpaired part, so no Laterality (without Body Part Examined a reader
    # cannot tell, and dciodvfy asks for Laterality).
    ds.BodyPartExamined = "WHOLEBODY"
    ds.PerformingPhysicianName = ident.performing_physician
    ds.OperatorsName = ident.operator
    ds.FrameOfReferenceUID = _uid(head.uid_seed, "for")
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = head.manufacturer
    ds.ManufacturerModelName = head.model
    ds.InstitutionName = head.institution
    ds.InstitutionAddress = head.institution_address
    ds.InstitutionalDepartmentName = ident.institution_department
    ds.StationName = ident.station_name
    ds.DeviceSerialNumber = str(zlib.crc32((head.institution + head.model).encode()) % 10**6)
    ds.SoftwareVersions = "VB20A"

    # General image, NM image
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = ident.study_time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = ident.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY", "WHOLE BODY", "EMISSION"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PatientOrientation = ""
    ds.ImageComments = f"WB bone {head.tracer} acc {ident.accession_number}"
    ds.CountsAccumulated = int(views.astype(np.int64).sum())
    ds.ActualFrameDuration = head.frame_duration_ms
    ds.ScanVelocity = f"{head.scan_speed_cm_min * 10 / 60:.3f}"  # mm/s
    ds.WholeBodyTechnique = ["1PS", "2PS"]
    ds.ScanLength = int(views.shape[1] * head.pixel_mm)

    # Image pixel (NM: 16-bit unsigned, MONOCHROME2)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(views.shape[1]), int(views.shape[2])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [f"{head.pixel_mm:.4f}", f"{head.pixel_mm:.4f}"]

    # Multi-frame, NM multi-frame (WHOLE BODY: frames indexed by energy window and detector)
    ds.NumberOfFrames = 2
    ds.FrameIncrementPointer = [0x00540010, 0x00540020]
    ds.EnergyWindowVector = [1, 1]
    ds.DetectorVector = [1, 2]

    # NM/PET patient orientation
    orientation = _code(*PATIENT_ORIENTATION)
    orientation.PatientOrientationModifierCodeSequence = Sequence(
        [_code(*PATIENT_ORIENTATION_MODIFIER)])
    ds.PatientOrientationCodeSequence = Sequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code(*PATIENT_GANTRY_RELATIONSHIP)])

    # NM detector
    ds.NumberOfDetectors = 2
    detectors = []
    for view in ("anterior", "posterior"):
        item = Dataset()
        item.ImagePositionPatient = ""  # Type 2: the table position is not modelled
        item.ImageOrientationPatient = list(IMAGE_ORIENTATION[view])
        item.ViewCodeSequence = Sequence([_code(*VIEW_CODES[view])])
        item.CollimatorType = "PARA"
        item.CollimatorGridName = "LEHR"
        item.FocalDistance = [0]
        item.ZoomFactor = ["1.0", "1.0"]
        detectors.append(item)
    ds.DetectorInformationSequence = Sequence(detectors)
    window = Dataset()
    rng = Dataset()
    rng.EnergyWindowLowerLimit = "126.0"
    rng.EnergyWindowUpperLimit = "154.0"
    window.EnergyWindowRangeSequence = Sequence([rng])
    window.EnergyWindowName = "Tc99m"
    ds.EnergyWindowInformationSequence = Sequence([window])
    ds.NumberOfEnergyWindows = 1
    radio = Dataset()
    radio.Radiopharmaceutical = TRACER_NAMES.get(head.tracer, head.tracer)
    radio.RadionuclideTotalDose = f"{head.dose_mbq:.1f}"
    radio.RadiopharmaceuticalStartTime = "080000"
    radio.RadionuclideCodeSequence = Sequence([_code("44588005", "Technetium-99m")])
    ds.RadiopharmaceuticalInformationSequence = Sequence([radio])

    # Private block repeating identity, as some PACS do.
    block = ds.private_block(0x0029, PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", f"MRN={ident.patient_id}")
    block.add_new(0x11, "LO", ident.patient_name)
    block.add_new(0x12, "DA", ident.birth_date.strftime("%Y%m%d"))

    ds.PixelData = views.tobytes()
    return ds


def write_study(
    path: Path,
    views: np.ndarray,
    ident: FakeIdentity,
    head: StudyHeader,
    transfer_syntax: str = "explicit_le",
) -> None:
    """Write one study to ``path`` in the requested transfer syntax.

    Compression uses pydicom's encoders (RLE natively or via pylibjpeg-rle, JPEG-LS via
    pyjpegls, JPEG 2000 via pylibjpeg-openjpeg), all lossless so the counts are exact. A value
    its VR does not allow raises here (:func:`strict_values`) instead of being written.

    Raises:
        ValueError: a header value its VR does not allow; the message names the file, since
            pydicom's own names neither the file nor the element.
    """
    with strict_values():
        try:
            ds = build_dataset(views, ident, head)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        tsuid = TRANSFER_SYNTAXES[transfer_syntax]
        if tsuid.is_compressed:
            ds.compress(tsuid, views, generate_instance_uid=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        implicit = tsuid == ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = tsuid
        ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)


def study_date_for(seed: int) -> dt.date:
    """A study date in the last few years, deterministic per seed."""
    rng = np.random.default_rng(seed)
    return dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))

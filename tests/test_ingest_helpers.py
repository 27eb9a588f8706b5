"""Small DICOM archives with known fake identities for the ingest tests (no tests here).

Images are tiny (96 x 32 or 120 x 40 pixels, a bright bar over Poisson background) so a whole
archive is written and ingested in a second or two; every transfer syntax the phantom uses
appears, and each kind of bad file ingest must quarantine is built on purpose.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from tasks.config import IngestConfig
from tasks.phantom.dicom_writer import TRANSFER_SYNTAXES, StudyHeader, build_dataset
from tasks.phantom.identity import FakeIdentity, make_identity

TEST_KEY = "unit-test-key-0123456789abcdef"
OTHER_KEY = "another-test-key-fedcba9876543210"
# Original study dates lie in this window; shifted dates are >= 30 days earlier, so a
# shifted date can never equal an original one (the identity scan relies on it).
FIRST_DAY = dt.date(2022, 6, 1)

# site -> (role, rows, cols, transfer syntaxes used in turn)
SITES = {
    "alpha": ("internal", 96, 32, ("explicit_le", "jpeg_ls", "rle")),
    "beta": ("external", 120, 40, ("jpeg2000", "implicit_le")),
    "gamma": ("external", 96, 32, ("rle",)),
}
PATIENTS = {"alpha": 6, "beta": 3, "gamma": 2}
FOLLOW_UP = {("alpha", 0), ("alpha", 3), ("beta", 1)}  # (site, patient) with a second study


@dataclass
class Study:
    """One written file and what the tests need to know about it."""

    relpath: str
    site: str
    patient: str
    ident: FakeIdentity
    study_uid: str
    sop_uid: str
    study_date: dt.date
    transfer_syntax: str
    label: dict[str, object] = field(default_factory=dict)


@dataclass
class Archive:
    """A fixture archive: source folder, labels file, studies and the expected outcomes."""

    root: Path
    source: Path
    labels: Path
    good: list[Study]
    bad: dict[str, str]  # relpath -> expected reason (start of it)
    identities: list[FakeIdentity]
    extra_secrets: list[str]

    def config(self, out: Path, **changes: object) -> IngestConfig:
        """An ingest configuration for this archive writing below ``out``."""
        key_file = self.root / "key.txt"
        key_file.write_text(TEST_KEY)
        values: dict[str, object] = {
            "source": self.source, "labels": self.labels, "output": out / "processed",
            "quarantine": out / "quarantine", "image_rows": 48, "image_cols": 16,
            "workers": 2, "key_file": key_file,
        }
        values.update(changes)
        return IngestConfig(**values)

    def secrets(self) -> list[str]:
        """Every identity value the files hold (>= 5 characters), and original UIDs."""
        values = {v for ident in self.identities for v in ident.sensitive_values()}
        values |= {s.study_uid for s in self.good} | {s.sop_uid for s in self.good}
        values |= set(self.extra_secrets)
        return sorted(v for v in values if len(v) >= 5)


def views_for(seed: int, rows: int, cols: int, bar: int | None = None) -> np.ndarray:
    """uint16 (2, rows, cols): Poisson background, a hot vertical bar, brighter posterior."""
    rng = np.random.default_rng(seed)
    lam = np.full((2, rows, cols), 0.6)
    left = cols // 2 - 3 if bar is None else bar
    lam[0, rows // 8: rows - rows // 8, left:left + 6] = 40.0
    lam[1, rows // 8: rows - rows // 8, cols - left - 6:cols - left] = 55.0
    return rng.poisson(lam).astype(np.uint16)


def header_for(site: str, seed: int, cols: int) -> StudyHeader:
    return StudyHeader(
        sex="F", age_years=61, weight_kg=72.5, height_m=1.68,
        institution=f"{site.title()} General Hospital", institution_address="1 Hospital Road",
        manufacturer="Siemens", model="Symbia", tracer="HMDP", dose_mbq=650.0, pixel_mm=2.4,
        scan_speed_cm_min=14.0, frame_duration_ms=1000, uid_seed=f"fixture-{site}-{seed}-{cols}",
    )


def write_dicom(path: Path, views: np.ndarray, ident: FakeIdentity, head: StudyHeader,
                transfer_syntax: str = "explicit_le",
                mutate: Callable[[Dataset], None] | None = None) -> Dataset:
    """write_study, with a hook that edits the dataset before it is encoded and saved."""
    ds = build_dataset(views, ident, head)
    if mutate is not None:
        mutate(ds)
    tsuid = TRANSFER_SYNTAXES[transfer_syntax]
    if tsuid.is_compressed and "PixelData" in ds:
        frames = int(ds.get("NumberOfFrames", 1))
        arr = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(
            frames, int(ds.Rows), int(ds.Columns))
        ds.compress(tsuid, arr if frames > 1 else arr[0], generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = tsuid
    ds.save_as(path, implicit_vr=tsuid == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return ds


def _identity(seed: int, role: str, day: dt.date) -> FakeIdentity:
    ident = make_identity(seed, seed + 1, "F", day - dt.timedelta(days=61 * 365), role, day)
    # Six-digit study IDs could turn up by chance inside long numbers; make them distinctive.
    return dataclasses.replace(ident, study_id=f"SID{seed:07d}")


def build_archive(root: Path, bad_files: bool = True) -> Archive:
    """Write the fixture archive below ``root``: good studies, bad files and labels.csv."""
    source = root / "source"
    good: list[Study] = []
    identities: list[FakeIdentity] = []
    rows_out: list[dict[str, object]] = []
    seed = 1000
    for site, (role, rows, cols, syntaxes) in SITES.items():
        for p in range(PATIENTS[site]):
            seed += 1
            day = FIRST_DAY + dt.timedelta(days=seed % 17)
            base = _identity(seed, role, day)
            n_studies = 2 if (site, p) in FOLLOW_UP else 1
            for k in range(n_studies):
                study_day = day + dt.timedelta(days=3 * k)
                ident = base if k == 0 else dataclasses.replace(
                    base, study_date=study_day, accession_number=f"ACC{seed:05d}{k:05d}",
                    study_id=f"SID{seed:06d}{k}")
                identities.append(ident)
                ts = syntaxes[(p + k) % len(syntaxes)]
                head = header_for(site, seed * 10 + k, cols)
                relpath = f"{site}/s{seed}_{k}/IMG0001.dcm"
                ds = write_dicom(source / relpath, views_for(seed * 10 + k, rows, cols),
                                 ident, head, ts)
                label = {"study_uid": str(ds.StudyInstanceUID), "patient_id": ident.patient_id,
                         "site": site, "perugini_grade": (seed + k) % 4,
                         "metastasis": int((seed // 2) % 2), "sex": "F", "age": 61,
                         "bmi": 25.5, "lesion_count": seed % 3, "tracer": "HMDP",
                         "notes": f"seen by {ident.referring_physician}"}
                rows_out.append(label)
                good.append(Study(relpath, site, ident.patient_id, ident,
                                  str(ds.StudyInstanceUID), str(ds.SOPInstanceUID),
                                  study_day, ts, label))
    bad: dict[str, str] = {}
    extra_secrets = [str(r["notes"]) for r in rows_out]
    if bad_files:
        bad = _write_bad_files(source, rows_out, identities)
    # One labels row whose study has no image at all.
    rows_out.append({"study_uid": "1.2.3.4.5.6.7.8.9", "patient_id": "Z00000001",
                     "site": "alpha", "perugini_grade": 0, "metastasis": 0, "sex": "M",
                     "age": 70, "bmi": 22.0, "lesion_count": 0, "tracer": "HMDP",
                     "notes": ""})
    labels = root / "labels.csv"
    pd.DataFrame(rows_out).to_csv(labels, index=False)
    return Archive(root, source, labels, good, bad, identities, extra_secrets)


def _write_bad_files(source: Path, rows_out: list[dict[str, object]],
                     identities: list[FakeIdentity]) -> dict[str, str]:
    """Every kind of file ingest must reject, with the reason it must give."""
    bad: dict[str, str] = {}
    seed = 5000

    def make(relpath: str, reason: str, mutate: Callable[[Dataset], None] | None = None,
             labelled: bool = True, ts: str = "explicit_le", **label: object) -> Dataset:
        nonlocal seed
        seed += 1
        ident = _identity(seed, "internal", FIRST_DAY)
        identities.append(ident)
        ds = write_dicom(source / relpath, views_for(seed, 96, 32), ident,
                         header_for("alpha", seed, 32), ts, mutate)
        if labelled:
            rows_out.append({"study_uid": str(ds.StudyInstanceUID),
                             "patient_id": ident.patient_id, "site": "alpha",
                             "perugini_grade": 1, "metastasis": 0, "sex": "F", "age": 50,
                             "bmi": 24.0, "lesion_count": 0, "tracer": "HMDP", "notes": "",
                             **label})
        bad[relpath] = reason
        return ds

    def single_frame(ds: Dataset) -> None:
        ds.NumberOfFrames = 1
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.DetectorVector = [1]

    def both_anterior(ds: Dataset) -> None:
        item = ds.DetectorInformationSequence[1].ViewCodeSequence[0]
        item.CodeValue, item.CodeMeaning = "399348003", "antero-posterior"

    make("bad/ct.dcm", "modality is CT, expected NM", lambda ds: setattr(ds, "Modality", "CT"))
    make("bad/single.dcm", "expected 2 frames (anterior and posterior), found 1", single_frame)
    make("bad/burned.dcm", "burned-in annotation (BurnedInAnnotation=YES)",
         lambda ds: setattr(ds, "BurnedInAnnotation", "YES"))
    make("bad/nopixels.dcm", "no pixel data", lambda ds: delattr(ds, "PixelData"))
    make("bad/unlabelled.dcm", "no row in the labels file for this study", labelled=False)
    make("bad/grade5.dcm", "invalid label perugini_grade=5 (must be 0-3)", perugini_grade=5)
    make("bad/views.dcm", "cannot identify an anterior and a posterior view", both_anterior,
         ts="rle")
    make("bad/undecodable.dcm", "pixel data cannot be decoded (JPEG-LS Lossless",
         ts="jpeg_ls")
    path = source / "bad/undecodable.dcm"  # break the JPEG-LS frame headers (SOF55 markers)
    path.write_bytes(path.read_bytes().replace(b"\xff\xf7", b"\xff\xf3"))
    truncated = make("bad/truncated.dcm", "file is truncated or corrupt")
    data = (source / "bad/truncated.dcm").read_bytes()
    (source / "bad/truncated.dcm").write_bytes(data[: len(data) - len(truncated.PixelData) // 2])
    rng = np.random.default_rng(7)
    (source / "bad/garbage.dcm").write_bytes(
        b"\0" * 128 + b"DICM" + rng.integers(0, 256, 6000, dtype=np.uint8).tobytes())
    bad["bad/garbage.dcm"] = "file is truncated or corrupt"
    (source / "misc").mkdir(parents=True, exist_ok=True)
    (source / "misc/notes.txt").write_text("scan list for the archive export\n")
    bad["misc/notes.txt"] = "not a DICOM file"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(source / "misc/preview.png")
    bad["misc/preview.png"] = "not a DICOM file"
    return bad


def add_duplicate(archive: Archive) -> str:
    """Copy the first good file to a later path; it must be quarantined as a duplicate."""
    relpath = "zz_copies/copy_of_first.dcm"
    target = archive.source / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((archive.source / archive.good[0].relpath).read_bytes())
    archive.bad[relpath] = "duplicate of an already ingested image"
    return relpath


def scan_for_secrets(paths: list[Path], secrets: list[str]) -> list[tuple[str, str]]:
    """(file, secret) for every secret found in the bytes of any file below ``paths``."""
    hits: list[tuple[str, str]] = []
    encoded = [(s, s.encode("utf-8")) for s in secrets]
    for top in paths:
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.is_file()]
        for path in files:
            data = path.read_bytes()
            hits += [(str(path), s) for s, b in encoded if b in data]
    return hits


def crash_on_marked_file(relpaths: list[str]) -> list:
    """Chunk task for the crash test: the worker dies on any file named 'crash*'."""
    from tasks.ingest.reader import process_chunk

    if any(Path(p).name.startswith("crash") for p in relpaths):
        os._exit(3)
    return process_chunk(relpaths)

"""De-identification of one header: the PS3.15 table, our overrides, keys, dates and UIDs."""

from __future__ import annotations

import copy
import datetime as dt
import json

import numpy as np
import pytest
from dicomanonymizer import simpledicomanonymizer as sda
from pydicom.dataset import Dataset
from test_ingest_helpers import header_for, views_for

from tasks.ingest.deid import KEEP, Deidentifier, _table, header_json
from tasks.ingest.pseudonym import (
    DATE_SHIFT_MAX_DAYS,
    DATE_SHIFT_MIN_DAYS,
    Pseudonymizer,
    PseudonymKey,
)
from tasks.phantom.dicom_writer import build_dataset
from tasks.phantom.identity import FakeIdentity, make_identity

KEY = PseudonymKey(b"deid-test-key-0123456789", "env")


def _dataset(seed: int = 1, day: dt.date = dt.date(2022, 3, 4)) -> tuple[Dataset, FakeIdentity]:
    ident = make_identity(seed, seed + 1, "M", day - dt.timedelta(days=67 * 365), "internal", day)
    ds = build_dataset(views_for(seed, 64, 32), ident, header_for("alpha", seed, 32))
    # Free text and names in places the PS3.15 table does not list.
    ds.DetectorInformationSequence[0].DetectorDescription = f"calibrated by {ident.operator}"
    ds.DetectorInformationSequence[0].OperatorsName = ident.operator
    ds.InstructionPerformanceComment = f"call {ident.phone}"
    return ds, ident


def _deidentify(ds: Dataset, key: PseudonymKey = KEY, patient: str = "MRN1") -> Deidentifier:
    pseudo = Pseudonymizer(key)
    deid = Deidentifier(pseudo, pseudo.patient("alpha", patient),
                        pseudo.date_shift_days("alpha", patient))
    deid(ds)
    return deid


def _all_elements(ds: Dataset) -> list:
    found = []
    ds.walk(lambda _, element: found.append(element))
    return found


def test_identity_values_are_gone_and_characteristics_kept() -> None:
    ds, ident = _dataset()
    _deidentify(ds)
    text = json.dumps(header_json(copy.deepcopy(ds)))
    for value in ident.sensitive_values():
        if len(value) >= 5:
            assert value not in text, value
    assert ds.PatientName == ""
    assert "PatientBirthDate" not in ds
    assert "OtherPatientIDsSequence" not in ds
    assert "PatientComments" not in ds and "ImageComments" not in ds
    assert "InstructionPerformanceComment" not in ds
    assert "DetectorDescription" not in ds.DetectorInformationSequence[0]
    # The table applies inside sequences too (the package alone skips them, see below).
    assert ds.DetectorInformationSequence[0].OperatorsName != ident.operator
    # Retain Patient Characteristics: sex, age and weight; device facts stay too.
    assert (ds.PatientSex, ds.PatientAge, float(ds.PatientWeight)) == ("F", "061Y", 72.5)
    assert ds.Manufacturer == "Siemens" and ds.Modality == "NM"
    views = [item.ViewCodeSequence[0].CodeValue for item in ds.DetectorInformationSequence]
    assert views == ["399348003", "399300004"]
    assert ds.PatientIdentityRemoved == "YES"
    assert {item.CodeValue for item in ds.DeidentificationMethodCodeSequence} == {
        "113100", "113107", "113108"}


def test_private_tags_removed_everywhere() -> None:
    ds, _ = _dataset()
    ds.DetectorInformationSequence[0].private_block(0x0031, "VENDOR X", create=True).add_new(
        0x01, "LO", "nested private")
    assert any(e.tag.is_private for e in _all_elements(ds))
    _deidentify(ds)
    assert not [e.tag for e in _all_elements(ds) if e.tag.is_private]


def test_every_table_rule_present_in_the_header_is_applied() -> None:
    """Each attribute the dicom-anonymizer table lists is removed, emptied or replaced,
    except the documented keeps (sex, age, weight); dates are shifted, not kept."""
    ds, _ = _dataset()
    before = {int(e.tag): e.value for e in ds.iterall() if e.VR != "SQ"}
    single, _ = _table()
    listed = [tag for tag in before if tag in single]
    assert len(listed) > 20  # the fixture carries plenty of PS3.15 attributes
    _deidentify(ds)
    after = {int(e.tag): e.value for e in ds.iterall() if e.VR != "SQ"}
    for tag in listed:
        if tag in KEEP:
            assert after[tag] == before[tag]
        elif tag in after and after[tag] not in ("", None, b""):
            assert after[tag] != before[tag], f"{tag:08X} kept its value"


def test_dates_shifted_consistently_per_patient() -> None:
    first, _ = _dataset(1, dt.date(2022, 3, 4))
    second, _ = _dataset(2, dt.date(2022, 9, 30))
    _deidentify(first, patient="MRN1")
    _deidentify(second, patient="MRN1")
    d1 = dt.datetime.strptime(first.StudyDate, "%Y%m%d").date()
    d2 = dt.datetime.strptime(second.StudyDate, "%Y%m%d").date()
    shift = (d1 - dt.date(2022, 3, 4)).days
    assert -DATE_SHIFT_MAX_DAYS <= shift <= -DATE_SHIFT_MIN_DAYS
    assert (d2 - d1).days == (dt.date(2022, 9, 30) - dt.date(2022, 3, 4)).days
    assert first.SeriesDate == first.StudyDate == first.AcquisitionDate
    other, _ = _dataset(3, dt.date(2022, 3, 4))
    _deidentify(other, patient="MRN2")
    shifts = {Pseudonymizer(KEY).date_shift_days("alpha", f"MRN{i}") for i in range(40)}
    assert len(shifts) > 30  # offsets differ between patients


def test_uids_remapped_consistently_and_keyed() -> None:
    a, _ = _dataset(1)
    b, _ = _dataset(1)
    original = {"study": str(a.StudyInstanceUID), "sop": str(a.SOPInstanceUID),
                "class": str(a.SOPClassUID), "ts": str(a.file_meta.TransferSyntaxUID)}
    _deidentify(a)
    _deidentify(b)
    assert a.StudyInstanceUID == b.StudyInstanceUID != original["study"]
    assert a.SOPInstanceUID != original["sop"]
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID,
                a.FrameOfReferenceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
    assert len({a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID}) == 3
    assert str(a.SOPClassUID) == original["class"]
    assert str(a.file_meta.TransferSyntaxUID) == original["ts"]
    c, _ = _dataset(1)
    _deidentify(c, key=PseudonymKey(b"a-completely-different-key", "env"))
    assert c.StudyInstanceUID != a.StudyInstanceUID


def test_pseudonyms_stable_for_a_key_and_different_for_another() -> None:
    one, again = Pseudonymizer(KEY), Pseudonymizer(PseudonymKey(KEY.secret, "file"))
    other = Pseudonymizer(PseudonymKey(b"another-key-for-this-test", "env"))
    assert one.patient("alpha", "MRN1") == again.patient("alpha", "MRN1")
    assert one.patient("alpha", "MRN1") != other.patient("alpha", "MRN1")
    assert one.patient("alpha", "MRN1") != one.patient("beta", "MRN1")
    assert "MRN1" not in one.patient("alpha", "MRN1")
    assert "deid-test-key" not in repr(KEY)


def test_what_dicom_anonymizer_alone_leaves_behind() -> None:
    """Why ingest adds its own steps on top of the package (documented in deid.py)."""
    ds, ident = _dataset()
    study_uid = ds.StudyInstanceUID
    sda.anonymize_dataset(ds)  # the package with its defaults
    # Nested elements outside the table survive; dates become 00010101, not shifted.
    assert ds.DetectorInformationSequence[0].OperatorsName == ident.operator
    assert ds.StudyDate == "00010101"
    # UIDs are random per process: a fresh mapping gives a different UID for the same input.
    first = ds.StudyInstanceUID
    sda.dictionary.clear()
    again, _ = _dataset()
    sda.anonymize_dataset(again)
    assert again.StudyInstanceUID != first and first != study_uid


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
@pytest.mark.parametrize("value, expected", [("20220304", True), ("2022", False)])
def test_unparseable_dates_are_removed(value: str, expected: bool) -> None:
    ds, _ = _dataset()
    # A new element, as read from another archive: the writer's elements keep the strict
    # validation they were built under (tasks/common/dicom_values.py) and refuse a bad value.
    del ds.ContentDate
    ds.ContentDate = value
    _deidentify(ds)
    assert ("ContentDate" in ds) is expected


def test_header_json_has_no_pixel_data() -> None:
    ds, _ = _dataset()
    _deidentify(ds)
    header = header_json(ds)
    assert "7FE00010" not in header
    assert header["00100020"]["Value"][0].startswith("P")
    assert np.isfinite(float(header["00101030"]["Value"][0]))


def test_header_cache_equals_the_reference_path(tmp_path) -> None:
    """The per-element cache used by the workers gives exactly the reference result."""
    from pydicom import dcmread
    from test_ingest_helpers import write_dicom

    from tasks.ingest.deid import HeaderCache

    def extras(ds: Dataset) -> None:
        # A date nested two sequences deep, in a sequence that differs between files
        # (FocalDistance) around one that does not: cached per patient at every level.
        ds.DetectorInformationSequence[0].ViewCodeSequence[0].add_new(0x00181200, "DA",
                                                                      "20220305")
        ds.DetectorInformationSequence[1].FocalDistance = [int(ds.Columns) + len(paths)]
        ds.DetectorInformationSequence[1].ReferencedSOPInstanceUID = ds.SOPInstanceUID
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.RadiopharmaceuticalStartDateTime = "20220304081500"
        item.OperatorsName = "Nested^Person"
        item.private_block(0x0033, "VENDOR Y", create=True).add_new(0x02, "LO", "secret")
        ds.add_new(0x60003000, "OW", b"\0" * 64)  # overlay data: a repeating-group rule
        ds.add_new(0x60000010, "US", 8)

    pseudo = Pseudonymizer(KEY)
    cache = HeaderCache(pseudo)
    paths = []
    for i, ts in enumerate(["explicit_le", "implicit_le", "rle", "explicit_le", "jpeg_ls"]):
        ident = make_identity(i % 2, 10 + i, "M", dt.date(1955, 1, 1 + i % 2), "internal",
                              dt.date(2022, 3, 4 + i))
        path = tmp_path / f"f{i}.dcm"
        write_dicom(path, views_for(i, 64, 32), ident, header_for("alpha", i, 32), ts, extras)
        paths.append((path, f"MRN{i % 2}"))
    for _ in range(2):  # the second pass is served from the cache
        for path, patient in paths:
            ds = dcmread(path)
            deid = Deidentifier(pseudo, pseudo.patient("alpha", patient),
                                pseudo.date_shift_days("alpha", patient))
            fast = cache.header(list(ds.elements()), deid)
            deid(ds)
            assert fast == header_json(ds)

"""De-identify a DICOM header: PS3.15 Basic Application Level Confidentiality Profile.

The tag table (which attribute is removed, emptied, replaced or gets a new UID) is
dicom-anonymizer's machine-readable copy of PS3.15 Annex E (``dicomfields_2026c``), applied
with its own action functions through ``anonymize_dataset``. What that package does not do,
or does differently from what a research dataset needs, is done here on top of it:

- Nested sequences: the package applies its table to the top level only (and walks only for
  repeating groups); here the same rules are applied to every item of every sequence it
  keeps, as PS3.15 requires.
- UIDs: the package draws random UIDs (a new mapping in every process and run); here every
  UID the table replaces becomes a keyed HMAC UID ("2.25.<int>"), the same in every worker
  and run, so images of one study still share a StudyInstanceUID.
- Dates: the package sets them to 00010101 (and "removing" a DA sets it too); here every date
  and date-time is shifted by the patient's keyed offset (Retain Longitudinal Temporal
  Information with Modified Dates option), and the birth date is really removed.
- PatientID becomes the keyed pseudonym; sex, age and weight are kept (Retain Patient
  Characteristics option); sequences the table would fill with dummy values are removed.
- Free text the table misses (any person name, comment, description, address, telephone,
  long text) and attributes unknown to the data dictionary are removed; private tags are
  removed everywhere (the package's ``delete_private_tags``).

Images whose BurnedInAnnotation is YES never get here: ingest quarantines them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from dicomanonymizer import simpledicomanonymizer as sda
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag

from tasks.ingest.pseudonym import Pseudonymizer

TABLE_VERSION = "dicomfields_2026c"
DEID_METHOD = (
    f"PS3.15 Basic Profile (dicom-anonymizer {TABLE_VERSION} tables); retain longitudinal "
    "temporal information with modified dates; retain patient characteristics (sex, age, "
    "weight); keyed pseudonyms and UIDs (synthdx ingest)"
)
# CID 7050 de-identification method codes: basic profile, modified dates, patient characteristics.
DEID_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)

PATIENT_ID = 0x00100020
PATIENT_BIRTH_DATE = 0x00100030
KEEP = frozenset({0x00100040, 0x00101010, 0x00101030})  # sex, age, weight
_TEXT_WORDS = ("Comment", "Description", "Address", "Telephone", "Email", "Name")
_SAFE_NAMES = frozenset({
    "CodingSchemeName", "EnergyWindowName", "CollimatorGridName", "CodeMeaning",
    "RadiopharmaceuticalCodeSequence", "ManufacturerModelName",
})
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})
_DATE_VRS = frozenset({"DA", "DT"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

Action = Callable[[Dataset, Any], None]


@lru_cache(maxsize=1)
def _table() -> tuple[dict[int, Action], dict[tuple[int, ...], Action]]:
    """The package's PS3.15 actions: by tag number, and the repeating-group masks."""
    single: dict[int, Action] = {}
    groups: dict[tuple[int, ...], Action] = {}
    for tag, action in sda.initialize_actions(TABLE_VERSION).items():
        if len(tag) == 2:
            single[(tag[0] << 16) | tag[1]] = action
        else:
            groups[tag] = action
    return single, groups


@lru_cache(maxsize=4096)
def _is_free_text(tag: int, vr: str) -> bool:
    """Free text or names the table does not list, and attributes the dictionary lacks."""
    keyword = keyword_for_tag(tag)
    if not keyword:
        return True
    if vr == "PN" or vr in _FREE_TEXT_VRS:
        return True
    return keyword not in _SAFE_NAMES and any(w in keyword for w in _TEXT_WORDS)


def _remove(dataset: Dataset, tag: Any) -> None:
    """Really delete (the package's delete sets dates to 00010101 instead)."""
    if tag in dataset:
        del dataset[tag]


def _shift_date(value: str, days: int) -> str | None:
    text = value.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        return (day + dt.timedelta(days=days)).strftime("%Y%m%d") + text[8:]
    except (ValueError, OverflowError):
        return None


def _date_shifter(days: int) -> Action:
    def shift(dataset: Dataset, tag: Any) -> None:
        element = dataset.get(tag)
        if element is None or element.value in (None, ""):
            return
        values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
        shifted = [_shift_date(str(v), days) for v in values]
        if any(s is None for s in shifted):
            del dataset[tag]  # an unparseable date cannot be shifted safely
        else:
            element.value = shifted if len(shifted) > 1 else shifted[0]

    return shift


def _uid_replacer(pseudo: Pseudonymizer) -> Action:
    def replace(dataset: Dataset, tag: Any) -> None:
        element = dataset.get(tag)
        if element is None or element.value in (None, ""):
            return
        if isinstance(element.value, MultiValue):
            element.value = [pseudo.uid(v) for v in element.value]
        else:
            element.value = pseudo.uid(element.value)

    return replace


_UID_ACTIONS = {sda.replace_UID, sda.delete_or_empty_or_replace_UID, sda.replace,
                sda.empty_or_replace, sda.delete_or_replace, sda.delete_or_empty_or_replace}


class Deidentifier:
    """Apply the profile to datasets of one patient (pseudonym and date shift fixed)."""

    def __init__(self, pseudo: Pseudonymizer, pseudo_id: str, shift_days: int) -> None:
        self._uid = _uid_replacer(pseudo)
        self._shift = _date_shifter(shift_days)
        self._pid = sda.replace_with_value([pseudo_id])

    def _action(self, tag: int, vr: str, table: dict[int, Action]) -> Action | None:
        """The action for one element, or None to leave it (and recurse if a sequence)."""
        if tag == PATIENT_ID:
            return self._pid
        if tag == PATIENT_BIRTH_DATE:
            return _remove
        if tag in KEEP:
            return sda.keep
        if vr in _DATE_VRS:
            return self._shift
        action = table.get(tag)
        if action is not None:
            if vr == "UI" and action in _UID_ACTIONS:
                return self._uid
            if vr == "SQ" and action not in (sda.delete, sda.keep):
                return _remove  # no dummy items: nothing in them is needed
            return action
        if BaseTag(tag).is_private:
            return None  # removed by delete_private_tags
        if vr != "SQ" and _is_free_text(tag, vr):
            return _remove
        return None

    def _level(self, dataset: Dataset, top: bool) -> None:
        """Apply the rules to one dataset level, then to the items of the kept sequences."""
        single, groups = _table()
        rules: dict[tuple[int, ...], Action] = {}
        for tag in list(dataset.keys()):
            element = dataset[tag]
            action = self._action(int(tag), element.VR, single)
            if action is not None:
                rules[(tag >> 16, tag & 0xFFFF)] = action
            group = tag >> 16
            if 0x5000 <= group <= 0x60FF:
                rules.update({k: a for k, a in groups.items()
                              if group & k[2] == k[0] & k[2]})
        if top and hasattr(dataset, "file_meta"):
            for tag in list(dataset.file_meta.keys()):
                action = single.get(int(tag))
                if action is not None:
                    uid = dataset.file_meta[tag].VR == "UI" and action in _UID_ACTIONS
                    rules[(tag >> 16, tag & 0xFFFF)] = self._uid if uid else action
        # The package's own driver with this level's rules only: actions on absent tags are
        # no-ops, so handing it just the present ones gives the same result, much faster.
        sda.anonymize_dataset(dataset, rules, delete_private_tags=True, base_rules_gen=dict)
        for element in list(dataset.values()):
            if getattr(element, "VR", None) == "SQ" and element.value:
                for item in element.value:
                    self._level(item, top=False)

    def __call__(self, dataset: Dataset) -> None:
        """De-identify ``dataset`` in place and record how it was done in the header."""
        self._level(dataset, top=True)
        dataset.PatientIdentityRemoved = "YES"
        dataset.LongitudinalTemporalInformationModified = "MODIFIED"
        dataset.DeidentificationMethod = DEID_METHOD[:64]
        items = []
        for value, meaning in DEID_CODES:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        dataset.DeidentificationMethodCodeSequence = Sequence(items)


def header_json(dataset: Dataset, bulk_threshold: int = 1024) -> dict[str, Any]:
    """The dataset as DICOM JSON without pixel data or other bulk binary values.

    Why: headers.jsonl documents every image's acquisition for later audits; pixel data lives
    in images.npy, and large binary blobs would only bloat the file.
    """
    for element in list(dataset.values()):
        if element.VR in _BINARY_VRS and element.value is not None and (
            element.tag == 0x7FE00010 or len(element.value) > bulk_threshold
        ):
            del dataset[element.tag]
    return dataset.to_json_dict()

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

:class:`Deidentifier` applies all of this to a pydicom Dataset. The ingest workers use
:class:`HeaderCache`, which applies the same Deidentifier element by element and remembers
results across the files of a site (a header costs more to de-identify than an uncompressed
image costs to decode); tests check both give identical JSON.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from dicomanonymizer import simpledicomanonymizer as sda
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from tasks.ingest.pseudonym import Pseudonymizer

TABLE_VERSION = "dicomfields_2026c"
DEID_METHOD = (  # LO, 64 characters per value, several values
    f"PS3.15 Basic Profile, dicom-anonymizer {TABLE_VERSION} tables",
    "dates shifted per patient; sex, age and weight retained",
    "keyed HMAC pseudonyms and UIDs (synthdx ingest)",
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
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double, pixel data

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


@lru_cache(maxsize=4096)
def _dictionary_vr(tag: int) -> str:
    """VR of an implicit-VR element (unknown tags count as UN and are removed)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


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
        self._pseudo = pseudo
        self._uid = _uid_replacer(pseudo)
        self._shift_date = _date_shifter(shift_days)
        self._set_pid = sda.replace_with_value([pseudo_id])
        self.pseudo_id = pseudo_id
        self.shift_days = shift_days
        self.patient_key = (pseudo_id, shift_days)
        # Bound once, so callers can recognise the actions by identity.
        self.shift_action: Action = self._shift
        self.pid_action: Action = self._pid
        self.uid_action: Action = self._uid
        # Set when a patient-specific action (pseudonym, date shift) ran: a result computed
        # without one is the same for every patient, which HeaderCache relies on.
        self.used_patient = False

    def _pid(self, dataset: Dataset, tag: Any) -> None:
        self.used_patient = True
        self._set_pid(dataset, tag)

    def _shift(self, dataset: Dataset, tag: Any) -> None:
        self.used_patient = True
        self._shift_date(dataset, tag)

    def action(self, tag: int, vr: str) -> Action | None:
        """The action for one (non-private) element, or None to leave it as it is."""
        return self._action(tag, vr, _table()[0])

    def _action(self, tag: int, vr: str, table: dict[int, Action]) -> Action | None:
        if tag == PATIENT_ID:
            return self.pid_action
        if tag == PATIENT_BIRTH_DATE:
            return _remove
        if tag in KEEP:
            return sda.keep
        if vr in _DATE_VRS:
            return self.shift_action
        action = table.get(tag)
        if action is not None:
            if vr == "UI" and action in _UID_ACTIONS:
                return self._uid
            if vr == "SQ" and action not in (sda.delete, sda.keep):
                return _remove  # no dummy items: nothing in them is needed
            return action
        if vr != "SQ" and _is_free_text(tag, vr):
            return _remove
        return None

    def _level(self, dataset: Dataset, top: bool) -> None:
        """Apply the rules to one dataset level, then to the items of the kept sequences.

        Elements are inspected unconverted (tag and VR only): deleting needs no value, so
        only the few elements that are changed or kept get parsed. That keeps the per-file
        cost of de-identification well below the cost of reading the file.
        """
        single, groups = _table()
        rules: dict[tuple[int, ...], Action] = {}
        doomed: list[int] = []
        sequences: list[int] = []
        for element in dataset.elements():
            tag = int(element.tag)  # plain ints: BaseTag comparisons are slow Python code
            group = tag >> 16
            if group & 1:
                doomed.append(tag)  # the package's delete_private_tags, without parsing
                continue
            vr = element.VR or _dictionary_vr(tag)
            action = self._action(tag, vr, single)
            if action is _remove or action is sda.delete:
                doomed.append(tag)  # same effect as the package's delete for a non-date
            elif action is None:
                if vr == "SQ":
                    sequences.append(tag)
            elif action is not sda.keep:
                rules[(group, tag & 0xFFFF)] = action
            if 0x5000 <= group <= 0x60FF:
                rules.update({k: a for k, a in groups.items() if group & k[2] == k[0] & k[2]})
        for tag in doomed:
            del dataset[tag]
        if top and hasattr(dataset, "file_meta"):
            for element in dataset.file_meta.elements():
                action = single.get(int(element.tag))
                if action is not None:
                    uid = element.VR == "UI" and action in _UID_ACTIONS
                    rules[(element.tag.group, element.tag.element)] = self._uid if uid else action
        # The package's own driver with this level's rules: actions on absent tags are no-ops,
        # so handing it only the present ones gives the same result without ~700 look-ups.
        if rules:
            sda.anonymize_dataset(dataset, rules, delete_private_tags=False, base_rules_gen=dict)
        for tag in sequences:
            for item in dataset[tag].value or []:
                self._level(item, top=False)

    def __call__(self, dataset: Dataset) -> None:
        """De-identify ``dataset`` in place and record how it was done in the header."""
        self._level(dataset, top=True)
        _mark(dataset)


def _mark(dataset: Dataset) -> None:
    """Record in the header that, and how, it was de-identified (PS3.15 E.1.1)."""
    dataset.PatientIdentityRemoved = "YES"
    dataset.LongitudinalTemporalInformationModified = "MODIFIED"
    dataset.DeidentificationMethod = list(DEID_METHOD)
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
        if element.tag in _PIXEL_TAGS or (
            element.VR in _BINARY_VRS and element.value is not None
            and len(element.value) > bulk_threshold
        ):
            del dataset[element.tag]
    return dataset.to_json_dict()


Element = DataElement | RawDataElement
# The package's actions whose result does not depend on the value (empty, dummy value).
_VALUE_FREE = {sda.empty, sda.replace, sda.empty_or_replace, sda.delete_or_empty,
               sda.delete_or_replace, sda.delete_or_empty_or_replace,
               sda.delete_or_empty_or_replace_UID}


# How HeaderCache handles an element (see HeaderCache._kind).
_DROP, _KEEP, _SEQUENCE, _UID, _SHIFT, _PID, _FREE, _OTHER, _GENERAL = range(9)
_MISSING = object()


class HeaderCache:
    """De-identified DICOM JSON of a header, element by element, remembering results.

    Why: converting and de-identifying a header costs more than decoding an uncompressed
    image, yet most of a site's elements are byte-identical in every file (device, protocol,
    detector and energy-window sequences) and most table actions give the same result for
    any value (empty, dummy). Each element's result is computed once with the
    :class:`Deidentifier` above (on a one-element dataset) and remembered, as JSON text,
    under what it depends on: its raw bytes, or only tag and VR for value-free actions; a
    result that used the patient's pseudonym or date shift is remembered for that patient
    only. New UIDs, shifted dates and the pseudonym are written directly. The output equals
    ``header_json`` after ``Deidentifier`` (tests check this). One cache per worker process;
    it never leaves the process.
    """

    def __init__(self, pseudo: Pseudonymizer, max_entries: int = 100_000) -> None:
        self._pseudo = pseudo
        self._cache: dict[tuple[Any, ...], str | None] = {}
        self._max_entries = max_entries
        self._marks: list[tuple[int, str]] | None = None
        self._kinds: dict[tuple[int, str], tuple[int, Action | None]] = {}

    def _marks_text(self) -> list[tuple[int, str]]:
        if self._marks is None:
            ds = Dataset()
            _mark(ds)
            self._marks = [(int(tag, 16), json.dumps(value, separators=(",", ":")))
                           for tag, value in ds.to_json_dict().items()]
        return self._marks

    @staticmethod
    def _text(element: DataElement, bulk_threshold: int) -> str | None:
        if (element.VR in _BINARY_VRS and element.value is not None
                and len(element.value) > bulk_threshold):
            return None
        return json.dumps(element.to_json_dict(None, bulk_threshold), separators=(",", ":"))

    def _via_dataset(self, element: Element, tag: int, charset: Any, deid: Deidentifier,
                     bulk_threshold: int) -> str | None:
        """The general path: the Deidentifier on a dataset holding just this element."""
        mini = Dataset()
        if charset is not None:
            mini.SpecificCharacterSet = charset
        mini[tag] = element
        deid._level(mini, top=False)
        return self._text(mini[tag], bulk_threshold) if tag in mini else None

    def _remember(self, key: tuple[Any, ...], text: str | None) -> None:
        if len(self._cache) > self._max_entries:
            self._cache.clear()
        self._cache[key] = text

    @staticmethod
    def _strings(element: RawDataElement) -> list[str]:
        """Values of an ASCII string element (UI, DA, DT) as pydicom reads them."""
        text = (element.value or b"").decode("ascii", "replace")
        return [v.strip(" \0") for v in text.split("\\")]

    def _direct(self, element: RawDataElement, vr: str, kind: int,
                deid: Deidentifier) -> str | None:
        """New UIDs, shifted dates and the pseudonym, without building any dataset."""
        if kind == _UID:
            values = [self._pseudo.uid(v) if v else v for v in self._strings(element)]
        elif kind == _SHIFT:
            deid.used_patient = True
            values = self._strings(element)
            if any(values):
                shifted = [_shift_date(v, deid.shift_days) for v in values]
                if any(v is None for v in shifted):
                    return None  # an unparseable date is removed
                values = [v for v in shifted if v is not None]
        else:  # _PID
            deid.used_patient = True
            values = [deid.pseudo_id]
        body = {"vr": vr, "Value": values} if any(values) else {"vr": vr}
        return json.dumps(body, separators=(",", ":"))

    def _lookup_or(self, key: tuple[Any, ...], deid: Deidentifier,
                   compute: Callable[[], str | None]) -> str | None:
        """Cached text for ``key`` (for anyone, or for this patient), else ``compute()``.

        ``deid.used_patient`` is raised whenever the text is patient-specific, so that an
        enclosing sequence is remembered for this patient only, too.
        """
        if key in self._cache:
            return self._cache[key]
        patient_key = key + deid.patient_key
        if patient_key in self._cache:
            deid.used_patient = True
            return self._cache[patient_key]
        outer = deid.used_patient
        deid.used_patient = False
        text = compute()
        specific = deid.used_patient
        deid.used_patient = outer or specific
        self._remember(patient_key if specific else key, text)
        return text

    def _kind(self, tag: int, vr: str, deid: Deidentifier) -> tuple[int, Action | None]:
        """How an element is handled; the same for every patient, so worked out once."""
        found = self._kinds.get((tag, vr))
        if found is not None:
            return found
        action = None if tag in _PIXEL_TAGS or (tag >> 16) & 1 else deid.action(tag, vr)
        if tag in _PIXEL_TAGS or (tag >> 16) & 1 or action is _remove or action is sda.delete:
            found = (_DROP, None)  # pixel data (in images.npy), private tags, removed ones
        elif " or " in vr or 0x5000 <= tag >> 16 <= 0x60FF:
            found = (_GENERAL, None)
        elif action is deid.uid_action:
            found = (_UID, None)
        elif action is deid.shift_action:
            found = (_SHIFT, None)
        elif action is deid.pid_action:
            found = (_PID if vr in ("LO", "SH") else _GENERAL, None)
        elif action is None or action is sda.keep:
            found = (_SEQUENCE if vr == "SQ" else _KEEP, None)
        elif action in _VALUE_FREE and vr not in ("UI", "SQ"):
            found = (_FREE, action)
        else:
            found = (_OTHER, action)
        self._kinds[(tag, vr)] = found
        return found

    def _fragment(self, element: Element, tag: int, vr: str, kind: int,
                  action: Action | None, charset: Any, charset_id: Any, deid: Deidentifier,
                  bulk_threshold: int) -> str | None:
        """JSON text of one de-identified element, or None when it is removed."""
        if not isinstance(element, RawDataElement):  # parsed while reading (or checking)
            if kind == _KEEP:
                return self._text(element, bulk_threshold)
            return self._via_dataset(element, tag, charset, deid, bulk_threshold)
        if kind == _KEEP:  # kept as it is: the value converted, nothing else
            key: tuple[Any, ...] = (tag, vr, element.value, element.is_little_endian,
                                    element.is_implicit_VR, charset_id)
            text = self._cache.get(key, _MISSING)
            if text is _MISSING:
                converted = convert_raw_data_element(element, encoding=charset)
                text = self._text(converted, bulk_threshold)
                self._remember(key, text)
            return text  # type: ignore[return-value]
        if kind in (_UID, _SHIFT, _PID):
            return self._direct(element, vr, kind, deid)
        flags = (element.is_little_endian, element.is_implicit_VR)
        if kind == _SEQUENCE:
            return self._lookup_or(
                ("sequence", tag, element.value, flags, charset_id), deid,
                lambda: self._sequence(element, charset, deid, bulk_threshold))
        if kind == _FREE:
            key = ("free", tag, vr, action, flags)
        elif kind == _OTHER:
            key = ("other", tag, vr, element.value, flags, charset_id)
        else:
            return self._via_dataset(element, tag, charset, deid, bulk_threshold)
        return self._lookup_or(key, deid, lambda: self._via_dataset(
            element, tag, charset, deid, bulk_threshold))

    def _sequence(self, element: RawDataElement, charset: Any, deid: Deidentifier,
                  bulk_threshold: int) -> str:
        """A kept sequence: its items' elements go through the same per-element cache."""
        parsed = convert_raw_data_element(element, encoding=charset)
        items = []
        for item in parsed.value or []:
            elements = list(item.elements())
            parts = self._parts(elements, self._charset(elements) or charset, deid,
                                bulk_threshold)
            items.append(_join(parts))
        return '{"vr":"SQ","Value":[' + ",".join(items) + "]}"

    def _parts(self, elements: list[Element], charset: Any, deid: Deidentifier,
               bulk_threshold: int) -> list[tuple[int, str]]:
        """(tag, JSON text) of the elements of one dataset level that stay."""
        parts: list[tuple[int, str]] = []
        charset_id = charset_key(charset)
        for element in elements:
            tag = int(element.tag)
            vr = element.VR or _dictionary_vr(tag)
            kind, action = self._kind(tag, vr, deid)
            if kind == _DROP:
                continue
            text = self._fragment(element, tag, vr, kind, action, charset, charset_id, deid,
                                  bulk_threshold)
            if text is not None:
                parts.append((tag, text))
        return parts

    def _charset(self, elements: list[Element]) -> Any:
        element = next((e for e in elements if e.tag == 0x00080005), None)
        if element is None:
            return None
        key = ("charset", element.value if isinstance(element, RawDataElement)
               else charset_key(element.value))
        if key not in self._cache:
            mini = Dataset()
            mini[0x00080005] = element
            self._cache[key] = mini.SpecificCharacterSet
        return self._cache[key]

    def header_text(self, elements: list[Element], deid: Deidentifier,
                    bulk_threshold: int = 1024) -> str:
        """De-identified DICOM JSON (one line) of a header given as its top-level elements."""
        parts = self._parts(elements, self._charset(elements), deid, bulk_threshold)
        return _join(sorted(parts + self._marks_text()))

    def header(self, elements: list[Element], deid: Deidentifier,
               bulk_threshold: int = 1024) -> dict[str, Any]:
        """:meth:`header_text`, parsed."""
        return json.loads(self.header_text(elements, deid, bulk_threshold))


def _join(parts: list[tuple[int, str]]) -> str:
    """A DICOM JSON object from (tag, value text) pairs."""
    return "{" + ",".join(f'"{tag:08X}":{text}' for tag, text in parts) + "}"


def charset_key(charset: Any) -> Any:
    """A hashable form of a SpecificCharacterSet value."""
    return tuple(charset) if isinstance(charset, MultiValue | list) else charset

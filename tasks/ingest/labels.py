"""Read and validate the labels CSV.

Labels CSV format (one row per study; UTF-8, comma-separated, a header row; column names are
case-insensitive):

Required columns
    ``study_uid``       the DICOM StudyInstanceUID of the study: the join key to the images.
    ``patient_id``      the hospital patient ID. Identity: used only to group a patient's
                        studies (so no patient is in two splits) and to derive the keyed
                        pseudonym; never copied to any output.
    ``site``            the site (hospital) name: letters, digits, ``_`` and ``-``.
    ``perugini_grade``  cardiac uptake grade, integer 0-3 (grade >= 2 is "amyloid").
    ``metastasis``      bone metastases, 0 or 1.

Optional columns (kept when present; an empty cell means unknown)
    ``sex`` (M, F or O), ``age`` (years, 0-130), ``superscan`` (0/1), ``lesion_count``
    (integer >= 0), ``degenerative`` (0/1), ``injection_site`` (0/1, tracer at the injection
    site), ``urine_contamination`` (0/1), ``fracture`` (0/1), ``tracer`` (e.g. DPD, HMDP, MDP),
    ``bmi`` (kg/m², 10-80). Booleans also accept true/false and yes/no.

Other columns are ignored and listed in the ingest report. A file that is missing, is not a
CSV or lacks a required column stops ingest with an error naming the file and column; a row
with an invalid value quarantines its study's images with a reason naming column and value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.ingest.errors import IngestError

REQUIRED_COLUMNS = ("study_uid", "patient_id", "site", "perugini_grade", "metastasis")
SITE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_TRACER_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+()-]{0,63}$")
KNOWN_TRACERS = ("HMDP", "HDP", "DPD", "MDP", "PYP")

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


class LabelValueError(ValueError):
    """A label cell that cannot be used; the message is the quarantine reason."""


def _show(raw: str) -> str:
    """A cell value for a message: bare when simple (5, yes), quoted otherwise ('', 'a b')."""
    return raw if re.fullmatch(r"[\w.+-]+", raw) else repr(raw)


def _integer(column: str, raw: str, low: int, high: int | None, rule: str) -> int:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < low or (
        high is not None and value > high
    ):
        raise LabelValueError(f"invalid label {column}={_show(raw)} ({rule})")
    return int(value)


def _number(column: str, raw: str, low: float, high: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not low <= value <= high:
        raise LabelValueError(
            f"invalid label {column}={_show(raw)} (must be a number {low:g}-{high:g})")
    return value


def _boolean(column: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE or text in {"1.0"}:
        return True
    if text in _FALSE or text in {"0.0"}:
        return False
    raise LabelValueError(f"invalid label {column}={_show(raw)} (must be 0 or 1)")


def normalise_tracer(raw: str) -> str:
    """Map a tracer description ("Tc99m HMDP", "99mTc-DPD") to its short name (HMDP, DPD).

    Unknown tracers are returned upper-cased, so sites stay comparable.
    """
    text = raw.strip().upper()
    for name in KNOWN_TRACERS:
        if re.search(rf"(^|[^A-Z]){name}($|[^A-Z])", text):
            return name
    return text


def _tracer(column: str, raw: str) -> str:
    if not _TRACER_PATTERN.match(raw.strip()):
        raise LabelValueError(
            f"invalid label {column}={_show(raw)} (must be a tracer name like DPD)")
    return normalise_tracer(raw)


def _sex(column: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in {"M", "F", "O"}:
        raise LabelValueError(f"invalid label {column}={_show(raw)} (must be M, F or O)")
    return value


OPTIONAL_COLUMNS: dict[str, Callable[[str, str], Any]] = {
    "sex": _sex,
    "age": lambda c, r: _number(c, r, 0, 130),
    "superscan": _boolean,
    "lesion_count": lambda c, r: _integer(c, r, 0, None, "must be an integer >= 0"),
    "degenerative": _boolean,
    "injection_site": _boolean,
    "urine_contamination": _boolean,
    "fracture": _boolean,
    "tracer": _tracer,
    "bmi": lambda c, r: _number(c, r, 10, 80),
}


@dataclass(frozen=True)
class LabelRow:
    """One validated labels row. ``patient_id`` is identity and stays inside ingest."""

    study_uid: str
    patient_id: str = field(repr=False)
    site: str
    perugini_grade: int
    metastasis: bool
    extras: dict[str, Any]


@dataclass
class LabelTable:
    """The labels file, validated: usable rows and per-study problems, both by study UID."""

    path: Path
    rows: dict[str, LabelRow]
    problems: dict[str, str]
    optional_columns: list[str]
    unknown_columns: list[str]
    n_rows: int
    rows_without_study_uid: int = 0


def _parse_row(cells: dict[str, str], optional: list[str]) -> LabelRow:
    """Validate one row; raise LabelValueError with the first problem, in column order."""
    site = cells["site"].strip()
    if not SITE_PATTERN.match(site):
        raise LabelValueError(
            f"invalid label site={_show(site)} (letters, digits, '_' and '-' only)"
        )
    patient_id = cells["patient_id"].strip()
    if not patient_id:
        raise LabelValueError("label patient_id is empty")
    grade = _integer("perugini_grade", cells["perugini_grade"].strip(), 0, 3, "must be 0-3")
    metastasis = _boolean("metastasis", cells["metastasis"])
    extras: dict[str, Any] = {}
    for column in optional:
        raw = cells[column].strip()
        extras[column] = None if raw == "" else OPTIONAL_COLUMNS[column](column, raw)
    return LabelRow(
        study_uid=cells["study_uid"].strip(),
        patient_id=patient_id,
        site=site,
        perugini_grade=grade,
        metastasis=metastasis,
        extras=extras,
    )


def row_content(row: LabelRow) -> tuple[Any, ...]:
    """Everything a row says, as a comparable value (holds the patient ID: memory only).

    Why: repeated identical rows count once, and incremental ingest reuses a study's cached
    results only while its row says the same (it stores a keyed digest of this, never this).
    """
    return (row.patient_id, row.site, row.perugini_grade, row.metastasis,
            tuple(sorted(row.extras.items())))


_row_key = row_content


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise IngestError(f"labels file {path} does not exist (ingest.labels / --labels)")
    try:
        frame = pd.read_csv(
            path, dtype=str, keep_default_na=False, skipinitialspace=True,
            encoding="utf-8-sig", on_bad_lines="error",
        )
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError,
            ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise IngestError(f"labels file {path} is not a readable CSV file: {first}") from None
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if len(set(frame.columns)) != len(frame.columns):
        raise IngestError(f"labels file {path} has duplicate column names: {list(frame.columns)}")
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise IngestError(
            f"labels file {path} has no column {missing[0]!r} (required: "
            f"{', '.join(REQUIRED_COLUMNS)}; found: {', '.join(frame.columns) or 'none'})"
        )
    return frame


def load_labels(path: Path) -> LabelTable:
    """Read the labels CSV and validate every row (format: see the module docstring).

    Raises:
        IngestError: the file is missing, not a CSV, or lacks a required column.
    """
    path = Path(path)
    frame = _read_csv(path)
    optional = [c for c in OPTIONAL_COLUMNS if c in frame.columns]
    unknown = [c for c in frame.columns if c not in REQUIRED_COLUMNS and c not in OPTIONAL_COLUMNS]
    parsed: dict[str, list[LabelRow | str]] = {}
    no_uid = 0
    names = [*REQUIRED_COLUMNS, *optional]
    columns = [frame[c].tolist() for c in names]  # plain lists: to_dict() boxes every cell
    for values in zip(*columns, strict=True):
        cells = dict(zip(names, values, strict=True))
        uid = cells["study_uid"].strip()
        if not uid:
            no_uid += 1
            continue
        try:
            parsed.setdefault(uid, []).append(_parse_row(cells, optional))
        except LabelValueError as exc:
            parsed.setdefault(uid, []).append(str(exc))
    rows: dict[str, LabelRow] = {}
    problems: dict[str, str] = {}
    for uid, entries in parsed.items():
        reasons = [e for e in entries if isinstance(e, str)]
        distinct = {_row_key(e): e for e in entries if isinstance(e, LabelRow)}
        if reasons:
            problems[uid] = reasons[0]
        elif len(distinct) > 1:
            problems[uid] = f"the labels file has {len(distinct)} different rows for this study"
        else:
            rows[uid] = next(iter(distinct.values()))
    return LabelTable(
        path=path, rows=rows, problems=problems, optional_columns=optional,
        unknown_columns=unknown, n_rows=len(frame), rows_without_study_uid=no_uid,
    )


def study_in_archive(archive: Path, labels: LabelTable, labels_path: Path | None = None) -> bool:
    """Whether any file of ``archive`` is a study the labels name (read until the first one).

    Only the header up to StudyInstanceUID is read, so a matching archive answers after a
    few files; a labels file for another archive reads every header once.
    """
    from pydicom import dcmread

    wanted = set(labels.rows) | set(labels.problems)
    skip = Path(labels_path).resolve() if labels_path is not None else None
    for path in sorted(Path(archive).rglob("*")):
        if not path.is_file() or (skip is not None and path.resolve() == skip):
            continue
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        except Exception:  # not DICOM, unreadable: not a study
            continue
        if uid in wanted:
            return True
    return False

"""The per-file work of ingest: read, validate, de-identify and normalise one DICOM file.

Everything here runs in worker processes, once per file, so it is one plain function
(:func:`process_file`) with its shared, read-only inputs installed once per process
(:func:`install_context`). Every failure becomes a :class:`FileResult` with a reason a user
understands; nothing raised here may stop the run.

Reasons and results carry no identity: the reason texts name attributes and safe values
(modality, frame count, label column and value), never names, IDs or dates, and the result
holds only the pseudonymous record, the de-identified header and the processed image.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import config, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from tasks.ingest.deid import Deidentifier, HeaderCache
from tasks.ingest.labels import LabelRow, LabelTable, normalise_tracer
from tasks.ingest.pixels import normalise
from tasks.ingest.pseudonym import Pseudonymizer, PseudonymKey
from tasks.ingest.views import ViewError, identify_views

# The fastest installed decoder for each compressed syntax on this platform (measured in
# benchmarks/bench_ingest.py); any other syntax, or a failure, uses pydicom's own order.
PREFERRED_DECODERS: dict[UID, str] = {
    JPEG2000Lossless: "gdcm",
    JPEG2000: "gdcm",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    RLELossless: "pylibjpeg",
}
# When every core runs its own worker, a decoder that spreads one image over several threads
# only oversubscribes the cores (gdcm's JPEG 2000 uses ~1.6 cores per image here); the
# single-threaded openjpeg decoder then gives more images per second in total.
PREFERRED_DECODERS_ONE_PER_CORE: dict[UID, str] = {
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}
_decoders: dict[UID, str] = dict(PREFERRED_DECODERS)
MIN_ROWS, MIN_COLS = 32, 16
_PIXEL_DATA = 0x7FE00010


class Quarantine(Exception):
    """Reject the file; the message is the reason written to the report."""


@dataclass(frozen=True)
class WorkerSettings:
    """What the per-file work needs from the configuration."""

    rows: int
    cols: int
    percentile: float


@dataclass
class WorkerContext:
    """Read-only inputs shared by every file of a run (installed once per process)."""

    source: Path
    labels: LabelTable
    key: PseudonymKey
    settings: WorkerSettings
    pseudonymizer: Pseudonymizer = field(init=False, repr=False)
    headers: HeaderCache = field(init=False, repr=False)
    memo: dict[tuple[Any, ...], Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pseudonymizer = Pseudonymizer(self.key)
        self.headers = HeaderCache(self.pseudonymizer)
        self.memo = {}


@dataclass
class FileResult:
    """What became of one input file: a reason, or the processed image with its record."""

    relpath: str
    reason: str | None = None
    image: np.ndarray | None = None
    record: dict[str, Any] | None = None
    header: str | None = None
    fingerprint: str | None = None
    transfer_syntax: str | None = None
    # The original StudyInstanceUID when it matched a labels row; kept in memory only, to
    # count labels rows without an image. Never written anywhere.
    label_uid: str | None = field(default=None, repr=False)
    patient_id_differs: bool = False
    # For a duplicate: the path of the file it repeats. Paths may hold identity, so this goes
    # to the quarantine's own reasons.json only (tasks/ingest/quarantine.py), never a report.
    duplicate_of: str | None = field(default=None, repr=False)
    # The ingest cache's entry holding this result (a keyed digest, no identity): where its
    # image is read from when a cached result comes without it (tasks/ingest/cache.py).
    cache_entry: str | None = None

    @property
    def ok(self) -> bool:
        """True when the file was ingested (no reason to quarantine it)."""
        return self.reason is None


_CONTEXT: WorkerContext | None = None
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' starting value in glibc


def install_context(context: WorkerContext) -> None:
    """Make ``context`` the inputs of :func:`process_file` in this process."""
    global _CONTEXT
    _CONTEXT = context


@contextmanager
def working_here(context: WorkerContext) -> Iterator[None]:
    """Let this process do a worker's job for a while, and put its settings back after.

    The inputs are installed, pydicom's value validation on reading is off and glibc keeps
    freed buffers (as in :func:`init_worker`: a quarter of a night's in-process work was page
    faults on fresh buffers); afterwards glibc's default thresholds are set again and the
    kept memory returned. The decoder choice of a dedicated worker is not made (decoders
    give the same pixels either way).
    """
    global _CONTEXT
    saved = _CONTEXT, config.settings.reading_validation_mode
    _CONTEXT, config.settings.reading_validation_mode = context, config.IGNORE
    libc = _tune_allocator(64 << 20, 256 << 20)
    try:
        yield
    finally:
        _CONTEXT, config.settings.reading_validation_mode = saved
        if libc is not None:
            _tune_allocator(_GLIBC_DEFAULT_THRESHOLD, _GLIBC_DEFAULT_THRESHOLD)
            libc.malloc_trim(0)


def _tune_allocator(mmap_threshold: int, trim_threshold: int) -> ctypes.CDLL | None:
    """Set glibc's mmap and trim thresholds; None (nothing changed) when libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        return None
    return libc


def init_worker(context: WorkerContext, one_per_core: bool = False) -> None:
    """Pool initializer: install the inputs and tune this worker process for the job.

    Two process-wide settings that only a dedicated worker may change: pydicom's value
    validation on reading is off (it only ever warns, and the warnings would repeat for every
    file of a site), and glibc keeps freed buffers instead of returning them to the kernel
    after each file (each image needs several 0.5-2 MB buffers; fresh pages cost more page
    faults than the pixel work itself).
    """
    config.settings.reading_validation_mode = config.IGNORE
    if one_per_core:
        _decoders.update(PREFERRED_DECODERS_ONE_PER_CORE)
    _tune_allocator(64 << 20, 256 << 20)
    install_context(context)


def _clean(message: object, path: Path, limit: int = 200) -> str:
    """One line of an exception message, without the file's path, at most ``limit`` chars.

    Every folder name of the path goes too, not just the whole path and the file name: an
    archive exported one folder per patient names the patient in its folders.
    """
    text = str(message).replace(str(path), "<file>")
    # Longest first, so a name is not cut by a shorter one inside it; a short part could
    # match ordinary words of the message.
    for part in sorted({p for p in path.parts if len(p) >= 6}, key=len, reverse=True):
        text = text.replace(part, "<file>")
    text = " ".join(text.split()) or type(message).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read(path: Path) -> tuple[Dataset, list[str]]:
    """Read the whole file; return it with the warnings pydicom gave while reading."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = dcmread(path)
        except InvalidDicomError:
            raise Quarantine("not a DICOM file") from None
        except Exception as exc:  # pydicom raises many types on bad bytes
            raise Quarantine(f"file is truncated or corrupt: {_clean(exc, path)}") from None
    return ds, [str(w.message) for w in caught]


def _check_complete(ds: Dataset, original: list[Any], read_warnings: list[str],
                    path: Path) -> None:
    """Reject a truncated file: pydicom reads what is there and at most warns."""
    for text in read_warnings:
        if "End of file" in text or "truncated" in text.lower():
            raise Quarantine(f"file is truncated or corrupt: {_clean(text, path)}")
    for element in original:  # defined-length values cut short by the end of the file
        if (isinstance(element, RawDataElement) and element.value is not None
                and element.length != 0xFFFFFFFF and len(element.value) < element.length):
            what = "pixel data" if element.tag == _PIXEL_DATA else f"element {element.tag}"
            raise Quarantine(
                f"file is truncated or corrupt: {what} holds {len(element.value)} of "
                f"{element.length} bytes"
            )
    if not ds.file_meta.get("TransferSyntaxUID"):
        raise Quarantine(
            "file is truncated or corrupt: the file meta information has no transfer syntax"
        )


def _check_header(ds: Dataset) -> int:
    """Cheap header checks before any decoding; returns the number of frames."""
    modality = str(ds.get("Modality", "") or "").strip()
    if modality != "NM":
        raise Quarantine(f"modality is {modality}, expected NM" if modality
                         else "no modality in the header, expected NM")
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise Quarantine(
            "burned-in annotation (BurnedInAnnotation=YES): the pixels may show identity"
        )
    if _PIXEL_DATA not in ds:
        raise Quarantine("no pixel data")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise Quarantine("NumberOfFrames is not a number") from None
    if frames != 2:
        raise Quarantine(f"expected 2 frames (anterior and posterior), found {frames}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < MIN_ROWS or cols < MIN_COLS:
        raise Quarantine(f"image is {rows}x{cols} pixels, too small for a whole-body view "
                         f"(minimum {MIN_ROWS}x{MIN_COLS})")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise Quarantine("expected grey-scale counts, found colour pixels")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric != "MONOCHROME2":
        raise Quarantine(f"photometric interpretation {photometric} is not supported "
                         "(NM counts are MONOCHROME2)")
    return frames


def _label(ds: Dataset, labels: LabelTable, result: FileResult) -> LabelRow:
    uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not uid:
        raise Quarantine("no StudyInstanceUID in the header, so no labels can be joined")
    problem = labels.problems.get(uid)
    if problem is not None:
        raise Quarantine(problem)
    row = labels.rows.get(uid)
    if row is None:
        raise Quarantine("no row in the labels file for this study")
    header_id = str(ds.get("PatientID", "") or "").strip()
    # Reported, not rejected: labels often carry reformatted IDs (leading zeros lost in a
    # spreadsheet), and the labels file is the authority for grouping.
    result.patient_id_differs = bool(header_id) and header_id != row.patient_id
    return row


_VIEW_TAGS = frozenset({0x00280008, 0x00280009, 0x00540020, 0x00540022})
_HEADER_TAGS = frozenset({0x00080060, 0x00280301, 0x00280008, 0x00280010, 0x00280011,
                          0x00280002, 0x00280004, 0x7FE00010})
_SITE_TAGS = frozenset({0x00280030, 0x00080070, 0x00081090})  # spacing, manufacturer, model


def _remembered(context: WorkerContext, name: str, tags: frozenset[int],
                original: list[Any], compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered per worker under the raw bytes of the elements it reads.

    A site's files share these bytes (frame layout, detector and view codes, device), and
    parsing them costs as much as decoding an uncompressed image. A Quarantine is
    remembered too. Pixel data takes part by presence only.
    """
    parts: list[Any] = [name]
    for element in original:
        tag = int(element.tag)
        if tag not in tags:
            continue
        if not isinstance(element, RawDataElement):
            return _raising(compute)
        value = None if tag == _PIXEL_DATA else element.value
        parts.append((tag, value, element.is_little_endian, element.is_implicit_VR))
    key = tuple(parts)
    if key not in context.memo:
        if len(context.memo) > 10_000:
            context.memo.clear()
        try:
            context.memo[key] = compute()
        except Quarantine as exc:
            context.memo[key] = exc
    return _raising(lambda: context.memo[key])


def _raising(get: Callable[[], Any]) -> Any:
    value = get()
    if isinstance(value, Quarantine):
        raise Quarantine(str(value))
    return value


def _views(ds: Dataset, frames: int) -> tuple[tuple[int, int], str]:
    try:
        return identify_views(ds, frames)
    except ViewError as exc:
        raise Quarantine(str(exc)) from None


def _native_view(ds: Dataset, tsuid: UID) -> np.ndarray | None:
    """Uncompressed 16-bit little-endian counts as a zero-copy view, when that is all it is.

    Why: for uncompressed images pydicom's decoder costs as much as all of ingest's own pixel
    work. Anything unusual (other bit depths, fewer bits stored than allocated, a short
    buffer) returns None and goes through pydicom's decoder.
    """
    if tsuid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    try:
        bits = (int(ds.BitsAllocated), int(ds.BitsStored), int(ds.SamplesPerPixel))
        signed = int(ds.PixelRepresentation)
        shape = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
        data = ds.PixelData
    except (AttributeError, TypeError, ValueError):
        return None
    count = shape[0] * shape[1] * shape[2]
    if bits != (16, 16, 1) or signed not in (0, 1) or len(data) < 2 * count:
        return None
    return np.frombuffer(data, dtype="<i2" if signed else "<u2", count=count).reshape(shape)


def _decode(ds: Dataset, tsuid: UID) -> np.ndarray:
    """Decode all frames, with the fastest installed plugin first."""
    native = _native_view(ds, tsuid)
    if native is not None:
        return native
    try:
        decoder = get_decoder(tsuid)
    except NotImplementedError:
        raise Quarantine(f"pixel data cannot be decoded ({tsuid.name}): no decoder for this "
                         "transfer syntax") from None
    preferred = _decoders.get(tsuid, "")
    if preferred and preferred not in decoder.available_plugins:
        preferred = ""
    try:
        # Uncompressed data is only viewed, not copied: nothing below writes to it.
        array, _ = decoder.as_array(ds, decoding_plugin=preferred,
                                    view_only=not tsuid.is_compressed)
    except Exception:
        try:
            array, _ = decoder.as_array(ds)
        except Exception as exc:
            raise Quarantine(f"pixel data cannot be decoded ({tsuid.name}): "
                             f"{' '.join(str(exc).split())[:200]}") from None
    return array


def _age_years(ds: Dataset) -> float | None:
    """PatientAge ("068Y", "006M"), else study date minus birth date; never the dates."""
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text)
    if match:
        per_year = {"D": 365.25, "W": 52.1775, "M": 12.0, "Y": 1.0}[match.group(2)]
        return round(int(match.group(1)) / per_year, 2)
    birth = str(ds.get("PatientBirthDate", "") or "")
    study = str(ds.get("StudyDate", "") or ds.get("AcquisitionDate", "") or "")
    if len(birth) >= 8 and len(study) >= 8 and (birth[:8] + study[:8]).isdigit():
        try:
            b = (int(birth[:4]), int(birth[4:6]), int(birth[6:8]))
            s = (int(study[:4]), int(study[4:6]), int(study[6:8]))
        except ValueError:
            return None
        return float(s[0] - b[0] - ((s[1], s[2]) < (b[1], b[2])))
    return None


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = float(ds.get(keyword))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _tracer(ds: Dataset) -> str | None:
    for item in ds.get("RadiopharmaceuticalInformationSequence") or []:
        name = str(item.get("Radiopharmaceutical", "") or "").strip()
        if name:
            return normalise_tracer(name)
        for code in item.get("RadiopharmaceuticalCodeSequence") or []:
            meaning = str(code.get("CodeMeaning", "") or "").strip()
            if meaning:
                return normalise_tracer(meaning)
    return None


def _device_facts(ds: Dataset) -> dict[str, Any]:
    """Facts of the camera: the same for every file of a site."""
    spacing = ds.get("PixelSpacing")
    try:
        pixel_mm = float(spacing[0]) if spacing else None
    except (TypeError, ValueError, IndexError):
        pixel_mm = None
    return {
        "pixel_mm": pixel_mm,
        "manufacturer": str(ds.get("Manufacturer", "") or "").strip() or None,
        "model": str(ds.get("ManufacturerModelName", "") or "").strip() or None,
    }


def _facts(ds: Dataset, row: LabelRow, device: dict[str, Any]) -> dict[str, Any]:
    """Non-identifying acquisition facts, read before de-identification removes them.

    Sex, age and tracer come from the labels when the labels file has them (the curated
    record), else from the header.
    """
    extras = row.extras
    sex = extras.get("sex")
    if sex is None:
        sex = str(ds.get("PatientSex", "") or "").strip().upper() or None
        sex = sex if sex in {"M", "F", "O"} else None
    return {
        "sex": sex,
        "age": extras.get("age") if extras.get("age") is not None else _age_years(ds),
        "weight_kg": _number(ds, "PatientWeight"),
        "pixel_mm": device["pixel_mm"],
        "tracer": extras.get("tracer") or _tracer(ds),
        "manufacturer": device["manufacturer"],
        "model": device["model"],
    }


def _process(path: Path, context: WorkerContext, result: FileResult) -> None:
    ds, read_warnings = _read(path)
    original = list(ds.elements())  # unconverted, before any check parses a value
    try:
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # a corrupt header may not even yield this
        uid = ""
    if uid in context.labels.rows or uid in context.labels.problems:
        result.label_uid = uid  # the labels row has an image, even if it is rejected below
    _check_complete(ds, original, read_warnings, path)
    tsuid = UID(str(ds.file_meta.TransferSyntaxUID))
    result.transfer_syntax = tsuid.keyword or str(tsuid)
    frames = _remembered(context, "header", _HEADER_TAGS, original, lambda: _check_header(ds))
    row = _label(ds, context.labels, result)
    (anterior, posterior), view_source = _remembered(
        context, "views", _VIEW_TAGS, original, lambda: _views(ds, frames))
    pixels = _decode(ds, tsuid)
    if pixels.ndim != 3 or pixels.shape[0] != 2:
        raise Quarantine(f"pixel data has shape {pixels.shape}, expected 2 frames")
    views = pixels[[anterior, posterior]] if (anterior, posterior) != (0, 1) else pixels
    settings = context.settings
    try:
        image, reference, counts = normalise(views, settings.percentile, settings.rows,
                                             settings.cols)
    except ValueError as exc:
        raise Quarantine(str(exc)) from None
    device = _remembered(context, "device", _SITE_TAGS, original, lambda: _device_facts(ds))
    facts = _facts(ds, row, device)
    pseudo = context.pseudonymizer
    pseudo_id = pseudo.patient(row.site, row.patient_id)
    deid = Deidentifier(pseudo, pseudo_id, pseudo.date_shift_days(row.site, row.patient_id))
    header = context.headers.header_text(original, deid)
    result.record = {
        "pseudo_id": pseudo_id,
        "study_uid": pseudo.uid(uid),
        "site": row.site,
        "perugini_grade": row.perugini_grade,
        "amyloid": row.perugini_grade >= 2,
        "metastasis": bool(row.metastasis),
        **facts,
        "counts_anterior": float(counts[0]),
        "counts_posterior": float(counts[1]),
        "intensity_reference": reference,
        "transfer_syntax": result.transfer_syntax,
        "view_source": view_source,
        **{k: v for k, v in row.extras.items() if k not in facts},
    }
    result.header = header
    result.image = image
    # Cheap duplicate detection: processed pixels plus exact count sums; the main process
    # confirms a match on the full-resolution pixels before calling a file a duplicate.
    digest = hashlib.blake2b(image.data, digest_size=16)
    digest.update(counts.data)
    result.fingerprint = digest.hexdigest()


def process_file(relpath: str) -> FileResult:
    """Ingest or reject one file (path relative to the source folder); never raises."""
    context = _CONTEXT
    if context is None:
        raise RuntimeError("install_context() must run before process_file()")
    result = FileResult(relpath=relpath)
    path = context.source / relpath
    try:
        _process(path, context, result)
    except Quarantine as exc:
        result.reason = str(exc)
    except MemoryError:
        result.reason = "file is too large to process in memory"
    except Exception as exc:  # a bug or an exotic file must cost one file, not the run
        result.reason = f"unexpected error while reading: {type(exc).__name__}: {_clean(exc, path)}"
    if result.reason is not None:
        result.image = result.record = result.header = result.fingerprint = None
    return result


def process_chunk(relpaths: list[str]) -> list[FileResult]:
    """Process a chunk of files in order (one pool task: amortises inter-process overhead)."""
    return [process_file(p) for p in relpaths]


def decoded_pixels(path: Path) -> np.ndarray | None:
    """Full-resolution pixels of a file, for confirming a suspected duplicate."""
    try:
        ds = dcmread(path)
        return _decode(ds, UID(str(ds.file_meta.TransferSyntaxUID)))
    except Exception:
        return None

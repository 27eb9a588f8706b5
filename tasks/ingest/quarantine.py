"""The quarantine: untouched copies of the rejected files, named without identity.

Why pseudonymous names: archives are often exported one folder per patient
("DOE^JOHN_1962/study1/img.dcm"), so a file's path is identity. Everywhere outside the
quarantine folder (ingest_report.json, MLflow, logs, error messages) a rejected file is
named by the name of its copy in that folder: a keyed pseudonym of its relative path, plus
its extension when that is a common file type (``Q3f9c0a1b2c3d4e5f.dcm``). An operator who
reads a reason in the report opens that copy directly; ``reasons.json`` beside the copies
maps each one to its original path, for fixing or deleting the file in the archive. That
file is the only place the real paths are written: it lies in a folder that already holds
identity (the copies are untouched DICOM files) and is never versioned, logged or uploaded.

Layout (the folder is replaced as a whole on every run):
    <id><ext>       one untouched copy per rejected file; no sub-folders.
    reasons.json    [{file, source, reason[, duplicate_of]}]: ``file`` the copy's name,
                    ``source`` the original relative path, ``duplicate_of`` the relative
                    path of the ingested file a duplicate repeats.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path, PurePosixPath

from tasks.common.atomic import atomic_dir
from tasks.ingest.pseudonym import Pseudonymizer
from tasks.ingest.reader import FileResult

REASONS_NAME = "reasons.json"

# Only these suffixes are kept in a copy's name: any other could be part of a name or a UID
# ("SMITH.JOHN", "1.2.840.113619.2.55"), and these tell the operator which tool opens it.
KNOWN_SUFFIXES = frozenset({
    ".dcm", ".dicom", ".dic", ".ima", ".img", ".txt", ".csv", ".json", ".xml", ".html",
    ".pdf", ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".nii", ".gz", ".zip",
    ".tar", ".log", ".bak", ".tmp",
})


def copy_name(names: Pseudonymizer, relpath: str) -> str:
    """The name of a rejected file's copy, which also names it in reports and logs."""
    suffix = PurePosixPath(relpath).suffix.lower()
    return names.file_id(relpath) + (suffix if suffix in KNOWN_SUFFIXES else "")


def report_entries(names: Pseudonymizer, rejected: list[FileResult]) -> list[dict[str, str]]:
    """The ``quarantined`` list of ingest_report.json: copy name and reason, no paths."""
    return [{"file": copy_name(names, r.relpath), "reason": r.reason or ""} for r in rejected]


def write_quarantine(quarantine: Path, source: Path, rejected: list[FileResult],
                     names: Pseudonymizer) -> None:
    """Replace the quarantine folder with this run's rejected files and their reasons."""
    with atomic_dir(quarantine) as tmp:
        entries: list[dict[str, str]] = []
        for result in rejected:
            name = copy_name(names, result.relpath)
            shutil.copy2(source / result.relpath, tmp / name)
            entry = {"file": name, "source": result.relpath, "reason": result.reason or ""}
            if result.duplicate_of is not None:
                entry["duplicate_of"] = result.duplicate_of
            entries.append(entry)
        (tmp / REASONS_NAME).write_text(json.dumps(entries, indent=1, ensure_ascii=False)
                                        + "\n", encoding="utf-8")

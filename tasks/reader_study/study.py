"""Open an existing study: its folder (images, study.json) and its database, checked together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select

from tasks.artifacts.json_file import read_json_object
from tasks.config import ReaderStudyConfig
from tasks.reader_study.errors import ReaderStudyError
from tasks.reader_study.layout import STUDY_IMAGES, STUDY_JSON
from tasks.reader_study.store import Case, StudyRow, open_engine, read_study, redact, transaction


@dataclass
class OpenStudy:
    """A study ready to serve or score."""

    folder: Path
    engine: Engine
    study: StudyRow
    details: dict[str, Any]
    images: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) of every case's views."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def pixels(self, image_row: int) -> bytes:
        """One case's two views as little-endian uint16 (0..65535 for intensity 0..1).

        Why a fixed-size raw array rather than a PNG: the viewer does window/level on the full
        precision, and every case's response has the same length, so nothing about how well
        an image compresses (synthetic images can be smoother) reaches the reader.
        """
        view = np.asarray(self.images[image_row], dtype=np.float32)
        return np.round(np.clip(view, 0.0, 1.0) * 65535.0).astype("<u2").tobytes()


def open_study(rs: ReaderStudyConfig) -> OpenStudy:
    """The study in ``rs.output`` with its database, checked to belong together.

    Raises:
        ReaderStudyError: no study folder, a damaged one, no study in the database, or a
            database that holds another study.
    """
    folder = Path(rs.output)
    meta = folder / STUDY_JSON
    if not meta.is_file():
        raise ReaderStudyError(f"{folder}: no reader study here ({STUDY_JSON} missing); "
                               "make one with `synthdx reader-study create`")
    details = read_json_object(meta, ReaderStudyError)
    try:
        images = np.load(folder / STUDY_IMAGES, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ReaderStudyError(f"{folder / STUDY_IMAGES}: unreadable study images ({exc})"
                               ) from None
    engine = open_engine(rs.database_url())
    study = read_study(engine)
    if study.id != details.get("study_id"):
        engine.dispose()
        raise ReaderStudyError(f"database {redact(rs.database_url())} holds study {study.id}, "
                               f"but {meta} is study {details.get('study_id')}")
    with transaction(engine) as session:
        cases = session.scalar(select(func.count()).select_from(Case))
        top = session.scalar(select(func.max(Case.image_row)))
    if images.ndim != 4 or images.shape[1] != 2 or not cases or top is None \
            or top >= images.shape[0]:
        engine.dispose()
        raise ReaderStudyError(f"{folder / STUDY_IMAGES}: shape {images.shape} does not hold "
                               f"the {cases} cases of study {study.id}")
    return OpenStudy(folder=folder, engine=engine, study=study, details=details, images=images)

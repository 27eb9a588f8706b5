"""Strict DICOM values while the project writes a file (phantom and synthetic exports).

pydicom only warns about a value its VR does not allow, and writes it anyway; a validator
(``dciodvfy``) then rejects the file. In pydicom 3 values are checked when they are assigned,
under the *reading* validation mode (the writing mode covers only person-name components and
character sets), so both are set to RAISE while a file is built and saved, and restored
afterwards: ingest reads other people's files and must stay lenient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import config


@contextmanager
def strict_values() -> Iterator[None]:
    """Make pydicom raise on an invalid value inside the block (a decorator too)."""
    settings = config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = saved

"""The study folder's file names (one place; the server needs them without the draw's imports).

::

    study.json   the study's id, size and provenance (released set, model, audit, real splits)
    images.npy   float16 (N, 2, rows, cols) in [0, 1]; row i is case i + 1
    study.db     the SQLite database (cases with the hidden truth, readers, answers), unless a
                 database URL is given
"""

from __future__ import annotations

STUDY_JSON = "study.json"
STUDY_IMAGES = "images.npy"
STUDY_DB = "study.db"

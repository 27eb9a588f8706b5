"""The two files of a dataset folder, and its manifest reader: the lowest layer's one copy.

A dataset folder (processed, synthetic or released) holds ``images.npy`` (float16,
(N, 2, rows, cols), anterior and posterior views, intensity in [0, 1]) and ``manifest.parquet``
(one row per image, ``index`` into the array). Why here: the DataModules in ``models`` open
such a folder themselves (each loader worker maps the array), and ``models`` imports nothing
above it; ``tasks.artifacts.dataset`` re-exports these names for the stages. Only pandas is
imported, so a stage that writes datasets (ingest) does not load Lightning or MONAI for them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.parquet"
MASKS_FILE = "masks.npz"
"""Optional, evaluation only (a phantom's processed dataset): where each finding really is."""


def read_manifest(root: str | Path) -> pd.DataFrame:
    """The manifest of a dataset folder, with a clear error when it is not one."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} a processed dataset folder?")
    return pd.read_parquet(path)

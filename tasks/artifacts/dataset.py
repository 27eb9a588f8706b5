"""A dataset folder: the format ingest, synthesize and the audit's released set share.

Layout::

    images.npy        float16 (N, 2, rows, cols), channel 0 anterior, 1 posterior, in [0, 1]
    manifest.parquet  one row per image; ``index`` is its row in images.npy
    synthesis.json    (synthetic and released sets) which model and sampler made the images

The two file names and :func:`read_manifest` are defined in ``models.dataset_files`` (the lowest
layer: the diffusion DataModule opens a processed folder in every loader worker) and re-exported
here, so there is one definition and stages take them from this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.dataset_files import IMAGES_FILE, MANIFEST_FILE, read_manifest

SYNTHESIS_FILE = "synthesis.json"

__all__ = ["IMAGES_FILE", "MANIFEST_FILE", "SYNTHESIS_FILE", "has_dataset", "read_manifest",
           "read_synthesis", "stored_size", "write_dataset", "write_synthesis"]


def has_dataset(root: Path) -> bool:
    """Whether ``root`` holds both files of a dataset folder."""
    root = Path(root)
    return (root / IMAGES_FILE).is_file() and (root / MANIFEST_FILE).is_file()


def write_dataset(folder: Path, images: np.ndarray, manifest: pd.DataFrame) -> None:
    """Write images.npy and manifest.parquet into ``folder`` (callers make it atomic).

    Args:
        folder: an existing (temporary) folder.
        images: (N, 2, rows, cols) array; stored as given (no pickle).
        manifest: one row per image, ``index`` pointing into ``images``.
    """
    np.save(Path(folder) / IMAGES_FILE, images, allow_pickle=False)
    manifest.to_parquet(Path(folder) / MANIFEST_FILE, index=False)


def stored_size(root: Path) -> tuple[int, int]:
    """(rows, cols) of the images stored in ``root``, from the array header only.

    Raises:
        FileNotFoundError: no image array in ``root``.
        ValueError: the array is not (N, 2, rows, cols).
    """
    path = Path(root) / IMAGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing image array")
    shape = np.load(path, mmap_mode="r").shape
    if len(shape) != 4 or shape[1] != 2:
        raise ValueError(f"{path}: expected images of shape (N, 2, rows, cols), got {shape}")
    return int(shape[2]), int(shape[3])


def write_synthesis(folder: Path, report: dict[str, Any]) -> None:
    """Write synthesis.json into ``folder``.

    Why no timings or run IDs belong in ``report``: the file is part of a DVC-tracked output
    (and copied into the released set); a value that changes between two runs of the same
    inputs would rerun every later stage.
    """
    (Path(folder) / SYNTHESIS_FILE).write_text(json.dumps(report, indent=1) + "\n",
                                               encoding="utf-8")


def read_synthesis(root: Path) -> dict[str, Any] | None:
    """The synthesis.json of a synthetic or released set, or None when it has none.

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = Path(root) / SYNTHESIS_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(report, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(report).__name__}")
    return report

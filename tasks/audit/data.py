"""The audit's inputs: the real processed dataset and the synthetic dataset, checked and aligned.

Both folders have the same layout (tasks.artifacts.dataset: images float16
(N, 2, rows, cols) in [0, 1], one array or shards, and ``manifest.parquet`` with an ``index``
column into the array). The synthetic set is at the diffusion model's resolution; every
comparison happens there, so real images are area-resized down to it (area averaging keeps
mean intensity and does not alias the speckle of low-count scans; see models.data.resize).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from tasks.artifacts.dataset import (
    MANIFEST_FILE,
    DatasetError,
    DatasetMissing,
    ImageArray,
    images_location,
    open_dataset,
)

HELDOUT_SPLITS = ("val", "test")
"""Internal held-out splits: same population as train, never seen by generator or encoder."""


class AuditInputError(ValueError):
    """An input folder that cannot be audited; the message names the path and the reason."""


class AuditInputMissing(AuditInputError, FileNotFoundError):
    """An input folder or file that does not exist."""


ClassRule = Callable[[pd.DataFrame], "pd.Series[bool]"]

FINDING_CLASSES: dict[str, ClassRule] = {
    "normal": lambda m: (m["perugini_grade"] == 0) & ~m["metastasis"],
    "amyloid": lambda m: m["perugini_grade"] >= 1,
    "amyloid_grade1": lambda m: m["perugini_grade"] == 1,
    "amyloid_grade2": lambda m: m["perugini_grade"] == 2,
    "amyloid_grade3": lambda m: m["perugini_grade"] == 3,
    "metastasis": lambda m: m["metastasis"],
}
"""The finding classes reported one by one (they overlap: a scan may show both findings).

Defined from the label columns both datasets share, so each synthetic class is compared with
the same real class.
"""
CLASS_DEFINITIONS = {
    "normal": "perugini_grade == 0 and not metastasis",
    "amyloid": "perugini_grade >= 1",
    "amyloid_grade1": "perugini_grade == 1",
    "amyloid_grade2": "perugini_grade == 2",
    "amyloid_grade3": "perugini_grade == 3",
    "metastasis": "metastasis",
}
LABEL_COLUMNS = ("perugini_grade", "metastasis")


@dataclass
class ImageSet:
    """One input dataset: its folder, manifest (rows in array order) and memory-mapped images."""

    root: Path
    manifest: pd.DataFrame
    images: ImageArray

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) of the stored images."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def has_labels(self) -> bool:
        """Whether the manifest carries the finding labels the classes are defined from."""
        return all(c in self.manifest.columns for c in LABEL_COLUMNS)

    def class_masks(self) -> dict[str, np.ndarray]:
        """Boolean row mask of every finding class (empty when the labels are missing)."""
        if not self.has_labels:
            return {}
        frame = self.manifest.copy()
        frame["perugini_grade"] = frame["perugini_grade"].astype("int64")
        frame["metastasis"] = frame["metastasis"].astype(bool)
        return {name: rule(frame).to_numpy(dtype=bool) for name, rule in FINDING_CLASSES.items()}

    def load(self, mask: np.ndarray | None, size: tuple[int, int]) -> torch.Tensor:
        """Images of the manifest rows selected by ``mask`` (all when None), at ``size``."""
        rows = self.manifest["index"].to_numpy(dtype=np.int64)
        if mask is not None:
            rows = rows[mask]
        return load_rows(self.images, rows, size, images_location(self.root))


def _open(root: Path, what: str, required: tuple[str, ...]) -> ImageSet:
    """Open and check one dataset folder (tasks.artifacts.dataset), as audit input errors."""
    try:
        images, manifest = open_dataset(root, what, required)
    except DatasetMissing as exc:
        raise AuditInputMissing(str(exc)) from exc
    except DatasetError as exc:
        raise AuditInputError(str(exc)) from exc
    return ImageSet(root=Path(root), manifest=manifest, images=images)


def open_processed(root: Path) -> ImageSet:
    """The real processed dataset (ingest output), with a training split and a held-out one.

    Raises:
        AuditInputMissing: the folder or one of its files is missing.
        AuditInputError: it is not a processed dataset the audit can use.
    """
    real = _open(root, "processed dataset", ("split",))
    splits = set(real.manifest["split"].astype(str))
    if "train" not in splits:
        raise AuditInputError(f"{real.root / MANIFEST_FILE}: no 'train' split to audit against")
    if not splits & set(HELDOUT_SPLITS):
        raise AuditInputError(f"{real.root / MANIFEST_FILE}: no held-out split "
                              f"({' or '.join(HELDOUT_SPLITS)}) to set the privacy threshold")
    return real


def open_synthetic(root: Path, real: ImageSet) -> ImageSet:
    """The synthetic dataset (synthesize output), checked against the real one.

    Raises:
        AuditInputMissing: the folder or one of its files is missing.
        AuditInputError: wrong layout, channels that differ from the real images', or
            non-finite pixels.
    """
    synthetic = _open(root, "synthetic dataset", ("sample_id",))
    if synthetic.images.shape[1] != real.images.shape[1]:
        raise AuditInputError(
            f"{images_location(synthetic.root)}: {synthetic.images.shape[1]} channels, but the "
            f"real images in {images_location(real.root)} have {real.images.shape[1]}")
    ids = synthetic.manifest["sample_id"].astype(str)
    if ids.duplicated().any():
        raise AuditInputError(f"{synthetic.root / MANIFEST_FILE}: sample_id is not unique "
                              f"(e.g. {ids[ids.duplicated()].iloc[0]!r})")
    return synthetic


def load_rows(images: ImageArray, rows: np.ndarray, size: tuple[int, int], source: Path,
              chunk: int = 256) -> torch.Tensor:
    """Rows of a (memory-mapped) image array as float32, area-resized to ``size``.

    Args:
        images: the (N, C, H, W) array.
        rows: which rows, in the order wanted.
        size: target (rows, cols).
        source: the array's file, named in errors.
        chunk: rows read and resized at a time (bounds memory at full resolution).

    Raises:
        AuditInputError: when an image holds NaN or infinite values (it would poison
            every statistic silently).
    """
    rows = np.asarray(rows, dtype=np.int64)
    out = torch.empty((len(rows), images.shape[1], *size), dtype=torch.float32)
    for start in range(0, len(rows), chunk):
        part = torch.from_numpy(np.asarray(images[rows[start:start + chunk]], dtype=np.float32))
        if not torch.isfinite(part).all():
            bad = rows[start:start + chunk][~torch.isfinite(part).flatten(1).all(1).numpy()]
            raise AuditInputError(f"{source}: non-finite pixel values in row(s) "
                                  f"{', '.join(map(str, bad[:5]))}")
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=size, mode="area")
        out[start:start + len(part)] = part
    return out

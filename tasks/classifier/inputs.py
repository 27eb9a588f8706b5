"""The classifier stage's inputs, read once per process and shared by every model it trains.

Real images of every split are loaded at the classifier's resolution (the training split for
training, the rest for scoring); the released synthetic set is loaded only when a regime needs
it. Lineage (dataset digests, the diffusion model that made the synthetic images) is read
here too, so every model records exactly which data versions it saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.classifier_data import load_images
from tasks.artifacts.audit_output import released_dir
from tasks.artifacts.dataset import (
    MANIFEST_FILE,
    has_images,
    read_manifest,
    read_synthesis,
    stored_size,
)
from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.config import Config


@dataclass
class DataSource:
    """One dataset folder: its manifest and (lazily) its images at the classifier's size."""

    name: str
    root: Path
    manifest: pd.DataFrame
    size: tuple[int, int]
    _images: torch.Tensor | None = field(default=None, repr=False)

    @property
    def images(self) -> torch.Tensor:
        """Every image of the folder, (N, 2, rows, cols) float32, indexed like ``index``."""
        if self._images is None:
            self._images = load_images(self.root, np.arange(len(self.manifest)), self.size)
        return self._images

    def take(self, indices: np.ndarray) -> torch.Tensor:
        """The images of manifest rows ``indices`` (the ``index`` column)."""
        return self.images[torch.from_numpy(np.array(indices, dtype=np.int64))]


def _check_manifest(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    if "index" not in frame.columns:
        raise ValueError(f"{root}: the manifest has no 'index' column")
    index = frame["index"].to_numpy(dtype=np.int64)
    if not np.array_equal(np.sort(index), np.arange(len(frame))):
        raise ValueError(f"{root}: manifest 'index' must number the images 0..{len(frame) - 1}")
    return frame


def real_source(cfg: Config) -> Path:
    """The processed dataset folder the classifiers train and are scored on."""
    return Path(cfg.classifier.processed or cfg.ingest.output)


def synthetic_source(cfg: Config) -> Path:
    """The released (audited) synthetic set."""
    return Path(cfg.classifier.synthetic or released_dir(Path(cfg.audit.output)))


def classifier_size(cfg: Config, synthetic_root: Path | None, real_root: Path) -> tuple[int, int]:
    """The input size: params if set, else the synthetic set's, else the real set's.

    Why the synthetic set's size by default: the generator works at a lower resolution than
    ingest keeps, and every regime must see the same resolution or the regimes would differ in
    more than their data.
    """
    c = cfg.classifier
    if c.image_rows is not None and c.image_cols is not None:
        return int(c.image_rows), int(c.image_cols)
    if synthetic_root is not None and has_images(synthetic_root):
        return stored_size(synthetic_root)
    return stored_size(real_root)


@dataclass
class ClassifierInputs:
    """Everything the stage reads: real and synthetic sources and their lineage."""

    real: DataSource
    synthetic: DataSource | None
    size: tuple[int, int]
    lineage: dict[str, Any]


def synthesis_lineage(root: Path) -> dict[str, Any]:
    """Which diffusion model and sampler made the synthetic set (from synthesis.json)."""
    report = read_synthesis(root)
    if report is None:
        return {}
    model = report.get("model", {})
    sampler = report.get("sampler", {})
    return {"diffusion_model_version": model.get("version"),
            "diffusion_model_sha256": model.get("sha256"),
            "diffusion_registered": (f"models:/{model['registered_name']}/"
                                     f"{model['registered_version']}"
                                     if model.get("registered_name")
                                     and model.get("registered_version") else None),
            "sampler": f"{sampler.get('kind')}-{sampler.get('steps')} "
                       f"guidance {sampler.get('guidance_scale')}" if sampler else None}


def load_inputs(cfg: Config, need_synthetic: bool) -> ClassifierInputs:
    """Read the manifests (and lineage); images are loaded on first use.

    Raises:
        FileNotFoundError: the processed folder, or the synthetic folder when a regime needs
            it, is missing (the message names it and the stage that writes it).
    """
    real_root = real_source(cfg)
    real_manifest = _check_manifest(read_manifest(real_root), real_root)
    synthetic_root: Path | None = synthetic_source(cfg)
    synthetic = None
    if need_synthetic:
        assert synthetic_root is not None
        if not (synthetic_root / MANIFEST_FILE).is_file():
            raise FileNotFoundError(f"{synthetic_root}: no released synthetic set (run the audit "
                                    "stage, or set classifier.synthetic)")
        synthetic_manifest = _check_manifest(read_manifest(synthetic_root), synthetic_root)
    else:
        synthetic_root = synthetic_root if has_images(synthetic_root) else None
    size = classifier_size(cfg, synthetic_root, real_root)
    real = DataSource("real", real_root, real_manifest, size)
    lineage: dict[str, Any] = {"processed": str(real_root), "processed_digest":
                               dvc_dir_hash(real_root)}
    if need_synthetic:
        assert synthetic_root is not None
        synthetic = DataSource("synthetic", synthetic_root, synthetic_manifest, size)
        lineage |= {"synthetic": str(synthetic_root),
                    "synthetic_digest": dvc_dir_hash(synthetic_root),
                    **synthesis_lineage(synthetic_root)}
    return ClassifierInputs(real=real, synthetic=synthetic, size=size, lineage=lineage)

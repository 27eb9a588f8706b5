"""A dataset's drift profile, and the reference snapshot recorded when a champion is promoted.

The validate stage records, for each classifier it promotes, the profile of the processed
dataset that champion was trained and validated on; the drift stage profiles each new ingest
the same way and compares site by site. Both sides are computed here, by one function, so the
numbers are comparable by construction, and the reference carries the audit's encoder of that
day: today's images are embedded with the SAME encoder as the reference's, never with one
retrained since (whose feature space would differ).

Reference folder layout (an MLflow artifact folder ``drift_reference/`` of the champion's run)::

    reference.json     what it was made from (processed folder and digest, image count, encoder)
    profile.parquet    one row per image: study_uid (pseudonymous), site, split, camera,
                       tracer, pixel_mm, counts, intensity_reference, mean_intensity,
                       metastasis, amyloid
    features.npy       (N, feature_dim) float32 encoder embeddings, rows as profile.parquet
    encoder.pt         the audit's encoder (tasks.artifacts.audit_output's format)

Only pseudonyms and acquisition values leave the processed dataset: no identity is in it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts.audit_output import ENCODER_FILE, read_encoder
from tasks.artifacts.dataset import DatasetError, open_dataset

REFERENCE_JSON = "reference.json"
PROFILE_FILE = "profile.parquet"
FEATURES_FILE = "features.npy"
ARTIFACT_PATH = "drift_reference"
"""Where the reference lives among a champion run's MLflow artifacts."""
PROFILE_COLUMNS = ("study_uid", "site", "split", "camera", "tracer", "pixel_mm", "counts",
                   "intensity_reference", "mean_intensity", "metastasis", "amyloid")
CHUNK = 256


class ReferenceError(ValueError):
    """A reference folder that cannot be used; the message names the path and the reason."""


@dataclass
class DataProfile:
    """Per-image drift values of a dataset, and the encoder's embeddings of the same rows."""

    rows: pd.DataFrame
    features: np.ndarray | None = None


def _column(manifest: pd.DataFrame, name: str) -> pd.Series:
    if name in manifest.columns:
        return manifest[name]
    return pd.Series([None] * len(manifest), index=manifest.index, dtype=object)


def _camera(manifest: pd.DataFrame) -> pd.Series:
    maker = _column(manifest, "manufacturer").fillna("").astype(str).str.strip()
    model = _column(manifest, "model").fillna("").astype(str).str.strip()
    camera = (maker + " " + model).str.strip()
    return camera.where(camera != "", "unknown")


def profile_dataset(processed: Path, encoder: Path | None = None) -> DataProfile:
    """Profile every image of a processed dataset (and embed it when an encoder is given).

    Args:
        processed: the processed dataset folder (tasks.artifacts.dataset's format).
        encoder: an encoder file (tasks.artifacts.audit_output.write_encoder), or None.

    Raises:
        DatasetError: the folder is not a usable dataset (named).
        EncoderFileError: the encoder file cannot be used (named).
    """
    import torch
    import torch.nn.functional as F

    images, manifest = open_dataset(Path(processed), "processed dataset", ("study_uid", "site"))
    model, size = read_encoder(encoder) if encoder is not None else (None, None)
    means = np.empty(len(manifest), dtype=np.float64)
    feats: list[np.ndarray] = []
    index = manifest["index"].to_numpy(dtype=np.int64)
    for start in range(0, len(index), CHUNK):
        part = torch.from_numpy(np.asarray(images[index[start:start + CHUNK]], dtype=np.float32))
        means[start:start + len(part)] = part.mean(dim=(1, 2, 3)).double().numpy()
        if model is not None:
            if tuple(part.shape[-2:]) != tuple(size):
                part = F.interpolate(part, size=tuple(size), mode="area")
            with torch.no_grad():
                feats.append(model.features(part.clamp(0.0, 1.0)).float().numpy())
    counts = (pd.to_numeric(_column(manifest, "counts_anterior"), errors="coerce")
              + pd.to_numeric(_column(manifest, "counts_posterior"), errors="coerce"))
    grade = pd.to_numeric(_column(manifest, "perugini_grade"), errors="coerce")
    rows = pd.DataFrame({
        "study_uid": manifest["study_uid"].astype(str).to_numpy(),
        "site": manifest["site"].astype(str).to_numpy(),
        "split": _column(manifest, "split").astype(str).to_numpy(),
        "camera": _camera(manifest).to_numpy(),
        "tracer": _column(manifest, "tracer").fillna("unknown").astype(str).to_numpy(),
        "pixel_mm": pd.to_numeric(_column(manifest, "pixel_mm"), errors="coerce").to_numpy(
            dtype=np.float64),
        "counts": counts.to_numpy(dtype=np.float64),
        "intensity_reference": pd.to_numeric(_column(manifest, "intensity_reference"),
                                             errors="coerce").to_numpy(dtype=np.float64),
        "mean_intensity": means,
        "metastasis": pd.to_numeric(_column(manifest, "metastasis").astype("Float64"),
                                    errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan),
        "amyloid": (grade > 0).where(grade.notna()).astype("Float64").to_numpy(
            dtype=np.float64, na_value=np.nan),
    })
    features = np.concatenate(feats) if feats else None
    return DataProfile(rows=rows, features=features)


def write_reference(folder: Path, profile: DataProfile, encoder: Path | None,
                    about: dict[str, Any]) -> None:
    """Write a reference folder (``folder`` must exist; callers log it to MLflow).

    Args:
        folder: an empty folder.
        profile: the champion's training data profile (:func:`profile_dataset`).
        encoder: the encoder file its features come from (copied), or None.
        about: what it was made from (processed folder, digest, champion), kept in
            reference.json.
    """
    folder = Path(folder)
    profile.rows.to_parquet(folder / PROFILE_FILE, index=False)
    if profile.features is not None and encoder is not None:
        np.save(folder / FEATURES_FILE, profile.features.astype(np.float32), allow_pickle=False)
        shutil.copy2(encoder, folder / ENCODER_FILE)
    doc = {**about, "images": len(profile.rows),
           "features": profile.features is not None and encoder is not None}
    (folder / REFERENCE_JSON).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


@dataclass
class Reference:
    """A read reference: what it was made from, its profile, and its encoder file if any."""

    about: dict[str, Any]
    profile: DataProfile
    encoder: Path | None


def read_reference(folder: Path) -> Reference:
    """Read a reference folder written by :func:`write_reference`.

    Raises:
        ReferenceError: a missing or unreadable file, or features that do not match the rows.
    """
    folder = Path(folder)
    try:
        about = json.loads((folder / REFERENCE_JSON).read_text(encoding="utf-8"))
        rows = pd.read_parquet(folder / PROFILE_FILE)
    except (OSError, ValueError) as exc:
        raise ReferenceError(f"{folder}: not a drift reference ({exc})") from exc
    missing = [c for c in PROFILE_COLUMNS if c not in rows.columns]
    if missing:
        raise ReferenceError(f"{folder / PROFILE_FILE}: missing column(s) {missing}")
    features, encoder = None, None
    if (folder / FEATURES_FILE).is_file() and (folder / ENCODER_FILE).is_file():
        features = np.load(folder / FEATURES_FILE, allow_pickle=False)
        if features.shape[0] != len(rows):
            raise ReferenceError(f"{folder / FEATURES_FILE}: {features.shape[0]} rows for "
                                 f"{len(rows)} images")
        encoder = folder / ENCODER_FILE
    return Reference(about=about, profile=DataProfile(rows=rows, features=features),
                     encoder=encoder)


__all__ = ["ARTIFACT_PATH", "DataProfile", "DatasetError", "Reference", "ReferenceError",
           "profile_dataset", "read_reference", "write_reference"]

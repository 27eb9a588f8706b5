"""The ground-truth finding masks folder: what the phantom hands ingest beside its archive.

Layout (``phantom.truth_folder`` beside ``phantom.output``, e.g. data/truth)::

    <truth>/<site>/study_00042/NM000001.dcm.npz   path of the DICOM file below the archive's
                                                  source folder, + .npz
    <truth>/TRUTH.json                            layout, and the digest of the labels file

Each ``.npz`` holds one boolean (2, rows, cols) array per finding kind (``FINDINGS``), views
anterior then posterior as displayed (posterior mirrored), at the DICOM matrix; a kind the
study does not have is all False. Naming a mask by its DICOM file lets ingest match them file
by file; neither holds identity (the phantom's paths have none). The masks never go into the
DICOM files: a real archive has no such thing.

Why a shared module: the phantom writes this folder and ingest reads it, and stage packages
do not import each other (tests/test_layering.py).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts.json_file import read_json_object

FINDINGS = ("amyloid", "metastasis")
"""Finding kinds with a mask: cardiac uptake (Perugini >= 1) and metastases (focal or superscan)."""

TRUTH_META = "TRUTH.json"
SUFFIX = ".npz"

__all__ = ["FINDINGS", "SUFFIX", "TRUTH_META", "labels_digest", "mask_path", "read_study_masks",
           "read_truth_meta", "write_study_masks", "write_truth_meta"]


def mask_path(truth: Path, relpath: str) -> Path:
    """Where the masks of the DICOM file ``relpath`` (below the archive's source) live."""
    return Path(truth) / f"{relpath}{SUFFIX}"


def labels_digest(labels: Path) -> str:
    """sha256 of a labels file: ties a truth folder to the archive it was drawn with."""
    return hashlib.sha256(Path(labels).read_bytes()).hexdigest()


def write_study_masks(path: Path, masks: dict[str, np.ndarray]) -> None:
    """Write one study's masks, compressed (they are mostly empty).

    Raises:
        ValueError: a finding kind is missing or a mask is not (2, rows, cols).
    """
    missing = [k for k in FINDINGS if k not in masks]
    if missing:
        raise ValueError(f"masks for {path} lack {missing}")
    for kind in FINDINGS:
        if np.ndim(masks[kind]) != 3 or np.shape(masks[kind])[0] != 2:
            raise ValueError(f"{kind} mask for {path} has shape {np.shape(masks[kind])}, "
                             "expected (2, rows, cols)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(masks[k], bool) for k in FINDINGS})
    path.write_bytes(buffer.getvalue())


def read_study_masks(path: Path) -> dict[str, np.ndarray]:
    """One study's boolean (2, rows, cols) masks per finding kind.

    Raises:
        ValueError: the file is not a masks file of this layout (OSError: unreadable).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            masks = {kind: np.asarray(data[kind], bool) for kind in FINDINGS}
    except KeyError as exc:
        raise ValueError(f"masks file lacks {exc}") from None
    except (ValueError, EOFError) as exc:
        raise ValueError(f"not a masks file ({exc})") from None
    for kind, mask in masks.items():
        if mask.ndim != 3 or mask.shape[0] != 2:
            raise ValueError(f"{kind} has shape {mask.shape}, expected (2, rows, cols)")
    return masks


def write_truth_meta(truth: Path, labels: Path, matrix: tuple[int, int],
                     rule: dict[str, Any]) -> None:
    """TRUTH.json: what the masks are, how they were drawn, and which labels file they match."""
    meta = {
        "generator": "synthdx phantom",
        "findings": list(FINDINGS),
        "layout": "<path of the DICOM file below the source>.npz; one bool (2, rows, cols) "
                  "array per finding, views anterior and posterior (mirrored, as displayed)",
        "matrix": list(matrix),
        "rule": rule,
        "labels_sha256": labels_digest(labels),
    }
    (Path(truth) / TRUTH_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_truth_meta(truth: Path) -> dict[str, Any]:
    """TRUTH.json of a truth folder.

    Raises:
        FileNotFoundError: there is none.
        ValueError: it is not a JSON object with ``labels_sha256``.
    """
    path = Path(truth) / TRUTH_META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no truth folder description")
    meta = read_json_object(path)
    if not isinstance(meta.get("labels_sha256"), str):
        raise ValueError(f"{path}: no labels_sha256")
    return meta

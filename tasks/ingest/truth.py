"""Carry ground-truth finding masks (the phantom's) into the processed dataset.

Why: counterfactual heat maps (``synthdx explain``) are measured against where the findings
really are, at the geometry the models see. The phantom writes one mask file per DICOM file
beside its archive (tasks/artifacts/truth_masks.py); here each ingested image's masks get the
image's own resampling (``pixels.area_resize``: each output pixel holds the share of its area
the finding covers) and are stored as masks.npz beside images.npy
(tasks/artifacts/dataset.py).

Masks are evaluation extras, never a reason to refuse an archive: without a configured or
existing folder, or with one drawn for other labels, the dataset simply has no masks and the
report says why. They are all-or-nothing, so row i of masks.npz is always row i of
images.npy. They hold no identity: coverage fractions per finding kind.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts.truth_masks import (
    FINDINGS,
    labels_digest,
    mask_path,
    read_study_masks,
    read_truth_meta,
)
from tasks.ingest.pixels import area_resize

log = logging.getLogger("synthdx.ingest")


def resized_masks(masks: dict[str, np.ndarray], rows: int, cols: int) -> dict[str, np.ndarray]:
    """One study's boolean masks as float16 (2, rows, cols) coverage, as images are resampled."""
    return {kind: np.stack([area_resize(view.astype(np.float32), rows, cols)
                            for view in masks[kind]]).astype(np.float16) for kind in FINDINGS}


def load_masks(truth: Path | None, labels: Path, relpaths: Sequence[str], rows: int,
               cols: int) -> tuple[dict[str, np.ndarray] | None, dict[str, Any]]:
    """The masks of the ingested files, in their order, resampled to (rows, cols).

    Args:
        truth: the truth folder (``ingest.truth``), or None.
        labels: the labels file ingested; the folder's TRUTH.json must carry its digest, so
            the masks of another phantom run are never matched to these images.
        relpaths: the ingested files (paths below ``ingest.source``), in images.npy order.
        rows: processed image rows.
        cols: processed image columns.

    Returns:
        ``{finding: float16 (N, 2, rows, cols)}`` or None, and what the ingest report records
        (no paths of files: they may name patients in a real archive).
    """
    if truth is None:
        return None, {"masks": False, "why": "no truth folder configured (ingest.truth)"}
    folder = Path(truth)
    info: dict[str, Any] = {"masks": False, "folder": folder.as_posix()}
    try:
        meta = read_truth_meta(folder)
    except FileNotFoundError:
        return None, {**info, "why": "the folder has no TRUTH.json"}
    except ValueError as exc:
        return None, {**info, "why": str(exc)}
    if labels_digest(labels) != meta["labels_sha256"]:
        why = "TRUTH.json belongs to another labels file (its labels digest differs)"
        log.warning("no finding masks: %s (%s)", why, folder)
        return None, {**info, "why": why}
    if not relpaths:
        return None, {**info, "why": "no images"}
    missing = sum(not mask_path(folder, p).is_file() for p in relpaths)
    if missing:
        return None, {**info, "why": f"no masks for {missing} of {len(relpaths)} ingested files"}
    stacks: dict[str, list[np.ndarray]] = {kind: [] for kind in FINDINGS}
    for relpath in relpaths:
        try:
            one = resized_masks(read_study_masks(mask_path(folder, relpath)), rows, cols)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            # Named by type only: a mask file's name is a DICOM path, which may name a patient.
            return None, {**info, "why": f"a mask file is unreadable ({type(exc).__name__})"}
        for kind in FINDINGS:
            stacks[kind].append(one[kind])
    masks = {kind: np.stack(stacks[kind]) for kind in FINDINGS}
    with_finding = {kind: int((masks[kind].reshape(len(relpaths), -1) > 0).any(axis=1).sum())
                    for kind in FINDINGS}
    return masks, {"masks": True, "folder": folder.as_posix(), "findings": list(FINDINGS),
                   "images_with_finding": with_finding}

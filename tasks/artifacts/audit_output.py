"""The audit's output folder (``audit.output``): what the audit hands to the classifiers.

Layout (replaced atomically as a whole)::

    audit.json          every metric, per class and overall, thresholds, counts, encoder,
                        input digests (no timings, no MLflow run ID: the folder is a DVC output)
    nearest.csv         every synthetic image: its nearest training image, NCC, SSIM, decision
    withheld.csv        the withheld rows of nearest.csv (the list a reviewer reads)
    nearest_pairs.png   the closest synthetic / training pairs side by side, both views
    encoder.pt          the in-domain feature encoder (models.audit_encoder), its constructor
                        arguments and input size: the drift stage's feature space
    released/           the synthetic dataset minus the withheld images, in the dataset format
                        (tasks.artifacts.dataset; synthesis.json copied)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.audit_encoder import AuditEncoder
from tasks.artifacts.dataset import SYNTHESIS_FILE, write_dataset

AUDIT_JSON = "audit.json"
NEAREST_CSV = "nearest.csv"
WITHHELD_CSV = "withheld.csv"
PAIRS_PNG = "nearest_pairs.png"
RELEASED_DIR = "released"
ENCODER_FILE = "encoder.pt"
ENCODER_FORMAT = 1


class EncoderFileError(ValueError):
    """An encoder file that cannot be used; the message names the file and the reason."""


def released_dir(audit_output: Path) -> Path:
    """The released synthetic set inside an audit output folder."""
    return Path(audit_output) / RELEASED_DIR


def write_released(target: Path, images: np.ndarray, manifest: pd.DataFrame,
                   synthetic_root: Path) -> int:
    """Write the released set: the kept synthetic rows, re-indexed 0..K-1.

    Args:
        target: the released folder (created; callers write inside an atomic folder).
        images: the kept images, in ``manifest`` order.
        manifest: the kept manifest rows (``sample_id`` kept; ``index`` is rewritten).
        synthetic_root: the synthetic set they come from; its synthesis.json is copied, so
            the released set still names the model and sampler that made it.

    Returns:
        The number of released images.
    """
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    rows = manifest.copy()
    rows["index"] = np.arange(len(rows), dtype=np.int64)
    write_dataset(target, images, rows.reset_index(drop=True))
    if (Path(synthetic_root) / SYNTHESIS_FILE).is_file():
        shutil.copy2(Path(synthetic_root) / SYNTHESIS_FILE, target / SYNTHESIS_FILE)
    return len(rows)


def write_encoder(path: Path, model: AuditEncoder, image_size: tuple[int, int]) -> None:
    """Write the audit's encoder: weights (on the CPU), what rebuilds it, and its input size.

    Args:
        path: the file (callers write inside the atomic output folder).
        model: the trained encoder (built with its default trunk, as the audit builds it).
        image_size: (rows, cols) of the images it was trained on.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": ENCODER_FORMAT, "in_channels": int(model.trunk[0].in_channels),
                "feature_dim": int(model.embed.out_features),
                "heads": {name: int(head.out_features) for name, head in model.heads.items()},
                "image_size": [int(v) for v in image_size], "state_dict": state}, path)


def read_encoder(path: Path) -> tuple[AuditEncoder, tuple[int, int]]:
    """The encoder in ``path`` (eval mode, CPU) and the image size it expects.

    Raises:
        EncoderFileError: missing, unreadable, or not an encoder file of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderFileError(f"{path}: missing (the audit stage writes {ENCODER_FILE})")
    try:
        doc: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged file
        raise EncoderFileError(f"{path}: not a readable encoder file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != ENCODER_FORMAT:
        raise EncoderFileError(f"{path}: not an encoder file of format {ENCODER_FORMAT}")
    model = AuditEncoder(int(doc["in_channels"]), int(doc["feature_dim"]), dict(doc["heads"]))
    try:
        model.load_state_dict(doc["state_dict"])
    except RuntimeError as exc:
        raise EncoderFileError(f"{path}: weights do not fit the encoder ({exc})") from exc
    rows, cols = doc["image_size"]
    return model.eval(), (int(rows), int(cols))

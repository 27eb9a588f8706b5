"""The audit's output folder (``audit.output``): what the audit hands to the classifiers.

Layout (replaced atomically as a whole)::

    audit.json          every metric, per class and overall, thresholds, counts, encoder,
                        input digests (no timings, no MLflow run ID: the folder is a DVC output)
    nearest.csv         every synthetic image: its nearest training image, NCC, SSIM, decision
    withheld.csv        the withheld rows of nearest.csv (the list a reviewer reads)
    nearest_pairs.png   the closest synthetic / training pairs side by side, both views
    released/           the synthetic dataset minus the withheld images, in the dataset format
                        (tasks.artifacts.dataset; synthesis.json copied)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.artifacts.dataset import SYNTHESIS_FILE, write_dataset

AUDIT_JSON = "audit.json"
NEAREST_CSV = "nearest.csv"
WITHHELD_CSV = "withheld.csv"
PAIRS_PNG = "nearest_pairs.png"
RELEASED_DIR = "released"


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

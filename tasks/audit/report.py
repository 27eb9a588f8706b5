"""Write the audit's outputs: the released set, the withheld list, the picture and the numbers.

The output folder's layout is owned by tasks.artifacts.audit_output (the classifier stage reads
the released set through it). audit.json holds no timings and no MLflow run ID: the folder is a
DVC output, and a rerun on the same inputs must keep its hash, or every classifier stage reruns
(timings are MLflow metrics ``seconds/*``).
The DVC metrics file (``reports/audit_metrics.json``) holds the key numbers only, no timings,
so ``dvc metrics diff`` shows changes of the data or the model, not machine noise. It is
written only for the project's output or a chosen ``reports_dir``
(tasks/common/stage_metrics.py): ``synthdx audit --output DIR`` leaves the project's alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from tasks.artifacts import audit_output
from tasks.audit.data import ImageSet
from tasks.common.atomic import atomic_write_text


def nearest_table(synthetic: ImageSet, train_manifest: pd.DataFrame, nearest: np.ndarray,
                  ncc: np.ndarray, ssim: np.ndarray, withheld: np.ndarray) -> pd.DataFrame:
    """One row per synthetic image: its nearest training image (row and pseudonym) and scores.

    Only the processed dataset's row number and pseudonymous ids are named: identity never
    left ingest.
    """
    train = train_manifest.reset_index(drop=True)
    table = pd.DataFrame({
        "sample_id": synthetic.manifest["sample_id"].astype(str).to_numpy(),
        "nearest_train_index": train["index"].to_numpy()[nearest].astype(np.int64),
    })
    if "pseudo_id" in train.columns:
        table["nearest_train_pseudo_id"] = train["pseudo_id"].astype(str).to_numpy()[nearest]
    table["ncc"] = np.round(ncc, 6)
    table["ssim"] = np.round(ssim, 6)
    table["withheld"] = withheld.astype(bool)
    return table


def write_released(synthetic: ImageSet, keep: np.ndarray, target: Path) -> int:
    """Write the released synthetic dataset (kept rows only) into ``target``; return its size."""
    rows = synthetic.manifest[keep]
    images = np.asarray(synthetic.images[rows["index"].to_numpy(dtype=np.int64)])
    return audit_output.write_released(target, images.astype(synthetic.images.dtype), rows,
                                       synthetic.root)


def plot_pairs(path: Path, synthetic: torch.Tensor, train: torch.Tensor,
               table: pd.DataFrame, nearest: np.ndarray, shown: int) -> None:
    """Picture of the ``shown`` most similar synthetic / training pairs, both views each.

    Why a picture: a number says two images correlate; a reviewer needs to see whether it is
    a copy (same lesions, same patient outline) or two plausible normal scans. A matplotlib
    ``Figure`` without pyplot: no global state, no display backend.

    Args:
        path: PNG to write.
        synthetic: the synthetic images, in ``table`` order.
        train: the training images ``nearest`` points into.
        table: :func:`nearest_table` of the synthetic images.
        nearest: position in ``train`` of each synthetic image's nearest image.
        shown: how many pairs (the most similar first).
    """
    order = np.argsort(-table["ncc"].to_numpy(), kind="stable")[:shown]
    per_row = min(4, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / per_row))
    h, w = synthetic.shape[-2:]
    panel_w = 0.55
    panel_h = panel_w * h / w
    fig = Figure(figsize=(per_row * 4 * panel_w + 0.4, rows * (panel_h + 0.7)),
                     layout="constrained")
    subfigs = np.atleast_1d(fig.subfigures(rows, per_row, squeeze=False).ravel())
    for sub, pos in zip(subfigs, order, strict=False):
        row = table.iloc[int(pos)]
        syn = synthetic[int(pos)].float().numpy()
        ref = train[int(nearest[pos])].float().numpy()
        vmax = max(0.05, float(np.quantile(np.concatenate([syn.ravel(), ref.ravel()]), 0.995)))
        axes = sub.subplots(1, 4)
        for ax, img, label in zip(axes, (syn[0], syn[1], ref[0], ref[1]),
                                  ("syn ant", "syn post", "train ant", "train post"),
                                  strict=True):
            ax.imshow(img, cmap="gray_r", vmin=0.0, vmax=vmax, aspect="equal")
            ax.set_title(label, fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        flag = "WITHHELD" if bool(row["withheld"]) else "released"
        sub.suptitle(f"{row['sample_id']} vs train #{row['nearest_train_index']}\n"
                     f"NCC {row['ncc']:.3f}  SSIM {row['ssim']:.3f}  {flag}", fontsize=7)
    for sub in subfigs[len(order):]:
        sub.set_visible(False)
    fig.savefig(path, dpi=110)


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN / inf to None, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write a JSON document atomically (sorted keys, NaN as null)."""
    atomic_write_text(path, json.dumps(_clean(document), indent=1, sort_keys=True) + "\n")

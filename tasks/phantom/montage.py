"""Montages of example scans, the way a reader looks at them (inverted grey, ant | post)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydicom  # noqa: E402

from tasks.config import PhantomConfig  # noqa: E402

CATEGORIES: list[tuple[str, str]] = [
    ("normal", "perugini_grade == 0 and metastasis == 0 and superscan == 0"),
    ("Perugini 1", "perugini_grade == 1"),
    ("Perugini 2", "perugini_grade == 2"),
    ("Perugini 3", "perugini_grade == 3"),
    ("metastases", "metastasis == 1 and superscan == 0"),
    ("superscan", "superscan == 1"),
    ("rib fractures", "fracture == 1 and metastasis == 0"),
]


def display_pair(views: np.ndarray, gap: int = 4) -> np.ndarray:
    """Anterior and posterior side by side, windowed like a reading station.

    The upper window is the 99.5th percentile of the scan, so bone is dark grey and the
    bladder and hot lesions saturate, as readers usually set it.
    """
    v = views.astype(np.float32)
    top = max(float(np.percentile(v, 99.5)), 1e-6)
    v = np.clip(v / top, 0, 1)
    spacer = np.zeros((v.shape[1], gap), np.float32)
    return np.concatenate([v[0], spacer, v[1]], axis=1)


def write_phantom_montage(root: Path, labels: pd.DataFrame, cfg: PhantomConfig) -> Path:
    """One row per site, one column per finding; an empty cell if the site has no example."""
    sites = [s.name for s in cfg.sites]
    fig, axes = plt.subplots(len(sites), len(CATEGORIES),
                             figsize=(1.9 * len(CATEGORIES), 3.9 * len(sites)), squeeze=False)
    for r, site in enumerate(sites):
        at_site = labels[labels.site == site]
        for c, (name, query) in enumerate(CATEGORIES):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            match = at_site.query(query)
            if c == 0:
                ax.set_ylabel(site, fontsize=10)
            if r == 0:
                ax.set_title(name, fontsize=10)
            if match.empty:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, color="grey")
                continue
            row = match.iloc[0]
            ds = pydicom.dcmread(root / "dicom" / row.relpath)
            ax.imshow(display_pair(ds.pixel_array), cmap="gray_r", vmin=0, vmax=1,
                      interpolation="antialiased")
            ax.set_xlabel(f"{row.sex} {row.age}y BMI {row.bmi:.0f}", fontsize=7)
    fig.suptitle("synthdx phantom: anterior | posterior per site and finding", fontsize=11)
    fig.tight_layout()
    out = root / "montage.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

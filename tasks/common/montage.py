"""A contact sheet of dataset images per site (or group), for a quick look in MLflow.

Used for the processed (ingest) and the synthetic (synthesize) datasets. Captions carry only
the row key, split and labels: the montage is logged to MLflow, so it must hold nothing that
identifies a patient (not even the pseudonym).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

GAP = 2  # pixels between the anterior and posterior view of one image
PAD = 10  # pixels between images
CACHE_PREFIX = "montage-"


def _pick(rows: pd.DataFrame, per_site: int) -> list[int]:
    """Up to ``per_site`` indices, round-robin over label groups so every label is shown.

    Within a group, rows are taken in the order of a hash of their ``study_uid`` (row order
    where there is none): a new study joins the picture only if it hashes before the ones
    shown, so an archive that grows by a few studies a night mostly keeps its montage (and
    the cached PNG), where "the first rows" would change whenever a new file sorts first.
    """
    def text(values: pd.Series) -> list[str]:
        return ["?" if pd.isna(v) else str(v) for v in values.tolist()]

    # Plain lists, not a groupby: this runs per site on every nightly ingest.
    index = [int(i) for i in rows["index"].tolist()]
    label = list(zip(text(rows["amyloid"]), text(rows["metastasis"]), strict=True))
    order = list(range(len(index)))
    if "study_uid" in rows.columns:
        keys = [hashlib.sha256(str(u).encode()).hexdigest() for u in rows["study_uid"].tolist()]
        order.sort(key=keys.__getitem__)  # stable: ties keep row order
    by_label: dict[tuple[str, str], list[int]] = {}
    for k in order:
        by_label.setdefault(label[k], []).append(index[k])
    groups = [by_label[key] for key in sorted(by_label)]
    picked: list[int] = []
    while len(picked) < per_site and any(groups):
        for group in groups:
            if group and len(picked) < per_site:
                picked.append(group.pop(0))
    return picked


def _label(value: object, fmt: str) -> str:
    return "?" if value is None or pd.isna(value) else fmt.format(int(value))


def _digest(canvas: np.ndarray, captions: list[tuple[float, float, str]], title: str) -> str:
    """What the drawing depends on: the composed pixels, captions, title and matplotlib."""
    import matplotlib

    h = hashlib.sha256(canvas.tobytes())
    h.update(repr((canvas.shape, captions, title, matplotlib.__version__)).encode())
    return h.hexdigest()[:32]


def _digest_keys(keys: list[str], shape: tuple[int, int],
                 captions: list[tuple[float, float, str]], title: str) -> str:
    """What the drawing depends on, when each image is named by a key of its content."""
    import matplotlib

    h = hashlib.sha256("\0".join(keys).encode())
    h.update(repr((shape, captions, title, matplotlib.__version__)).encode())
    return "k" + h.hexdigest()[:31]


def write_montage(images: np.ndarray, manifest: pd.DataFrame, path: Path,
                  per_site: int = 6, by: str = "site",
                  title: str = "processed images per site (anterior | posterior)",
                  cache: Path | None = None, row_keys: Sequence[str | None] | None = None
                  ) -> None:
    """Write a PNG grid: one row per site, anterior | posterior side by side per image.

    The grid is composed as one array and drawn once (one axes, text captions), which is
    an order of magnitude faster than a grid of subplots.

    Args:
        images: (N, 2, rows, cols) intensities in [0, 1].
        manifest: one row per image with ``index``, ``site``, ``split``, ``perugini_grade``,
            ``amyloid``, ``metastasis``.
        path: the PNG to write.
        per_site: images shown per site.
        by: the manifest column that makes the rows (``site``; ``group`` for synthetic sets).
        title: the figure title.
        cache: a folder that keeps the last PNG drawn, named by what it shows; when the
            same picture is asked for again it is copied instead of drawn. Why: drawing and
            PNG-encoding is half of an incremental ingest whose new files do not change the
            images shown (same bytes either way).
        row_keys: what each row's image is, by position in ``images`` (ingest: its cache
            entry, a digest of everything the image depends on). With a cache, the picture is
            then named by the keys of the rows it shows instead of their pixels, so a cached
            picture is found without reading a single image.
    """
    sites = list(dict.fromkeys(manifest[by])) if by != "site" else sorted(manifest[by].unique())
    ncols = max(1, min(per_site, int(manifest.groupby(by, sort=False).size().max())))
    rows_px, cols_px = images.shape[2], images.shape[3]
    cell_w, cell_h = 2 * cols_px + GAP + PAD, rows_px + PAD
    shape = (len(sites) * cell_h, ncols * cell_w)
    captions: list[tuple[float, float, str]] = []
    placed: list[tuple[int, int, int]] = []  # (top, left, index)
    by_index = manifest.set_index("index")
    for r, site in enumerate(sites):
        for c, index in enumerate(_pick(manifest[manifest[by] == site], per_site)):
            top, left = r * cell_h + PAD, c * cell_w + PAD // 2
            placed.append((top, left, int(index)))
            row = by_index.loc[index]
            captions.append((left + cols_px + GAP / 2, top - 1,
                             (f"{site} ({row['split']}) " if by == "site" else "")
                             + f"{_label(row['perugini_grade'], 'P{}')} "
                             f"met {_label(row['metastasis'], '{}')}"))

    def compose() -> np.ndarray:
        canvas = np.zeros(shape, dtype=np.float32)
        for top, left, index in placed:
            pair = np.asarray(images[index], dtype=np.float32)
            canvas[top:top + rows_px, left:left + cols_px] = pair[0]
            canvas[top:top + rows_px, left + cols_px + GAP:left + 2 * cols_px + GAP] = pair[1]
        return canvas

    canvas: np.ndarray | None = None
    keys = [k for _, _, i in placed if (k := row_keys[i])] if row_keys is not None else []
    if cache is None:
        digest = ""
    elif row_keys is not None and len(keys) == len(placed):
        digest = _digest_keys(keys, shape, captions, title)
    else:
        canvas = compose()
        digest = _digest(canvas, captions, title)
    cached = cache / f"{CACHE_PREFIX}{digest}.png" if cache else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, path)
        return
    canvas = compose() if canvas is None else canvas
    _draw(canvas, captions, title, path)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for old in cached.parent.glob(f"{CACHE_PREFIX}*.png"):
            old.unlink(missing_ok=True)
        tmp = cached.with_suffix(".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(cached)


def _draw(canvas: np.ndarray, captions: list[tuple[float, float, str]], title: str,
          path: Path) -> None:
    """Draw the composed grid with its captions and title into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 / 80  # inches per pixel at 80 dpi: one image pixel per screen pixel
    fig = plt.figure(figsize=(max(canvas.shape[1] * scale, 4), canvas.shape[0] * scale + 0.3),
                     dpi=80)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + 0.3 / scale)))
    # Bone scans are read as dark uptake on white: show 1 - intensity.
    ax.imshow(1.0 - canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              aspect="equal")
    for x, y, text in captions:
        ax.text(x, y, text, ha="center", va="bottom", fontsize=6)
    ax.axis("off")
    fig.suptitle(title, fontsize=8, y=0.995)
    fig.savefig(path, dpi=80, metadata={"Software": None})
    plt.close(fig)

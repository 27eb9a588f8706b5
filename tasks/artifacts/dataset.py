"""A dataset folder: the format ingest, synthesize and the audit's released set share.

Layout::

    images.npy        float16 (N, 2, rows, cols), channel 0 anterior, 1 posterior, in [0, 1]
                      (synthetic and released sets), or
    images/           the same array in shards (processed datasets: ingest), see
                      models.dataset_files and :func:`write_image_shards`
    manifest.parquet  one row per image; ``index`` is its row in the image array
    synthesis.json    (synthetic and released sets) which model and sampler made the images
    masks.npz         (optional, evaluation only: a phantom's processed set) per finding kind
                      (amyloid, metastasis) a float16 (N, 2, rows, cols) array: the share of
                      each pixel the true finding covers (tasks/artifacts/truth_masks.py)

The file names, :func:`read_manifest` and :func:`open_images` are defined in
``models.dataset_files`` (the lowest layer: the diffusion DataModule opens a processed folder
in every loader worker) and re-exported here, so there is one definition and stages take them
from this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.dataset_files import (
    IMAGES_DIR,
    IMAGES_FILE,
    MANIFEST_FILE,
    MASKS_FILE,
    SHARDS_FILE,
    SHARDS_FORMAT,
    ImageArray,
    ShardedImages,
    has_images,
    images_location,
    open_images,
    read_manifest,
)
from tasks.artifacts.json_file import read_json_object

SYNTHESIS_FILE = "synthesis.json"

HEADERS_DIR = "headers"
HEADER_SHARDS_FORMAT = "synthdx-header-shards/1"
SHARD_BYTES = 1 << 18
"""The mean size a shard is cut to: small enough that a night's few new studies rewrite
little, large enough that a big archive is not tens of thousands of files."""

__all__ = [
    "HEADERS_DIR", "IMAGES_DIR", "IMAGES_FILE", "MANIFEST_FILE", "MASKS_FILE", "SHARDS_FILE",
    "SYNTHESIS_FILE",
    "DatasetError", "DatasetMissing", "ImageArray", "ShardedImages", "StoredShard", "has_dataset",
    "has_images", "images_location", "open_dataset", "open_images", "read_manifest", "read_masks",
    "read_headers", "read_synthesis", "shard_bounds", "stored_size", "write_dataset",
    "write_header_shards", "write_image_shards", "write_masks", "write_synthesis",
]


class DatasetError(ValueError):
    """A folder that is not a usable dataset; the message names the path and the reason."""


class DatasetMissing(DatasetError, FileNotFoundError):
    """A dataset folder or one of its files does not exist."""


def has_dataset(root: Path) -> bool:
    """Whether ``root`` holds a dataset folder's images (either layout) and manifest."""
    root = Path(root)
    return has_images(root) and (root / MANIFEST_FILE).is_file()


def _npy_header(array: np.ndarray) -> bytes:
    """The header ``np.save`` writes before the array's bytes (format 1.0, else 2.0)."""
    info = np.lib.format.header_data_from_array_1_0(array)
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, info)
    except ValueError:  # a header too long for format 1.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, info)
    return buf.getvalue()


def write_dataset(folder: Path, images: np.ndarray, manifest: pd.DataFrame) -> str | None:
    """Write images.npy and manifest.parquet into ``folder`` (callers make it atomic).

    Args:
        folder: an existing (temporary) folder.
        images: (N, 2, rows, cols) array; stored as given (no pickle).
        manifest: one row per image, ``index`` pointing into ``images``.

    Returns:
        The MD5 of images.npy (DVC's file hash), or None when it was not computed. Why here:
        the images are most of a dataset's bytes, and hashing them from memory while they
        are written (each in its own thread: neither holds the GIL) spares reading them
        back for the DVC hash of the folder.
    """
    path = Path(folder) / IMAGES_FILE
    digest = None
    if images.flags.c_contiguous and not images.dtype.hasobject:
        # What np.save writes for such an array: its header, then the raw bytes.
        header = _npy_header(images)
        md5 = hashlib.md5(header, usedforsecurity=False)
        hasher = threading.Thread(target=md5.update, args=(images.reshape(-1).view(np.uint8),))
        hasher.start()
        try:
            with path.open("wb") as fh:
                fh.write(header)
                images.tofile(fh)
        finally:
            hasher.join()
        digest = md5.hexdigest()
    else:
        np.save(path, images, allow_pickle=False)
    manifest.to_parquet(Path(folder) / MANIFEST_FILE, index=False)
    return digest


def shard_bounds(keys: Sequence[str], row_bytes: int, target_bytes: int | None = None
                 ) -> list[tuple[int, int]]:
    """Where to cut rows into shards: content-defined, so a new row moves only its shard.

    A shard ends after a row whose key hashes to 0 modulo the mean shard length (or when it
    reaches four times that length). Why keys and not positions: with positions, one row
    inserted near the start would shift every later border and rewrite every shard; here a
    border depends only on the row it follows, so a full run and an incremental run of the
    same rows cut at the same places, and a new row changes one shard (or splits one).

    Args:
        keys: one stable string per row, in row order (ingest: the keyed file ids).
        row_bytes: bytes of one row's image.
        target_bytes: the mean shard size wanted (default :data:`SHARD_BYTES`).

    Returns:
        (start, end) row ranges covering all rows, in order.
    """
    target = SHARD_BYTES if target_bytes is None else target_bytes
    mean = max(1, min(1024, round(target / max(1, row_bytes))))
    bounds: list[tuple[int, int]] = []
    start = 0
    for i, key in enumerate(keys):
        if i + 1 - start >= 4 * mean or zlib.crc32(str(key).encode("utf-8")) % mean == 0:
            bounds.append((start, i + 1))
            start = i + 1
    if start < len(keys):
        bounds.append((start, len(keys)))
    return bounds


@dataclass(frozen=True)
class StoredShard:
    """One shard as stored: file name inside ``images/`` (its MD5 + .npy), rows, MD5."""

    file: str
    rows: int
    md5: str


def _write_shard(folder: Path, array: np.ndarray) -> StoredShard:
    """Write one shard under the MD5 of its bytes (header + raw data, as np.save writes)."""
    array = np.ascontiguousarray(array)
    header = _npy_header(array)
    md5 = hashlib.md5(header, usedforsecurity=False)
    md5.update(array.reshape(-1).view(np.uint8))
    digest = md5.hexdigest()
    path = folder / f"{digest}.npy"
    if not path.exists():  # two shards with the same bytes are one file
        with path.open("wb") as fh:
            fh.write(header)
            array.tofile(fh)
    return StoredShard(file=path.name, rows=int(array.shape[0]), md5=digest)


def _link_shard(folder: Path, existing: str | Path, rows: int) -> StoredShard:
    """Bring an identical shard of an earlier output in: a hard link, else a copy."""
    name = os.path.basename(existing)
    path = os.path.join(folder, name)
    try:
        os.link(existing, path)
    except FileExistsError:  # two shards with the same bytes are one file
        pass
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(existing, path)
    return StoredShard(file=name, rows=rows, md5=name.rsplit(".", 1)[0])


def write_image_shards(folder: Path, shape: tuple[int, ...], bounds: Sequence[tuple[int, int]],
                       rows_of: Callable[[int, int], np.ndarray],
                       existing: Callable[[int, int], str | Path | None] | None = None,
                       dtype: Any = np.float16) -> list[StoredShard]:
    """Write ``images/`` (shards and shards.json) into a dataset folder being built.

    Args:
        folder: an existing (temporary) dataset folder; ``images/`` is created in it.
        shape: the whole array's shape, (N, 2, rows, cols).
        bounds: the row ranges of the shards (:func:`shard_bounds`).
        rows_of: the images of rows ``start:end``, as an array of ``dtype``; called only for
            shards that are written, never for those ``existing`` supplies.
        existing: for a row range, a file of an earlier output holding exactly these rows
            (named by its MD5, as this function names them), or None. The caller vouches for
            it (ingest: by what the rows are and the file's unchanged stat).
        dtype: the stored dtype.

    Returns:
        The shards in order; their MD5s spare the DVC hash of the folder from reading them.
    """
    images = Path(folder) / IMAGES_DIR
    images.mkdir()
    dtype = np.dtype(dtype)

    def write(bound: tuple[int, int]) -> StoredShard:
        start, end = bound
        array = np.asarray(rows_of(start, end), dtype=dtype)
        if array.shape != (end - start, *shape[1:]):
            raise ValueError(f"rows {start}:{end} gave images of shape {array.shape}, "
                             f"expected {(end - start, *shape[1:])}")
        return _write_shard(images, array)

    shards: list[StoredShard | None] = []
    todo: list[int] = []
    for k, (start, end) in enumerate(bounds):  # links here: a thread per link costs more
        found = existing(start, end) if existing is not None else None
        shards.append(_link_shard(images, found, end - start) if found is not None else None)
        if found is None:
            todo.append(k)
    # Hashing and writing release the GIL: two shards at a time use both cores of a small VM.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for k, shard in zip(todo, pool.map(write, [bounds[k] for k in todo]), strict=True):
            shards[k] = shard
    done = [s for s in shards if s is not None]
    index = {"format": SHARDS_FORMAT, "shape": [int(v) for v in shape], "dtype": dtype.name,
             "shards": [{"file": s.file, "rows": s.rows} for s in done]}
    (images / SHARDS_FILE).write_text(json.dumps(index, indent=0) + "\n", encoding="utf-8")
    return done


def write_header_shards(folder: Path, bounds: Sequence[tuple[int, int]],
                        lines_of: Callable[[int, int], Sequence[str]],
                        existing: Callable[[int, int], str | Path | None] | None = None
                        ) -> list[StoredShard]:
    """Write ``headers/`` (one JSON line per row, cut like the images) into a dataset folder.

    Why cut like the images: the headers are a tenth of a processed dataset's bytes and,
    in one file, would be rewritten and re-hashed whole for a night's few new files.

    Args:
        folder: an existing (temporary) dataset folder; ``headers/`` is created in it.
        bounds: the row ranges, as the images' shards.
        lines_of: the header lines (no newline) of rows ``start:end``.
        existing: an earlier output's file of exactly these rows, or None (as for images).

    Returns:
        The shards in order (each named by its MD5 + .jsonl).
    """
    target = Path(folder) / HEADERS_DIR
    target.mkdir()
    shards: list[StoredShard] = []
    for start, end in bounds:
        found = existing(start, end) if existing is not None else None
        if found is not None:
            shards.append(_link_shard(target, found, end - start))
            continue
        data = "".join(line + "\n" for line in lines_of(start, end)).encode("utf-8")
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        path = target / f"{digest}.jsonl"
        if not path.exists():
            path.write_bytes(data)
        shards.append(StoredShard(file=path.name, rows=end - start, md5=digest))
    index = {"format": HEADER_SHARDS_FORMAT, "rows": sum(s.rows for s in shards),
             "shards": [{"file": s.file, "rows": s.rows} for s in shards]}
    (target / SHARDS_FILE).write_text(json.dumps(index, indent=0) + "\n", encoding="utf-8")
    return shards


def read_headers(root: Path) -> list[str]:
    """The de-identified DICOM header of every row of a processed dataset (JSON strings).

    Raises:
        DatasetMissing: the folder has no headers.
        DatasetError: the index or a shard is unreadable, or the rows do not add up.
    """
    folder = Path(root) / HEADERS_DIR
    index_path = folder / SHARDS_FILE
    if not index_path.is_file():
        legacy = Path(root) / "headers.jsonl"  # datasets written before the shards
        if legacy.is_file():
            return legacy.read_text(encoding="utf-8").splitlines()
        raise DatasetMissing(f"{index_path}: missing; is {root} a processed dataset folder?")
    try:
        doc = read_json_object(index_path)
        lines: list[str] = []
        for shard in doc["shards"]:
            part = (folder / str(shard["file"])).read_text(encoding="utf-8").splitlines()
            if len(part) != int(shard["rows"]):
                raise DatasetError(f"{folder / shard['file']}: {len(part)} lines, the index "
                                   f"says {shard['rows']}")
            lines.extend(part)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{index_path}: unreadable header shards ({exc})") from exc
    if len(lines) != int(doc.get("rows", -1)):
        raise DatasetError(f"{index_path}: the shards hold {len(lines)} headers, the index "
                           f"says {doc.get('rows')}")
    return lines


def open_dataset(root: Path, what: str, required: tuple[str, ...] = ()
                 ) -> tuple[ImageArray, pd.DataFrame]:
    """Open and check a dataset folder: the memory-mapped images and the manifest.

    Why every check here: a stage that reads another stage's dataset must fail on the file
    that is wrong, with the reason, before hours of work, not later inside a batch.

    Args:
        root: the folder.
        what: what it should be (``"processed dataset"``), named in errors.
        required: manifest columns the caller needs besides ``index``.

    Returns:
        The (N, 2, rows, cols) images (memory-mapped, either layout: see
        models.dataset_files.open_images) and the manifest sorted by ``index``.

    Raises:
        DatasetMissing: the folder or one of its two files does not exist.
        DatasetError: unreadable files, images that are not (N, 2, rows, cols) or none at all,
            a missing column, or an ``index`` that is not unique rows of the array.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetMissing(f"{root}: {what} folder does not exist")
    images_path, manifest_path = images_location(root), root / MANIFEST_FILE
    for path in (images_path, manifest_path):
        if not path.exists():
            raise DatasetMissing(f"{path}: missing; is {root} a {what} folder?")
    try:
        images = open_images(root)
        if isinstance(images, ShardedImages):
            images.check()
    except FileNotFoundError as exc:
        raise DatasetMissing(str(exc)) from exc
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    if images.ndim != 4 or images.shape[1] != 2:
        raise DatasetError(f"{images_path}: expected shape (N, 2, rows, cols) with the "
                           f"anterior and posterior views as channels, got {images.shape}")
    if images.shape[0] == 0:
        raise DatasetError(f"{images_path}: holds no images")
    try:
        manifest = pd.read_parquet(manifest_path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DatasetError(f"{manifest_path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in ("index", *required) if c not in manifest.columns]
    if missing:
        raise DatasetError(f"{manifest_path}: missing column(s) {', '.join(missing)}")
    index = manifest["index"].to_numpy()
    if (len(np.unique(index)) != len(index) or len(index) == 0
            or index.min() < 0 or index.max() >= images.shape[0]):
        raise DatasetError(f"{manifest_path}: 'index' must be unique rows of {images_path} "
                           f"(0..{images.shape[0] - 1})")
    return images, manifest.sort_values("index").reset_index(drop=True)


def write_masks(folder: Path, masks: dict[str, np.ndarray]) -> None:
    """Write masks.npz into ``folder`` (callers make it atomic): one array per finding kind.

    Why compressed: the masks are mostly empty, and a processed folder is versioned by DVC.
    """
    arrays = {str(k): np.asarray(v, np.float16) for k, v in masks.items()}
    np.savez_compressed(Path(folder) / MASKS_FILE, **arrays)


def read_masks(root: Path, images_shape: tuple[int, ...]) -> dict[str, np.ndarray] | None:
    """The finding masks of a dataset folder, or None when it has none (a real archive).

    Args:
        root: the dataset folder.
        images_shape: the shape of its images.npy; every mask must have it.

    Raises:
        DatasetError: masks.npz exists but is unreadable or does not match the images.
    """
    path = Path(root) / MASKS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            masks = {name: np.asarray(data[name]) for name in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from exc
    for name, mask in masks.items():
        if mask.shape != tuple(images_shape):
            raise DatasetError(f"{path}: {name} has shape {mask.shape}, but the images are "
                               f"{tuple(images_shape)}")
    return masks


def stored_size(root: Path) -> tuple[int, int]:
    """(rows, cols) of the images stored in ``root``, from the array header(s) only.

    Raises:
        FileNotFoundError: no image array in ``root``.
        ValueError: the array is not (N, 2, rows, cols).
    """
    shape = open_images(root).shape
    if len(shape) != 4 or shape[1] != 2:
        raise ValueError(f"{images_location(root)}: expected images of shape "
                         f"(N, 2, rows, cols), got {shape}")
    return int(shape[2]), int(shape[3])


def write_synthesis(folder: Path, report: dict[str, Any]) -> None:
    """Write synthesis.json into ``folder``.

    Why no timings or run IDs belong in ``report``: the file is part of a DVC-tracked output
    (and copied into the released set); a value that changes between two runs of the same
    inputs would rerun every later stage.
    """
    (Path(folder) / SYNTHESIS_FILE).write_text(json.dumps(report, indent=1) + "\n",
                                               encoding="utf-8")


def read_synthesis(root: Path) -> dict[str, Any] | None:
    """The synthesis.json of a synthetic or released set, or None when it has none.

    Raises:
        ValueError: the file exists but is not a JSON object.
    """
    path = Path(root) / SYNTHESIS_FILE
    if not path.is_file():
        return None
    return read_json_object(path)

"""The files of a dataset folder, and its readers: the lowest layer's one copy.

A dataset folder (processed, synthetic or released) holds its images (float16,
(N, 2, rows, cols), anterior and posterior views, intensity in [0, 1]) and ``manifest.parquet``
(one row per image, ``index`` into the images). The images are stored one of two ways:

    images.npy            one array (synthetic and released sets: written once, whole)
    images/shards.json    a processed dataset (ingest): the array cut into shards, in order,
    images/<md5>.npy      each shard named by the MD5 of its bytes

Why shards for ingest: a hospital archive grows every night, and one array file would be
rewritten (and re-hashed, by synthdx and by DVC) whole for a few new studies. Shard borders
depend only on the rows near them (ingest cuts where a row's keyed file id says so), so a
night's new studies change the shards they land in and leave every other file as it was.

:func:`open_images` opens either as something indexed like a memory-mapped array. Why here:
the DataModules in ``models`` open a dataset folder themselves (each loader worker maps the
array), and ``models`` imports nothing above it; ``tasks.artifacts.dataset`` re-exports these
names for the stages. Only numpy and pandas are imported, so a stage that writes datasets
(ingest) does not load Lightning or MONAI for them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGES_FILE = "images.npy"
IMAGES_DIR = "images"
SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "synthdx-image-shards/1"
MANIFEST_FILE = "manifest.parquet"
MASKS_FILE = "masks.npz"
"""Optional, evaluation only (a phantom's processed dataset): where each finding really is."""


def read_manifest(root: str | Path) -> pd.DataFrame:
    """The manifest of a dataset folder, with a clear error when it is not one."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} a processed dataset folder?")
    return pd.read_parquet(path)


def images_location(root: str | Path) -> Path:
    """Where a folder's images are: ``images/`` when it is sharded, else ``images.npy``.

    For error messages and existence checks; the path may not exist.
    """
    shards = Path(root) / IMAGES_DIR
    return shards if (shards / SHARDS_FILE).is_file() else Path(root) / IMAGES_FILE


def has_images(root: str | Path) -> bool:
    """Whether ``root`` stores images in either layout."""
    return ((Path(root) / IMAGES_FILE).is_file()
            or (Path(root) / IMAGES_DIR / SHARDS_FILE).is_file())


class ShardedImages:
    """A sharded image array, read like a memory-mapped (N, 2, rows, cols) numpy array.

    Indexing with an int, a slice, an integer or boolean array (optionally followed by more
    indices, as in ``images[rows, 0]``) returns a numpy array; shards are memory-mapped on
    first use (and checked against the index then, or all at once by :meth:`check`), so
    only the rows asked for are read. ``np.asarray(images)`` reads them all.
    """

    def __init__(self, folder: str | Path) -> None:
        """Read ``folder/shards.json`` and check it against the shard files' headers.

        Raises:
            FileNotFoundError: the index or a shard file does not exist.
            ValueError: an unreadable index or shard, or one that does not match the index.
        """
        self.folder = Path(folder)
        index_path = self.folder / SHARDS_FILE
        try:
            doc = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{index_path}: missing shard index") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{index_path}: not a readable JSON shard index ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{index_path}: not a shard index of format {SHARDS_FORMAT}")
        try:
            shape = tuple(int(v) for v in doc["shape"])
            self.dtype = np.dtype(doc["dtype"])
            self.files = [str(s["file"]) for s in doc["shards"]]
            counts = np.array([int(s["rows"]) for s in doc["shards"]], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{index_path}: malformed shard index ({exc})") from exc
        if len(shape) < 1 or int(counts.sum()) != shape[0] or (counts <= 0).any():
            raise ValueError(f"{index_path}: the shards' rows ({int(counts.sum())}) do not add "
                             f"up to the array's {shape[0] if shape else '?'}")
        self.shape = shape
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: list[np.ndarray | None] = [None] * len(self.files)

    def check(self) -> None:
        """Open every shard's header now, so a missing or wrong shard fails here, not later.

        Raises:
            FileNotFoundError: a shard file does not exist.
            ValueError: a shard is unreadable or does not match the index.
        """
        for k in range(len(self.files)):
            self._shard(k)

    @property
    def ndim(self) -> int:
        """Number of dimensions, as numpy's."""
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are not pickled into loader workers; each process reopens its shards.
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.files)
        return state

    def _shard(self, k: int) -> np.ndarray:
        array = self._maps[k]
        if array is None:
            path = self.folder / self.files[k]
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: missing image shard") from None
            except (ValueError, OSError) as exc:
                raise ValueError(f"{path}: not a readable .npy shard ({exc})") from exc
            rows = int(self.starts[k + 1] - self.starts[k])
            if array.shape != (rows, *self.shape[1:]) or array.dtype != self.dtype:
                raise ValueError(f"{path}: shard is {array.shape} {array.dtype}, the index "
                                 f"says {(rows, *self.shape[1:])} {self.dtype}")
            self._maps[k] = array
        return array

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows (an int64 vector, any order, repeats allowed) as one array."""
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(shard):
            where = np.flatnonzero(shard == k)
            out[where] = self._shard(int(k))[rows[where] - self.starts[k]]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            row = int(key) + (n if int(key) < 0 else 0)
            if not 0 <= row < n:
                raise IndexError(f"index {int(key)} is out of bounds for {n} images")
            out = self._rows(np.array([row]))[0]
            return out[rest] if rest else out
        if isinstance(key, slice):
            rows = np.arange(n)[key]
        else:
            rows = np.asarray(key)
            if rows.dtype == bool:
                if rows.shape != (n,):
                    raise IndexError(f"boolean index of shape {rows.shape} for {n} images")
                rows = np.flatnonzero(rows)
            elif rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
                raise IndexError("images are indexed by an int, a slice or a 1-D array "
                                 "of row numbers")
            rows = rows.astype(np.int64)
            if rows.size and (rows.min() < -n or rows.max() >= n):
                raise IndexError(f"row index out of range 0..{n - 1}")
            rows = np.where(rows < 0, rows + n, rows)
        out = self._rows(rows)
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self._rows(np.arange(self.shape[0]))
        return out if dtype is None else out.astype(dtype, copy=False)


ImageArray = np.ndarray | ShardedImages
"""What :func:`open_images` gives: both index like a memory-mapped array."""


def open_images(root: str | Path) -> ImageArray:
    """A folder's images, memory-mapped (``images.npy``) or sharded (``images/``).

    Raises:
        FileNotFoundError: the folder stores no images.
        ValueError: the images cannot be read (the message names the file).
    """
    root = Path(root)
    if (root / IMAGES_DIR / SHARDS_FILE).is_file():
        return ShardedImages(root / IMAGES_DIR)
    path = root / IMAGES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing image array")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from exc

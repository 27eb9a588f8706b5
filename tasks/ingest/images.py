"""The processed images of one run, row by row, read only where the dataset needs them.

Why lazy: on a nightly run nearly every result comes from the cache's pack without its image,
and nearly every shard of the dataset is linked unchanged from the last output
(tasks/artifacts/dataset.py), so most images are never read. Those a new shard holds are read
from their cache entries (or, if an entry is gone, the file is processed again here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from tasks.ingest.reader import FileResult


class RowImages:
    """The images of the ingested results, in row order, indexed like an (N, 2, r, c) array.

    Args:
        results: the ingested results (no quarantined ones), in dataset row order.
        shape: the shape of one image, (2, rows, cols).
        load: gives a result's image when it came without one (from the cache's pack).
    """

    def __init__(self, results: Sequence[FileResult], shape: tuple[int, int, int],
                 load: Callable[[FileResult], np.ndarray]) -> None:
        self.results = list(results)
        self.shape = (len(self.results), *shape)
        self.dtype = np.dtype(np.float16)
        self._load = load

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, row: int) -> np.ndarray:
        result = self.results[int(row)]
        image = result.image if result.image is not None else self._load(result)
        image = np.asarray(image, dtype=np.float16)
        if image.shape != self.shape[1:]:
            raise ValueError(f"image of row {row} has shape {image.shape}, the dataset's "
                             f"images are {self.shape[1:]}")
        return image

    def rows(self, start: int, end: int) -> np.ndarray:
        """Rows ``start:end`` as one float16 array."""
        out = np.empty((end - start, *self.shape[1:]), dtype=np.float16)
        for k in range(start, end):
            out[k - start] = self[k]
        return out

    def signature(self, start: int, end: int) -> str | None:
        """What rows ``start:end`` are, as the cache names them: the digest of their entries.

        The same digest means the same images (an entry's key covers the file's bytes, the
        settings, the key and the code). None when a row has no cache entry (the cache is
        off, or the file changed while it was read).
        """
        entries = [r.cache_entry or "" for r in self.results[start:end]]
        if not all(entries):
            return None
        return hashlib.sha256("\0".join(entries).encode("ascii")).hexdigest()

"""The processed images and headers of one run, row by row, read only where needed.

Why lazy: on a nightly run nearly every result comes from the cache's pack without its image
and header, and nearly every shard of the dataset is linked unchanged from the last output
(tasks/ingest/last_output.py), so most rows are never read. Those a new shard holds are read
from the last output's shards, else from their cache entries (or, if an entry is gone, the
file is processed again here).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from tasks.ingest.reader import FileResult

ImageSource = Callable[[FileResult], "np.ndarray | None"]
HeaderSource = Callable[[FileResult], "str | None"]


class RowImages:
    """The ingested results in row order: images indexed like an (N, 2, r, c) array, headers.

    Args:
        results: the ingested results (no quarantined ones), in dataset row order.
        shape: the shape of one image, (2, rows, cols).
        load: the full result (image and header) of a result that came without them.
    """

    def __init__(self, results: Sequence[FileResult], shape: tuple[int, int, int],
                 load: Callable[[FileResult], FileResult]) -> None:
        self.results = list(results)
        self.shape = (len(self.results), *shape)
        self.dtype = np.dtype(np.float16)
        self._load = load
        self._loaded: dict[int, FileResult] = {}
        self._images: ImageSource | None = None
        self._headers: HeaderSource | None = None

    def prefer(self, images: ImageSource, headers: HeaderSource) -> None:
        """Try these first for a result without its image or header (the last output)."""
        self._images, self._headers = images, headers

    def _full(self, row: int) -> FileResult:
        if row not in self._loaded:
            self._loaded[row] = self._load(self.results[row])
        return self._loaded[row]

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, row: int) -> np.ndarray:
        result = self.results[int(row)]
        image = result.image
        if image is None and self._images is not None:
            image = self._images(result)
        if image is None:
            image = self._full(int(row)).image
        image = np.asarray(image, dtype=np.float16)
        if image.shape != self.shape[1:]:
            raise ValueError(f"image of row {row} has shape {image.shape}, the dataset's "
                             f"images are {self.shape[1:]}")
        return image

    def header(self, row: int) -> str:
        """The de-identified header (DICOM JSON) of a row."""
        result = self.results[row]
        header = result.header
        if header is None and self._headers is not None:
            header = self._headers(result)
        if header is None:
            header = self._full(row).header
        if header is None:
            raise ValueError(f"row {row} has no header")
        return header

    def rows(self, start: int, end: int) -> np.ndarray:
        """Rows ``start:end`` as one float16 array."""
        out = np.empty((end - start, *self.shape[1:]), dtype=np.float16)
        for k in range(start, end):
            out[k - start] = self[k]
        return out

    def headers(self, start: int, end: int) -> list[str]:
        """The headers of rows ``start:end``."""
        return [self.header(k) for k in range(start, end)]

    def entries(self, start: int, end: int) -> list[str | None]:
        """The cache entries of rows ``start:end`` (None where a row has none)."""
        return [r.cache_entry for r in self.results[start:end]]

    def signature(self, start: int, end: int) -> str | None:
        """What rows ``start:end`` are, as the cache names them: the digest of their entries.

        The same digest means the same images and headers (an entry's key covers the file's
        bytes, the settings, the key and the code). None when a row has no cache entry (the
        cache is off, or the file changed while it was read).
        """
        entries = [r.cache_entry or "" for r in self.results[start:end]]
        if not all(entries):
            return None
        return hashlib.sha256("\0".join(entries).encode("ascii")).hexdigest()

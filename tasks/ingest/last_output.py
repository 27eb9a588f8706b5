"""The shards of the last output, as the next night may reuse them.

Why: a night with a few new files rewrites only the shards they fall in; every other shard
holds the same rows as last night (the same cache entries, in the same order), so its files
(images and headers) are hard-linked, not written. A shard that must be written mostly holds
last night's rows too; their images and headers are read from the old shards (images
memory-mapped) rather than from their cache entries.

A file of the last output is trusted while it has the size, mtime and inode it had when ingest
wrote it (recorded in the cache); with another stat (a DVC checkout, a copy, an edit) it is
trusted only if its MD5 is still the recorded one, else its rows come from the cache entries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts.dataset import HEADERS_DIR, IMAGES_DIR
from tasks.ingest.cache import file_md5, stored_stat
from tasks.ingest.images import RowImages
from tasks.ingest.reader import FileResult


class LastShards:
    """The last output's shards: whole ones to link, and single rows to read.

    Args:
        output: the output folder (still the last run's while this run writes its own).
        written: the cache index's record of the shards the last run wrote, by signature:
            ``entries`` and per kind (``images``, ``headers``) ``file``, ``md5``, ``stat``
            (tasks/ingest/cache.py: ``written_shards``).
    """

    def __init__(self, output: Path, written: dict[str, dict[str, Any]]) -> None:
        self.output = Path(output)
        self.written = written
        self._stat: dict[tuple[str, str], list[int]] = {}
        self._md5: dict[tuple[str, str], str] = {}
        self._where: dict[str, tuple[dict[str, str], int]] = {}  # entry -> files, row
        for shard in written.values():
            files: dict[str, str] = {}
            for kind, stored in shard.items():
                if isinstance(stored, dict):
                    files[kind] = str(stored.get("file"))
                    self._stat[kind, files[kind]] = list(stored.get("stat") or [])
                    self._md5[kind, files[kind]] = str(stored.get("md5"))
            for row, entry in enumerate(shard.get("entries") or []):
                self._where[entry] = (files, row)
        self._maps: dict[str, np.ndarray | None] = {}
        self._lines: dict[str, list[str] | None] = {}
        self._linked: set[tuple[str, str]] = set()

    def _unchanged(self, kind: str, name: str) -> str | None:
        """The file's path while it holds what ingest wrote, else None.

        By its stat first (nothing read); a file with another stat but the recorded size is
        hashed, and taken (its new stat remembered) when its MD5 is the recorded one. Why:
        DVC replaces an output's files with links to its cache on the first commit of the
        output and on every checkout; the bytes are the same, only the inode differs.
        """
        path = os.path.join(self.output, kind, name)
        recorded = self._stat.get((kind, name))
        now = stored_stat(path)
        if not recorded or now is None:
            return None
        if list(now) == recorded:
            return path
        if now[0] == recorded[0] and file_md5(path) == self._md5.get((kind, name)):
            self._stat[kind, name] = list(now)
            return path
        return None

    def linked_stat(self, kind: str, name: str) -> list[int] | None:
        """The stat of a file :meth:`shard` handed out for linking (a link has the same)."""
        return self._stat.get((kind, name)) if (kind, name) in self._linked else None

    def shard(self, kind: str, images: RowImages, start: int, end: int) -> str | None:
        """The last output's ``kind`` file of exactly rows ``start:end``, while unchanged."""
        found = (self.written.get(images.signature(start, end) or "") or {}).get(kind) or {}
        name = str(found.get("file"))
        path = self._unchanged(kind, name) if found else None
        if path is not None:
            self._linked.add((kind, name))
        return path

    def image(self, result: FileResult) -> np.ndarray | None:
        """A row's image from the last output's shard that holds it, or None."""
        where = self._where.get(result.cache_entry or "")
        name = where[0].get(IMAGES_DIR) if where else None
        if where is None or name is None:
            return None
        row = where[1]
        if name not in self._maps:
            path = self._unchanged(IMAGES_DIR, name)
            try:
                self._maps[name] = None if path is None else np.load(path, mmap_mode="r")
            except (OSError, ValueError):
                self._maps[name] = None
        array = self._maps[name]
        if array is None or row >= len(array):
            return None
        return np.array(array[row])

    def header(self, result: FileResult) -> str | None:
        """A row's header from the last output's header shard that holds it, or None."""
        where = self._where.get(result.cache_entry or "")
        name = where[0].get(HEADERS_DIR) if where else None
        if where is None or name is None:
            return None
        if name not in self._lines:
            path = self._unchanged(HEADERS_DIR, name)
            try:
                self._lines[name] = (None if path is None else
                                     Path(path).read_text(encoding="utf-8").splitlines())
            except (OSError, UnicodeDecodeError):
                self._lines[name] = None
        lines = self._lines[name]
        return lines[where[1]] if lines is not None and where[1] < len(lines) else None

"""Incremental ingest: a per-file cache of validated, de-identified, normalised results.

Why: a hospital archive grows by a few percent a night; reading, decoding and de-identifying
every file again costs the whole ingest time, while the result of one file depends only on
things the cache can name. A file's result is reused exactly when all of these are unchanged:

- the file's bytes (MD5, as DVC hashes the archive; read again only when the file's size,
  mtime, ctime or inode changed since the last run, as DVC's own state database does),
- its path below the archive (reasons are cleaned of path parts) and the archive's path,
- the ingest settings that shape a file's result (image size, intensity percentile),
- the pseudonymisation key (by a keyed fingerprint, never the key),
- the code (the bytes of tasks/ingest/*.py and the versions of the libraries that read,
  decode and de-identify),
- the labels row of the file's study (or that there is none): a changed row reprocesses the
  files of that study only.

Everything else (duplicates, splits, the report) is computed from all results every run, so
an incremental run writes exactly the dataset a full run writes.

Layout (``ingest.cache``, default ``cache/ingest`` beside the output; never versioned, kept
between runs, outside the folder DVC replaces):
    entries/<ab>/<key>.pkl  one pickled FileResult per file and context, with its path and
                            original StudyInstanceUID removed; the meta names the study by a
                            keyed digest. Pickle: the whole result object, whatever fields it
                            has. Trusted local data, written only by this module; never
                            copy a cache in from elsewhere.
    pack.pkl                the last successful run's entries without their images and
                            headers, in one file: a night reads this (one small file) instead
                            of every entry; an image or header is read from its entry only
                            when the shard it belongs to must be written again and the last
                            output's copy of it cannot be trusted.
    index.json              the last successful run's files: keyed path id -> stat, MD5,
                            entry. The pending run's index and pack (*.pending.*) replace
                            them only after the dataset was written.
    shards.json             the dataset shards the last successful run wrote, by the digest
                            of the entries they hold: the entries, and per kind (images,
                            headers) file, MD5 and stat (size, mtime, inode), so an
                            unchanged shard is linked from the last output instead of
                            written and hashed again (tasks/ingest/last_output.py).
    in-process.json         present only while a run processes its few new files in its own
                            process (``ingest.pool_min_files``), by keyed path id. Found by
                            the next run, it means that run died there (a decoder crash, the
                            OOM killer): the next run processes in worker processes, where a
                            crash costs one file (quarantined) and not the run.
No identity is stored: paths, UIDs and labels appear only as keyed digests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from tasks.config import IngestConfig
from tasks.ingest.errors import IngestError
from tasks.ingest.labels import LabelTable, row_content
from tasks.ingest.parallel import CRASH_REASON
from tasks.ingest.pseudonym import Pseudonymizer, PseudonymKey
from tasks.ingest.reader import FileResult, process_file

log = logging.getLogger("synthdx.ingest")

CACHE_VERSION = 1
INDEX_NAME = "index.json"
PENDING_NAME = "index.pending.json"
PACK_NAME = "pack.pkl"
SHARDS_NAME = "shards.json"
PENDING_PACK_NAME = "pack.pending.pkl"
JOURNAL_NAME = "in-process.json"
ENTRIES = "entries"
# Libraries whose behaviour shapes a file's result (reading, decoding, de-identifying, pixels).
_LIBRARIES = ("pydicom", "numpy", "dicom-anonymizer", "pylibjpeg", "pylibjpeg-libjpeg",
              "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "python-gdcm")
# Results that may be transient (a worker killed, memory, I/O): tried again next run.
_TRANSIENT = (CRASH_REASON, "file is too large to process in memory", "unexpected error")

Stat = tuple[int, int, int, int]


def file_stat(path: str | Path) -> Stat | None:
    """Size, mtime, ctime and inode: the file is taken as unchanged while all four are."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def file_md5(path: Path) -> str | None:
    """MD5 of the file's bytes (DVC's hash), or None when it cannot be read."""
    try:
        with Path(path).open("rb") as fh:
            return hashlib.file_digest(fh, "md5").hexdigest()
    except OSError:
        return None


@dataclass
class TracedResult(FileResult):
    """A worker's result plus what the cache needs to file it (memory only, never stored)."""

    study_uid: str = field(default="", repr=False)
    md5: str | None = None
    stat: Stat | None = None
    settled: bool = False  # the file did not change while it was read


_FIELDS = tuple(f.name for f in fields(FileResult) if f.init)


def plain(result: FileResult) -> FileResult:
    """The result as a plain FileResult with every field it has (fields added later too)."""
    return FileResult(**{name: getattr(result, name) for name in _FIELDS})


def _study_uid(path: Path) -> str:
    """The file's StudyInstanceUID, as the reader sees it ("" when there is none)."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # not DICOM, corrupt: the reader's own fallback is "" as well
        return ""


def process_chunk_traced(source: str, relpaths: list[str]) -> list[FileResult]:
    """The pool task: each file's result, its MD5 and stat, and its study (in the worker).

    The stat is taken before and after reading; a file that changed meanwhile (an export
    still writing it) is processed but not cached.
    """
    out: list[FileResult] = []
    for relpath in relpaths:
        path = Path(source) / relpath
        before = file_stat(path)
        md5 = file_md5(path)
        result = process_file(relpath)
        uid = result.label_uid if result.label_uid is not None else _study_uid(path)
        traced = TracedResult(**{f.name: getattr(result, f.name)
                                 for f in fields(FileResult) if f.init})
        traced.study_uid, traced.md5, traced.stat = uid, md5, before
        traced.settled = before is not None and md5 is not None and file_stat(path) == before
        out.append(traced)
    return out


def chunk_task(source: Path) -> partial[list[FileResult]]:
    """The picklable pool task for an archive."""
    return partial(process_chunk_traced, str(source))


def cache_folder(cfg: IngestConfig) -> Path:
    """``ingest.cache``, or ``cache/ingest`` beside the output folder."""
    if cfg.cache is not None:
        return Path(cfg.cache)
    return Path(cfg.output).parent / "cache" / "ingest"


def code_fingerprint() -> str:
    """The ingest code's bytes and the versions of the libraries that shape a result."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{name}={version}\0".encode())
    return digest.hexdigest()


_READ: dict[Path, tuple[Stat, dict[str, Any]]] = {}


def _read_json(path: Path) -> dict[str, Any] | None:
    """A cache index, parsed once per version of the file (a run reads each several times).

    Callers must not change what it returns.
    """
    stat = file_stat(path)
    if stat is None:
        return None
    known = _READ.get(path)
    if known is not None and known[0] == stat:
        return known[1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return None
    if len(_READ) > 4:  # a run reads two files (index and pending); a test, many projects
        _READ.clear()
    _READ[path] = (stat, data)  # replaced files get a new inode (_write_json): never stale
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    tmp.replace(path)


def check_removed(cfg: IngestConfig, files: list[str], key: PseudonymKey) -> None:
    """Refuse an archive that lost more than ``ingest.max_removed_fraction`` of its files.

    Compared with the last successful run's index (no index: nothing to compare). Runs
    before anything is written, so the dataset, quarantine and cache stay as they were.

    Raises:
        IngestError: naming the archive, the counts and how to proceed on purpose.
    """
    index = _read_json(cache_folder(cfg) / INDEX_NAME)
    if index is None or not index.get("files"):
        return
    names = Pseudonymizer(key)
    before = index["files"]
    if index.get("key") == names.digest("cache-key"):
        now = {names.file_id(p) for p in files}
        removed = sum(1 for f in before if f not in now)
    else:  # another key: paths cannot be matched, so compare counts
        removed = max(0, len(before) - len(files))
    if removed > cfg.max_removed_fraction * len(before):
        raise IngestError(
            f"archive {cfg.source} lost {removed} of the {len(before)} files the last ingest "
            f"read ({removed / len(before):.0%}, more than ingest.max_removed_fraction = "
            f"{cfg.max_removed_fraction:g}); now {len(files)} files. Is the archive fully "
            f"mounted? Nothing was changed. If the files were removed on purpose, run once "
            f"with --set ingest.max_removed_fraction=1"
        )


@dataclass
class _Labels:
    """The labels as the cache compares them: study digest -> (UID, row-state digest)."""

    by_ref: dict[str, tuple[str, str]]
    absent: str


class IngestCache:
    """The cache of one run: look results up, file new ones, commit the index on success."""

    def __init__(self, cfg: IngestConfig, key: PseudonymKey, labels: LabelTable) -> None:
        self.folder = cache_folder(cfg)
        self.enabled = cfg.incremental
        self.names = Pseudonymizer(key)
        self.source = Path(cfg.source)
        context = {
            "version": CACHE_VERSION,
            "settings": [cfg.image_rows, cfg.image_cols, cfg.intensity_percentile],
            "source": self.names.digest("cache-source", str(self.source.resolve())),
            "key": self.names.digest("cache-key"),
            "code": code_fingerprint(),
        }
        self.context = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()
        self.key_id = context["key"]
        index = _read_json(self.folder / INDEX_NAME) if self.enabled else None
        self.previous: dict[str, dict[str, Any]] = (index or {}).get("files", {})
        self.labels = self._label_states(labels)
        self.files: dict[str, dict[str, Any]] = {}  # this run's index, built as files settle
        self.reused = 0
        self._pack: dict[str, tuple[dict[str, Any], FileResult]] | None = None
        self._stats: dict[str, Stat | None] = {}  # from changed(), for lookup()
        # A pending index left behind: that run died after filing entries it never committed;
        # this run's commit lists every entry to remove them.
        self.sweep = (self.folder / PENDING_NAME).exists()
        self.packed: dict[str, tuple[dict[str, Any], FileResult]] = {}  # this run's pack

    def _label_states(self, labels: LabelTable) -> _Labels:
        by_ref: dict[str, tuple[str, str]] = {}
        for uid, row in labels.rows.items():
            state = self.names.digest("cache-label", "row", repr(row_content(row)))
            by_ref[self.names.digest("cache-study", uid)] = (uid, state)
        for uid, problem in labels.problems.items():
            state = self.names.digest("cache-label", "problem", problem)
            by_ref[self.names.digest("cache-study", uid)] = (uid, state)
        return _Labels(by_ref, self.names.digest("cache-label", "absent"))

    def _study(self, uid: str) -> tuple[str | None, str | None]:
        """The study's digest and its labels state ((None, None): no study UID)."""
        if not uid:
            return None, None
        ref = self.names.digest("cache-study", uid)
        state = self.labels.by_ref.get(ref, ("", self.labels.absent))[1]
        return ref, state

    def _entry_path(self, entry: str) -> Path:
        return self.folder / ENTRIES / entry[:2] / f"{entry}.pkl"

    def _entry_key(self, file_id: str, md5: str) -> str:
        return hashlib.sha256(f"{self.context}\0{file_id}\0{md5}".encode()).hexdigest()

    def changed(self, relpaths: list[str]) -> int | None:
        """How many files are new or changed since the last run, by path and stat only.

        A quick first look (a stat per file) to decide, before the cached results are read,
        where the new files will be processed (:func:`tasks.ingest.pipeline.process`); a
        changed labels row is only seen by :meth:`lookup`. None: no usable last run.
        """
        if not self.enabled or not self.previous:
            return None
        count = 0
        source = os.fspath(self.source)
        for relpath in relpaths:
            known = self.previous.get(self.names.file_id(relpath))
            stat = self._stats[relpath] = file_stat(os.path.join(source, relpath))
            if known is None or list(known["stat"]) != list(stat or ()):
                count += 1
        return count

    def died_in_process(self) -> bool:
        """Whether the last run died while processing files in its own process."""
        return (self.folder / JOURNAL_NAME).exists()

    @contextmanager
    def in_process(self, relpaths: list[str]) -> Iterator[None]:
        """Journal the files processed in this process while it happens (see the layout).

        The journal is removed when the block ends, with or without a Python exception: only
        a process that dies leaves it behind.
        """
        _write_json(self.folder / JOURNAL_NAME, {
            "version": CACHE_VERSION, "files": [self.names.file_id(p) for p in relpaths]})
        try:
            yield
        finally:
            (self.folder / JOURNAL_NAME).unlink(missing_ok=True)

    def clear_journal(self) -> None:
        """Forget a dead run's journal (its files were processed in worker processes)."""
        (self.folder / JOURNAL_NAME).unlink(missing_ok=True)

    def _packed(self, entry: str) -> tuple[dict[str, Any], FileResult] | None:
        """An entry from the last run's pack (read on first use), or None."""
        if self._pack is None:
            self._pack = {}
            if self.previous:
                try:
                    with (self.folder / PACK_NAME).open("rb") as fh:
                        pack = pickle.load(fh)
                    if isinstance(pack, dict):
                        self._pack = pack
                except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                        AttributeError):
                    pass  # each entry is read from its own file instead
        return self._pack.get(entry)

    def lookup(self, relpath: str) -> FileResult | None:
        """The cached result of a file, or None when it must be processed.

        A result from the pack comes without its image (``image`` None, ``cache_entry``
        set): :func:`cached_image` reads it if the dataset needs it.
        """
        if not self.enabled:
            return None
        file_id = self.names.file_id(relpath)
        known = self.previous.get(file_id)
        if known is None:
            return None
        # The stat changed() took moments ago (taken once per file); the MD5 below is read
        # only when it differs from the last run's, as DVC does.
        stat = (self._stats.pop(relpath) if relpath in self._stats
                else file_stat(self.source / relpath))
        if stat is None:
            return None
        md5 = (known["md5"] if list(known["stat"]) == list(stat)
               else file_md5(self.source / relpath))
        if md5 is None:
            return None
        entry = self._entry_key(file_id, md5)
        found = self._packed(entry)
        if found is None:
            try:
                with self._entry_path(entry).open("rb") as fh:
                    found = pickle.load(fh)
            except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
                    AttributeError):
                return None
        meta, result = found
        uid = ""
        if meta["study"] is not None:
            uid, state = self.labels.by_ref.get(meta["study"], ("", self.labels.absent))
            if state != meta["label_state"]:
                return None
        self._pack_entry(entry, meta, result)
        result = plain(result)
        result.relpath = relpath
        result.label_uid = uid or None
        result.cache_entry = entry
        self.files[file_id] = {"stat": list(stat), "md5": md5, "entry": entry}
        self.reused += 1
        return result

    def store(self, result: FileResult) -> None:
        """File a freshly processed result (unless it may be transient or the file moved)."""
        if not isinstance(result, TracedResult) or result.md5 is None or result.stat is None:
            return
        file_id = self.names.file_id(result.relpath)
        entry = self._entry_key(file_id, result.md5)
        self.files[file_id] = {"stat": list(result.stat), "md5": result.md5,
                               "entry": entry if result.settled else None}
        if not self.enabled or not result.settled or (
                result.reason is not None and result.reason.startswith(_TRANSIENT)):
            self.files[file_id]["entry"] = None
            return
        study, state = self._study(result.study_uid)
        stored = plain(result)
        stored.relpath, stored.label_uid = "", None  # identity: never on disk
        meta = {"study": study, "label_state": state}
        stored.cache_entry = None
        self._pack_entry(entry, meta, stored)
        result.cache_entry = entry
        path = self._entry_path(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as fh:
            pickle.dump((meta, stored), fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)

    def _pack_entry(self, entry: str, meta: dict[str, Any], result: FileResult) -> None:
        """Keep an entry, without its image and header (most of its bytes), for the pack."""
        light = result
        if result.image is not None or result.header is not None:
            light = plain(result)
            light.image = light.header = None
        self.packed[entry] = (meta, light)

    def md5s(self, relpaths: list[str]) -> dict[str, str | None]:
        """The MD5 of each file this run saw (None where it could not be read)."""
        out: dict[str, str | None] = {}
        for relpath in relpaths:
            known = self.files.get(self.names.file_id(relpath))
            out[relpath] = known["md5"] if known else None
        return out

    def write_pending(self, archive: dict[str, Any]) -> None:
        """Write this run's index beside the last one; :func:`commit` makes it current.

        ``archive`` (the archive's version) rides along for the report (:func:`archive_info`).
        """
        _write_json(self.folder / PENDING_NAME, {
            "version": CACHE_VERSION, "key": self.key_id, "archive": archive,
            "reused": self.reused, "files": self.files, "sweep": self.sweep})
        if not self.enabled:
            return
        tmp = self.folder / f".{PENDING_PACK_NAME}.tmp-{os.getpid()}"
        with tmp.open("wb") as fh:
            pickle.dump(self.packed, fh, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(self.folder / PENDING_PACK_NAME)


def pending_run(cfg: IngestConfig) -> dict[str, Any]:
    """What the pending run recorded: ``archive`` (its version) and ``reused`` (a count)."""
    index = _read_json(cache_folder(cfg) / PENDING_NAME) or {}
    return {"archive": index.get("archive"), "reused": int(index.get("reused", 0))}


def cached_result(cfg: IngestConfig, entry: str) -> FileResult | None:
    """The whole result of a cache entry (image and header too), or None.

    None when the entry is gone, unreadable or incomplete.
    """
    path = cache_folder(cfg) / ENTRIES / entry[:2] / f"{entry}.pkl"
    try:
        with path.open("rb") as fh:
            _meta, result = pickle.load(fh)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(getattr(result, "image", None), np.ndarray) or not isinstance(
            getattr(result, "header", None), str):
        return None
    return result


Stored = tuple[int, int, int]


def stored_stat(path: str | Path) -> Stored | None:
    """Size, mtime and inode of an output file (its ctime changes when it is linked)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def written_shards(cfg: IngestConfig) -> dict[str, dict[str, Any]]:
    """The shards the last successful run wrote, by the digest of their cache entries.

    Each: ``entries`` (its rows' cache entries, in order) and per kind (``images``,
    ``headers``: the folders in the output) ``file``, ``md5`` and ``stat``
    (:func:`stored_stat` when it was written). A shard is only reused while its file still
    has that stat: a checkout or an edit of the output gives it another one.
    """
    record = _read_json(cache_folder(cfg) / SHARDS_NAME) if cfg.incremental else None
    shards = (record or {}).get("shards")
    return shards if isinstance(shards, dict) else {}


def commit(cfg: IngestConfig, shards: dict[str, dict[str, Any]] | None = None) -> None:
    """After the dataset was written: the pending index becomes current, unused entries go.

    Args:
        cfg: the ingest settings (where the cache is).
        shards: the dataset's image shards as written (see :func:`written_shards`).
    """
    folder = cache_folder(cfg)
    pending = folder / PENDING_NAME
    index = _read_json(pending)
    if index is None:
        return
    last = _read_json(folder / INDEX_NAME)
    # Either order is safe: a shard is reused only by its entries and its file's stat.
    _write_json(folder / SHARDS_NAME, {"version": CACHE_VERSION, "shards": shards or {}})
    pending.replace(folder / INDEX_NAME)
    pack = folder / PENDING_PACK_NAME
    if pack.exists():
        pack.replace(folder / PACK_NAME)
    else:
        (folder / PACK_NAME).unlink(missing_ok=True)
    used = {e["entry"] for e in index["files"].values() if e.get("entry")}
    if last is not None and not index.get("sweep"):
        # Only the last run's entries that this run no longer uses: listing every entry
        # costs more than a night's work on a large archive.
        gone = {e.get("entry") for e in last.get("files", {}).values()} - used - {None}
        for entry in gone:
            (folder / ENTRIES / entry[:2] / f"{entry}.pkl").unlink(missing_ok=True)
        return
    for path in (folder / ENTRIES).glob("*/*.pkl"):  # first run, or after a dead one
        if path.stem not in used:
            path.unlink(missing_ok=True)

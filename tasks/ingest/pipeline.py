"""The ingest stage as plain functions: prepare, process, write (MLflow is in tracking.py).

``run_ingest`` chains them; flows/ingest.py wires the same steps as Prefect tasks. Inputs are
checked before any file is read, so a wrong path, labels file or missing key fails in a
second with a message that says what to fix, and the previous output is never touched by a
run that fails.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import pandas as pd

from tasks.artifacts.dvc_hash import file_md5
from tasks.config import IngestConfig
from tasks.ingest.cache import (
    IngestCache,
    cache_folder,
    cached_result,
    check_removed,
    chunk_task,
    commit,
    pending_run,
    plain,
)
from tasks.ingest.errors import IngestError
from tasks.ingest.images import RowImages
from tasks.ingest.labels import load_labels
from tasks.ingest.outputs import write_dataset
from tasks.ingest.parallel import PoolStart, resolve_workers, run_here, run_pool
from tasks.ingest.provenance import verified_phantom
from tasks.ingest.pseudonym import Pseudonymizer, resolve_key
from tasks.ingest.quarantine import report_entries, write_quarantine
from tasks.ingest.reader import FileResult, WorkerContext, WorkerSettings, decoded_pixels
from tasks.ingest.result import SPLITS, Assembled, IngestPlan, IngestResult
from tasks.ingest.split import assign_splits

log = logging.getLogger("synthdx.ingest")
P = ParamSpec("P")
R = TypeVar("R")

BASE_COLUMNS = (
    "index", "pseudo_id", "study_uid", "site", "split", "perugini_grade", "amyloid",
    "metastasis", "sex", "age", "weight_kg", "pixel_mm", "counts_anterior", "counts_posterior",
    "intensity_reference", "tracer", "manufacturer", "model", "transfer_syntax", "view_source",
)
_BOOL_EXTRAS = ("superscan", "degenerative", "injection_site", "urine_contamination", "fracture")


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = outer.resolve(), inner.resolve()
    return inner == outer or outer in inner.parents


def list_files(source: Path, labels: Path | None = None) -> list[str]:
    """Every regular file below ``source`` (but the labels file), as sorted relative paths."""
    skip = labels.resolve() if labels is not None and labels.exists() else None
    found: list[str] = []
    # Directory entries answer is_file() mostly without a stat, and only a file named like the
    # labels file is resolved: a nightly run lists the whole archive. Symlinked folders are
    # not entered (as before); an unreadable folder raises OSError.
    # Paths stay strings here (pathlib costs more than the scan on a large archive).
    pending = [(os.fspath(source), "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, f"{prefix}{entry.name}/"))
                elif entry.is_file() and not (skip is not None and entry.name == skip.name
                                              and Path(entry.path).resolve() == skip):
                    found.append(prefix + entry.name)
    return sorted(found)


def _collect_less(step: Callable[P, R]) -> Callable[P, R]:
    """Run an ingest step with Python's cyclic garbage collector triggered less often.

    Why: a step builds tens of thousands of long-lived objects (one result, record and
    header per file) and few cycles; at the default threshold the collector walks all of
    them again and again: 10-75 ms per nightly run on a 2,200-file archive, a sixth of the
    run. The threshold is put back when the step ends.
    """
    @functools.wraps(step)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        threshold = gc.get_threshold()
        gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
        try:
            return step(*args, **kwargs)
        finally:
            gc.set_threshold(*threshold)

    return run


@_collect_less
def prepare(cfg: IngestConfig) -> IngestPlan:
    """Check the inputs, read the labels, find the key and list the files.

    Raises:
        IngestError: naming the setting or file and what is wrong with it.
    """
    started = time.perf_counter()
    source = Path(cfg.source)
    if not source.is_dir():
        raise IngestError(f"source folder {source} does not exist (ingest.source / --source)")
    places = {"ingest.output": Path(cfg.output), "ingest.quarantine": Path(cfg.quarantine)}
    for name, path in places.items():
        if _contains(source, path) or _contains(path, source):
            raise IngestError(f"{name} ({path}) and ingest.source ({source}) must not contain "
                              "each other: the next run would ingest the outputs")
    if _contains(places["ingest.output"], places["ingest.quarantine"]) or _contains(
        places["ingest.quarantine"], places["ingest.output"]
    ):
        raise IngestError(f"ingest.quarantine ({cfg.quarantine}) must be outside ingest.output "
                          f"({cfg.output}): it holds identity and the output is versioned")
    cache = cache_folder(cfg)
    if _contains(source, cache) or _contains(places["ingest.output"], cache):
        raise IngestError(f"the ingest cache ({cache}, ingest.cache) must be outside "
                          f"ingest.source and ingest.output")
    labels = load_labels(Path(cfg.labels))
    key = resolve_key(cfg)
    try:
        files = list_files(source, Path(cfg.labels))
    except OSError as exc:
        raise IngestError(f"source folder {source} cannot be read: "
                          f"{exc.strerror or exc}") from None
    if not files:
        raise IngestError(f"source folder {source} holds no files")
    check_removed(cfg, files, key)
    return IngestPlan(cfg=cfg, files=files, labels=labels, key=key,
                      phantom=verified_phantom(Path(cfg.labels)), started=started)


def worker_context(plan: IngestPlan) -> WorkerContext:
    """What every worker process needs for the per-file work of this run."""
    cfg = plan.cfg
    return WorkerContext(
        source=Path(cfg.source), labels=plan.labels, key=plan.key,
        settings=WorkerSettings(cfg.image_rows, cfg.image_cols, cfg.intensity_percentile),
    )


@_collect_less
def process(plan: IngestPlan, workers: int | None = None) -> dict[str, FileResult]:
    """One result per file: from the cache where the file is unchanged, else processed.

    Files to process run in parallel worker processes, started while the cache is read;
    on a nightly run with at most ``ingest.pool_min_files`` new files they run in this
    process instead (a pool's start would cost more than they do), unless the last run died
    doing that (then a pool quarantines the file that killed it). Their results are filed in
    the cache (tasks/ingest/cache.py), and this run's index is written as pending (current
    once the dataset is written, see :func:`finish`).
    """
    cfg = plan.cfg
    cache = IngestCache(cfg, plan.key, plan.labels)
    n_workers = resolve_workers(cfg.workers if workers is None else workers)
    changed = cache.changed(plan.files)
    small = (changed is not None and changed <= cfg.pool_min_files
             and not cache.died_in_process())
    # Worker processes will be needed: they start now, beside the cache reads.
    early = PoolStart(n_workers, worker_context(plan)) if not small and changed != 0 else None
    results: dict[str, FileResult] = {}
    todo: list[str] = []
    try:
        for relpath in plan.files:
            hit = cache.lookup(relpath)
            if hit is None:
                todo.append(relpath)
            else:
                results[relpath] = hit
        task = chunk_task(Path(cfg.source))
        if todo and small and len(todo) <= cfg.pool_min_files:
            log.info("processing %d new or changed files in this process (ingest."
                     "pool_min_files = %d; %d unchanged files from the cache)",
                     len(todo), cfg.pool_min_files, cache.reused)
            try:
                with cache.in_process(todo):
                    fresh = run_here(todo, worker_context(plan), task=task)
            except Exception as exc:  # the pool's retries isolate whatever raised
                log.warning("processing in this process failed (%s: %s); using worker "
                            "processes", type(exc).__name__, exc)
                fresh = run_pool(todo, worker_context(plan), n_workers, task=task)
        elif todo:
            log.info("processing %d files with %d workers (%d unchanged files from the cache)",
                     len(todo), n_workers, cache.reused)
            fresh = run_pool(todo, worker_context(plan), n_workers, task=task, started=early)
            cache.clear_journal()
        else:
            fresh = {}
            log.info("all %d files unchanged: every result from the cache", len(plan.files))
        for relpath in todo:
            cache.store(fresh[relpath])
            results[relpath] = plain(fresh[relpath])
    finally:
        if early is not None:
            early.close()
    cache.write_pending(_archive(plan, cache.md5s(plan.files)))
    return results


def _archive(plan: IngestPlan, md5s: dict[str, str | None]) -> dict[str, Any]:
    """The archive version: DVC's hash of ``ingest.source``, as dvc.lock records it.

    Built from the MD5 of every file (the labels file too when it lies inside), which the
    cache already knows, so the archive is not read a second time.
    """
    source, labels = Path(plan.cfg.source), Path(plan.cfg.labels)
    listing = dict(md5s)
    if _contains(source, labels) and labels.is_file():
        listing[labels.resolve().relative_to(source.resolve()).as_posix()] = file_md5(labels)
    for relpath, md5 in listing.items():
        if md5 is None:
            listing[relpath] = _md5_or_none(source / relpath)
    if any(v is None for v in listing.values()):
        return {"dvc_hash": None, "files": len(listing)}
    entries = [{"md5": listing[r], "relpath": r} for r in sorted(listing)]
    payload = json.dumps(entries, sort_keys=True).encode("utf-8")
    return {"dvc_hash": hashlib.md5(payload, usedforsecurity=False).hexdigest() + ".dir",
            "files": len(listing)}


def _md5_or_none(path: Path) -> str | None:
    try:
        return file_md5(path)
    except OSError:
        return None


def _mark_duplicates(ordered: list[FileResult], source: Path, names: Pseudonymizer) -> None:
    """Quarantine later copies of an image already ingested (first in path order wins).

    The reason names the ingested file by its pseudonym, not its path (which may name the
    patient); the path itself goes to the quarantine's own reasons.json.
    """
    first: dict[str, FileResult] = {}
    for result in ordered:
        if not result.ok or result.fingerprint is None:
            continue
        original = first.get(result.fingerprint)
        if original is None:
            first[result.fingerprint] = result
            continue
        a, b = decoded_pixels(source / original.relpath), decoded_pixels(source / result.relpath)
        if a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b):
            result.reason = ("duplicate of an already ingested image "
                             f"({names.file_id(original.relpath)})")
            result.duplicate_of = original.relpath
            result.image = result.record = result.header = None


def _internal_site(plan: IngestPlan, sites: pd.Series) -> tuple[str, str]:
    """The site that is split into train/val/test, and where that choice came from."""
    present = sorted(sites.unique())
    if plan.cfg.internal_site:
        if plan.cfg.internal_site not in present:
            raise IngestError(
                f"ingest.internal_site is {plan.cfg.internal_site!r}, but no image of that site "
                f"was ingested (sites: {', '.join(present)})"
            )
        return plan.cfg.internal_site, "config"
    if plan.phantom and plan.phantom.internal_site in present:
        return str(plan.phantom.internal_site), "PHANTOM.json"
    counts = sites.value_counts()
    best = sorted(counts[counts == counts.max()].index)[0]
    return str(best), "most images"


def _manifest(records: list[dict[str, Any]], optional: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records)
    frame.insert(0, "index", np.arange(len(frame), dtype=np.int64))
    frame["split"] = ""
    extras = [c for c in optional if c not in BASE_COLUMNS]
    for column in [*BASE_COLUMNS, *extras]:
        if column not in frame.columns:
            frame[column] = None
    frame = frame[[*BASE_COLUMNS, *extras]]
    frame["perugini_grade"] = frame["perugini_grade"].astype(np.int64)
    frame["amyloid"] = frame["amyloid"].astype(bool)
    frame["metastasis"] = frame["metastasis"].astype(bool)
    for column in ("age", "weight_kg", "pixel_mm", "bmi"):
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    for column in _BOOL_EXTRAS:
        if column in frame.columns:
            frame[column] = frame[column].astype("boolean")
    if "lesion_count" in frame.columns:
        frame["lesion_count"] = frame["lesion_count"].astype("Int64")
    for column in ("sex", "tracer", "manufacturer", "model"):
        frame[column] = frame[column].astype("string")
    return frame


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(series.value_counts().items(), key=str)}


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before any detail."""
    return reason.split(":")[0].split(" (")[0].split("=")[0].strip()


def _full_result(plan: IngestPlan) -> Callable[[FileResult], FileResult]:
    """Reads a result's image and header from its cache entry, or processes the file again.

    Why the fallback: the pack said the entry exists, but a cache folder can be pruned by
    hand between runs; the file is still in the archive, and its result does not change.
    """
    def load(result: FileResult) -> FileResult:
        if result.image is not None and result.header is not None:
            return result
        full = cached_result(plan.cfg, result.cache_entry) if result.cache_entry else None
        if full is None:
            log.warning("a cached result is missing from %s; processing its file again",
                        cache_folder(plan.cfg))
            full = run_here([result.relpath], worker_context(plan))[result.relpath]
            if full.image is None or full.header is None:
                raise IngestError(f"{Path(plan.cfg.source) / result.relpath}: its cached "
                                  f"result is gone and processing it again failed "
                                  f"({full.reason})")
        return full

    return load


def assemble(plan: IngestPlan, results: dict[str, FileResult]) -> Assembled:
    """Order, de-duplicate, split and count the per-file results.

    Raises:
        IngestError: when no file could be used.
    """
    ordered = [results[p] for p in plan.files]
    names = Pseudonymizer(plan.key)
    _mark_duplicates(ordered, Path(plan.cfg.source), names)
    good = [r for r in ordered if r.ok]
    bad = [r for r in ordered if not r.ok]
    if not good:
        top = Counter(_reason_kind(r.reason or "") for r in bad).most_common(3)
        raise IngestError(
            f"no usable images in {plan.cfg.source}: all {len(ordered)} files were quarantined "
            f"(most common: {'; '.join(f'{k} x{n}' for k, n in top)}); copies and reasons are "
            f"in {plan.cfg.quarantine}"
        )
    manifest = _manifest([r.record for r in good if r.record is not None],
                         plan.labels.optional_columns)
    internal, internal_source = _internal_site(plan, manifest["site"])
    manifest["split"] = assign_splits(manifest, internal, plan.cfg.split).astype(str).to_numpy()
    images = RowImages(good, (2, plan.cfg.image_rows, plan.cfg.image_cols), _full_result(plan))
    matched = {r.label_uid for r in ordered if r.label_uid}
    label_uids = set(plan.labels.rows) | set(plan.labels.problems)
    label = manifest["amyloid"].map({True: "amyloid", False: "no-amyloid"}) + "/" + manifest[
        "metastasis"].map({True: "metastasis", False: "no-metastasis"})
    report: dict[str, Any] = {
        "files_total": len(ordered),
        "ingested": len(good),
        "quarantined": report_entries(names, bad),
        "quarantined_count": len(bad),
        "quarantine_reasons": dict(Counter(_reason_kind(r.reason or "") for r in bad)
                                   .most_common()),
        "patients": int(manifest["pseudo_id"].nunique()),
        "internal_site": internal,
        "internal_site_from": internal_source,
        "counts": {
            "site": _counts(manifest["site"]),
            "split": {s: int((manifest["split"] == s).sum()) for s in SPLITS},
            "site_split": {site: _counts(g["split"]) for site, g in manifest.groupby("site")},
            "patients_per_split": {s: int(manifest.loc[manifest["split"] == s, "pseudo_id"]
                                          .nunique()) for s in SPLITS},
            "perugini_grade": _counts(manifest["perugini_grade"]),
            "label": _counts(label),
            "site_label": {site: _counts(g) for site, g in label.groupby(manifest["site"])},
            "split_label": {s: _counts(g) for s, g in label.groupby(manifest["split"])},
            "view_source": _counts(manifest["view_source"]),
        },
        "labels": {
            "rows": plan.labels.n_rows,
            "studies": len(label_uids),
            "rows_without_image": len(label_uids - matched),
            "rows_without_study_uid": plan.labels.rows_without_study_uid,
            "invalid_studies": len(plan.labels.problems),
            "patient_id_differs_from_header": sum(r.patient_id_differs for r in good),
            "optional_columns": plan.labels.optional_columns,
            "unknown_columns": plan.labels.unknown_columns,
        },
        "transfer_syntaxes": dict(sorted(Counter(
            r.transfer_syntax for r in ordered if r.transfer_syntax).items())),
        # The archive version read (DVC's hash of ingest.source, as dvc.lock records it).
        "archive": pending_run(plan.cfg)["archive"],
    }
    return Assembled(images=images, manifest=manifest,
                     quarantined=bad, internal_site=internal,
                     internal_site_source=internal_source, report=report)


@_collect_less
def finish(plan: IngestPlan, results: dict[str, FileResult]) -> IngestResult:
    """Assemble and write; when nothing is usable, still write the quarantine, then fail."""
    try:
        assembled = assemble(plan, results)
    except IngestError:
        rejected = [results[p] for p in plan.files if not results[p].ok]
        write_quarantine(Path(plan.cfg.quarantine), Path(plan.cfg.source), rejected,
                         Pseudonymizer(plan.key))
        raise
    result = write_dataset(plan, assembled)
    result.reused = pending_run(plan.cfg)["reused"]
    archive = assembled.report.get("archive") or {}
    result.archive_digest = archive.get("dvc_hash")
    # The dataset is written: this run's cache index (and its shards) become the current ones.
    commit(plan.cfg, result.shards)
    return result


def run_ingest(cfg: IngestConfig, workers: int | None = None) -> IngestResult:
    """Prepare, process, assemble and write: the whole stage without MLflow or Prefect."""
    plan = prepare(cfg)
    return finish(plan, process(plan, workers))

"""Write the processed dataset and the quarantine, each atomically.

Processed output (versioned by DVC, logged to MLflow, no identity):
    images/             float16 (N, 2, rows, cols); channel 0 anterior, 1 posterior (as
                        displayed: posterior mirrored), intensity in [0, 1], in shards
                        (shards.json + <md5>.npy, cut by the rows' keyed file ids: a night's
                        new files rewrite only the shards they fall in; unchanged shards
                        are hard-linked from the last output). Read with
                        tasks.artifacts.dataset.open_images (memory-mapped).
    manifest.parquet    one row per image; ``index`` is the row in the image array.
    headers/            the de-identified DICOM header of every image (DICOM JSON model, no
                        pixel data), for audits: one JSON line per image, in shards cut like
                        the images' (shards.json + <md5>.jsonl; read them in order, or with
                        tasks.artifacts.dataset.read_headers).
    ingest_report.json  counts, quarantined files (named by their copies in the quarantine,
                        never by path) and reasons, label and split statistics. No timings:
                        the same input gives the same bytes, so a rerun keeps the DVC hash
                        and nothing downstream reruns (the time goes to MLflow and the CLI).
    montage.png         a few processed images per site with site / split / label captions.
    masks.npz           only with a matching ``ingest.truth`` folder (the phantom's): the true
                        finding masks, resampled like the images (tasks/ingest/truth.py).

Quarantine (never versioned: holds identity): see tasks/ingest/quarantine.py.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import dataset
from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.common.atomic import atomic_dir, atomic_write_text
from tasks.common.montage import write_montage
from tasks.common.stage_metrics import stage_metrics_path
from tasks.config import Config, IngestConfig
from tasks.ingest.cache import cache_folder, stored_stat, written_shards
from tasks.ingest.deid import DEID_METHOD, TABLE_VERSION
from tasks.ingest.errors import IngestError
from tasks.ingest.images import RowImages
from tasks.ingest.last_output import LastShards
from tasks.ingest.pseudonym import Pseudonymizer
from tasks.ingest.quarantine import REASONS_NAME, write_quarantine
from tasks.ingest.result import SPLITS, Assembled, IngestPlan, IngestResult
from tasks.ingest.truth import load_masks

REPORT_NAME = "ingest_report.json"
METRICS_NAME = "ingest_metrics.json"


def _strict_error(plan: IngestPlan, assembled: Assembled) -> IngestError:
    """The strict-mode failure; files are named by their quarantine copies (no paths)."""
    entries = assembled.report["quarantined"]
    shown = "; ".join(f"{e['file']}: {e['reason']}" for e in entries[:3])
    more = len(entries) - 3
    return IngestError(
        f"strict mode: {len(entries)} of {assembled.report['files_total']} files "
        f"were quarantined ({shown}{f'; and {more} more' if more > 0 else ''}). The previous "
        f"output in {plan.cfg.output} is unchanged; the copies are in {plan.cfg.quarantine}, "
        f"their original paths and reasons in {Path(plan.cfg.quarantine) / REASONS_NAME}"
    )


def write_dataset(plan: IngestPlan, assembled: Assembled) -> IngestResult:
    """Write quarantine and processed output; return the run's summary.

    Raises:
        IngestError: in strict mode when any file was quarantined (the output is untouched).
    """
    cfg = plan.cfg
    write_quarantine(Path(cfg.quarantine), Path(cfg.source), assembled.quarantined,
                     Pseudonymizer(plan.key))
    if cfg.strict and assembled.quarantined:
        raise _strict_error(plan, assembled)
    output = Path(cfg.output)
    # The images are the files that were not quarantined, in the plan's order (assemble).
    rejected = {r.relpath for r in assembled.quarantined}
    kept = [p for p in plan.files if p not in rejected]
    masks, truth = (load_masks(cfg.truth, Path(cfg.labels), kept, *assembled.images.shape[2:])
                    if len(kept) == len(assembled.images) else
                    (None, {"masks": False, "why": "images and files do not line up"}))
    report = {
        "generator": "synthdx ingest",
        **assembled.report,
        "image": {"shape": list(assembled.images.shape[1:]), "dtype": "float16",
                  "channels": ["anterior", "posterior"], "intensity_percentile":
                  cfg.intensity_percentile, "intensity_at_percentile": 0.5},
        "deidentification": {"method": list(DEID_METHOD), "table": TABLE_VERSION,
                             "dicom_anonymizer": metadata.version("dicom-anonymizer"),
                             "key": plan.key.origin},
        "strict": cfg.strict,
        "truth": truth,
    }
    images = assembled.images
    names = Pseudonymizer(plan.key)
    bounds = dataset.shard_bounds([names.file_id(r.relpath) for r in images.results],
                                  int(np.prod(images.shape[1:])) * images.dtype.itemsize)
    last = LastShards(output, written_shards(cfg))
    images.prefer(last.image, last.header)

    with atomic_dir(output) as tmp:
        shards = _write_shards(tmp, images, bounds, last)
        assembled.manifest.to_parquet(tmp / dataset.MANIFEST_FILE, index=False)
        if masks is not None:
            dataset.write_masks(tmp, masks)
        # Named by the shown rows' cache entries, a night's unchanged picture is copied
        # without reading an image; a new one reads its rows from the shards just written.
        write_montage(dataset.open_images(tmp), assembled.manifest, tmp / "montage.png",
                      cache=cache_folder(cfg) if cfg.incremental else None,
                      row_keys=images.entries(0, len(images)))
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    # The shards' MD5s came from memory as they were written (or with the links).
    known = {f"{kind}/{s.file}": s.md5 for kind, per_kind in shards.items() for s in per_kind}
    manifest = assembled.manifest
    return IngestResult(
        output=output,
        quarantine=Path(cfg.quarantine),
        report_path=output / REPORT_NAME,
        files_total=report["files_total"],
        ingested=report["ingested"],
        quarantined=len(assembled.quarantined),
        splits={s: int((manifest["split"] == s).sum()) for s in SPLITS},
        sites=report["counts"]["site"],
        internal_site=assembled.internal_site,
        digest=dvc_dir_hash(output, known),
        elapsed_seconds=round(time.perf_counter() - plan.started, 3),
        key_origin=plan.key.origin,
        manifest_dtypes={str(k): v.kind for k, v in manifest.dtypes.items()},
        shards=_shard_records(output, images, bounds, shards, last),
    )


def _write_shards(folder: Path, images: RowImages, bounds: list[tuple[int, int]],
                  last: LastShards) -> dict[str, list[dataset.StoredShard]]:
    """Write (or link from the last output) the image and header shards, by kind."""
    return {
        dataset.IMAGES_DIR: dataset.write_image_shards(
            folder, images.shape, bounds, images.rows,
            lambda start, end: last.shard(dataset.IMAGES_DIR, images, start, end)),
        dataset.HEADERS_DIR: dataset.write_header_shards(
            folder, bounds, images.headers,
            lambda start, end: last.shard(dataset.HEADERS_DIR, images, start, end)),
    }


def _shard_records(output: Path, images: RowImages, bounds: list[tuple[int, int]],
                   shards: dict[str, list[dataset.StoredShard]], last: LastShards
                   ) -> dict[str, dict[str, Any]]:
    """What the next night may link instead of writing: each shard by what its rows are.

    Keyed by the digest of the rows' cache entries (none for a shard with a row that has no
    entry); each holds the entries and, per kind, the file's name, MD5 and stat as written.
    """
    def record(kind: str, shard: dataset.StoredShard) -> dict[str, Any]:
        stat = last.linked_stat(kind, shard.file) or stored_stat(output / kind / shard.file)
        return {"file": shard.file, "md5": shard.md5, "stat": list(stat or ())}

    records: dict[str, dict[str, Any]] = {}
    for k, (start, end) in enumerate(bounds):
        signature = images.signature(start, end)
        if signature is not None:
            records[signature] = {"entries": images.entries(start, end),
                                  **{kind: record(kind, per_kind[k])
                                     for kind, per_kind in shards.items()}}
    return records


def metrics_path(cfg: Config) -> Path | None:
    """Where this run's DVC metrics go: ``<reports_dir>/ingest_metrics.json``, or nowhere.

    Nowhere when the output was moved away from the project's (``--output DIR``) while
    ``reports_dir`` still is the project's: the project's metrics describe the project's
    dataset, and overwriting them makes DVC rerun the stage (see stage_metrics_path).
    """
    return stage_metrics_path(cfg.reports_dir, cfg.ingest.output,
                              IngestConfig.model_fields["output"].default, METRICS_NAME)


def write_metrics(path: Path, result: IngestResult) -> None:
    """Write the stage's DVC metrics file (dvc.yaml: reports/ingest_metrics.json).

    Counts only, no timings: ``dvc metrics diff`` should show data changes, not machine noise.
    """
    metrics = {
        "files_total": result.files_total,
        "ingested": result.ingested,
        "quarantined": result.quarantined,
        "images_per_split": result.splits,
        "images_per_site": result.sites,
    }
    atomic_write_text(Path(path), json.dumps(metrics, indent=1, sort_keys=True) + "\n")

"""The records passed between the ingest steps, and the run's result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.config import IngestConfig
from tasks.ingest.images import RowImages
from tasks.ingest.labels import LabelTable
from tasks.ingest.provenance import PhantomInfo
from tasks.ingest.pseudonym import PseudonymKey
from tasks.ingest.reader import FileResult

SPLITS = ("train", "val", "test", "external")


@dataclass
class IngestPlan:
    """Checked inputs of one run. Holds the key and the labels (identity): memory only."""

    cfg: IngestConfig
    files: list[str]
    labels: LabelTable
    key: PseudonymKey
    phantom: PhantomInfo | None
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Assembled:
    """The processed dataset in memory, before it is written."""

    images: RowImages  # images and headers, read lazily: most stay in the last output
    manifest: pd.DataFrame
    quarantined: list[FileResult]
    internal_site: str
    internal_site_source: str
    report: dict[str, Any]


@dataclass
class IngestResult:
    """What a finished ingest run produced; ``describe()`` is what the CLI prints."""

    output: Path
    quarantine: Path
    report_path: Path
    files_total: int
    ingested: int
    quarantined: int
    splits: dict[str, int]
    sites: dict[str, int]
    internal_site: str
    digest: str
    elapsed_seconds: float
    key_origin: str
    manifest_dtypes: dict[str, str] = field(default_factory=dict)  # column -> numpy kind
    mlflow_run_id: str | None = None
    # The DVC metrics file written, or None when the output is not the project's (see
    # tasks/common/stage_metrics.py); set by the flow after the dataset is written.
    metrics_path: Path | None = None
    # The archive version read: DVC's hash of ingest.source (dvc.lock's dependency hash).
    archive_digest: str | None = None
    # Files whose cached result was reused (incremental ingest, tasks/ingest/cache.py).
    reused: int = 0
    # The image shards written, by what their rows are (tasks/ingest/cache.py: the next
    # night links those it still needs from this output instead of writing them).
    shards: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """A short human summary: counts, time, output, quarantine, report and metrics paths.

        The time is here and in MLflow, never in the output: a rerun must give the same bytes.
        """
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items() if v)
        lines = [
            f"ingested {self.ingested} of {self.files_total} files into {self.output} "
            f"({splits}; {len(self.sites)} sites, internal: {self.internal_site}) "
            f"in {self.elapsed_seconds:.1f} s",
            (f"quarantined {self.quarantined} files into {self.quarantine} (reasons in the "
             "report; original paths only in the quarantine's reasons.json)")
            if self.quarantined else "quarantined 0 files",
            f"report: {self.report_path}",
            f"dataset version (DVC hash): {self.digest}",
            f"archive version (DVC hash of the source): {self.archive_digest or 'unknown'}; "
            f"{self.reused} of {self.files_total} files unchanged, reused from the cache",
            f"DVC metrics: {self.metrics_path}" if self.metrics_path else
            "DVC metrics: not written (the output is not the project's and reports_dir is; "
            "--set reports_dir=DIR writes them to DIR)",
        ]
        if self.mlflow_run_id:
            lines.append(f"MLflow run: {self.mlflow_run_id}")
        if self.key_origin == "demo":
            lines.append("pseudonyms made with the public demo key (phantom data only)")
        return "\n".join(lines)

"""Where a stage writes its DVC metrics file: beside the project's output, or not at all.

Why a rule: dvc.yaml declares ``reports/<stage>_metrics.json`` as the metrics of the stage
that writes the project's output (``data/processed``, ``data/audit``). A run told to write
elsewhere (``synthdx ingest --output /tmp/x``) that still wrote the project's metrics file
would overwrite numbers about data it did not produce, and DVC, seeing the file changed,
would rerun the stage on the next ``synthdx run``. So a stage writes only where it is told:

* output is the project's (the path dvc.yaml versions) -> ``<reports_dir>/<name>``;
* output moved, ``reports_dir`` moved too (``--set reports_dir=DIR``) -> ``DIR/<name>``;
* output moved, ``reports_dir`` is the project's -> no metrics file. Nothing is lost: the
  same numbers are in the report inside the output and in the stage's MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import Config

PROJECT_REPORTS_DIR = Path(Config.model_fields["reports_dir"].default)


def _same(a: Path | str, b: Path | str) -> bool:
    """Same place once made absolute (relative paths are relative to the project root)."""
    return Path(a).resolve() == Path(b).resolve()


def stage_metrics_path(reports_dir: Path | str, output: Path | str, project_output: Path | str,
                       name: str) -> Path | None:
    """The metrics file of a stage that writes ``output``, or None when it writes none.

    Args:
        reports_dir: the configured ``reports_dir``.
        output: the folder this run writes.
        project_output: the folder dvc.yaml versions for this stage (the config default).
        name: the metrics file's name (``ingest_metrics.json``).
    """
    if _same(output, project_output) or not _same(reports_dir, PROJECT_REPORTS_DIR):
        return Path(reports_dir) / name
    return None

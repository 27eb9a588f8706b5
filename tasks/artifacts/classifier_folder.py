"""One trained classifier's folder: what train_classifier hands to validate.

Layout of ``<classifier.output>/<task>/<regime>/seed<k>/``::

    model.pt             weights + constructor arguments + input size (models.module_file,
                         the format the registered pyfunc reads too)
    model.json           task, regime, seed, threshold (chosen on the internal validation
                         split), validation AUC, training-set composition, lineage, MLflow run
    predictions.parquet  one row per validation, internal test and external case: study_uid,
                         pseudo_id, site, split, sex, age, label, the findings (perugini_grade,
                         metastasis, superscan; NA where the archive does not record them),
                         score

No timings or timestamps in model.json: each ``<task>/<regime>`` folder is a DVC output, and a
value that changes between two runs of the same inputs would rerun validation (the timings are
MLflow metrics of the model's run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from models.classifier import ScanClassifier
from models.module_file import read_module_file, save_module_file
from tasks.artifacts.json_file import read_json_object

MODEL_FILE = "model.pt"
INFO_FILE = "model.json"
PREDICTIONS_FILE = "predictions.parquet"
SEED_GLOB = "*/*/seed*"
"""Model folders below the classifiers root: ``<task>/<regime>/seed<k>``."""
UNTRACKED_INFO_KEYS = ("seconds", "images_per_second", "created")
"""Keys that must never reach model.json (they differ between reruns of the same inputs)."""
REQUIRED_INFO_KEYS = ("task", "regime", "seed", "threshold")
"""What every reader of model.json relies on."""


class ModelInfoError(ValueError):
    """A model.json that cannot be used; the message names the file and the reason."""


def write_classifier_folder(folder: Path, module: ScanClassifier, info: dict[str, Any],
                            predictions: pd.DataFrame) -> None:
    """Write model.pt, model.json and predictions.parquet into ``folder`` (which must exist).

    Raises:
        ValueError: ``info`` carries a timing or timestamp (see ``UNTRACKED_INFO_KEYS``).
    """
    folder = Path(folder)
    leaked = [k for k in UNTRACKED_INFO_KEYS if k in info]
    if leaked:
        raise ValueError(f"model.json must not hold {leaked}: log them to MLflow instead")
    save_module_file(folder / MODEL_FILE, module, dict(module.hparams), info["image_size"])
    predictions.to_parquet(folder / PREDICTIONS_FILE, index=False)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_classifier(folder: Path) -> tuple[ScanClassifier, tuple[int, int]]:
    """Rebuild a trained classifier (eval mode) and its input size from its folder."""
    file = read_module_file(Path(folder) / MODEL_FILE)
    return file.build(ScanClassifier), file.image_size


def model_folders(root: Path) -> list[Path]:
    """Every ``<task>/<regime>/seed<k>/`` folder with a model.json under ``root``, sorted.

    Hidden folders (another process's temporary output) are skipped.
    """
    return [path.parent for path in sorted(Path(root).glob(f"{SEED_GLOB}/{INFO_FILE}"))
            if not any(part.startswith(".") for part in path.relative_to(root).parts)]


def read_model_info(path: Path) -> dict[str, Any]:
    """Read and check one model.json: the required keys, a finite threshold, an integer seed.

    Why checked here: a report or a registry entry built on a misread threshold or seed would
    be wrong without failing; every reader gets the same checks.

    Raises:
        ModelInfoError: missing, not JSON, not an object, or a required key missing or mistyped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelInfoError(f"{path}: missing (every model folder needs {INFO_FILE})")
    info = read_json_object(path, ModelInfoError)
    missing = [k for k in REQUIRED_INFO_KEYS if k not in info]
    if missing:
        raise ModelInfoError(f"{path}: missing key(s) {missing}")
    threshold = info["threshold"]
    if (isinstance(threshold, bool) or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)):
        raise ModelInfoError(f"{path}: threshold must be a finite number, got {threshold!r}")
    if isinstance(info["seed"], bool) or not isinstance(info["seed"], int):
        raise ModelInfoError(f"{path}: seed must be an integer, got {info['seed']!r}")
    return info


def read_model_infos(root: Path) -> list[dict[str, Any]]:
    """Every model.json under ``root`` (checked), each with ``path`` (its folder) added.

    Raises:
        ModelInfoError: one of them cannot be used.
    """
    infos = []
    for folder in model_folders(root):
        info = read_model_info(folder / INFO_FILE)
        info["path"] = str(folder)
        infos.append(info)
    return infos

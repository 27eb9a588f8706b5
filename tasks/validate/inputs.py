"""The validation stage's inputs: the training stage's model folders, checked and aligned.

Layout (written by train_classifier; file names from tasks.artifacts.classifier_folder)::

    <classifiers_root>/<task>/<regime>/seed<k>/predictions.parquet
    <classifiers_root>/<task>/<regime>/seed<k>/model.json

Every problem is a :class:`ValidationInputError` that names the file and the reason: a report
built on a silently skipped or misread model would compare the wrong things.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts import classifier_folder
from tasks.artifacts.classifier_folder import INFO_FILE as MODEL_FILE
from tasks.artifacts.classifier_folder import PREDICTIONS_FILE, ModelInfoError
from tasks.validate.findings import FINDING_COLUMNS

PREDICTION_COLUMNS = ("study_uid", "pseudo_id", "site", "split", "sex", "age", "label", "score")
SPLITS = ("val", "test", "external")
SEED_DIR = re.compile(r"^seed(\d+)$")


class ValidationInputError(ValueError):
    """An input that cannot be validated; the message names the path and the reason."""


@dataclass(frozen=True)
class ModelRun:
    """One trained classifier: its identity, its model.json and its predictions."""

    task: str
    regime: str
    seed: int
    path: Path
    info: dict[str, Any]
    predictions: pd.DataFrame = field(repr=False)
    predictions_sha256: str = ""

    @property
    def threshold(self) -> float:
        """Operating threshold chosen by the training stage on the internal validation split."""
        return float(self.info["threshold"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_predictions(path: Path) -> pd.DataFrame:
    """Read and check one ``predictions.parquet``; return it with normalised dtypes.

    Raises:
        ValidationInputError: missing or unreadable file, missing columns, duplicate
            ``study_uid``, labels other than 0/1, scores outside [0, 1], unknown splits.
    """
    if not path.is_file():
        raise ValidationInputError(f"{path}: missing (every model folder needs "
                                   f"{PREDICTIONS_FILE})")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ValidationInputError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValidationInputError(f"{path}: missing column(s) {missing}")
    if frame.empty:
        raise ValidationInputError(f"{path}: no rows")
    out = pd.DataFrame({
        "study_uid": frame["study_uid"].astype(str),
        "pseudo_id": frame["pseudo_id"].astype(str),
        "site": frame["site"].astype(str),
        "split": frame["split"].astype(str),
        "sex": frame["sex"].astype(str),
        "age": pd.to_numeric(frame["age"], errors="coerce").astype(np.float64),
    })
    if out["study_uid"].duplicated().any():
        dup = out.loc[out["study_uid"].duplicated(), "study_uid"].iloc[0]
        raise ValidationInputError(f"{path}: study_uid is not unique (e.g. {dup!r})")
    bad_split = sorted(set(out["split"]) - set(SPLITS))
    if bad_split:
        raise ValidationInputError(f"{path}: unknown split value(s) {bad_split}; "
                                   f"expected {list(SPLITS)}")
    label = pd.to_numeric(frame["label"], errors="coerce")
    if label.isna().any() or not label.isin([0, 1]).all():
        raise ValidationInputError(f"{path}: label must be 0 or 1 in every row")
    score = pd.to_numeric(frame["score"], errors="coerce").astype(np.float64)
    if not np.isfinite(score).all() or (score < 0).any() or (score > 1).any():
        raise ValidationInputError(f"{path}: score must be a probability in [0, 1] in every "
                                   "row (NaN, infinite or out-of-range values found)")
    out["label"] = label.astype(np.int64).to_numpy()
    out["score"] = score.to_numpy()
    for column in FINDING_COLUMNS:  # optional: what a positive shows (finding subgroups)
        if column in frame.columns:
            out[column] = pd.to_numeric(frame[column].astype("Float64"),
                                        errors="coerce").to_numpy(dtype=np.float64,
                                                                  na_value=np.nan)
    return out


def read_model_info(path: Path) -> dict[str, Any]:
    """One checked ``model.json`` (tasks.artifacts.classifier_folder), as a validation error."""
    try:
        return classifier_folder.read_model_info(path)
    except ModelInfoError as exc:
        raise ValidationInputError(str(exc)) from exc


def load_model(model_dir: Path) -> ModelRun:
    """Load one ``<task>/<regime>/seed<k>/`` folder; its identity must match its model.json."""
    model_dir = Path(model_dir)
    match = SEED_DIR.match(model_dir.name)
    if match is None:
        raise ValidationInputError(f"{model_dir}: a model folder must be named seed<k>")
    task, regime, seed = model_dir.parent.parent.name, model_dir.parent.name, int(match[1])
    info = read_model_info(model_dir / MODEL_FILE)
    found = (str(info["task"]), str(info["regime"]), int(info["seed"]))
    if found != (task, regime, seed):
        raise ValidationInputError(
            f"{model_dir / MODEL_FILE}: says task/regime/seed {found}, but the folder is "
            f"{(task, regime, seed)}")
    predictions_path = model_dir / PREDICTIONS_FILE
    predictions = read_predictions(predictions_path)
    return ModelRun(task=task, regime=regime, seed=seed, path=model_dir, info=info,
                    predictions=predictions, predictions_sha256=_sha256(predictions_path))


def discover_models(root: Path) -> list[ModelRun]:
    """Load every ``<task>/<regime>/seed<k>/`` folder under ``root`` (sorted; hidden skipped).

    Any subset of tasks, regimes and seeds is fine; none at all is an error. Hidden folders
    (``.name``) are skipped: they are another stage's temporary outputs.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValidationInputError(f"{root}: classifiers folder not found")
    models: list[ModelRun] = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if task_dir.name.startswith("."):
            continue
        for regime_dir in sorted(p for p in task_dir.iterdir() if p.is_dir()):
            if regime_dir.name.startswith("."):
                continue
            seed_dirs = [p for p in regime_dir.iterdir() if p.is_dir() and SEED_DIR.match(p.name)]
            for seed_dir in sorted(seed_dirs, key=lambda p: int(SEED_DIR.match(p.name)[1])):
                models.append(load_model(seed_dir))
    if not models:
        raise ValidationInputError(f"{root}: no model folders <task>/<regime>/seed<k>/ found")
    return models


@dataclass(frozen=True)
class TaskCases:
    """One task's held-out cases (test + external rows) with every model's score, aligned.

    ``cases`` is sorted by ``study_uid``; ``scores[(regime, seed)]`` is in the same row order,
    so any two models can be compared case by case.
    """

    task: str
    cases: pd.DataFrame
    scores: dict[tuple[str, int], np.ndarray]
    thresholds: dict[tuple[str, int], float]
    models: dict[tuple[str, int], ModelRun]

    @property
    def labels(self) -> np.ndarray:
        """Ground truth of every case (0/1)."""
        return self.cases["label"].to_numpy()


def align_task(models: list[ModelRun]) -> TaskCases:
    """Align one task's models on the held-out cases; they must share the same cases and labels.

    Validation rows are dropped here: they chose the threshold in the training stage and are
    not an independent test.
    """
    if not models:
        raise ValueError("align_task needs at least one model")
    tasks = {m.task for m in models}
    if len(tasks) != 1:
        raise ValueError(f"align_task got models of several tasks: {sorted(tasks)}")
    key_cols = ["study_uid", "site", "split", "label"]
    reference = None
    ref_model = models[0]
    scores: dict[tuple[str, int], np.ndarray] = {}
    for model in models:
        frame = model.predictions
        frame = frame[frame["split"] != "val"].sort_values("study_uid").reset_index(drop=True)
        if frame.empty:
            raise ValidationInputError(f"{model.path / PREDICTIONS_FILE}: no test or external "
                                       "rows to validate on")
        if reference is None:
            reference = frame
        else:
            same = (len(frame) == len(reference)
                    and frame[key_cols].equals(reference[key_cols]))
            if not same:
                raise ValidationInputError(
                    f"{model.path / PREDICTIONS_FILE}: its test/external cases (study_uid, site, "
                    f"split, label) differ from those of {ref_model.path / PREDICTIONS_FILE}; "
                    "every model of a task must be scored on the same cases")
        scores[(model.regime, model.seed)] = frame["score"].to_numpy(dtype=np.float64)
    assert reference is not None
    cases = reference.drop(columns=["score"])
    return TaskCases(task=ref_model.task, cases=cases, scores=scores,
                     thresholds={(m.regime, m.seed): m.threshold for m in models},
                     models={(m.regime, m.seed): m for m in models})

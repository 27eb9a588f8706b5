"""The trained diffusion model folder (``diffusion.output``): what training hands to synthesis.

Layout::

    model.pt            EMA weights + constructor arguments + image size + global step
                        (models.module_file: the format the registered pyfunc reads too)
    train_summary.json  the step, final loss and the MLflow run / registered version

No timings, timestamps or resume paths in train_summary.json: the folder is a DVC output, and
a value that differs between two runs of the same inputs would rerun every later stage (they
go to MLflow and the console).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.diffusion import DiffusionModule
from models.module_file import ModuleFile, read_module_file, save_module_file
from tasks.common.atomic import atomic_write_text

MODEL_NAME = "model.pt"
SUMMARY_NAME = "train_summary.json"

__all__ = ["MODEL_NAME", "SUMMARY_NAME", "ModelRef", "ModuleFile", "TrainRecord",
           "load_model", "load_trained", "model_ref", "read_module_file", "read_train_record",
           "write_model", "write_train_record"]


@dataclass(frozen=True)
class TrainRecord:
    """What train_summary.json says about the weights beside it.

    Attributes:
        global_step: training step of the weights.
        final_loss: last logged training loss (None when none was logged).
        mlflow_run_id: the training run, where timings and curves are.
        registered_model: ``{"name", "version", "model_uri"}`` when training registered it.
    """

    global_step: int
    final_loss: float | None
    mlflow_run_id: str | None = None
    registered_model: dict[str, str] | None = None


def write_model(folder: Path, module: DiffusionModule, image_size: tuple[int, int],
                global_step: int) -> None:
    """Write model.pt (the module's current, i.e. EMA, weights) into ``folder``."""
    save_module_file(Path(folder) / MODEL_NAME, module, dict(module.hparams), image_size,
                     global_step=int(global_step))


def write_train_record(folder: Path, record: TrainRecord) -> None:
    """Write train_summary.json into ``folder`` (atomically: it is rewritten on registration)."""
    atomic_write_text(Path(folder) / SUMMARY_NAME, json.dumps({
        "global_step": record.global_step, "final_loss": record.final_loss,
        "mlflow_run_id": record.mlflow_run_id,
        "registered_model": record.registered_model}, indent=2) + "\n")


def read_train_record(folder: Path) -> TrainRecord | None:
    """train_summary.json of ``folder``, or None when there is none.

    Raises:
        ValueError: the file is not valid JSON or lacks ``global_step``.
    """
    path = Path(folder) / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return TrainRecord(global_step=int(data["global_step"]),
                           final_loss=data.get("final_loss"),
                           mlflow_run_id=data.get("mlflow_run_id"),
                           registered_model=data.get("registered_model"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a training summary ({exc})") from exc


def load_trained(folder: Path) -> tuple[DiffusionModule, tuple[int, int]]:
    """The trained module (EMA weights, eval mode) and its (rows, cols), from one read."""
    file = read_module_file(Path(folder) / MODEL_NAME)
    return file.build(DiffusionModule), file.image_size


def load_model(folder: Path) -> DiffusionModule:
    """Rebuild the trained module (EMA weights) from a model folder."""
    return load_trained(folder)[0]


@dataclass(frozen=True)
class ModelRef:
    """The model file's digest, and its MLflow registration when there is one.

    Attributes:
        path: the model folder (``diffusion.output``).
        sha256: digest of ``model.pt``: identifies the weights whatever the registry says.
        registered_name: MLflow registered-model name, if training registered it.
        registered_version: its version in the registry.
        global_step: training step of the weights.
    """

    path: Path
    sha256: str
    registered_name: str | None
    registered_version: str | None
    global_step: int | None

    @property
    def version(self) -> str:
        """``name/vN@sha12`` when registered, else ``sha12``: short, unique, traceable."""
        short = self.sha256[:12]
        if self.registered_name and self.registered_version:
            return f"{self.registered_name}/v{self.registered_version}@{short}"
        return short


def model_ref(folder: Path) -> ModelRef:
    """Describe the trained model in ``folder`` (what every synthetic sample records).

    Raises:
        FileNotFoundError: there is no trained model there (run train-diffusion first).
    """
    folder = Path(folder)
    weights = folder / MODEL_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no trained diffusion model; run "
                                "`synthdx train-diffusion` first (or set synthesize.model)")
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    record = read_train_record(folder)
    registered = (record.registered_model if record else None) or {}
    return ModelRef(path=folder, sha256=digest.hexdigest(),
                    registered_name=registered.get("name"),
                    registered_version=(str(registered["version"])
                                        if registered.get("version") is not None else None),
                    global_step=record.global_step if record else None)

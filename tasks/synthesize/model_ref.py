"""Which trained model a synthetic dataset comes from, in a form every sample can carry."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tasks.diffusion.train import MODEL_NAME, SUMMARY_NAME


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
    """Describe the trained model in ``folder``.

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
    summary_path = folder / SUMMARY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    registered = summary.get("registered_model") or {}
    return ModelRef(path=folder, sha256=digest.hexdigest(),
                    registered_name=registered.get("name"),
                    registered_version=(str(registered["version"])
                                        if registered.get("version") is not None else None),
                    global_step=summary.get("global_step"))

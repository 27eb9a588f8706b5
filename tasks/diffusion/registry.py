"""Log the trained EMA model to its training run and register it in the MLflow registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import models.diffusion
from tasks.common.mlflow_logger import quiet_model_logging
from tasks.config import Config

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACT_NAME = "diffusion_model"


def register_model(cfg: Config, weights: Path, run_id: str) -> dict[str, str]:
    """Log ``weights`` as a pyfunc model in run ``run_id`` and register a new version.

    Why a pyfunc: a registered version must be usable on its own (load, then ``predict``
    conditions and seeds into images), not just a file to download.

    Returns:
        ``{"name", "version", "model_uri"}`` of the registered version.
    """
    import mlflow

    from tasks.diffusion.pyfunc_model import SETTINGS

    name = cfg.diffusion.registered_model_name
    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    requirements = [f"{p}=={_version(p)}" for p in ("torch", "monai", "lightning", "einops",
                                                    "pandas", "numpy", "mlflow")]
    settings = serving_settings(cfg)
    assert set(settings) == set(SETTINGS)
    signature = _signature(weights, settings)
    # Resume the run in its own experiment: the fluent API refuses a run whose experiment is
    # not the process's active one (set by an earlier set_experiment in the same process).
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id), quiet_model_logging():
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME, python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(weights)},
            # A module's folder: the package itself may be a namespace without __file__.
            code_paths=[str(Path(models.diffusion.__file__).parent)],
            pip_requirements=requirements, registered_model_name=name, model_config=settings,
            signature=signature, await_registration_for=30)
    version = str(info.registered_model_version)
    return {"name": str(name), "version": version, "model_uri": f"models:/{name}/{version}"}


def serving_settings(cfg: Config) -> dict[str, Any]:
    """The registered model's default sampler settings: the project's ``synthesize`` section.

    Why: the served model and the synthesize stage then sample alike unless a request says
    otherwise, and the settings have one place (params.yaml), as every other default.
    """
    s = cfg.synthesize
    return {"sampler": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
            "eta": s.eta, "batch_size": s.batch_size}


def _signature(weights: Path, params: dict[str, Any]) -> Any:
    """Input: one column per condition factor + seed; output: (n, 2, H, W) float32 images.

    The input schema is declared, not inferred from an example: a condition may be left out
    (no column) or missing in a row (None: unconditioned), which an inferred integer column
    refuses (MLflow's "Hint: Inferred schema contains integer column(s)" warned of exactly
    that); the pyfunc coerces and checks the values itself.
    """
    import numpy as np
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    from models.conditioning import ConditionSpec
    from tasks.artifacts.diffusion_model import read_module_file

    file = read_module_file(weights, mmap=True)
    spec = ConditionSpec.from_dict(file.hparams["spec"])
    inputs = Schema([*(ColSpec(AnyType(), f.name, required=False) for f in spec.factors),
                     ColSpec("long", "seed")])
    output = np.zeros((1, 2, *file.image_size), dtype=np.float32)
    rest = infer_signature(model_output=output, params=params)
    return ModelSignature(inputs=inputs, outputs=rest.outputs, params=rest.params)


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)

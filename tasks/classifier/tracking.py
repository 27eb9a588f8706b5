"""The train_classifier stage's MLflow adapter: the stage run, one nested run per model.

Why the training stage keeps its adapter inside the loop: learning curves are logged live by
Lightning's MLflow logger, which must exist while the model trains. Everything MLflow is here;
tasks/classifier/pipeline.py only asks this module for a run and a logger and hands it what a
model produced.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.artifacts.classifier_folder import INFO_FILE
from tasks.classifier.regimes import TrainingSet
from tasks.classifier.train import TrainedModel
from tasks.common.tracking import log_params, stage_run
from tasks.config import Config

STAGE = "train_classifier"


@dataclass
class ModelRun:
    """One model's nested MLflow run and the Lightning logger that writes its curves."""

    run_id: str
    logger: Any  # lightning.pytorch.loggers.MLFlowLogger

    def log_model(self, model: TrainedModel, folder: Path, training: TrainingSet) -> None:
        """Params, final metrics, lineage tags, dataset inputs and artifacts of the model."""
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset

        info = model.info
        ts = info["training_set"]
        mlflow.log_params({"task": info["task"], "regime": info["regime"], "seed": info["seed"],
                           "training_set.images": ts["images"],
                           "training_set.positives": ts["positives"],
                           **{f"training_set.{s['source']}.images": s["images"]
                              for s in ts["sources"]},
                           **{f"training_set.{s['source']}.positives": s["positives"]
                              for s in ts["sources"]},
                           **dose_params(ts.get("synthetic_dose")),
                           "threshold_rule": info["threshold_rule"],
                           "image_size": "x".join(str(v) for v in info["image_size"]),
                           "precision": info["precision"]})
        mlflow.log_metrics({**{k: float(info[k]) for k in ("threshold", "val_auc")
                               if info.get(k) is not None}, **model.timings})
        mlflow.set_tags({f"synthdx.lineage.{k}": str(v) for k, v in info["lineage"].items()
                         if v is not None})
        for source in ts["sources"]:
            digest_key = "processed_digest" if source["source"] == "real" else "synthetic_digest"
            digest = info["lineage"].get(digest_key)
            if digest:
                meta = MetaDataset(source=_dataset_source(Path(source["root"])),
                                   name=f"{source['source']}-{info['task']}", digest=digest[:36])
                mlflow.log_input(meta, context="training")
        mlflow.log_artifact(str(folder / INFO_FILE))
        mlflow.log_dict({"summary": ts, "rows": [
            {"source": p.source, "index": [int(i) for i in p.indices]}
            for p in training.parts]}, "training_set.json")


@dataclass
class StageTracking:
    """The stage's MLflow run while its models train."""

    cfg: Config
    run_id: str

    @contextmanager
    def model_run(self, task: str, regime: str, seed: int) -> Iterator[ModelRun]:
        """A nested run for one model, with the Lightning logger that writes into it."""
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger

        with mlflow.start_run(run_name=f"{task}/{regime}/seed{seed}", nested=True,
                              tags={"synthdx.stage": STAGE, "synthdx.task": task,
                                    "synthdx.regime": regime, "synthdx.seed": str(seed)}) as run:
            logger = MLFlowLogger(experiment_name=self.cfg.mlflow.experiment,
                                  tracking_uri=self.cfg.mlflow.resolved_uri(),
                                  run_id=run.info.run_id, log_model=False)
            yield ModelRun(run_id=run.info.run_id, logger=logger)

    def finish(self, seconds: float, models: list[dict[str, Any]]) -> None:
        """The stage run's wall time and the list of models it trained."""
        import mlflow

        mlflow.log_metric("seconds", seconds)
        mlflow.log_dict({"models": models}, "models.json")


@contextmanager
def stage_tracking(cfg: Config, pairs: Sequence[tuple[str, str]],
                   image_size: Sequence[int]) -> Iterator[StageTracking]:
    """Open the stage's MLflow run with its parameters and the (task, regime) selection."""
    import mlflow

    selection = [f"{t}/{r}" for t, r in pairs]
    with stage_run(cfg.mlflow, STAGE, tags={"synthdx.selection": ",".join(selection)}) as run:
        log_params({"classifier": cfg.classifier.model_dump(mode="json"),
                    "selection": selection})
        mlflow.log_params({"image_size": "x".join(str(v) for v in image_size)})
        yield StageTracking(cfg=cfg, run_id=run.info.run_id)


def dose_params(dose: dict[str, Any] | None) -> dict[str, Any]:
    """The synthetic dose as model-run params, so MLflow can filter runs by it."""
    if dose is None:
        return {}
    keys = ("per_real", "requested", "used", "shortfall")
    return {f"synthetic_dose.{k}": "null" if dose.get(k) is None else dose[k] for k in keys}


def _dataset_source(root: Path) -> Any:
    """MLflow's dataset source for a local folder (its 'multiple ways' warning is noise here)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
        return resolve_dataset_source(root.resolve().as_uri())

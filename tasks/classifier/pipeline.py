"""The train_classifier stage: every (task, regime) asked for, each with every seed.

Outputs ``<classifier.output>/<task>/<regime>/seed<k>/`` (see tasks.classifier.train). Each
``<task>/<regime>/`` folder is one DVC output (the dvc.yaml matrix runs one per process) and
is replaced atomically once all its seeds are trained, so a killed run leaves the previous
models in place.

MLflow: one stage run per process, and one nested run per model with its params, learning
curves (Lightning's MLflow logger), threshold, validation AUC, training-set composition
(``training_set.json``) and lineage (dataset digests, diffusion model version) as tags and
dataset inputs. Registration of the best model per task is the validate stage's job: it is
the first stage that sees every regime of a task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from tasks.artifacts.classifier_folder import INFO_FILE
from tasks.classifier.inputs import load_inputs
from tasks.classifier.regimes import USES_SYNTHETIC, TrainingSet, compose
from tasks.classifier.train import TrainedModel, train_model, write_model_folder
from tasks.common.atomic import atomic_dir
from tasks.config import Config, RegimeName, TaskName

STAGE = "train_classifier"


@dataclass
class ClassifierRunSummary:
    """What one train_classifier process produced."""

    output: Path
    models: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def describe(self) -> str:
        """A short table for the CLI: one line per model."""
        lines = [f"train_classifier: {len(self.models)} model(s) in {self.seconds:.1f} s "
                 f"-> {self.output}"]
        for m in self.models:
            auc = f"{m['val_auc']:.3f}" if m.get("val_auc") is not None else "n/a"
            ts = m["training_set"]
            lines.append(f"  {m['task']:<12} {m['regime']:<24} seed {m['seed']:<3} "
                         f"train n={ts['images']:<5} pos={ts['positives']:<4} "
                         f"val AUC {auc}  threshold {m['threshold']:.3f}")
            lines.extend(f"    note: {note}" for note in ts.get("notes", []))
        lines.append(f"  MLflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def _selection(cfg: Config, tasks: list[str] | None, regimes: list[str] | None
               ) -> list[tuple[str, str]]:
    c = cfg.classifier
    chosen_tasks = tasks or list(c.tasks)
    chosen_regimes = regimes or list(c.regimes)
    for kind, names, known in (("task", chosen_tasks, get_args(TaskName)),
                               ("regime", chosen_regimes, get_args(RegimeName))):
        for name in names:
            if name not in known:
                raise ValueError(f"unknown {kind} {name!r} (expected one of: "
                                 f"{', '.join(known)})")
    return [(t, r) for t in chosen_tasks for r in chosen_regimes]


def _log_model_run(model: TrainedModel, folder: Path, training: TrainingSet) -> None:
    """Params, final metrics, lineage tags, dataset inputs and artifacts of one model run."""
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
                       **_dose_params(ts.get("synthetic_dose")),
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


def _dose_params(dose: dict[str, Any] | None) -> dict[str, Any]:
    """The synthetic dose as model-run params, so MLflow can filter runs by it."""
    if dose is None:
        return {}
    keys = ("per_real", "requested", "used", "shortfall")
    return {f"synthetic_dose.{k}": "null" if dose.get(k) is None else dose[k] for k in keys}


def _dataset_source(root: Path) -> Any:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
        return resolve_dataset_source(root.resolve().as_uri())


def _lightning_logger(cfg: Config, run_id: str) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=cfg.mlflow.experiment,
                        tracking_uri=cfg.mlflow.resolved_uri(), run_id=run_id, log_model=False)


def run_train_classifier(cfg: Config, tasks: list[str] | None = None,
                         regimes: list[str] | None = None) -> ClassifierRunSummary:
    """Train every seed of every (task, regime) selected (default: all in params).

    Raises:
        ValueError: an unknown task or regime, or a training set that cannot be built.
        FileNotFoundError: a missing input dataset.
    """
    import mlflow

    from tasks.common.tracking import log_params, stage_run

    c = cfg.classifier
    pairs = _selection(cfg, tasks, regimes)
    inputs = load_inputs(cfg, need_synthetic=any(r in USES_SYNTHETIC for _, r in pairs))
    output = Path(c.output)
    summary = ClassifierRunSummary(output=output)
    started = time.perf_counter()
    selection = ",".join(f"{t}/{r}" for t, r in pairs)
    with stage_run(cfg.mlflow, STAGE, tags={"synthdx.selection": selection}) as stage:
        summary.mlflow_run_id = stage.info.run_id
        log_params({"classifier": c.model_dump(mode="json"), "selection": [
            f"{t}/{r}" for t, r in pairs]})
        mlflow.log_params({"image_size": "x".join(str(v) for v in inputs.size)})
        for task, regime in pairs:
            with atomic_dir(output / task / regime) as tmp:
                for seed in c.seeds:
                    training = compose(task, regime, seed, inputs.real.root, inputs.real.manifest,
                                       inputs.synthetic.root if inputs.synthetic else None,
                                       inputs.synthetic.manifest if inputs.synthetic else None,
                                       c.limited_fraction, c.synthetic_per_real)
                    with mlflow.start_run(run_name=f"{task}/{regime}/seed{seed}", nested=True,
                                          tags={"synthdx.stage": STAGE, "synthdx.task": task,
                                                "synthdx.regime": regime,
                                                "synthdx.seed": str(seed)}) as run:
                        model = train_model(c, inputs, training,
                                            _lightning_logger(cfg, run.info.run_id))
                        model.info["mlflow_run_id"] = run.info.run_id
                        folder = tmp / f"seed{seed}"
                        folder.mkdir()
                        write_model_folder(folder, model)
                        _log_model_run(model, folder, training)
                    summary.models.append(model.info)
        summary.seconds = time.perf_counter() - started
        mlflow.log_metric("seconds", summary.seconds)
        mlflow.log_dict({"models": summary.models}, "models.json")
    return summary

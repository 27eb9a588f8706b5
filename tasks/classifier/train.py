"""Train one downstream classifier and write its model folder.

The folder's layout (model.pt, model.json, predictions.parquet) is owned by
``tasks.artifacts.classifier_folder``; the validation stage reads it through the same module.
The training time and speed go to the model's MLflow run (``TrainedModel.timings``), not into
model.json.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from monai.data import set_track_meta
from sklearn.metrics import roc_auc_score

from models.classifier import KeepBestWeights, ScanClassifier, predict_scores
from models.classifier_data import ClassifierDataModule, LabelledImages
from tasks.artifacts.classifier_folder import write_classifier_folder
from tasks.classifier.inputs import ClassifierInputs
from tasks.classifier.labels import task_labels
from tasks.classifier.regimes import TrainingSet
from tasks.classifier.threshold import choose_threshold
from tasks.common.lightning_console import quiet_lightning
from tasks.common.precision import auto_precision
from tasks.config import ClassifierConfig

SCORED_SPLITS = ("val", "test", "external")


@dataclass(frozen=True)
class TrainedModel:
    """One trained classifier and its scores on the held-out cases.

    Attributes:
        module: the network with its selected weights.
        info: what model.json records (no timings: it is a DVC-tracked output).
        predictions: the scored validation, internal test and external cases.
        timings: ``seconds`` and ``images_per_second`` of training, for MLflow and the console.
    """

    module: ScanClassifier
    info: dict[str, Any]
    predictions: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)


def build_classifier(cfg: ClassifierConfig, task: str, pos_weight: float | None
                     ) -> ScanClassifier:
    """The LightningModule from the classifier parameters."""
    net = cfg.network
    return ScanClassifier(architecture=net.architecture, layers=list(net.layers),
                          widths=list(net.widths), dropout=net.dropout, lr=cfg.lr,
                          weight_decay=cfg.weight_decay, max_steps=cfg.max_steps,
                          warmup_steps=cfg.warmup_steps, pos_weight=pos_weight, task=task)


def training_images(inputs: ClassifierInputs, training: TrainingSet) -> torch.Tensor:
    """The training set's images, parts in order (real first, then synthetic)."""
    chunks = []
    for part in training.parts:
        source = inputs.real if part.source == "real" else inputs.synthetic
        if source is None:
            raise ValueError(f"regime {training.regime!r} needs the synthetic set")
        chunks.append(source.take(part.indices))
    return torch.cat(chunks)


def scored_cases(inputs: ClassifierInputs, task: str) -> pd.DataFrame:
    """The real cases every model is scored on: validation, internal test and external."""
    manifest = inputs.real.manifest
    rows = manifest[manifest["split"].isin(SCORED_SPLITS)].sort_values("index")
    if not (rows["split"] == "val").any():
        raise ValueError(f"{inputs.real.root}: no validation split; the threshold must be "
                         "chosen on internal validation cases")
    labels = task_labels(rows, task, str(inputs.real.root))
    return pd.DataFrame({
        "index": rows["index"].to_numpy(dtype=np.int64),
        "study_uid": rows["study_uid"].astype(str).to_numpy(),
        "pseudo_id": rows["pseudo_id"].astype(str).to_numpy(),
        "site": rows["site"].astype(str).to_numpy(),
        "split": rows["split"].astype(str).to_numpy(),
        "sex": rows["sex"].astype("string").fillna("unknown").astype(str).to_numpy(),
        "age": pd.to_numeric(rows["age"], errors="coerce").to_numpy(dtype=np.float64),
        "label": labels,
        **finding_columns(rows),
    })


FINDING_COLUMNS = {"perugini_grade": "Int64", "metastasis": "boolean", "superscan": "boolean"}
"""Findings copied per scored case, so a report can say how a model does on rare findings
(Perugini 3, superscans) without joining back to the processed manifest."""


def finding_columns(rows: pd.DataFrame) -> dict[str, Any]:
    """The finding columns of ``rows`` as nullable arrays (all NA when a column is absent)."""
    return {name: (pd.array(rows[name].to_numpy(), dtype=dtype) if name in rows.columns
                   else pd.array([None] * len(rows), dtype=dtype))
            for name, dtype in FINDING_COLUMNS.items()}


def _pos_weight(cfg: ClassifierConfig, labels: np.ndarray) -> float | None:
    if cfg.class_balance != "pos_weight":
        return None
    pos = int(labels.sum())
    return float((len(labels) - pos) / pos) if pos else None


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None


def _require_finite_weights(module: torch.nn.Module, training: TrainingSet,
                            precision: str) -> None:
    """Stop with the model's name when training left NaN or infinite weights.

    Why: a diverged model scores every case NaN, and the failure then surfaced far away as
    scikit-learn's "Input contains NaN." while choosing the threshold. Seen with bf16 on an
    Intel Xeon with AMX for a tiny test network (widths 8-16, one thread; about one run in two).

    Raises:
        ValueError: naming the task, regime, seed, precision and the first bad tensor.
    """
    bad = [name for name, tensor in module.state_dict().items()
           if tensor.is_floating_point() and not bool(tensor.isfinite().all())]
    if bad:
        raise ValueError(f"{training.task}/{training.regime} seed {training.seed}: training "
                         f"diverged, {len(bad)} weight tensors hold NaN or infinite values "
                         f"(first: {bad[0]}; precision {precision}); try "
                         f"classifier.precision=32-true or a lower classifier.lr")


def train_model(cfg: ClassifierConfig, inputs: ClassifierInputs, training: TrainingSet,
                logger: Any = None) -> TrainedModel:
    """Train one model on ``training``, select its weights and threshold on validation only.

    Args:
        cfg: classifier parameters.
        inputs: the stage's data sources.
        training: which images this model trains on.
        logger: a Lightning logger (the model's MLflow run) or None.

    Raises:
        ValueError: a training set with only one class (nothing to learn: the message says
            which regime and task).
    """
    labels = training.labels
    if labels.min() == labels.max():
        raise ValueError(f"{training.task}/{training.regime} seed {training.seed}: the "
                         f"training set has only {'positive' if labels[0] else 'negative'} "
                         f"cases ({len(labels)} images); raise classifier.limited_fraction")
    quiet_lightning()
    L.seed_everything(training.seed, workers=True, verbose=False)
    # Plain tensors through MONAI's transforms: its metadata tracking halves augmentation
    # speed and nothing here reads the metadata (a process-wide MONAI switch; this stage's
    # process only trains classifiers).
    set_track_meta(False)
    cases = scored_cases(inputs, training.task)
    val = cases[cases["split"] == "val"]
    train_set = LabelledImages(training_images(inputs, training), labels, augment=cfg.augment)
    val_set = LabelledImages(inputs.real.take(val["index"].to_numpy()), val["label"].to_numpy())
    data = ClassifierDataModule(train_set, val_set, cfg.batch_size, cfg.max_steps,
                                seed=training.seed, balance=cfg.class_balance == "sampler",
                                num_workers=cfg.num_workers)
    module = build_classifier(cfg, training.task, _pos_weight(cfg, labels))
    best = KeepBestWeights()
    precision = auto_precision(cfg.precision, cfg.accelerator)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=cfg.devices, precision=precision,
        max_steps=cfg.max_steps, max_epochs=1, val_check_interval=min(cfg.val_every_n_steps,
                                                                      cfg.max_steps),
        logger=logger if logger is not None else False, callbacks=[best],
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=min(10, cfg.max_steps), deterministic=False,
        enable_progress_bar=False)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    _require_finite_weights(module, training, precision)
    device = module.device
    scores = predict_scores(module, inputs.real.take(cases["index"].to_numpy()),
                            device=device).numpy().astype(np.float64)
    predictions = cases.drop(columns=["index"]).assign(score=scores)
    is_val = predictions["split"].to_numpy() == "val"
    val_labels, val_scores = predictions["label"].to_numpy()[is_val], scores[is_val]
    threshold = choose_threshold(val_labels, val_scores, cfg.threshold)
    info = {
        "task": training.task, "regime": training.regime, "seed": training.seed,
        "threshold": threshold, "threshold_rule": cfg.threshold,
        "threshold_split": "val", "val_auc": _auc(val_labels, val_scores),
        "val_cases": int(is_val.sum()), "val_positives": int(val_labels.sum()),
        "selected_step": best.best_step, "steps": int(trainer.global_step),
        "precision": precision, "image_size": list(inputs.size),
        "training_set": training.summary(), "lineage": dict(inputs.lineage),
    }
    timings = {"seconds": round(seconds, 3), "images_per_second": round(
        trainer.global_step * cfg.batch_size / max(seconds, 1e-9), 2)}
    return TrainedModel(module=module.cpu(), info=info, predictions=predictions,
                        timings=timings)


def write_model_folder(folder: Path, model: TrainedModel) -> None:
    """Write the model folder (tasks.artifacts.classifier_folder) into ``folder``."""
    write_classifier_folder(folder, model.module, model.info, model.predictions)

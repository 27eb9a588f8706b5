"""Train the class-conditional diffusion model on the processed dataset's training split.

Lightning does the loop: precision (bf16-mixed on a GPU or a CPU with native bf16, else
fp32), DDP across devices and nodes, gradient clipping, EMA of the weights (``WarmupEMA``:
Lightning's EMAWeightAveraging with a warm-up), periodic checkpoints with ``last.ckpt``, and
resume from it with the same optimiser, EMA, step, data position and random draws (so a killed
and resumed run ends with the weights of an uninterrupted one).
Checkpoints live in ``diffusion.work_dir`` so a killed run keeps them; the final EMA model is
written atomically into ``diffusion.output`` by rank 0 only. A tracking server that is down
at the start stops the stage before anything is written; one that goes away during training
does not stop it (``BufferedMLFlowLogger`` keeps the log calls until it is back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor

from models.callbacks import DataLedger, DeviceMemory, SampleGrid, WarmupEMA
from models.conditioning import ConditionSpec
from models.data import DiffusionDataModule
from models.diffusion import DiffusionModule
from tasks.artifacts.dataset import read_manifest
from tasks.artifacts.diffusion_model import (
    MODEL_NAME,
    TrainRecord,
    read_train_record,
    write_model,
    write_train_record,
)
from tasks.common.atomic import atomic_dir
from tasks.common.lightning_console import lightning_progress_callbacks, quiet_lightning
from tasks.common.mlflow_logger import BufferedMLFlowLogger
from tasks.common.precision import auto_precision
from tasks.common.tracking import PARENT_ENV, TrackingUnreachable, check_tracking_server
from tasks.config import Config, DiffusionConfig


@dataclass(frozen=True)
class TrainSummary:
    """What a training run produced."""

    output: Path
    global_step: int
    resumed_from: Path | None
    final_loss: float | None
    seconds: float
    images_per_second: float
    mlflow_run_id: str | None
    registered_model: dict[str, str] | None = None

    def describe(self) -> str:
        """One short paragraph for the CLI."""
        resumed = f" (resumed from {self.resumed_from})" if self.resumed_from else ""
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        registered = (f"\n  registered: {self.registered_model['model_uri']}"
                      if self.registered_model else "")
        return (f"train_diffusion: {self.global_step} steps{resumed} in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s), final loss {loss}\n"
                f"  model: {self.output / MODEL_NAME}\n  MLflow run: {self.mlflow_run_id}"
                f"{registered}")


def resolve_precision(cfg: DiffusionConfig) -> str:
    """``auto``: bf16-mixed on a GPU or a CPU with native bf16, else fp32 (see precision.py)."""
    return auto_precision(cfg.precision, cfg.accelerator)


def build_module(cfg: DiffusionConfig, spec: ConditionSpec) -> DiffusionModule:
    """The LightningModule from the diffusion parameters."""
    return DiffusionModule(spec, **module_args(cfg))


def module_args(cfg: DiffusionConfig) -> dict[str, Any]:
    """Every ``DiffusionModule`` argument but the conditions, from the diffusion parameters.

    Why every one: the module's constructor keeps no defaults of its own for settings, so the
    configuration (params.yaml, a profile, ``--set``) is the one place they come from.
    """
    net = cfg.network
    return dict(
        channels=net.channels, attention_levels=net.attention_levels,
        num_res_blocks=net.num_res_blocks, num_head_channels=net.num_head_channels,
        norm_num_groups=net.norm_num_groups, num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        patch_size=net.patch_size, loss_weighting=cfg.loss_weighting,
        min_snr_gamma=cfg.min_snr_gamma, min_lr_ratio=cfg.min_lr_ratio,
        intensity_transform=cfg.intensity_transform,
        cond_dropout=cfg.cond_dropout, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, val_seed=cfg.seed,
        train_seed=cfg.seed, **cfg.speed.model_dump())


def _batch_size(batch: dict[str, Any]) -> int:
    """Images in a training batch (for throughput and progress)."""
    return int(batch["image"].shape[0])


def _logger(cfg: Config, run_tags: dict[str, str]) -> BufferedMLFlowLogger:
    import os

    tags = {"synthdx.stage": "train_diffusion", **run_tags}
    if os.environ.get(PARENT_ENV):
        tags["mlflow.parentRunId"] = os.environ[PARENT_ENV]
    # Always an explicit URI: MLflow >= 3.13 refuses the ./mlruns default Lightning would use.
    return BufferedMLFlowLogger(experiment_name=cfg.mlflow.experiment, run_name="train_diffusion",
                                tracking_uri=cfg.mlflow.resolved_uri(), tags=tags,
                                log_model=False)


def train_diffusion(cfg: Config, processed: Path | None = None) -> TrainSummary:
    """Train (or resume training) and write the final EMA model.

    Args:
        cfg: the validated parameters (``diffusion`` and ``mlflow`` sections are used).
        processed: processed dataset folder (default ``ingest.output``).

    Raises:
        TrackingUnreachable: the tracking server is down at the start (nothing is written),
            or stayed down past the end of training (the model is written, not registered).
    """
    check_tracking_server(cfg.mlflow.resolved_uri())
    quiet_lightning()
    d = cfg.diffusion
    processed = Path(processed or cfg.ingest.output)
    L.seed_everything(d.seed, workers=True)
    spec = ConditionSpec.from_manifest(read_manifest(processed), d.conditions)
    data = DiffusionDataModule(processed, spec, (d.image_rows, d.image_cols), d.batch_size,
                               d.num_workers, d.augment, seed=d.seed)
    module = build_module(d, spec)
    # ThroughputMonitor reads this to log model-FLOPs utilisation (on GPUs it knows the peak of).
    module.flops_per_batch = flops_per_batch(d, spec)
    ckpt_dir = Path(d.work_dir) / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                 every_n_train_steps=d.checkpoint_every_n_steps)
    logger = _logger(cfg, {"synthdx.processed": str(processed)})
    trainer = L.Trainer(
        accelerator=d.accelerator, devices=d.devices, num_nodes=d.num_nodes,
        strategy=d.strategy, precision=resolve_precision(d), max_steps=d.max_steps,
        gradient_clip_val=d.gradient_clip_val or None, logger=logger,
        callbacks=[checkpoint, WarmupEMA(decay=d.ema_decay),
                   DataLedger(Path(d.work_dir) / "ledger"),
                   SampleGrid(Path(d.work_dir) / "samples", d.sample_every_n_epochs,
                              seed=d.seed),
                   ThroughputMonitor(batch_size_fn=_batch_size,
                                     window_size=max(2, d.log_every_n_steps)),
                   DeviceMemory(every_n_steps=d.log_every_n_steps),
                   *lightning_progress_callbacks("train_diffusion", _batch_size)],
        log_every_n_steps=d.log_every_n_steps, default_root_dir=d.work_dir,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    last = ckpt_dir / "last.ckpt"
    resume, start_step = _resumable(last, module) if d.resume else (None, 0)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    seconds = time.perf_counter() - started
    # Save "last" at the very end too, so a later resume with more steps starts from here.
    trainer.save_checkpoint(last, weights_only=False)
    steps = trainer.global_step - start_step
    ips = steps * d.batch_size * trainer.world_size / max(seconds, 1e-9)
    loss = trainer.callback_metrics.get("train/loss")
    summary = TrainSummary(
        output=Path(d.output), global_step=trainer.global_step, resumed_from=resume,
        final_loss=float(loss) if loss is not None else None, seconds=seconds,
        images_per_second=ips, mlflow_run_id=logger.run_id)
    if steps == 0:
        summary = _carry_over(summary, Path(d.output))
    if trainer.is_global_zero:
        # Timings live here and on the console, never in the DVC-tracked model folder.
        logger.log_metrics({"train/images_per_second": ips, "train/seconds": seconds},
                           step=trainer.global_step)
        _write_model(module, summary, d)
        if logger.unsent:
            raise TrackingUnreachable(
                f"training finished and wrote {d.output}, but the MLflow tracking server "
                f"{logger.uri} stayed unreachable: {logger.unsent} log calls of run "
                f"{logger.run_id} were not sent and the model was not registered; run the "
                "stage again when the server is back (the checkpoint is kept for resume)")
        if d.registered_model_name and logger.run_id:
            from tasks.diffusion.registry import register_model

            registered = register_model(cfg, Path(d.output) / MODEL_NAME, logger.run_id)
            summary = replace(summary, registered_model=registered)
            write_train_record(Path(d.output), _record(summary))
    return summary


def _carry_over(summary: TrainSummary, output: Path) -> TrainSummary:
    """Keep the loss of the run that trained these weights when this one trained nothing.

    Why: resuming a finished run (``max_steps`` already reached) trains nothing; its summary
    would otherwise replace the real loss with "n/a". (Its speed is in that run's MLflow
    metrics: timings are kept out of the DVC-tracked model folder.)
    """
    old = read_train_record(output)
    if old is None or old.global_step != summary.global_step:
        return summary
    return replace(summary, final_loss=old.final_loss)


def flops_per_batch(cfg: DiffusionConfig, spec: ConditionSpec) -> int:
    """Model FLOPs of one training step (forward + backward) at the configured batch size.

    Counted once with torch's FlopCounterMode on a meta-device copy: no memory, no time.
    """
    with torch.device("meta"):
        unet = build_module(cfg, spec).unet
        x = torch.zeros(cfg.batch_size, 2, cfg.image_rows, cfg.image_cols)
        t = torch.zeros(cfg.batch_size, dtype=torch.long)
        cond = torch.zeros(cfg.batch_size, len(spec.names), dtype=torch.long)
    return int(measure_flops(unet, lambda: unet(x, t, class_labels=cond),
                             loss_fn=torch.Tensor.sum))


RESUME_FREE_HPARAMS = {"max_steps"}
"""Hyper-parameters a resumed run may change (train longer); any other change starts afresh."""


def _resumable(last: Path, module: DiffusionModule) -> tuple[Path | None, int]:
    """The checkpoint to resume from and its step, if it belongs to the same model.

    A checkpoint from a run with another network, schedule or condition set cannot be
    continued (the weights would not fit, or would silently mean something else); it is moved
    aside as ``last.stale-<step>.ckpt`` and training starts from step 0.
    """
    if not last.is_file():
        return None, 0
    state = torch.load(last, map_location="cpu", weights_only=False)
    saved = dict(state.get("hyper_parameters", {}))
    wanted = dict(module.hparams)
    differs = sorted(k for k in set(saved) | set(wanted)
                     if k not in RESUME_FREE_HPARAMS and saved.get(k) != wanted.get(k))
    step = int(state.get("global_step", 0))
    if differs:
        last.rename(last.with_name(f"last.stale-{step}.ckpt"))
        return None, 0
    return last, step


def _record(summary: TrainSummary) -> TrainRecord:
    """The part of the summary that describes the weights (no timings: see diffusion_model)."""
    return TrainRecord(global_step=summary.global_step, final_loss=summary.final_loss,
                       mlflow_run_id=summary.mlflow_run_id,
                       registered_model=summary.registered_model)


def _write_model(module: DiffusionModule, summary: TrainSummary, cfg: DiffusionConfig) -> None:
    """The EMA weights (the module holds them after fit) plus what is needed to rebuild it."""
    with atomic_dir(Path(cfg.output)) as tmp:
        write_model(tmp, module, (cfg.image_rows, cfg.image_cols), summary.global_step)
        write_train_record(tmp, _record(summary))

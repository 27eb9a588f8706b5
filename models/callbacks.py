"""Lightning callbacks of the project."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging


class DataLedger(L.Callback):
    """Record which dataset rows each rank trained on, one JSON file per rank.

    Why: lineage (which images shaped the model) and a check that DDP gives every rank its
    own share of the data rather than the same batches twice.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Remember the batch's row indices."""
        self.seen.extend(int(i) for i in batch["index"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``rank<k>.json`` with the rows this rank saw."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank,
                                    "world_size": trainer.world_size,
                                    "global_step": trainer.global_step,
                                    "rows": self.seen}))


def ddim_steps_at_most(steps: int, num_train_timesteps: int) -> int:
    """The largest DDIM step count up to ``steps`` that divides the training timesteps.

    Why: MONAI's DDIM strides by ``T // steps`` while its timesteps come from a rounded
    linspace, so a count that does not divide ``T`` samples from the wrong noise levels (the
    rule the configuration enforces for synthesis); the preview grid follows it whatever the
    profile's ``T`` (20 steps over the tiny profile's 100, 10 over 50).
    """
    return max(n for n in range(1, max(1, min(steps, num_train_timesteps)) + 1)
               if num_train_timesteps % n == 0)


class SampleGrid(L.Callback):
    """Sample one image per finding class with fixed seeds and hand the grid to the logger.

    Why: the loss says little about whether samples look like bone scans; a grid per class
    every few epochs, in the MLflow run, does. Only rank 0 samples. Classes are the
    combinations of the Perugini grade and metastasis factors present in the condition spec;
    any other factor (site, sex) is left unconditioned.
    """

    def __init__(self, folder: str | Path, every_n_epochs: int = 5, steps: int = 20,
                 guidance_scale: float = 2.0, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.every_n_epochs = every_n_epochs
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed

    def _classes(self, pl_module: Any) -> tuple[list[str], torch.Tensor]:
        spec = pl_module.spec
        grades = range(4) if "perugini_grade" in spec.names else [None]
        mets = (False, True) if "metastasis" in spec.names else (None,)
        labels, rows = [], []
        for g in grades:
            for m in mets:
                row = {n: None for n in spec.names}
                if g is not None:
                    row["perugini_grade"] = g
                if m is not None:
                    row["metastasis"] = m
                codes = [f.index_of(row[f.name]) if row[f.name] is not None else f.null_index
                         for f in spec.factors]
                rows.append(codes)
                labels.append(" ".join(p for p in (f"P{g}" if g is not None else "",
                                                   ("met" if m else "no met") if m is not None
                                                   else "") if p))
        return labels, torch.tensor(rows, dtype=torch.long)

    def render(self, trainer: L.Trainer, pl_module: Any, tag: str) -> Path | None:
        """Sample the grid, write ``samples_<tag>.png`` and log it if the logger can."""
        if not trainer.is_global_zero:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from models.sampling import sample

        labels, cond = self._classes(pl_module)
        size = tuple(trainer.datamodule.size) if trainer.datamodule is not None else (64, 16)
        was_training = pl_module.training
        pl_module.eval()
        steps = ddim_steps_at_most(self.steps, pl_module.noise_schedule["num_train_timesteps"])
        with torch.no_grad():
            images = sample(pl_module.unet, "ddim", steps, cond.to(pl_module.device),
                            self.guidance_scale, [self.seed + i for i in range(len(labels))],
                            (2, *size), pl_module.device, null_cond=pl_module.spec.null_indices,
                            intensity=pl_module.intensity,
                            **pl_module.noise_schedule).float().cpu().numpy()
        pl_module.train(was_training)
        fig, axes = plt.subplots(1, len(labels), figsize=(1.2 * len(labels), 3.2), squeeze=False)
        for ax, label, image in zip(axes[0], labels, images, strict=True):
            pair = np.concatenate([image[0], np.zeros((image.shape[1], 2)), image[1]], axis=1)
            ax.imshow(pair, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(label, fontsize=7)
            ax.axis("off")
        fig.suptitle(f"samples at step {trainer.global_step} (DDIM {steps}, "
                     f"guidance {self.guidance_scale})", fontsize=8)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"samples_{tag}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        logger = trainer.logger
        if callable(getattr(logger, "log_file", None)):
            # The project's MLflow logger: keeps the upload for later if the server is away.
            logger.log_file(path, artifact_path="samples")
        elif logger is not None and hasattr(logger, "run_id") and hasattr(logger.experiment,
                                                                          "log_artifact"):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="samples")
        return path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every ``every_n_epochs`` epochs."""
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.render(trainer, pl_module, f"epoch{trainer.current_epoch + 1:04d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Once more with the final (EMA) weights."""
        self.render(trainer, pl_module, "final")


class DeviceMemory(L.Callback):
    """Log the accelerator's peak and reserved memory every ``every_n_steps`` steps.

    Why: the GPU profile is sized for an 80 GB card; the peak tells whether a larger batch
    or network fits, and a creeping peak shows a leak long before an out-of-memory crash.
    Nothing is logged on the CPU (process RSS says little about the model).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log ``gpu/max_allocated_gib`` and ``gpu/reserved_gib`` of this rank's device."""
        device = pl_module.device
        if device.type != "cuda" or trainer.global_step % self.every_n_steps:
            return
        gib = 1024 ** 3
        pl_module.log_dict({"gpu/max_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
                            "gpu/reserved_gib": torch.cuda.memory_reserved(device) / gib},
                           on_step=True, on_epoch=False, rank_zero_only=True)


def ema_warmup_decay(decay: float, num_averaged: int | torch.Tensor) -> float:
    """The EMA decay after ``num_averaged`` updates: ``min(decay, (1 + n) / (10 + n))``.

    Why: a plain EMA starts from the initial (random) weights and forgets them at rate
    ``decay``: at 0.999 the average of a 750-step run is still 47 % random initialisation, and
    samples from it are pure noise. Warming the decay up (the classic ``num_updates`` rule of
    TensorFlow's ExponentialMovingAverage, also used by DDPM implementations) makes the average
    follow the trained weights early and reach the slow decay only once there is a history.
    """
    n = int(num_averaged)
    return min(float(decay), (1.0 + n) / (10.0 + n))


class WarmupEMA(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging`` with the warm-up of ``ema_warmup_decay``.

    Same checkpoints, resume and state layout as the parent (only the update rule differs), so
    Lightning still swaps the average into ``state_dict`` when saving.
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        self.decay = decay
        self._kwargs.pop("avg_fn", None)
        self._kwargs["multi_avg_fn"] = self._update

    @torch.no_grad()
    def _update(self, ema_params: list[torch.Tensor], current: list[torch.Tensor],
                num_averaged: torch.Tensor | int) -> None:
        weight = 1.0 - ema_warmup_decay(self.decay, num_averaged)
        floats = [(e, c) for e, c in zip(ema_params, current, strict=True)
                  if torch.is_floating_point(e)]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], weight)
        for e, c in zip(ema_params, current, strict=True):
            if not torch.is_floating_point(e):
                e.copy_(c)

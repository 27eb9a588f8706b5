"""The conditional diffusion network and its Lightning training module.

The network is MONAI's DiffusionModelUNet with its single-factor class embedding swapped for
``ConditionEmbedding`` (several factors at once, each with a null index). Training is standard
DDPM epsilon prediction with condition dropout, so a single model provides both the conditional
and the unconditional noise estimate that classifier-free guidance combines at sampling time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler

from models.conditioning import ConditionEmbedding, ConditionSpec

#: Images are stored in [0, 1]; the diffusion process works on [-1, 1], where the schedulers
#: clip their x0 estimate.
IMAGE_CHANNELS = 2


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map stored intensities [0, 1] to the diffusion range [-1, 1]."""
    return images * 2.0 - 1.0


def to_image_range(samples: torch.Tensor) -> torch.Tensor:
    """Map diffusion-range samples back to [0, 1], clamping the overshoot sampling leaves."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)


def build_unet(
    channels: Sequence[int],
    attention_levels: Sequence[bool],
    num_res_blocks: int | Sequence[int],
    num_head_channels: int | Sequence[int],
    norm_num_groups: int,
    spec: ConditionSpec,
) -> DiffusionModelUNet:
    """A 2-D, two-view DiffusionModelUNet conditioned on the factors in ``spec``.

    ``num_class_embeds`` is set so MONAI takes its class-conditional branch in ``forward``
    (``emb = emb + self.class_embedding(class_labels)``); the embedding it creates is then
    replaced by ``ConditionEmbedding``, which accepts a (B, F) index tensor instead of (B,).

    Args:
        channels: feature channels per resolution level.
        attention_levels: whether each level has self-attention (costly at full resolution).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        spec: the condition factors.
    """
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else tuple(num_res_blocks),
        num_head_channels=(num_head_channels if isinstance(num_head_channels, int)
                           else tuple(num_head_channels)),
        norm_num_groups=norm_num_groups,
        num_class_embeds=sum(c + 1 for c in spec.cardinalities),
    )
    time_embed_dim = unet.class_embedding.embedding_dim
    unet.class_embedding = ConditionEmbedding(spec.cardinalities, time_embed_dim)
    return unet


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``.

    Warm-up keeps AdamW's first, poorly estimated moments from throwing the freshly initialised
    UNet off; the cosine tail lets the final steps settle.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class DiffusionModule(L.LightningModule):
    """DDPM training of the conditional UNet with condition dropout.

    Args:
        spec: condition factors (a ``ConditionSpec`` or its ``to_dict`` form; stored as the
            dict so checkpoints and loggers hold plain data).
        channels: UNet channels per level.
        attention_levels: UNet self-attention per level.
        num_res_blocks: UNet residual blocks per level.
        num_head_channels: UNet channels per attention head.
        norm_num_groups: UNet GroupNorm groups.
        num_train_timesteps: length of the forward noising chain.
        schedule: MONAI noise schedule name (e.g. ``scaled_linear_beta``).
        beta_start: first beta of the schedule.
        beta_end: last beta of the schedule.
        cond_dropout: probability that a sample's whole condition is replaced by nulls, which
            trains the unconditional estimate used by classifier-free guidance.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length in optimiser steps.
        max_steps: length of the cosine decay; normally the trainer's ``max_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        val_seed: seed of the fixed noise and timesteps used for validation, so validation
            losses are comparable across epochs and runs.
    """

    def __init__(
        self,
        spec: ConditionSpec | Mapping[str, Any],
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int | Sequence[int] = 1,
        num_head_channels: int | Sequence[int] = 32,
        norm_num_groups: int = 16,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0005,
        beta_end: float = 0.0195,
        cond_dropout: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 100,
        max_steps: int = 10_000,
        min_lr_ratio: float = 0.05,
        val_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        self.spec = spec if isinstance(spec, ConditionSpec) else ConditionSpec.from_dict(spec)
        self.save_hyperparameters(ignore=["spec"])
        self.hparams["spec"] = self.spec.to_dict()
        self.unet = build_unet(channels, attention_levels, num_res_blocks, num_head_channels,
                               norm_num_groups, self.spec)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule=schedule,
            beta_start=beta_start, beta_end=beta_end,
        )
        self.register_buffer("null_cond", torch.tensor(self.spec.null_indices, dtype=torch.long),
                             persistent=False)

    @property
    def noise_schedule(self) -> dict[str, Any]:
        """The trained noise schedule, as keyword arguments for ``models.sampling.sample``."""
        hp = self.hparams
        return {"num_train_timesteps": int(hp["num_train_timesteps"]),
                "schedule": str(hp["schedule"]), "beta_start": float(hp["beta_start"]),
                "beta_end": float(hp["beta_end"])}

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy images ``x`` at ``timesteps`` under condition ``cond``."""
        return self.unet(x, timesteps, class_labels=cond)

    def drop_condition(self, cond: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """Replace each sample's whole condition by nulls with probability ``cond_dropout``."""
        p = float(self.hparams["cond_dropout"])
        if p <= 0.0:
            return cond
        drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < p
        return torch.where(drop[:, None], self.null_cond.to(cond.device), cond)

    def diffusion_loss(self, images: torch.Tensor, cond: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE at uniformly drawn timesteps for images in [0, 1]."""
        x0 = to_model_range(images)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = torch.randint(0, self.noise_scheduler.num_train_timesteps, (b,), device=x0.device,
                          generator=generator)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self(noisy, t, cond)
        return F.mse_loss(pred.float(), noise.float())

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One DDPM step; logs ``train/loss`` and the current ``lr``."""
        cond = self.drop_condition(batch["cond"])
        loss = self.diffusion_loss(batch["image"], cond)
        b = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=b)
        if self._trainer is not None:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("lr", lr, on_step=True, on_epoch=False, batch_size=b)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Conditional loss with noise and timesteps fixed by ``val_seed`` and the batch index."""
        device = batch["image"].device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(self.hparams["val_seed"]) * 1_000_003 + batch_idx)
        loss = self.diffusion_loss(batch["image"], batch["cond"], generator=gen)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with a per-step warm-up + cosine schedule."""
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp["lr"],
                                      weight_decay=hp["weight_decay"])
        warmup, total, floor = int(hp["warmup_steps"]), int(hp["max_steps"]), hp["min_lr_ratio"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, floor)
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

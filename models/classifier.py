"""The downstream diagnostic classifier: a MONAI 2-D network on both views, in Lightning.

One binary task per model (amyloidosis or metastasis). The two views (anterior, posterior) are
the two input channels: cardiac uptake is clearest on the anterior view, posterior lesions on
the posterior one, and stacking them lets the first convolution weigh both. The network is
MONAI's ResNet (basic blocks; depth and widths from params, so the CPU demo can be small) or
DenseNet121; either ends in one logit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121, ResNet
from torch import nn
from torchmetrics.classification import BinaryAUROC


def build_network(architecture: str, layers: Sequence[int], widths: Sequence[int],
                  dropout: float, in_channels: int = 2) -> nn.Module:
    """A MONAI 2-D network with a single output logit.

    Args:
        architecture: ``resnet`` (basic blocks, ``layers`` per stage, ``widths`` channels) or
            ``densenet121``.
        layers: basic blocks per ResNet stage.
        widths: channels per ResNet stage.
        dropout: dropout before the final linear layer (ResNet) or in the dense layers.
        in_channels: input channels (2: anterior and posterior view).

    Why the ResNet stem is a 3x3, stride-2 convolution without max-pooling: at the demo's
    128 x 32 pixels a metastasis is one or two pixels wide; the ImageNet stem (7x7 stride 2
    plus a max-pool) would average it away before the first block.
    """
    if architecture == "densenet121":
        return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1,
                           dropout_prob=dropout)
    if architecture != "resnet":
        raise ValueError(f"unknown classifier architecture {architecture!r}")
    net = ResNet(block="basic", layers=list(layers), block_inplanes=list(widths), spatial_dims=2,
                 n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2,
                 no_max_pool=True, num_classes=1)
    net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
    return net


class ScanClassifier(L.LightningModule):
    """Binary classifier of a whole-body scan pair; ``forward`` returns one logit per image.

    Args:
        architecture, layers, widths, dropout: the network (see :func:`build_network`).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_steps: optimiser steps of the run (the cosine schedule ends there).
        warmup_steps: linear warm-up steps.
        pos_weight: weight of the positive class in the loss (``None``: unweighted; the
            balanced sampler is the default way to handle rare findings).
        task: task name, kept in the hyper-parameters for provenance.
    """

    def __init__(self, architecture: str = "resnet", layers: Sequence[int] = (1, 1, 1, 1),
                 widths: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.2,
                 lr: float = 1e-3, weight_decay: float = 1e-4, max_steps: int = 300,
                 warmup_steps: int = 20, pos_weight: float | None = None,
                 task: str = "") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(architecture, layers, widths, dropout)
        self.val_auroc = BinaryAUROC()
        # Cases and positives seen by this epoch's validation (this rank): plain attributes,
        # not buffers, so the state_dict (the model file's weights) is unchanged.
        self._val_cases = 0
        self._val_positives = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N,) for images (N, 2, H, W) in [0, 1]."""
        return self.net(images).reshape(-1)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.hparams["pos_weight"]
        pos = None if weight is None else torch.tensor(weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                                  pos_weight=pos)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Binary cross-entropy on one (class-balanced) batch."""
        logits = self(batch["image"])
        loss = self._loss(logits, batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Loss and AUC on the internal validation split (for model selection only)."""
        logits = self(batch["image"])
        self.log("val/loss", self._loss(logits, batch["label"]), batch_size=len(logits),
                 on_epoch=True, sync_dist=True)
        labels = batch["label"].long()
        self.val_auroc.update(torch.sigmoid(logits.float()), labels)
        self._val_cases += int(labels.numel())
        self._val_positives += int(labels.sum())

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's validation AUC (``val/auc``) when it is defined, then reset.

        Why the check: with one class only (no positive, or no negative, in the validation
        cases) the AUC is not measurable; torchmetrics would warn and return 0, and model
        selection would then rank weights by a meaningless number. Nothing is logged instead,
        so ``KeepBestWeights`` keeps the last weights. The counts are summed over ranks, so
        every rank makes the same decision (``sync_dist`` logging needs all of them).
        """
        counts = torch.tensor([self._val_cases, self._val_positives], device=self.device)
        if self._trainer is not None and self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        cases, positives = (int(v) for v in counts.tolist())
        if 0 < positives < cases:
            self.log("val/auc", self.val_auroc.compute(), prog_bar=True, sync_dist=True)
        self.val_auroc.reset()
        self._val_cases = self._val_positives = 0

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up then cosine decay to 5 % of the peak, stepped per batch."""
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        warm, total = max(1, int(hp["warmup_steps"])), max(1, int(hp["max_steps"]))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class KeepBestWeights(L.Callback):
    """Keep a CPU copy of the weights with the highest ``val/auc`` and restore them at the end.

    Why: with a fixed step budget the last weights are not the best on small training sets
    (real_limited overfits); selecting on the internal validation split is the usual practice
    and never looks at test or external data. Ties keep the earlier weights.
    """

    def __init__(self, monitor: str = "val/auc") -> None:
        self.monitor = monitor
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the weights when the monitored score improved."""
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return
        score = float(value)
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, int(trainer.global_step)
            self.best_state = copy.deepcopy({k: v.detach().cpu()
                                             for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the best weights back into the module."""
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)


@torch.no_grad()
def predict_scores(module: ScanClassifier, images: torch.Tensor, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Probabilities (N,) for images (N, 2, H, W); the module is put in eval mode."""
    module = module.to(device).eval()
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size].to(device, dtype=torch.float32)
        out.append(torch.sigmoid(module(batch).float()).cpu())
    return torch.cat(out) if out else torch.zeros(0)

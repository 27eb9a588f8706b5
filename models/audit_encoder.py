"""A small in-domain CNN whose penultimate embedding is the audit's feature space.

Fréchet distance and precision / recall are only as meaningful as the features they are
computed on. ImageNet Inception features know nothing about bone scans and would have to be
downloaded; instead the audit trains this network on the real training split to read the
findings (Perugini grade, metastases), so its embedding is sensitive to exactly what the
synthetic data must get right. The same architecture, smaller and with one logit, is the
pixel-level real-vs-synthetic critic.

The trunk is MONAI ``ResidualUnit`` blocks (strided, batch norm). Pooling keeps a coarse
vertical profile (``pool_rows`` bands) rather than one global average: where uptake sits on
the body (skull, heart, pelvis) is part of what a bone scan means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import ResidualUnit
from torch import nn


class AuditEncoder(nn.Module):
    """Residual CNN: (B, C, H, W) images to a ``feature_dim`` embedding and task logits.

    Args:
        in_channels: image channels (2: anterior and posterior views).
        feature_dim: size of the embedding the audit's metrics are computed on.
        heads: output size of each task head, e.g. ``{"grade": 4, "metastasis": 1}``.
        channels: channels of the strided residual stages (each halves H and W).
        pool_rows: horizontal bands kept by the pooling (coarse cranio-caudal position).
        dropout: dropout between the embedding and the heads (training only).
        subunits: convolutions per residual stage (1 keeps CPU training to seconds).
    """

    def __init__(
        self,
        in_channels: int,
        feature_dim: int,
        heads: Mapping[str, int],
        channels: Sequence[int] = (16, 32, 64, 128),
        pool_rows: int = 4,
        dropout: float = 0.2,
        subunits: int = 1,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            stages.append(ResidualUnit(spatial_dims=2, in_channels=previous, out_channels=width,
                                       strides=2, kernel_size=3, subunits=subunits,
                                       act="PRELU", norm="BATCH"))
            previous = width
        self.trunk = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d((pool_rows, 1))
        self.embed = nn.Linear(previous * pool_rows, feature_dim)
        self.head_act = nn.Sequential(nn.PReLU(), nn.Dropout(dropout))
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, size)
                                    for name, size in heads.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding (before any non-linearity: closer to Gaussian, as FID assumes)."""
        pooled = self.pool(self.trunk(images))
        return self.embed(pooled.flatten(1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head, keyed by head name."""
        hidden = self.head_act(self.features(images))
        return {name: head(hidden) for name, head in self.heads.items()}

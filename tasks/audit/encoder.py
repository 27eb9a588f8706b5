"""Train the in-domain feature encoder on the real training split; embed image sets with it.

A plain, seeded torch loop: a few epochs of a small network on about a thousand images do not
need Lightning's machinery, and a plain loop keeps the audit one process with no logger of its
own (its numbers go to the audit's MLflow run). Class-balanced losses, because the findings are
rare (Perugini 1-3 and metastases are a minority): an encoder that ignored them would give them
no feature directions, and the audit could not see a generator that gets them wrong.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from models.audit_encoder import AuditEncoder
from tasks.config import AuditEncoderConfig

GRADES = 4


@dataclass
class EncoderInfo:
    """What the audit reports about its encoder: training and held-out skill."""

    train_images: int
    epochs: int
    feature_dim: int
    parameters: int
    final_loss: float
    seconds: float
    heldout: dict[str, float] = field(default_factory=dict)


def pick_device() -> torch.device:
    """The GPU when there is one (the GPU profile's 512x128 images), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentation: a shift of up to 2 pixels and +-10 % intensity.

    Why: the features should not depend on exact pixel positions, or the encoder would
    memorise its training images and real training images would stand apart from everything
    else in feature space (which the two-sample test would then report as "synthetic").
    """
    b = images.shape[0]
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    shifted = torch.roll(images, shifts=(dy, dx), dims=(-2, -1))
    scale = 1.0 + 0.1 * (2 * torch.rand((b, 1, 1, 1), generator=gen) - 1)
    return (shifted * scale.to(images.device)).clamp_(0.0, 1.0)


def _loss_weights(grade: torch.Tensor, metastasis: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-square-root frequency weights of the grades; positive weight of metastases."""
    counts = torch.bincount(grade, minlength=GRADES).float().clamp_min(1.0)
    grade_w = (counts.sum() / counts).sqrt()
    grade_w = grade_w / grade_w.mean()
    positives = metastasis.sum().clamp_min(1.0)
    pos_w = ((len(metastasis) - positives) / positives).clamp(1.0, 10.0).sqrt()
    return grade_w, pos_w


def train_encoder(images: torch.Tensor, grade: np.ndarray, metastasis: np.ndarray,
                  cfg: AuditEncoderConfig, device: torch.device | None = None
                  ) -> tuple[AuditEncoder, EncoderInfo]:
    """Train the multi-task encoder (Perugini grade 4-way, metastasis yes/no).

    Args:
        images: (N, 2, H, W) real training images in [0, 1].
        grade: Perugini grade 0-3 per image.
        metastasis: metastasis label per image.
        cfg: epochs, batch size, learning rate, embedding size and seed.
        device: where to train (default: GPU if present).

    Returns:
        The trained network (in eval mode) and its training summary.
    """
    device = device or pick_device()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = AuditEncoder(images.shape[1], cfg.feature_dim, {"grade": GRADES, "metastasis": 1})
    model.to(device).train()
    y_grade = torch.tensor(np.asarray(grade, dtype=np.int64)).clamp(0, GRADES - 1)
    y_met = torch.tensor(np.asarray(metastasis, dtype=np.float32))
    grade_w, pos_w = (w.to(device) for w in _loss_weights(y_grade, y_met))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * max(1, -(-len(images) // cfg.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr, total_steps=steps)
    started, last = time.perf_counter(), float("nan")
    for _ in range(cfg.epochs):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            if len(batch) < 2:  # batch norm needs two samples
                continue
            x = jitter(images[batch], gen).to(device)
            out = model(x)
            loss = (F.cross_entropy(out["grade"], y_grade[batch].to(device), weight=grade_w)
                    + F.binary_cross_entropy_with_logits(
                        out["metastasis"][:, 0], y_met[batch].to(device), pos_weight=pos_w))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            last = float(loss.detach())
    model.eval()
    info = EncoderInfo(train_images=len(images), epochs=cfg.epochs, feature_dim=cfg.feature_dim,
                       parameters=sum(p.numel() for p in model.parameters()),
                       final_loss=last, seconds=time.perf_counter() - started)
    return model, info


@torch.no_grad()
def embed(model: AuditEncoder, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """(N, feature_dim) float64 features of ``images`` (eval mode, batched)."""
    device = next(model.parameters()).device
    model.eval()
    parts = [model.features(images[i:i + batch_size].to(device)).double().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, model.embed.out_features))


@torch.no_grad()
def heldout_skill(model: AuditEncoder, images: torch.Tensor, grade: np.ndarray,
                  metastasis: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Accuracy on the grade and AUC on metastases for held-out real images.

    Why: proof that the feature space encodes the findings; an encoder at chance would make
    every quality number meaningless, and the report should say so.
    """
    device = next(model.parameters()).device
    logits = {"grade": [], "metastasis": []}
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        for name in logits:
            logits[name].append(out[name].float().cpu())
    if not logits["grade"]:
        return {}
    pred = torch.cat(logits["grade"]).argmax(1).numpy()
    skill = {"grade_accuracy": float((pred == np.asarray(grade)).mean()),
             "amyloid_accuracy": float(((pred > 0) == (np.asarray(grade) > 0)).mean())}
    met = np.asarray(metastasis, dtype=bool)
    if 0 < met.sum() < len(met):
        skill["metastasis_auc"] = float(roc_auc_score(met, torch.cat(logits["metastasis"])[:, 0]))
    if 0 < (np.asarray(grade) > 0).sum() < len(met):
        amyloid_score = torch.cat(logits["grade"]).softmax(1)[:, 1:].sum(1).numpy()
        skill["amyloid_auc"] = float(roc_auc_score(np.asarray(grade) > 0, amyloid_score))
    return skill

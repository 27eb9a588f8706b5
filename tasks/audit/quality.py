"""Quality metrics of a synthetic image set against the real one.

- Fréchet distance of the encoder features (MONAI's implementation).
- Precision / recall (Kynkäänniemi et al. 2019) and density / coverage (Naeem et al. 2020),
  from k-nearest-neighbour balls in feature space: precision = share of synthetic samples
  inside the real manifold (fidelity), recall = share of real samples inside the synthetic
  manifold (diversity), coverage = share of real samples with a synthetic neighbour inside
  their own ball (diversity robust to outliers). No maintained library offers these on plain
  tensors here, so they are a few lines of ``torch.cdist``.
- MS-SSIM between random pairs of the same class (MONAI): lower = more diverse; the same
  number for real pairs is the reference.
- Two-sample classifier AUC (real vs synthetic, cross-validated; 0.5 = indistinguishable):
  logistic regression on the encoder features, and a small CNN on the pixels, which sees what
  the encoder may have learnt to ignore (noise texture, sharpness).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.fid import compute_frechet_distance, get_fid_score
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.audit_encoder import AuditEncoder

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Wang et al. 2003 scale weights; fewer scales use the first ones, renormalised."""


def frechet_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID on our encoder).

    Small sets give rank-deficient covariances whose matrix square root can pick up an
    imaginary part MONAI rejects; then both covariances get a small ridge, the usual remedy.
    """
    a = torch.as_tensor(synthetic, dtype=torch.float64)
    b = torch.as_tensor(real, dtype=torch.float64)
    try:
        value = get_fid_score(a, b)
    except ValueError:
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        ridge = 1e-6 * float(torch.trace(cov_a) + torch.trace(cov_b)) / a.shape[1]
        eye = torch.eye(a.shape[1], dtype=torch.float64) * max(ridge, 1e-10)
        value = compute_frechet_distance(a.mean(0), cov_a + eye, b.mean(0), cov_b + eye)
    return max(0.0, float(value))


def _kth_neighbour_radius(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest other point of the same set."""
    dist = torch.cdist(features, features)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def prdc(real: np.ndarray, synthetic: np.ndarray, k: int) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls.

    Args:
        real: (N, D) real features.
        synthetic: (M, D) synthetic features.
        k: neighbour rank of the ball radii; capped at the set size - 1.

    Returns:
        ``precision``, ``recall``, ``density``, ``coverage`` and the ``k`` used.
    """
    r = torch.as_tensor(real, dtype=torch.float64)
    s = torch.as_tensor(synthetic, dtype=torch.float64)
    k = max(1, min(k, len(r) - 1, len(s) - 1))
    real_radius = _kth_neighbour_radius(r, k)
    syn_radius = _kth_neighbour_radius(s, k)
    cross = torch.cdist(r, s)  # (N, M)
    inside_real = cross <= real_radius[:, None]  # synthetic j inside real i's ball
    inside_syn = cross <= syn_radius[None, :]  # real i inside synthetic j's ball
    return {
        "precision": float(inside_real.any(0).double().mean()),
        "recall": float(inside_syn.any(1).double().mean()),
        "density": float(inside_real.sum(0).double().mean() / k),
        "coverage": float((cross.min(1).values <= real_radius).double().mean()),
        "k": k,
    }


def msssim_setup(size: tuple[int, int], kernel: int = 7) -> tuple[int, tuple[float, ...]]:
    """Kernel size and scale weights that fit an image of ``size``.

    The standard 5 scales with an 11-pixel window need 176 pixels on the short side; a demo
    scan is 32 wide. Keep a 7-pixel window and as many scales as fit, so that MONAI's size
    check passes and the coarsest scale still has at least two window positions.
    """
    short = min(size)
    while kernel >= 3:
        for scales in range(len(MSSSIM_WEIGHTS), 0, -1):
            monai_div = max(1, scales - 1) ** 2
            if short // monai_div > kernel - 1 and short // 2 ** (scales - 1) >= kernel + 1:
                weights = np.asarray(MSSSIM_WEIGHTS[:scales]) / sum(MSSSIM_WEIGHTS[:scales])
                return kernel, tuple(float(w) for w in weights)
        kernel -= 2
    raise ValueError(f"images of size {size} are too small for MS-SSIM")


def msssim_pairs(images: torch.Tensor, pairs: int, seed: int, batch_size: int = 128
                 ) -> float | None:
    """Mean MS-SSIM over random distinct pairs of ``images`` (None with fewer than 2 images).

    Why random pairs of one class: the mean similarity of a class to itself is the standard
    mode-collapse signal (a collapsed class has MS-SSIM near 1); comparing it with the same
    number for real images of the class says whether the synthetic class is as varied.
    """
    n = len(images)
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    first = rng.integers(0, n, size=pairs)
    second = (first + rng.integers(1, n, size=pairs)) % n  # never the same image
    kernel, weights = msssim_setup(tuple(images.shape[-2:]))
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel,
                                  kernel_sigma=1.5, weights=weights, reduction="none")
    values = [metric(images[first[i:i + batch_size]], images[second[i:i + batch_size]])
              for i in range(0, pairs, batch_size)]
    return float(torch.cat(values).mean())


def two_sample_auc(real: np.ndarray, synthetic: np.ndarray, folds: int, seed: int
                   ) -> float | None:
    """Cross-validated AUC of a logistic regression telling synthetic from real features.

    Out-of-fold scores of all samples pooled into one AUC; 0.5 means the two sets cannot be
    told apart. None when a set is too small to fold.
    """
    folds = min(folds, len(real), len(synthetic))
    if folds < 2:
        return None
    x = np.concatenate([real, synthetic])
    y = np.r_[np.zeros(len(real), dtype=int), np.ones(len(synthetic), dtype=int)]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, x, y, cv=cv, method="decision_function")
    return float(roc_auc_score(y, scores))


@dataclass(frozen=True)
class CriticSettings:
    """Training settings of the pixel critic (taken from the audit's encoder settings)."""

    folds: int
    steps: int
    """Optimiser steps per fold: in steps, not epochs, so that a small synthetic set still
    gets a trained critic (a critic left at chance would report "indistinguishable")."""
    batch_size: int
    lr: float
    seed: int


def _train_critic(x: torch.Tensor, y: torch.Tensor, s: CriticSettings, fold: int,
                  device: torch.device) -> AuditEncoder:
    torch.manual_seed(s.seed + fold)
    gen = torch.Generator().manual_seed(s.seed + fold)
    critic = AuditEncoder(x.shape[1], 32, {"synthetic": 1}, channels=(8, 16, 32, 32)).to(device)
    optimiser = torch.optim.AdamW(critic.parameters(), lr=s.lr, weight_decay=1e-4)
    positives = float(y.sum())
    pos_weight = torch.tensor((len(y) - positives) / max(positives, 1.0), device=device)
    batch_size = max(2, min(s.batch_size, len(x)))  # batch norm needs two samples
    critic.train()
    done = 0
    while done < s.steps:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            logits = critic(x[batch].to(device))["synthetic"][:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, y[batch].to(device),
                                                      pos_weight=pos_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            done += 1
            if done == s.steps:
                break
    return critic.eval()


def pixel_two_sample_auc(real: torch.Tensor, synthetic: torch.Tensor, s: CriticSettings,
                         device: torch.device) -> float | None:
    """Cross-validated AUC of a small CNN telling synthetic from real images.

    Each fold trains a fresh critic on the other folds and scores its own images; the pooled
    out-of-fold scores give one AUC (0.5 = indistinguishable).
    """
    folds = min(s.folds, len(real), len(synthetic))
    if folds < 2:
        return None
    x = torch.cat([real, synthetic])
    y = np.r_[np.zeros(len(real)), np.ones(len(synthetic))]
    scores = np.zeros(len(y))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=s.seed)
    for fold, (train, test) in enumerate(cv.split(np.zeros(len(y)), y)):
        critic = _train_critic(x[train], torch.as_tensor(y[train], dtype=torch.float32), s,
                               fold, device)
        with torch.no_grad():
            scores[test] = torch.cat([
                critic(x[test[i:i + 256]].to(device))["synthetic"][:, 0].float().cpu()
                for i in range(0, len(test), 256)]).numpy()
    return float(roc_auc_score(y, scores))


def feature_metrics(real: np.ndarray, synthetic: np.ndarray, k: int, folds: int, seed: int
                    ) -> dict[str, float | int | None]:
    """FID, precision / recall / density / coverage and feature two-sample AUC of one pair."""
    out: dict[str, float | int | None] = {"n_real": len(real), "n_synthetic": len(synthetic)}
    if min(len(real), len(synthetic)) < 2:
        return out | {"fid": None, "precision": None, "recall": None, "density": None,
                      "coverage": None, "k": None, "two_sample_auc": None}
    out["fid"] = frechet_distance(real, synthetic)
    out.update(prdc(real, synthetic, k))
    out["two_sample_auc"] = two_sample_auc(real, synthetic, folds, seed)
    return {key: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for key, v in out.items()}

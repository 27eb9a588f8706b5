"""Memorisation check: every synthetic image against its nearest real training image.

Similarity is normalised cross-correlation (NCC) of the whole image, both views together:
each image is flattened, centred and scaled to unit norm, so NCC is one matrix product and
is blind to overall brightness (injected activity, display scaling), which a copy need not
keep. The threshold is not a guess: it is a high quantile of the same similarity for real
held-out images of the training site, i.e. how close a genuinely new scan from the same
population comes to the training set. A synthetic image closer than that is withheld.
SSIM of each nearest pair is reported beside it (structural agreement, an independent view).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import SSIMMetric


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, ...) images to (N, D) zero-mean, unit-norm rows (a blank image stays zero)."""
    flat = images.reshape(len(images), -1).float()
    flat = flat - flat.mean(1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def nearest_ncc(queries: torch.Tensor, reference: torch.Tensor, device: torch.device,
                chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Nearest reference image of every query by NCC.

    Args:
        queries: (M, C, H, W) images.
        reference: (N, C, H, W) images of the same size.
        device: where the products run.
        chunk: queries per matrix product (bounds memory at M x N).

    Returns:
        (M,) position of the nearest reference image and (M,) its NCC.
    """
    ref = normalise(reference).to(device)
    best_idx, best_val = [], []
    for start in range(0, len(queries), chunk):
        q = normalise(queries[start:start + chunk]).to(device)
        values, idx = (q @ ref.T).clamp_(-1.0, 1.0).max(dim=1)  # rounding can pass 1
        best_idx.append(idx.cpu())
        best_val.append(values.float().cpu())
    if not best_idx:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return torch.cat(best_idx).numpy(), torch.cat(best_val).double().numpy()


def ssim_window(size: tuple[int, int]) -> int:
    """Gaussian SSIM window that fits the image (7, or the largest odd size that fits)."""
    window = min(7, min(size) - (1 - min(size) % 2))
    if window < 3:
        raise ValueError(f"images of size {size} are too small for SSIM")
    return window


@torch.no_grad()
def pair_ssim(a: torch.Tensor, b: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """SSIM (MONAI, data range 1) of each image pair ``a[i]``, ``b[i]``, both views averaged."""
    metric = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=ssim_window(a.shape[-2:]),
                        kernel_sigma=1.5, reduction="none")
    parts = [metric(a[i:i + batch_size], b[i:i + batch_size]).reshape(-1)
             for i in range(0, len(a), batch_size)]
    return torch.cat(parts).double().numpy() if parts else np.zeros(0)


@dataclass
class PrivacyCheck:
    """Nearest-neighbour similarities, the threshold and the decision per synthetic image."""

    quantile: float
    threshold_ncc: float
    threshold_ssim: float
    heldout_ncc: np.ndarray
    heldout_ssim: np.ndarray
    nearest: np.ndarray
    """Position (in the training set handed in) of each synthetic image's nearest image."""
    ncc: np.ndarray
    ssim: np.ndarray
    withheld: np.ndarray
    """Boolean per synthetic image: over the NCC threshold, not released."""


def check_privacy(synthetic: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor,
                  quantile: float, device: torch.device) -> PrivacyCheck:
    """Find each synthetic image's nearest training image and withhold those too close.

    Args:
        synthetic: (M, C, H, W) synthetic images.
        train: (N, C, H, W) every real training image, at the synthetic resolution.
        heldout: (H, C, H, W) real held-out images of the training site.
        quantile: threshold = this quantile of the held-out images' nearest NCC.
        device: where the matrix products run.
    """
    if len(heldout) == 0:
        raise ValueError("no held-out real images to set the privacy threshold from")
    h_idx, h_ncc = nearest_ncc(heldout, train, device)
    h_ssim = pair_ssim(heldout, train[torch.as_tensor(h_idx)])
    threshold = float(np.quantile(h_ncc, quantile))
    s_idx, s_ncc = nearest_ncc(synthetic, train, device)
    s_ssim = pair_ssim(synthetic, train[torch.as_tensor(s_idx)])
    return PrivacyCheck(
        quantile=quantile, threshold_ncc=threshold,
        threshold_ssim=float(np.quantile(h_ssim, quantile)),
        heldout_ncc=h_ncc, heldout_ssim=h_ssim, nearest=s_idx, ncc=s_ncc, ssim=s_ssim,
        withheld=s_ncc > threshold)


def summary(values: np.ndarray) -> dict[str, float | None]:
    """Min, quartiles, 99th percentile and max of a similarity distribution."""
    if len(values) == 0:
        return {k: None for k in ("min", "p25", "median", "p75", "p99", "max")}
    q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 0.99, 1.0])
    return dict(zip(("min", "p25", "median", "p75", "p99", "max"),
                    (round(float(v), 6) for v in q), strict=True))

"""How well a heat map points at the true finding: pointing game and energy inside the mask.

- Pointing game (Zhang et al., IJCV 2018): a hit when the hottest region of the heat map (the
  maximum after a little smoothing, over both views) lies inside the true finding, or within
  ``tolerance`` pixels of it.
- Energy fraction: the share of the heat map's total inside the mask.

Neither number means much alone: a finding that covers a third of the body is hit by chance a
third of the time. So each comes with what a heat map spread evenly over the body would score
(the mask's share of the body's pixels), and the report shows both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.stats import binomtest

BODY_LEVEL = 0.01
"""Stored intensity above which a pixel counts as body (the background is near 0)."""


@dataclass(frozen=True)
class Score:
    """One heat map against one mask.

    Attributes:
        hit: the pointing game.
        energy_fraction: share of the heat inside the mask (NaN for an all-zero heat map).
        mask_share: share of the body's pixels in the mask (the uniform heat map's energy
            fraction, and about its chance of a hit).
        peak_view: view of the hottest point (0 anterior, 1 posterior).
        peak: (row, col) of the hottest point.
    """

    hit: bool
    energy_fraction: float
    mask_share: float
    peak_view: int
    peak: tuple[int, int]


def score(heat: np.ndarray, mask: np.ndarray, body: np.ndarray | None = None, *,
          tolerance: int = 0, smooth_sigma: float = 0.0) -> Score:
    """Score a (2, rows, cols) heat map against a boolean (2, rows, cols) mask.

    Args:
        heat: non-negative heat per pixel and view.
        mask: where the finding truly is.
        body: where the body is (default: everywhere), for the chance level.
        tolerance: pixels a hit may lie outside the mask.
        smooth_sigma: Gaussian smoothing (pixels, per view) before the maximum is taken.

    Raises:
        ValueError: shapes differ or the mask is empty (nothing to point at).
    """
    heat = np.asarray(heat, np.float64)
    mask = np.asarray(mask, bool)
    if heat.shape != mask.shape or heat.ndim != 3:
        raise ValueError(f"heat {heat.shape} and mask {mask.shape} must be the same "
                         "(views, rows, cols)")
    if not mask.any():
        raise ValueError("the mask is empty: there is no finding to point at")
    smooth = (np.stack([gaussian_filter(v, smooth_sigma) for v in heat]) if smooth_sigma > 0
              else heat)
    view, row, col = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    target = (np.stack([binary_dilation(m, iterations=tolerance) for m in mask])
              if tolerance > 0 else mask)
    total = float(np.clip(heat, 0, None).sum())
    inside = float(np.clip(heat, 0, None)[mask].sum())
    body = np.ones_like(mask) if body is None else np.asarray(body, bool) | mask
    return Score(hit=bool(target[view, row, col]),
                 energy_fraction=inside / total if total > 0 else math.nan,
                 mask_share=float(mask.sum() / max(int(body.sum()), 1)),
                 peak_view=int(view), peak=(int(row), int(col)))


def summarise(scores: list[Score]) -> dict[str, float | int | list[float] | None]:
    """Hit rate (with its exact 95 % CI) and energy fractions, beside their chance levels."""
    n = len(scores)
    if n == 0:
        return {"n": 0, "pointing_game": None, "pointing_game_ci95": None,
                "energy_fraction_mean": None, "energy_fraction_median": None,
                "mask_share_mean": None}
    hits = sum(s.hit for s in scores)
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="exact")
    energy = np.array([s.energy_fraction for s in scores], float)
    energy = energy[np.isfinite(energy)]
    return {
        "n": n,
        "hits": hits,
        "pointing_game": hits / n,
        "pointing_game_ci95": [float(ci.low), float(ci.high)],
        "energy_fraction_mean": float(energy.mean()) if energy.size else None,
        "energy_fraction_median": float(np.median(energy)) if energy.size else None,
        "mask_share_mean": float(np.mean([s.mask_share for s in scores])),
    }


def as_record(s: Score) -> dict:
    """A JSON-ready form of one score."""
    return {**asdict(s), "peak": list(s.peak)}

"""From an activity map to the counts a dual-head gamma camera records.

For each depth layer and each head: attenuation by the tissue in front of it
(exp(-mu d), broad-beam mu for 140 keV in soft tissue), collimator blur that grows with the
distance to the collimator (LEHR resolution is quoted at 10 cm), the share of scattered
photons the energy window accepts (spread over centimetres, it lowers contrast), then scaling
to the site's total counts, a flat room/scatter background and Poisson counting noise. The
posterior view is mirrored, as cameras display it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from tasks.phantom.canvas import Canvas

MU_PER_CM = 0.11
"""Effective (broad-beam, scatter in the window) attenuation of 140 keV photons in tissue."""

# Depth of each layer as a fraction of the torso thickness, measured from the front.
LAYER_DEPTH = {"front": 0.18, "mid": 0.5, "back": 0.8}
LIMB_THICKNESS_CM = 11.0
COLLIMATOR_GAP_CM = 3.0


@dataclass(frozen=True)
class Acquisition:
    """What the camera and protocol contribute."""

    fwhm_mm_at_10cm: float
    pixel_mm: float
    total_counts: float  # expected counts in the anterior view
    background_per_pixel: float
    intensity_scale: float
    scatter_fraction: float = 0.0


SCATTER_FWHM_MM = 60.0
"""Width of the scatter spread: scattered photons land centimetres from where they left."""


def fwhm_mm(fwhm_at_10cm: float, distance_cm: float) -> float:
    """System resolution at a distance: intrinsic part plus a term growing with distance."""
    return fwhm_at_10cm * (0.45 + 0.055 * max(distance_cm, 0.0))


def project(cv: Canvas, thickness_cm: float, acq: Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """Expected (noise-free) anterior and posterior images, in arbitrary activity units."""
    views = []
    for view in ("anterior", "posterior"):
        total = np.zeros((cv.rows, cv.cols), np.float32)
        for name, layer in cv.layers.items():
            if not layer.any():
                continue
            if name == "periph":
                depth, thick = 0.5 * LIMB_THICKNESS_CM, LIMB_THICKNESS_CM
            else:
                depth, thick = LAYER_DEPTH[name] * thickness_cm, thickness_cm
            d = depth if view == "anterior" else thick - depth
            sigma_px = fwhm_mm(acq.fwhm_mm_at_10cm, d + COLLIMATOR_GAP_CM) / 2.355 / acq.pixel_mm
            total += np.exp(-MU_PER_CM * d) * gaussian_filter(layer, sigma_px, truncate=3.0)
        if view == "anterior":
            total *= gaussian_filter(cv.ant_transmission, 2.0)
        if acq.scatter_fraction > 0:
            sigma_px = SCATTER_FWHM_MM / 2.355 / acq.pixel_mm
            total = ((1.0 - acq.scatter_fraction) * total
                     + acq.scatter_fraction * gaussian_filter(total, sigma_px, truncate=3.0))
        views.append(total)
    ant, post = views
    return ant, post[:, ::-1]


def acquire(ant: np.ndarray, post: np.ndarray, acq: Acquisition,
            rng: np.random.Generator) -> np.ndarray:
    """Scale to counts, add background, draw Poisson noise; returns uint16 (2, rows, cols).

    Both heads see the same activity, so one scale (set by the anterior view's total) is
    used for both and the posterior keeps its own, attenuation-determined, total.
    """
    k = acq.total_counts / max(float(ant.sum()), 1e-9)
    out = np.empty((2, *ant.shape), np.uint16)
    for i, img in enumerate((ant, post)):
        lam = np.clip(img * k, 0, None) + acq.background_per_pixel
        counts = rng.poisson(lam).astype(np.float64) * acq.intensity_scale
        out[i] = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return out

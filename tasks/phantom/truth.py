"""Ground-truth finding masks: where on each view the phantom drew a finding.

Why: the diffusion model's counterfactual heat maps (``synthdx explain``) are only worth
showing if they point at the disease, and only a simulator knows exactly where that is. The
phantom keeps the activity each finding added (the cardiac uptake of amyloidosis, the lesions
or superscan foci of metastases), projects it through the same camera model as the scan
(attenuation, collimator blur, scatter, posterior mirrored) and marks the pixels where that
finding makes up a real share of the expected counts. The folder's layout is
tasks/artifacts/truth_masks.py; the masks never go into the DICOM files.

What is not in a mask: the diffuse changes that come with a finding (grade-3 soft tissue and
faint bone, a superscan's intense skeleton and faint kidneys) are everywhere, so a mask of them
would be the whole body; the masks hold the focal part (the heart, the lesions and foci).
"""

from __future__ import annotations

import numpy as np

from tasks.phantom.canvas import Canvas
from tasks.phantom.physics import Acquisition, project

SHARE_OF_COUNTS = 0.2
"""A pixel belongs to a finding when the finding adds at least this share of its expected
counts: the lesion stands out of the bone it sits on, the heart out of the chest wall."""

SHARE_OF_PEAK = 0.02
"""...and at least this share of the finding's own brightest pixel, so the far tails of a
bright lesion's blur over an empty background do not count."""

RULE = {"share_of_counts": SHARE_OF_COUNTS, "share_of_peak": SHARE_OF_PEAK}
"""How the masks were drawn, recorded in TRUTH.json."""


def snapshot(cv: Canvas) -> dict[str, np.ndarray]:
    """A copy of the canvas layers, taken before a finding is drawn."""
    return {name: layer.copy() for name, layer in cv.layers.items()}


def added_since(cv: Canvas, before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The activity drawn on ``cv`` since ``before`` was taken, per layer."""
    return {name: cv.layers[name] - before[name] for name in cv.layers}


def finding_mask(cv: Canvas, added: dict[str, np.ndarray], thickness_cm: float,
                 acq: Acquisition, expected: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Boolean (2, rows, cols) mask of one finding's footprint on both views.

    Args:
        cv: the study's canvas (its pixel grid and anterior transmission are reused).
        added: the finding's own activity per layer (``added_since``); cold lesions are
            negative, so the magnitude is compared.
        thickness_cm: the patient's torso thickness (attenuation and blur depend on it).
        acq: the study's acquisition.
        expected: the noise-free anterior and posterior projections of the whole scan.
    """
    if not any(np.any(layer) for layer in added.values()):
        return np.zeros((2, cv.rows, cv.cols), bool)
    part = Canvas(cv.rows, cv.cols, cv.pixel_mm, cv.origin, layers=added,
                  ant_transmission=cv.ant_transmission)
    out = []
    for finding, total in zip(project(part, thickness_cm, acq), expected, strict=True):
        size = np.abs(finding)
        peak = float(size.max())
        out.append((size >= SHARE_OF_COUNTS * np.maximum(total, 0.0))
                   & (size >= SHARE_OF_PEAK * peak) & (size > 0))
    return np.stack(out)

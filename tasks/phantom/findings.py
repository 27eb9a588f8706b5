"""Disease and its look-alikes, added on top of the normal scan.

Findings are drawn relative to the local bone uptake recorded in the anchors, so a lesion of
"contrast 2" is twice the bone it sits in whatever the patient's overall uptake is.

- Cardiac uptake graded by Perugini: 0 none; 1 less than bone (ribs); 2 about equal to bone
  with some bone attenuation; 3 greater than bone with faint bone and raised soft tissue.
- Metastases: multiple asymmetric foci, ~90 % in the axial skeleton and proximal long bones,
  rib lesions elongated along the rib, a few cold (lytic) defects; superscans with diffusely
  intense skeleton, faint kidneys and low soft tissue.
- Confounders that are *not* disease: degenerative joint uptake (knees, shoulders, lower
  lumbar facets, hands, feet), an injection-site hot spot, urine contamination, and rib
  fractures lined up on adjacent ribs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tasks.phantom.anatomy import Anchor, Anchors
from tasks.phantom.canvas import Canvas

# Where metastases go (relative weights), after the published axial predominance.
MET_REGIONS = {"spine": 0.36, "pelvis": 0.18, "rib": 0.2, "si": 0.03, "skull": 0.05,
               "sternum": 0.04, "scapula": 0.04, "femur": 0.06, "humerus": 0.03,
               "cspine": 0.01}


@dataclass
class FindingsRecord:
    """What was drawn, for the labels file and the montage."""

    perugini_grade: int = 0
    metastasis: bool = False
    superscan: bool = False
    lesion_count: int = 0
    degenerative: bool = False
    injection_site: bool = False
    urine_contamination: bool = False
    fracture: bool = False
    notes: list[str] = field(default_factory=list)


def _pick(rng: np.random.Generator, anchors: list[Anchor]) -> Anchor:
    return anchors[int(rng.integers(len(anchors)))]


def _jitter(rng: np.random.Generator, a: Anchor, mm: float) -> tuple[float, float]:
    return a.x + rng.normal(0, mm), a.y + rng.normal(0, mm)


def cardiac_modifiers(grade: int, rng: np.random.Generator, tracer: str) -> tuple[float, float]:
    """How a Perugini grade changes the rest of the scan: (bone factor, soft-tissue factor).

    Grade 2 attenuates bone a little; grade 3 leaves bone faint and raises soft tissue
    (more so with DPD). Applied to the body before it is drawn.
    """
    if grade <= 1:
        return 1.0, 1.0
    if grade == 2:
        return float(rng.uniform(0.8, 1.0)), 1.0
    soft = float(rng.uniform(1.6, 2.4) * (1.2 if tracer == "DPD" else 1.0))
    return float(rng.uniform(0.35, 0.6)), soft


def superscan_modifiers(rng: np.random.Generator) -> dict[str, float]:
    """Superscan: skeleton takes up nearly all tracer; kidneys, bladder, soft tissue fade."""
    return {"bone": float(rng.uniform(1.8, 2.6)), "soft": float(rng.uniform(0.3, 0.6)),
            "kidney": float(rng.uniform(0.0, 0.15)), "bladder": float(rng.uniform(0.2, 0.5))}


TRACER_CARDIAC_AVIDITY = {"DPD": 1.0, "HMDP": 0.85, "MDP": 0.55}
"""How strongly each tracer binds transthyretin amyloid, relative to DPD.

DPD and HMDP are the recommended tracers for ATTR; MDP binds it weakly, so the same disease
looks a grade milder on an MDP scan (a real source of missed amyloidosis between sites).
"""

PERUGINI_RELATIVE_UPTAKE = {1: (0.25, 0.7), 2: (0.6, 1.2), 3: (1.3, 2.4)}
"""Cardiac uptake relative to rib uptake per grade (DPD). The ranges of grades 1 and 2 overlap
on purpose: readers disagree most on that boundary, which is the positive threshold."""


def add_cardiac(cv: Canvas, anchors: Anchors, grade: int, rng: np.random.Generator,
                tracer: str = "DPD") -> None:
    """Myocardial uptake for a Perugini grade, relative to the patient's rib uptake.

    Grade 0 still has a faint blood pool. The myocardium is a hollow ellipsoid whose long
    axis points down to the patient's left, behind the sternum. The grade is the disease's
    (the label); how bright it looks also depends on the tracer's affinity for amyloid.
    """
    heart = anchors.region("heart")[0]
    if grade == 0:
        cv.ellipse("front", (heart.x, heart.y), (58, 46), 0.012, angle_deg=-35, profile="dome")
        return
    rib = float(np.mean([a.uptake for a in anchors.region("rib")]))
    lo, hi = PERUGINI_RELATIVE_UPTAKE[grade]
    rel = rng.uniform(lo, hi) * TRACER_CARDIAC_AVIDITY[tracer]
    size = rng.uniform(0.9, 1.15)
    cv.ellipse("front", (heart.x + rng.normal(0, 5), heart.y + rng.normal(0, 6)),
               (62 * size, 45 * size), rel * rib * 2.1, angle_deg=-35 + rng.normal(0, 6),
               profile="shell", inner=0.55)


def add_metastases(cv: Canvas, anchors: Anchors, rng: np.random.Generator,
                   superscan: bool) -> int:
    """Focal lesions (or a superscan). Returns the number of focal lesions drawn."""
    if superscan:  # diffuse, heterogeneous axial uptake on an already intense skeleton
        n = int(rng.integers(15, 40))
        axial = anchors.region("spine", "pelvis", "rib", "sternum", "skull")
        for _ in range(n):
            a = _pick(rng, axial)
            cv.blob(a.layer, _jitter(rng, a, 8), rng.uniform(6, 14),
                    a.uptake * rng.uniform(0.3, 0.9))
        return 0
    n = int(np.clip(np.round(np.exp(rng.normal(np.log(4), 0.9))), 1, 35))
    regions = list(MET_REGIONS)
    weights = np.array([MET_REGIONS[r] for r in regions])
    weights /= weights.sum()
    for _ in range(n):
        region = regions[int(rng.choice(len(regions), p=weights))]
        cands = anchors.region(region)
        if not cands:
            continue
        a = _pick(rng, cands)
        size = rng.uniform(4.5, 12.0)
        contrast = float(np.exp(rng.normal(np.log(1.6), 0.45)))
        if rng.random() < 0.06:  # lytic (cold) defect
            cv.blob(a.layer, _jitter(rng, a, 3), size * 1.2, -0.7 * a.uptake)
            continue
        if region == "rib":
            cv.blob(a.layer, _jitter(rng, a, 4), (size * 1.8, size * 0.8), contrast * a.uptake,
                    angle_deg=a.angle)
        else:
            cv.blob(a.layer, _jitter(rng, a, 5 if region != "spine" else 3), size,
                    contrast * a.uptake * 1.4)
    return n


def add_degenerative(cv: Canvas, anchors: Anchors, rng: np.random.Generator,
                     age: float) -> bool:
    """Degenerative joint uptake, more with age and often symmetric."""
    p = 0.75 / (1 + np.exp(-(age - 62) / 7))
    drawn = False
    for region, weight in (("knee", 1.0), ("shoulder", 0.7), ("facet", 0.6), ("hand", 0.4),
                           ("foot", 0.4), ("hip", 0.3)):
        if rng.random() > p * weight:
            continue
        cands = anchors.region(region)
        sym = rng.random() < 0.6
        chosen = cands if sym else [_pick(rng, cands)]
        for a in chosen:
            cv.blob(a.layer, _jitter(rng, a, 3), rng.uniform(5, 9),
                    a.uptake * rng.uniform(0.4, 1.1))
        drawn = True
    return drawn


def add_injection_site(cv: Canvas, anchors: Anchors, rng: np.random.Generator) -> None:
    """Paravenous tracer at the antecubital fossa of one arm."""
    a = _pick(rng, anchors.region("elbow"))
    cv.blob("periph", _jitter(rng, a, 6), rng.uniform(3, 7),
            float(np.exp(rng.normal(np.log(1.5), 0.8))))


def add_urine_contamination(cv: Canvas, anchors: Anchors, rng: np.random.Generator,
                            height: float) -> None:
    """Hot spots outside the skeleton near the groin or on the thigh (skin or clothing)."""
    for _ in range(int(rng.integers(1, 3))):
        x = rng.normal(0, 40)
        y = height * rng.uniform(0.6, 0.7)
        cv.blob(rng.choice(["front", "back"]), (x, y), rng.uniform(3, 8),
                float(np.exp(rng.normal(np.log(2.0), 0.6))))


def add_rib_fractures(cv: Canvas, anchors: Anchors, rng: np.random.Generator) -> None:
    """Focal spots lined up on 2-4 adjacent ribs: the pattern that tells trauma from metastasis."""
    ribs = anchors.region("rib")
    side = int(rng.choice([-1, 1]))
    layer = str(rng.choice(["front", "back"]))
    first = int(rng.integers(3, 9))
    count = int(rng.integers(2, 5))
    per_rib = {}
    for a in ribs:
        if a.side == side and a.layer == layer and first <= a.index < first + count:
            per_rib.setdefault(a.index, []).append(a)
    slot = int(rng.integers(0, 2))
    for idx in sorted(per_rib):
        group = per_rib[idx]
        a = group[min(slot, len(group) - 1)]
        cv.blob(a.layer, (a.x, a.y), (6, 4), a.uptake * rng.uniform(1.2, 2.2), angle_deg=a.angle)

"""Render one study: body, findings, physics -> uint16 anterior/posterior counts."""

from __future__ import annotations

import dataclasses

import numpy as np

from tasks.artifacts.truth_masks import FINDINGS
from tasks.config import SiteConfig
from tasks.phantom.anatomy import draw_normal, sample_body
from tasks.phantom.canvas import Canvas
from tasks.phantom.findings import (
    FindingsRecord,
    add_cardiac,
    add_degenerative,
    add_injection_site,
    add_metastases,
    add_rib_fractures,
    add_urine_contamination,
    cardiac_modifiers,
    superscan_modifiers,
)
from tasks.phantom.physics import Acquisition, acquire, project
from tasks.phantom.population import StudySpec
from tasks.phantom.truth import added_since, finding_mask, snapshot

TRACER_SOFT_TISSUE = {"DPD": 1.35, "HMDP": 1.1, "MDP": 1.0}
"""DPD gives more soft-tissue retention than the other diphosphonates."""


def effective_pixel_mm(site: SiteConfig, rows: int) -> float:
    """Pixel size for the configured matrix: the camera's field of view stays the same."""
    return site.camera.pixel_mm * 1024.0 / rows


def render_study(spec: StudySpec, site: SiteConfig, rows: int, cols: int,
                 confounders: bool = True) -> tuple[np.ndarray, FindingsRecord, dict]:
    """Render one study.

    Returns:
        (views uint16 (2, rows, cols), what was drawn, acquisition facts for the header).
    """
    views, rec, facts, _ = render_study_with_truth(spec, site, rows, cols, confounders,
                                                   truth=False)
    return views, rec, facts


def render_study_with_truth(spec: StudySpec, site: SiteConfig, rows: int, cols: int,
                            confounders: bool = True, truth: bool = True
                            ) -> tuple[np.ndarray, FindingsRecord, dict,
                                       dict[str, np.ndarray] | None]:
    """Render one study and, with ``truth``, where its findings are (tasks/phantom/truth.py).

    The masks come from copies of the activity taken around each finding, so asking for
    them draws no random numbers and changes no pixel of the scan.

    Returns:
        As ``render_study``, plus the boolean (2, rows, cols) mask of each finding kind
        (``truth.FINDINGS``), or None without ``truth``.
    """
    rng = np.random.default_rng(spec.seed)
    cam = site.camera
    body = sample_body(rng, spec.sex, spec.age, spec.bmi, spec.height_m)
    bone_f, soft_f = cardiac_modifiers(spec.perugini_grade, rng, cam.tracer)
    soft_f *= TRACER_SOFT_TISSUE[cam.tracer]
    kidney_f = bladder_f = 1.0
    if spec.superscan:
        m = superscan_modifiers(rng)
        bone_f, soft_f = bone_f * m["bone"], soft_f * m["soft"]
        kidney_f, bladder_f = m["kidney"], m["bladder"]
    body = dataclasses.replace(
        body, bone_uptake=body.bone_uptake * bone_f, soft_tissue=body.soft_tissue * soft_f,
        kidney_uptake=body.kidney_uptake * kidney_f * bone_f,
        bladder_uptake=body.bladder_uptake * bladder_f)

    pixel = effective_pixel_mm(site, rows)
    body_rows = body.height / pixel
    top = float(np.clip(rng.uniform(12, 60), 4, max(rows - body_rows - 6, 4)))
    cv = Canvas(rows, cols, pixel, (cols / 2.0, top))
    anchors = draw_normal(cv, body, rng)

    rec = FindingsRecord(perugini_grade=spec.perugini_grade, metastasis=spec.metastasis,
                         superscan=spec.superscan)
    before = snapshot(cv) if truth else {}
    add_cardiac(cv, anchors, spec.perugini_grade, rng, cam.tracer)
    added = {}
    if truth and spec.perugini_grade >= 1:  # grade 0 draws only the normal blood pool
        added["amyloid"] = added_since(cv, before)
    if spec.metastasis:
        before = snapshot(cv) if truth else {}
        rec.lesion_count = add_metastases(cv, anchors, rng, spec.superscan)
        if truth:
            added["metastasis"] = added_since(cv, before)
    if confounders:
        rec.degenerative = add_degenerative(cv, anchors, rng, spec.age)
        if rng.random() < 0.3:
            add_injection_site(cv, anchors, rng)
            rec.injection_site = True
        if rng.random() < 0.08:
            add_urine_contamination(cv, anchors, rng, body.height)
            rec.urine_contamination = True
        if rng.random() < 0.06:
            add_rib_fractures(cv, anchors, rng)
            rec.fracture = True
    for layer in cv.layers.values():
        np.clip(layer, 0, None, out=layer)

    counts = (cam.counts_millions * 1e6 * float(np.exp(rng.normal(0, 0.18)))
              * float(np.exp(-0.02 * (spec.bmi - 26))))
    acq = Acquisition(fwhm_mm_at_10cm=cam.fwhm_mm_at_10cm, pixel_mm=pixel,
                      total_counts=counts, background_per_pixel=cam.background_cps,
                      intensity_scale=cam.intensity_scale,
                      scatter_fraction=cam.scatter_fraction)
    ant, post = project(cv, body.thickness_cm, acq)
    views = acquire(ant, post, acq, rng)
    facts = {"weight_kg": spec.bmi * spec.height_m**2, "height_m": spec.height_m,
             "pixel_mm": pixel, "dose_mbq": float(rng.uniform(500, 740))}
    if not truth:
        return views, rec, facts, None
    empty = np.zeros((2, rows, cols), bool)
    masks = {kind: (finding_mask(cv, added[kind], body.thickness_cm, acq, (ant, post))
                    if kind in added else empty) for kind in FINDINGS}
    return views, rec, facts, masks

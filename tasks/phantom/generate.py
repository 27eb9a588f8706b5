"""Generate the phantom dataset: DICOM files, labels.csv, PHANTOM.json and a montage.

Layout of the output folder::

    dicom/<site>/study_00042/NM000001.dcm   one NM study per file (no identity in paths)
    labels.csv                              one row per study (format: see README)
    PHANTOM.json                            provenance: seed, sites, counts, labels digest
    montage.png                             example scans per site and finding

and, beside it (``phantom.truth_folder``, e.g. data/truth), the finding masks of every study
(tasks/phantom/truth.py): evaluation-only ground truth, never part of the DICOM archive.

The dataset is a pure function of the phantom parameters: studies are sampled in the parent
process and each is rendered from its own seed, so worker count does not change a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import pandas as pd

from tasks.artifacts.truth_masks import mask_path, write_study_masks, write_truth_meta
from tasks.common.atomic import atomic_dir
from tasks.config import PhantomConfig, SiteConfig
from tasks.phantom.dicom_writer import StudyHeader, write_study
from tasks.phantom.identity import make_identity
from tasks.phantom.population import StudySpec, sample_studies
from tasks.phantom.render import render_study_with_truth
from tasks.phantom.truth import RULE

LABEL_COLUMNS = ["study_uid", "patient_id", "site", "perugini_grade", "metastasis", "sex", "age",
                 "bmi", "tracer", "superscan", "lesion_count", "degenerative", "injection_site",
                 "urine_contamination", "fracture"]


@dataclass(frozen=True)
class PhantomSummary:
    """What the phantom wrote, for the CLI and the flow."""

    output: Path
    patients: int
    studies: int
    per_site: dict[str, int]
    positives: dict[str, int]
    seconds: float
    montage: Path

    def describe(self) -> str:
        """A short human-readable summary."""
        sites = ", ".join(f"{k}: {v}" for k, v in self.per_site.items())
        pos = ", ".join(f"{k}: {v}" for k, v in self.positives.items())
        return (f"phantom: {self.studies} studies of {self.patients} patients in "
                f"{self.seconds:.1f} s -> {self.output}\n  per site: {sites}\n"
                f"  positives: {pos}\n  labels: {self.output / 'labels.csv'}\n"
                f"  montage: {self.montage}")


def _render_and_write(args: tuple[list[StudySpec], dict[str, dict], int, int, bool, str,
                                   str | None]) -> list[dict]:
    """Worker: render and write a chunk of studies (and their masks); return their label rows."""
    specs, sites_json, rows, cols, confounders, dicom_root, truth_root = args
    sites = {name: SiteConfig.model_validate(s) for name, s in sites_json.items()}
    out = []
    for spec in specs:
        site = sites[spec.site]
        views, rec, facts, masks = render_study_with_truth(spec, site, rows, cols, confounders,
                                                           truth=truth_root is not None)
        if truth_root is not None and masks is not None:
            write_study_masks(mask_path(Path(truth_root), spec.relpath), masks)
        ident = make_identity(spec.patient_seed, spec.seed, spec.sex, spec.birth_date, site.role,
                              spec.study_date)
        cam = site.camera
        head = StudyHeader(
            sex=spec.sex, age_years=int(spec.age), weight_kg=round(facts["weight_kg"], 1),
            height_m=spec.height_m, institution=site.institution,
            institution_address=f"1 Hospital Road, {site.city}", manufacturer=cam.manufacturer,
            model=cam.model, tracer=cam.tracer, dose_mbq=facts["dose_mbq"],
            pixel_mm=facts["pixel_mm"], scan_speed_cm_min=cam.scan_speed_cm_min,
            frame_duration_ms=int(rows * facts["pixel_mm"] / 10 / cam.scan_speed_cm_min * 60000),
            uid_seed=f"synthdx-phantom-{spec.seed}-{spec.study_index}")
        path = Path(dicom_root) / spec.relpath
        write_study(path, views, ident, head, cam.transfer_syntax)
        from pydicom import dcmread  # local: only the UID is needed back

        uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                  .StudyInstanceUID)
        out.append({
            "study_uid": uid, "patient_id": None, "patient_seed": spec.patient_index,
            "ident_patient_id": ident.patient_id, "site": spec.site,
            "perugini_grade": rec.perugini_grade, "metastasis": int(rec.metastasis),
            "sex": spec.sex, "age": int(spec.age), "bmi": round(spec.bmi, 1),
            "tracer": cam.tracer, "superscan": int(rec.superscan),
            "lesion_count": rec.lesion_count, "degenerative": int(rec.degenerative),
            "injection_site": int(rec.injection_site),
            "urine_contamination": int(rec.urine_contamination), "fracture": int(rec.fracture),
            "study_index": spec.study_index, "relpath": spec.relpath,
        })
    return out


def _chunks(items: list, n: int) -> list[list]:
    size = max(1, min(32, len(items) // max(n * 4, 1) or 1))
    return [items[i:i + size] for i in range(0, len(items), size)]


def generate_phantom(cfg: PhantomConfig, output: Path | None = None) -> PhantomSummary:
    """Write the whole phantom dataset atomically into ``output`` (default ``cfg.output``)."""
    from tasks.phantom.montage import write_phantom_montage

    start = time.perf_counter()
    output = Path(output or cfg.output)
    specs = sample_studies(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    sites_json = {s.name: s.model_dump(mode="json") for s in cfg.sites}
    truth = output.parent / cfg.truth_folder if cfg.truth_folder else None
    with atomic_dir(output) as tmp, (atomic_dir(truth) if truth else nullcontext()) as tmp_truth:
        dicom_root = tmp / "dicom"
        jobs = [(chunk, sites_json, cfg.rows, cfg.cols, cfg.confounders, str(dicom_root),
                 str(tmp_truth) if tmp_truth else None)
                for chunk in _chunks(specs, workers)]
        rows: list[dict] = []
        if workers == 1:
            for job in jobs:
                rows += _render_and_write(job)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for part in pool.map(_render_and_write, jobs):
                    rows += part
        labels = pd.DataFrame(rows).sort_values("study_index")
        labels["patient_id"] = labels["ident_patient_id"]
        labels[LABEL_COLUMNS].to_csv(tmp / "labels.csv", index=False)
        montage = write_phantom_montage(tmp, labels, cfg)
        internal = next(s.name for s in cfg.sites if s.role == "internal")
        meta = {
            "generator": "synthdx phantom",
            "seed": cfg.seed,
            "patients": cfg.patients,
            "studies": len(labels),
            "matrix": [cfg.rows, cfg.cols],
            "internal_site": internal,
            "sites": [{"name": s.name, "role": s.role} for s in cfg.sites],
            "labels_sha256": hashlib.sha256((tmp / "labels.csv").read_bytes()).hexdigest(),
            "config_sha256": hashlib.sha256(
                json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest(),
        }
        (tmp / "PHANTOM.json").write_text(json.dumps(meta, indent=2))
        if tmp_truth:
            write_truth_meta(tmp_truth, tmp / "labels.csv", (cfg.rows, cfg.cols), RULE)
    per_site = labels.groupby("site", sort=False).size().to_dict()
    positives = {
        "perugini>=2": int((labels.perugini_grade >= 2).sum()),
        "perugini=1": int((labels.perugini_grade == 1).sum()),
        "metastasis": int(labels.metastasis.sum()),
        "superscan": int(labels.superscan.sum()),
    }
    return PhantomSummary(output=output, patients=int(labels.patient_id.nunique()),
                          studies=len(labels), per_site={k: int(v) for k, v in per_site.items()},
                          positives=positives, seconds=time.perf_counter() - start,
                          montage=output / montage.name)


__all__ = ["LABEL_COLUMNS", "PhantomSummary", "generate_phantom", "asdict"]

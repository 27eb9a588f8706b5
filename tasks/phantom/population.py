"""Who is scanned where: patients, their studies and their ground-truth findings.

Sampling happens once, in the parent process, from the seed; rendering of each study then
uses its own seed, so the dataset is identical whatever the number of worker processes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from tasks.config import PhantomConfig, SiteConfig

FOLLOW_UP_FRACTION = 0.1
"""Share of patients with a second (follow-up) study: what makes patient-level splits matter."""


@dataclass(frozen=True)
class StudySpec:
    """Everything needed to render and write one study (picklable for worker processes)."""

    study_index: int
    patient_index: int
    study_number: int  # 0 = first study, 1 = follow-up
    site: str
    seed: int
    sex: str
    age: float
    height_m: float
    bmi: float
    perugini_grade: int
    metastasis: bool
    superscan: bool
    study_date: dt.date
    patient_seed: int
    birth_date: dt.date

    @property
    def relpath(self) -> str:
        """Path of the DICOM file inside the phantom's dicom/ folder (no identity in it)."""
        return f"{self.site}/study_{self.study_index:05d}/NM{self.study_number + 1:06d}.dcm"


def site_counts(total: int, sites: list[SiteConfig]) -> list[int]:
    """Split ``total`` patients by site share (largest remainder, every site at least one)."""
    shares = np.array([s.share for s in sites], float)
    raw = shares / shares.sum() * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(raw - counts)[::-1][: total - counts.sum()]:
        counts[i] += 1
    if total >= len(sites):
        for i in range(len(sites)):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts.tolist()


def _amyloid_probability(sex: np.ndarray, age: np.ndarray, prevalence: float) -> np.ndarray:
    """ATTR cardiac uptake is commoner in older men: weight by sex and age, keep the mean."""
    w = np.where(sex == "M", 1.6, 0.45) * np.exp((age - 70.0) / 9.0)
    return np.clip(w / w.mean() * prevalence, 0, 0.95)


def sample_studies(cfg: PhantomConfig) -> list[StudySpec]:
    """Draw every patient and study of the phantom dataset."""
    root = np.random.SeedSequence(cfg.seed)
    studies: list[StudySpec] = []
    patient_index = 0
    for site_no, (site, n) in enumerate(zip(cfg.sites, site_counts(cfg.patients, cfg.sites),
                                            strict=True)):
        pop = site.population
        rng = np.random.default_rng(root.spawn(len(cfg.sites))[site_no])
        sex = np.where(rng.random(n) < pop.male_fraction, "M", "F")
        age = np.clip(rng.normal(pop.age_mean, pop.age_sd, n), 25, 96)
        height = np.where(sex == "M", rng.normal(1.76, 0.07, n), rng.normal(1.63, 0.065, n))
        height = np.clip(height - 0.0012 * np.clip(age - 60, 0, None), 1.42, 2.02)
        bmi = np.clip(rng.normal(pop.bmi_mean, pop.bmi_sd, n), 16, 52)
        p_amy = _amyloid_probability(sex, age, pop.amyloid_prevalence)
        weights = np.array(pop.amyloid_grade_weights) / sum(pop.amyloid_grade_weights)
        for i in range(n):
            prng = np.random.default_rng(np.random.SeedSequence([cfg.seed, site_no, i]))
            grade = int(prng.choice([1, 2, 3], p=weights)) if prng.random() < p_amy[i] else 0
            met = bool(prng.random() < pop.metastasis_prevalence)
            superscan = bool(met and prng.random() < pop.superscan_fraction)
            first = dt.date(2019, 1, 1) + dt.timedelta(days=int(prng.integers(0, 5 * 365)))
            birth = first - dt.timedelta(days=int(age[i] * 365.25))
            patient_seed = int(prng.integers(0, 2**31 - 1))
            n_studies = 2 if prng.random() < FOLLOW_UP_FRACTION else 1
            for k in range(n_studies):
                if k == 1:  # follow-up: disease persists or appears, amyloid may progress
                    met = met or bool(prng.random() < 0.15)
                    if grade and prng.random() < 0.3:
                        grade = min(grade + 1, 3)
                date = first + dt.timedelta(days=int(k * prng.integers(180, 720)))
                studies.append(StudySpec(
                    study_index=len(studies), patient_index=patient_index, study_number=k,
                    site=site.name, seed=int(prng.integers(0, 2**31 - 1)), sex=str(sex[i]),
                    age=float(age[i] + (date - first).days / 365.25), height_m=float(height[i]),
                    bmi=float(bmi[i]), perugini_grade=grade, metastasis=met,
                    superscan=superscan, study_date=date, patient_seed=patient_seed,
                    birth_date=birth))
            patient_index += 1
    return studies

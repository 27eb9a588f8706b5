"""The study profile (issue 15): it validates, and its set sizes are as promised.

The phantom's population draw is a pure function of the phantom parameters (sampling happens
before any rendering), so the per-site counts of every finding are known without writing a
single DICOM file.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tasks.config import load_config
from tasks.phantom.population import sample_studies

ROOT = Path(__file__).resolve().parents[1]
MIN_AMYLOID_POSITIVE = 60
MIN_METASTASIS_POSITIVE = 100
MIN_INTERNAL_TRAIN = 2000


@pytest.fixture(scope="module")
def study():
    return load_config(ROOT / "params.yaml", ["profile=study"])


def test_study_profile_validates_and_differs_from_the_demo(study) -> None:
    demo = load_config(ROOT / "params.yaml", [])
    assert study.profile == "study"
    assert study.phantom.patients > 5 * demo.phantom.patients
    assert study.diffusion.max_steps > 10 * demo.diffusion.max_steps


def test_every_external_site_has_the_promised_positives(study) -> None:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for s in sample_studies(study.phantom):
        c = counts[s.site]
        c["studies"] += 1
        c["amyloid"] += s.perugini_grade >= 2
        c["metastasis"] += bool(s.metastasis)
    external = [s.name for s in study.phantom.sites if s.role == "external"]
    assert len(external) == 4
    for site in external:
        assert counts[site]["amyloid"] >= MIN_AMYLOID_POSITIVE, (site, counts[site])
        assert counts[site]["metastasis"] >= MIN_METASTASIS_POSITIVE, (site, counts[site])
    internal = next(s.name for s in study.phantom.sites if s.role == "internal")
    split = study.ingest.split
    train_share = 1.0 - split.val_fraction - split.test_fraction
    # Patient-level splits move follow-up studies together; allow a few percent of slack.
    assert counts[internal]["studies"] * train_share * 0.97 >= MIN_INTERNAL_TRAIN

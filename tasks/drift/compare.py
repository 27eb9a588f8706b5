"""Per-site comparison of today's data with the champion's reference (plain numbers, no I/O).

For each site of today's dataset, the NEW studies (those the reference does not hold) are
compared with the reference's studies of the same site; a site the reference does not know is
compared with the whole reference and named "new site". Why the new studies only: a night adds
a few percent, and diluted in the whole archive a changed camera would move no average.

- acquisition: a camera (manufacturer + model) or tracer the site did not have is named;
  the mean pixel spacing's relative change;
- intensity: standardised mean differences (SMD) of each image's mean normalised intensity,
  of the raw intensity reference (log) and of the total counts (log);
- labels: change of the metastasis and amyloid shares;
- features: the root mean square shift of the audit encoder's mean embedding, in standard
  deviations of the reference (the same encoder embeds both sides).

Numbers are judged only with at least ``min_new_studies`` new studies at the site (fewer are
shown, flagged "not judged"); names (new site, camera, tracer) are always flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tasks.artifacts.drift_reference import DataProfile
from tasks.config import DriftConfig

SMD_CAP = 99.0
"""An SMD against a constant reference (every value equal) is capped, not infinite."""


@dataclass
class SiteDrift:
    """One site's row of the drift table."""

    site: str
    status: str
    n_reference: int
    n_now: int
    n_new: int
    cameras: list[str] = field(default_factory=list)
    new_cameras: list[str] = field(default_factory=list)
    new_tracers: list[str] = field(default_factory=list)
    intensity_smd: float | None = None
    raw_intensity_smd: float | None = None
    counts_smd: float | None = None
    pixel_mm_change: float | None = None
    metastasis_change: float | None = None
    amyloid_change: float | None = None
    feature_shift: float | None = None
    judged: bool = False
    flags: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        """Whether the site moved beyond a threshold or is named (new site, camera, tracer)."""
        return bool(self.flags)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row (tasks/artifacts/drift_report.py)."""
        return {**asdict(self), "flagged": self.flagged}


def _finite(values: Any) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def smd(new: Any, ref: Any, log: bool = False) -> float | None:
    """Standardised mean difference ``(mean new - mean ref) / pooled SD`` (None: no values)."""
    a, b = _finite(new), _finite(ref)
    if log:
        a, b = np.log(a[a > 0]), np.log(b[b > 0])
    if len(a) == 0 or len(b) == 0:
        return None
    diff = float(a.mean() - b.mean())
    sd = math.sqrt((float(a.var()) + float(b.var())) / 2.0)
    if sd == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(SMD_CAP, diff)
    return round(max(-SMD_CAP, min(SMD_CAP, diff / sd)), 6)


def _change(new: Any, ref: Any, relative: bool = False) -> float | None:
    a, b = _finite(new), _finite(ref)
    if len(a) == 0 or len(b) == 0:
        return None
    if relative:
        return None if b.mean() == 0 else round(float(a.mean() / b.mean() - 1.0), 6)
    return round(float(a.mean() - b.mean()), 6)


def feature_shift(new: np.ndarray | None, ref: np.ndarray | None, scale: np.ndarray | None
                  ) -> float | None:
    """RMS over dimensions of the mean embedding's shift, in units of ``scale`` (reference SD)."""
    if new is None or ref is None or scale is None or len(new) == 0 or len(ref) == 0:
        return None
    shift = (new.mean(axis=0) - ref.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    return round(float(np.sqrt(np.mean(shift ** 2))), 6)


def _judge(row: SiteDrift, cfg: DriftConfig) -> None:
    checks = (("intensity shift", row.intensity_smd, cfg.smd, "SMD {:+.2f}"),
              ("raw intensity shift", row.raw_intensity_smd, cfg.smd, "SMD {:+.2f}"),
              ("counts shift", row.counts_smd, cfg.smd, "SMD {:+.2f}"),
              ("pixel spacing change", row.pixel_mm_change, cfg.pixel_mm, "{:+.1%}"),
              ("metastasis prevalence change", row.metastasis_change, cfg.prevalence,
               "{:+.2f}"),
              ("amyloid prevalence change", row.amyloid_change, cfg.prevalence, "{:+.2f}"),
              ("feature shift", row.feature_shift, cfg.feature_shift, "{:.2f}"))
    for name, value, limit, fmt in checks:
        if value is not None and abs(value) > limit:
            row.flags.append(f"{name} ({fmt.format(value)}, threshold {limit:g})")


def compare_sites(reference: DataProfile, today: DataProfile, cfg: DriftConfig
                  ) -> list[SiteDrift]:
    """The drift table: one row per site of today's data (and per site gone since), by name."""
    ref_rows, now = reference.rows, today.rows
    known = set(ref_rows["study_uid"].astype(str))
    is_new = ~now["study_uid"].astype(str).isin(known).to_numpy()
    scale = reference.features.std(axis=0) if reference.features is not None else None
    rows = []
    for site in sorted(set(now["site"]) | set(ref_rows["site"])):
        at_ref = (ref_rows["site"] == site).to_numpy()
        at_now = (now["site"] == site).to_numpy()
        if not at_now.any():
            rows.append(SiteDrift(site, "gone (no study today)", int(at_ref.sum()), 0, 0,
                                  flags=[f"site {site} has no study any more"]))
            continue
        new_site = not at_ref.any()
        base = np.ones(len(ref_rows), dtype=bool) if new_site else at_ref
        fresh = at_now & is_new
        ref_part, new_part = ref_rows[base], now[fresh]
        cameras = sorted(set(now.loc[at_now, "camera"]))
        row = SiteDrift(site, "new site" if new_site else "known", int(at_ref.sum()),
                        int(at_now.sum()), int(fresh.sum()), cameras=cameras)
        if new_site:
            row.flags.append(f"new site {site} (camera {', '.join(cameras)})")
        else:
            row.new_cameras = sorted(set(new_part["camera"]) - set(ref_part["camera"]))
            row.new_tracers = sorted(set(new_part["tracer"]) - set(ref_part["tracer"]))
            row.flags += [f"new camera at {site}: {c}" for c in row.new_cameras]
            row.flags += [f"new tracer at {site}: {t}" for t in row.new_tracers]
        if fresh.any():
            row.intensity_smd = smd(new_part["mean_intensity"], ref_part["mean_intensity"])
            row.raw_intensity_smd = smd(new_part["intensity_reference"],
                                        ref_part["intensity_reference"], log=True)
            row.counts_smd = smd(new_part["counts"], ref_part["counts"], log=True)
            row.pixel_mm_change = _change(new_part["pixel_mm"], ref_part["pixel_mm"],
                                          relative=True)
            row.metastasis_change = _change(new_part["metastasis"], ref_part["metastasis"])
            row.amyloid_change = _change(new_part["amyloid"], ref_part["amyloid"])
            if today.features is not None and reference.features is not None:
                row.feature_shift = feature_shift(today.features[fresh],
                                                  reference.features[base], scale)
            row.judged = bool(fresh.sum() >= cfg.min_new_studies)
            if row.judged:
                _judge(row, cfg)
        if row.status == "known" and not fresh.any():
            row.status = "no new studies"
        rows.append(row)
    return rows


def first_night(today: DataProfile) -> list[SiteDrift]:
    """The table without a reference: each site's size and cameras, nothing judged."""
    now = today.rows
    return [SiteDrift(site, "no reference", 0, int((now["site"] == site).sum()),
                      int((now["site"] == site).sum()),
                      cameras=sorted(set(now.loc[now["site"] == site, "camera"])))
            for site in sorted(set(now["site"]))]


def site_frame(rows: list[SiteDrift]) -> pd.DataFrame:
    """The table as a DataFrame (for tests and notebooks)."""
    return pd.DataFrame([r.as_dict() for r in rows])

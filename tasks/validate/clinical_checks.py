"""Two verdict lines for a clinician: is the calibration good enough, does abstaining help?

- Calibration goal (issue 17): ECE of the calibrated seed ensemble <= ``target_ece`` on the
  internal test set, judged only where the set has at least ``calibration_bins`` positives and
  as many negatives (fewer than about one per bin and the ECE is mostly binning noise).
- Abstention check: on each external site, for every regime whose AUC there exceeds
  ``min_auc``, accuracy on the accepted cases should be above accuracy on all cases. Where it
  is not, the report says so; it is a finding, not a failure of the stage.

Both read the task document that tasks.validate.pipeline.assess_task builds.
"""

from __future__ import annotations

from typing import Any

MET, NOT_MET, NOT_MEASURABLE = "met", "not met", "not measurable"
HIGHER, NOT_HIGHER, NOT_APPLICABLE = "higher", "not higher", "not applicable"


def calibration_goal(doc: dict[str, Any], internal: list[str], target: float, bins: int
                     ) -> list[dict[str, Any]]:
    """One row per (regime, internal set): ECE before / after calibration and the verdict."""
    rows = []
    for ens in doc["ensembles"]:
        for key in internal:
            m = ens["sets"][key]
            measurable = (m["positives"] >= bins and m["negatives"] >= bins
                          and m["ece_calibrated"] is not None)
            verdict = (NOT_MEASURABLE if not measurable
                       else MET if m["ece_calibrated"] <= target else NOT_MET)
            rows.append({"regime": ens["regime"], "set": key, "positives": m["positives"],
                         "ece": m["ece"], "ece_calibrated": m["ece_calibrated"],
                         "target": target, "verdict": verdict})
    return rows


def abstention_check(doc: dict[str, Any], external: list[str], min_auc: float
                     ) -> list[dict[str, Any]]:
    """One row per (regime, external set): accuracy on all vs accepted cases and the verdict."""
    rows = []
    for ens in doc["ensembles"]:
        for key in external:
            m = ens["sets"][key]
            ab = m["abstention"]
            acc_all, acc_kept = ab["all"]["accuracy"], ab["accepted"]["accuracy"]
            if m["auc"] is None or m["auc"] <= min_auc or acc_all is None or acc_kept is None:
                verdict = NOT_APPLICABLE
            else:
                verdict = HIGHER if acc_kept > acc_all else NOT_HIGHER
            rows.append({"regime": ens["regime"], "set": key, "auc": m["auc"],
                         "coverage": ab["coverage"], "accuracy_all": acc_all,
                         "accuracy_accepted": acc_kept, "min_auc": min_auc,
                         "verdict": verdict})
    return rows

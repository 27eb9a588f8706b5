"""ROC, calibration and risk-coverage curves per task and evaluation set, regimes overlaid.

The CSVs are long format (one ``regime`` column) so one file per (task, set) holds every regime;
``tasks/validate/templates/dvc_by_regime.json`` is a DVC plot template that draws one line per
regime from them. The PNGs are the same curves for the HTML report and MLflow, drawn with a
matplotlib ``Figure`` (Agg canvas, no pyplot global state, no display). The calibration figure
has two panels, before and after calibration (the calibrators were fitted on internal
validation, so the internal test and external panels are out-of-sample); the risk-coverage
figure shows the error rate of the accepted cases as the uncertainty threshold loosens, the
coverage chosen on validation marked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.validate.assess import REGIME_ORDER, CalibratedEnsemble, Ensemble
from tasks.validate.evalsets import EvalSet
from tasks.validate.metrics import (
    auc,
    calibration_bins,
    expected_calibration_error,
    has_both_classes,
    operating_point,
    roc_points,
)
from tasks.validate.uncertainty import accepted, aurc, risk_coverage

ROC_DIR = "roc"
CALIBRATION_DIR = "calibration"
CALIBRATED_DIR = "calibrated"
RISK_COVERAGE_DIR = "risk_coverage"
CURVE_POINTS = 200
"""At most about this many rows per regime in a risk-coverage CSV (the PNG uses every case)."""
FIGURES_DIR = "figures"
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def safe_name(text: str) -> str:
    """File-name-safe form of a task, site or regime name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _colour(regime: str) -> str:
    index = REGIME_ORDER.index(regime) if regime in REGIME_ORDER else len(REGIME_ORDER)
    return _COLOURS[index % len(_COLOURS)]


@dataclass(frozen=True)
class SetFigures:
    """The files written for one (task, evaluation set)."""

    roc_csv: Path
    calibration_csv: Path
    roc_png: Path
    calibration_png: Path
    calibrated_csv: Path
    risk_coverage_csv: Path
    risk_coverage_png: Path

    def paths(self) -> list[Path]:
        """Every file, in field order."""
        return [self.roc_csv, self.calibration_csv, self.roc_png, self.calibration_png,
                self.calibrated_csv, self.risk_coverage_csv, self.risk_coverage_png]


def roc_table(labels: np.ndarray, ensembles: list[Ensemble], keep: np.ndarray) -> pd.DataFrame:
    """Long-format ROC points (``regime, fpr, tpr``) of every regime on one set."""
    frames = []
    y = labels[keep]
    for ens in ensembles:
        if not has_both_classes(y):
            continue
        fpr, tpr = roc_points(y, ens.scores[keep])
        frames.append(pd.DataFrame({"regime": ens.regime, "fpr": fpr, "tpr": tpr}))
    if not frames:
        return pd.DataFrame({"regime": pd.Series(dtype=str), "fpr": pd.Series(dtype=float),
                             "tpr": pd.Series(dtype=float)})
    return pd.concat(frames, ignore_index=True)


def calibration_table(labels: np.ndarray, ensembles: list[Ensemble] | list[CalibratedEnsemble],
                      keep: np.ndarray, bins: int) -> pd.DataFrame:
    """Long-format reliability table of raw or calibrated seed ensembles on one set.

    Columns ``regime, bin, mean_predicted, fraction_positive, count``.
    """
    frames = []
    y = labels[keep]
    for ens in ensembles:
        if not y.size:
            continue
        table = calibration_bins(y, _probabilities(ens)[keep], bins)
        table.insert(0, "regime", ens.regime)
        frames.append(table[["regime", "bin", "mean_predicted", "fraction_positive", "count"]])
    if not frames:
        return pd.DataFrame(columns=["regime", "bin", "mean_predicted", "fraction_positive",
                                     "count"])
    return pd.concat(frames, ignore_index=True)


def _probabilities(ens: Ensemble | CalibratedEnsemble) -> np.ndarray:
    return ens.probability if isinstance(ens, CalibratedEnsemble) else ens.scores


def risk_coverage_table(labels: np.ndarray, calibrated: list[CalibratedEnsemble],
                        keep: np.ndarray) -> pd.DataFrame:
    """Long-format risk-coverage curves (``regime, threshold, coverage, risk``) on one set."""
    frames = []
    y = labels[keep]
    for cal in calibrated:
        errors = (cal.predicted[keep] != y.astype(bool)).astype(np.float64)
        curve = risk_coverage(errors, cal.uncertainty[keep])
        if len(curve) > CURVE_POINTS:  # the CSV is for plotting: ~CURVE_POINTS rows suffice
            grid = np.linspace(0.0, 1.0, CURVE_POINTS + 1)[1:]
            rows = np.unique(np.searchsorted(curve["coverage"].to_numpy(), grid - 1e-12))
            curve = curve.iloc[np.minimum(rows, len(curve) - 1)]
        curve.insert(0, "regime", cal.regime)
        frames.append(curve)
    if not frames:
        return pd.DataFrame(columns=["regime", "threshold", "coverage", "risk"])
    return pd.concat(frames, ignore_index=True)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    # No Software metadata: the PNG carries no URL and the bytes depend only on the data.
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})


def plot_roc(path: Path, title: str, labels: np.ndarray, ensembles: list[Ensemble],
             keep: np.ndarray) -> None:
    """ROC curves of every regime on one set, the operating point of each marked."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    y = labels[keep]
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="chance (AUC 0.5)")
    if has_both_classes(y):
        for ens in ensembles:
            s = ens.scores[keep]
            fpr, tpr = roc_points(y, s)
            colour = _colour(ens.regime)
            ax.plot(fpr, tpr, color=colour, lw=1.8,
                    label=f"{ens.regime} (AUC {auc(y, s):.3f})")
            op = operating_point(y, s, ens.threshold)
            ax.plot(1 - op["specificity"], op["sensitivity"], "o", color=colour, ms=6)
    else:
        ax.text(0.5, 0.5, "ROC undefined: only one class in this set", ha="center",
                va="center", fontsize=10)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="Sensitivity (true-positive rate)", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="dot: operating threshold", title_fontsize=8)
    _save(fig, path)


def _reliability(ax: Any, y: np.ndarray, ensembles: list[Ensemble] | list[CalibratedEnsemble],
                 keep: np.ndarray, bins: int, title: str) -> None:
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="perfect calibration")
    for ens in ensembles:
        if not y.size:
            break
        s = _probabilities(ens)[keep]
        table = calibration_bins(y, s, bins)
        ece = expected_calibration_error(y, s, bins)
        ax.plot(table["mean_predicted"], table["fraction_positive"], "o-",
                color=_colour(ens.regime), lw=1.5, ms=4,
                label=f"{ens.regime} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted probability (bin mean)",
           ylabel="Observed fraction positive", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)


def plot_calibration(path: Path, title: str, labels: np.ndarray, ensembles: list[Ensemble],
                     calibrated: list[CalibratedEnsemble], keep: np.ndarray, bins: int) -> None:
    """Reliability diagrams of every regime on one set, before | after calibration (with ECE)."""
    fig = Figure(figsize=(9.6, 5.0), layout="constrained")
    before, after = fig.subplots(1, 2)
    y = labels[keep]
    _reliability(before, y, ensembles, keep, bins, "before calibration (raw scores)")
    _reliability(after, y, calibrated, keep, bins, "after calibration (fitted on validation)")
    fig.suptitle(title)
    _save(fig, path)


def plot_risk_coverage(path: Path, title: str, labels: np.ndarray,
                       calibrated: list[CalibratedEnsemble], keep: np.ndarray) -> None:
    """Risk-coverage curves of every regime on one set, the accepted share marked (with AURC)."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    y = labels[keep].astype(bool)
    top = 0.05
    for cal in calibrated:
        if not y.size:
            break
        errors = (cal.predicted[keep] != y).astype(np.float64)
        curve = risk_coverage(errors, cal.uncertainty[keep])
        colour = _colour(cal.regime)
        ax.step(curve["coverage"], curve["risk"], where="post", color=colour, lw=1.5,
                label=f"{cal.regime} (AURC {aurc(errors, cal.uncertainty[keep]):.3f})")
        kept = accepted(cal.uncertainty[keep], cal.uncertainty_threshold)
        if kept.any():
            ax.plot(kept.mean(), errors[kept].mean(), "o", color=colour, ms=6)
        top = max(top, float(curve["risk"].max()))
    ax.set(xlim=(0, 1.01), ylim=(0, min(1.0, top * 1.1)), title=title,
           xlabel="Coverage (share of cases accepted, most certain first)",
           ylabel="Risk (error rate of accepted cases)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8,
              title="dot: threshold chosen on validation", title_fontsize=8)
    _save(fig, path)


def write_set_figures(out_dir: Path, task: str, es: EvalSet, labels: np.ndarray,
                      cases: pd.DataFrame, ensembles: list[Ensemble],
                      calibrated: list[CalibratedEnsemble], bins: int) -> SetFigures:
    """Write the ROC / calibration / risk-coverage CSVs and PNGs of one (task, set)."""
    keep = es.mask(cases)
    stem = f"{safe_name(task)}_{safe_name(es.key)}"
    files = SetFigures(roc_csv=out_dir / ROC_DIR / f"{stem}.csv",
                       calibration_csv=out_dir / CALIBRATION_DIR / f"{stem}.csv",
                       roc_png=out_dir / FIGURES_DIR / f"roc_{stem}.png",
                       calibration_png=out_dir / FIGURES_DIR / f"calibration_{stem}.png",
                       calibrated_csv=out_dir / CALIBRATED_DIR / f"{stem}.csv",
                       risk_coverage_csv=out_dir / RISK_COVERAGE_DIR / f"{stem}.csv",
                       risk_coverage_png=out_dir / FIGURES_DIR / f"risk_coverage_{stem}.png")
    for path in files.paths():
        path.parent.mkdir(parents=True, exist_ok=True)
    roc_table(labels, ensembles, keep).to_csv(files.roc_csv, index=False, float_format="%.6g")
    calibration_table(labels, ensembles, keep, bins).to_csv(files.calibration_csv, index=False,
                                                            float_format="%.6g")
    calibration_table(labels, calibrated, keep, bins).to_csv(files.calibrated_csv, index=False,
                                                             float_format="%.6g")
    risk_coverage_table(labels, calibrated, keep).to_csv(files.risk_coverage_csv, index=False,
                                                         float_format="%.6g")
    title = f"{task}: {es.label}"
    plot_roc(files.roc_png, title, labels, ensembles, keep)
    plot_calibration(files.calibration_png, title, labels, ensembles, calibrated, keep, bins)
    plot_risk_coverage(files.risk_coverage_png, title, labels, calibrated, keep)
    return files

"""ROC and calibration curves per task and evaluation set, regimes overlaid: CSV and PNG.

The CSVs are long format (one ``regime`` column) so one file per (task, set) holds every regime;
``tasks/validate/templates/dvc_by_regime.json`` is a DVC plot template that draws one line per
regime from them. The PNGs are the same curves for the HTML report and MLflow, drawn with a
matplotlib ``Figure`` (Agg canvas, no pyplot global state, no display).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.validate.assess import REGIME_ORDER, Ensemble
from tasks.validate.evalsets import EvalSet
from tasks.validate.metrics import (
    auc,
    calibration_bins,
    expected_calibration_error,
    has_both_classes,
    operating_point,
    roc_points,
)

ROC_DIR = "roc"
CALIBRATION_DIR = "calibration"
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


def calibration_table(labels: np.ndarray, ensembles: list[Ensemble], keep: np.ndarray,
                      bins: int) -> pd.DataFrame:
    """Long-format reliability table (``regime, bin, mean_predicted, fraction_positive, count``)."""
    frames = []
    y = labels[keep]
    for ens in ensembles:
        if not y.size:
            continue
        table = calibration_bins(y, ens.scores[keep], bins)
        table.insert(0, "regime", ens.regime)
        frames.append(table[["regime", "bin", "mean_predicted", "fraction_positive", "count"]])
    if not frames:
        return pd.DataFrame(columns=["regime", "bin", "mean_predicted", "fraction_positive",
                                     "count"])
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


def plot_calibration(path: Path, title: str, labels: np.ndarray, ensembles: list[Ensemble],
                     keep: np.ndarray, bins: int) -> None:
    """Reliability diagram of every regime on one set (ECE in the legend)."""
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    y = labels[keep]
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="perfect calibration")
    for ens in ensembles:
        if not y.size:
            break
        s = ens.scores[keep]
        table = calibration_bins(y, s, bins)
        ece = expected_calibration_error(y, s, bins)
        ax.plot(table["mean_predicted"], table["fraction_positive"], "o-",
                color=_colour(ens.regime), lw=1.5, ms=4,
                label=f"{ens.regime} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Predicted probability (bin mean)",
           ylabel="Observed fraction positive", title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)


def write_set_figures(out_dir: Path, task: str, es: EvalSet, labels: np.ndarray,
                      cases: pd.DataFrame, ensembles: list[Ensemble], bins: int) -> SetFigures:
    """Write the ROC / calibration CSVs and PNGs of one (task, set) under ``out_dir``."""
    keep = es.mask(cases)
    stem = f"{safe_name(task)}_{safe_name(es.key)}"
    files = SetFigures(roc_csv=out_dir / ROC_DIR / f"{stem}.csv",
                       calibration_csv=out_dir / CALIBRATION_DIR / f"{stem}.csv",
                       roc_png=out_dir / FIGURES_DIR / f"roc_{stem}.png",
                       calibration_png=out_dir / FIGURES_DIR / f"calibration_{stem}.png")
    for path in (files.roc_csv, files.calibration_csv, files.roc_png):
        path.parent.mkdir(parents=True, exist_ok=True)
    roc_table(labels, ensembles, keep).to_csv(files.roc_csv, index=False, float_format="%.6g")
    calibration_table(labels, ensembles, keep, bins).to_csv(files.calibration_csv, index=False,
                                                            float_format="%.6g")
    title = f"{task}: {es.label}"
    plot_roc(files.roc_png, title, labels, ensembles, keep)
    plot_calibration(files.calibration_png, title, labels, ensembles, keep, bins)
    return files

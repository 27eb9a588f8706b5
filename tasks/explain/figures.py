"""Pictures of the heat maps (PNG) and the standalone report panel (HTML).

One row per explained finding: the scan (anterior, posterior), its counterfactual, and the
heat map over the scan with the true finding outlined when the phantom's mask is known. The
HTML embeds its images, so the file can be linked from the validation report or mailed alone.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

Panel = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, str]
"""(scan, counterfactual, heat, true mask or None, caption); arrays (2, rows, cols)."""

VIEWS = ("anterior", "posterior")


def study_figure(panels: Sequence[Panel], title: str) -> bytes:
    """A PNG: per panel, scan | counterfactual | heat over the scan, both views each."""
    rows, cols = panels[0][0].shape[1:]
    width = 6 * 1.15 * max(cols / rows * 4, 0.6)
    fig = Figure(figsize=(max(width, 7.5), 4.6 * len(panels) + 0.4), dpi=110)
    axes = fig.subplots(len(panels), 6, squeeze=False)
    for r, (scan, counter, heat, mask, caption) in enumerate(panels):
        top = float(max(heat.max(), 1e-6))
        for v in range(2):
            for c, (what, image) in enumerate((("scan", scan), ("counterfactual", counter))):
                ax = axes[r, 2 * c + v]
                ax.imshow(np.sqrt(np.clip(image[v], 0, 1)), cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{what}\n{VIEWS[v]}", fontsize=7)
            ax = axes[r, 4 + v]
            ax.imshow(np.sqrt(np.clip(scan[v], 0, 1)), cmap="gray", vmin=0, vmax=1)
            ax.imshow(heat[v], cmap="inferno", vmin=0, vmax=top, alpha=0.65)
            if mask is not None and mask[v].any():
                ax.contour(mask[v].astype(float), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_title(f"heat map\n{VIEWS[v]}", fontsize=7)
        axes[r, 0].set_ylabel(caption, fontsize=6, rotation=0, ha="left", va="bottom",
                              labelpad=0)
        axes[r, 0].yaxis.set_label_coords(0.0, 1.18)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=8, y=1.0 + 0.05 / len(panels))
    fig.text(0.01, 0.005, "heat: how the scan regenerated under its own condition differs "
             "from it regenerated under the opposite one; cyan: true finding (phantom)",
             fontsize=6)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _task_row(task: str, t: dict[str, Any]) -> str:
    if not t.get("n"):
        return (f"<tr><td>{html.escape(task)}</td><td>0</td><td colspan=4>"
                f"{html.escape(str(t.get('skipped', '')))}</td></tr>")
    ci = t.get("pointing_game_ci95") or [None, None]
    return ("<tr>" + "".join(f"<td>{c}</td>" for c in (
        html.escape(task), t["n"],
        f"{_fmt(t['pointing_game'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]",
        _fmt(t["energy_fraction_mean"]), _fmt(t["energy_fraction_median"]),
        _fmt(t["mask_share_mean"]))) + "</tr>")


def explain_html(report: dict[str, Any], examples: Sequence[tuple[str, Path, str]]) -> str:
    """The standalone report panel: the numbers, the settings and example heat maps."""
    model = report["model"]
    rows = "\n".join(_task_row(task, t) for task, t in report["tasks"].items())
    settings = report["settings"]
    shown = ", ".join(f"{k} {html.escape(str(settings[k]))}" for k in (
        "encode", "heat", "strength", "steps", "guidance_scale", "positive_grade", "mask_threshold",
        "tolerance", "smooth_sigma", "evaluate_splits"))
    figures = "\n".join(
        f"<figure><img alt='{html.escape(task)} heat map' src='data:image/png;base64,"
        f"{base64.b64encode(Path(path).read_bytes()).decode()}'><figcaption>"
        f"{html.escape(caption)}</figcaption></figure>" for task, path, caption in examples)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>synthdx: counterfactual heat maps</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1.5em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}figure{{display:inline-block;margin:6px}}
img{{max-width:520px}}figcaption{{font-size:12px}}.note{{font-size:13px;color:#555}}</style>
</head><body>
<h1>Counterfactual heat maps from the diffusion model</h1>
<p>Each scan is encoded part of the way into the model's noise schedule and regenerated twice:
under its own condition and under the opposite one (amyloid &rarr; Perugini 0, metastasis
&rarr; none). The heat map is the difference. It is measured against the phantom's true
finding masks: the <b>pointing game</b> is a hit when the hottest region (over both views)
lies in the finding; the <b>energy fraction</b> is the share of the heat inside it. The
<b>mask share</b> is what a heat map spread evenly over the body would score on both.</p>
<table><tr><th>finding</th><th>studies</th><th>pointing game [95 % CI]</th>
<th>energy fraction (mean)</th><th>(median)</th><th>mask share of body (chance)</th></tr>
{rows}
</table>
<p class="note">Model {html.escape(str(model['version']))} (step {model['global_step']},
conditions {html.escape(', '.join(model['conditions']))}, {model['image_size'][0]} &times;
{model['image_size'][1]}); data {html.escape(report['processed'])}; {shown}.</p>
<h2>Examples</h2>
{figures or '<p>none</p>'}
</body></html>
"""

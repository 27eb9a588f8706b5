"""``synthdx explain``: counterfactual heat maps for one study, or measured over many.

The work of the command as plain functions (the CLI is flows/explain_cli.py, the MLflow run
tasks/explain/tracking.py). It reads the trained diffusion model through
tasks/artifacts/diffusion_model.py and the processed dataset (with its optional masks.npz)
through tasks/artifacts/dataset.py; it imports no stage package.

Everything happens at the model's image size: the processed scan and its masks are
area-resized to it (``models.data.resize``), as training saw the scans.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.data import resize
from models.diffusion import DiffusionModule
from tasks.artifacts import dataset
from tasks.artifacts.diffusion_model import load_trained, model_ref
from tasks.common.atomic import atomic_write_bytes, atomic_write_text
from tasks.common.precision import auto_precision
from tasks.config import Config, ExplainConfig
from tasks.explain.conditions import TASKS, Task, direction, encode_pair, explainable, has_finding
from tasks.explain.counterfactual import Sampler, counterfactuals, make_sampler
from tasks.explain.figures import explain_html, study_figure
from tasks.explain.metrics import BODY_LEVEL, Score, as_record, score, summarise

REQUIRED = ("study_uid", "split", "site", "perugini_grade", "metastasis")
REPORT_JSON = "explain.json"
REPORT_HTML = "explain.html"


class ExplainError(ValueError):
    """A request ``explain`` cannot serve; the message names the thing and what to do."""


@dataclass
class Inputs:
    """The trained model and the processed dataset, opened and checked once."""

    module: DiffusionModule
    size: tuple[int, int]
    model_dir: Path
    processed: Path
    images: dataset.ImageArray
    manifest: pd.DataFrame
    masks: dict[str, np.ndarray] | None
    device: torch.device
    sampler: Sampler


@dataclass
class Explained:
    """Heat maps of some studies for one task, at the model's size.

    Attributes:
        task: the finding explained.
        rows: the studies' manifest rows (positions in ``Inputs.manifest``).
        images: the scans, (B, 2, rows, cols) in [0, 1].
        reconstruction: regenerated under their own condition.
        counterfactual: regenerated under the opposite condition.
        heat: what changes with the condition (``heat_map``).
        masks: true finding coverage per pixel (B, 2, rows, cols), or None without masks.
    """

    task: Task
    rows: list[int]
    images: np.ndarray
    reconstruction: np.ndarray
    counterfactual: np.ndarray
    heat: np.ndarray
    masks: np.ndarray | None


def _device(cfg: ExplainConfig) -> tuple[torch.device, torch.dtype | None]:
    cuda = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto"
                                                  and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    precision = auto_precision(cfg.precision, "cuda" if cuda else "cpu")
    return device, (torch.bfloat16 if precision.startswith("bf16") else None)


def open_inputs(cfg: Config) -> Inputs:
    """Open the model and the processed dataset named by ``cfg.explain`` (or their defaults).

    Raises:
        ExplainError: no trained model, or no usable processed dataset (naming the path).
    """
    ex = cfg.explain
    model_dir = Path(ex.model or cfg.diffusion.output)
    processed = Path(ex.processed or cfg.ingest.output)
    try:
        model_ref(model_dir)
        module, size = load_trained(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ExplainError(f"{exc} (explain.model)") from None
    try:
        images, manifest = dataset.open_dataset(processed, "processed dataset", REQUIRED)
        masks = dataset.read_masks(processed, images.shape)
    except dataset.DatasetError as exc:
        raise ExplainError(f"{exc} (explain.processed)") from None
    device, dtype = _device(ex)
    module = module.to(device).eval()
    sampler = make_sampler(module.noise_schedule, module.spec.null_indices, module.intensity,
                           encode=ex.encode, strength=ex.strength, steps=ex.steps,
                           guidance_scale=ex.guidance_scale, autocast_dtype=dtype)
    return Inputs(module=module, size=size, model_dir=model_dir, processed=processed,
                  images=images, manifest=manifest, masks=masks, device=device,
                  sampler=sampler)


def find_study(inputs: Inputs, study_id: str) -> int:
    """The manifest position of ``study_id`` (the manifest's pseudonymous study_uid).

    Raises:
        ExplainError: no such study, naming it and how to list the IDs.
    """
    hits = np.flatnonzero(inputs.manifest["study_uid"].astype(str).to_numpy() == study_id)
    if len(hits) == 0:
        raise ExplainError(
            f"unknown study {study_id!r}: no image in {inputs.processed / dataset.MANIFEST_FILE} "
            "has that study_uid. Study IDs are the pseudonymous study_uid column of the "
            "processed manifest; list them with `synthdx explain --list` (--split test to see "
            "only the held-out test split)")
    return int(hits[0])


def list_studies(inputs: Inputs, split: str | None = None) -> pd.DataFrame:
    """Study IDs with their split, site and labels (for ``--list``)."""
    frame = inputs.manifest[["study_uid", "split", "site", "perugini_grade", "metastasis"]]
    return frame if split is None else frame[frame["split"] == split]


def _model_size(array: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    return resize(torch.from_numpy(np.asarray(array, np.float32)), size)


def explain_rows(inputs: Inputs, cfg: ExplainConfig, rows: list[int], task: Task) -> Explained:
    """Heat maps of the studies at manifest positions ``rows`` for ``task``, in batches."""
    spec = inputs.module.spec
    if not explainable(spec, task):
        raise ExplainError(f"the model is not conditioned on {task} (its factors: "
                           f"{', '.join(spec.names)}): no counterfactual can change it")
    recon, cf, scans, covers = [], [], [], []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        records = inputs.manifest.iloc[chunk].to_dict("records")
        index = [int(r["index"]) for r in records]
        pairs = [encode_pair(spec, r, task, cfg.positive_grade) for r in records]
        images = torch.stack([_model_size(inputs.images[i], inputs.size) for i in index])
        result = counterfactuals(
            inputs.module.unet, inputs.sampler, images.to(inputs.device),
            torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]),
            [cfg.seed + i for i in index])
        recon.append(result.reconstruction)
        cf.append(result.counterfactual)
        scans.append(images.numpy())
        if inputs.masks is not None:
            covers.append(np.stack([_model_size(inputs.masks[task][i], inputs.size).numpy()
                                    for i in index]))
    reconstruction, counterfactual = np.concatenate(recon), np.concatenate(cf)
    return Explained(task=task, rows=list(rows), images=np.concatenate(scans),
                     reconstruction=reconstruction, counterfactual=counterfactual,
                     heat=heat_map(reconstruction, counterfactual, [
                         has_finding(inputs.manifest.iloc[r], task) for r in rows], cfg.heat),
                     masks=np.concatenate(covers) if covers else None)


def heat_map(reconstruction: np.ndarray, counterfactual: np.ndarray, present: list[bool],
             kind: str) -> np.ndarray:
    """The heat maps of a batch: ``absolute`` difference, or the finding's ``uptake``.

    Uptake is what the finding adds to the scan: own minus counterfactual where the
    counterfactual removes it (``present``), counterfactual minus own where it adds it, and 0
    where the change goes the other way (the brighter bone of a grade-3 scan regenerated at
    grade 0 is not where the amyloid is).
    """
    diff = reconstruction - counterfactual
    if kind == "absolute":
        return np.abs(diff)
    sign = np.where(np.asarray(present, bool), 1.0, -1.0).reshape(-1, 1, 1, 1)
    return np.clip(sign * diff, 0.0, None).astype(np.float32)


def finding_mask(cover: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels the true finding covers at least ``threshold`` of.

    A finding smaller than that at the model's size keeps its most covered pixels (every
    pixel within half of its largest coverage), so a one-pixel lesion is still a target.
    """
    mask = cover >= threshold
    if not mask.any() and float(cover.max()) > 0:
        mask = cover >= 0.5 * float(cover.max())
    return mask


def _score(ex: Explained, k: int, cfg: ExplainConfig) -> Score | None:
    if ex.masks is None:
        return None
    mask = finding_mask(ex.masks[k], cfg.mask_threshold)
    if not mask.any():
        return None
    return score(ex.heat[k], mask, ex.images[k] > BODY_LEVEL, tolerance=cfg.tolerance,
                 smooth_sigma=cfg.smooth_sigma)


def _caption(row: dict[str, Any], task: Task, cfg: ExplainConfig, s: Score | None) -> str:
    text = f"{task}: {direction(row, task, cfg.positive_grade)}"
    if s is not None:
        text += (f"; pointing game {'hit' if s.hit else 'miss'}, "
                 f"energy in mask {s.energy_fraction:.2f} (mask {s.mask_share:.2f} of body)")
    return text


@dataclass(frozen=True)
class StudyResult:
    """What ``explain --study`` wrote and found."""

    study_id: str
    figure: Path
    captions: list[str]
    seconds: float


def explain_study(cfg: Config, study_id: str, tasks: tuple[Task, ...] = TASKS,
                  inputs: Inputs | None = None) -> StudyResult:
    """Heat maps of one study for each task the model can change; one PNG, both views.

    Raises:
        ExplainError: unknown study, or a model that cannot change any of ``tasks``.
    """
    started = time.perf_counter()
    inputs = inputs or open_inputs(cfg)
    row = find_study(inputs, study_id)
    ex_cfg = cfg.explain
    usable = [t for t in tasks if explainable(inputs.module.spec, t)]
    if not usable:
        raise ExplainError(f"the model is conditioned on none of {', '.join(tasks)} (its "
                           f"factors: {', '.join(inputs.module.spec.names)})")
    record = inputs.manifest.iloc[row].to_dict()
    panels, captions = [], []
    for task in usable:
        ex = explain_rows(inputs, ex_cfg, [row], task)
        s = _score(ex, 0, ex_cfg) if has_finding(record, task) else None
        captions.append(_caption(record, task, ex_cfg, s))
        panels.append((ex.images[0], ex.counterfactual[0], ex.heat[0],
                       None if ex.masks is None else finding_mask(ex.masks[0],
                                                                   ex_cfg.mask_threshold),
                       captions[-1]))
    out = Path(ex_cfg.output) / f"{study_id}.png"
    atomic_write_bytes(out, study_figure(panels, title=f"study {study_id} "
                                         f"({record['site']}, {record['split']})"))
    return StudyResult(study_id=study_id, figure=out, captions=captions,
                       seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class Evaluation:
    """What ``explain --evaluate N`` measured and wrote."""

    report: dict[str, Any]
    json_path: Path
    html_path: Path
    figures: list[Path]
    seconds: float


def _candidates(inputs: Inputs, cfg: ExplainConfig, task: Task, n: int) -> list[int]:
    """Up to ``n`` studies of the evaluated splits that show the finding and have a mask."""
    if inputs.masks is None:
        raise ExplainError(
            f"{inputs.processed} has no {dataset.MASKS_FILE}: measuring heat maps needs the "
            "true finding masks, which only a phantom's archive has (phantom.truth_folder, "
            "ingest.truth); rerun `synthdx phantom` and `synthdx ingest`")
    m = inputs.manifest
    rows = [int(i) for i in np.flatnonzero(m["split"].isin(cfg.evaluate_splits).to_numpy())]
    cover = inputs.masks[task].reshape(len(inputs.masks[task]), -1).max(axis=1)
    rows = [i for i in rows if has_finding(m.iloc[i], task) and cover[int(m.iloc[i]["index"])] > 0]
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    return sorted(rows[i] for i in order[:n])


def evaluate(cfg: Config, n: int, inputs: Inputs | None = None) -> Evaluation:
    """Pointing game and energy fraction over up to ``n`` studies per task; report files.

    Only studies that show the finding are measured (the counterfactual removes it, and the
    mask says where it was); ``evaluate_splits`` names where they are drawn from.

    Raises:
        ExplainError: the dataset has no masks, or no study of the splits shows a finding.
    """
    started = time.perf_counter()
    inputs = inputs or open_inputs(cfg)
    ex_cfg = cfg.explain
    out = Path(ex_cfg.output)
    per_task: dict[str, Any] = {}
    examples: list[tuple[str, Path, str]] = []
    figures: list[Path] = []
    for task in TASKS:
        if not explainable(inputs.module.spec, task):
            per_task[task] = {"n": 0, "skipped": "the model is not conditioned on it"}
            continue
        rows = _candidates(inputs, ex_cfg, task, n)
        if not rows:
            per_task[task] = {"n": 0, "skipped": "no study of the splits shows it"}
            continue
        ex = explain_rows(inputs, ex_cfg, rows, task)
        scores = [_score(ex, k, ex_cfg) for k in range(len(rows))]
        kept = [(k, s) for k, s in enumerate(scores) if s is not None]
        records = []
        for k, s in kept:
            r = inputs.manifest.iloc[rows[k]]
            records.append({"study_uid": str(r["study_uid"]), "split": str(r["split"]),
                            "site": str(r["site"]), "perugini_grade": int(r["perugini_grade"]),
                            "metastasis": bool(r["metastasis"]), **as_record(s)})
        summary = summarise([s for _, s in kept])
        if task == "amyloid":
            summary["by_grade"] = {
                str(g): summarise([s for (k, s) in kept
                                   if int(inputs.manifest.iloc[rows[k]]["perugini_grade"]) == g])
                for g in sorted({int(inputs.manifest.iloc[rows[k]]["perugini_grade"])
                                 for k, _ in kept})}
        per_task[task] = {**summary, "studies": records}
        for k, s in kept[:ex_cfg.examples]:
            r = inputs.manifest.iloc[rows[k]].to_dict()
            caption = _caption(r, task, ex_cfg, s)
            path = out / "examples" / f"{task}_{len(figures):03d}.png"
            atomic_write_bytes(path, study_figure(
                [(ex.images[k], ex.counterfactual[k], ex.heat[k],
                  finding_mask(ex.masks[k], ex_cfg.mask_threshold)
                  if ex.masks is not None else None, caption)],
                title=f"study {r['study_uid']} ({r['site']}, {r['split']})"))
            figures.append(path)
            examples.append((task, path, caption))
    if not any(v.get("n") for v in per_task.values()):
        raise ExplainError(f"no study of the split(s) {', '.join(ex_cfg.evaluate_splits)} in "
                           f"{inputs.processed} shows a finding the model can change "
                           "(explain.evaluate_splits)")
    ref = model_ref(inputs.model_dir)
    report = {
        "model": {"path": inputs.model_dir.as_posix(), "version": ref.version,
                  "sha256": ref.sha256, "global_step": ref.global_step,
                  "conditions": inputs.module.spec.names, "image_size": list(inputs.size)},
        "processed": inputs.processed.as_posix(),
        "settings": ex_cfg.model_dump(mode="json"),
        "requested_per_task": n,
        "device": str(inputs.device),
        "tasks": per_task,
    }
    json_path, html_path = out / REPORT_JSON, out / REPORT_HTML
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    atomic_write_text(html_path, explain_html(report, examples))
    return Evaluation(report=report, json_path=json_path, html_path=html_path, figures=figures,
                      seconds=time.perf_counter() - started)

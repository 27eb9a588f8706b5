"""The audit stage: quality and privacy of the synthetic set, and the released subset.

Order of work: open and check both inputs; bring every image to the synthetic resolution;
train the in-domain encoder on the real training split; quality metrics overall (on a
class-matched synthetic subsample, so the class mix the synthesis asked for is not counted as
a difference) and per finding class, each beside a reference computed the same way on real
held-out images (what "as good as real" looks like at these sample sizes); train-on-synthetic /
test-on-real per downstream task; nearest-training-image similarity with a threshold from
held-out images; then all outputs, atomically. The MLflow run is the adapter's
(tasks/audit/tracking.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.artifacts.audit_output import (
    AUDIT_JSON,
    ENCODER_FILE,
    NEAREST_CSV,
    PAIRS_PNG,
    RELEASED_DIR,
    WITHHELD_CSV,
    write_encoder,
)
from tasks.artifacts.dataset import read_manifest, read_synthesis
from tasks.artifacts.dvc_hash import dvc_dir_hash
from tasks.audit.consistency import check_consistency
from tasks.audit.data import (
    CLASS_DEFINITIONS,
    HELDOUT_SPLITS,
    ImageSet,
    open_processed,
    open_synthetic,
)
from tasks.audit.encoder import embed, heldout_skill, pick_device, train_encoder
from tasks.audit.gate import fetch_champion_released, gate_generator
from tasks.audit.matching import ClassMatch, class_matched
from tasks.audit.privacy import PrivacyCheck, check_privacy, summary
from tasks.audit.quality import (
    CriticSettings,
    feature_metrics,
    msssim_pairs,
    pixel_two_sample_auc,
)
from tasks.audit.report import (
    nearest_table,
    plot_pairs,
    write_json,
    write_released,
)
from tasks.audit.tstr import TARGET_RATIO, VAL_SPLIT, run_tstr, tstr_metrics
from tasks.common.atomic import atomic_dir
from tasks.common.stage_metrics import stage_metrics_path
from tasks.config import AuditConfig, Config

METRICS_FILE = "audit_metrics.json"
QUALITY_KEYS = ("fid", "precision", "recall", "density", "coverage", "two_sample_auc")


@dataclass(frozen=True)
class AuditTracking:
    """What the audit's MLflow run records, handed from the work to its adapter.

    Why a separate record: the audit's work is a plain function of its inputs; the MLflow run
    is opened by ``tasks.audit.tracking.log_audit`` at the edge, like every other stage's.
    Timings live here and in MLflow only, never in ``audit.json`` (a DVC output).
    """

    tags: dict[str, str]
    params: dict[str, Any]
    metrics: dict[str, Any]
    timings: dict[str, float]
    artifacts: tuple[Path, ...]


@dataclass(frozen=True)
class AuditResult:
    """What an audit found and where it wrote it."""

    output: Path
    metrics_path: Path | None  # None: output not the project's (tasks/common/stage_metrics.py)
    synthetic: int
    released: int
    withheld: int
    threshold_ncc: float
    max_ncc: float
    fid: float | None
    fid_reference: float | None
    precision: float | None
    recall: float | None
    coverage: float | None
    two_sample_auc_features: float | None
    two_sample_auc_pixels: float | None
    seconds: float
    mlflow_run_id: str | None = None  # set by the MLflow adapter (tasks/audit/tracking.py)
    class_matched_n: int | None = None
    tstr: dict[str, dict[str, float | None]] | None = None
    tstr_meets_target: bool | None = None
    consistency_withheld: int = 0
    tstr_released: dict[str, dict[str, float | None]] | None = None
    tracking: AuditTracking | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        """One short paragraph for the CLI."""

        def f(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        matched = ("" if self.class_matched_n is None else
                   f" (class-matched subsample of {self.class_matched_n})")
        return (
            f"audit: {self.synthetic} synthetic images, {self.withheld} withheld (nearest-"
            f"training NCC > {self.threshold_ncc:.4f}, max {self.max_ncc:.4f}), "
            f"{self._consistency_text()}{self.released} released, in {self.seconds:.1f} s\n"
            f"  quality{matched}: FID {f(self.fid)} (real held-out {f(self.fid_reference)}), "
            f"precision {f(self.precision)}, recall {f(self.recall)}, coverage "
            f"{f(self.coverage)}, real-vs-synthetic AUC {f(self.two_sample_auc_features)} "
            f"(features) / {f(self.two_sample_auc_pixels)} (pixels), 0.5 = indistinguishable\n"
            f"{self._tstr_line(f)}"
            f"  report: {self.output / AUDIT_JSON}\n  released: {self.output / RELEASED_DIR}\n"
            f"  DVC metrics: {self._metrics_line()}\n"
            f"  MLflow run: {self.mlflow_run_id}")

    def _consistency_text(self) -> str:
        """The label-consistency withholding, empty when nothing was withheld for it."""
        if not self.consistency_withheld:
            return ""
        line = f"{self.consistency_withheld} withheld as label-inconsistent"
        if self.tstr_released:
            parts = [f"{task} {e['ratio']:.3f}" for task, e in self.tstr_released.items()
                     if e.get("ratio") is not None]
            line += f" (TSTR ratio of the rest: {', '.join(parts)})" if parts else ""
        return line + ", "

    def _metrics_line(self) -> str:
        if self.metrics_path is not None:
            return str(self.metrics_path)
        return ("not written (the output is not the project's and reports_dir is; "
                "--set reports_dir=DIR writes them to DIR)")

    def _tstr_line(self, f: Callable[[float | None], str]) -> str:
        """The TSTR line (AUC trained on synthetic / on real, per task), empty when off."""
        if not self.tstr:
            return ""
        parts = [f"{task} {f(e['auc_synthetic'])} / {f(e['auc_real'])} (ratio {f(e['ratio'])})"
                 for task, e in self.tstr.items()]
        verdict = {True: "met", False: "not met", None: "n/a"}[self.tstr_meets_target]
        return (f"  TSTR (AUC on real {VAL_SPLIT}, trained on synthetic / on as many real): "
                f"{', '.join(parts)}; target ratio >= {TARGET_RATIO}: {verdict}\n")


@dataclass
class _Inputs:
    """Both datasets at the synthetic resolution, split the way the audit uses them."""

    real: ImageSet
    synthetic: ImageSet
    train_mask: np.ndarray
    heldout_mask: np.ndarray
    train: torch.Tensor
    heldout: torch.Tensor
    images: torch.Tensor


def _load(processed: Path, synthetic_root: Path) -> _Inputs:
    real = open_processed(processed)
    synthetic = open_synthetic(synthetic_root, real)
    split = real.manifest["split"].astype(str).to_numpy()
    train_mask = split == "train"
    heldout_mask = np.isin(split, HELDOUT_SPLITS)
    size = synthetic.size
    return _Inputs(real=real, synthetic=synthetic, train_mask=train_mask,
                   heldout_mask=heldout_mask, train=real.load(train_mask, size),
                   heldout=real.load(heldout_mask, size), images=synthetic.load(None, size))


def standardise(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Z-score every feature set with the real training features' mean and spread.

    Why: the raw embedding's scale is arbitrary (it depends on the encoder's training run);
    in units of the real data's own spread, a Fréchet distance or a k-NN radius means the
    same thing from one encoder to the next.
    """
    mean = feats["train"].mean(0)
    std = feats["train"].std(0) + 1e-8
    return {name: (f - mean) / std for name, f in feats.items()}


def _quality(a: AuditConfig, x: _Inputs, feats: dict[str, np.ndarray], ref_rows: np.ndarray,
             match: ClassMatch, device: torch.device) -> dict[str, Any]:
    """Quality metrics overall and per finding class, each with its real held-out reference.

    Overall: the class-matched synthetic subsample (``match``) against the real reference;
    the whole synthetic set's feature metrics are kept as ``overall_unmatched``. Per class:
    every synthetic image of the class.
    """
    real_view = ImageSet(x.real.root, x.real.manifest[x.train_mask].reset_index(drop=True),
                         x.real.images)
    held_view = ImageSet(x.real.root, x.real.manifest[x.heldout_mask].reset_index(drop=True),
                         x.real.images)
    train_classes = {k: v[ref_rows] for k, v in real_view.class_masks().items()}
    held_classes = held_view.class_masks()
    syn_classes = x.synthetic.class_masks()
    ref_images = x.train[torch.from_numpy(ref_rows)]
    groups: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
        "overall": (np.ones(len(ref_rows), bool), match.mask, np.ones(len(x.heldout), bool))}
    if syn_classes and train_classes:
        for name in CLASS_DEFINITIONS:
            groups[name] = (train_classes[name], syn_classes[name], held_classes[name])
    out: dict[str, Any] = {}
    for i, (name, (r, s, h)) in enumerate(groups.items()):
        seed = a.seed + 101 * i
        entry = feature_metrics(feats["train"][r], feats["synthetic"][s], a.nearest_k,
                                a.two_sample_folds, seed)
        entry["msssim_synthetic"] = msssim_pairs(x.images[torch.tensor(s)], a.msssim_pairs,
                                                 seed)
        entry["msssim_real"] = msssim_pairs(ref_images[torch.tensor(r)], a.msssim_pairs, seed)
        reference = feature_metrics(feats["train"][r], feats["heldout"][h], a.nearest_k,
                                    a.two_sample_folds, seed)
        entry["reference"] = {"n_heldout": reference.pop("n_synthetic"),
                              **{k: reference[k] for k in QUALITY_KEYS}}
        out[name] = entry
    critic = CriticSettings(folds=a.two_sample_folds, steps=a.pixel_critic_steps,
                            batch_size=a.encoder.batch_size, lr=a.encoder.lr, seed=a.seed)
    out["overall"]["two_sample_auc_pixels"] = (
        pixel_two_sample_auc(ref_images, x.images[torch.from_numpy(match.mask)], critic, device)
        if a.pixel_critic_steps > 0 else None)
    out["overall"]["class_matched"] = match.doc
    unmatched = (feature_metrics(feats["train"], feats["synthetic"], a.nearest_k,
                                 a.two_sample_folds, a.seed) if match.applied else None)
    return {"overall": out.pop("overall"), "overall_unmatched": unmatched, "per_class": out}


def _privacy_doc(check: PrivacyCheck, table: Any, shown: int) -> dict[str, Any]:
    closest = table.sort_values("ncc", ascending=False, kind="stable").head(shown)
    return {
        "similarity": "normalised cross-correlation of both views, nearest real training image",
        "heldout_splits": list(HELDOUT_SPLITS),
        "quantile": check.quantile,
        "threshold_ncc": check.threshold_ncc,
        "threshold_ssim": check.threshold_ssim,
        "heldout": {"n": len(check.heldout_ncc), "ncc": summary(check.heldout_ncc),
                    "ssim": summary(check.heldout_ssim)},
        "synthetic": {"n": len(check.ncc), "ncc": summary(check.ncc),
                      "ssim": summary(check.ssim)},
        "withheld": int(check.withheld.sum()),
        "released": int((~check.withheld).sum()),
        "withheld_fraction": float(check.withheld.mean()) if len(check.withheld) else 0.0,
        "over_ssim_threshold": int((check.ssim > check.threshold_ssim).sum()),
        "closest": closest.to_dict(orient="records"),
    }


def dvc_metrics(quality: dict[str, Any], privacy: dict[str, Any], encoder: dict[str, Any]
                ) -> dict[str, Any]:
    """The key numbers for ``dvc metrics`` (no timings, no paths)."""
    overall = quality["overall"]
    unmatched = quality.get("overall_unmatched")
    keep = ("fid", "precision", "recall", "density", "coverage", "two_sample_auc",
            "msssim_synthetic", "msssim_real")
    return {
        "synthetic": privacy["synthetic"]["n"],
        "released": privacy["released"],
        "withheld": privacy["withheld"],
        "withheld_fraction": privacy["withheld_fraction"],
        "privacy": {"threshold_ncc": privacy["threshold_ncc"],
                    "max_ncc": privacy["synthetic"]["ncc"]["max"],
                    "median_ncc": privacy["synthetic"]["ncc"]["median"],
                    "heldout_median_ncc": privacy["heldout"]["ncc"]["median"]},
        "quality": {**{k: overall[k] for k in keep},
                    "two_sample_auc_pixels": overall["two_sample_auc_pixels"],
                    "fid_reference": overall["reference"]["fid"],
                    "two_sample_auc_reference": overall["reference"]["two_sample_auc"],
                    "n_synthetic_used": overall["class_matched"]["n_used"]},
        "overall_unmatched": ({k: unmatched[k] for k in ("fid", "two_sample_auc")}
                              if unmatched else None),
        "per_class": {name: {"n_synthetic": entry["n_synthetic"],
                             **{k: entry[k] for k in keep}}
                      for name, entry in quality["per_class"].items()},
        "encoder": {f"heldout_{k}": v for k, v in encoder["heldout"].items()},
        "tstr": tstr_metrics(quality["tstr"]) if "tstr" in quality else None,
        "tstr_released": (tstr_metrics(quality["tstr_released"])
                          if "tstr_released" in quality else None),
    }


def run_audit(cfg: Config, synthetic: Path | None = None, processed: Path | None = None
              ) -> AuditResult:
    """Audit a synthetic dataset against the real one and write the released subset.

    Args:
        cfg: the validated parameters (``audit``, ``ingest.output``, ``synthesize.output``,
            ``reports_dir`` and ``mlflow`` are used).
        synthetic: synthetic dataset folder (default ``audit.synthetic`` or
            ``synthesize.output``).
        processed: real processed dataset folder (default ``ingest.output``).

    Returns:
        The headline numbers and paths.

    Raises:
        AuditInputError: (a ValueError; FileNotFoundError too when something is missing) an
            input that cannot be audited, with the path and the reason.
    """
    a = cfg.audit
    started = time.perf_counter()
    timings: dict[str, float] = {}
    processed = Path(processed or cfg.ingest.output)
    synthetic_root = Path(synthetic or a.synthetic or cfg.synthesize.output)
    x = _load(processed, synthetic_root)
    timings["load"] = time.perf_counter() - started
    digests = {"processed": dvc_dir_hash(processed), "synthetic": dvc_dir_hash(synthetic_root)}
    device = pick_device()
    tags = {"synthdx.processed": str(processed), "synthdx.synthetic": str(synthetic_root),
            "synthdx.synthetic_digest": digests["synthetic"]}
    tick = time.perf_counter()
    train_manifest = x.real.manifest[x.train_mask]
    held_manifest = x.real.manifest[x.heldout_mask]
    encoder, info = train_encoder(
        x.train, train_manifest["perugini_grade"].to_numpy(),
        train_manifest["metastasis"].to_numpy(dtype=bool), a.encoder, device)
    info.heldout = heldout_skill(encoder, x.heldout,
                                 held_manifest["perugini_grade"].to_numpy(),
                                 held_manifest["metastasis"].to_numpy(dtype=bool))
    timings["encoder"] = time.perf_counter() - tick

    tick = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    ref_rows = np.sort(rng.permutation(len(x.train))[:a.max_real])
    feats = standardise({"train": embed(encoder, x.train[torch.from_numpy(ref_rows)]),
                         "heldout": embed(encoder, x.heldout),
                         "synthetic": embed(encoder, x.images)})
    match = class_matched(train_manifest.iloc[ref_rows], x.synthetic.manifest, a.seed)
    quality = _quality(a, x, feats, ref_rows, match, device)
    timings["quality"] = time.perf_counter() - tick

    tick = time.perf_counter()
    is_val = held_manifest["split"].astype(str).to_numpy() == VAL_SPLIT
    val_images, val_manifest = x.heldout[torch.from_numpy(is_val)], held_manifest[is_val]
    quality["tstr"] = run_tstr(x.images, x.synthetic.manifest, x.train, train_manifest,
                               val_images, val_manifest, a.tstr, device)
    timings["tstr"] = time.perf_counter() - tick

    tick = time.perf_counter()
    consistency = check_consistency(x.images, x.synthetic.manifest, x.train, train_manifest,
                                    val_images, val_manifest, a.consistency, device)
    if consistency.inconsistent.any():
        # What the downstream stages get: the consistent images (privacy is not yet applied,
        # it withholds near-copies, a handful at most).
        keep = torch.from_numpy(~consistency.inconsistent)
        quality["tstr_released"] = run_tstr(
            x.images[keep], x.synthetic.manifest[~consistency.inconsistent], x.train,
            train_manifest, val_images, val_manifest, a.tstr, device)
        quality["tstr_released"].pop("seconds", None)
    timings["consistency"] = time.perf_counter() - tick

    tick = time.perf_counter()
    check = check_privacy(x.images, x.train, x.heldout, a.privacy.quantile, device)
    table = nearest_table(x.synthetic, train_manifest, check.nearest, check.ncc,
                          check.ssim, check.withheld)
    table["label_inconsistent"] = consistency.inconsistent
    privacy = _privacy_doc(check, table, a.privacy.pairs_shown)
    timings["privacy"] = time.perf_counter() - tick

    # Timings and the run ID go to MLflow only: audit.json is a DVC output, and a rerun on
    # the same inputs must give the same bytes, or everything downstream reruns.
    encoder_doc = {**{k: v for k, v in asdict(info).items() if k != "seconds"},
                   "architecture": "MONAI ResidualUnit CNN, multi-task "
                   "(Perugini grade 4-way, metastasis)", "device": str(device)}
    timings["encoder_training"] = info.seconds
    quality["tstr"].pop("seconds", None)
    metrics = dvc_metrics(quality, privacy, encoder_doc)
    released_mask = ~(check.withheld | consistency.inconsistent)
    metrics["consistency_withheld"] = int(consistency.inconsistent.sum())
    metrics["released"] = int(released_mask.sum())
    document = {
        "generator": "synthdx audit",
        "inputs": {"processed": str(processed), "synthetic": str(synthetic_root),
                   "digests": digests, "image_size": list(x.synthetic.size),
                   "real_train": int(x.train_mask.sum()),
                   "real_train_in_quality_metrics": len(ref_rows),
                   "synthetic_in_overall_metrics": match.doc["n_used"],
                   "real_heldout": int(x.heldout_mask.sum()),
                   "synthetic_images": len(x.images)},
        "classes": CLASS_DEFINITIONS,
        "encoder": encoder_doc,
        "quality": quality,
        "privacy": privacy,
        "consistency": consistency.doc,
        "released": int(released_mask.sum()),
        "config": a.model_dump(mode="json"),
        # The generator's champion / challenger decision (tasks/audit/gate.py): a refused
        # generator's set is not released; the champion generator's is, again.
        "generator_gate": (gate := gate_generator(cfg, read_synthesis(synthetic_root),
                                                  metrics)).as_dict(),
    }
    output = Path(a.output)
    with atomic_dir(output) as tmp:
        if gate.promote:
            released = write_released(x.synthetic, released_mask, tmp / RELEASED_DIR)
        else:
            released = len(read_manifest(fetch_champion_released(cfg, gate,
                                                                 tmp / RELEASED_DIR)))
        table.to_csv(tmp / NEAREST_CSV, index=False)
        table[~released_mask].to_csv(tmp / WITHHELD_CSV, index=False)
        plot_pairs(tmp / PAIRS_PNG, x.images, x.train, table, check.nearest,
                   a.privacy.pairs_shown)
        write_json(tmp / AUDIT_JSON, document)
        write_encoder(tmp / ENCODER_FILE, encoder, x.synthetic.size)
    timings["total"] = time.perf_counter() - started
    metrics_path = stage_metrics_path(cfg.reports_dir, output,
                                      AuditConfig.model_fields["output"].default,
                                      METRICS_FILE)
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    tracking = AuditTracking(
        tags=tags,
        params={"audit": a.model_dump(mode="json"), "device": str(device),
                "image_size": list(x.synthetic.size)},
        metrics=metrics, timings=timings,
        artifacts=tuple(output / name for name in (AUDIT_JSON, PAIRS_PNG, WITHHELD_CSV,
                                                   NEAREST_CSV)))
    overall = quality["overall"]
    return AuditResult(
        output=output, metrics_path=metrics_path, synthetic=len(x.images), released=released,
        withheld=privacy["withheld"], threshold_ncc=check.threshold_ncc,
        max_ncc=float(check.ncc.max()), fid=overall["fid"],
        fid_reference=overall["reference"]["fid"], precision=overall["precision"],
        recall=overall["recall"], coverage=overall["coverage"],
        two_sample_auc_features=overall["two_sample_auc"],
        two_sample_auc_pixels=overall["two_sample_auc_pixels"],
        seconds=time.perf_counter() - started,
        class_matched_n=match.doc["n_used"] if match.applied else None,
        tstr=None if "note" in quality["tstr"] else metrics["tstr"],
        tstr_meets_target=quality["tstr"]["meets_target"],
        consistency_withheld=int(consistency.inconsistent.sum()),
        tstr_released=metrics["tstr_released"], tracking=tracking)

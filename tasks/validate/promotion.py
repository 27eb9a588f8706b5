"""Champion / challenger: a task's best new classifier replaces ``@champion`` only if it earns it.

Why a gate: retraining on a grown archive gives a new model every night, and a new model is not
a better one. The new model and the registry's current champion are scored on the SAME cases,
today's evaluation sets (the internal site's test split and every external site), so each
difference is a paired comparison (DeLong, tasks/validate/delong.py):

- a site blocks promotion when the new model's AUC there is lower than the champion's by more
  than ``validation.promotion.tolerance`` and the drop is significant at ``alpha`` (a site with
  fewer than two cases of a class cannot be tested and is named, not counted);
- the new model must be better overall: its AUC over every evaluation case together exceeds
  the champion's by more than ``margin``.

Otherwise the new version is registered as ``@challenger`` and the reason says which rule
refused it. The champion is scored from its registered weights (downloaded from the registry,
not loaded as a pyfunc: loading puts the version's copy of ``models`` on ``sys.path``), on
today's processed images, exactly as the classifier stage scores (area-resize, sigmoid).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import PromotionConfig
from tasks.validate.delong import delong_test
from tasks.validate.evalsets import eval_sets
from tasks.validate.inputs import ValidationInputError, load_model

NO_CHAMPION = "no champion yet"


@dataclass(frozen=True)
class SiteGate:
    """The new model against the champion on one evaluation set (or all of them: pooled)."""

    site: str
    internal: bool
    n: int
    positives: int
    auc_new: float | None = None
    auc_champion: float | None = None
    delta: float | None = None
    p_value: float | None = None
    blocks: bool = False
    note: str = ""


@dataclass
class Decision:
    """One task's verdict: ``promoted``, ``challenger`` or ``kept``, and why."""

    decision: str
    reason: str
    sites: list[SiteGate] = field(default_factory=list)
    pooled: SiteGate | None = None

    @property
    def promote(self) -> bool:
        """Whether the new model becomes (or stays) ``@champion``."""
        return self.decision in ("promoted", "kept")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (promotion.json's per-task fields, tasks/artifacts/promotion_report.py)."""
        return {"decision": self.decision, "reason": self.reason,
                "sites": [asdict(s) for s in self.sites],
                "pooled": asdict(self.pooled) if self.pooled else None}


def _compare(site: str, internal: bool, labels: np.ndarray, new: np.ndarray, old: np.ndarray,
             cfg: PromotionConfig) -> SiteGate:
    positives = int(labels.sum())
    n = len(labels)
    if positives < 2 or n - positives < 2:
        return SiteGate(site, internal, n, positives,
                        note=f"not assessable ({positives} positive, {n - positives} negative; "
                             "a paired test needs two of each)")
    test = delong_test(labels, new, old)
    blocks = test.delta < -cfg.tolerance and test.p_value < cfg.alpha
    return SiteGate(site, internal, n, positives, auc_new=round(test.auc_a, 6),
                    auc_champion=round(test.auc_b, 6), delta=round(test.delta, 6),
                    p_value=round(test.p_value, 6), blocks=bool(blocks))


def gate(cases: pd.DataFrame, new: np.ndarray, old: np.ndarray, cfg: PromotionConfig
         ) -> Decision:
    """Decide on a new model against the champion from both models' scores of ``cases``.

    Args:
        cases: the evaluation cases (``site``, ``split`` test/external, ``label`` 0/1), in the
            order of ``new`` and ``old``.
        new: the new model's scores.
        old: the champion's scores of the same cases.
        cfg: tolerance, margin and alpha.
    """
    labels = cases["label"].to_numpy(dtype=np.int64)
    sites = [_compare(es.key, es.internal, labels[es.mask(cases)], new[es.mask(cases)],
                      old[es.mask(cases)], cfg) for es in eval_sets(cases)]
    pooled = _compare("pooled", False, labels, new, old, cfg)
    blocking = [s for s in sites if s.blocks]
    if blocking:
        worst = ", ".join(f"{s.site} (delta AUC {s.delta:+.3f}, p={s.p_value:.3g})"
                          for s in blocking)
        return Decision("challenger", f"worse than the champion at {worst}, beyond the "
                        f"tolerance {cfg.tolerance:g} (alpha {cfg.alpha:g})", sites, pooled)
    if pooled.delta is None:
        return Decision("challenger", f"not comparable overall: {pooled.note}", sites, pooled)
    untested = [s.site for s in sites if s.delta is None]
    note = f"; not assessable at {', '.join(untested)}" if untested else ""
    if pooled.delta <= cfg.margin:
        return Decision("challenger", f"not better overall: pooled delta AUC "
                        f"{pooled.delta:+.3f} (p={pooled.p_value:.3g}) does not exceed the "
                        f"margin {cfg.margin:+g}{note}", sites, pooled)
    return Decision("promoted", f"better overall: pooled delta AUC {pooled.delta:+.3f} "
                    f"(p={pooled.p_value:.3g}) > margin {cfg.margin:+g}, no site worse "
                    f"beyond the tolerance {cfg.tolerance:g}{note}", sites, pooled)


def evaluation_cases(model_dir: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """A trained model's evaluation cases (test and external rows) and its scores of them.

    Raises:
        ValidationInputError: the model folder cannot be read (named in the message).
    """
    model = load_model(Path(model_dir))
    frame = model.predictions
    frame = frame[frame["split"] != "val"].sort_values("study_uid").reset_index(drop=True)
    if frame.empty:
        raise ValidationInputError(f"{model_dir}: no test or external cases to compare on")
    return frame.drop(columns=["score"]), frame["score"].to_numpy(dtype=np.float64)


def score_version(weights: Path, processed: Path, study_uids: pd.Series) -> np.ndarray:
    """Scores of a registered classifier's weights on today's processed images of ``study_uids``.

    The same path as the classifier stage's predictions: the rows are area-resized to the
    model's input size (models.classifier_data.load_images) and scored with its sigmoid.

    Raises:
        ValidationInputError: a case the processed dataset does not hold (named).
    """
    from models.classifier import ScanClassifier, predict_scores
    from models.classifier_data import load_images
    from models.module_file import read_module_file
    from tasks.artifacts.dataset import read_manifest

    manifest = read_manifest(processed)
    where = dict(zip(manifest["study_uid"].astype(str), manifest["index"].astype(int),
                     strict=True))
    missing = [uid for uid in study_uids if uid not in where]
    if missing:
        raise ValidationInputError(f"{processed}: the processed dataset has no study "
                                   f"{missing[0]!r} (and {len(missing) - 1} more) that the "
                                   "new models were scored on; rerun the classifier stages")
    file = read_module_file(weights)
    module = file.build(ScanClassifier)
    images = load_images(processed, [where[uid] for uid in study_uids], file.image_size)
    return predict_scores(module, images).numpy().astype(np.float64)


def champion_weights(tracking_uri: str, name: str, version: str, into: Path) -> Path:
    """Download a registered classifier version's ``model.pt`` into ``into``; return its path.

    Raises:
        ValidationInputError: the version holds no weights (not a synthdx classifier).
    """
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                     dst_path=str(into),
                                                     tracking_uri=tracking_uri))
    found = sorted(local.rglob("model.pt"))
    if not found:
        raise ValidationInputError(f"models:/{name}/{version}: no model.pt among its artifacts")
    return found[0]


def judge(tracking_uri: str, name: str, champion: Any, model_dir: Path, processed: Path,
          cfg: PromotionConfig) -> Decision:
    """The decision on the model in ``model_dir`` against ``champion`` (a ModelVersion or None).

    Raises:
        ValidationInputError: the model folder or the processed dataset cannot be read.
    """
    if champion is None:
        return Decision("promoted", NO_CHAMPION)
    cases, new = evaluation_cases(model_dir)
    with tempfile.TemporaryDirectory(prefix="synthdx-champion-") as tmp:
        weights = champion_weights(tracking_uri, name, str(champion.version), Path(tmp))
        old = score_version(weights, processed, cases["study_uid"])
    return gate(cases, new, old, cfg)

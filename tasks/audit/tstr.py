"""Train on synthetic, test on real (TSTR): is the synthetic set useful for the downstream tasks?

Feature metrics say whether synthetic images look real; TSTR says whether they teach what the
real ones teach. Per downstream task a small CNN is trained on the synthetic set alone and
scored (AUC) on the real internal validation split; the same network, with the same settings
and the same number of steps, is trained on as many real training images (a stratified random
draw with, as far as the real data allow, the synthetic set's positive fraction) and scored on
the same split (TRTR). The ratio TSTR / TRTR near 1 means the synthetic set can stand in for
that much real data (issue 15 asks for >= 0.9).

Same n on both sides, so the ratio measures the images, not the amount of data; balanced
batches (half positive), so the class mix of either set does not decide the result; a plain
seeded loop, because four small trainings need none of Lightning's machinery and the audit
stays one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from models.audit_encoder import AuditEncoder
from tasks.audit.encoder import jitter
from tasks.config import AuditTstrConfig

TARGET_RATIO = 0.9
"""Issue 15: a synthetic set is useful when TSTR reaches 90 % of TRTR for every task."""
VAL_SPLIT = "val"
"""Scored on the internal validation split only: the test split stays untouched for the
downstream stages, and external sites measure shift, not the synthetic set."""

TaskRule = Callable[[pd.DataFrame], np.ndarray]
TASKS: dict[str, TaskRule] = {
    "amyloidosis": lambda m: m["perugini_grade"].to_numpy(dtype=np.int64) >= 2,
    "metastasis": lambda m: m["metastasis"].to_numpy(dtype=bool),
}
"""The downstream tasks and their positive class (Perugini >= 2: the usual ATTR threshold)."""
TASK_DEFINITIONS = {"amyloidosis": "perugini_grade >= 2", "metastasis": "metastasis"}

NETWORK = {"feature_dim": 64, "channels": (16, 32, 64, 128)}
"""The audit encoder's architecture with one logit: small enough for a few hundred CPU steps
in seconds, and it reads one- or two-pixel metastases at 128 x 32 (stride-2 3x3 stem)."""


def matched_draw(labels: np.ndarray, n: int, positive_fraction: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Rows of a stratified random draw of ``n`` items with a given positive fraction.

    Why: TRTR must see as many images as TSTR and the same class mix, or the ratio would
    measure the amount of data. When the real split has too few positives (or negatives) for
    that fraction, all of that class is taken and the rest is filled with the other class:
    the count is kept, the fraction comes as close as the data allow.

    Args:
        labels: boolean labels of the pool.
        n: items wanted (capped at the pool size).
        positive_fraction: wanted share of positives.
        rng: the seeded generator of the draw.

    Returns:
        Sorted row positions into ``labels``.
    """
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    n = min(n, len(labels))
    want_pos = int(round(n * positive_fraction))
    if positive_fraction > 0 and want_pos == 0:
        want_pos = 1  # a task with positives on one side gets at least one on the other
    take_pos = min(want_pos, len(pos))
    take_pos = max(take_pos, n - len(neg))  # too few negatives: more positives
    rows = np.concatenate([rng.choice(pos, size=take_pos, replace=False),
                           rng.choice(neg, size=n - take_pos, replace=False)])
    return np.sort(rows)


def _balanced_batches(labels: np.ndarray, batch_size: int, steps: int,
                      gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices of ``steps`` batches, half positive, each class cycled in shuffled passes.

    Cycling (not drawing with replacement) shows every image of a class before any twice.
    """
    pools = [torch.from_numpy(np.flatnonzero(labels)), torch.from_numpy(np.flatnonzero(~labels))]
    sizes = (batch_size // 2, batch_size - batch_size // 2)
    orders = [p[torch.randperm(len(p), generator=gen)] for p in pools]
    cursors = [0, 0]
    for _ in range(steps):
        parts = []
        for c, (pool, size) in enumerate(zip(pools, sizes, strict=True)):
            taken: list[torch.Tensor] = []
            while size > 0:
                if cursors[c] == len(orders[c]):
                    orders[c], cursors[c] = pool[torch.randperm(len(pool), generator=gen)], 0
                part = orders[c][cursors[c]:cursors[c] + size]
                cursors[c] += len(part)
                size -= len(part)
                taken.append(part)
            parts.extend(taken)
        yield torch.cat(parts)


def train_classifier(images: torch.Tensor, labels: np.ndarray, cfg: AuditTstrConfig,
                     device: torch.device) -> AuditEncoder:
    """Train the small binary CNN for ``cfg.steps`` balanced, augmented steps; eval mode.

    Seeded by ``cfg.seed`` alone, so the synthetic and the real run start from the same
    weights and differ only in their images.
    """
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = AuditEncoder(images.shape[1], NETWORK["feature_dim"], {"task": 1},
                         channels=NETWORK["channels"]).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.steps)
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    for batch in _balanced_batches(np.asarray(labels, dtype=bool), cfg.batch_size, cfg.steps,
                                   gen):
        logits = model(jitter(images[batch], gen).to(device))["task"][:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, y[batch].to(device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def score(model: AuditEncoder, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logit of every image (eval mode, batched)."""
    device = next(model.parameters()).device
    parts = [model(images[i:i + batch_size].to(device))["task"][:, 0].float().cpu()
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts).numpy()


def _both_classes(labels: np.ndarray) -> bool:
    return 0 < int(labels.sum()) < len(labels)


def tstr_task(synthetic: torch.Tensor, syn_labels: np.ndarray, real: torch.Tensor,
              real_labels: np.ndarray, val: torch.Tensor, val_labels: np.ndarray,
              cfg: AuditTstrConfig, seed: int, device: torch.device) -> dict[str, Any]:
    """TSTR and TRTR of one task, with the counts behind them.

    Args:
        synthetic: synthetic images.
        syn_labels: their task labels.
        real: real training images (the pool of the matched draw).
        real_labels: their task labels.
        val: real validation images.
        val_labels: their task labels.
        cfg: steps, batch size, learning rate and network seed.
        seed: seed of the real draw.
        device: where to train.

    Returns:
        ``auc_synthetic``, ``auc_real``, ``ratio`` (None with a ``note`` when a set lacks a
        class), ``meets_target``, the training and validation counts.
    """
    rows = matched_draw(real_labels, len(syn_labels), float(np.mean(syn_labels)),
                        np.random.default_rng(seed))
    drawn = real_labels[rows]
    entry: dict[str, Any] = {
        "n_train": len(syn_labels), "n_train_real": len(rows),
        "positives_synthetic": int(syn_labels.sum()), "positives_real": int(drawn.sum()),
        "n_val": len(val_labels), "positives_val": int(val_labels.sum()),
        "auc_synthetic": None, "auc_real": None, "ratio": None, "meets_target": None}
    lacking = [name for name, labels in (("synthetic set", syn_labels),
                                         ("real training draw", drawn),
                                         ("real validation split", val_labels))
               if not _both_classes(labels)]
    if lacking:
        entry["note"] = f"no positives or no negatives in the {', '.join(lacking)}"
        return entry
    entry["auc_synthetic"] = float(roc_auc_score(
        val_labels, score(train_classifier(synthetic, syn_labels, cfg, device), val)))
    entry["auc_real"] = float(roc_auc_score(
        val_labels, score(train_classifier(real[torch.from_numpy(rows)], drawn, cfg, device),
                          val)))
    if entry["auc_real"] <= 0.5:
        entry["note"] = "the real-data classifier is at chance: no ratio to report"
        return entry
    entry["ratio"] = entry["auc_synthetic"] / entry["auc_real"]
    entry["meets_target"] = entry["ratio"] >= TARGET_RATIO
    return entry


def run_tstr(synthetic: torch.Tensor, syn_manifest: pd.DataFrame, real: torch.Tensor,
             real_manifest: pd.DataFrame, val: torch.Tensor, val_manifest: pd.DataFrame,
             cfg: AuditTstrConfig, device: torch.device) -> dict[str, Any]:
    """TSTR / TRTR of every downstream task: the ``quality.tstr`` section of audit.json.

    Args:
        synthetic: synthetic images in ``syn_manifest`` row order.
        syn_manifest: the synthetic manifest (``perugini_grade``, ``metastasis``).
        real: real training images in ``real_manifest`` row order.
        real_manifest: the real training split's manifest rows.
        val: real validation images in ``val_manifest`` row order.
        val_manifest: the real validation split's manifest rows.
        cfg: the TSTR settings (``steps`` 0: off).
        device: where to train.

    Returns:
        Settings, ``target_ratio``, ``meets_target`` (True: every task meets it; False: one
        does not; None: no verdict, a task has no ratio) and one entry per task under
        ``tasks``; ``note`` when skipped.
    """
    started = time.perf_counter()
    doc: dict[str, Any] = {
        "target_ratio": TARGET_RATIO, "meets_target": None, "val_split": VAL_SPLIT,
        "settings": {**cfg.model_dump(mode="json"), "network": "AuditEncoder, one logit, "
                     f"channels {list(NETWORK['channels'])}, balanced batches, shift and "
                     "intensity jitter"},
        "definitions": TASK_DEFINITIONS, "tasks": {name: None for name in TASKS}}
    labelled = all(c in syn_manifest.columns for c in ("perugini_grade", "metastasis"))
    if cfg.steps == 0:
        doc["note"] = "off (audit.tstr.steps = 0)"
    elif not labelled:
        doc["note"] = "the synthetic manifest has no perugini_grade / metastasis labels"
    elif len(val_manifest) == 0:
        doc["note"] = f"the real dataset has no '{VAL_SPLIT}' split to test on"
    else:
        for i, (name, rule) in enumerate(TASKS.items()):
            doc["tasks"][name] = tstr_task(
                synthetic, rule(syn_manifest), real, rule(real_manifest), val,
                rule(val_manifest), cfg, cfg.seed + 1 + i, device)
        verdicts = [e["meets_target"] for e in doc["tasks"].values()]
        doc["meets_target"] = (False if False in verdicts else
                               None if None in verdicts else True)
    doc["seconds"] = time.perf_counter() - started
    return doc


def tstr_metrics(doc: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``tstr.<task>.{auc_synthetic, auc_real, ratio}`` for the DVC metrics file."""
    keys = ("auc_synthetic", "auc_real", "ratio")
    return {name: {k: (entry or {}).get(k) for k in keys} for name, entry in doc["tasks"].items()}

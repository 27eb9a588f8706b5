"""The train_classifier stage: every (task, regime) asked for, each with every seed.

Outputs ``<classifier.output>/<task>/<regime>/seed<k>/`` (see tasks.classifier.train). Each
``<task>/<regime>/`` folder is one DVC output (the dvc.yaml matrix runs one per process) and
is replaced atomically once all its seeds are trained, so a killed run leaves the previous
models in place.

MLflow (through the stage's adapter, tasks/classifier/tracking.py): one stage run per
process, and one nested run per model with its params, learning curves (Lightning's MLflow
logger), threshold, validation AUC, training-set composition (``training_set.json``) and
lineage (dataset digests, diffusion model version) as tags and dataset inputs. Registration
of the best model per task is the validate stage's job: it is the first stage that sees every
regime of a task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from tasks.classifier.inputs import load_inputs
from tasks.classifier.regimes import USES_SYNTHETIC, compose
from tasks.classifier.tracking import stage_tracking
from tasks.classifier.train import train_model, write_model_folder
from tasks.common.atomic import atomic_dir
from tasks.config import Config, RegimeName, TaskName


@dataclass
class ClassifierRunSummary:
    """What one train_classifier process produced."""

    output: Path
    models: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    mlflow_run_id: str | None = None

    def describe(self) -> str:
        """A short table for the CLI: one line per model."""
        lines = [f"train_classifier: {len(self.models)} model(s) in {self.seconds:.1f} s "
                 f"-> {self.output}"]
        for m in self.models:
            auc = f"{m['val_auc']:.3f}" if m.get("val_auc") is not None else "n/a"
            ts = m["training_set"]
            lines.append(f"  {m['task']:<12} {m['regime']:<24} seed {m['seed']:<3} "
                         f"train n={ts['images']:<5} pos={ts['positives']:<4} "
                         f"val AUC {auc}  threshold {m['threshold']:.3f}")
            lines.extend(f"    note: {note}" for note in ts.get("notes", []))
        lines.append(f"  MLflow run: {self.mlflow_run_id}")
        return "\n".join(lines)


def _selection(cfg: Config, tasks: list[str] | None, regimes: list[str] | None
               ) -> list[tuple[str, str]]:
    c = cfg.classifier
    chosen_tasks = tasks or list(c.tasks)
    chosen_regimes = regimes or list(c.regimes)
    for kind, names, known in (("task", chosen_tasks, get_args(TaskName)),
                               ("regime", chosen_regimes, get_args(RegimeName))):
        for name in names:
            if name not in known:
                raise ValueError(f"unknown {kind} {name!r} (expected one of: "
                                 f"{', '.join(known)})")
    return [(t, r) for t in chosen_tasks for r in chosen_regimes]


def run_train_classifier(cfg: Config, tasks: list[str] | None = None,
                         regimes: list[str] | None = None) -> ClassifierRunSummary:
    """Train every seed of every (task, regime) selected (default: all in params).

    Raises:
        ValueError: an unknown task or regime, or a training set that cannot be built.
        FileNotFoundError: a missing input dataset.
    """
    c = cfg.classifier
    pairs = _selection(cfg, tasks, regimes)
    inputs = load_inputs(cfg, need_synthetic=any(r in USES_SYNTHETIC for _, r in pairs))
    output = Path(c.output)
    summary = ClassifierRunSummary(output=output)
    started = time.perf_counter()
    with stage_tracking(cfg, pairs, inputs.size) as tracking:
        summary.mlflow_run_id = tracking.run_id
        for task, regime in pairs:
            with atomic_dir(output / task / regime) as tmp:
                for seed in c.seeds:
                    training = compose(task, regime, seed, inputs.real.root, inputs.real.manifest,
                                       inputs.synthetic.root if inputs.synthetic else None,
                                       inputs.synthetic.manifest if inputs.synthetic else None,
                                       c.limited_fraction, c.synthetic_per_real)
                    with tracking.model_run(task, regime, seed) as run:
                        model = train_model(c, inputs, training, run.logger)
                        model.info["mlflow_run_id"] = run.run_id
                        folder = tmp / f"seed{seed}"
                        folder.mkdir()
                        write_model_folder(folder, model)
                        run.log_model(model, folder, training)
                    summary.models.append(model.info)
        summary.seconds = time.perf_counter() - started
        tracking.finish(summary.seconds, summary.models)
    return summary

"""The stage registry: every pipeline stage declared once, and everything else derived from it.

Why one registry: a stage used to be written down seven times (dvc.yaml, params.yaml,
tasks/config.py, tasks/<stage>/, flows/<stage>.py, flows/cli.py, prefect.yaml). Now dvc.yaml
declares the DAG, tasks/config.py + params.yaml the parameters, tasks/<stage>/ the work, and
this table the rest: the ``synthdx <command>`` CLI commands (flows/cli.py), the stage's
Prefect flow (flows/stage_flow.py) and its on-demand deployment in prefect.yaml
(flows/orchestration/deployments.py writes that block; a test compares). tests/
test_stage_registry.py checks this table against dvc.yaml.

Entry points are ``"module:attribute"`` strings, imported only when a stage runs: ``synthdx
--help`` then needs neither torch nor Prefect, and a stage's command loads only its own code.
This module imports nothing heavy for the same reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


def load(ref: str) -> Any:
    """The object ``"package.module:attribute"`` names (``"ValueError"``: a builtin)."""
    module, _, attribute = ref.rpartition(":")
    return getattr(importlib.import_module(module or "builtins"), attribute)


def describe_result(result: Any) -> str | None:
    """The console text of a stage's result: its ``describe()``; None prints nothing.

    Why None is allowed: on the worker ranks of a distributed stage the entry function may
    return nothing (rank 0 writes and reports the output).
    """
    return None if result is None else str(result.describe())


@dataclass(frozen=True)
class Shorthand:
    """One option of a stage command.

    Most are shorthands for one parameter (``key``), so they go through the same validation
    as ``--set key=value`` and a run stays reproducible from params.yaml plus overrides. An
    option without ``key`` is handed to the entry function as the keyword ``arg``.

    Attributes:
        name: the Python parameter name; the flag is ``--name-with-dashes`` unless ``flags``.
        type: the option's type as typer reads it (``int | None``, ``list[str] | None``, ...).
        help: the option's help text.
        key: the ``section.key`` parameter it sets (when given, i.e. not its default).
        flags: explicit declarations (``"--resume/--no-resume"``, ``"--strict"``).
        default: the value when not given; a value equal to it sets nothing.
        metavar: what the option takes, in the help (``TASK``).
        arg: the entry function's keyword argument, for an option that is not a parameter.
        choices: ``"module:Literal"`` every value must be one of (checked before Prefect starts).
    """

    name: str
    type: Any
    help: str
    key: str | None = None
    flags: tuple[str, ...] = ()
    default: Any = None
    metavar: str | None = None
    arg: str | None = None
    choices: str | None = None

    def override(self, value: Any) -> str | None:
        """``section.key=value`` for a given value, None when the option was not given."""
        if self.key is None or value is None or value == self.default:
            return None
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return f"{self.key}={text}"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: the dvc.yaml stage (a matrix stage's group name) and the Prefect flow's name.
        section: the parameter section (params.yaml / tasks/config.py) the stage reads.
        help: the command's help: what the stage does, in one line.
        run: ``"module:function"``, called as ``function(cfg, **args) -> result``; the stage's
            work as a plain function of the validated config (None: ``flow`` is the body).
        track: ``"module:function"``, called as ``function(cfg, result) -> result`` after
            ``run`` when there is a result: the stage's MLflow adapter.
        flow: ``"module:flow"``, the stage's own Prefect flow, called as ``flow(cfg, **args)``,
            for a stage whose steps should show as tasks in the Prefect UI; None: the generic
            stage flow runs ``run``.
        options: the command's own options (``--params`` and ``--set`` every command has).
        errors: exception types (``"OSError"``, ``"module:Class"``) that are bad input or a
            broken environment: the command prints them as one ``error:`` line, exit code 1.
        distributed: the command is re-run by a distributed launcher (Lightning DDP, torchrun,
            srun); only the global rank 0 is the stage's Prefect flow run.
        pool: the work pool of the stage's on-demand deployment (a GPU stage: ``gpu``).
        describe: how the stage's result is described on the console.
    """

    name: str
    section: str
    help: str
    run: str | None = None
    track: str | None = None
    flow: str | None = None
    options: tuple[Shorthand, ...] = ()
    errors: tuple[str, ...] = ("ValueError", "OSError")
    distributed: bool = False
    pool: Literal["cpu", "gpu"] = "cpu"
    describe: Callable[[Any], str | None] = describe_result

    def __post_init__(self) -> None:
        if (self.run is None) == (self.flow is None):
            raise ValueError(f"stage {self.name}: give exactly one of run and flow")
        if self.distributed and self.run is None:
            raise ValueError(f"stage {self.name}: a distributed stage's worker ranks need run")

    @property
    def command(self) -> str:
        """The ``synthdx`` command: the stage name with dashes (``train-diffusion``)."""
        return self.name.replace("_", "-")

    def error_types(self) -> tuple[type[BaseException], ...]:
        """The exception classes of ``errors``, imported."""
        return tuple(load(ref) for ref in self.errors)


_OUTPUT = "Output folder."

STAGES: tuple[Stage, ...] = (
    Stage(
        name="phantom", section="phantom", run="tasks.phantom.tracking:run_phantom",
        track="tasks.phantom.tracking:log_phantom",
        help="Write the built-in multi-site bone-scan dataset (DICOM + labels.csv + montage).",
        options=(Shorthand("output", Path | None, _OUTPUT, key="phantom.output"),
                 Shorthand("patients", int | None, "Number of patients.",
                           key="phantom.patients"),
                 Shorthand("seed", int | None, "Random seed.", key="phantom.seed"))),
    Stage(
        name="ingest", section="ingest", flow="flows.ingest:ingest_flow",
        help="De-identify, validate and normalise a DICOM archive into the processed dataset.",
        options=(Shorthand("source", Path | None, "Folder of DICOM files.", key="ingest.source"),
                 Shorthand("labels", Path | None, "Labels CSV.", key="ingest.labels"),
                 Shorthand("output", Path | None, "Processed dataset folder.",
                           key="ingest.output"),
                 Shorthand("strict", bool, "Any quarantine is an error.", key="ingest.strict",
                           flags=("--strict",), default=False),
                 Shorthand("workers", int | None, "Worker processes (0 = all cores).",
                           key="ingest.workers")),
        errors=("tasks.ingest.errors:IngestError", "OSError")),
    Stage(
        name="drift", section="drift", run="tasks.drift.stage:run_drift",
        track="tasks.drift.tracking:log_drift",
        help="Per-site drift of the processed dataset against the current champion's training "
             "data.",
        options=(Shorthand("output", Path | None, "Drift table (JSON).", key="drift.output"),)),
    Stage(
        name="train_diffusion", section="diffusion", run="tasks.diffusion.train:train_diffusion",
        help="Train the class-conditional diffusion model on the processed training split.",
        options=(Shorthand("max_steps", int | None, "Train up to this step.",
                           key="diffusion.max_steps"),
                 Shorthand("resume", bool | None,
                           "Continue from the last checkpoint if there is one.",
                           key="diffusion.resume", flags=("--resume/--no-resume",))),
        distributed=True, pool="gpu"),
    Stage(
        name="synthesize", section="synthesize", run="tasks.synthesize.pipeline:synthesize",
        track="tasks.synthesize.tracking:log_synthesis",
        help="Sample a synthetic dataset from the trained diffusion model (counts from params).",
        options=(Shorthand("output", Path | None, "Synthetic dataset folder.",
                           key="synthesize.output"),
                 Shorthand("steps", int | None, "Sampler steps.", key="synthesize.steps"),
                 Shorthand("guidance", float | None, "Classifier-free guidance scale.",
                           key="synthesize.guidance_scale"),
                 Shorthand("dicom", bool | None, "Also write DICOM files marked synthetic.",
                           key="synthesize.dicom.enabled", flags=("--dicom/--no-dicom",))),
        errors=("ValueError", "OSError", "RuntimeError"), distributed=True, pool="gpu"),
    Stage(
        name="audit", section="audit", run="tasks.audit.pipeline:run_audit",
        track="tasks.audit.tracking:log_audit",
        help="Quality and privacy audit; writes the released synthetic set without withheld "
             "images.",
        options=(Shorthand("synthetic", Path | None, "Synthetic dataset folder.",
                           key="audit.synthetic"),
                 Shorthand("output", Path | None, "Audit output folder.", key="audit.output"))),
    Stage(
        name="train_classifier", section="classifier",
        run="tasks.classifier.pipeline:run_train_classifier",
        help="Train the downstream classifiers (every seed of each task x regime asked for).",
        options=(Shorthand("task", list[str] | None,
                           "Task to train (repeatable; default: classifier.tasks).",
                           flags=("--task",), metavar="TASK", arg="tasks",
                           choices="tasks.config:TaskName"),
                 Shorthand("regime", list[str] | None,
                           "Training regime (repeatable; default: classifier.regimes).",
                           flags=("--regime",), metavar="REGIME", arg="regimes",
                           choices="tasks.config:RegimeName"),
                 Shorthand("max_steps", int | None, "Optimiser steps per model.",
                           key="classifier.max_steps")),
        errors=("ValueError", "OSError", "tasks.classifier.labels:LabelError")),
    Stage(
        name="validate", section="validation", run="tasks.validate.stage:validate_stage",
        help="Validate every classifier per site; write reports/validation.{json,html}; "
             "champions.",
        options=(Shorthand("classifiers", Path | None, "Classifiers folder.",
                           key="validation.classifiers"),
                 Shorthand("output", Path | None, "Reports folder.", key="validation.output"))),
)
"""Every stage, in pipeline order (dvc.yaml's DAG decides the order runs actually take)."""

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The registered stage called ``name`` (its dvc.yaml name or its command).

    Raises:
        KeyError: no such stage.
    """
    return BY_NAME[name.replace("-", "_")]

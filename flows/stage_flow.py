"""One Prefect flow for every stage (wiring only; the work is each stage's entry in tasks/).

Why one flow: the stage flows were one file each with the same three lines. Each stage now
gets the generic flow under its own name (``audit``, ``train_diffusion``, ...), so the Prefect
UI still lists one flow per stage; a stage whose steps should show as tasks in the UI
(ingest) names its own flow in the registry (flows/stages.py) instead.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow, flow

from flows.stages import Stage, load, stage
from tasks.config import Config


def run_stage(spec: Stage, cfg: Config, **args: Any) -> Any:
    """A stage's work without Prefect: check the tracking server, run the entry, log the result.

    Used by the generic flow and, on the worker ranks of a distributed stage, directly (only
    the global rank 0 is the stage's flow run).

    Args:
        spec: the registered stage.
        cfg: the validated parameters.
        **args: the entry function's own arguments (options that are not parameters).

    Raises:
        ValueError: the stage has no plain entry function (its own flow is the body).
    """
    from tasks.common.tracking import check_tracking_server

    if spec.run is None:
        raise ValueError(f"stage {spec.name} has no entry function: run its flow ({spec.flow})")
    check_tracking_server(cfg.mlflow.resolved_uri())  # before writing: a dead server is one error
    result = load(spec.run)(cfg, **args)
    if result is not None and spec.track is not None:
        result = load(spec.track)(cfg, result)
    return result


@flow(name="stage", log_prints=True)
def stage_flow(stage_name: str, cfg: Config, args: dict[str, Any] | None = None) -> Any:
    """Run one registered stage's entry function as a flow run named after the stage."""
    return run_stage(stage(stage_name), cfg, **(args or {}))


_FLOWS: dict[str, Flow[..., Any]] = {}


def flow_of(spec: Stage) -> Flow[..., Any]:
    """The Prefect flow of ``spec``: its own, or the generic one under the stage's name."""
    if spec.name not in _FLOWS:
        _FLOWS[spec.name] = (load(spec.flow) if spec.flow is not None
                             else stage_flow.with_options(name=spec.name))
    return _FLOWS[spec.name]


def run_stage_flow(spec: Stage, cfg: Config, **args: Any) -> Any:
    """Run ``spec`` as its Prefect flow run; return the stage's result.

    Raises:
        Exception: whatever the stage raises (its flow run is then failed in Prefect).
    """
    if spec.flow is not None:
        return flow_of(spec)(cfg, **args)
    return flow_of(spec)(spec.name, cfg, args)

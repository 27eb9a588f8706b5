"""Apply prefect.yaml's deployments to the Prefect server (wiring only).

The spec is read and checked by flows.orchestration.deployments; here each one becomes a
deployment of this checkout's flow through Prefect's Python API (``Flow.from_source`` on the
project folder: a process worker on this machine runs it in place).
"""

from __future__ import annotations

from pathlib import Path

from prefect import Flow
from prefect.schedules import Cron

from flows.orchestration.deployments import DeploymentSpec, load_deployments


def apply_deployments(file: Path, root: Path, names: list[str] | None = None
                      ) -> list[tuple[DeploymentSpec, str]]:
    """Create or update the deployments of ``file`` (all, or those named); return their ids.

    Raises:
        PipelineError: the file is invalid or a name is not in it (nothing applied then).
    """
    from flows.orchestration.dag import PipelineError

    specs = load_deployments(file, root)
    if names:
        missing = set(names) - {s.name for s in specs}
        if missing:
            raise PipelineError(f"{file}: no deployment(s) {', '.join(sorted(missing))} "
                                f"(has: {', '.join(s.name for s in specs)})")
        specs = [s for s in specs if s.name in names]
    applied = []
    for spec in specs:
        flow = Flow.from_source(source=str(root.resolve()), entrypoint=spec.entrypoint)
        deployment = flow.to_deployment(
            name=spec.name, description=spec.description, tags=list(spec.tags),
            parameters=spec.parameters, work_pool_name=spec.work_pool,
            work_queue_name=spec.work_queue,
            schedules=[Cron(c.cron, timezone=c.timezone, active=c.active)
                       for c in spec.schedules])
        applied.append((spec, str(deployment.apply())))
    return applied

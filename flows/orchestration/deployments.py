"""The deployments declared in prefect.yaml, read and checked before any is applied.

Why our own reader rather than ``prefect deploy --all``: a wrong key, entrypoint, parameter
or cron should fail naming the deployment, before the first one reaches the server;
``synthdx deploy`` then applies the checked specs through Prefect's Python API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.orchestration.dag import PipelineError

ALLOWED_KEYS = {"name", "description", "entrypoint", "tags", "parameters", "schedules",
                "work_pool", "version"}
PARAMETERS = {"params", "profile", "from_stage", "only", "force", "root"}


@dataclass(frozen=True)
class CronSpec:
    """One cron schedule of a deployment."""

    cron: str
    timezone: str = "UTC"
    active: bool = True


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of prefect.yaml."""

    name: str
    entrypoint: str
    work_pool: str
    work_queue: str = "default"
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[CronSpec, ...] = ()


def check_cron(cron: str, timezone: str, where: str = "schedule") -> None:
    """Fail with a clear message unless ``cron`` in ``timezone`` is a schedule Prefect takes.

    Raises:
        PipelineError: naming ``where`` and the bad value.
    """
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[2:]]
        detail = next((ln.split(" [type=")[0] for ln in lines if ln and "http" not in ln), "")
        raise PipelineError(f"{where}: cron {cron!r} ({timezone}) is not a valid schedule"
                            f"{': ' + detail if detail else ''}") from None


def load_deployments(path: Path, root: Path | None = None) -> list[DeploymentSpec]:
    """Every deployment in ``path``, validated.

    Raises:
        PipelineError: a missing file, an unknown key, an entrypoint that is not a flow of
            this project, a parameter the pipeline flow does not take, a bad cron.
    """
    root = root or path.parent
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    doc = yaml.safe_load(path.read_text()) or {}
    specs = []
    for i, item in enumerate(doc.get("deployments") or []):
        where = f"{path}: deployment {item.get('name') or i}"
        unknown = set(item) - ALLOWED_KEYS
        if unknown:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        for key in ("name", "entrypoint", "work_pool"):
            if not item.get(key):
                raise PipelineError(f"{where}: {key} is required")
        module, _, func = str(item["entrypoint"]).partition(":")
        if not func or not (root / module).is_file():
            raise PipelineError(f"{where}: entrypoint {item['entrypoint']!r} is not "
                                "<file.py>:<flow> in this project")
        params = dict(item.get("parameters") or {})
        bad = set(params) - PARAMETERS
        if bad:
            raise PipelineError(f"{where}: the pipeline flow has no parameter(s) "
                                f"{', '.join(sorted(bad))}")
        schedules = []
        for sched in item.get("schedules") or []:
            spec = CronSpec(str(sched.get("cron", "")), str(sched.get("timezone", "UTC")),
                            bool(sched.get("active", True)))
            check_cron(spec.cron, spec.timezone, where)
            schedules.append(spec)
        pool = item["work_pool"]
        specs.append(DeploymentSpec(
            name=str(item["name"]), entrypoint=str(item["entrypoint"]),
            work_pool=str(pool["name"]), work_queue=str(pool.get("work_queue_name", "default")),
            description=item.get("description"), tags=tuple(item.get("tags") or ()),
            parameters=params, schedules=tuple(schedules)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise PipelineError(f"{path}: deployment names repeat: {names}")
    if not specs:
        raise PipelineError(f"{path}: no deployments")
    return specs

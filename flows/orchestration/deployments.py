"""The deployments declared in prefect.yaml, read and checked before any is applied.

Why our own reader rather than ``prefect deploy --all``: a wrong key, entrypoint, parameter
or cron should fail naming the deployment, before the first one reaches the server;
``synthdx deploy`` then applies the checked specs through Prefect's Python API.

The per-stage on-demand deployments are not written by hand: they are one block of
prefect.yaml generated from the stage registry (flows/stages.py) by
``python -m flows.orchestration.deployments``, and a test fails when the file differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.orchestration.dag import PipelineError
from flows.stages import STAGES, Stage

ALLOWED_KEYS = {"name", "description", "entrypoint", "tags", "parameters", "schedules",
                "work_pool", "version"}
PARAMETERS = {"params", "profile", "from_stage", "only", "force", "root"}
PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline_flow"
STAGE_BLOCK_BEGIN = ("  # BEGIN stage deployments, generated from flows/stages.py by "
                     "`python -m flows.orchestration.deployments`")
STAGE_BLOCK_END = "  # END stage deployments"


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


def stage_deployments(stages: tuple[Stage, ...] = STAGES) -> str:
    """prefect.yaml's block of per-stage deployments, one per registered stage.

    Each runs the pipeline flow with ``only: [<stage>]`` (a matrix stage: its whole group), so
    an on-demand stage run still skips what DVC reports up to date and nests its MLflow run
    under a pipeline run. A GPU stage goes to the GPU pool (the anchors prefect.yaml defines).
    """
    lines = [STAGE_BLOCK_BEGIN]
    for spec in stages:
        tags = ["synthdx", "stage", *(["gpu"] if spec.pool == "gpu" else [])]
        lines += [f"  - name: {spec.command}",
                  f"    entrypoint: {PIPELINE_ENTRYPOINT}",
                  f"    tags: [{', '.join(tags)}]",
                  f"    parameters: {{only: [{spec.name}]}}",
                  f"    work_pool: *{spec.pool}_pool"]
    lines.append(STAGE_BLOCK_END)
    return "\n".join(lines) + "\n"


def with_stage_deployments(text: str, where: str = "prefect.yaml") -> str:
    """``text`` (a prefect.yaml) with its stage block replaced by :func:`stage_deployments`.

    Raises:
        PipelineError: the file has no (or a broken) pair of block markers.
    """
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip("\n") == STAGE_BLOCK_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == STAGE_BLOCK_END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise PipelineError(f"{where}: needs one generated stage block, from the line "
                            f"{STAGE_BLOCK_BEGIN.strip()!r} to {STAGE_BLOCK_END.strip()!r}")
    return "".join([*lines[:starts[0]], stage_deployments(), *lines[ends[0] + 1:]])


def main(argv: list[str] | None = None) -> int:
    """Rewrite the stage block of prefect.yaml (``--check``: only say whether it is current).

    Returns:
        0 when the file is (now) current; 1 with ``--check`` when it is not.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flows.orchestration.deployments",
        description="Generate prefect.yaml's per-stage deployments from flows/stages.py.")
    parser.add_argument("file", nargs="?", type=Path, default=Path("prefect.yaml"))
    parser.add_argument("--check", action="store_true",
                        help="Change nothing; exit 1 when the file is not current.")
    args = parser.parse_args(argv)
    text = args.file.read_text(encoding="utf-8")
    new = with_stage_deployments(text, str(args.file))
    if new == text:
        print(f"{args.file}: stage deployments are current")
        return 0
    if args.check:
        print(f"{args.file}: stage deployments differ from flows/stages.py "
              "(python -m flows.orchestration.deployments rewrites them)")
        return 1
    args.file.write_text(new, encoding="utf-8")
    print(f"{args.file}: stage deployments rewritten from flows/stages.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

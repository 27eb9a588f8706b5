"""Which stages are up to date, for ``synthdx status``.

DVC's status compares each stage with its own dvc.lock entry only; a stage whose upstream is
out of date looks fine until the upstream reruns. So staleness is propagated down the DAG:
such a stage is reported as "will rerun (upstream)".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.orchestration.dag import _describe, _open_repo, pipeline_stages


@dataclass(frozen=True)
class StageState:
    """One stage's state: ``up to date``, ``changed`` (with DVC's reason) or ``upstream``."""

    stage: str
    state: str
    reason: str = ""


def stage_states(root: Path) -> list[StageState]:
    """Every stage of dvc.yaml in pipeline order with its state now."""
    stages = pipeline_stages(root)
    repo = _open_repo(root)
    try:
        status = repo.status()
    finally:
        repo.close()
    stale: dict[str, str] = {}
    for key, changes in status.items():
        name = key.split(":", 1)[-1] if key.startswith("dvc.yaml:") else key
        stale[name] = _describe(changes) if changes else "changed"
    out: list[StageState] = []
    changed: set[str] = set()
    for info in stages:
        if info.name in stale:
            out.append(StageState(info.name, "changed", stale[info.name]))
            changed.add(info.name)
        elif changed.intersection(info.upstream):
            after = ", ".join(sorted(changed & set(info.upstream)))
            out.append(StageState(info.name, "upstream", f"reruns after {after}"))
            changed.add(info.name)
        else:
            out.append(StageState(info.name, "up to date"))
    return out


def describe_states(states: list[StageState]) -> str:
    """The stage table printed by ``synthdx status``."""
    lines = [f"  {s.stage:<52}{s.state}{(': ' + s.reason) if s.reason else ''}"
             for s in states]
    todo = sum(s.state != "up to date" for s in states)
    lines.append(f"{len(states) - todo} of {len(states)} stages up to date"
                 + ("" if not todo else f"; `synthdx run` reruns {todo}"))
    return "\n".join(lines)

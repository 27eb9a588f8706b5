"""The pipeline's stages and their order, read from dvc.yaml through DVC's own API.

Why DVC's API and not a second list: dvc.yaml declares the DAG once; the pipeline flow,
``synthdx status`` and ``dvc repro`` must agree on it, including the expanded
``train_classifier@<task>-<regime>`` matrix stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class PipelineError(ValueError):
    """A pipeline request that cannot be run (unknown stage, no dvc.yaml, ...)."""


@dataclass(frozen=True)
class StageInfo:
    """One stage of dvc.yaml as the pipeline sees it."""

    name: str          # DVC addressing name, e.g. ``train_classifier@metastasis-real``
    group: str         # the dvc.yaml key, e.g. ``train_classifier``
    cmd: str
    upstream: tuple[str, ...]


def _open_repo(root: Path):  # noqa: ANN202 - dvc.repo.Repo, imported lazily (slow import)
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    if not (root / "dvc.yaml").is_file():
        raise PipelineError(f"no dvc.yaml in {root}: run from the project folder")
    try:
        return Repo(str(root))
    except NotDvcRepoError as exc:
        raise PipelineError(f"{root} is not a DVC project ({exc})") from None


def pipeline_stages(root: Path = Path(".")) -> list[StageInfo]:
    """Every stage of dvc.yaml in an order that runs each after its upstream stages.

    Independent stages keep their dvc.yaml order (a lexicographic topological sort keyed on
    the declaration index), so the order is stable from run to run.
    """
    import networkx as nx

    repo = _open_repo(root)
    try:
        stages = [s for s in repo.index.stages if s.addressing != "dvc.yaml" and s.cmd]
        index = {s.addressing: i for i, s in enumerate(stages)}
        by_name = {s.addressing: s for s in stages}
        graph = nx.DiGraph()
        graph.add_nodes_from(index)
        # DVC's graph points from a stage to the stages it depends on.
        for stage, dep in repo.index.graph.edges:
            if stage.addressing in index and dep.addressing in index:
                graph.add_edge(dep.addressing, stage.addressing)
        order = nx.lexicographical_topological_sort(graph, key=lambda name: index[name])
        return [StageInfo(name=n, group=n.split("@", 1)[0], cmd=str(by_name[n].cmd),
                          upstream=tuple(sorted(graph.predecessors(n), key=index.__getitem__)))
                for n in order]
    finally:
        repo.close()


def _resolve(stages: Sequence[StageInfo], name: str, option: str) -> list[StageInfo]:
    """Stages a user-given name means: an exact stage, or every stage of a matrix group."""
    exact = [s for s in stages if s.name == name]
    if exact:
        return exact
    group = [s for s in stages if s.group == name.replace("-", "_")]
    if group:
        return group
    known = sorted({s.group for s in stages} | {s.name for s in stages})
    raise PipelineError(f"{option} {name!r}: no such stage in dvc.yaml "
                        f"(stages: {', '.join(known)})")


def select_stages(stages: Sequence[StageInfo], from_stage: str | None = None,
                  only: Sequence[str] | None = None) -> list[StageInfo]:
    """The stages a run asks for, in pipeline order.

    Args:
        stages: every stage, in pipeline order.
        from_stage: start here: this stage (or matrix group) and everything after it in the
            pipeline order.
        only: just these stages (or matrix groups).

    Raises:
        PipelineError: a name that is not a stage, or both options at once.
    """
    if from_stage and only:
        raise PipelineError("--from and --only cannot be combined")
    if only:
        wanted = {s.name for name in only for s in _resolve(stages, name, "--only")}
        return [s for s in stages if s.name in wanted]
    if from_stage:
        first = min(stages.index(s) for s in _resolve(stages, from_stage, "--from"))
        return list(stages[first:])
    return list(stages)


def stale_reason(root: Path, name: str) -> str | None:
    """Why DVC would rerun ``name`` now, or None when it is up to date.

    Asked right before the stage runs (not once at the start), because a stage whose
    upstream has just rerun may be stale only now.
    """
    status = _status_waiting_for_lock(root, name)
    if not status:
        return None
    changes = status.get(name) or next(iter(status.values()))
    if not changes:
        return None
    return _describe(changes)


def _status_waiting_for_lock(root: Path, name: str, timeout: float = 300.0) -> dict:
    """``dvc status`` of one stage, waiting while a stage process holds DVC's repo lock.

    Why: stages running side by side take the lock briefly before and after their command;
    DVC's own wait gives up after 3 s.
    """
    import time

    from dvc.lock import LockError

    deadline = time.monotonic() + timeout
    while True:
        repo = _open_repo(root)
        try:
            return repo.status(targets=[name])
        except LockError:
            if time.monotonic() > deadline:
                raise
        finally:
            repo.close()
        time.sleep(0.5)


def _describe(changes: list) -> str:
    """DVC's status entry for one stage as a short phrase ("changed deps: data/raw")."""
    parts = []
    for item in changes:
        if isinstance(item, str):
            parts.append(item)
            continue
        for kind, detail in item.items():
            if isinstance(detail, dict):
                names = ", ".join(f"{k} ({v})" if isinstance(v, str) else str(k)
                                  for k, v in detail.items())
                parts.append(f"{kind}: {names}")
            else:
                parts.append(f"{kind}: {detail}")
    return "; ".join(parts) or "changed"

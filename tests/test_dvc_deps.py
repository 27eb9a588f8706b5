"""dvc.yaml's code deps are complete: every project file a stage imports is a dep (issue 18).

``dvc repro`` reruns a stage when one of its deps changes, so a module the stage imports but
dvc.yaml does not list can change the stage's output while DVC keeps the stale one. This test
walks each stage's import closure with ``ast`` (module- and function-level imports, relative
imports, ``from package import submodule``; imports only a type checker sees are left out) and
fails, naming stage and file, on any project file (tasks/, models/) no dep of that stage covers
(the file itself or a folder above it).

Where a stage starts: its entry points in the stage registry (flows/stages.py: ``run``,
``track`` and ``flow``) or, without one, its Prefect flow flows/<stage>.py; plus every module
of the stage packages those entries live in or import (tasks/<stage>/, whose modules may be
loaded in ways an import walk does not see). flows/ is wiring: its imports are followed but it
is no dep (it does not shape outputs, and listing it would rerun everything for a CLI change).

Left out, and not followed: tasks/config.py (parameters are tracked as ``params``, by section)
and the plumbing in ``PLUMBING``, each with the reason it does not shape an output.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("tasks", "models", "flows")
"""Top-level packages whose files are the project's code (anything else is a library)."""

NOT_DEPS = {"tasks/config.py": "parameters are DVC params, tracked per section"}
PLUMBING = {
    "tasks/common/atomic.py": "writes to a temporary sibling and renames; bytes unchanged",
    "tasks/common/progress.py": "console progress bars and log lines",
    "tasks/common/mlflow_logger.py": "sends Lightning's metrics to MLflow, buffering outages",
    "tasks/common/tracking.py": "MLflow runs, params and the tracking-server health check",
    "tasks/common/lightning_console.py": "Lightning's console progress and notices",
    "tasks/common/stage_metrics.py": "decides where a metrics file goes, not what it holds",
    "tasks/common/mlflow_ui.py": "starts and stops the MLflow UI server",
    "tasks/common/flatten.py": "turns nested documents into MLflow's flat param/metric keys",
}
"""Imported by stages, yet no change to them changes a stage's outputs (checked by reading
each: none computes, orders or formats a value that lands in an output)."""


@dataclass(frozen=True)
class Module:
    """A project module: its dotted name and file (relative to the repository)."""

    name: str
    path: str

    @property
    def package(self) -> str:
        """The package relative imports of this module start from."""
        if self.path.endswith("__init__.py"):
            return self.name
        return self.name.rpartition(".")[0]


def _module(name: str) -> Module | None:
    """The project module called ``name`` (a file or a package's __init__), if any."""
    if name.split(".")[0] not in PROJECT:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return Module(name, path.relative_to(REPO).as_posix())
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' __init__."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def imports_of(module: Module) -> tuple[Module, ...]:
    """The project modules ``module`` imports (each once, with the packages they run)."""
    tree = ast.parse((REPO / module.path).read_text(encoding="utf-8"), module.path)
    names: list[str] = []
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names += _with_parents(alias.name)
            continue
        if node.level:
            base = module.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        names += _with_parents(target)
        names += [f"{target}.{alias.name}" for alias in node.names]  # submodules, if any
    found = {m for m in map(_module, names) if m is not None and m != module}
    return tuple(sorted(found, key=lambda m: m.name))


def _is_inert(module: Module) -> bool:
    """A package __init__ with nothing but a docstring and ``from __future__`` in it."""
    if not module.path.endswith("__init__.py"):
        return False
    tree = ast.parse((REPO / module.path).read_text(encoding="utf-8"))
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
               or isinstance(s, ast.ImportFrom) and s.module == "__future__" for s in tree.body)


def _stage_packages(entries: list[Module]) -> set[str]:
    """The tasks/<stage>/ packages of a stage's entries.

    An entry in tasks/ is in its stage's package; an entry in flows/ is wiring around the
    stage's package, which it imports directly.
    """
    packages = set()
    for entry in entries:
        for module in [entry] if entry.name.startswith("tasks.") else imports_of(entry):
            parts = module.name.split(".")
            if parts[0] == "tasks" and len(parts) > 2 and parts[1] not in ("common",
                                                                          "artifacts"):
                packages.add(f"tasks.{parts[1]}")
    return packages


def _registry_entries() -> dict[str, list[str]] | None:
    """Stage name -> entry modules from flows/stages.py, or None without a registry."""
    if _module("flows.stages") is None:
        return None
    sys.path.insert(0, str(REPO))
    try:
        from flows.stages import STAGES
    finally:
        sys.path.remove(str(REPO))
    return {s.name: [ref.partition(":")[0] for ref in (s.run, s.track, s.flow) if ref]
            for s in STAGES}


def entries_of(stage: str) -> list[Module]:
    """The modules a stage's command starts from (see the module docstring)."""
    registry = _registry_entries()
    names = registry.get(stage, []) if registry is not None else [f"flows.{stage}"]
    return [m for m in map(_module, names) if m is not None]


def closure(stage: str) -> set[str]:
    """Files of tasks/ and models/ the stage's code runs: what its deps must cover."""
    entries = entries_of(stage)
    todo = list(entries)
    for package in _stage_packages(entries):
        for path in sorted(REPO.joinpath(*package.split(".")).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            module = _module(name.removesuffix(".__init__"))
            if module is not None:
                todo.append(module)
    seen: set[Module] = set()
    while todo:
        module = todo.pop()
        if module in seen or module.path in NOT_DEPS or module.path in PLUMBING:
            continue
        seen.add(module)
        todo.extend(imports_of(module))
    return {m.path for m in seen if not m.path.startswith("flows/") and not _is_inert(m)}


def dvc_stages() -> dict[str, list[str]]:
    """Stage name -> its deps, as dvc.yaml writes them."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: [str(d) for d in body.get("deps", [])] for name, body in stages.items()}


def covered(path: str, deps: list[str]) -> bool:
    """A dep is the file or a folder above it."""
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_every_imported_project_file_is_a_dep_of_the_stage(stage: str) -> None:
    deps = dvc_stages()[stage]
    files = closure(stage)
    assert entries_of(stage), f"{stage}: no entry point found (registry or flows/{stage}.py)"
    assert any(f.startswith("tasks/") for f in files), f"{stage}: found no code of its own"
    missing = sorted(f for f in files if not covered(f, deps))
    assert not missing, "dvc.yaml misses code deps:\n" + "\n".join(
        f"  stage {stage}: {f}" for f in missing)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The walker itself: a nested import, a relative one, a submodule by name, TYPE_CHECKING."""
    root = tmp_path / "tasks" / "demo"
    root.mkdir(parents=True)
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (root / "__init__.py").write_text('"""Demo."""\n')
    (root / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import b\n"
        "if TYPE_CHECKING:\n    from tasks.demo import hidden\n"
        "def f():\n    from .c import thing\n    import tasks.demo.d\n")
    for name in ("b", "c", "d", "hidden"):
        (root / f"{name}.py").write_text("thing = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    imports_of.cache_clear()
    try:
        found = {m.name for m in imports_of(_module("tasks.demo.a"))}
    finally:
        imports_of.cache_clear()
    assert found == {"tasks", "tasks.demo", "tasks.demo.b", "tasks.demo.c", "tasks.demo.d"}

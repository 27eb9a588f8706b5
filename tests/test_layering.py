"""The import graph keeps the layering the design card asks for (DESIGN.md, "Layout").

flows -> tasks -> models, nothing upward; inside tasks/, the stage packages stand side by side
and meet only through the on-disk formats of tasks/artifacts, which imports no stage. Every
``import`` counts, including those inside functions (a lazy import is still a dependency, and
one DVC does not see unless dvc.yaml lists it). Orchestration (DAG, scheduler, locks,
lineage) is not a stage: it lives in flows/orchestration/, above the stages.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("tasks", "models", "flows")
SHARED = {"common", "artifacts"}
"""tasks/ packages every stage may import (tasks/config.py is a module, shared as well)."""


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is written."""

    path: Path
    line: int
    module: str

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}: imports {self.module}"


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a source file (``tasks/a/b.py`` -> ``tasks.a.b``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, root: Path) -> Iterator[Import]:
    """Every module a file imports, anywhere in it, relative imports resolved.

    ``from tasks import diffusion`` yields ``tasks.diffusion``: from a top-level package the
    imported name is the subpackage a rule must see.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if "." in module:
                yield Import(path, node.lineno, module)
                continue
            for alias in node.names:
                yield Import(path, node.lineno,
                             module if alias.name == "*" else f"{module}.{alias.name}")


def stage_packages(root: Path) -> set[str]:
    """The stage packages: every package under tasks/ but the shared ones."""
    return {p.name for p in (root / "tasks").iterdir()
            if p.is_dir() and (p / "__init__.py").is_file() and p.name not in SHARED}


def tasks_package(module: str) -> str | None:
    """``tasks.<pkg>...`` -> ``pkg`` (None for anything else, and for ``tasks`` itself)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tasks" and len(parts) > 1 else None


def violations(root: Path) -> list[str]:
    """Every import that breaks a layering rule, as ``file:line: imports module (rule)``."""
    stages = stage_packages(root)
    found: set[tuple[str, int, str]] = set()
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).parts
            own = rel[1] if top == "tasks" and len(rel) > 2 else None
            for imp in imports(path, root):
                head = imp.module.split(".")[0]
                target = tasks_package(imp.module)
                rule = None
                if top == "models" and head in ("tasks", "flows"):
                    rule = "models/ must not import tasks/ or flows/"
                elif top == "tasks" and head == "flows":
                    rule = "tasks/ must not import flows/"
                elif own in stages and target in stages and target != own:
                    rule = f"stage {own} must not import stage {target}"
                elif own in SHARED and target in stages:
                    rule = f"tasks/{own} must not import stage {target}"
                if rule:
                    found.add((str(path.relative_to(root)), imp.line,
                               f"{imp.where(root)} ({rule})"))
    return [message for _, _, message in sorted(found)]


def test_layering_holds():
    problems = violations(ROOT)
    assert not problems, "imports that break the layering:\n" + "\n".join(problems)


def test_orchestration_is_not_in_tasks():
    """DAG, scheduler, locks and lineage wire stages together: flows/orchestration/, not tasks/."""
    assert (ROOT / "flows" / "orchestration" / "dag.py").is_file()
    assert not (ROOT / "tasks" / "pipeline").exists()


def test_every_stage_package_is_seen():
    """The rule covers the stages the DAG names (a renamed stage must not slip out of it)."""
    assert {"phantom", "ingest", "diffusion", "synthesize", "audit", "classifier",
            "validate"} <= stage_packages(ROOT)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for pkg in ("tasks", "tasks/a", "tasks/b", "tasks/common", "tasks/artifacts", "models",
                "flows"):
        _write(tmp_path, f"{pkg}/__init__.py", "")
    return tmp_path


def test_checker_finds_each_kind_of_violation(tree: Path):
    _write(tree, "tasks/a/run.py",
           "from tasks.common import x\n"
           "def f():\n    from tasks.b.work import g\n    return g\n")
    _write(tree, "tasks/a/other.py", "from ..b import work\n")
    _write(tree, "tasks/a/flowy.py", "import flows.cli\n")
    _write(tree, "models/net.py", "import tasks.artifacts.dataset\n")
    _write(tree, "tasks/artifacts/fmt.py", "from tasks.a import run\n")
    problems = violations(tree)
    assert any(p.startswith("tasks/a/run.py:3: imports tasks.b.work") for p in problems)
    assert any(p.startswith("tasks/a/other.py:1: imports tasks.b") for p in problems)
    assert any("tasks/a/flowy.py:1: imports flows.cli" in p for p in problems)
    assert any("models/net.py:1: imports tasks.artifacts.dataset" in p for p in problems)
    assert any("tasks/artifacts/fmt.py:1: imports tasks.a" in p for p in problems)
    _write(tree, "flows/orchestration/dag.py", "from tasks.a import run\nfrom tasks.b import w\n")
    assert not any(p.startswith("flows/") for p in violations(tree))  # above the stages
    assert not any("tasks.common" in p for p in problems)

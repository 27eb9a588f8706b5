"""The stage registry (flows/stages.py) agrees with dvc.yaml, the config, the CLI and prefect.yaml.

dvc.yaml declares the DAG; the registry declares what each stage's command, flow and
deployment are. These tests fail when the two drift apart: a dvc.yaml stage whose command is
not a registered stage's, a registered stage missing from dvc.yaml, a stage whose dvc.yaml
``params`` leave out the section it reads (DVC would not rerun it when that section changes).
"""

from __future__ import annotations

import shlex
from typing import Any, get_args

import pytest
import yaml

from flows.orchestration.dag import pipeline_stages
from flows.orchestration.deployments import load_deployments, with_stage_deployments
from flows.stages import BY_NAME, STAGES, Stage, load, stage
from tasks.config import load_config
from tests.conftest import PARAMS, REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _param_names(entries: list[Any]) -> set[str]:
    """The parameter keys a dvc.yaml stage lists (plain keys, or ``{file: [keys]}`` groups)."""
    names: set[str] = set()
    for entry in entries:
        if isinstance(entry, dict):
            for keys in entry.values():
                names.update(keys or [])
        else:
            names.add(str(entry))
    return names


def test_every_dvc_stage_runs_a_registered_stage_command():
    """Through DVC's own API, so the expanded train_classifier matrix stages count too."""
    expanded = pipeline_stages(REPO)
    assert any("@" in info.name for info in expanded)  # the matrix was expanded
    for info in expanded:
        assert info.group in BY_NAME, f"dvc.yaml stage {info.group} is not in flows/stages.py"
        command = stage(info.group).command
        words = shlex.split(info.cmd)
        assert words[:2] == ["synthdx", command], \
            f"{info.name}: {info.cmd!r} does not run `synthdx {command}`"


def test_every_registered_stage_is_in_dvc_yaml():
    missing = [s.name for s in STAGES if s.name not in DVC_YAML]
    assert not missing, f"registered in flows/stages.py but not in dvc.yaml: {missing}"
    assert len({s.name for s in STAGES}) == len(STAGES)


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_dvc_params_include_the_stage_config_section(spec: Stage):
    assert spec.section in _param_names(DVC_YAML[spec.name].get("params") or []), \
        f"dvc.yaml: stage {spec.name} does not list params section {spec.section!r}"


@pytest.mark.parametrize("spec", STAGES, ids=lambda s: s.name)
def test_registry_entries_resolve(spec: Stage):
    """Every entry point imports, every option sets a parameter that exists or is an argument."""
    cfg = load_config(PARAMS)
    assert hasattr(cfg, spec.section)
    for ref in (spec.run, spec.track):
        if ref is not None:
            assert callable(load(ref)), ref
    if spec.flow is not None:
        assert load(spec.flow).name == spec.name
    assert all(issubclass(t, BaseException) for t in spec.error_types())
    tree = cfg.model_dump(mode="json")
    for opt in spec.options:
        assert (opt.key is None) != (opt.arg is None), opt.name
        if opt.key is not None:
            node: Any = tree
            for part in opt.key.split("."):
                assert isinstance(node, dict) and part in node, f"{opt.name}: no {opt.key}"
                node = node[part]
        if opt.choices is not None:
            assert get_args(load(opt.choices)), opt.choices


def test_cli_has_one_command_per_stage_and_flows_carry_stage_names():
    from typer.main import get_command

    from flows.cli import app
    from flows.stage_flow import flow_of

    commands = get_command(app).commands  # type: ignore[attr-defined]
    for spec in STAGES:
        assert spec.command in commands
        assert commands[spec.command].help == spec.help
        assert flow_of(spec).name == spec.name


def test_prefect_yaml_stage_deployments_are_generated_from_the_registry():
    text = (REPO / "prefect.yaml").read_text()
    assert text == with_stage_deployments(text), \
        "prefect.yaml differs from flows/stages.py: run python -m flows.orchestration.deployments"
    specs = {s.name: s for s in load_deployments(REPO / "prefect.yaml", REPO)}
    for spec in STAGES:
        deployment = specs[spec.command]
        assert deployment.parameters == {"only": [spec.name]}
        assert deployment.work_pool == f"synthdx-{spec.pool}"

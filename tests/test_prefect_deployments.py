"""prefect.yaml: its deployments load, validate, and are created on a real (temporary) server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.orchestration.dag import PipelineError
from flows.orchestration.deployments import load_deployments
from flows.stages import STAGES
from tests.conftest import REPO

STAGE_DEPLOYMENTS = {s.command for s in STAGES}


def test_prefect_yaml_declares_nightly_and_per_stage_deployments():
    specs = {s.name: s for s in load_deployments(REPO / "prefect.yaml", REPO)}
    assert {"nightly", "nightly-gpu"} | STAGE_DEPLOYMENTS == set(specs)
    nightly = specs["nightly"]
    assert nightly.schedules[0].cron == "0 2 * * *" and nightly.schedules[0].active
    assert nightly.work_pool == "synthdx-cpu" and nightly.parameters["profile"] == "demo"
    assert specs["nightly-gpu"].work_pool == "synthdx-gpu"
    assert specs["train-diffusion"].parameters == {"only": ["train_diffusion"]}
    assert specs["train-diffusion"].work_pool == "synthdx-gpu"
    assert {s.work_pool for s in specs.values()} == {"synthdx-cpu", "synthdx-gpu"}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d[0].update(schedules=[{"cron": "61 * * * *"}]), "not a valid schedule"),
    (lambda d: d[0].update(workpool={"name": "x"}), "unknown key(s) workpool"),
    (lambda d: d[0].update(parameters={"profiel": "gpu"}), "no parameter(s) profiel"),
    (lambda d: d[0].update(entrypoint="flows/nothing.py:flow"), "entrypoint"),
])
def test_a_bad_deployment_is_refused_naming_it(tmp_path: Path, edit, message):
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    edit(doc["deployments"])
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(PipelineError, match="deployment nightly") as err:
        load_deployments(path, REPO)
    assert message in str(err.value)


def _create_work_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for pool in ("synthdx-cpu", "synthdx-gpu"):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def test_deployments_are_created_on_a_prefect_server(prefect_harness):
    from prefect.client.orchestration import get_client

    from flows.deploy import apply_deployments

    _create_work_pools()
    applied = apply_deployments(REPO / "prefect.yaml", REPO)
    assert len(applied) == 2 + len(STAGE_DEPLOYMENTS)
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("pipeline/nightly")
        assert nightly.work_pool_name == "synthdx-cpu"
        assert nightly.entrypoint == "flows/pipeline.py:pipeline_flow"
        assert nightly.parameters == {"params": "params.yaml", "profile": "demo"}
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
        assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
            "directory"] == str(REPO.resolve())
        gpu = client.read_deployment_by_name("pipeline/nightly-gpu")
        assert gpu.work_pool_name == "synthdx-gpu" and not gpu.schedules[0].active
        stage = client.read_deployment_by_name("pipeline/train-classifier")
        assert stage.parameters == {"only": ["train_classifier"]} and not stage.schedules


def test_prefect_deploy_all_applies_the_same_file(prefect_harness, tmp_path: Path):
    """Prefect's own CLI applies prefect.yaml too (prefect 3.8.8's failed after the first
    deployment with a 422 from the work-pool workers filter, see pyproject.toml)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    # A copy of the project: the CLI records its folder and may write beside prefect.yaml.
    project = tmp_path / "proj"
    project.mkdir()
    for name in ("prefect.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    for folder in ("flows", "tasks", "models", "profiles"):
        shutil.copytree(REPO / folder, project / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    _create_work_pools()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=str(PREFECT_API_URL.value()),
               PREFECT_HOME=str(tmp_path / "prefect-home"))
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt",
                           "deploy", "--all"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        deployments = {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}
    expected = {f"pipeline/{n}" for n in {"nightly", "nightly-gpu"} | STAGE_DEPLOYMENTS}
    assert expected <= set(deployments)
    nightly = deployments["pipeline/nightly"]
    assert nightly.work_pool_name == "synthdx-cpu"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert deployments["pipeline/train-diffusion"].parameters == {"only": ["train_diffusion"]}
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"][
        "directory"] == str(project.resolve())

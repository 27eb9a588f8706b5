"""The pipeline's stage list comes from dvc.yaml; --from/--only select from it, typos fail."""

from __future__ import annotations

import contextlib

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.orchestration.dag import PipelineError, pipeline_stages, select_stages
from tests.conftest import REPO


@pytest.fixture(scope="module")
def stages():
    return pipeline_stages(REPO)


def test_stages_follow_dvc_yaml_in_dependency_order(stages):
    names = [s.name for s in stages]
    assert names[:6] == ["phantom", "ingest", "drift", "train_diffusion", "synthesize",
                         "audit"]
    assert names[-1] == "validate"
    classifiers = [n for n in names if n.startswith("train_classifier@")]
    assert len(classifiers) == 10 and names[6:16] == classifiers
    by_name = {s.name: s for s in stages}
    assert by_name["ingest"].upstream == ("phantom",)
    # validate re-scores the champion on today's images and hands it the audit's encoder
    assert set(by_name["validate"].upstream) == {*classifiers, "ingest", "audit"}
    assert by_name["drift"].upstream == ("ingest",)


def test_from_and_only_select_stages_and_groups(stages):
    assert [s.name for s in select_stages(stages, from_stage="audit")][0] == "audit"
    assert len(select_stages(stages, from_stage="audit")) == 12
    only = select_stages(stages, only=["train_classifier"])
    assert {s.group for s in only} == {"train_classifier"} and len(only) == 10
    assert [s.name for s in select_stages(stages, only=["validate", "ingest"])] == [
        "ingest", "validate"]
    with pytest.raises(PipelineError, match="--only 'trian_diffusion': no such stage"):
        select_stages(stages, only=["trian_diffusion"])
    with pytest.raises(PipelineError, match="cannot be combined"):
        select_stages(stages, from_stage="audit", only=["validate"])


def test_run_refuses_an_unknown_stage_before_starting_anything(monkeypatch):
    monkeypatch.chdir(REPO)
    result = CliRunner().invoke(app, ["run", "--from", "synthesise"])
    assert result.exit_code == 2
    assert "--from 'synthesise': no such stage in dvc.yaml" in result.output


def test_run_refuses_an_unknown_profile_leaving_params_alone(monkeypatch):
    monkeypatch.chdir(REPO)
    before = (REPO / "params.yaml").read_text()
    result = CliRunner().invoke(app, ["run", "--profile", "gpux"])
    assert result.exit_code == 2 and "gpux" in result.output
    assert (REPO / "params.yaml").read_text() == before


def test_ui_serves_the_project_store_light_and_stops_everything_it_started(tmp_path):
    """One light server (no huey job consumers, one worker); a SIGTERM to `synthdx ui` alone
    stops every process it started (MLflow's own launcher left its job runner running)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    import mlflow
    import psutil

    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("synthdx")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.Popen([str(Path(sys.executable).parent / "synthdx"), "ui", "--port",
                             str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    started: list[psutil.Process] = []
    try:
        body = b""
        for _ in range(240):
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name"
                    "?experiment_name=synthdx")
                body = urllib.request.urlopen(req, timeout=2).read()
                break
            except OSError:
                time.sleep(0.5)
        assert b'"name": "synthdx"' in body or b'"name":"synthdx"' in body
        time.sleep(2)  # a job runner, when enabled, starts after the server answers
        started = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(p.cmdline()) for p in started]
        assert not [c for c in commands if "huey" in c], commands
        assert len(started) <= 3, commands
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(started, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

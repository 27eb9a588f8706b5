"""The tiny pipeline against the team's real servers on loopback (issue 6, section 2).

PostgreSQL (infra/scripts/postgres.sh), moto's S3 server as the object store, ``mlflow
server`` with basic authentication and ``prefect server start`` run as real processes
(tests/servers). One fresh git + DVC project runs ``synthdx run --profile tiny`` against them;
the pipeline tracks as its own (non-admin) MLflow account, as the team's workers do. The
tests then read back, through the servers' own clients, what the pipeline left there: runs,
metrics, artifacts (also as objects in the bucket), registered models, refused requests
without valid credentials (MLflow and Prefect), Prefect flow runs and deployments (through
the client's reads and the CLI's ``ls`` commands), a prefect.yaml deployment run by a
worker, and DVC data pushed to and pulled from the object store. Each test builds on the one
before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import make_project
from tests.servers import TeamServers, team_servers  # noqa: F401  (session fixture)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from prefect.client.orchestration import SyncPrefectClient

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SYNTHDX = str(BIN / "synthdx")
PREFECT = str(BIN / "prefect")
DVC = str(BIN / "dvc")
TASK = "metastasis"
REGIMES = ["real", "real+synthetic"]
CLASSIFIER_STAGES = {f"train_classifier@{TASK}-{r}" for r in REGIMES}
UPSTREAM = ["phantom", "ingest", "drift", "train_diffusion", "synthesize", "audit"]
ALL_STAGES = {*UPSTREAM, *CLASSIFIER_STAGES, "validate"}
STAGE_FLOWS = {"phantom", "ingest", "drift", "train_diffusion", "synthesize", "audit",
               "train_classifier", "validate"}
DIFFUSION_MODEL = "synthdx-bone-scan-diffusion"
CHAMPION_MODEL = f"synthdx-classifier-{TASK}"


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1200,
         servers: TeamServers | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail with its output (and the server logs) on an error or a timeout.

    Why not ``subprocess.run``'s timeout: it SIGKILLs ``cmd`` alone, which left the
    pipeline's stage processes (dvc repro, synthdx <stage>, each in its own process group)
    running on. Here a SIGTERM lets ``synthdx run`` stop its stages first; what is left of
    ``cmd``'s own process group is killed after a grace period.
    """
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.terminate()
            try:
                stdout, stderr = child.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                stdout, stderr = child.communicate(timeout=60)
            raise AssertionError(f"{cmd} ran past {timeout:.0f} s:\n{stdout[-4000:]}\n"
                                 f"{stderr[-6000:]}") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    logs = f"\n{servers.log_tails()}" if servers else ""
    assert proc.returncode == 0, (f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                  f"{proc.stderr[-6000:]}{logs}")
    return proc


@pytest.fixture(scope="module")
def servers(team_servers: TeamServers) -> Iterator[TeamServers]:  # noqa: F811
    """The team servers, with this process's MLflow client pointed at the tracking server.

    Set as the global URIs too (and unset afterwards): earlier tests in the session may have
    called ``mlflow.set_tracking_uri``, which wins over the environment, and MLflow resolves
    ``models:/`` URIs through the global registry URI whatever a call is given.
    """
    import mlflow

    # A snapshot, not monkeypatch: ``set_registry_uri`` also exports MLFLOW_REGISTRY_URI, and
    # resetting it to None leaves that export behind; later tests' subprocesses inherited the
    # authenticated server as their registry and got 401 on registering a model.
    saved = dict(os.environ)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    os.environ.update(team_servers.mlflow.env())
    mlflow.set_tracking_uri(team_servers.mlflow.url)
    mlflow.set_registry_uri(team_servers.mlflow.url)
    try:
        yield team_servers
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, servers: TeamServers
            ) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC project (this repository's code, tiny profile, one task, two regimes)
    and the environment of a synthdx process on the team servers."""
    root = tmp_path_factory.mktemp("team") / "proj"

    def edit(params: dict) -> None:
        params["classifier"].update(tasks=[TASK], regimes=REGIMES)
        params["validation"]["comparisons"] = [["real+synthetic", "real"]]
        params["pipeline"].update(retries=0)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_", "AWS_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_HOME=str(root / ".prefect"), **servers.client_env())
    make_project(root, env, edit)
    return root, env


@pytest.fixture(scope="module")
def mlflow_client(servers: TeamServers) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(servers.mlflow.url)


@pytest.fixture
def prefect_client(servers: TeamServers) -> Iterator[SyncPrefectClient]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings = {PREFECT_API_URL: servers.prefect.api_url,
                PREFECT_API_AUTH_STRING: servers.prefect.auth_string}
    with temporary_settings(updates=settings), get_client(sync_client=True) as client:
        yield client


def _pipeline_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    return client.search_runs([experiment_id], "tags.`synthdx.stage` = 'pipeline'",
                              order_by=["attributes.start_time ASC"])


def test_pipeline_runs_end_to_end_against_the_team_servers(project, servers):
    root, env = project
    # A hang guard, not a speed test: the tiny run takes minutes alone, far longer on a
    # machine whose cores other jobs hold.
    out = _run([SYNTHDX, "run", "--profile", "tiny"], root, env, timeout=3600,
               servers=servers)
    ran = set(re.findall(r"^pipeline: (\S+) runs \(", out.stdout, flags=re.MULTILINE))
    assert ran == ALL_STAGES
    assert f"in {servers.mlflow.url}" in out.stdout  # the parent run is in the server
    assert not (root / "mlflow.db").exists(), "tracked into the local SQLite file, not the server"


def test_mlflow_server_holds_the_runs_metrics_and_artifacts(project, servers, mlflow_client,
                                                            tmp_path):
    client, store = mlflow_client, servers.store
    exp = client.get_experiment_by_name("synthdx")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
    [parent] = _pipeline_runs(client, exp.experiment_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["synthdx.profile"] == "tiny"
    assert f"auc/{TASK}/real/aurelia" in parent.data.metrics
    assert parent.data.metrics["seconds/pipeline"] > 0
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage: dict[str, list] = {}
    for child in children:
        by_stage.setdefault(child.data.tags["synthdx.stage"], []).append(child)
    assert set(by_stage) == STAGE_FLOWS
    assert len(by_stage["train_classifier"]) == len(CLASSIFIER_STAGES)
    assert all(r.info.status == "FINISHED" for r in children)

    # Metrics: the diffusion learning curve and each classifier's validation AUC curve.
    [diffusion] = by_stage["train_diffusion"]
    assert diffusion.data.metrics, "train_diffusion logged no metrics"
    curve = client.get_metric_history(diffusion.info.run_id, next(iter(diffusion.data.metrics)))
    assert curve
    models = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
              in {c.info.run_id for c in by_stage["train_classifier"]}]
    assert models and all(client.get_metric_history(m.info.run_id, "val/auc") for m in models)

    # Artifacts: downloaded through the server, and physically in the bucket.
    summary = Path(client.download_artifacts(parent.info.run_id, "pipeline_summary.md",
                                             str(tmp_path)))
    assert "validate" in summary.read_text()
    [validate] = by_stage["validate"]
    html = [f.path for f in client.list_artifacts(validate.info.run_id)
            if f.path.endswith("validation.html")]
    assert html, [f.path for f in client.list_artifacts(validate.info.run_id)]
    page = Path(client.download_artifacts(validate.info.run_id, html[0], str(tmp_path)))
    assert page.stat().st_size > 1000
    keys = set(store.keys("mlflow/"))
    prefix = f"mlflow/{exp.experiment_id}"
    assert f"{prefix}/{parent.info.run_id}/artifacts/pipeline_summary.md" in keys
    assert f"{prefix}/{validate.info.run_id}/artifacts/{html[0]}" in keys
    assert any(k.startswith(f"{prefix}/{diffusion.info.run_id}/") for k in keys)


def test_registered_models_are_in_the_server_registry(project, servers, mlflow_client):
    import mlflow.pyfunc
    import numpy as np

    client = mlflow_client
    exp = client.get_experiment_by_name("synthdx")
    [parent] = _pipeline_runs(client, exp.experiment_id)
    stage_run = {r.data.tags["synthdx.stage"]: r.info.run_id for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    versions = client.search_model_versions(f"name = '{DIFFUSION_MODEL}'")
    assert [v.run_id for v in versions] == [stage_run["train_diffusion"]]
    champion = client.get_model_version_by_alias(CHAMPION_MODEL, "champion")
    assert champion.tags["task"] == TASK and champion.tags["regime"] in REGIMES
    trained_by = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(trained_by).data.tags["synthdx.stage"] == "train_classifier"
    # The champion loads from the registry (its files come from the bucket via the server).
    model = mlflow.pyfunc.load_model(f"models:/{CHAMPION_MODEL}@champion")
    scores = model.predict(np.zeros((3, 2, 64, 16), dtype=np.float32))
    assert list(scores.columns) == ["score", "positive", "probability", "uncertainty",
                                    "abstain"] and len(scores) == 3


def _status(url: str, auth: tuple[str, str] | None, body: dict[str, Any] | None = None
            ) -> int:
    """The HTTP status of a GET (or, with ``body``, a JSON POST) with basic auth or none."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        token = b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


def test_servers_refuse_requests_without_valid_credentials(servers):
    mlflow, prefect = servers.mlflow, servers.prefect
    search = f"{mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(search, None) == 401
    assert _status(search, (mlflow.account[0], "not-the-password")) == 401
    assert _status(search, mlflow.account) == 200
    assert _status(search, mlflow.admin) == 200
    # The pipeline's account is no admin: it may not create users.
    create_user = f"{mlflow.url}/api/2.0/mlflow/users/create"
    assert _status(create_user, mlflow.account, {"username": "x", "password": "y" * 16}) == 403
    assert _status(f"{mlflow.url}/health", None) == 200  # the health probe stays open

    flows = f"{prefect.api_url}/flows/filter"
    user, password = prefect.auth_string.split(":", 1)
    assert _status(flows, None, {}) == 401
    assert _status(flows, (user, "not-the-password"), {}) == 401
    assert _status(flows, (user, password), {}) == 200
    assert _status(f"{prefect.api_url}/health", None) == 200


def _cli_json(args: list[str], root: Path, env: dict[str, str],
              servers: TeamServers) -> list[dict[str, Any]]:
    """Run a ``prefect … ls -o json`` command; fail on any error, return the parsed list."""
    out = _run([PREFECT, *args, "--output", "json"], root, env, timeout=300, servers=servers)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{args}: not JSON ({exc}):\n{out.stdout[-4000:]}") from None


def test_pipeline_flow_runs_are_in_the_prefect_server(project, servers, prefect_client):
    """The client's reads and the CLI's lists work with the filters they leave unset.

    Prefect's client sends each unset filter as a JSON null; with prefect 3.8.8 and fastapi
    >= 0.151 every one of these reads answered 422 (see pyproject.toml). So the reads below
    leave filters unset on purpose, and each must list the pipeline's flow runs.
    """
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import FlowRunSort

    root, env = project
    client = prefect_client
    names = ["pipeline", *STAGE_FLOWS]
    flows = {f.id: f.name for f in client.read_flows()}
    assert set(names) <= set(flows.values())
    every_run = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
    runs = [r for r in every_run if flows.get(r.flow_id) in names]
    by_flow: dict[str, list] = {}
    for run in runs:
        by_flow.setdefault(flows[run.flow_id], []).append(run)
    assert set(by_flow) == set(names)
    assert len(by_flow["pipeline"]) == 1
    assert len(by_flow["train_classifier"]) == len(CLASSIFIER_STAGES)
    assert len(runs) == 1 + len(ALL_STAGES)
    assert all(r.state and r.state.is_completed() for r in runs), \
        [(flows[r.flow_id], r.state and r.state.type) for r in runs]
    pipeline_run = by_flow["pipeline"][0]
    # Every stage's flow run ran inside the pipeline's (each stage is its own process).
    assert all(pipeline_run.start_time <= r.start_time <= pipeline_run.end_time
               for name, rs in by_flow.items() if name != "pipeline" for r in rs)
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["synthdx-pipeline"])))
    assert [a.flow_run_id for a in artifacts] == [pipeline_run.id]
    assert "validate" in str(artifacts[0].data)

    # The CLI lists the same runs (each command exits 0 or the test fails with its output).
    listed = _cli_json(["flow-run", "ls", "--limit", "100"], root, env, servers)
    assert {r["id"] for r in listed} == {str(r.id) for r in every_run}
    assert {str(r.id) for r in runs} <= {r["id"] for r in listed}
    pipeline_only = _cli_json(["flow-run", "ls", "--flow-name", "pipeline"], root, env,
                              servers)
    assert [r["id"] for r in pipeline_only] == [str(pipeline_run.id)]
    assert _cli_json(["deployment", "ls"], root, env, servers) == []  # none applied yet


def test_a_prefect_yaml_deployment_runs_on_a_worker(project, servers, prefect_client,
                                                    mlflow_client):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    root, env = project
    client = prefect_client
    _run([PREFECT, "work-pool", "create", "synthdx-cpu", "--type", "process"], root, env,
         timeout=120, servers=servers)
    out = _run([SYNTHDX, "deploy", "--name", "validate"], root, env, timeout=300,
               servers=servers)
    assert "deployment pipeline/validate -> pool synthdx-cpu [on demand]" in out.stdout
    deployment = client.read_deployment_by_name("pipeline/validate")
    assert deployment.parameters == {"only": ["validate"]}
    assert deployment.work_pool_name == "synthdx-cpu"
    assert [d.id for d in client.read_deployments()] == [deployment.id]
    listed = _cli_json(["deployment", "ls"], root, env, servers)
    assert [(d["id"], d["name"], d["work_pool_name"]) for d in listed] == [
        (str(deployment.id), "validate", "synthdx-cpu")]

    ran = _run([PREFECT, "deployment", "run", "pipeline/validate"], root, env, timeout=120,
               servers=servers)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", ran.stdout)
    assert match, ran.stdout
    worker = _run([PREFECT, "worker", "start", "--pool", "synthdx-cpu", "--run-once",
                   "--limit", "1"], root, env, timeout=600, servers=servers)
    flow_run = client.read_flow_run(match.group(1))
    assert flow_run.deployment_id == deployment.id
    assert flow_run.state and flow_run.state.is_completed(), (
        f"{flow_run.state}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}")
    deployed = client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
    assert [r.id for r in deployed] == [flow_run.id]

    # The worker's run tracked into MLflow: a second pipeline run, validate up to date.
    exp = mlflow_client.get_experiment_by_name("synthdx")
    runs = _pipeline_runs(mlflow_client, exp.experiment_id)
    assert len(runs) == 2
    assert runs[-1].data.tags["synthdx.request"] == "synthdx run --only validate"
    assert runs[-1].data.tags["synthdx.stages_skipped"] == "validate"


def test_dvc_push_and_pull_through_the_object_store(project, servers):
    root, env = project
    store = servers.store
    for args in (["remote", "add", "-f", "-d", "team", f"s3://{store.bucket}/dvc"],
                 ["remote", "modify", "team", "endpointurl", store.endpoint],
                 ["remote", "modify", "team", "region", "us-east-1"],
                 ["remote", "modify", "--local", "team", "access_key_id", store.access_key],
                 ["remote", "modify", "--local", "team", "secret_access_key",
                  store.secret_key]):
        _run([DVC, *args], root, env)
    _run([DVC, "push", "ingest"], root, env, timeout=300)
    assert store.keys("dvc/"), "nothing pushed to the bucket"
    shutil.rmtree(root / "data" / "processed")
    shutil.rmtree(root / ".dvc" / "cache")
    _run([DVC, "pull", "ingest"], root, env, timeout=300)
    assert (root / "data/processed/manifest.parquet").is_file()
    status = _run([DVC, "status", "ingest"], root, env)
    assert "up to date" in status.stdout.lower(), status.stdout


def test_postgres_script_is_idempotent_and_names_bad_input(servers, tmp_path):
    from tests.servers import POSTGRES_SCRIPT, base_env

    db = servers.postgres
    env = {**base_env(), "SYNTHDX_PG_USER": db.user, "SYNTHDX_PG_PASSWORD": db.password}

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(POSTGRES_SCRIPT), *args], env=env,
                              capture_output=True, text=True, timeout=120)

    again = script("start", str(db.data), str(db.port), "mlflow", "prefect")
    assert again.returncode == 0, again.stderr
    assert f"already running on 127.0.0.1:{db.port}" in again.stderr
    assert script("status", str(db.data)).returncode == 0
    moved = script("start", str(db.data), str(db.port + 1))
    assert moved.returncode == 1
    assert f"already runs on port {db.port}, not {db.port + 1}" in moved.stderr
    (tmp_path / "notes.txt").write_text("not a cluster")
    occupied = script("start", str(tmp_path), str(db.port + 1))
    assert occupied.returncode == 1, occupied.stderr
    assert "is not empty and not a PostgreSQL cluster" in occupied.stderr
    assert tmp_path.stat().st_uid == os.getuid()  # refused before anything changed hands
    assert script("status", str(tmp_path / "nothing")).returncode == 3

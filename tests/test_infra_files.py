"""The team installation files in infra/, checked without Docker or SLURM.

Docker cannot run on the machines these tests run on, so the compose file, the Dockerfile and
the batch script are checked for what would break a deployment: a worker polling a pool no
deployment uses, a variable the env file does not define, a password written into the file,
a server without its database or bucket, overrides the parameter schema rejects. The same
programs run for real on loopback in the integration tests (tests/servers).
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "docker-compose.yml"
ENV_EXAMPLE = INFRA / ".env.example"
DOCKERFILE = INFRA / "Dockerfile"
SBATCH = INFRA / "slurm" / "train_diffusion.sbatch"

REQUIRED_SERVICES = {"postgres", "minio", "minio-init", "mlflow", "mlflow-users",
                     "prefect-server", "worker-cpu", "worker-gpu"}
ONE_SHOT = {"minio-init", "mlflow-users"}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH_STRING|TOKEN|(?<!ACCESS)_KEY$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=value: {line!r}"
            assert key not in values, f".env.example: {key} twice"
            values[key] = value
    return values


def _argv(service: dict[str, Any]) -> list[str]:
    """Entrypoint + command of a service as one argument list."""
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return parts


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _prefect_pools() -> dict[str, set[str]]:
    """Work pool name -> tags of the deployments that use it (prefect.yaml)."""
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools: dict[str, set[str]] = {}
    for deployment in doc["deployments"]:
        pools.setdefault(deployment["work_pool"]["name"], set()).update(
            deployment.get("tags") or [])
    return pools


def _worker_pools(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Service name -> pool, for every service that runs `prefect worker start`."""
    out = {}
    for name, service in services.items():
        argv = _argv(service)
        if argv[:3] == ["prefect", "worker", "start"]:
            out[name] = _option(argv, "--pool")
    return out


def _assert_no_password_in_url(text: str, where: str) -> None:
    """A URL's userinfo may name a user; its password, if any, must be a variable."""
    for userinfo in re.findall(r"://([^/@\s]+)@", text):
        user, colon, password = userinfo.partition(":")
        assert not colon or password == "${}", f"{where}: literal password in a URL"


def _gpu_reserved(service: dict[str, Any]) -> bool:
    devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
               .get("devices", []))
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
               for d in devices)


# --- docker-compose.yml ---------------------------------------------------------------------

def test_every_service_of_the_installation_is_there(services):
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)


def test_workers_poll_exactly_the_work_pools_of_prefect_yaml(services):
    pools = _prefect_pools()
    workers = _worker_pools(services)
    assert set(workers.values()) == set(pools), (workers, pools)
    for name in workers:
        argv = _argv(services[name])
        assert _option(argv, "--type") == "process"  # creates the pool if it is missing
        assert "--with-healthcheck" in argv
        environment = _environment(services[name])
        assert environment["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        # Deployments record the checkout path `synthdx deploy` ran in: /srv/synthdx in a worker.
        assert services[name].get("working_dir") == "/srv/synthdx"
        assert any(str(v).endswith(":/srv/synthdx") for v in services[name]["volumes"])


def test_gpu_deployments_land_on_a_worker_with_gpus_and_the_cuda_image(services):
    pools = _prefect_pools()
    for name, pool in _worker_pools(services).items():
        service = services[name]
        gpu = "gpu" in pools[pool]
        assert _gpu_reserved(service) == gpu, name
        assert service["build"]["args"]["TORCH_VARIANT"] == ("cuda" if gpu else "cpu"), name
        assert service["image"] == ("synthdx:cuda" if gpu else "synthdx:cpu"), name


def test_every_variable_is_defined_in_env_example(env_example):
    used = set(VAR.findall(COMPOSE.read_text()))
    assert used, "the compose file uses no variables?"
    assert used <= set(env_example), sorted(used - set(env_example))
    # And nothing defined there is dead.
    assert set(env_example) <= used, sorted(set(env_example) - used)


def test_env_example_holds_no_secret_value(env_example):
    secrets = {k: v for k, v in env_example.items() if SECRET_NAME.search(k)}
    assert {"POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "S3_SECRET_KEY",
            "PREFECT_API_AUTH_STRING", "SYNTHDX_PSEUDONYM_KEY"} <= set(secrets)
    assert all(v == "" for v in secrets.values()), {k for k, v in secrets.items() if v}


def test_required_secrets_stop_compose_when_missing():
    # ${VAR:?message}: docker compose refuses to start and names the variable.
    text = COMPOSE.read_text()
    for name in ("POSTGRES_PASSWORD", "MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD",
                 "MINIO_ROOT_PASSWORD", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY", "SYNTHDX_MLFLOW_PASSWORD",
                 "PREFECT_API_AUTH_STRING", "SYNTHDX_PSEUDONYM_KEY"):
        uses = re.findall(r"\$\{" + name + r"(:?[-?])?[^}]*\}", text)
        assert uses and all(u == ":?" for u in uses), name


def test_no_secret_literal_in_the_compose_file(services):
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert VAR.fullmatch(value), f"{name}: {key} is not a ${{VARIABLE}}"
            _assert_no_password_in_url(VAR.sub("${}", value), f"{name}: {key}")
        for arg in _argv(service):
            _assert_no_password_in_url(VAR.sub("${}", arg), f"{name}: {arg}")


def test_mlflow_server_basic_auth_postgresql_and_proxied_s3_artifacts(services):
    service = services["mlflow"]
    argv = _argv(service)
    assert argv[:2] == ["mlflow", "server"]
    assert _option(argv, "--app-name") == "basic-auth"
    backend = _option(argv, "--backend-store-uri")
    assert backend == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"  # PGPASSWORD
    destination = _option(argv, "--artifacts-destination")
    assert destination.startswith("s3://")
    assert "--serve-artifacts" in argv and "--no-serve-artifacts" not in argv
    assert "mlflow:5000" in _option(argv, "--allowed-hosts").split(",")  # workers' Host header
    env = _environment(service)
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert env[key].startswith("${"), key
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # as on the test servers
    # The bucket is the one minio-init creates.
    bucket = destination.removeprefix("s3://").split("/")[0]
    assert f"synthdx/{bucket}" in (INFRA / "minio" / "create-buckets.sh").read_text()


def test_mlflow_auth_config_is_mounted_and_holds_no_secret(services):
    service = services["mlflow"]
    path = _environment(service)["MLFLOW_AUTH_CONFIG_PATH"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    source = INFRA / mounts[path]
    parser = configparser.ConfigParser()
    parser.read_string(source.read_text())
    section = parser["mlflow"]
    assert "admin_password" not in section and "admin_username" not in section  # from env
    assert section["default_permission"] in {"READ", "EDIT", "MANAGE", "NO_PERMISSIONS"}
    assert re.fullmatch(r"postgresql\+psycopg2://mlflow@postgres:5432/\w+", section["database_uri"])


def test_every_database_a_server_uses_is_created_by_the_init_script(services):
    init = (INFRA / "postgres" / "init-databases.sh").read_text()
    ini = configparser.ConfigParser()
    ini.read_string((INFRA / "mlflow" / "basic_auth.ini").read_text())
    urls = [_option(_argv(services["mlflow"]), "--backend-store-uri"),
            ini["mlflow"]["database_uri"],
            _environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"]]
    assert urls[2].startswith("postgresql+asyncpg://prefect:${")
    for url in urls:
        role, database = re.search(r"://(\w+)[^/]*/(\w+)$", VAR.sub("VAR", url)).groups()
        assert f"CREATE ROLE {role} LOGIN" in init, role
        assert f"CREATE DATABASE {database} OWNER {role};" in init, database
    mounted = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert mounted and mounted[0].startswith("./postgres/init-databases.sh:")


def test_health_and_start_order(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
        else:
            assert "healthcheck" in service and service["healthcheck"]["test"], name
            assert service.get("restart") == "unless-stopped", name
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            wanted = ("service_completed_successfully" if dependency in ONE_SHOT
                      else "service_healthy")
            assert spec["condition"] == wanted, (name, dependency)
    for name in ("mlflow", "prefect-server"):
        assert "postgres" in services[name]["depends_on"]
    assert "minio-init" in services["mlflow"]["depends_on"]
    for name in _worker_pools(services):
        assert {"prefect-server", "mlflow", "mlflow-users"} <= set(services[name]["depends_on"])


def test_images_are_pinned_and_mounted_files_exist(services):
    for name, service in services.items():
        image = service.get("image", "")
        if "build" not in service:
            tag = image.rpartition(":")[2]
            assert ":" in image and tag and tag != "latest", f"{name}: {image} not pinned"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (INFRA / source).is_file(), f"{name}: {source} missing"


def test_shell_scripts_parse():
    bash = shutil.which("bash")
    for script in (INFRA / "postgres" / "init-databases.sh", SBATCH):
        subprocess.run([bash, "-n", str(script)], check=True)
    subprocess.run([shutil.which("sh") or bash, "-n", str(INFRA / "minio" / "create-buckets.sh")],
                   check=True)


def test_env_file_is_ignored_and_its_example_is_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert ignored("infra/.env")
    assert not ignored("infra/.env.example")


# --- Dockerfile -----------------------------------------------------------------------------

def _stages(text: str) -> dict[str, str]:
    """Stage name -> its FROM argument."""
    return {m.group(2): m.group(1)
            for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", text, re.MULTILINE)}


def _stage_body(text: str, stage: str) -> str:
    match = re.search(rf"^FROM\s+\S+\s+AS\s+{re.escape(stage)}\s*$(.*?)(?=^FROM\s|\Z)", text,
                      re.MULTILINE | re.DOTALL)
    assert match, stage
    return match.group(1)


def test_dockerfile_stages_torch_builds_and_runtime(services):
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert {"base", "torch-cpu", "torch-cuda", "runtime"} <= set(stages)
    assert stages["runtime"] == "torch-${TORCH_VARIANT}"
    variants = {s["build"]["args"]["TORCH_VARIANT"] for s in services.values() if "build" in s}
    assert variants == {"cpu", "cuda"} and all(f"torch-{v}" in stages for v in variants)
    # The torch builds the Makefile installs: CPU without a GPU, CUDA with one.
    cuda_spec, cpu_spec = re.search(r"TORCH_SPEC \?= \$\(if \$\(HAS_GPU\),(\S+?),(\S+?)\)",
                                    (REPO / "Makefile").read_text()).groups()
    cpu = _stage_body(text, "torch-cpu")
    assert f"--index-url https://download.pytorch.org/whl/cpu {cpu_spec}" in cpu
    assert cuda_spec in _stage_body(text, "torch-cuda")
    runtime = _stage_body(text, "runtime")
    assert "'.[team]'" in runtime
    assert re.search(r"^USER\s+synthdx\s*$", runtime, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["synthdx"\]\s*$', runtime, re.MULTILINE)
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # pinned, the project's 3.11


def test_dockerfile_copies_only_what_the_context_lets_through():
    text = DOCKERFILE.read_text()
    allowed = {line[1:].rstrip("/") for line in
               (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    for match in re.finditer(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE):
        *sources, _ = match.group(1).split()
        for source in sources:
            assert source in allowed, f"COPY {source}: excluded from the build context"
            assert (REPO / source).exists(), source


# --- SLURM ----------------------------------------------------------------------------------

def _sbatch_lines() -> list[str]:
    """The script's lines with backslash continuations joined."""
    return SBATCH.read_text().replace("\\\n", " ").splitlines()


def test_sbatch_requests_one_task_per_gpu_on_several_nodes():
    options = dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", SBATCH.read_text(), re.MULTILINE))
    assert int(options["nodes"]) >= 2
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert "gpus-per-task" not in options  # every task must see its node's GPUs


def test_srun_runs_train_diffusion_with_overrides_the_schema_accepts():
    srun = [line for line in _sbatch_lines() if line.strip().startswith("srun ")]
    assert len(srun) == 1
    argv = shlex.split(srun[0])
    start = argv.index("synthdx")
    assert argv[start + 1] == "train-diffusion"
    sets = [argv[i + 1] for i in range(start, len(argv) - 1) if argv[i] == "--set"]
    layout = {"SLURM_NNODES": "3", "SLURM_NTASKS_PER_NODE": "4"}
    overrides = [re.sub(r"\$\{?(\w+)\}?", lambda m: layout[m.group(1)], s) for s in sets]
    # Only the layout on the command line: dvc commit records params.yaml, so whatever
    # changes the model must be there (profile: gpu), not in an override.
    assert {o.split("=")[0] for o in overrides} <= {
        "diffusion.num_nodes", "diffusion.devices", "diffusion.strategy", "diffusion.accelerator"}
    cfg = load_config(REPO / "params.yaml", ["profile=gpu", *overrides])
    assert cfg.diffusion.num_nodes == 3 and cfg.diffusion.devices == 4
    assert cfg.diffusion.strategy == "ddp" and cfg.diffusion.accelerator == "gpu"
    assert cfg.diffusion.precision == "auto" and cfg.diffusion.batch_size > 0


def test_sbatch_records_the_stage_in_dvc_after_training():
    lines = [line.strip() for line in _sbatch_lines()]
    srun = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    commit = next(i for i, line in enumerate(lines) if re.match(r"dvc .*\bcommit\b", line))
    assert srun < commit
    assert shlex.split(lines[commit]) == ["dvc", "--wait-for-lock", "commit", "--force",
                                          "train_diffusion"]
    assert "set -euo pipefail" in lines  # a failed training step never reaches the commit
    assert "train_diffusion" in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


# --- MLflow account bootstrap ---------------------------------------------------------------

def _ensure_user_module():
    path = INFRA / "mlflow" / "ensure_user.py"
    spec = importlib.util.spec_from_file_location("ensure_user", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NotFound(Exception):
    error_code = "RESOURCE_DOES_NOT_EXIST"


class _FakeAuth:
    def __init__(self, users: dict[str, str], fail: Exception | None = None) -> None:
        self.users, self.fail = users, fail

    def get_user(self, username: str) -> str:
        if self.fail:
            raise self.fail
        if username not in self.users:
            raise _NotFound(username)
        return username

    def create_user(self, username: str, password: str) -> None:
        self.users[username] = password

    def update_user_password(self, username: str, password: str) -> None:
        self.users[username] = password


def test_ensure_user_creates_then_updates_and_lets_other_errors_through():
    module = _ensure_user_module()
    auth = _FakeAuth({"admin": "x" * 12})
    assert module.ensure_user(auth, "synthdx-pipeline", "first-password") == "created"
    assert module.ensure_user(auth, "synthdx-pipeline", "second-password") == "updated"
    assert auth.users["synthdx-pipeline"] == "second-password"
    with pytest.raises(PermissionError):
        module.ensure_user(_FakeAuth({}, PermissionError("401")), "synthdx-pipeline", "p" * 12)


def test_ensure_user_refuses_a_missing_setting_or_the_admin_account(monkeypatch, capsys):
    module = _ensure_user_module()
    for name in module.REQUIRED:
        monkeypatch.setenv(name, "admin")
    monkeypatch.delenv("SYNTHDX_MLFLOW_PASSWORD")
    assert module.main() == 2
    assert "SYNTHDX_MLFLOW_PASSWORD" in capsys.readouterr().err
    monkeypatch.setenv("SYNTHDX_MLFLOW_PASSWORD", "p" * 12)
    assert module.main() == 2
    assert "must not be the admin" in capsys.readouterr().err

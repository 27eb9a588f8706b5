"""The team's servers, for real, on loopback: what the integration tests run against.

No machine here runs Docker, so each server is the real program started as a process group
on 127.0.0.1 with a free port: PostgreSQL (``infra/scripts/postgres.sh``, which installs
Debian's package when it is missing), moto's S3 server as the object store, ``mlflow server``
with basic authentication on PostgreSQL with its artifacts in the object store, and
``prefect server start`` on PostgreSQL with basic authentication on its API — configured as
infra/docker-compose.yml configures the team's (infra/mlflow/basic_auth.ini, the pipeline's
own MLflow account made by infra/mlflow/ensure_user.py). Every server writes a log file; a
server that does not come up fails with the tail of its log, and every process group is
stopped on the way out, whatever happened.

Use the context managers directly, or the session fixture ``team_servers`` (import it into
the test module: ``from tests.servers import team_servers  # noqa: F401``).
"""

from __future__ import annotations

import configparser
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POSTGRES_SCRIPT = REPO / "infra" / "scripts" / "postgres.sh"
PG_USER = "synthdx"
PG_MISSING = 4  # postgres.sh: PostgreSQL is not installed and cannot be installed here
REQUIRE_ENV = "SYNTHDX_REQUIRE_SERVERS"  # set (CI): a missing PostgreSQL fails, never skips
AWS_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log file (empty when there is none)."""
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def base_env() -> dict[str, str]:
    """This environment without settings that would point a server at another one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_", "AWS_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


class ServerError(RuntimeError):
    """A server did not start (the message carries the tail of its log)."""


@dataclass
class ServerProcess:
    """One server running as its own process group, its output in ``log``."""

    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        """Whether the server's main process still runs."""
        return self.proc.poll() is None

    def failure(self, why: str) -> ServerError:
        """A ServerError saying ``why``, with the tail of the log."""
        return ServerError(f"{self.name}: {why} (log {self.log}):\n{tail(self.log)}")

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``timeout``."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A reaped leader with no other member raises; a zombie leader alone still counts, so
    # look for a member that is not a zombie.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def start_process(name: str, cmd: list[str], log: Path, env: dict[str, str],
                  cwd: Path) -> ServerProcess:
    """Start ``cmd`` in a new session (its own process group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return ServerProcess(name=name, proc=proc, log=log)


def wait_until(server: ServerProcess, ready: Callable[[], bool], timeout: float,
               what: str) -> float:
    """Poll ``ready`` until it is true; return the seconds it took.

    Raises:
        ServerError: the process exited, or ``timeout`` passed (with the log's tail).
    """
    started = time.monotonic()
    while True:
        if not server.alive():
            raise server.failure(f"exited with code {server.proc.returncode} before {what}")
        if ready():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise server.failure(f"no {what} after {timeout:.0f} s")
        time.sleep(0.5)


def http_ok(url: str) -> Callable[[], bool]:
    """A readiness check: ``url`` answers 200."""
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False
    return check


@dataclass(frozen=True)
class Postgres:
    """A running throwaway PostgreSQL cluster (``infra/scripts/postgres.sh``)."""

    data: Path
    port: int
    user: str
    password: str
    log: Path

    def url(self, database: str, driver: str = "psycopg2", password: bool = True) -> str:
        """SQLAlchemy URL of ``database`` (``psycopg2`` for MLflow, ``asyncpg`` for Prefect).

        Why the explicit driver: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3,
        which the team install does not have (it has psycopg2-binary). Without ``password``
        the URL leaves it to libpq's PGPASSWORD, as infra/docker-compose.yml does for MLflow.
        """
        secret = f":{self.password}" if password else ""
        return (f"postgresql+{driver}://{self.user}{secret}@127.0.0.1:{self.port}/"
                f"{database}")


@contextmanager
def postgres(databases: tuple[str, ...] = ("mlflow", "mlflow_auth", "prefect"),
             timeout: float = 900) -> Iterator[Postgres]:
    """A PostgreSQL cluster in a fresh folder under the system temp dir, stopped afterwards.

    Why not pytest's tmp_path: its folders are private to root (0700), and PostgreSQL runs
    as the postgres user, which must reach its data folder; a short path also keeps the Unix
    socket under its 107-byte limit. ``timeout`` covers a first ``apt-get install``.

    Where PostgreSQL is missing and cannot be installed (not root), the calling test is
    skipped, unless ``SYNTHDX_REQUIRE_SERVERS`` is set (CI sets it): then it fails.
    """
    base = Path(tempfile.mkdtemp(prefix="synthdx-pg-"))
    base.chmod(0o711)
    data = base / "data"
    port = free_port()
    password = secrets.token_hex(12)
    env = {**base_env(), "SYNTHDX_PG_USER": PG_USER, "SYNTHDX_PG_PASSWORD": password}
    script = ["bash", str(POSTGRES_SCRIPT)]
    try:
        try:
            subprocess.run([*script, "start", str(data), str(port), *databases], env=env,
                           check=True, capture_output=True, text=True, timeout=timeout)
        except subprocess.CalledProcessError as exc:
            if exc.returncode == PG_MISSING and not os.environ.get(REQUIRE_ENV):
                pytest.skip(f"no PostgreSQL here and it cannot be installed ({REQUIRE_ENV} "
                            f"unset): {exc.stderr.strip()}")
            raise ServerError(f"postgres.sh start failed (exit {exc.returncode}):\n"
                              f"{exc.stdout}{exc.stderr}\n{tail(data / 'server.log')}") from None
        yield Postgres(data=data, port=port, user=PG_USER, password=password,
                       log=data / "server.log")
    finally:
        if (data / "PG_VERSION").is_file():
            subprocess.run([*script, "stop", str(data)], env=env, capture_output=True,
                           timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@dataclass(frozen=True)
class ObjectStore:
    """An S3-compatible object store (moto's server) with one bucket."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    server: ServerProcess

    def env(self) -> dict[str, str]:
        """What an S3 client (boto3, MLflow, DVC) needs to reach this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": AWS_REGION, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        """A boto3 S3 client for this store."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=AWS_REGION,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@contextmanager
def object_store(folder: Path, bucket: str = "synthdx", timeout: float = 60
                 ) -> Iterator[ObjectStore]:
    """moto's S3 server on a free loopback port, with ``bucket`` created."""
    port = free_port()
    server = start_process("moto_server", [str(BIN / "moto_server"), "-H", "127.0.0.1",
                                           "-p", str(port)],
                           folder / "moto.log", base_env(), folder)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_until(server, http_ok(f"{endpoint}/moto-api/"), timeout, "S3 endpoint")
        store = ObjectStore(endpoint=endpoint, bucket=bucket, access_key="synthdx-test",
                            secret_key=secrets.token_hex(16), server=server)
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        server.stop()


@dataclass(frozen=True)
class MlflowServer:
    """``mlflow server`` with basic authentication: an admin and the pipeline's account."""

    url: str
    admin: tuple[str, str]
    account: tuple[str, str]
    server: ServerProcess

    def env(self) -> dict[str, str]:
        """What the pipeline needs to track into this server (as its own account)."""
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": self.account[0],
                "MLFLOW_TRACKING_PASSWORD": self.account[1]}


@contextmanager
def mlflow_server(folder: Path, db: Postgres, store: ObjectStore, timeout: float = 180
                  ) -> Iterator[MlflowServer]:
    """MLflow's tracking server and registry on PostgreSQL, artifacts proxied to the store.

    Configured as infra/docker-compose.yml configures the team's: the basic-auth app with
    infra/mlflow/basic_auth.ini (only its user store moved to this cluster), the admin from
    MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, database passwords from PGPASSWORD, proxied
    artifacts; then the pipeline's own account is made by infra/mlflow/ensure_user.py.
    """
    port = free_port()
    auth = configparser.ConfigParser()
    auth.read(REPO / "infra" / "mlflow" / "basic_auth.ini")
    auth["mlflow"]["database_uri"] = db.url("mlflow_auth", password=False)
    ini = folder / "basic_auth.ini"
    with ini.open("w") as fh:
        auth.write(fh)
    admin = ("admin", secrets.token_urlsafe(18))
    account = ("synthdx-pipeline", secrets.token_urlsafe(18))
    env = {**base_env(), **store.env(), "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "PGPASSWORD": db.password, "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           # The job runner (huey consumers, several processes) serves GenAI jobs only.
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
           "--backend-store-uri", db.url("mlflow", password=False), "--serve-artifacts",
           "--artifacts-destination", f"s3://{store.bucket}/mlflow",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = start_process("mlflow server", cmd, folder / "mlflow.log", env, folder)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(server, http_ok(f"{url}/health"), timeout, "/health")
        made = subprocess.run(
            [sys.executable, str(REPO / "infra" / "mlflow" / "ensure_user.py")],
            env={**base_env(), "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": admin[0],
                 "MLFLOW_TRACKING_PASSWORD": admin[1], "SYNTHDX_MLFLOW_USERNAME": account[0],
                 "SYNTHDX_MLFLOW_PASSWORD": account[1]},
            capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            raise server.failure(f"ensure_user.py failed: {made.stdout}{made.stderr}")
        yield MlflowServer(url=url, admin=admin, account=account, server=server)
    finally:
        server.stop()


@dataclass(frozen=True)
class PrefectServer:
    """``prefect server start`` on PostgreSQL, with basic authentication on its API."""

    api_url: str
    auth_string: str
    home: Path
    server: ServerProcess

    def env(self) -> dict[str, str]:
        """What a Prefect client (flow run, worker, CLI) needs to use this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth_string,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@contextmanager
def prefect_server(folder: Path, db: Postgres, timeout: float = 180) -> Iterator[PrefectServer]:
    """Prefect's API server (and its services) on PostgreSQL, as infra/docker-compose.yml
    runs it: basic authentication on the API (PREFECT_SERVER_API_AUTH_STRING); the UI off."""
    port = free_port()
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    auth_string = f"synthdx:{secrets.token_urlsafe(18)}"
    env = {**base_env(), "PREFECT_HOME": str(home),
           "PREFECT_API_DATABASE_CONNECTION_URL": db.url("prefect", driver="asyncpg"),
           "PREFECT_SERVER_API_AUTH_STRING": auth_string,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]
    server = start_process("prefect server", cmd, folder / "prefect.log", env, folder)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_until(server, http_ok(f"{api}/health"), timeout, "/api/health")
        yield PrefectServer(api_url=api, auth_string=auth_string, home=home, server=server)
    finally:
        server.stop()


@dataclass
class TeamServers:
    """Every team server, running; ``logs`` names each one's log file."""

    postgres: Postgres
    store: ObjectStore
    mlflow: MlflowServer
    prefect: PrefectServer
    logs: dict[str, Path] = field(default_factory=dict)

    def client_env(self) -> dict[str, str]:
        """The environment of a synthdx process that tracks and orchestrates on these servers.

        No AWS settings: MLflow's artifacts go through the tracking server (proxied).
        """
        return {**self.mlflow.env(), **self.prefect.env()}

    def log_tails(self, lines: int = 40) -> str:
        """The end of every server's log, for a failure report."""
        return "\n".join(f"===== {name}: {path} =====\n{tail(path, lines)}"
                         for name, path in self.logs.items())


@contextmanager
def start_team_servers(folder: Path) -> Iterator[TeamServers]:
    """PostgreSQL, the object store, MLflow and Prefect; all stopped afterwards."""
    with ExitStack() as stack:
        db = stack.enter_context(postgres())
        store = stack.enter_context(object_store(folder))
        mlflow = stack.enter_context(mlflow_server(folder, db, store))
        prefect = stack.enter_context(prefect_server(folder, db))
        yield TeamServers(postgres=db, store=store, mlflow=mlflow, prefect=prefect,
                          logs={"postgres": db.log, "moto_server": store.server.log,
                                "mlflow server": mlflow.server.log,
                                "prefect server": prefect.server.log})


@pytest.fixture(scope="session")
def team_servers(tmp_path_factory: pytest.TempPathFactory,
                         request: pytest.FixtureRequest) -> Iterator[TeamServers]:
    """The team servers for the whole session; their log tails are shown if a test failed."""
    folder = tmp_path_factory.mktemp("servers")
    failed_before = request.session.testsfailed
    with start_team_servers(folder) as servers:
        yield servers
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line("\n" + servers.log_tails())

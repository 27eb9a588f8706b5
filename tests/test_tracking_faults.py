"""A tracking server that is down: a clear error before a stage writes anything, and a
training run that outlives an outage in the middle.

The outage tests run a real ``mlflow server`` (SQLite backend and artifacts in tmp_path, on a
free loopback port), kill it and start it again on the same port and backend.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.common.mlflow_logger import BufferedMLFlowLogger, is_outage
from tasks.common.tracking import (
    TrackingUnreachable,
    check_tracking_server,
    probe_server,
    stage_run,
)
from tasks.config import MlflowConfig
from tests.test_pipeline_lock import SYNTHDX, snapshot, tiny_project

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unreachable(uri: str, reason: str = "connection refused") -> str:
    return (f"MLflow tracking server {uri} is unreachable ({reason}); "
            "set MLFLOW_TRACKING_URI or start the server")


# --- the check at the start of a stage -----------------------------------------------------


def test_a_response_broken_by_the_server_dying_is_an_outage():
    """Seen in CI: the server killed while answering a log-batch; requests raises
    ChunkedEncodingError (IncompleteRead), which must be kept for later, not crash training."""
    import http.client

    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    broken = urllib3.exceptions.ProtocolError(
        "Connection broken: IncompleteRead(0 bytes read, 2 more expected)",
        http.client.IncompleteRead(b"", 2))
    try:
        try:
            raise requests.exceptions.ChunkedEncodingError(broken)
        except requests.exceptions.ChunkedEncodingError as exc:
            raise MlflowException("API request to http://x/api/2.0/mlflow/runs/log-batch "
                                  f"failed with exception {exc}") from exc
    except MlflowException as wrapped:
        assert is_outage(wrapped)
    assert not is_outage(MlflowException("RESOURCE_DOES_NOT_EXIST: no such run"))


def test_dead_server_is_named_with_the_reason_and_fails_fast():
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingUnreachable) as info:
        check_tracking_server(uri, delay=0.2)
    assert str(info.value) == unreachable(uri)
    assert isinstance(info.value, OSError)  # what every stage command prints as `error: ...`
    assert time.monotonic() - started < 10


def test_password_in_the_uri_is_not_shown():
    port = free_port()
    with pytest.raises(TrackingUnreachable) as info:
        check_tracking_server(f"http://bob:s3cret@127.0.0.1:{port}", attempts=1)
    assert "s3cret" not in str(info.value)
    assert f"http://bob:***@127.0.0.1:{port} is unreachable" in str(info.value)


def test_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # the kernel accepts the connection; nobody ever answers
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert probe_server(uri, timeout=0.5) == "no answer within 0.5 s"


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook name
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("status", "reason"), [
    (200, None), (401, None), (403, None), (404, None),  # it answers: it is there
    (502, "HTTP 502 from /health"), (503, "HTTP 503 from /health"),  # a proxy, MLflow down
])
def test_what_counts_as_an_answer(health_server, status, reason):
    health_server.status = status  # type: ignore[attr-defined]
    uri = f"http://127.0.0.1:{health_server.server_address[1]}/"
    assert probe_server(uri, timeout=2) == reason


def test_local_stores_are_not_checked(tmp_path):
    check_tracking_server(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    check_tracking_server(f"file://{tmp_path}/mlruns")
    check_tracking_server("postgresql://u:p@127.0.0.1:1/mlflow")  # MLflow opens it itself


def test_stage_run_fails_before_a_run_is_started(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnreachable, match="is unreachable"), \
            stage_run(MlflowConfig(), "audit"):
        pytest.fail("the stage ran without its tracking server")


def test_training_fails_before_writing_anything(tmp_path, monkeypatch):
    from tasks.diffusion.train import train_diffusion
    from tests.test_train_diffusion import _cfg

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingUnreachable) as info:
        train_diffusion(_cfg(tmp_path, 4), processed=tmp_path / "processed")
    assert str(info.value) == unreachable(uri)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no model, no checkpoints


def test_synthdx_run_stops_before_the_lock_the_profile_and_the_first_stage(tmp_path):
    root, env = tiny_project(tmp_path / "proj")
    uri = f"http://127.0.0.1:{free_port()}"
    env["MLFLOW_TRACKING_URI"] = uri
    before = snapshot(root)
    out = subprocess.run([SYNTHDX, "run", "--only", "phantom", "--profile", "tiny"], cwd=root,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"error: {unreachable(uri)}"
    assert "Traceback" not in out.stderr
    assert snapshot(root) == before  # params.yaml (the profile) and data/raw untouched
    assert not (root / ".dvc" / "tmp" / "synthdx-run.lock").exists()
    assert not (root / ".prefect").exists()


# --- an outage in the middle, against a real `mlflow server` -------------------------------


class MlflowServer:
    """``mlflow server`` on a free loopback port; stop() kills it, start() brings it back."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while probe_server(self.uri, timeout=1) is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.root / "server.log").read_text()[-3000:]
                raise RuntimeError(f"mlflow server did not start:\n{tail}")
            time.sleep(0.25)

    def stop(self) -> None:
        """Kill the server and its workers at once (a crash, not a shutdown)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        while probe_server(self.uri, timeout=1) is None:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def running(server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> MlflowServer:
    """The module's server, up, as the tracking URI; client retries off (see the tests)."""
    if server.proc is None:
        server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.delenv("SYNTHDX_PARENT_RUN_ID", raising=False)
    # MLflow's client retries a dead server for ~4 min by default, so an outage shorter than
    # that only pauses a log call. Without retries every call in the outage fails at once:
    # the case where the logger has to keep them.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return server


class Relay:
    """A TCP relay in front of the server, for outages that need no restart of it.

    ``cut()`` closes the listening socket and every open connection: clients get "connection
    refused", as from a dead server. ``mend()`` listens again on the same port. Why: a real
    restart of ``mlflow server`` takes 15-30 s here; the training test does one, this saves
    the logger test another.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def mend(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for sock in list(self._open):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def relay(running: MlflowServer) -> Iterator[Relay]:
    relay = Relay(running.port)
    relay.mend()
    yield relay
    relay.cut()


@pytest.mark.integration
def test_logger_keeps_calls_through_an_outage_and_sends_them_in_order(relay, running, tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    logger = BufferedMLFlowLogger(experiment_name="faults", run_name="outage",
                                  tracking_uri=relay.uri, retry_every_s=0.2)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.0}, step=0)
    relay.cut()
    down = time.time()
    for step in (1, 2, 3):
        started = time.monotonic()
        logger.log_metrics({"loss": 1.0 - step / 10}, step=step)
        assert time.monotonic() - started < 5  # training is not held up
    grid = tmp_path / "grid.png"
    grid.write_bytes(b"\x89PNG not really")
    logger.log_file(grid, artifact_path="samples")
    assert logger.unsent == 4
    time.sleep(0.3)
    relay.mend()
    up = time.time()
    logger.log_metrics({"loss": 0.5}, step=4)  # the server answers again: all sent, in order
    assert logger.unsent == 0
    with pytest.raises(MlflowException):  # a refusal that is not an outage still raises
        logger.log_hyperparams({"lr": 0.2})
    logger.finalize("success")

    client = MlflowClient(running.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(logger.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [
        (0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.5)]
    # Kept calls carry the time they were measured, not the time they were sent.
    assert all(down * 1000 - 1 <= m.timestamp <= up * 1000 for m in history[1:4])
    assert [a.path for a in client.list_artifacts(logger.run_id, "samples")] == [
        "samples/grid.png"]


@pytest.mark.integration
def test_end_of_training_waits_for_the_server_and_gives_up_cleanly(relay, running):
    from mlflow import MlflowClient

    logger = BufferedMLFlowLogger(experiment_name="faults", run_name="late",
                                  tracking_uri=relay.uri, retry_every_s=0.2,
                                  flush_timeout_s=30)
    logger.log_metrics({"loss": 1.0}, step=0)
    relay.cut()
    logger.log_metrics({"loss": 0.9}, step=1)
    threading.Timer(1.5, relay.mend).start()  # back while the end of training waits for it
    logger.finalize("success")
    assert logger.unsent == 0
    client = MlflowClient(running.uri)
    assert client.get_run(logger.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(logger.run_id, "loss")) == 2

    gone = BufferedMLFlowLogger(experiment_name="faults", run_name="gone",
                                tracking_uri=relay.uri, flush_timeout_s=1)
    gone.log_metrics({"loss": 1.0}, step=0)
    relay.cut()
    gone.log_metrics({"loss": 0.9}, step=1)
    started = time.monotonic()
    gone.finalize("success")  # gives up after flush_timeout_s, without raising
    assert time.monotonic() - started < 10
    assert gone.unsent == 2  # the step and the end of the run; train_diffusion reports it
    assert client.get_run(gone.run_id).info.status == "RUNNING"


@pytest.mark.integration
def test_training_survives_the_server_going_away_mid_run(running, tmp_path, one_thread,
                                                        caplog):
    from mlflow import MlflowClient

    from tasks.diffusion.train import train_diffusion
    from tests.test_diffusion_models import _make_dataset
    from tests.test_train_diffusion import _cfg

    data = _make_dataset(tmp_path / "processed")
    cfg = _cfg(tmp_path, 12)
    cfg.diffusion.sample_every_n_epochs = 1000  # only the final grid: an artifact at the end
    checkpoints = tmp_path / "work" / "checkpoints"
    outage: dict[str, float] = {}

    def pull_the_plug() -> None:
        """At the first checkpoint, kill the server; start it again on the same port."""
        deadline = time.monotonic() + 300
        while not any(checkpoints.glob("*.ckpt")) and time.monotonic() < deadline:
            time.sleep(0.02)
        running.stop()
        outage["down"] = time.time()
        running.start()
        outage["up"] = time.time()

    plug = threading.Thread(target=pull_the_plug, daemon=True)
    plug.start()
    with caplog.at_level(logging.WARNING, logger="tasks.common.mlflow_logger"):
        summary = train_diffusion(cfg, processed=data)
    plug.join(timeout=300)
    said = [r.getMessage() for r in caplog.records if r.name == "tasks.common.mlflow_logger"]
    assert any(re.search(rf"tracking server {running.uri} unreachable \(connection "
                         r"(refused|lost)\).*training goes on", m) for m in said), said
    assert any("answers again after" in m for m in said), said

    assert summary.global_step == 12
    assert (checkpoints / "last.ckpt").is_file()
    assert set(outage) == {"down", "up"}
    client = MlflowClient(running.uri)
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert sorted(m.step for m in losses) == list(range(12))  # every step, none lost
    during = [m for m in losses if outage["down"] * 1000 <= m.timestamp <= outage["up"] * 1000]
    assert during, "no step was logged while the server was down"
    assert "train/images_per_second" in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == [
        "samples/samples_final.png"]
    assert summary.registered_model is not None  # registered once the server was back


def test_a_response_cut_half_way_is_named_a_lost_connection():
    """A server killed while it answers: requests wraps urllib3's IncompleteRead."""
    import http.client

    import requests
    import urllib3

    from tasks.common.tracking import describe_failure

    cut = requests.exceptions.ChunkedEncodingError(urllib3.exceptions.ProtocolError(
        "Connection broken", http.client.IncompleteRead(b"", 2)))
    assert describe_failure(cut) == "connection lost"
    assert describe_failure(http.client.IncompleteRead(b"", 2)) == "connection lost"

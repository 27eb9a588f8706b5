"""MLflow runs for the stages: one run per stage process, nested under the pipeline's run.

Always an explicit tracking URI (MLflow >= 3.13 refuses the implicit ./mlruns store): the
params' SQLite file by default, MLFLOW_TRACKING_URI when a team server is configured. The
pipeline hands its run id to each stage through SYNTHDX_PARENT_RUN_ID.

A tracking server is asked whether it is up (``/health``) before a stage uses it: MLflow's own
client retries a dead server for about four minutes before it gives up with a long traceback,
and a stage that only found out after writing its outputs would fail half-way through.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tasks.common.flatten import param_values
from tasks.config import MlflowConfig

PARENT_ENV = "SYNTHDX_PARENT_RUN_ID"
HEALTH_ENDPOINT = "/health"
CHECK_ATTEMPTS = 3
CHECK_TIMEOUT_S = 3.0
CHECK_DELAY_S = 1.0


class TrackingUnreachable(ConnectionError):
    """The MLflow tracking server does not answer; the message names the URI and the reason.

    Why a ConnectionError (an OSError): every stage command already turns OSError into one
    ``error: ...`` line and exit code 1, so no command needs to know about this type.
    """


def is_server_uri(uri: str) -> bool:
    """True for a tracking server reached over HTTP(S); False for SQLite, files, databases."""
    return urlsplit(uri).scheme.lower() in ("http", "https")


def redacted(uri: str) -> str:
    """The URI without a password (``https://user:***@host``), fit for messages and logs."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps: causes, contexts, and what urllib3 keeps in ``reason``.

    Why: MLflow wraps a refused connection as MlflowException <- requests ConnectionError <-
    urllib3 MaxRetryError <- NewConnectionError <- ConnectionRefusedError; the useful part is
    at the bottom.
    """
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        item = todo.pop(0)
        if any(item is seen for seen in chain):
            continue
        chain.append(item)
        inner = [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
        todo.extend(x for x in inner if isinstance(x, BaseException))
    return chain


def describe_failure(exc: BaseException, timeout: float | None = None) -> str:
    """A few words on why a request failed (refused, timed out, unknown host, TLS).

    ``timeout`` is the request's timeout, for the message (None: not known).
    """
    import http.client
    import re
    import socket

    import requests

    for item in exception_chain(exc):
        if isinstance(item, requests.exceptions.SSLError):
            ssl = re.search(r"\[SSL[^\]]*\][^'\"()]*", str(item))
            return f"TLS error: {ssl.group(0).strip() if ssl else 'handshake failed'}"
        if isinstance(item, ConnectionRefusedError):
            return "connection refused"
        if isinstance(item, ConnectionResetError | ConnectionAbortedError | BrokenPipeError
                      | http.client.IncompleteRead | requests.exceptions.ChunkedEncodingError):
            return "connection lost"  # IncompleteRead: the server died half-way through
        if isinstance(item, socket.gaierror) or "NameResolution" in type(item).__name__:
            return "host not found"
        if isinstance(item, requests.exceptions.Timeout | TimeoutError):
            return f"no answer within {timeout:g} s" if timeout else "timed out"
    inner = exception_chain(exc)[-1]  # the transport's own words, not MLflow's wrapper
    text = str(inner).splitlines()[0] if str(inner) else type(inner).__name__
    return text[:200]


def probe_server(uri: str, timeout: float = CHECK_TIMEOUT_S) -> str | None:
    """Ask the server's health endpoint once; None when it answers, else why not.

    Any answer below 500 means the server is there: MLflow's basic-auth app leaves /health
    open, and a proxy that wants credentials (401/403) or does not route /health (404) still
    proves the host is up. 5xx is what a proxy answers when MLflow behind it is down. TLS
    settings come from MLflow's own variables (MLFLOW_TRACKING_INSECURE_TLS,
    MLFLOW_TRACKING_SERVER_CERT_PATH, MLFLOW_TRACKING_CLIENT_CERT_PATH); no credentials are sent.
    """
    import requests
    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    try:
        response = requests.get(uri.rstrip("/") + HEALTH_ENDPOINT, timeout=timeout,
                                verify=creds.verify, cert=creds.client_cert_path,
                                allow_redirects=True)
    except requests.exceptions.RequestException as exc:
        return describe_failure(exc, timeout)
    if response.status_code >= 500:
        return f"HTTP {response.status_code} from {HEALTH_ENDPOINT}"
    return None


def check_tracking_server(uri: str, attempts: int = CHECK_ATTEMPTS,
                          timeout: float = CHECK_TIMEOUT_S, delay: float = CHECK_DELAY_S) -> None:
    """Fail fast, with a clear message, when ``uri`` is a tracking server that does not answer.

    Called at the start of a stage, before it writes anything, so a dead server costs a few
    seconds and one ``error:`` line instead of minutes of client retries and a half-done
    stage. Local stores (SQLite, files) are not checked.

    Raises:
        TrackingUnreachable: every attempt failed.
    """
    if not is_server_uri(uri):
        return
    reason = None
    for attempt in range(attempts):
        reason = probe_server(uri, timeout)
        if reason is None:
            return
        if attempt + 1 < attempts:
            time.sleep(delay)
    raise TrackingUnreachable(
        f"MLflow tracking server {redacted(uri)} is unreachable ({reason}); "
        "set MLFLOW_TRACKING_URI or start the server")


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""What the MLflow UI reads to choose an experiment's first page. Unset, MLflow 3 infers a
GenAI experiment and opens on the "traces" overview, where a synthdx user finds nothing; a
model-training experiment opens on its runs table."""


def use_experiment(name: str) -> str:
    """Make ``name`` the active experiment, marked as a model-training experiment.

    Returns:
        The experiment's id.
    """
    import mlflow

    experiment = mlflow.set_experiment(name)
    if (experiment.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                 EXPERIMENT_KIND)
    return str(experiment.experiment_id)


@contextmanager
def stage_run(cfg: MlflowConfig, stage: str, tags: Mapping[str, str] | None = None
              ) -> Iterator[Any]:
    """Start (and end) the MLflow run of one stage.

    Args:
        cfg: tracking settings.
        stage: stage name; becomes the run name and the ``synthdx.stage`` tag.
        tags: extra tags.

    Yields:
        The active ``mlflow.ActiveRun``.

    Raises:
        TrackingUnreachable: the tracking server does not answer (checked before the run).
    """
    import mlflow

    check_tracking_server(cfg.resolved_uri())
    mlflow.set_tracking_uri(cfg.resolved_uri())
    use_experiment(cfg.experiment)
    all_tags = {"synthdx.stage": stage, **(tags or {})}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        yield run


def log_params(params: Mapping[str, Any]) -> None:
    """Log flattened params, batched (MLflow caps values at 6000 chars and 100 per batch)."""
    import mlflow

    items = list(param_values(params).items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))

"""Lightning's MLflow logger, made to outlast an outage of the tracking server.

Why: training runs for hours and its MLflow run must not die with a tracking server that
restarts. MLflow's client retries a failed request (7 times over about four minutes by
default: MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR), so a short
outage only pauses the log call. When the retries run out the client raises, and an exception
from a log call ends ``trainer.fit``: the checkpoint is on disk, but the run is lost.

This logger keeps such calls, in order and with their original step and time, and training
goes on. While the server is away it asks ``/health`` at most every ``retry_every_s`` seconds
(a refused connection costs nothing, so training is not slowed); once the server answers, the
kept calls are sent. At the end of training it waits up to ``flush_timeout_s`` for the server
before it closes the run. Errors that are not an outage (a bad metric name, refused
credentials) still raise.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from argparse import Namespace
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _add_prefix, _convert_params
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from tasks.common.flatten import flatten
from tasks.common.tracking import (
    describe_failure,
    exception_chain,
    is_server_uri,
    probe_server,
    redacted,
)

log = logging.getLogger(__name__)

RETRY_EVERY_S = 10.0
"""How often, at most, a log call during an outage asks the server whether it is back."""
FLUSH_TIMEOUT_S = 600.0
"""How long the end of training waits for the server to take the kept calls."""
PROBE_TIMEOUT_S = 2.0
MAX_KEPT = 100_000
"""Kept calls beyond this drop the oldest (at one call per logging step: days of training)."""

_METRIC_KEY_UNSAFE = re.compile(r"[^a-zA-Z0-9_/. -]+")  # what MLFlowLogger strips too


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means the server was not reachable (or kept answering 5xx/429).

    MLflow wraps the transport error in an MlflowException; the chain tells them apart from
    a request the server understood and refused.
    """
    import http.client

    import requests
    import urllib3

    # A server killed while it answers breaks the response half-way: requests raises
    # ChunkedEncodingError (urllib3's ProtocolError, IncompleteRead), not ConnectionError.
    transient = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                 requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
                 urllib3.exceptions.ProtocolError, http.client.IncompleteRead,
                 ConnectionError, TimeoutError)
    return any(isinstance(item, transient) for item in exception_chain(exc))


class BufferedMLFlowLogger(MLFlowLogger):
    """MLFlowLogger whose log calls survive a tracking-server outage (see the module doc).

    Args:
        *args: as for ``MLFlowLogger``.
        retry_every_s: during an outage, ask the server at most this often whether it is back.
        flush_timeout_s: at the end of a successful fit, wait this long for the server.
        **kwargs: as for ``MLFlowLogger``.
    """

    def __init__(self, *args: Any, retry_every_s: float = RETRY_EVERY_S,
                 flush_timeout_s: float = FLUSH_TIMEOUT_S, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_every_s = retry_every_s
        self.flush_timeout_s = flush_timeout_s
        self._kept: deque[tuple[str, Callable[[], object]]] = deque()
        self._down_since: float | None = None
        self._next_try = 0.0
        self.dropped = 0

    @property
    def unsent(self) -> int:
        """Log calls not yet accepted by the server (0 on every rank but 0)."""
        return len(self._kept)

    @property
    def uri(self) -> str:
        """The tracking URI, without a password."""
        return redacted(self._tracking_uri or "")

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        """Log hyper-parameters (kept and sent later when the server is away)."""
        flat = flatten(_convert_params(params), sep="/")  # Lightning's own key layout
        self._send("hyper-parameters", lambda: MLFlowLogger.log_hyperparams(self, flat))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one step's metrics with the time they were measured, even if sent later."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key=_METRIC_KEY_UNSAFE.sub("", key), value=float(value),
                        timestamp=stamp, step=step or 0)
                 for key, value in _add_prefix(metrics, self._prefix,
                                               self.LOGGER_JOIN_CHAR).items()
                 if not isinstance(value, str)]
        if batch:
            self._send(f"metrics of step {step or 0}", lambda: self.experiment.log_batch(
                run_id=self.run_id, metrics=batch, **self._log_batch_kwargs))

    @rank_zero_only
    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file as an artifact of the run (callbacks use this for sample grids).

        The file must stay in place until it is sent: during an outage that is later.
        """
        self._send(f"file {Path(path).name}", lambda: self.experiment.log_artifact(
            self.run_id, str(path), artifact_path))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Close the run; after a successful fit, wait for the server to take what is kept.

        Never raises for an outage, so the trained model is still written; ``unsent`` then
        says what did not reach the server and the caller decides.
        """
        if not self._initialized:
            return
        status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(
            status, status)
        if self._checkpoint_callback:
            callback = self._checkpoint_callback
            self._send("checkpoints", lambda: self._scan_and_log_checkpoints(callback))
        run_id = self.run_id
        self._send(f"end of run ({status})",
                   lambda: self.experiment.set_terminated(run_id, status))
        if not self._kept:
            return
        wait = self.flush_timeout_s if status == "FINISHED" else 0.0
        log.warning("MLflow: waiting up to %.0f s for the tracking server %s to take %d "
                    "kept log calls of run %s", wait, self.uri, len(self._kept), run_id)
        deadline = time.monotonic() + wait
        while not (self._server_answers() and self._flush()):
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("MLflow: the tracking server %s did not come back within %.0f s; "
                          "%d log calls of run %s were not sent (the run stays %s there)",
                          self.uri, wait, len(self._kept), run_id, "RUNNING")
                return
            time.sleep(min(2.0, left))

    def _send(self, what: str, call: Callable[[], object]) -> None:
        """Make one log call now, or keep it when the server is away (or already was)."""
        if self._kept:  # an outage is on: keep the order, and look for the server now and then
            self._keep(what, call)
            if time.monotonic() >= self._next_try:
                self._next_try = time.monotonic() + self.retry_every_s
                if self._server_answers():
                    self._flush()
            return
        try:
            call()
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._keep(what, call)
            self._down_since = time.monotonic()
            self._next_try = self._down_since + self.retry_every_s
            log.warning("MLflow: tracking server %s unreachable (%s) at %s; training goes on "
                        "and its log calls are kept until the server answers", self.uri,
                        describe_failure(exc), what)

    def _keep(self, what: str, call: Callable[[], object]) -> None:
        if len(self._kept) >= MAX_KEPT:
            self._kept.popleft()
            self.dropped += 1
        self._kept.append((what, call))

    def _server_answers(self) -> bool:
        uri = self._tracking_uri or ""
        return not is_server_uri(uri) or probe_server(uri, PROBE_TIMEOUT_S) is None

    def _flush(self) -> bool:
        """Send the kept calls in order; False (the rest kept) when the server fails again."""
        sent = 0
        while self._kept:
            _, call = self._kept[0]
            try:
                call()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                return False
            self._kept.popleft()
            sent += 1
        if self._down_since is not None:
            log.warning("MLflow: tracking server %s answers again after %.0f s; %d kept log "
                        "calls sent%s", self.uri, time.monotonic() - self._down_since, sent,
                        f" ({self.dropped} oldest dropped)" if self.dropped else "")
            self._down_since = None
        return True


@contextmanager
def quiet_model_logging() -> Iterator[None]:
    """Log (and register) an MLflow model without notices its user cannot act on.

    MLflow asks for an ``input_example``, which it would use to load the model and run a
    prediction just to log it (a diffusion model would sample images); the project's models
    declare their signature instead. In a log (not a terminal) its artifact download bars are
    a few lines of noise per registration. Both are switched off for the ``with`` block only.
    """
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    before = os.environ.get(name)
    if not sys.stderr.isatty():
        os.environ[name] = "false"
    try:
        with warnings.catch_warnings():
            # MLflow may colour the message: an ANSI escape can come first.
            warnings.filterwarnings("ignore", category=UserWarning,
                                    message=r"(\x1b\[[0-9;]*m)?An input example was not provided")
            yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before

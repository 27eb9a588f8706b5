"""One Prefect API for the whole pipeline run, shared by every stage process.

Why: without PREFECT_API_URL each stage process would start its own temporary server
(10-20 s each, 16 stages); the pipeline starts one and hands its URL to the stages. A
configured PREFECT_API_URL (a team server) is used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress


@contextmanager
def shared_prefect_api(timeout_s: int = 120) -> Iterator[str]:
    """Yield the Prefect API URL in force, starting a local server for the block if none is.

    Raises:
        RuntimeError: the local server did not start within ``timeout_s``.
    """
    configured = os.environ.get("PREFECT_API_URL")
    if configured:
        yield configured
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start(timeout=timeout_s)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        _drain_workers()
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_workers() -> None:
    """Send the buffered logs and events before the server goes (else: connection errors)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for drain in (APILogWorker.drain_all, EventsWorker.drain_all):
        with suppress(RuntimeError, TimeoutError):
            drain(timeout=10)

"""Serve an open study with uvicorn, after making sure the port is free."""

from __future__ import annotations

import errno
import socket

from tasks.reader_study.errors import ReaderStudyError
from tasks.reader_study.study import OpenStudy


def check_port(host: str, port: int) -> None:
    """Fail with a clear message when ``host:port`` cannot be listened on.

    Why before uvicorn: uvicorn logs the bind error and exits with status 1 after the app is
    built; this names the port and what to do, and nothing has started yet.

    Raises:
        ReaderStudyError: the port is in use, or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ReaderStudyError(f"port {port} on {host} is in use (another server?); "
                                       "choose another with --port") from None
            raise ReaderStudyError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(study: OpenStudy, host: str, port: int, session_minutes: float) -> None:
    """Serve the study until Ctrl-C or SIGTERM (uvicorn shuts down cleanly on both).

    Every answer is committed before its response is sent, so stopping (or killing) the
    server loses no answer a reader has seen accepted.
    """
    import uvicorn

    from tasks.reader_study.web import build_app

    check_port(host, port)
    app = build_app(study, session_minutes)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                server_header=False)

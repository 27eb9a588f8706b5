"""The MLflow UI on a laptop: one light server process tree, all of it stopped on exit.

``mlflow ui`` as shipped starts MLflow's job runner (a huey consumer per job queue, seven on
MLflow 3.17) and four uvicorn workers: a dozen processes for one reader of one SQLite file,
and a SIGTERM to ``mlflow`` reaches only its direct child, leaving the job consumers running.
:func:`serve_ui` starts it without job execution (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``;
the UI's runs, metrics, artifacts and model registry do not need it) and with one worker, in a
process group of its own, and on Ctrl-C or SIGTERM stops the whole group, killing what has not
exited after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

GRACE_S = 10.0
"""How long the server gets to shut down after SIGTERM before its group is killed."""


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow ui`` command line: the project's store, one worker."""
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    return [exe, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def ui_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: job execution off (no huey consumers)."""
    env = dict(os.environ if base is None else base)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def stop_group(proc: subprocess.Popen[bytes], grace: float = GRACE_S) -> int:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL to whatever is left after ``grace`` s.

    The SIGKILL goes to the group even when the leader exited in time: a child that ignored
    the leader's shutdown (a job consumer, a worker) must not outlive the UI.

    Returns:
        The leader's exit code.
    """
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def serve_ui(uri: str, host: str, port: int) -> int:
    """Run the MLflow UI until it exits or this process is interrupted or terminated.

    Returns:
        The server's exit code (0 after a requested stop).
    """
    proc = subprocess.Popen(ui_command(uri, host, port), env=ui_environment(),
                            start_new_session=True)
    stopping = False
    code: int | None = None

    def _stop(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        stopping = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(proc)
    return 0 if stopping else int(code or 0)

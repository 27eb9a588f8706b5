"""One ``synthdx run`` at a time per project folder: an OS file lock in ``.dvc/tmp/``.

Why: two pipeline runs on one folder would rewrite params.yaml, dvc.lock and the same stage
outputs under each other (a nightly run starting while someone reruns by hand). DVC's own
lock only covers one ``dvc repro`` call, not the sequence of stages a pipeline run is.

The lock is ``fcntl.flock`` through the ``filelock`` package: the kernel drops it when the
holding process ends, however it ends, so a killed run never leaves a stale lock behind. Who
holds it (pid, host, start time, command) is written beside it in ``synthdx-run.json``, for
the message the next run prints; that file is only information, never the lock itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from flows.orchestration.dag import PipelineError
from tasks.common.atomic import atomic_write_text

LOCK_NAME = "synthdx-run.lock"
HOLDER_NAME = "synthdx-run.json"
POLL_INTERVAL_S = 0.25
LOCKED_EXIT_CODE = 75
"""``synthdx run``'s exit code when refused: EX_TEMPFAIL (sysexits.h), "try again later"."""

_held: dict[str, tuple[object, int]] = {}
"""Locks this process holds (canonical path -> (filelock object, depth)): re-entry is free."""
_held_guard = threading.Lock()


class ProjectLocked(RuntimeError):
    """Another run holds the project lock; the message says who and what to do."""

    def __init__(self, path: Path, holder: LockHolder | None, waited: float) -> None:
        self.path = path
        self.holder = holder
        self.waited = waited
        who = f"another synthdx run ({holder.describe()})" if holder else "another synthdx run"
        after = f" (waited {waited:g} s)" if waited > 0 else ""
        super().__init__(f"{who} holds the project lock {path}{after}; wait for it to finish "
                         "or pass --wait SECONDS")


@dataclass(frozen=True)
class LockHolder:
    """Who holds the lock: written by the holder, read by whoever is refused."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def me(cls, command: str) -> LockHolder:
        """This process, now."""
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   started=datetime.now().astimezone().isoformat(timespec="seconds"),
                   command=command)

    def describe(self) -> str:
        """``pid 123 on host node1, started 2026-12-02T02:00:01+00:00``."""
        return f"pid {self.pid} on host {self.host}, started {self.started}"


def lock_path(root: Path) -> Path:
    """The lock file of the project in ``root`` (DVC's own scratch folder, ignored by git).

    Raises:
        PipelineError: ``root`` is not a DVC project (no ``.dvc`` folder to put it in).
    """
    dvc_dir = Path(root).resolve() / ".dvc"
    if not dvc_dir.is_dir():
        raise PipelineError(f"{Path(root).resolve()} is not a DVC project (no .dvc folder): "
                            "run from the project folder")
    return dvc_dir / "tmp" / LOCK_NAME


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded beside the lock file, if it can be read."""
    try:
        data = json.loads(path.with_name(HOLDER_NAME).read_text(encoding="utf-8"))
        return LockHolder(pid=int(data["pid"]), host=str(data["host"]),
                          started=str(data["started"]), command=str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def project_lock(root: Path, wait: float = 0.0, command: str | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[LockHolder]:
    """Hold the project's run lock for the block; refuse or wait if another run holds it.

    Args:
        root: the project folder (the one with ``.dvc/``).
        wait: seconds to wait for the other run to finish; 0 refuses at once.
        command: what this run is, for the other run's message (default: this command line).
        on_wait: told once, in words, when this call starts waiting.

    Yields:
        What was recorded about this holder.

    Raises:
        ProjectLocked: the lock is still held after ``wait`` seconds.
        PipelineError: ``root`` is not a DVC project.
    """
    from filelock import FileLock, Timeout

    path = lock_path(root)
    key = str(path)
    with _held_guard:
        if key in _held:  # this process already holds it (the CLI, then the flow it starts)
            lock, depth = _held[key]
            _held[key] = (lock, depth + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield read_holder(path) or LockHolder.me(command or _command_line())
        finally:
            with _held_guard:
                lock, depth = _held[key]
                _held[key] = (lock, depth - 1)
        return

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(key, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if wait <= 0:
            raise ProjectLocked(path, read_holder(path), 0.0) from None
        if on_wait is not None:
            holder = read_holder(path)
            who = f" ({holder.describe()})" if holder else ""
            on_wait(f"another synthdx run{who} holds the project lock {path}; "
                    f"waiting up to {wait:g} s")
        try:
            lock.acquire(timeout=wait, poll_interval=POLL_INTERVAL_S)
        except Timeout:
            raise ProjectLocked(path, read_holder(path), wait) from None
    holder = LockHolder.me(command or _command_line())
    try:
        atomic_write_text(path.with_name(HOLDER_NAME), json.dumps(asdict(holder), indent=2))
        with _held_guard:
            _held[key] = (lock, 1)
        yield holder
    finally:
        with _held_guard:
            _held.pop(key, None)
        try:
            if read_holder(path) == holder:
                path.with_name(HOLDER_NAME).unlink(missing_ok=True)
        finally:
            lock.release()


def _command_line() -> str:
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return " ".join([name, *sys.argv[1:]])[:500]

"""Run one stage as its own process (``dvc repro --single-item``) and keep its error.

Why a process per stage: each stage is then its own Prefect flow run and MLflow run, DVC
records its dvc.lock entry exactly as ``dvc repro`` would, and Lightning's DDP launcher can
re-run the stage's command for the other ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ERROR_TAIL_LINES = 25


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message is the stage's own error output."""

    def __init__(self, stage: str, returncode: int, error: str) -> None:
        self.stage = stage
        self.returncode = returncode
        self.error = error
        super().__init__(f"stage {stage} failed (exit code {returncode}):\n{error}")


class StageInterrupted(StageFailed):
    """The pipeline is stopping (SIGTERM, Ctrl-C): the stage was terminated, or not started."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage, -signal.SIGTERM, "terminated: the pipeline is stopping")


@dataclass(frozen=True)
class StageRun:
    """How one stage process went."""

    stage: str
    seconds: float
    returncode: int


def stage_command(stage: str, force: bool) -> list[str]:
    """The command that runs exactly one stage, DVC-recorded (dvc.lock, cache, run cache).

    DVC's CLI runs through flows/orchestration/dvc_repro.py, which keeps DVC's "to track the
    changes with git, run ..." advice out of the pipeline's console.
    """
    exe = [sys.executable, "-m", "flows.orchestration.dvc_repro"]
    # --wait-for-lock: stages running side by side each take DVC's repository lock briefly
    # (before and after their command); without it the second one fails after 3 s.
    return [*exe, "--wait-for-lock", "repro", "--single-item",
            *(["--force"] if force else []), stage]


def _error_text(lines: list[str]) -> str:
    """The stage's error: its ``error:`` lines when it printed any, else the output tail.

    The stage CLIs print bad input as one ``error: ...`` line; DVC adds
    ``ERROR: failed to reproduce ...``. A crash leaves a traceback, whose tail is kept.
    """
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if errors:
        return "\n".join(errors)
    return "\n".join(lines[-ERROR_TAIL_LINES:]).strip() or "(no error output)"


class _StageProcesses:
    """The stage processes this process is running, so that stopping the pipeline stops them.

    Why: a SIGTERM (Prefect cancelling a deployment's run, systemd, ``kill``) reaches only
    the pipeline process, and the stages are waited on in worker threads; without this the
    pipeline would wait for every running stage to finish before it exits. Each stage runs
    in its own process group, so DVC and the stage command under it are signalled together.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen[str]] = {}
        self.stopping = threading.Event()

    def start(self, stage: str, cmd: list[str], root: Path, env: Mapping[str, str]
              ) -> subprocess.Popen[str]:
        with self._lock:  # no new process once stopping has begun
            if self.stopping.is_set():
                raise StageInterrupted(stage)
            proc = subprocess.Popen(cmd, cwd=root, env=dict(env), stderr=subprocess.PIPE,
                                    text=True, errors="replace", bufsize=1, process_group=0)
            self._procs[stage] = proc
            return proc

    def done(self, stage: str) -> None:
        with self._lock:
            self._procs.pop(stage, None)

    def stop(self, grace: float) -> list[str]:
        """SIGTERM every running stage's process group; SIGKILL what is left after ``grace`` s.

        Returns:
            The stages that were running.
        """
        with self._lock:
            self.stopping.set()
            procs = dict(self._procs)
        for proc in procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        return list(procs)


def _signal_group(proc: subprocess.Popen[str], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signum)


_RUNNING = _StageProcesses()


def begin_stages() -> None:
    """Start of a pipeline run: stage processes may start (again, after an earlier stop)."""
    _RUNNING.stopping.clear()


def stop_stages(grace: float = 30.0) -> list[str]:
    """Terminate the running stage processes and let no new one start (pipeline stopping).

    Returns:
        The stages that were running.
    """
    return _RUNNING.stop(grace)


def stopping() -> bool:
    """Whether the pipeline is stopping (no retry of a terminated stage)."""
    return _RUNNING.stopping.is_set()


def run_stage_process(stage: str, root: Path, env: Mapping[str, str], force: bool = False
                      ) -> StageRun:
    """Run ``stage`` in its own process, streaming its output to this terminal.

    stdout is inherited, so Rich progress bars draw on the real terminal; stderr is relayed
    line by line and its tail kept, so a failure is reported with the stage's own words.

    Raises:
        StageFailed: the stage process exited non-zero.
        StageInterrupted: the pipeline is stopping (see :func:`stop_stages`).
    """
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=400)
    proc = _RUNNING.start(stage, stage_command(stage, force), root, env)

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    except BaseException:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
        raise
    finally:
        _RUNNING.done(stage)
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    if returncode != 0:
        if stopping():
            raise StageInterrupted(stage)
        raise StageFailed(stage, returncode, _error_text(list(tail)))
    return StageRun(stage=stage, seconds=seconds, returncode=returncode)


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def stage_env(parent_run_id: str | None, base: Mapping[str, str] | None = None,
              threads: int | None = None) -> dict[str, str]:
    """The environment of a stage process: ours plus the parent MLflow run to nest under.

    Args:
        parent_run_id: the pipeline's MLflow run, which the stage's run nests under.
        base: the environment to start from (default: this process's).
        threads: CPU threads for the stage's numeric libraries (torch reads
            OMP_NUM_THREADS), when stages share the machine; a value the user set wins.
    """
    from tasks.common.tracking import PARENT_ENV

    env = dict(os.environ if base is None else base)
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    if threads:
        for var in THREAD_VARS:
            env.setdefault(var, str(threads))
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env

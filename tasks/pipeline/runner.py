"""Run one stage as its own process (``dvc repro --single-item``) and keep its error.

Why a process per stage: each stage is then its own Prefect flow run and MLflow run, DVC
records its dvc.lock entry exactly as ``dvc repro`` would, and Lightning's DDP launcher can
re-run the stage's command for the other ranks.
"""

from __future__ import annotations

import os
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


@dataclass(frozen=True)
class StageRun:
    """How one stage process went."""

    stage: str
    seconds: float
    returncode: int


def stage_command(stage: str, force: bool) -> list[str]:
    """The command that runs exactly one stage, DVC-recorded (dvc.lock, cache, run cache)."""
    dvc = Path(sys.executable).with_name("dvc")
    exe = [str(dvc)] if dvc.exists() else [sys.executable, "-m", "dvc"]
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


def run_stage_process(stage: str, root: Path, env: Mapping[str, str], force: bool = False
                      ) -> StageRun:
    """Run ``stage`` in its own process, streaming its output to this terminal.

    stdout is inherited, so Rich progress bars draw on the real terminal; stderr is relayed
    line by line and its tail kept, so a failure is reported with the stage's own words.

    Raises:
        StageFailed: the stage process exited non-zero.
    """
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(stage_command(stage, force), cwd=root, env=dict(env),
                            stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)

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
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    reader.join(timeout=10)
    seconds = time.perf_counter() - started
    if returncode != 0:
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

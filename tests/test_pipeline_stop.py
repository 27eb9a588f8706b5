"""Stopping the pipeline stops its stage processes: DVC and the stage command under it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flows.orchestration.runner import (
    StageInterrupted,
    begin_stages,
    run_stage_process,
    stop_stages,
)

BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project whose one stage runs (a Python child that sleeps) until stopped."""
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  slow:\n"
        f"    cmd: {sys.executable} -c \"import time; open('started', 'w').close(); "
        "time.sleep(300)\"\n"
        "    outs: [out.txt]\n")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, env=env)
    return tmp_path


def test_stop_terminates_a_running_stage_and_lets_no_new_one_start(project: Path) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    begin_stages()
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            run_stage_process("slow", project, env)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while not (project / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (project / "started").exists(), "the stage command never started"
    sleeping = [p for p in psutil.process_iter(["cmdline"])
                if "time.sleep(300)" in " ".join(p.info["cmdline"] or [])]
    assert sleeping, "the stage command's process was not found"

    started = time.monotonic()
    assert stop_stages(grace=20) == ["slow"]
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert time.monotonic() - started < 25
    assert isinstance(outcome["error"], StageInterrupted)
    gone, alive = psutil.wait_procs(sleeping, timeout=10)
    assert not alive, "the stage command outlived the stop"
    assert not (project / "dvc.lock").exists()  # DVC recorded nothing

    with pytest.raises(StageInterrupted):  # stopping: no new stage process
        run_stage_process("slow", project, env)
    begin_stages()  # the next pipeline run may start stages again

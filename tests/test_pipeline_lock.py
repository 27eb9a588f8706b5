"""The project lock of `synthdx run`: one run at a time per folder, with a clear refusal.

The lock module is exercised with real processes (a holder in a subprocess, the contender
here), and `synthdx run` itself is refused while this test holds the lock of a small project.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.orchestration.dag import PipelineError
from flows.orchestration.lock import (
    HOLDER_NAME,
    LOCKED_EXIT_CODE,
    ProjectLocked,
    lock_path,
    project_lock,
    read_holder,
)
from tests.conftest import REPO

BIN = Path(sys.executable).parent
SYNTHDX = str(BIN / "synthdx")

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flows.orchestration.lock import project_lock
    root, seconds, log = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    wait = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    with project_lock(root, wait=wait, command="holder"):
        with open(log, "a") as f:
            f.write(f"start {sys.argv[5] if len(sys.argv) > 5 else ''}\\n")
        print("locked", flush=True)
        time.sleep(seconds)
        with open(log, "a") as f:
            f.write(f"end {sys.argv[5] if len(sys.argv) > 5 else ''}\\n")
""")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_"))}
    env.update(PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1")
    return env


def _holder(root: Path, seconds: float, log: Path, *extra: str) -> subprocess.Popen:
    """A process that takes the lock, prints "locked", holds it ``seconds`` and exits."""
    return subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds), str(log),
                             *extra], stdout=subprocess.PIPE, text=True, env=_env())


def _wait_locked(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked", "the holder did not take the lock"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    return tmp_path


@pytest.fixture
def holder(root: Path, tmp_path: Path):
    proc = _holder(root, 60, tmp_path / "holder.log")
    _wait_locked(proc)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_second_run_is_refused_with_who_holds_the_lock(root, holder):
    started = time.monotonic()
    with pytest.raises(ProjectLocked) as info, project_lock(root):
        pytest.fail("the lock was taken twice")
    assert time.monotonic() - started < 2  # refused at once, not after a wait
    message = str(info.value)
    path = root / ".dvc" / "tmp" / "synthdx-run.lock"
    assert message.startswith(f"another synthdx run (pid {holder.pid} on host ")
    assert ", started 20" in message
    assert f"holds the project lock {path}; wait for it to finish or pass --wait" in message
    assert info.value.holder is not None and info.value.holder.command == "holder"


def test_waiting_run_gets_the_lock_when_the_holder_finishes(root, tmp_path):
    proc = _holder(root, 1.5, tmp_path / "holder.log")
    _wait_locked(proc)
    told: list[str] = []
    started = time.monotonic()
    with project_lock(root, wait=30, on_wait=told.append) as me:
        waited = time.monotonic() - started
        assert proc.wait(timeout=30) == 0
        assert me.pid == os.getpid()
        assert read_holder(lock_path(root)) == me
    assert 0.5 < waited < 20
    assert len(told) == 1 and f"(pid {proc.pid} on host " in told[0]
    assert told[0].endswith("waiting up to 30 s")
    assert not (root / ".dvc" / "tmp" / HOLDER_NAME).exists()  # cleaned up on release


def test_wait_gives_up_and_says_how_long_it_waited(root, holder):
    with pytest.raises(ProjectLocked, match=r"\(waited 0\.5 s\); wait for it"), \
            project_lock(root, wait=0.5):
        pytest.fail("the lock was taken twice")


def test_lock_of_a_killed_run_does_not_block_the_next(root, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    stale = read_holder(lock_path(root))
    assert stale is not None and stale.pid == holder.pid  # its note is left behind ...
    with project_lock(root) as me:  # ... but the kernel released its lock
        assert read_holder(lock_path(root)) == me


def test_concurrent_runs_take_turns_and_never_overlap(root, tmp_path):
    log = tmp_path / "turns.log"
    procs = [_holder(root, 0.7, log, "30", name) for name in ("a", "b", "c")]
    for proc in procs:
        _wait_locked(proc)  # each gets the lock in its turn
    assert all(p.wait(timeout=60) == 0 for p in procs)
    lines = log.read_text().split()
    pairs = [lines[i:i + 4] for i in range(0, len(lines), 4)]
    assert len(pairs) == 3
    for start, a, end, b in pairs:  # start x, end x: nobody started in between
        assert (start, end) == ("start", "end") and a == b


def test_the_same_process_may_enter_again(root, tmp_path):
    with project_lock(root) as outer, project_lock(root) as inner:
        assert inner == outer
    proc = _holder(root, 0, tmp_path / "after.log")  # released: another process gets it
    _wait_locked(proc)
    assert proc.wait(timeout=30) == 0


def test_a_folder_without_dvc_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="is not a DVC project"), project_lock(tmp_path):
        pytest.fail("locked a folder that is not a project")
    assert not (tmp_path / ".dvc").exists()


def tiny_project(root: Path) -> tuple[Path, dict[str, str]]:
    """A DVC project with this repository's dvc.yaml and params (no data, no git)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "profiles", root / "profiles")
    env = _env()
    env.pop("PYTHONPATH")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "labels.csv").write_text("from an earlier run\n")
    return root, env


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of the project except DVC's scratch folder, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".dvc/tmp" not in str(p.relative_to(root))}


def test_synthdx_run_is_refused_while_another_run_holds_the_project(tmp_path):
    root, env = tiny_project(tmp_path / "proj")
    before = snapshot(root)
    with project_lock(root, command="synthdx run (the test)") as me:
        out = subprocess.run([SYNTHDX, "run", "--only", "phantom", "--profile", "tiny"],
                             cwd=root, env=env, capture_output=True, text=True, timeout=300)
        waited = subprocess.run([SYNTHDX, "run", "--only", "phantom", "--wait", "1"],
                                cwd=root, env=env, capture_output=True, text=True,
                                timeout=300)
    assert out.returncode == LOCKED_EXIT_CODE, out.stderr
    lock = root / ".dvc" / "tmp" / "synthdx-run.lock"
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: another synthdx run ({me.describe()}) holds the project lock {lock}; "
        "wait for it to finish or pass --wait SECONDS")
    assert "Traceback" not in out.stderr
    assert waited.returncode == LOCKED_EXIT_CODE, waited.stderr
    assert f"holds the project lock {lock}; waiting up to 1 s" in waited.stderr
    assert "(waited 1 s); wait for it to finish" in waited.stderr
    # Nothing was touched: not params.yaml (the profile), not the outputs, no Prefect state.
    assert snapshot(root) == before
    assert not (root / ".prefect").exists() and not (root / "mlflow.db").exists()

"""The DVC command a pipeline stage runs under: DVC's own output, without its git advice.

``dvc repro`` ends with "To track the changes with git, run: ..." in a project without
``core.autostage``; ``synthdx run`` runs it once per stage, so that advice used to come after
every stage. The stage command keeps everything else DVC prints, and DVC's errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.orchestration.runner import stage_command

BIN = Path(sys.executable).parent


def _project(root: Path) -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    root.mkdir()
    (root / "dvc.yaml").write_text("stages:\n  hello:\n    cmd: echo hi > hello.txt\n"
                                   "    outs: [hello.txt]\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                ["git", "config", "user.name", "t"], [str(BIN / "dvc"), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


def test_stage_command_prints_no_git_advice_and_keeps_dvc_errors(tmp_path: Path):
    root = tmp_path / "proj"
    env = _project(root)

    ran = subprocess.run(stage_command("hello", force=False), cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)

    assert ran.returncode == 0, ran.stdout + ran.stderr
    console = ran.stdout + ran.stderr
    assert "Running stage 'hello'" in console and (root / "dvc.lock").is_file()
    assert "To track the changes with git" not in console
    assert "core.autostage" not in console
    assert "dvc push" not in console  # DVC's per-run push advice, once per stage
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, env=env,
                            capture_output=True, text=True).stdout
    assert "?? dvc.lock" in status  # left for the user to commit: no autostage configured

    missing = subprocess.run(stage_command("nosuch", force=False), cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "'nosuch' not found" in missing.stderr

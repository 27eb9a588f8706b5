"""Shared fixtures: one Prefect test server per session, isolated MLflow stores, tiny data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
BIN = Path(sys.executable).parent


def diffusion_module(spec: Any, **overrides: Any) -> Any:
    """A ``DiffusionModule`` with params.yaml's diffusion settings, overridden for a test.

    Why: the module's constructor has no defaults for settings (the configuration is their
    one place), so a test's small module starts from the configuration's values. The unit
    tests of the network's arithmetic are written for the plainest model (no patch folding,
    epsilon prediction, linear intensity, uniform loss): those are pinned here, and a test of
    one of them sets it itself.
    """
    from models.diffusion import DiffusionModule
    from tasks.config import DiffusionConfig
    from tasks.diffusion.train import module_args

    plain = {"patch_size": 1, "prediction_type": "epsilon", "intensity_transform": "linear",
             "loss_weighting": "uniform", "min_lr_ratio": 0.05}
    return DiffusionModule(spec, **{**module_args(DiffusionConfig()), **plain, **overrides})


def make_project(root: Path, env: Mapping[str, str],
                 edit_params: Callable[[dict[str, Any]], None]) -> None:
    """A fresh git + DVC project in ``root`` holding this checkout's code and parameters.

    ``edit_params`` adjusts params.yaml before the first commit (the classifier matrix comes
    from it, so a test cuts it there). Used by the end-to-end and team-server tests.
    """
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "params.yaml", "prefect.yaml"):
        shutil.copy(REPO / name, root / name)
    for folder in ("tasks", "models", "profiles", "flows"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    edit_params(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                ["git", "config", "user.name", "t"], [str(BIN / "dvc"), "init", "-q"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        proc = subprocess.run(cmd, cwd=root, env=dict(env), capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (it takes 10-20 s to start)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        # Configure Prefect's console logging now, on the session's stderr: otherwise the first
        # flow run inside typer's CliRunner binds it to that runner's stream, which is closed
        # when the call returns, and every later flow run's log call fails.
        ensure_logging_setup()
        yield


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private SQLite tracking store per test, set the way a team sets a server."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("SYNTHDX_PARENT_RUN_ID", raising=False)
    return uri


def tiny_overrides(out: Path, patients: int = 16, seed: int = 5) -> list[str]:
    """Parameter overrides for a small, fast phantom (quarter-resolution matrix)."""
    return [f"phantom.output={out}", f"phantom.patients={patients}", f"phantom.seed={seed}",
            "phantom.rows=512", "phantom.cols=128", "phantom.workers=1"]


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom archive (all five sites, every transfer syntax), made once."""
    from tasks.config import load_config
    from tasks.phantom.generate import generate_phantom

    out = tmp_path_factory.mktemp("phantom") / "raw"
    cfg = load_config(PARAMS, tiny_overrides(out, patients=20))
    generate_phantom(cfg.phantom)
    return out


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up costs more than it saves, and much more on a busy host."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_user_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests decide themselves whether a pseudonymisation key is set."""
    monkeypatch.delenv(os.environ.get("SYNTHDX_KEY_ENV", "SYNTHDX_PSEUDONYM_KEY"), raising=False)

"""The DVC pipeline as a user runs it: `dvc repro ingest` in a fresh repository, then again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_dvc_yaml_declares_phantom_and_ingest():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert spec["phantom"]["outs"] == ["data/raw", "data/truth"]  # truth: the finding masks
    assert {"data/raw", "data/truth"} <= set(spec["ingest"]["deps"])
    # Persisted: DVC must not delete the last dataset before a night links its shards.
    assert spec["ingest"]["outs"] == [{"data/processed": {"persist": True}}]
    assert spec["ingest"]["params"] == ["profile", "ingest"]
    order = ["phantom", "ingest", "train_diffusion", "synthesize", "audit"]
    assert [name for name in spec if name != "drift"][:5] == order  # drift: beside them
    for before, after in zip(order[1:-1], order[2:], strict=True):
        out = spec[before]["outs"][0]
        out = out if isinstance(out, str) else next(iter(out))  # {path: {options}}
        assert out in spec[after]["deps"]  # the DAG is declared by files
    assert "reports/audit_metrics.json" in str(spec["audit"]["metrics"])


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC project with this repository's code and a tiny parameter set."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    for folder in ("tasks", "models", "profiles"):
        shutil.copytree(REPO / folder, root / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["phantom"].update(patients=12, rows=512, cols=128, workers=1)
    params["ingest"]["workers"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PREFECT_HOME": str(root / ".prefect"), "DVC_NO_ANALYTICS": "1"}
    env.pop("SYNTHDX_PSEUDONYM_KEY", None)
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                ["git", "config", "user.name", "t"], [str(BIN / "dvc"), "init", "-q"]):
        _run(cmd, root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    return root, env


def test_dvc_repro_builds_both_stages_then_does_nothing(project):
    root, env = project
    dvc = str(BIN / "dvc")
    first = _run([dvc, "repro", "ingest"], root, env)
    assert "Running stage 'phantom'" in first.stdout
    assert "Running stage 'ingest'" in first.stdout
    assert (root / "data/processed/manifest.parquet").is_file()
    assert (root / "dvc.lock").is_file()
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"phantom", "ingest"}
    second = _run([dvc, "repro", "ingest"], root, env)
    assert "Running stage" not in second.stdout
    status = _run([dvc, "status", "ingest"], root, env)
    assert "up to date" in status.stdout.lower()


def test_dvc_yaml_runs_one_classifier_stage_per_task_and_regime():
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    stage = spec["train_classifier"]
    assert stage["matrix"] == {"task": "${classifier.tasks}", "regime": "${classifier.regimes}"}
    assert stage["outs"] == ["data/classifiers/${item.task}/${item.regime}"]
    assert {"data/processed", "data/audit"} <= set(stage["deps"])
    assert "data/classifiers" in spec["validate"]["deps"]
    assert "reports/validation_metrics.json" in str(spec["validate"]["metrics"])
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1"}
    listed = _run([str(BIN / "dvc"), "stage", "list", "--name-only"], REPO, env).stdout.split()
    params = yaml.safe_load((REPO / "params.yaml").read_text())["classifier"]
    expected = {f"train_classifier@{t}-{r}" for t in params["tasks"] for r in params["regimes"]}
    assert expected <= set(listed)
    assert listed[-1] == "validate"


def test_dvc_push_and_pull_restore_the_data_from_the_remote(project, tmp_path):
    root, env = project
    dvc = str(BIN / "dvc")
    _run([dvc, "repro", "phantom"], root, env)
    remote = tmp_path / "remote"
    _run([dvc, "remote", "add", "-f", "-d", "team", str(remote)], root, env)
    _run([dvc, "push", "phantom"], root, env)
    assert any(remote.rglob("*")), "nothing pushed"
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache")
    _run([dvc, "pull", "phantom"], root, env)
    assert (root / "data/raw/labels.csv").is_file()
    status = _run([dvc, "status", "phantom"], root, env)
    assert "up to date" in status.stdout.lower()

"""`synthdx init`: a project for one's own archive, as the README's "Your own archive" runs it.

The archive is the session's tiny phantom copied to another folder the way a PACS export
looks: sub-folders, spaces and non-ASCII characters in names, foreign files, the labels file
inside it under its own name. The project runs its pipeline's first two stages through
`synthdx run` (ingest from the archive in place, then diffusion training on what it wrote;
the later stages run on any processed dataset and are covered by tests/test_pipeline_e2e.py);
DVC sees a new study in the archive; the key stays outside; bad input is refused with nothing
created.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

BIN = Path(sys.executable).parent
SYNTHDX = str(BIN / "synthdx")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, tiny_phantom: Path) -> Path:
    """The tiny phantom as an export: `Année 2026 — Üsers/<site> scans/...`, foreign files."""
    root = tmp_path_factory.mktemp("pacs") / "PACS export"
    for site in sorted(p for p in (tiny_phantom / "dicom").iterdir() if p.is_dir()):
        shutil.copytree(site, root / "Année 2026 — Üsers" / f"{site.name} scans")
    shutil.copy(tiny_phantom / "labels.csv", root / "étiquettes des études.csv")
    (root / "Année 2026 — Üsers" / "LISEZ-MOI.txt").write_text("export du 7 décembre\n")
    (root / "Thumbs.db").write_bytes(os.urandom(512))
    (root / "Année 2026 — Üsers" / "DICOMDIR").write_bytes(b"\0" * 200)
    return root


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HOME=str(home))
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_init_then_run_ingests_the_archive_in_place(archive: Path, tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = _env(home)
    labels = archive / "étiquettes des études.csv"
    init = _run([SYNTHDX, "init", "hospital", "--archive", str(archive), "--labels",
                 str(labels), "--profile", "tiny"], work, env)
    project = work / "hospital"
    key_file = home / ".config" / "synthdx" / "hospital.key"
    assert f"generated into {key_file}" in init.stdout and "next: cd" in init.stdout
    assert key_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    key = key_file.read_text().strip()
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    assert "phantom" not in spec["stages"]
    assert spec["stages"]["ingest"]["deps"][:2] == [str(archive), str(labels)]
    assert not subprocess.run(["git", "status", "--porcelain"], cwd=project,
                              capture_output=True, text=True, check=True).stdout

    out = _run([SYNTHDX, "run", "--only", "ingest", "--only", "train_diffusion"], project, env)
    assert "pipeline: ingest runs" in out.stdout and "pipeline: train_diffusion runs" in out.stdout
    report = json.loads((project / "data/processed/ingest_report.json").read_text())
    assert report["files_total"] == 21 + 3 and report["quarantined_count"] == 3
    assert report["labels"]["rows_without_image"] == 0
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    archive_dep = next(d for d in lock["ingest"]["deps"] if d["path"] == str(archive))
    # The archive version: DVC's hash in dvc.lock = the report's = the ingest run's tag =
    # the pipeline run's lineage tag.
    assert archive_dep["md5"] == report["archive"]["dvc_hash"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("synthdx").experiment_id])
    ingest_run = next(r for r in runs if r.data.tags.get("synthdx.stage") == "ingest")
    parent = next(r for r in runs if r.data.tags.get("synthdx.stage") == "pipeline")
    assert ingest_run.data.tags["synthdx.archive_digest"] == archive_dep["md5"]
    assert archive_dep["md5"] in parent.data.tags.values()
    assert ingest_run.data.params["ingest.key_file"] == str(key_file)

    # The key never entered the project (git, DVC cache, data, MLflow) nor the output.
    leaks = [p for p in project.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=project, capture_output=True,
                             text=True, check=True).stdout
    assert not leaks and key not in history + out.stdout + out.stderr + init.stdout

    # A new study in the archive: DVC sees the stage changed.
    first = next((archive / "Année 2026 — Üsers" / "coastal scans").rglob("*.dcm"))
    new = archive / "Année 2026 — Üsers" / "nachträglich" / "neu.dcm"
    new.parent.mkdir()
    shutil.copy(first, new)
    try:
        status = _run([str(BIN / "dvc"), "status", "ingest"], project, env)
        assert "changed deps" in status.stdout and str(archive) in status.stdout
    finally:
        shutil.rmtree(new.parent)


def _refused(args: list[str], cwd: Path, *expected: str) -> str:
    here = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, ["init", *args])
    finally:
        os.chdir(here)
    assert result.exit_code == 1, result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def test_bad_input_is_refused_naming_the_path_and_nothing_is_created(
        archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    labels = archive / "étiquettes des études.csv"
    key = tmp_path / "keys" / "k.key"
    common = ["--key-file", str(key)]
    _refused(["p1", "--archive", str(tmp_path / "nowhere"), "--labels", str(labels), *common],
             tmp_path, f"archive {tmp_path / 'nowhere'} does not exist")
    _refused(["p2", "--archive", str(labels), "--labels", str(labels), *common],
             tmp_path, f"archive {labels} is not a folder")
    empty = tmp_path / "empty archive"
    empty.mkdir()
    _refused(["p3", "--archive", str(empty), "--labels", str(labels), *common],
             tmp_path, f"archive {empty} holds no files")
    _refused(["p4", "--archive", str(archive), "--labels", str(tmp_path / "no.csv"), *common],
             tmp_path, f"labels file {tmp_path / 'no.csv'} does not exist")
    wrong = tmp_path / "wrong columns.csv"
    wrong.write_text("StudyUID,Patient,Site,grade,mets\n1.2.3,A,x,0,0\n")
    _refused(["p5", "--archive", str(archive), "--labels", str(wrong), *common],
             tmp_path, f"labels file {wrong} has no column 'study_uid'")
    other = tmp_path / "other archive.csv"
    other.write_text("study_uid,patient_id,site,perugini_grade,metastasis\n"
                     "1.2.3.4,A1,aurelia,0,0\n1.2.3.5,A2,aurelia,1,1\n")
    _refused(["p6", "--archive", str(archive), "--labels", str(other), *common],
             tmp_path, f"labels file {other} names no study of the archive {archive}")
    existing = tmp_path / "existing"
    (existing / ".dvc").mkdir(parents=True)
    (existing / "dvc.yaml").write_text("stages: {}\n")
    _refused(["existing", "--archive", str(archive), "--labels", str(labels), *common],
             tmp_path, f"{existing} already holds a project (found .dvc, dvc.yaml)")
    _refused(["p7", "--archive", str(archive), "--labels", str(labels), "--key-file",
              str(tmp_path / "p7" / "in.key")], tmp_path, "must be outside the project")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "empty archive", "existing", "other archive.csv", "wrong columns.csv"]
    assert sorted(p.name for p in existing.iterdir()) == [".dvc", "dvc.yaml"]
    assert not key.exists() and not (tmp_path / "home").exists()

"""Three nights of a hospital's project, each a run of the `nightly` deployment by a worker.

A phantom archive written to its own folder is the hospital's PACS export; `synthdx init`
makes the project (tiny profile, cut to one task, one regime, one seed and a few steps). A
Prefect process worker polls the project's pool, and each night is `run_deployment("pipeline/
nightly")`, not a function call:

1. night 1 builds everything: the first classifier is promoted ("no champion yet") and the
   drift stage says it has no reference;
2. the archive grows by about 5 % (new studies of the same sites): ingest reuses every old
   file, every stage after it reruns, and the new classifier is compared with the champion:
   promoted or kept as challenger, with the reason, in the registry and the Prefect artifact;
3. northgate, an external site, starts sending studies from a new camera: the drift table
   flags it by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import PARAMS

BIN = Path(sys.executable).parent
SYNTHDX = str(BIN / "synthdx")
SEED = 4100
NEW_CAMERA = {"manufacturer": "Philips", "model": "Forte", "pixel_mm": 3.2,
              "counts_millions": 0.7, "intensity_scale": 2.0, "transfer_syntax": "explicit_le"}
FAST = {  # the tiny profile cut to what a night needs to exercise every stage
    "diffusion": {"max_steps": 4, "warmup_steps": 1, "checkpoint_every_n_steps": 4,
                  "log_every_n_steps": 2},
    "synthesize": {"groups": [
        {"name": "normal", "count": 4, "condition": {"perugini_grade": 0, "metastasis": False}},
        {"name": "metastasis", "count": 4,
         "condition": {"perugini_grade": 0, "metastasis": True}}]},
    "audit": {"encoder": {"epochs": 1}, "tstr": {"steps": 0}, "pixel_critic_steps": 0,
              "two_sample_folds": 2, "msssim_pairs": 4},
    "classifier": {"seeds": [0], "max_steps": 10, "val_every_n_steps": 5, "warmup_steps": 2},
}


def _phantom(out: Path, patients: int, seed: int, sites: list | None = None) -> Path:
    """A phantom archive (dicom/ + labels.csv) in ``out``; ``sites`` replaces the site list."""
    from tasks.config import load_config
    from tasks.phantom.generate import generate_phantom

    cfg = load_config(PARAMS, [f"phantom.output={out}", f"phantom.patients={patients}",
                               f"phantom.seed={seed}", "phantom.rows=512", "phantom.cols=128",
                               "phantom.workers=1", "phantom.truth_folder=null"]).phantom
    if sites is not None:
        cfg.sites = sites
    generate_phantom(cfg)
    return out


def _add_night(archive: Path, labels: Path, generated: Path, folder: str) -> int:
    """Copy a generated phantom's studies into the archive and its rows into the labels file."""
    shutil.copytree(generated / "dicom", archive / folder)
    rows = pd.read_csv(generated / "labels.csv", dtype=str, keep_default_na=False)
    old = pd.read_csv(labels, dtype=str, keep_default_na=False)
    pd.concat([old, rows]).to_csv(labels, index=False)
    return len(rows)


def _known_sites(n: int) -> list:
    """The first ``n`` sites as they are (fewer patients than sites would leave one empty)."""
    from tasks.config import load_config

    return list(load_config(PARAMS).phantom.sites[:n])


def _new_camera_sites() -> list:
    """aurelia as it is, and northgate with a new camera: most new studies are northgate's."""
    from tasks.config import load_config

    sites = {s.name: s for s in load_config(PARAMS).phantom.sites}
    northgate = sites["northgate"]
    camera = northgate.camera.model_copy(update=NEW_CAMERA)
    return [sites["aurelia"].model_copy(update={"share": 1.0}),
            northgate.model_copy(update={"camera": camera, "share": 9.0})]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HOME=str(home),
               # the user's matplotlib cache: a fresh HOME would rebuild the font cache
               MPLCONFIGDIR=os.environ.get("MPLCONFIGDIR",
                                           str(Path.home() / ".config" / "matplotlib")))
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _make_project(tmp: Path, env: dict[str, str]) -> tuple[Path, Path, Path]:
    archive, labels = tmp / "PACS export", tmp / "labels" / "studies.csv"
    first = _phantom(tmp / "gen1", patients=60, seed=SEED)
    shutil.copytree(first / "dicom", archive / "night 1")
    labels.parent.mkdir()
    shutil.copy(first / "labels.csv", labels)
    _run([SYNTHDX, "init", "hospital", "--archive", str(archive), "--labels", str(labels),
          "--profile", "tiny", "--internal-site", "aurelia"], tmp, env)
    project = tmp / "hospital"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["classifier"].update(tasks=["metastasis"], regimes=["real"])
    params["validation"]["comparisons"] = []
    params["pipeline"].update(retries=0)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tiny = yaml.safe_load((project / "profiles/tiny.yaml").read_text())
    for section, values in FAST.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(tiny[section].get(key), dict):
                tiny[section][key] = {**tiny[section][key], **value}
            else:
                tiny[section][key] = value
    (project / "profiles/tiny.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qam",
          "one task, one regime, a few steps"], project, env)
    return project, archive, labels


@contextlib.contextmanager
def _worker(project: Path, env: dict[str, str], log: Path):
    """A process worker on the project's CPU pool, for the duration of the block."""
    from prefect.settings import PREFECT_API_URL

    from flows.deploy import apply_deployments
    from tests.test_prefect_deployments import _create_work_pools

    _create_work_pools()
    apply_deployments(project / "prefect.yaml", project, names=["nightly"])
    worker_env = {**env, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                  "PREFECT_HOME": str(project.parent / "prefect-home"),
                  "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool",
                                 "synthdx-cpu", "--type", "process", "--limit", "1"],
                                cwd=project, env=worker_env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _night(log: Path) -> str:
    """Run the `nightly` deployment through the worker; return the run's pipeline artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    started = time.monotonic()
    run = run_deployment("pipeline/nightly", timeout=3600, poll_interval=1, as_subflow=False)
    assert run.state is not None and run.state.is_completed(), (
        f"nightly run {run.name}: {run.state}\n{log.read_text()[-6000:]}")
    print(f"night: {time.monotonic() - started:.0f} s")
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    pipeline = [a for a in artifacts if a.key == "synthdx-pipeline"]
    assert len(pipeline) == 1, [a.key for a in artifacts]
    return str(pipeline[0].data)


def _mlflow(project: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _stage_runs(project: Path, stage: str) -> list:
    client = _mlflow(project)
    experiment = client.get_experiment_by_name("synthdx").experiment_id
    return client.search_runs([experiment], f"tags.`synthdx.stage` = '{stage}'",
                              order_by=["attributes.start_time DESC"])


@pytest.mark.slow
def test_three_nights_of_a_growing_archive(prefect_harness, tmp_path: Path) -> None:
    """Faster tests cover each piece: tests/test_promotion.py (the gates, the registry, the
    validate stage), tests/test_drift.py (the drift stage, the reference, the summary),
    tests/test_ingest_incremental.py and tests/test_init_archive.py (init, incremental ingest),
    tests/test_prefect_deployments.py (the deployments); this one runs them together, night
    after night, through a worker."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    project, archive, labels = _make_project(tmp_path, env)
    name = "synthdx-classifier-metastasis"
    registry = _mlflow(project)
    with _worker(project, env, tmp_path / "worker.log"):
        # Night 1: everything is built; the first model is the champion; no drift reference.
        artifact = _night(tmp_path / "worker.log")
        assert "no champion yet" in artifact and "Reference: none" in artifact
        assert "generator: promoted synthdx-bone-scan-diffusion v1: no champion yet" in artifact
        promotion = json.loads((project / "reports/promotion.json").read_text())
        assert promotion["tasks"]["metastasis"]["decision"] == "promoted"
        first = registry.get_model_version_by_alias(name, "champion")
        assert first.tags["drift_reference"].endswith("/drift_reference")
        drift = json.loads((project / "reports/drift.json").read_text())
        assert drift["reference"] is None and drift["flagged"] == []

        # Night 2: about 5 % new studies; only they are read; the new model meets the champion.
        studies = len(pd.read_csv(labels))
        added = _add_night(archive, labels, _phantom(tmp_path / "gen2", 3, SEED + 1,
                                                     _known_sites(3)), "night 2")
        assert 0.03 <= added / studies <= 0.08
        artifact = _night(tmp_path / "worker.log")
        ingest = _stage_runs(project, "ingest")[0].data.metrics
        assert ingest["files_reused"] == studies and ingest["files_total"] == studies + added
        decision = json.loads((project / "reports/promotion.json").read_text())["tasks"][
            "metastasis"]
        assert decision["decision"] in ("promoted", "challenger") and decision["reason"]
        assert decision["champion"] == {"version": str(first.version)}
        assert f"metastasis: {decision['decision']} {name} v{decision['version']}: " \
               f"{decision['reason']}" in artifact
        alias = "champion" if decision["decision"] == "promoted" else "challenger"
        second = registry.get_model_version_by_alias(name, alias)
        assert str(second.version) == decision["version"] != str(first.version)
        assert second.tags["promotion"] == decision["decision"]
        assert second.tags["promotion_reason"] == decision["reason"][:4900]
        if alias == "challenger":
            assert registry.get_model_version_by_alias(name, "champion").version == \
                first.version  # the champion stays
        gate = json.loads((project / "data/audit/audit.json").read_text())["generator_gate"]
        assert gate["decision"] in ("promoted", "challenger") and gate["champion_version"] == "1"
        assert f"generator: {gate['decision']} synthdx-bone-scan-diffusion v2: " in artifact
        drift = json.loads((project / "reports/drift.json").read_text())
        assert drift["reference"]["version"] == str(first.version)
        assert drift["flagged"] == [] and sum(s["n_new"] for s in drift["sites"]) == added

        # Night 3: a new camera at northgate (external): drift names the site and the camera.
        _add_night(archive, labels, _phantom(tmp_path / "gen3", 10, SEED + 2,
                                             _new_camera_sites()), "night 3")
        artifact = _night(tmp_path / "worker.log")
    drift = json.loads((project / "reports/drift.json").read_text())
    assert "northgate" in drift["flagged"]
    northgate = next(s for s in drift["sites"] if s["site"] == "northgate")
    assert "new camera at northgate: Philips Forte" in northgate["flags"]
    assert "**DRIFT** new camera at northgate: Philips Forte" in artifact
    drift_run = _stage_runs(project, "drift")[0]
    assert "northgate" in drift_run.data.tags["synthdx.drift.flagged"]
    parent = _stage_runs(project, "pipeline")[0]
    assert "northgate" in parent.data.tags["synthdx.drift.flagged"]
    assert parent.data.tags["synthdx.promotion.metastasis"].split(":")[0] in (
        "promoted", "challenger", "kept")

"""`synthdx run` end to end on the tiny profile, in a fresh git + DVC project, as a user runs it.

One project goes through the steps in order (each test builds on the one before): the first
run builds everything under one MLflow parent run; a second run skips every stage; a
classifier parameter reruns only the classifier and validation stages; a stage that fails
once succeeds on its retry; a failing stage stops the pipeline with its own error; a run
terminated mid-stage stops its stages at once; a run killed mid-stage is finished by the next
run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project

BIN = Path(sys.executable).parent
SYNTHDX = str(BIN / "synthdx")
TASKS = ["metastasis"]
REGIMES = ["real", "real+synthetic"]
CLASSIFIER_STAGES = {f"train_classifier@{t}-{r}" for t in TASKS for r in REGIMES}
UPSTREAM = ["phantom", "ingest", "drift", "train_diffusion", "synthesize", "audit"]
ALL_STAGES = {*UPSTREAM, *CLASSIFIER_STAGES, "validate"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], ok: bool = True
         ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    if ok:
        assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _ran(output: str) -> set[str]:
    return set(re.findall(r"^pipeline: (\S+) runs \(", output, flags=re.MULTILINE))


def _skipped(output: str) -> set[str]:
    return set(re.findall(r"^pipeline: (\S+) up to date, skipped", output, flags=re.MULTILINE))


def _set_params(root: Path, **sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _set_cmd(root: Path, stage: str, cmd: str) -> None:
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"][stage]["cmd"] = cmd
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _runs(root: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("synthdx")
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh git + DVC project: this repository's code, the tiny profile, two regimes."""
    root = tmp_path_factory.mktemp("e2e") / "proj"

    def edit(params: dict) -> None:
        # The classifier matrix comes from params.yaml (DVC expands it), so it is cut here.
        params["classifier"].update(tasks=TASKS, regimes=REGIMES)
        params["validation"]["comparisons"] = [["real+synthetic", "real"]]
        params["pipeline"].update(retries=1, retry_delay_seconds=1)

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SYNTHDX_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    make_project(root, env, edit)
    return root, env


def test_first_run_builds_every_stage_under_one_parent_run(project):
    root, env = project
    out = _run([SYNTHDX, "run", "--profile", "tiny"], root, env)
    assert "profile set to tiny" in out.stdout
    assert _ran(out.stdout) == ALL_STAGES
    assert "headline" not in out.stderr.lower()
    assert "To track the changes with git" not in out.stdout + out.stderr  # DVC's advice
    assert "aurelia*" in out.stdout and "report: reports/validation.html" in out.stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == ALL_STAGES
    report = json.loads((root / "reports/validation.json").read_text())
    assert set(report["tasks"]) == set(TASKS)
    assert (root / "reports/validation.html").stat().st_size > 1000

    runs = _runs(root)
    parents = [r for r in runs if r.data.tags.get("synthdx.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    tags = parent.data.tags
    assert tags["synthdx.profile"] == "tiny"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert tags["synthdx.git_commit"].startswith(head)
    for stage in ALL_STAGES:  # the dvc.lock entry of every stage and the digest of its data
        key = "dvc.lock." + stage.replace("@", "/").replace("+", "_plus_")
        assert re.fullmatch(r"[0-9a-f]{16}", tags[key]), key
    assert tags["data.data/raw"] == lock["phantom"]["outs"][0]["md5"]
    assert tags["data.data/processed"] == lock["ingest"]["outs"][0]["md5"]
    assert "aurelia*" in tags["synthdx.headline"]
    assert "auc/metastasis/real/aurelia" in parent.data.metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_stage = {}
    for child in children:
        by_stage.setdefault(child.data.tags["synthdx.stage"], []).append(child)
    assert set(by_stage) == {*UPSTREAM, "train_classifier", "validate"}
    assert len(by_stage["train_classifier"]) == len(CLASSIFIER_STAGES)
    assert all(r.info.status == "FINISHED" for r in [parent, *children])


def test_second_run_skips_every_stage_and_says_so(project):
    root, env = project
    out = _run([SYNTHDX, "run"], root, env)
    assert _ran(out.stdout) == set()
    assert _skipped(out.stdout) == ALL_STAGES
    assert f"all {len(ALL_STAGES)} stages up to date, nothing to run" in out.stdout
    status = _run([SYNTHDX, "status"], root, env)
    assert f"{len(ALL_STAGES)} of {len(ALL_STAGES)} stages up to date" in status.stdout
    assert "aurelia*" in status.stdout


def test_classifier_parameter_reruns_only_classifiers_and_validation(project):
    root, env = project
    _set_params(root, classifier={"lr": 0.002})  # a key the tiny profile does not set
    status = _run([SYNTHDX, "status"], root, env)
    assert "reruns after" in status.stdout  # validate: stale through its upstream
    out = _run([SYNTHDX, "run"], root, env)
    assert _ran(out.stdout) == {*CLASSIFIER_STAGES, "validate"}
    assert _skipped(out.stdout) == set(UPSTREAM)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in CLASSIFIER_STAGES:
        assert lock[stage]["params"]["params.yaml"]["classifier"]["lr"] == 0.002


def test_stage_failing_once_succeeds_on_retry(project):
    root, env = project
    marker = root / "failed-once"
    _set_cmd(root, "validate", f"test -e {marker} || {{ touch {marker}; "
                               "echo 'error: injected failure' >&2; exit 3; }; synthdx validate")
    out = _run([SYNTHDX, "run"], root, env)
    assert marker.exists()
    assert "error: injected failure" in out.stderr
    assert _ran(out.stdout) == {"validate"}
    assert re.search(r"validate\s+ran \([\d.]+ s, 2 attempts\)", out.stdout), out.stdout[-2000:]


def test_failing_stage_stops_the_pipeline_with_its_own_error(project):
    root, env = project
    _set_params(root, pipeline={"retries": 0})
    _set_cmd(root, "validate", "echo 'error: reports/: disk full (injected)' >&2; exit 4")
    out = _run([SYNTHDX, "run"], root, env, ok=False)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()
    assert any(ln.startswith("error: stage validate failed (exit code") for ln in last[-3:])
    assert last[-1] == "error: reports/: disk full (injected)"
    assert "Traceback" not in out.stderr
    _set_cmd(root, "validate", "synthdx validate")
    _set_params(root, pipeline={"retries": 1})


def _start_until_classifier(root: Path, env: dict[str, str], log_name: str
                            ) -> tuple[subprocess.Popen, Path]:
    """Start `synthdx run` (its own session) and return once a classifier stage trains."""
    log_path = root / log_name
    with log_path.open("w") as log:
        proc = subprocess.Popen([SYNTHDX, "run"], cwd=root, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 600
    text = ""
    while time.monotonic() < deadline and proc.poll() is None:
        text = log_path.read_text()
        if "for flow 'train-classifier'" in text or "for flow 'train_classifier'" in text:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the run ended before the classifier stage:\n{text[-3000:]}"
    time.sleep(3)  # inside the stage: training
    return proc, log_path


def test_run_terminated_mid_stage_stops_its_stages_at_once(project):
    """SIGTERM to `synthdx run` alone (as Prefect's cancellation or systemd sends it) stops
    the stage processes it started, says so, and leaves nothing running."""
    import psutil

    root, env = project
    _set_params(root, classifier={"lr": 0.0012})
    proc, log_path = _start_until_classifier(root, env, "terminated.log")
    stage_procs = psutil.Process(proc.pid).children(recursive=True)
    assert any("train-classifier" in " ".join(p.cmdline()) for p in stage_procs)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 143
    assert time.monotonic() - started < 60  # a classifier stage trains for longer
    _, alive = psutil.wait_procs(stage_procs, timeout=15)  # the Prefect server too
    assert not alive, [p.cmdline() for p in alive]
    text = log_path.read_text()
    assert "pipeline: stopping; terminating train_classifier@" in text
    assert "error: synthdx run terminated (SIGTERM)" in text
    parent = max((r for r in _runs(root) if r.data.tags.get("synthdx.stage") == "pipeline"),
                 key=lambda r: r.info.start_time)
    assert parent.info.status == "KILLED"
    assert not (root / ".dvc" / "tmp" / "synthdx-run.json").exists()  # lock released


def test_run_killed_mid_stage_finishes_on_restart(project):
    root, env = project
    _set_params(root, classifier={"lr": 0.0015})
    proc, _ = _start_until_classifier(root, env, "killed.log")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    out = _run([SYNTHDX, "run"], root, env)
    assert _ran(out.stdout) >= {"validate"}
    assert _ran(out.stdout) <= {*CLASSIFIER_STAGES, "validate"}
    status = _run([str(BIN / "dvc"), "status"], root, env)
    assert "up to date" in status.stdout.lower(), status.stdout
    report = json.loads((root / "reports/validation.json").read_text())
    assert {m["regime"] for m in report["tasks"]["metastasis"]["models"]} == set(REGIMES)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for stage in CLASSIFIER_STAGES:
        assert lock[stage]["params"]["params.yaml"]["classifier"]["lr"] == 0.0015


def test_dvc_experiment_runs_a_variant_and_exp_show_compares_it(project):
    root, env = project
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "baseline"], root, env)
    _run([str(BIN / "dvc"), "exp", "run", "-S", "classifier.lr=0.004"], root, env)
    shown = _run([str(BIN / "dvc"), "exp", "show", "--no-pager", "--csv", "--drop", ".*",
                  "--keep", "Experiment|classifier.lr|auc.metastasis.real.aurelia"], root, env)
    rows = [line.split(",") for line in shown.stdout.strip().splitlines()]
    header, body = rows[0], rows[1:]
    lr = header.index("classifier.lr")
    auc = header.index("auc.metastasis.real.aurelia")
    experiment = [r for r in body if r[0] and r[lr] == "0.004"]
    assert experiment, shown.stdout
    assert 0.0 <= float(experiment[0][auc]) <= 1.0  # its metrics were kept with it
    baseline = [r for r in body if not r[0] and r[lr] == "0.0015"]
    assert baseline and 0.0 <= float(baseline[0][auc]) <= 1.0, shown.stdout

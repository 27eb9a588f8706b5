"""benchmarks/dose_response.py: the grid's DVC commands, and the table and plot from the
experiments' params, metrics and validation reports.

The collect tests feed a hand-made ``dvc exp show --json`` (the structure DVC 3.67 prints) and
validation reports; one slow test runs the real DVC queue on a toy project whose stage writes
the same files as the validate stage, to check the grid syntax and the ``dvc.api`` reading.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPARISON = "real_limited+synthetic_vs_real_limited"


def _module():
    path = REPO / "benchmarks" / "dose_response.py"
    spec = importlib.util.spec_from_file_location("dose_response", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dose_response"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


dr = _module()


# --- queue -----------------------------------------------------------------------------------

def test_queue_commands_are_the_documented_grid() -> None:
    queue, run = dr.queue_commands()
    assert queue == ["dvc", "exp", "run", "--queue",
                     "-S", "classifier.synthetic_per_real=0,1,3,10",
                     "-S", "classifier.limited_fraction=0.05,0.15,0.3",
                     "-S", "classifier.regimes=[real_limited,real_limited+synthetic]",
                     "-S", "validation.comparisons=[[real_limited+synthetic,real_limited]]",
                     "-S", "classifier.registered_model_prefix=null"]
    assert run == ["dvc", "exp", "run", "--run-all", "-j", "1"]
    for line in (" ".join(queue), " ".join(run)):  # the docstring shows the same commands
        assert all(part.strip("'") in dr.__doc__ for part in line.split())
    wide, _ = dr.queue_commands([0.5, 2], [0.1], all_regimes=True, jobs=2)
    assert wide[-4:] == ["-S", "classifier.synthetic_per_real=0.5,2",
                         "-S", "classifier.limited_fraction=0.1"]
    with pytest.raises(ValueError, match="ratios must be >= 0"):
        dr.queue_commands([-1], [0.1])


def test_queue_refuses_a_profile_that_overrides_the_grid(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "params.yaml").write_text("profile: study\nclassifier: {limited_fraction: 0.1}\n")
    (tmp_path / "profiles" / "study.yaml").write_text("classifier: {limited_fraction: 0.2}\n")
    assert dr.profile_conflicts(tmp_path) == [
        "classifier.limited_fraction (set in profiles/study.yaml)"]
    assert dr.queue(tmp_path, [1], [0.1], False, 1, run=True, dry_run=True) == 2
    assert "overrides grid parameters" in capsys.readouterr().err
    (tmp_path / "profiles" / "study.yaml").write_text("phantom: {patients: 10}\n")
    assert dr.queue(tmp_path, [1], [0.1], False, 1, run=False, dry_run=True) == 0
    printed = capsys.readouterr().out
    assert "--queue" in printed and "--run-all" not in printed


# --- collect ---------------------------------------------------------------------------------

def _entry(name: str, rev: str, ratio: float | None, fraction: float,
           deltas: dict[str, float | None], state: str = "success",
           timestamp: str = "2026-12-06T10:00:00") -> dict[str, Any]:
    """One experiment as ``dvc exp show --json`` lists it."""
    metrics = {"reports/validation_metrics.json": {"data": {
        "auc": {}, "delta_auc": {task: {COMPARISON: {"aurelia": 0.0, "pooled_external": d}}
                                 for task, d in deltas.items()}}}} if deltas else {}
    return {"revs": [{"rev": rev, "name": name, "error": None, "experiments": None, "data": {
        "rev": rev, "timestamp": timestamp,
        "params": {"params.yaml": {"data": {
            "classifier": {"synthetic_per_real": ratio, "limited_fraction": fraction,
                           "regimes": ["real_limited", "real_limited+synthetic"]},
            "validation": {"output": "reports"}}}},
        "metrics": metrics, "deps": {}, "outs": {}, "meta": {}}}],
        "executor": {"state": state, "name": "dvc-task", "local": {}}, "name": name}


def _report(deltas: dict[str, float | None], used: int, shortfall: int = 0,
            ratio: float = 1.0) -> dict[str, Any]:
    """The parts of validation.json that collect reads."""
    tasks = {}
    provenance = []
    for task, d in deltas.items():
        pooled = None if d is None else {
            "delta_auc": d, "delta_auc_ci_low": d - 0.05, "delta_auc_ci_high": d + 0.05,
            "p_value": 0.2, "verdict": "no significant difference", "note": None}
        tasks[task] = {"comparisons": [{"with": "real_limited+synthetic",
                                        "without": "real_limited", "pooled": pooled}]}
        for seed in (0, 1):
            provenance.append({"task": task, "regime": "real_limited+synthetic", "seed": seed,
                               "training_set": {
                                   "sources": [{"source": "real", "images": 40},
                                               {"source": "synthetic", "images": used}],
                                   "synthetic_dose": {"per_real": ratio, "used": used,
                                                      "shortfall": shortfall}}})
    return {"tasks": tasks, "provenance": provenance}


@pytest.fixture
def grid() -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """A 2 x 2 grid with a duplicate, a failed, a queued and a whole-set experiment."""
    experiments, reports = [], {}
    for i, (ratio, fraction) in enumerate([(0, 0.1), (3, 0.1), (0, 0.3), (3, 0.3)]):
        rev = f"{i:040d}"
        delta = 0.01 * ratio * fraction * 10
        deltas = {"amyloidosis": delta, "metastasis": -delta}
        experiments.append(_entry(f"exp-{i}", rev, ratio, fraction, deltas))
        used = round(ratio * fraction * 400)
        reports[rev] = _report(deltas, min(used, 300), max(0, used - 300), ratio)
    # an older run of (3, 0.3), superseded by exp-3's newer timestamp
    experiments.append(_entry("old-3", "f" * 40, 3, 0.3, {"amyloidosis": 0.5, "metastasis": 0.5},
                              timestamp="2026-12-01T00:00:00"))
    reports["f" * 40] = _report({"amyloidosis": 0.5, "metastasis": 0.5}, 300, ratio=3)
    experiments.append(_entry("broken", "b" * 40, 1, 0.1, {}, state="failed"))
    experiments.append(_entry("waiting", "c" * 40, 1, 0.3, {}, state="queued"))
    experiments.append(_entry("whole-set", "d" * 40, None, 0.1, {"amyloidosis": 0.0}))
    shown = [{"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
             {"rev": "a" * 40, "name": "main", "data": {}, "error": None,
              "experiments": experiments}]
    return shown, reports


def test_collect_turns_experiments_into_table_plot_and_csv(grid, tmp_path: Path) -> None:
    shown, reports = grid
    saved = tmp_path / "exp_show.json"
    saved.write_text(json.dumps(shown))
    asked = []

    def read(rev: str, path: str) -> dict[str, Any] | None:
        asked.append((rev, path))
        return reports.get(rev)

    out = tmp_path / "dose_response"
    paths = dr.collect(tmp_path, out, exp_show_file=saved, read_report=read)
    assert asked and all(p == "reports/validation.json" for _, p in asked)

    table = paths["table"].read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 8  # 2 tasks x 2 fractions x 2 ratios, the duplicate dropped
    assert ("| 0.3 | 3 | 300.0 | +0.090 | [+0.040, +0.140] | 0.200 | no significant "
            "difference | exp-3 | released set too small: 60 synthetic images short per "
            "model") in table
    assert "| 0.3 | 3 | 300.0 | -0.090 | [-0.140, -0.040]" in table  # metastasis
    assert "| 0.1 | 0 | 0.0 | +0.000 |" in table
    assert "old-3: superseded by exp-3" in table
    assert "broken: failed" in table and "waiting: queued" in table
    assert "whole-set: classifier.synthetic_per_real is null" in table

    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    csv_rows = paths["csv"].read_text().splitlines()
    assert csv_rows[0].startswith("task,limited_fraction,synthetic_per_real,experiment")
    assert len(csv_rows) == 1 + 8


def test_collect_without_a_report_keeps_the_point_and_says_why(grid) -> None:
    shown, reports = grid
    points, _ = dr.collect_points(shown, lambda rev, path: None)
    assert len(points) == 8
    assert all(p.ci_low is None and "no CI" in p.notes[0] for p in points)
    assert {p.delta_auc for p in points if p.experiment == "exp-3"} == {0.09, -0.09}


def test_collect_flags_a_dose_the_models_did_not_train_with(grid) -> None:
    shown, reports = grid
    reports["0" * 39 + "1"] = _report({"amyloidosis": 0.0, "metastasis": -0.0}, 0, ratio=0.5)
    points, _ = dr.collect_points(shown, lambda rev, path: reports.get(rev))
    flagged = [p for p in points if p.experiment == "exp-1"]
    assert flagged and all("overrode the grid" in " ".join(p.notes) for p in flagged)


# --- the real DVC queue on a toy project -----------------------------------------------------

TOY_STAGE = '''
import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
c, v = p["classifier"], p["validation"]
r, f = float(c["synthetic_per_real"] or 0), float(c["limited_fraction"])
pathlib.Path("reports").mkdir(exist_ok=True)
tasks, delta, prov = {}, {}, []
for task in ("amyloidosis", "metastasis"):
    d = round(0.01 * r * f, 6)
    tasks[task] = {"comparisons": [{"with": w, "without": wo, "pooled": {
        "delta_auc": d, "delta_auc_ci_low": d - 0.02, "delta_auc_ci_high": d + 0.02,
        "p_value": 0.5, "verdict": "no significant difference"}} for w, wo in v["comparisons"]]}
    delta[task] = {f"{w}_vs_{wo}": {"pooled_external": d} for w, wo in v["comparisons"]}
    prov.append({"task": task, "regime": "real_limited+synthetic", "seed": 0, "training_set": {
        "sources": [{"source": "synthetic", "images": int(r * 10)}],
        "synthetic_dose": {"per_real": r, "shortfall": 0}}})
json.dump({"tasks": tasks, "provenance": prov, "regimes": c["regimes"],
           "registered": c["registered_model_prefix"]}, open("reports/validation.json", "w"))
json.dump({"delta_auc": delta}, open("reports/validation_metrics.json", "w"))
'''

TOY_DVC = '''stages:
  validate:
    cmd: python stage.py
    deps:
      - stage.py
    params:
      - classifier
      - validation
    outs:
      - reports/validation.json
    metrics:
      - reports/validation_metrics.json:
          cache: false
'''


@pytest.mark.slow
def test_grid_runs_as_dvc_experiments_and_collects(tmp_path: Path) -> None:
    """queue -> dvc exp run --queue/--run-all -> collect via dvc exp show and dvc.api."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    assert dvc is not None
    root = tmp_path / "toy"
    root.mkdir()
    (root / "stage.py").write_text(TOY_STAGE)
    (root / "dvc.yaml").write_text(TOY_DVC)
    (root / "params.yaml").write_text(
        "profile: demo\nclassifier:\n  regimes: [real, real_limited, real_limited+synthetic]\n"
        "  limited_fraction: 0.15\n  synthetic_per_real: null\n"
        "  registered_model_prefix: synthdx-classifier\n"
        "validation:\n  output: reports\n  comparisons:\n"
        "    - [real_limited+synthetic, real_limited]\n    - [real+synthetic, real]\n")
    (root / ".gitignore").write_text("/reports/*\n!/reports/*_metrics.json\n")
    git = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t"]
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "repro", "-q"],
                    ["git", "add", "-A"], [*git, "commit", "-qm", "base"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    commands = dr.queue_commands([0, 3], [0.1], dvc=dvc)
    assert dr.queue(root, [0, 3], [0.1], False, 1, run=True, dry_run=False, dvc=dvc) == 0
    shown = dr.exp_show(root, all_commits=False, dvc=dvc)
    names = [e["name"] for b in shown for e in (b.get("experiments") or [])]
    assert len(names) == 2, commands
    params = shown[1]["experiments"][0]["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["classifier"]["regimes"] == ["real_limited", "real_limited+synthetic"]
    assert params["validation"]["comparisons"] == [["real_limited+synthetic", "real_limited"]]
    assert params["classifier"]["registered_model_prefix"] is None

    paths = dr.collect(root, tmp_path / "out")  # dvc exp show + dvc.api.read
    table = paths["table"].read_text()
    assert "| 0.1 | 3 | 30.0 | +0.003 | [-0.017, +0.023] | 0.500 |" in table
    assert "| 0.1 | 0 | 0.0 | +0.000 | [-0.020, +0.020] |" in table

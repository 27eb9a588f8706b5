"""The calibrators of a regime's seed ensemble as one JSON file, and what the champion carries.

``<reports>/validation/calibrators/<task>_<regime>.json`` (written by the validate stage beside
its figures, a DVC output like them)::

    {"task": "metastasis", "regime": "real", "method": "platt",
     "uncertainty": "sd (ddof 0) of the seeds' calibrated probabilities",
     "coverage": 0.9, "uncertainty_threshold": 0.116, "val_coverage": 0.9,
     "seeds": [{"seed": 0, "model_file": ".../seed0/model.pt", "calibrator": {...}}, ...]}

Why a file: the registered champion must give the same calibrated probability, uncertainty and
abstention as the report, without this repository. :func:`champion_artifacts` hands the file
and the weights of the champion's sibling seeds to ``mlflow.pyfunc.log_model`` as artifacts;
tasks/validate/champion_pyfunc.py reads them. The ``model_file`` paths are where the weights
were at validation; the pyfunc does not use them (it gets each seed's weights as an artifact).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.artifacts.classifier_folder import MODEL_FILE
from tasks.artifacts.validation_report import PLOTS_DIR
from tasks.common.atomic import atomic_write_text
from tasks.config import Config
from tasks.validate.figures import safe_name

CALIBRATORS_DIR = "calibrators"
UNCERTAINTY = "sd (ddof 0) of the seeds' calibrated probabilities"


def calibrators_file(plots_dir: Path, task: str, regime: str) -> Path:
    """Where the calibrators of (task, regime) live under the report's ``validation/`` folder."""
    return Path(plots_dir) / CALIBRATORS_DIR / f"{safe_name(task)}_{safe_name(regime)}.json"


def calibrators_docs(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """One calibrators document per (task, regime), from the validation report."""
    paths = {(p["task"], p["regime"], p["seed"]): p["path"] for p in report["provenance"]}
    coverage = report["config"]["abstention"]["coverage"]
    method = report["config"]["calibration"]["method"]
    docs = {}
    for task, doc in report["tasks"].items():
        for ens in doc["ensembles"]:
            regime = ens["regime"]
            seeds = [{"seed": m["seed"],
                      "model_file": str(Path(paths[(task, regime, m["seed"])]) / MODEL_FILE),
                      "calibrator": m["calibrator"]}
                     for m in doc["models"] if m["regime"] == regime]
            docs[(task, regime)] = {
                "task": task, "regime": regime, "method": method, "uncertainty": UNCERTAINTY,
                "coverage": coverage, "uncertainty_threshold": ens["uncertainty_threshold"],
                "val_coverage": ens["val_coverage"], "seeds": seeds}
    return docs


def write_calibrators(plots_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write every (task, regime)'s calibrators file under ``plots_dir``; return the paths."""
    written = []
    for (task, regime), doc in sorted(calibrators_docs(report).items()):
        path = calibrators_file(plots_dir, task, regime)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def champion_artifacts(cfg: Config, info: dict[str, Any]) -> dict[str, str]:
    """Extra pyfunc artifacts of a champion: its regime's calibrators and sibling seeds' weights.

    ``{"calibration": <json>, "seed<k>_weights": <model.pt>}`` for every other seed of the
    regime. Empty when the validate stage wrote no calibrators file for the regime (then the
    pyfunc returns the score as its probability and never abstains).

    Raises:
        FileNotFoundError: a sibling seed's weights are missing (the message names the file);
            a champion without them would report an uncertainty the report never checked.
    """
    path = calibrators_file(Path(cfg.validation.output) / PLOTS_DIR, str(info["task"]),
                            str(info["regime"]))
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text(encoding="utf-8"))
    artifacts = {"calibration": str(path)}
    for entry in doc["seeds"]:
        if int(entry["seed"]) == int(info["seed"]):
            continue
        weights = Path(entry["model_file"])
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; the champion's seed ensemble "
                                    f"({path}) needs the weights of seed {entry['seed']}")
        artifacts[f"seed{int(entry['seed'])}_weights"] = str(weights)
    return artifacts

"""A registered classifier as an MLflow pyfunc: scans in; probability, uncertainty, decision out.

Logged as "model from code" by tasks.validate.champions: MLflow stores this file with the
model; the ``models`` package travels along as a code path and the weights (``model.pt``, read
by ``models.module_file``, the one reader of that file) and ``model.json`` (threshold, task) as
artifacts. Only ``models`` may be imported here: ``tasks`` does not travel with the model.
So a registered champion is usable without this repository:

    model = mlflow.pyfunc.load_model("models:/synthdx-classifier-amyloidosis@champion")
    out = model.predict(images)   # images: float32 (n, 2, H, W) in [0, 1]

``predict`` area-resizes images to the model's input size and returns a DataFrame with

- ``score``: the champion's raw output (probability of the finding under the training
  sampler's balanced classes);
- ``positive``: ``score >= threshold``, the operating point chosen on internal validation;
- ``probability``: the score calibrated by the champion's calibrator (fitted on internal
  validation by the validate stage);
- ``uncertainty``: the standard deviation of the calibrated probabilities of every seed model
  of the champion's regime (the champion included), the seed ensemble's disagreement;
- ``abstain``: ``uncertainty > uncertainty_threshold``, the threshold chosen on internal
  validation for the configured coverage: refer the case to a reader.

The calibrators, the threshold and which seeds exist come from the ``calibration`` artifact
(tasks/validate/calibrators_file.py); the sibling seeds' weights are artifacts
``seed<k>_weights``. The formulas applying a calibrator are those of
tasks/validate/calibration.py (a test checks both give the same numbers). A model logged without
the ``calibration`` artifact returns ``probability = score``, ``uncertainty`` 0 and never
abstains.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from mlflow.pyfunc import PythonModel, PythonModelContext

EPS = 1e-7


def apply_calibrator(doc: dict[str, Any], scores: np.ndarray) -> np.ndarray:
    """A calibrator document (``Calibrator.as_dict``) applied to scores (no ``tasks`` import)."""
    s = np.asarray(scores, dtype=np.float64)
    method, params = doc["method"], doc.get("params") or {}
    if method in ("platt", "temperature"):
        clipped = np.clip(s, EPS, 1.0 - EPS)
        z = float(params["slope"]) * (np.log(clipped) - np.log1p(-clipped)) + float(
            params["bias"])
        return 1.0 / (1.0 + np.exp(-z))
    if method == "isotonic":
        return np.interp(s, params["x"], params["y"])
    if method == "none":
        return s.copy()
    raise ValueError(f"unknown calibration method {method!r}")


class ScanClassifierModel(PythonModel):
    """The trained ScanClassifier with its threshold, calibrator and seed ensemble."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the module(s) from the weights artifacts; read threshold and calibration."""
        from models.classifier import ScanClassifier
        from models.module_file import read_module_file

        file = read_module_file(context.artifacts["weights"])
        self.module = file.build(ScanClassifier)
        self.size = file.image_size
        with open(context.artifacts["info"], encoding="utf-8") as fh:
            info = json.load(fh)
        self.threshold = float(info["threshold"])
        self.task = str(info["task"])
        seed = int(info["seed"])
        self.calibrator: dict[str, Any] = {"method": "none"}
        self.seeds: list[tuple[Any, dict[str, Any]]] = []
        self.uncertainty_threshold: float | None = None
        path = context.artifacts.get("calibration")
        if path:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
            self.uncertainty_threshold = doc.get("uncertainty_threshold")
            for entry in doc["seeds"]:
                k = int(entry["seed"])
                if k == seed:
                    module = self.module
                    self.calibrator = entry["calibrator"]
                else:
                    module = read_module_file(context.artifacts[f"seed{k}_weights"]).build(
                        ScanClassifier)
                self.seeds.append((module, entry["calibrator"]))

    def predict(self, context: PythonModelContext, model_input: np.ndarray,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score images (n, 2, H, W) in [0, 1]; any H, W (area-resized to the model's size).

        ``np.ndarray`` (anything ``np.asarray`` takes works): MLflow reads the hint, and for
        ``Any`` it warned on every log and load that it cannot build a schema from it.
        """
        from models.classifier import predict_scores

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.ndim != 4 or images.shape[1] != 2:
            raise ValueError(f"expected images of shape (n, 2, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="area")
        images = images.clamp(0.0, 1.0)
        scores = predict_scores(self.module, images).numpy().astype(np.float64)
        probability = apply_calibrator(self.calibrator, scores)
        uncertainty = np.zeros_like(scores)
        if len(self.seeds) > 1:
            calibrated = [apply_calibrator(cal, scores if module is self.module else
                                           predict_scores(module, images).numpy()
                                           .astype(np.float64))
                          for module, cal in self.seeds]
            uncertainty = np.std(np.stack(calibrated), axis=0)
        limit = self.uncertainty_threshold
        abstain = (uncertainty > limit if limit is not None
                   else np.zeros(scores.shape, dtype=bool))
        return pd.DataFrame({"score": scores, "positive": scores >= self.threshold,
                             "probability": probability, "uncertainty": uncertainty,
                             "abstain": abstain})


mlflow.models.set_model(ScanClassifierModel())

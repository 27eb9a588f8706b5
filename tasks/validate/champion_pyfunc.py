"""A registered classifier as an MLflow pyfunc: scans in, probability and decision out.

Logged as "model from code" by tasks.validate.champions: MLflow stores this file with the
model; the ``models`` package travels along as a code path and the weights (``model.pt``, read
by ``models.module_file``, the one reader of that file) and ``model.json`` (threshold, task) as
artifacts. Only ``models`` may be imported here: ``tasks`` does not travel with the model.
So a registered champion is usable without this repository:

    model = mlflow.pyfunc.load_model("models:/synthdx-classifier-amyloidosis@champion")
    out = model.predict(images)   # images: float32 (n, 2, H, W) in [0, 1]

``predict`` area-resizes images to the model's input size and returns a DataFrame with
``score`` (probability of the finding) and ``positive`` (``score >= threshold``, the operating
point chosen on the internal validation split).
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


class ScanClassifierModel(PythonModel):
    """The trained ScanClassifier with its validation-chosen threshold."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the module from the ``weights`` artifact and read the threshold."""
        from models.classifier import ScanClassifier
        from models.module_file import read_module_file

        file = read_module_file(context.artifacts["weights"])
        self.module = file.build(ScanClassifier)
        self.size = file.image_size
        with open(context.artifacts["info"], encoding="utf-8") as fh:
            info = json.load(fh)
        self.threshold = float(info["threshold"])
        self.task = str(info["task"])

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
        scores = predict_scores(self.module, images.clamp(0.0, 1.0)).numpy().astype(np.float64)
        return pd.DataFrame({"score": scores, "positive": scores >= self.threshold})


mlflow.models.set_model(ScanClassifierModel())

"""The registered diffusion model as an MLflow pyfunc: conditions and seeds in, images out.

Logged as "model from code": MLflow stores this file with the model and runs it on
``mlflow.pyfunc.load_model``; the ``models`` package travels along as a code path, and the
EMA weights (``model.pt``) as an artifact. So a registered version can be loaded and sampled
anywhere the dependencies are installed, without this repository:

    model = mlflow.pyfunc.load_model("models:/synthdx-bone-scan-diffusion/1")
    images = model.predict(pd.DataFrame({"perugini_grade": [2], "metastasis": [False],
                                         "seed": [7]}), params={"steps": 50})

Each input row is one image: a column per condition factor (missing or None = unconditioned)
and ``seed``. ``predict`` returns a float32 array (rows, 2, H, W) in [0, 1], anterior and
posterior views. Only ``models`` is imported (the weights file is read by
``models.module_file``, the one reader of that format): the pyfunc must not need the pipeline's
config or the ``tasks`` package, which does not travel with the model.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

SETTINGS = ("sampler", "steps", "guidance_scale", "eta", "batch_size")
"""The sampler settings a request may set; their defaults are the model's ``model_config``
(the project's ``synthesize`` section when the model was registered, tasks/diffusion/
registry.py), so a served model samples the way the pipeline's synthesize stage does."""


class DiffusionSampler(PythonModel):
    """Classifier-free-guided sampling from the trained conditional UNet."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the module from the ``weights`` artifact (CPU unless a GPU is visible)."""
        from models.diffusion import DiffusionModule
        from models.module_file import read_module_file

        config = dict(context.model_config or {})
        missing = [key for key in SETTINGS if key not in config]
        if missing:
            raise ValueError(f"registered diffusion model without sampler settings {missing} "
                             "in its model_config: register it with synthdx train-diffusion")
        self.defaults: dict[str, Any] = {key: config[key] for key in SETTINGS}
        file = read_module_file(context.artifacts["weights"])
        self.module = file.build(DiffusionModule)
        self.size = file.image_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.module.to(self.device)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """One image per row of ``model_input``; ``params`` may set the sampler settings."""
        from models.sampling import sample

        settings = {**self.defaults, **(params or {})}
        if "seed" not in model_input.columns:
            raise ValueError("model_input needs a 'seed' column (one seed per image)")
        spec = self.module.spec
        rows = model_input.to_dict("records")
        cond = torch.tensor(
            [[f.null_index if row.get(f.name) is None or pd.isna(row.get(f.name))
              else f.index_of(row[f.name]) for f in spec.factors] for row in rows],
            dtype=torch.long).reshape(len(rows), len(spec.factors))
        seeds = [int(s) for s in model_input["seed"]]
        out = []
        step = int(settings["batch_size"])
        for i in range(0, len(rows), step):
            images = sample(self.module.unet, settings["sampler"], int(settings["steps"]),
                            cond[i:i + step], float(settings["guidance_scale"]),
                            seeds[i:i + step], (2, *self.size), self.device,
                            null_cond=spec.null_indices, eta=float(settings["eta"]),
                            intensity=self.module.intensity,
                            **self.module.noise_schedule)
            out.append(images.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2, *self.size), np.float32)


mlflow.models.set_model(DiffusionSampler())

"""Generate the images of one share of a plan (one rank's rows) with the trained model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from models.diffusion import DiffusionModule
from models.sampling import sample
from tasks.config import SynthesizeConfig

Progress = Callable[[int, int], None]


def generate_rows(module: DiffusionModule, rows: pd.DataFrame, size: tuple[int, int],
                  cfg: SynthesizeConfig, device: torch.device,
                  autocast_dtype: torch.dtype | None = None,
                  progress: Progress | None = None) -> np.ndarray:
    """Sample every row of ``rows`` (``cond_index`` and ``seed`` columns), in batches.

    Each image depends only on its own condition and seed (see models.sampling), so how
    rows are split across ranks and batches does not change the result.

    Args:
        module: the trained model (EMA weights), already on ``device``.
        rows: plan rows to generate.
        size: (rows, cols) of each view.
        cfg: sampler settings.
        device: where the network runs.
        autocast_dtype: run the network under autocast with this dtype (bf16 on GPUs); the
            guidance combination and scheduler steps stay in fp32 (see models.sampling).
        progress: called with (done, total) after each batch.

    Returns:
        float16 array (len(rows), 2, *size) in [0, 1].
    """
    out = np.empty((len(rows), 2, *size), dtype=np.float16)
    conds = np.asarray(rows["cond_index"].tolist(), dtype=np.int64).reshape(len(rows), -1)
    seeds = rows["seed"].to_numpy(dtype=np.int64)
    for start in range(0, len(rows), cfg.batch_size):
        stop = min(start + cfg.batch_size, len(rows))
        images = sample(module.unet, cfg.sampler, cfg.steps,
                        torch.from_numpy(conds[start:stop]), cfg.guidance_scale,
                        seeds[start:stop].tolist(), (2, *size), device,
                        null_cond=module.spec.null_indices, eta=cfg.eta,
                        autocast_dtype=autocast_dtype, intensity=module.intensity,
                        **module.noise_schedule)
        out[start:stop] = images.float().cpu().numpy().astype(np.float16)
        if progress is not None:
            progress(stop, len(rows))
    return out

"""One rule for ``precision: auto`` across stages (training and sampling must agree)."""

from __future__ import annotations

import torch


def auto_precision(precision: str, accelerator: str) -> str:
    """``auto`` means bf16 mixed precision on a CUDA GPU and full fp32 on the CPU.

    Args:
        precision: the configured precision (``auto`` or a Lightning precision string).
        accelerator: the configured accelerator (``auto``, ``cpu``, ``gpu``, ``cuda``).
    """
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                                  and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"

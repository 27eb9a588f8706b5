"""One rule for ``precision: auto`` across stages (training and sampling must agree)."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX tiles).

    Why it decides: on such CPUs (e.g. AMD Zen 4, Intel Sapphire Rapids) oneDNN runs the
    demo UNet ~1.7x faster in bf16 than in fp32 (benchmarks/bench_unet_cpu.py, 2 cores:
    training 18 -> 32 images/s, forward 58 -> 107); without it bf16 is emulated and slower.
    """
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in probes)


def auto_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 mixed precision on a CUDA GPU or a CPU with native bf16, else fp32.

    The resolved value is what the stage logs to MLflow (``precision``), so a run records
    which arithmetic produced it; set ``precision: 32-true`` for bit-comparable CPU runs
    across machines.

    Args:
        precision: the configured precision (``auto`` or a Lightning precision string).
        accelerator: the configured accelerator (``auto``, ``cpu``, ``gpu``, ``cuda``).
    """
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                                  and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu or cpu_has_native_bf16() else "32-true"

"""Classifier-free-guided sampling with per-sample seeds.

MONAI's DiffusionInferer.sample does not pass ``class_labels`` to the network, so the reverse
loop is written here around MONAI's DDIM / DDPM ``step`` functions.

Reproducibility contract: every image is a function of (model, condition, seed, sampler
settings) only. Each sample draws its initial noise, and for stochastic samplers every step's
noise, from its own ``torch.Generator`` seeded with its seed, so an image regenerates identically
whichever batch it is generated in (up to floating-point batch effects of the network on some
accelerators). Noise is drawn on the CPU and moved, so it is also the same on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Literal

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from models.diffusion import make_scheduler, to_image_range

SchedulerKind = Literal["ddim", "ddpm"]


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    gens = []
    for seed in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        gens.append(g)
    return gens


def _noise(gens: Sequence[torch.Generator], shape: Sequence[int], device: torch.device
           ) -> torch.Tensor:
    """One standard-normal tensor of ``shape`` per generator, stacked, on ``device``."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device)


def sample(
    model_unet: nn.Module,
    scheduler_kind: SchedulerKind,
    num_inference_steps: int,
    cond: torch.Tensor,
    guidance_scale: float,
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str,
    *,
    null_cond: Sequence[int] | torch.Tensor,
    num_train_timesteps: int,
    schedule: str,
    beta_start: float,
    beta_end: float,
    prediction_type: str,
    eta: float = 0.0,
    autocast_dtype: torch.dtype | None = None,
    intensity: str = "linear",
) -> torch.Tensor:
    """Generate one image per (condition row, seed) with classifier-free guidance.

    The guided noise estimate is ``eps_u + s * (eps_c - eps_u)``: ``s = 0`` is unconditional,
    ``s = 1`` plain conditional (the unconditional pass is then skipped), ``s > 1`` pushes
    samples towards the condition. Conditional and unconditional estimates come from one
    forward pass over a batch of 2B.

    The noise schedule (``num_train_timesteps`` to ``prediction_type``) has no defaults: it is
    the trained model's, passed as ``**module.noise_schedule``, and the scheduler is built by
    ``models.diffusion.make_scheduler`` as in training.

    Step rules: the pipeline checks them once, when the configuration is validated
    (``tasks/config.py``, ``Config._sampler_steps``): DDPM takes every training timestep,
    DDIM a divisor of ``num_train_timesteps``. This function only refuses the DDPM request
    MONAI cannot run at all (the same rule); it trusts the caller on the DDIM divisor.

    Args:
        model_unet: the conditional UNet (``DiffusionModule.unet``); called as
            ``model_unet(x, t, class_labels=cond)``.
        scheduler_kind: ``ddim`` (deterministic with ``eta=0``, few steps) or ``ddpm``
            (stochastic; MONAI's DDPM step assumes consecutive timesteps, so it needs
            ``num_inference_steps == num_train_timesteps``).
        num_inference_steps: reverse steps: for DDPM exactly ``num_train_timesteps``; for
            DDIM a divisor of it (MONAI's DDIM step strides by ``T // n`` while its timesteps
            are rounded from a linspace, which only agree when n divides T; e.g. 20 or 25 of
            1,000, not 12).
        cond: (B, F) LongTensor of factor indices.
        guidance_scale: ``s`` above.
        seeds: one seed per row of ``cond``.
        shape: per-sample (channels, rows, cols).
        device: where the network runs.
        null_cond: the (F,) null indices (``ConditionSpec.null_indices``), the unconditional
            request.
        num_train_timesteps: the trained noise schedule's length.
        schedule: the trained noise schedule's name.
        beta_start: the trained schedule's first beta.
        beta_end: the trained schedule's last beta.
        eta: DDIM stochasticity (0 = deterministic DDIM).
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16`` on a GPU: about twice the throughput on tensor cores). Its
            output is cast back to float32 before the guidance combination and the scheduler
            step, so the cancellation in ``eps_c - eps_u`` and the update of ``x`` keep full
            precision. ``None`` (default) runs in the network's own dtype, exactly as before.
        prediction_type: what the network predicts (``epsilon`` or ``v_prediction``); the
            guidance combination is linear, so it applies to either.
        intensity: the model's intensity transform (``DiffusionModule.intensity``); its
            inverse maps the final sample to [0, 1] (``linear``, the default, is the plain
            rescaling every model used before ``intensity_transform`` existed).

    Returns:
        (B, *shape) float tensor in [0, 1] on ``device``.
    """
    if cond.ndim != 2 or cond.shape[0] != len(seeds):
        raise ValueError(f"cond must be (B, F) with B = len(seeds) = {len(seeds)}, "
                         f"got {tuple(cond.shape)}")
    if scheduler_kind == "ddpm" and num_inference_steps != num_train_timesteps:
        raise ValueError("DDPM sampling needs num_inference_steps == num_train_timesteps "
                         f"({num_train_timesteps}); use DDIM for fewer steps")
    device = torch.device(device)
    scheduler = make_scheduler(scheduler_kind, num_train_timesteps=num_train_timesteps,
                               schedule=schedule, beta_start=beta_start, beta_end=beta_end,
                               prediction_type=prediction_type)
    scheduler.set_timesteps(num_inference_steps)
    gens = _generators(seeds)
    b = len(seeds)
    cond = cond.to(device=device, dtype=torch.long)
    nulls = torch.as_tensor(null_cond, dtype=torch.long, device=device).reshape(1, -1)
    guided = guidance_scale != 1.0
    labels = torch.cat([cond, nulls.expand(b, -1)]) if guided else cond
    stochastic = scheduler_kind == "ddpm" or eta > 0.0

    def autocast() -> contextlib.AbstractContextManager:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast_dtype)

    was_training = model_unet.training
    model_unet.eval()
    try:
        x = _noise(gens, shape, device)
        with torch.no_grad():
            for t in scheduler.timesteps:
                step_t = int(t)
                x_in = torch.cat([x, x]) if guided else x
                t_in = torch.full((x_in.shape[0],), step_t, dtype=torch.long, device=device)
                with autocast():
                    out = model_unet(x_in, t_in, class_labels=labels)
                if autocast_dtype is not None:
                    out = out.float()
                if guided:
                    eps_c, eps_u = out.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                else:
                    eps = out
                x = _step(scheduler, eps, step_t, x, gens if stochastic else None, eta)
    finally:
        model_unet.train(was_training)
    return to_image_range(x, intensity)


def _step(
    scheduler: DDIMScheduler | DDPMScheduler,
    eps: torch.Tensor,
    t: int,
    x: torch.Tensor,
    gens: Sequence[torch.Generator] | None,
    eta: float,
) -> torch.Tensor:
    """One reverse step; stochastic steps run per sample with that sample's generator."""

    def one(e: torch.Tensor, s: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        if isinstance(scheduler, DDIMScheduler):
            return scheduler.step(e, t, s, eta=eta, generator=g)[0]
        return scheduler.step(e, t, s, generator=g)[0]

    if gens is None:
        return one(eps, x, None)
    if x.device.type != "cpu":
        # MONAI draws step noise on the model's device; CPU generators cannot feed CUDA
        # draws, so stochastic steps run on CPU copies (elementwise, cheap) and move back.
        return torch.cat([one(eps[i:i + 1].cpu(), x[i:i + 1].cpu(), g)
                          for i, g in enumerate(gens)]).to(x.device)
    return torch.cat([one(eps[i:i + 1], x[i:i + 1], g) for i, g in enumerate(gens)])

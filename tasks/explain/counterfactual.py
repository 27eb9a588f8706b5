"""Counterfactual regeneration: encode a real scan, regenerate it under another condition.

Why this form: a class-conditional diffusion model can say what a scan would look like without
its finding. The scan is taken part of the way into the trained noise schedule (``strength``)
either by DDIM inversion (running the deterministic DDIM update backwards under the scan's own
condition, so the noisy code still determines this patient's anatomy) or by adding seeded
noise (SDEdit), and regenerated from that code twice with the same deterministic DDIM steps:
once under the scan's own condition (the reconstruction) and once under the opposite one (the
counterfactual). Their difference is the heat map: what the model changes to remove (or add)
the finding, with the reconstruction error of the encoding itself cancelled.

The DDIM update is written out here (x0 and noise estimates from epsilon or velocity
predictions, MONAI's alphas) because MONAI's schedulers step only towards less noise; the
betas come from the one scheduler factory, ``models.diffusion.make_scheduler``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from models.diffusion import make_scheduler, to_image_range, to_model_range

Encode = Literal["ddim_inversion", "noise"]


@dataclass(frozen=True)
class Sampler:
    """The trained noise schedule and how a scan is encoded and regenerated.

    Attributes:
        alphas: cumulative alphas of the trained schedule (length num_train_timesteps).
        prediction_type: ``epsilon`` or ``v_prediction``.
        timesteps: ascending DDIM timesteps from the first one above 0 to the encoding depth.
        encode: ``ddim_inversion`` or ``noise``.
        guidance_scale: classifier-free guidance of the regenerations.
        null_cond: the model's null condition (the unconditional branch).
        intensity: the model's intensity transform (``linear`` or ``sqrt``).
        autocast_dtype: run the network under autocast with this dtype (None: its own).
    """

    alphas: torch.Tensor
    prediction_type: str
    timesteps: tuple[int, ...]
    encode: Encode
    guidance_scale: float
    null_cond: tuple[int, ...]
    intensity: str
    autocast_dtype: torch.dtype | None = None


def ddim_timesteps(num_train_timesteps: int, strength: float, steps: int) -> tuple[int, ...]:
    """``steps`` evenly spaced timesteps from just above 0 up to ``strength`` of the schedule.

    Raises:
        ValueError: fewer distinct timesteps than steps (ask for fewer steps or more strength).
    """
    top = max(1, round(strength * (num_train_timesteps - 1)))
    ts = np.unique(np.linspace(0, top, steps + 1).round().astype(int)[1:])
    if len(ts) < steps:
        raise ValueError(f"{steps} DDIM steps do not fit in the {top} timesteps of strength "
                         f"{strength:g}: ask for fewer steps or more strength")
    return tuple(int(t) for t in ts)


def make_sampler(noise_schedule: dict, null_cond: list[int], intensity: str, *, encode: Encode,
                 strength: float, steps: int, guidance_scale: float,
                 autocast_dtype: torch.dtype | None = None) -> Sampler:
    """A ``Sampler`` for a trained model (``module.noise_schedule``, its spec's null indices)."""
    scheduler = make_scheduler("ddim", **noise_schedule)
    return Sampler(alphas=scheduler.alphas_cumprod.detach().double().cpu(),
                   prediction_type=str(noise_schedule["prediction_type"]),
                   timesteps=ddim_timesteps(int(noise_schedule["num_train_timesteps"]),
                                            strength, steps),
                   encode=encode, guidance_scale=float(guidance_scale),
                   null_cond=tuple(int(n) for n in null_cond), intensity=intensity,
                   autocast_dtype=autocast_dtype)


def _alpha(s: Sampler, t: int | None, like: torch.Tensor) -> torch.Tensor:
    """The cumulative alpha at ``t`` (1 for the clean image, t None), as ``like``'s dtype."""
    value = 1.0 if t is None else float(s.alphas[t])
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _estimates(s: Sampler, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) estimates from a network output at cumulative alpha ``a``."""
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if s.prediction_type == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    return (x - sb * out) / sa, out


def _network(unet: nn.Module, s: Sampler, x: torch.Tensor, t: int, cond: torch.Tensor,
             guided: bool) -> torch.Tensor:
    """The (guided) network output for ``x`` at ``t`` under ``cond``."""
    autocast = (torch.autocast(x.device.type, dtype=s.autocast_dtype)
                if s.autocast_dtype is not None else contextlib.nullcontext())
    if guided and s.guidance_scale != 1.0:
        nulls = torch.as_tensor(s.null_cond, dtype=torch.long, device=x.device)
        labels = torch.cat([cond, nulls.reshape(1, -1).expand(len(x), -1)])
        x_in = torch.cat([x, x])
    else:
        labels, x_in = cond, x
    t_in = torch.full((len(x_in),), t, dtype=torch.long, device=x.device)
    with autocast:
        out = unet(x_in, t_in, class_labels=labels).float()
    if len(out) == len(x):
        return out
    out_c, out_u = out.chunk(2)
    return out_u + s.guidance_scale * (out_c - out_u)


def encode(unet: nn.Module, s: Sampler, x0: torch.Tensor, cond: torch.Tensor,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Bring model-range scans ``x0`` to the deepest timestep of ``s``.

    DDIM inversion runs the deterministic update backwards under ``cond`` (unguided: guidance
    makes the inversion drift); ``noise`` draws the forward process at once from ``generator``.
    """
    top = s.timesteps[-1]
    if s.encode == "noise":
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
        a = _alpha(s, top, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    x = x0
    previous: int | None = None
    for t in s.timesteps:
        out = _network(unet, s, x, t, cond, guided=False)
        x0_hat, eps = _estimates(s, out, x, _alpha(s, previous, x))
        a_next = _alpha(s, t, x)
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
        previous = t
    return x


def regenerate(unet: nn.Module, s: Sampler, xt: torch.Tensor, cond: torch.Tensor
               ) -> torch.Tensor:
    """Deterministic guided DDIM from the deepest timestep of ``s`` down to a clean image."""
    x = xt
    steps = list(s.timesteps)
    for i in range(len(steps) - 1, -1, -1):
        t = steps[i]
        out = _network(unet, s, x, t, cond, guided=True)
        x0_hat, eps = _estimates(s, out, x, _alpha(s, t, x))
        x0_hat = x0_hat.clamp(-1.0, 1.0)
        a_prev = _alpha(s, steps[i - 1] if i > 0 else None, x)
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    return x


@dataclass(frozen=True)
class Counterfactual:
    """One batch's regenerations, in stored intensities [0, 1], (B, 2, rows, cols) each.

    ``heat`` is |reconstruction - counterfactual| per pixel and view: where the model changes
    the scan when only the condition changes.
    """

    reconstruction: np.ndarray
    counterfactual: np.ndarray

    @property
    def heat(self) -> np.ndarray:
        """Absolute difference of the two regenerations (B, 2, rows, cols)."""
        return np.abs(self.reconstruction - self.counterfactual)


def counterfactuals(unet: nn.Module, s: Sampler, images: torch.Tensor, cond: torch.Tensor,
                    target: torch.Tensor, seeds: list[int]) -> Counterfactual:
    """Encode ``images`` (stored intensities, (B, 2, rows, cols)) and regenerate them twice.

    Args:
        unet: the trained conditional UNet (``DiffusionModule.unet``), in eval mode.
        s: the sampler.
        images: the scans in [0, 1], at the model's size, on the network's device.
        cond: (B, F) their own condition indices.
        target: (B, F) the opposite condition indices.
        seeds: one seed per scan (the ``noise`` encoding's draw; unused by the inversion).
    """
    device = images.device
    cond, target = cond.to(device), target.to(device)
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            x0 = to_model_range(images.float(), s.intensity)
            if s.encode == "noise":
                xt = torch.cat([encode(unet, s, x0[i:i + 1], cond[i:i + 1],
                                       torch.Generator().manual_seed(int(seed)))
                                for i, seed in enumerate(seeds)])
            else:
                xt = encode(unet, s, x0, cond)
            both = regenerate(unet, s, torch.cat([xt, xt]), torch.cat([cond, target]))
            recon, cf = to_image_range(both, s.intensity).float().cpu().numpy().reshape(
                2, *images.shape)
    finally:
        unet.train(was_training)
    return Counterfactual(reconstruction=recon, counterfactual=cf)

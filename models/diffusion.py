"""The conditional diffusion network and its Lightning training module.

The network is MONAI's DiffusionModelUNet with its single-factor class embedding swapped for
``ConditionEmbedding`` (several factors at once, each with a null index). Training is DDPM
(epsilon or velocity prediction) with condition dropout, so a single model provides both the
conditional and the unconditional estimate that classifier-free guidance combines at sampling
time. The noise schedule is built by ``make_scheduler`` for training and sampling alike.

Speed options (all off by default except fused AdamW on CUDA; none of them changes the model's
weights, its checkpoints or what it computes beyond floating-point rounding, so none is a
hyper-parameter and none takes part in the resume check): ``compile`` (torch.compile of the
UNet), ``channels_last`` (NHWC convolutions), ``flash_attention`` (PyTorch's fused
scaled-dot-product attention in MONAI's attention blocks), ``fused_adamw`` and, on CUDA,
``tf32`` / ``cudnn_benchmark`` (process-wide backend flags). ``benchmarks/bench_diffusion.py``
measures what they buy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning as L
import torch
from monai.networks.blocks.selfattention import SABlock
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from models.conditioning import ConditionEmbedding, ConditionSpec
from models.data import mix_seed

#: Images are stored in [0, 1]; the diffusion process works on [-1, 1], where the schedulers
#: clip their x0 estimate.
IMAGE_CHANNELS = 2


INTENSITY_TRANSFORMS = ("linear", "sqrt")
"""How stored intensities map to the diffusion range (``DiffusionModule.intensity_transform``)."""


def to_model_range(images: torch.Tensor, intensity: str = "linear") -> torch.Tensor:
    """Map stored intensities [0, 1] to the diffusion range [-1, 1].

    ``sqrt`` first takes the square root: the variance-stabilising transform of Poisson
    counts (Anscombe), so count noise is about equally strong everywhere, as the Gaussian
    diffusion model assumes; and it spreads out the low end where a bone scan lives (the
    median processed pixel is below 0.001, the skeleton 0.05-0.4), so the near-empty
    background is no longer a sliver next to -1 that any sampling residue lights up.
    """
    if intensity == "sqrt":
        images = images.clamp(min=0.0).sqrt()
    elif intensity != "linear":
        raise ValueError(f"intensity must be one of {INTENSITY_TRANSFORMS}, got {intensity!r}")
    return images * 2.0 - 1.0


def to_image_range(samples: torch.Tensor, intensity: str = "linear") -> torch.Tensor:
    """Map diffusion-range samples back to [0, 1] (the inverse of ``to_model_range``).

    The overshoot sampling leaves is clamped first; with ``sqrt`` the square then turns a
    residue of 0.05 in the dark background into 0.0025.
    """
    images = ((samples + 1.0) / 2.0).clamp(0.0, 1.0)
    if intensity == "sqrt":
        return images * images
    if intensity != "linear":
        raise ValueError(f"intensity must be one of {INTENSITY_TRANSFORMS}, got {intensity!r}")
    return images


class PatchedUNet(nn.Module):
    """A UNet that works on ``p x p`` pixel patches folded into channels.

    Why: on a CPU the full-resolution level of a pixel-space UNet costs most of the time; a
    lossless space-to-depth fold (``PixelUnshuffle``) lets the same budget buy a wider network
    at a quarter (p = 2) of the positions, the way patch-based diffusion models (DiT, "simple
    diffusion") trade resolution for width. ``PixelShuffle`` unfolds the prediction.
    """

    def __init__(self, inner: DiffusionModelUNet, patch_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.patch_size = patch_size
        self.fold = nn.PixelUnshuffle(patch_size)
        self.unfold = nn.PixelShuffle(patch_size)

    @property
    def class_embedding(self) -> nn.Module:
        """The condition embedding of the inner UNet."""
        return self.inner.class_embedding

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The inner UNet's prediction on the folded image, unfolded to pixels."""
        return self.unfold(self.inner(self.fold(x), timesteps, class_labels=class_labels))


def build_unet(
    channels: Sequence[int],
    attention_levels: Sequence[bool],
    num_res_blocks: int | Sequence[int],
    num_head_channels: int | Sequence[int],
    norm_num_groups: int,
    spec: ConditionSpec,
    *,
    flash_attention: bool = False,
    patch_size: int = 1,
) -> nn.Module:
    """A 2-D, two-view DiffusionModelUNet conditioned on the factors in ``spec``.

    ``num_class_embeds`` is set so MONAI takes its class-conditional branch in ``forward``
    (``emb = emb + self.class_embedding(class_labels)``); the embedding it creates is then
    replaced by ``ConditionEmbedding``, which accepts a (B, F) index tensor instead of (B,).

    Args:
        channels: feature channels per resolution level.
        attention_levels: whether each level has self-attention (costly at full resolution).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        spec: the condition factors.
        flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` (flash /
            memory-efficient kernels on GPUs) instead of MONAI's explicit softmax(QK^T)V. Same
            parameters, same result up to rounding; the explicit form stores a (tokens x
            tokens) matrix per head for the backward pass.
        patch_size: 1 (plain pixels) or p > 1: the UNet sees ``p x p`` patches folded into
            channels (``PatchedUNet``); image sides must be multiples of p.
    """
    folded = IMAGE_CHANNELS * patch_size * patch_size
    unet = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=folded,
        out_channels=folded,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else tuple(num_res_blocks),
        num_head_channels=(num_head_channels if isinstance(num_head_channels, int)
                           else tuple(num_head_channels)),
        norm_num_groups=norm_num_groups,
        num_class_embeds=sum(c + 1 for c in spec.cardinalities),
        use_flash_attention=flash_attention,
    )
    time_embed_dim = unet.class_embedding.embedding_dim
    unet.class_embedding = ConditionEmbedding(spec.cardinalities, time_embed_dim)
    return PatchedUNet(unet, patch_size) if patch_size > 1 else unet


def set_flash_attention(unet: nn.Module, enabled: bool = True) -> int:
    """Switch every MONAI attention block of ``unet`` to (or from) fused SDPA attention.

    Why: a model rebuilt from saved hyper-parameters (``load_model``) has MONAI's default
    explicit attention; sampling can switch to the fused kernels without rebuilding, since
    both forms use the same parameters.

    Returns:
        The number of attention blocks switched.
    """
    count = 0
    for block in unet.modules():
        if isinstance(block, SABlock):
            if enabled and (block.save_attn or block.rel_positional_embedding is not None):
                raise ValueError("fused attention cannot save attention maps or use relative "
                                 "positional embeddings")
            block.use_flash_attention = enabled
            count += 1
    return count


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``.

    Warm-up keeps AdamW's first, poorly estimated moments from throwing the freshly initialised
    UNet off; the cosine tail lets the final steps settle.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


PREDICTION_TYPES = ("epsilon", "v_prediction")
"""What the network predicts (MONAI scheduler ``prediction_type``)."""

NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "schedule", "beta_start", "beta_end",
                       "prediction_type")
"""The arguments of ``make_scheduler`` that a trained model fixes (``noise_schedule``)."""


def make_scheduler(
    kind: Literal["ddim", "ddpm"],
    *,
    num_train_timesteps: int,
    schedule: str,
    beta_start: float,
    beta_end: float,
    prediction_type: str,
) -> DDIMScheduler | DDPMScheduler:
    """The one place a MONAI noise scheduler is built, for training and for sampling.

    Why one function: the betas a model is trained with must be the betas it is sampled
    with, or every reverse step removes the wrong amount of noise; training
    (``DiffusionModule``) and sampling (``models.sampling.sample``) both build their
    scheduler here from the model's ``noise_schedule``, which comes from the diffusion
    section of the configuration and is saved with the model.

    Args:
        kind: ``ddpm`` (training, and stochastic sampling over every timestep) or ``ddim``.
        num_train_timesteps: length of the forward noising chain.
        schedule: MONAI schedule name (``linear_beta``, ``scaled_linear_beta``,
            ``sigmoid_beta``).
        beta_start: first beta of the schedule.
        beta_end: last beta of the schedule.
        prediction_type: what the network predicts (``PREDICTION_TYPES``).

    Raises:
        ValueError: an unknown ``kind`` or ``prediction_type``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
    if kind not in classes:
        raise ValueError(f"scheduler kind must be 'ddim' or 'ddpm', got {kind!r}")
    return classes[kind](num_train_timesteps=num_train_timesteps, schedule=schedule,
                         beta_start=beta_start, beta_end=beta_end,
                         prediction_type=prediction_type)

LOSS_WEIGHTINGS = ("uniform", "min_snr")
"""How the per-timestep losses are weighted (``DiffusionModule.loss_weighting``)."""

SPEED_OPTIONS = ("compile", "channels_last", "flash_attention", "fused_adamw", "tf32",
                 "cudnn_benchmark")
"""``DiffusionModule`` arguments that change speed, not the model (kept out of ``hparams``)."""


class DiffusionModule(L.LightningModule):
    """DDPM training of the conditional UNet with condition dropout.

    Args:
        spec: condition factors (a ``ConditionSpec`` or its ``to_dict`` form; stored as the
            dict so checkpoints and loggers hold plain data).
        channels: UNet channels per level.
        attention_levels: UNet self-attention per level.
        num_res_blocks: UNet residual blocks per level.
        num_head_channels: UNet channels per attention head.
        norm_num_groups: UNet GroupNorm groups.
        num_train_timesteps: length of the forward noising chain.
        schedule: MONAI noise schedule name (e.g. ``scaled_linear_beta``).
        beta_start: first beta of the schedule.
        beta_end: last beta of the schedule.
        cond_dropout: probability that a sample's whole condition is replaced by nulls, which
            trains the unconditional estimate used by classifier-free guidance.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up length in optimiser steps.
        max_steps: length of the cosine decay; normally the trainer's ``max_steps``.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (1.0: constant after the
            warm-up, so that any checkpoint of a long run is also the end of a shorter one).
        val_seed: seed of the fixed noise and timesteps used for validation, so validation
            losses are comparable across epochs and runs.
        train_seed: seed of the training noise, timesteps and condition dropout. Each step
            draws them from a generator seeded by ``train_seed``, the optimiser step, the batch
            and the rank, not from the global generator: a run resumed from a checkpoint then
            draws what the uninterrupted run drew (the global generator's state is not saved).
        prediction_type: ``epsilon`` or ``v_prediction`` (see ``diffusion_loss``).
        patch_size: pixels per side folded into channels before the UNet (see ``PatchedUNet``).
        loss_weighting: ``uniform`` (plain MSE on the prediction) or ``min_snr`` (Hang et al.
            2023: each timestep's loss weighted by ``min(SNR, gamma)``, expressed for the
            prediction type, so that the many nearly noise-free timesteps, which teach little,
            do not dominate the gradient; it converges several times faster).
        min_snr_gamma: the ``gamma`` of ``min_snr``.
        intensity_transform: ``linear`` or ``sqrt`` (see ``to_model_range``); sampling applies
            the inverse (``models.sampling.sample(intensity=...)``).
        compile: ``torch.compile`` the UNet when fitting starts (after the EMA callback has
            copied the module, so the average model stays a plain module). The first steps
            then pay the compilation; later ones fuse GroupNorm/SiLU/residual arithmetic.
        channels_last: keep convolution weights (and inputs, in ``forward``) in NHWC layout,
            the layout tensor-core convolution kernels prefer.
        flash_attention: see ``build_unet``.
        fused_adamw: the single-kernel AdamW; ``None`` means fused when the parameters are on
            CUDA (where it is several kernels per step fewer) and the default implementation
            elsewhere.
        tf32: on CUDA, allow TF32 tensor cores for float32 matmuls and convolutions when
            fitting starts (a process-wide flag; under bf16-mixed it only affects the few ops
            autocast keeps in float32).
        cudnn_benchmark: on CUDA, let cuDNN time its convolution algorithms for the (fixed)
            training shapes when fitting starts (process-wide flag).

    The speed options are not saved as hyper-parameters: they change neither the weights nor
    the checkpoint format, so a run may be resumed with them switched and a saved model is
    rebuilt without them.

    Every argument is given by the caller: the pipeline passes each one from the diffusion
    section of the configuration (``tasks/diffusion/train.py:module_args``; params.yaml holds
    the defaults, and tests/test_defaults.py fails if one is left out), and everything but the
    speed options is saved in ``hparams``, so a model file is rebuilt with what it was trained
    with. The few defaults left are not settings but the values of model files written before
    an argument existed (and the speed options' "off"): ``prediction_type``
    ``epsilon``, ``patch_size`` 1, ``loss_weighting`` ``uniform``, ``intensity_transform``
    ``linear`` and ``train_seed`` 0 are what those models were trained with, and the schedule
    (``scaled_linear_beta``, betas 0.0005 to 0.0195) is the one every model has had so far.
    """

    def __init__(
        self,
        spec: ConditionSpec | Mapping[str, Any],
        *,
        channels: Sequence[int],
        attention_levels: Sequence[bool],
        num_res_blocks: int | Sequence[int],
        num_head_channels: int | Sequence[int],
        norm_num_groups: int,
        num_train_timesteps: int,
        cond_dropout: float,
        lr: float,
        weight_decay: float,
        warmup_steps: int,
        max_steps: int,
        min_lr_ratio: float,
        val_seed: int,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0005,
        beta_end: float = 0.0195,
        prediction_type: str = "epsilon",
        patch_size: int = 1,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        intensity_transform: str = "linear",
        train_seed: int = 0,
        compile: bool = False,  # noqa: A002 - the name the configuration uses
        channels_last: bool = False,
        flash_attention: bool = False,
        fused_adamw: bool | None = None,
        tf32: bool = False,
        cudnn_benchmark: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        self.spec = spec if isinstance(spec, ConditionSpec) else ConditionSpec.from_dict(spec)
        self.save_hyperparameters(ignore=["spec", *SPEED_OPTIONS])
        self.hparams["spec"] = self.spec.to_dict()
        self.speed_options: dict[str, bool | None] = {
            "compile": compile, "channels_last": channels_last,
            "flash_attention": flash_attention, "fused_adamw": fused_adamw, "tf32": tf32,
            "cudnn_benchmark": cudnn_benchmark}
        if intensity_transform not in INTENSITY_TRANSFORMS:
            raise ValueError(f"intensity_transform must be one of {INTENSITY_TRANSFORMS}, "
                             f"got {intensity_transform!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, "
                             f"got {loss_weighting!r}")
        self.unet = build_unet(channels, attention_levels, num_res_blocks, num_head_channels,
                               norm_num_groups, self.spec, flash_attention=flash_attention,
                               patch_size=patch_size)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.noise_scheduler = make_scheduler("ddpm", **self.noise_schedule)

    @property
    def noise_schedule(self) -> dict[str, Any]:
        """The trained noise schedule, as keyword arguments of ``make_scheduler`` and ``sample``.

        It is part of ``hparams``, so a model file carries the schedule it was trained with and
        sampling rebuilds exactly that one.
        """
        hp = self.hparams
        return {"num_train_timesteps": int(hp["num_train_timesteps"]),
                "schedule": str(hp["schedule"]), "beta_start": float(hp["beta_start"]),
                "beta_end": float(hp["beta_end"]),
                "prediction_type": str(hp["prediction_type"])}

    @property
    def intensity(self) -> str:
        """The intensity transform the model was trained in (``linear`` for older models)."""
        return str(self.hparams.get("intensity_transform", "linear"))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy images ``x`` at ``timesteps`` under condition ``cond``."""
        if self.speed_options["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.unet(x, timesteps, class_labels=cond)

    def on_fit_start(self) -> None:
        """Apply the speed options that need the device, or must follow callback setup."""
        opts = self.speed_options
        if self.device.type == "cuda":
            if opts["tf32"]:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            if opts["cudnn_benchmark"]:
                torch.backends.cudnn.benchmark = True
        if opts["compile"] and getattr(self.unet, "_compiled_call_impl", None) is None:
            # In place (nn.Module.compile): parameter names and state_dict keys are unchanged.
            self.unet.compile()

    def drop_condition(self, cond: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """Replace each sample's whole condition by nulls with probability ``cond_dropout``."""
        p = float(self.hparams["cond_dropout"])
        if p <= 0.0:
            return cond
        drop = torch.rand(cond.shape[0], device=cond.device, generator=generator) < p
        # Built from the spec each time, not kept as a buffer: Lightning's EMA averages every
        # buffer in floating point, which truncates integer indices (3 -> 2 at decay 0.9999).
        nulls = torch.tensor(self.spec.null_indices, dtype=torch.long, device=cond.device)
        return torch.where(drop[:, None], nulls, cond)

    def diffusion_loss(self, images: torch.Tensor, cond: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Prediction MSE at uniformly drawn timesteps for images in [0, 1].

        The target is the noise (``epsilon``) or the velocity ``sqrt(abar) * eps -
        sqrt(1 - abar) * x0`` (``v_prediction``). Velocity keeps the high-noise end learnable:
        there an epsilon model must be very precise for its implied x0 (``eps`` divided by
        ``sqrt(abar)`` ~ 0.02) to be usable, so short runs sample grey noise; a velocity
        model predicts x0 directly at that end.
        """
        x0 = to_model_range(images, self.intensity)
        b = x0.shape[0]
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = torch.randint(0, self.noise_scheduler.num_train_timesteps, (b,), device=x0.device,
                          generator=generator)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self(noisy, t, cond)
        epsilon = self.noise_scheduler.prediction_type == "epsilon"
        target = noise if epsilon else self.noise_scheduler.get_velocity(x0, noise, t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (per_sample * self.loss_weights(t, epsilon)).mean()

    def loss_weights(self, t: torch.Tensor, epsilon: bool) -> torch.Tensor:
        """Per-sample loss weights at timesteps ``t`` (all ones for ``uniform``).

        Min-SNR-gamma clips the x0-space weight ``SNR`` at ``gamma``; in epsilon units that is
        ``min(SNR, gamma) / SNR``, in velocity units ``min(SNR, gamma) / (SNR + 1)``.
        """
        if self.hparams.get("loss_weighting", "uniform") != "min_snr":
            return torch.ones_like(t, dtype=torch.float32)
        abar = self.noise_scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = abar / (1.0 - abar)
        clipped = snr.clamp(max=float(self.hparams.get("min_snr_gamma", 5.0)))
        return clipped / snr if epsilon else clipped / (snr + 1.0)

    def step_generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        """The generator of this training step's noise, timesteps and condition dropout.

        Seeded by where training is (``train_seed``, optimiser step, batch of the epoch, rank),
        all of which a checkpoint restores; ranks draw different noise for their shards.
        """
        step, rank = 0, 0
        if self._trainer is not None:
            step, rank = self.trainer.global_step, self.trainer.global_rank
        gen = torch.Generator(device=device)
        gen.manual_seed(mix_seed(int(self.hparams.get("train_seed", 0)), step, batch_idx, rank))
        return gen

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One DDPM step; logs ``train/loss`` and the current ``lr``."""
        gen = self.step_generator(batch_idx, batch["image"].device)
        cond = self.drop_condition(batch["cond"], gen)
        loss = self.diffusion_loss(batch["image"], cond, gen)
        b = batch["image"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=b)
        if self._trainer is not None:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("lr", lr, on_step=True, on_epoch=False, batch_size=b)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Conditional loss with noise and timesteps fixed by ``val_seed`` and the batch index."""
        device = batch["image"].device
        gen = torch.Generator(device=device)
        gen.manual_seed(int(self.hparams["val_seed"]) * 1_000_003 + batch_idx)
        loss = self.diffusion_loss(batch["image"], batch["cond"], generator=gen)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with a per-step warm-up + cosine schedule."""
        hp = self.hparams
        fused = self.speed_options["fused_adamw"]
        if fused is None and self.device.type == "cuda":
            fused = True
        extra = {"fused": True} if fused else {}
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp["lr"],
                                      weight_decay=hp["weight_decay"], **extra)
        warmup, total, floor = int(hp["warmup_steps"]), int(hp["max_steps"]), hp["min_lr_ratio"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, floor)
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

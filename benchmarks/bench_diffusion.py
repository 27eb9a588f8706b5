"""Diffusion training and sampling throughput against a plain fp32 eager PyTorch loop.

Measures, in one run, for the configured network, image size and batch size, on synthetic
random images with the model's real condition spec (no dataset needed):

  1. plain training: fp32 eager PyTorch, AdamW, the same MONAI DiffusionModelUNet (with the
     project's condition embedding), DDPM noising, condition dropout and epsilon MSE loss;
     forward / backward / step, nothing else.
  2. project training: the real path, a Lightning Trainer fitting ``DiffusionModule`` at the
     precision train_diffusion resolves (bf16-mixed on a GPU or a CPU with native bf16), with the
     callbacks that cost time per step in train_diffusion (EMAWeightAveraging,
     ThroughputMonitor), gradient clipping as configured and the module's speed options
     (compile, channels_last, flash attention, fused AdamW, TF32, cuDNN autotuning; by
     default on for CUDA, off on the CPU where train_diffusion leaves them off).
  3. sampling, DDIM-50 with classifier-free guidance (scale 3): (a) a plain fp32 loop, a
     batch of B with separate conditional and unconditional forward passes per step around
     MONAI's DDIMScheduler; (b) ``models.sampling.sample`` (one forward pass over 2B per
     step), on a GPU with bf16 autocast, the same speed options and the synthesize batch size.
  4. on CUDA, model-FLOPs utilisation: FLOPs of one training step (forward + backward,
     counted once with torch.utils.flop_counter.FlopCounterMode on a meta-device copy) times
     steps per second, over the card's dense bf16 peak; and peak GPU memory per section.

Images/s are timed after --warmup steps (compilation, cuDNN autotuning and allocator growth
happen there) over --steps steps, with the device synchronised at both ends. Both training
paths read the same pre-built CPU batches through a DataLoader. If the project path runs out
of GPU memory at the configured batch size the batch is halved until it fits, and the plain
loop is measured at that same batch (accumulating gradients over micro-batches if fp32 does
not fit); the JSON records both.

Targets (issue 5, H100 with the GPU profile): training >= 2.5 x plain and >= 35 % MFU;
sampling >= 3 x plain.

On a shared CPU machine, --threads 1 keeps OpenMP threads from spinning against other jobs
and --rounds 2 interleaves the paths (the faster round of each is kept).

    python benchmarks/bench_diffusion.py --steps 10 --warmup 3 --rounds 2 --sample-batch 16 \
        --threads 1                                                  # CPU, demo profile
    python benchmarks/bench_diffusion.py --profile gpu --only train  # GPU profile on a GPU
    python benchmarks/bench_diffusion.py --profile gpu --only sample
    python benchmarks/bench_diffusion.py --profile gpu --only train --compile off  # A/B
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, installed or not
    sys.path.insert(0, str(REPO))

#: Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in order against the lower-case
#: device name. Lightning's table lists H200 at 2,000 (the sparse figure), hence our own.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h100 nvl", 835.0), ("h100 pcie", 756.0), ("h100", 989.4),
    ("h200 nvl", 835.0), ("h200", 989.4), ("gh200", 989.4),
    ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0), ("a10g", 70.0),
)
TARGETS = {"train_speedup": 2.5, "train_mfu": 0.35, "sample_speedup": 3.0}
GUIDANCE = 3.0
SPEED_FLAGS = ("compile", "channels_last", "flash_attention", "fused_adamw", "tf32",
               "cudnn_benchmark")


# --- machine and configuration --------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: enough to tell two result files apart."""
    import lightning
    import monai

    info: dict[str, Any] = {
        "host": socket.gethostname(), "cpu": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "lightning": lightning.__version__,
        "monai": monai.__version__, "device": str(device), "device_name": "cpu",
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    device_memory_gib=round(props.total_memory / 1024 ** 3, 1),
                    capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count)
    return info


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """The card's dense bf16 peak (TFLOP/s), ``--peak-tflops`` first; None on the CPU."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def _choice(value: str, device: torch.device) -> bool:
    """``auto`` means on for CUDA, off elsewhere (where train_diffusion leaves it off)."""
    return device.type == "cuda" if value == "auto" else value == "on"


def speed_options(args: argparse.Namespace, device: torch.device) -> dict[str, bool]:
    """The DiffusionModule speed options the project path is measured with."""
    return {flag: _choice(getattr(args, flag), device) for flag in SPEED_FLAGS}


@contextlib.contextmanager
def backend_flags() -> Iterator[None]:
    """Restore process-wide backend flags a section changed (TF32, cuDNN autotuning).

    Why: the module's ``tf32`` / ``cudnn_benchmark`` options set them for the process; the
    plain loop must run with PyTorch's defaults whatever ran before it.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1024 ** 3, 2)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


class Clock:
    """Step-end timestamps of the timed window (optimizer steps ``warmup + 1 .. + steps``).

    The device is synchronised only at the window's two ends, so on a GPU the total is
    exact and the per-step stamps are CPU-side only; on the CPU every stamp is exact and the
    median step (robust to other jobs on a shared machine) is reported too.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.stamps: list[float] = []

    def tick(self, step: int) -> None:
        """Call after optimizer step ``step`` (1-based) has been issued."""
        if step == self.warmup or step == self.warmup + self.steps:
            _sync(self.device)
        if self.warmup <= step <= self.warmup + self.steps:
            self.stamps.append(time.perf_counter())

    def result(self, batch: int) -> dict[str, Any]:
        """Images/s over the window (and of the median step, on the CPU)."""
        seconds = self.stamps[-1] - self.stamps[0]
        durations = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False))
        median = durations[len(durations) // 2]
        exact = self.device.type != "cuda"
        return {"batch": batch, "steps": self.steps, "seconds": seconds,
                "images_per_s": self.steps * batch / seconds,
                "images_per_s_median_step": batch / median if exact else None,
                "step_seconds": [round(d, 4) for d in durations] if exact else None}


def _best(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The faster of two rounds (shared machines only ever slow a round down)."""
    return b if a is None or b["images_per_s"] > a["images_per_s"] else a


# --- model pieces ---------------------------------------------------------------------------


class Setup:
    """The configured network and data shapes, resolved once."""

    def __init__(self, cfg: Any, device: torch.device) -> None:
        from models.conditioning import ConditionSpec
        from tasks.diffusion.train import build_module, resolve_precision

        self.cfg = cfg
        d = cfg.diffusion
        self.d = d
        sites = [s.name for s in cfg.phantom.sites] if "site" in d.conditions else ()
        self.spec = ConditionSpec.build(d.conditions, sites)
        # build_module is the stage's own mapping from params to the module: reuse its
        # hyper-parameters so the benchmark follows any change to it.
        base = build_module(d, self.spec)
        hp = dict(base.hparams)
        hp.pop("spec")
        self.hparams = hp
        self.noise_schedule: dict[str, Any] = dict(base.noise_schedule)
        self.shape = (2, d.image_rows, d.image_cols)
        self.device = device
        accel = "gpu" if device.type == "cuda" else "cpu"
        self.precision = resolve_precision(d.model_copy(update={"accelerator": accel}))

    def unet(self, flash_attention: bool = False) -> torch.nn.Module:
        """A fresh UNet as ``DiffusionModule`` builds it."""
        from models.diffusion import build_unet

        hp = self.hparams
        return build_unet(hp["channels"], hp["attention_levels"], hp["num_res_blocks"],
                          hp["num_head_channels"], hp["norm_num_groups"], self.spec,
                          flash_attention=flash_attention)

    def module(self, options: dict[str, bool]) -> Any:
        """The project's LightningModule with the given speed options."""
        from models.diffusion import DiffusionModule

        return DiffusionModule(self.spec, **self.hparams, **options)

    def schedule(self) -> dict[str, Any]:
        """The trained noise schedule (``DiffusionModule.noise_schedule``) as keyword args."""
        return dict(self.noise_schedule)

    @property
    def prediction_type(self) -> str:
        """What the network is trained to predict (``epsilon`` unless the module says so)."""
        return str(self.noise_schedule.get("prediction_type", "epsilon"))

    def random_cond(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, F) valid (non-null) condition indices."""
        cols = [torch.randint(0, c, (n,), generator=generator) for c in self.spec.cardinalities]
        return torch.stack(cols, dim=1)


def train_flops(setup: Setup, batch: int) -> int:
    """Model FLOPs of one training step (forward + backward) at ``batch``, on the meta device."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = setup.unet()
        x = torch.zeros(batch, *setup.shape)
        t = torch.zeros(batch, dtype=torch.long)
        cond = torch.zeros(batch, len(setup.spec.names), dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(unet(x, t, class_labels=cond), x).backward()
    return int(counter.get_total_flops())


def forward_flops_per_image(setup: Setup) -> int:
    """Model FLOPs of one forward pass for one image (sampling costs 2 per step with guidance)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = setup.unet()
        x = torch.zeros(1, *setup.shape)
        t = torch.zeros(1, dtype=torch.long)
        cond = torch.zeros(1, len(setup.spec.names), dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, t, class_labels=cond)
    return int(counter.get_total_flops())


class SyntheticBatches(torch.utils.data.Dataset):
    """``length`` training batches cycling over a few pre-built random ones (CPU tensors).

    Whole batches are items (the loader uses ``batch_size=None``), so neither path pays a
    per-sample collate that a real run hides in its loader workers.
    """

    def __init__(self, setup: Setup, batch: int, length: int, distinct: int = 4,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.length = length
        self.batches = [{"image": torch.rand(batch, *setup.shape, generator=gen),
                         "cond": setup.random_cond(batch, gen),
                         "index": torch.arange(batch)} for _ in range(distinct)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i % len(self.batches)]


def _loader(data: SyntheticBatches) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=0)


# --- training -------------------------------------------------------------------------------


def plain_train(setup: Setup, batch: int, warmup: int, steps: int, micro: int,
                seed: int) -> dict[str, Any]:
    """Plain fp32 eager loop: images/s over ``steps`` after ``warmup`` optimizer steps."""
    import torch.nn.functional as F

    from models.diffusion import make_scheduler

    device = setup.device
    _reset_memory(device)
    torch.manual_seed(seed)
    unet = setup.unet().to(device)
    hp = setup.hparams
    optimizer = torch.optim.AdamW(unet.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    scheduler = make_scheduler("ddpm", **setup.schedule())
    null = torch.tensor(setup.spec.null_indices, device=device)
    p_drop = float(hp["cond_dropout"])
    timesteps = scheduler.num_train_timesteps
    v_target = setup.prediction_type == "v_prediction"
    loader = _loader(SyntheticBatches(setup, batch, warmup + steps, seed=seed))
    clock = Clock(warmup, steps, device)
    last_loss = torch.zeros(())
    unet.train()
    for i, data in enumerate(loader):
        x0 = data["image"].to(device, non_blocking=True) * 2.0 - 1.0
        cond = data["cond"].to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        for xs, cs in zip(x0.split(micro), cond.split(micro), strict=True):
            drop = torch.rand(cs.shape[0], device=device) < p_drop
            cs = torch.where(drop[:, None], null, cs)
            noise = torch.randn_like(xs)
            t = torch.randint(0, timesteps, (xs.shape[0],), device=device)
            noisy = scheduler.add_noise(xs, noise, t)
            target = scheduler.get_velocity(xs, noise, t) if v_target else noise
            loss = F.mse_loss(unet(noisy, t, class_labels=cs), target) * (xs.shape[0] / batch)
            loss.backward()
            last_loss = loss.detach() * (batch / xs.shape[0])
        optimizer.step()
        clock.tick(i + 1)
    result = {**clock.result(batch), "micro_batch": micro, "peak_gib": _peak_gib(device),
              "final_loss": float(last_loss)}
    del unet, optimizer
    return result


def plain_train_fitting(setup: Setup, batch: int, warmup: int, steps: int,
                        seed: int) -> dict[str, Any]:
    """The plain loop at ``batch``, halving its micro-batch while fp32 runs out of memory."""
    micro = batch
    ooms: list[int] = []
    while True:
        try:
            result = plain_train(setup, batch, warmup, steps, micro, seed)
            return {**result, "oom_micro_batches": ooms}
        except Exception as exc:
            if not _is_oom(exc) or micro == 1:
                raise
        # Outside the except block: its traceback no longer pins the failed step's tensors.
        ooms.append(micro)
        _cleanup()
        micro = max(1, micro // 2)


class StepTimer(L.Callback):
    """Lightning callback feeding a ``Clock`` at the end of every training batch.

    Placed last among the callbacks, so the time includes every other callback's per-step
    work (EMA update, throughput bookkeeping) as in a real run.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stamp the step that just finished."""
        self.clock.tick(trainer.global_step)


def project_train(setup: Setup, batch: int, warmup: int, steps: int, options: dict[str, bool],
                  flops_per_step: int, seed: int) -> dict[str, Any]:
    """The Lightning training path of train_diffusion; images/s after ``warmup`` steps."""
    from lightning.pytorch.callbacks import EMAWeightAveraging, ThroughputMonitor

    device = setup.device
    d = setup.d
    _reset_memory(device)
    L.seed_everything(seed, verbose=False)
    module = setup.module(options)
    module.flops_per_batch = flops_per_step  # read by ThroughputMonitor, as in train_diffusion
    clock = Clock(warmup, steps, device)
    loader = _loader(SyntheticBatches(setup, batch, warmup + steps, seed=seed))
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as root, backend_flags():
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision=setup.precision, max_steps=warmup + steps,
            gradient_clip_val=d.gradient_clip_val or None, logger=False,
            callbacks=[EMAWeightAveraging(decay=d.ema_decay),
                       ThroughputMonitor(batch_size_fn=lambda b: int(b["image"].shape[0])),
                       StepTimer(clock)],
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=0, log_every_n_steps=d.log_every_n_steps, default_root_dir=root)
        trainer.fit(module, train_dataloaders=loader)
        flags = {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark}
    loss = trainer.callback_metrics.get("train/loss_step")
    result = {**clock.result(batch), "peak_gib": _peak_gib(device),
              "precision": setup.precision, "options": options, "backend_flags": flags,
              "final_loss": float(loss) if loss is not None else None,
              "callbacks": ["EMAWeightAveraging", "ThroughputMonitor"],
              "gradient_clip_val": d.gradient_clip_val}
    del trainer, module
    return result


def training(setup: Setup, batch: int, args: argparse.Namespace, options: dict[str, bool],
             peak: float | None) -> dict[str, Any]:
    """Project path (halving the batch on OOM), then the plain loop at the batch that fit."""
    requested = batch
    ooms: list[int] = []
    while True:
        flops = train_flops(setup, batch)
        try:
            project = project_train(setup, batch, args.warmup, args.steps, options, flops,
                                    args.seed)
            break
        except Exception as exc:
            if not _is_oom(exc) or batch == 1:
                raise
        print(f"project path: out of memory at batch {batch}; halving", flush=True)
        ooms.append(batch)
        _cleanup()
        batch //= 2
    _cleanup()
    plain = None
    for round_ in range(args.rounds):
        if round_:
            project = _best(project, project_train(setup, batch, args.warmup, args.steps,
                                                   options, flops, args.seed))
            _cleanup()
        plain = _best(plain, plain_train_fitting(setup, batch, args.warmup, args.steps,
                                                 args.seed))
        _cleanup()
    assert plain is not None
    out: dict[str, Any] = {"configured_batch": setup.d.batch_size,
                           "requested_batch": requested, "batch": batch,
                           "project_oom_batches": ooms, "flops_per_step": flops,
                           "plain": plain, "project": project,
                           "speedup": project["images_per_s"] / plain["images_per_s"]}
    medians = (project["images_per_s_median_step"], plain["images_per_s_median_step"])
    out["speedup_median_step"] = medians[0] / medians[1] if None not in medians else None
    for name in ("plain", "project"):
        r = out[name]
        r["tflops_per_s"] = flops * r["steps"] / r["seconds"] / 1e12
        r["mfu"] = r["tflops_per_s"] / peak if peak else None
    return out


# --- sampling -------------------------------------------------------------------------------


def sampling_weights(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    """UNet weights for sampling, shared by both samplers.

    MONAI zero-initialises each residual block's last convolution and the output
    convolution, so an untrained UNet predicts zero noise everywhere; small random values
    there make both samplers do real, comparable work.
    """
    torch.manual_seed(seed)
    unet = setup.unet()
    with torch.no_grad():
        for param in unet.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(0.0, 0.02)
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _seeded_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Per-seed initial noise exactly as ``models.sampling.sample`` draws it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def plain_sample_once(unet: torch.nn.Module, setup: Setup, cond: torch.Tensor,
                      seeds: list[int], steps: int) -> torch.Tensor:
    """Naive DDIM with guidance: separate conditional and unconditional passes per step."""
    from models.diffusion import make_scheduler

    device = setup.device
    scheduler = make_scheduler("ddim", **setup.schedule())
    scheduler.set_timesteps(steps)
    null = torch.tensor(setup.spec.null_indices, device=device).expand(len(seeds), -1)
    cond = cond.to(device)
    x = _seeded_noise(seeds, setup.shape).to(device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = torch.full((len(seeds),), int(t), dtype=torch.long, device=device)
            eps_c = unet(x, tt, class_labels=cond)
            eps_u = unet(x, tt, class_labels=null)
            eps = eps_u + GUIDANCE * (eps_c - eps_u)
            x, _ = scheduler.step(eps, int(t), x)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def _time(fn: Callable[[int], torch.Tensor], steps: int, device: torch.device, repeats: int
          ) -> tuple[float, torch.Tensor, float | None]:
    """Seconds for ``repeats`` calls, the last output, and the peak GPU memory meanwhile."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = torch.empty(0)
    for _ in range(repeats):
        out = fn(steps)
    _sync(device)
    return time.perf_counter() - start, out, _peak_gib(device)


def _plain_sampler(setup: Setup, weights: dict[str, torch.Tensor], cond: torch.Tensor,
                   seeds: list[int]) -> Callable[[int], torch.Tensor]:
    """(a) fp32 eager, two forward passes per step, warmed up; call with the step count."""
    unet = setup.unet().to(setup.device).eval()
    unet.load_state_dict(weights)
    plain_sample_once(unet, setup, cond, seeds, 2)
    return lambda steps: plain_sample_once(unet, setup, cond, seeds, steps)


@contextlib.contextmanager
def project_flags(options: dict[str, bool], device: torch.device) -> Iterator[None]:
    """The backend flags the module's options set at fit start; sampling wants them too."""
    with backend_flags():
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = options["cudnn_benchmark"]
            if options["tf32"]:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        yield


def _project_sampler(setup: Setup, weights: dict[str, torch.Tensor], cond: torch.Tensor,
                     seeds: list[int], options: dict[str, bool], autocast: torch.dtype | None
                     ) -> tuple[Callable[[int], torch.Tensor], float]:
    """(b) ``models.sampling.sample`` with the module's speed options and autocast, warmed up.

    Returns:
        The sampler (call with the step count) and the relative error of one guided-pass
        noise estimate against the fp32 eager UNet on the same input (the precision check:
        with random weights the sampling trajectory is chaotic, so final images of a bf16 and
        an fp32 run differ even when each step is accurate).
    """
    from models.sampling import sample

    device = setup.device
    module = setup.module(options).to(device).eval()
    module.unet.load_state_dict(weights)
    if options["compile"]:
        module.unet.compile()

    def run(steps: int) -> torch.Tensor:
        return sample(module.unet, "ddim", steps, cond, GUIDANCE, seeds, setup.shape, device,
                      null_cond=setup.spec.null_indices, **setup.schedule(),
                      autocast_dtype=autocast)

    with project_flags(options, device):
        run(2)  # warm-up: compilation, autotuning
        rel_err = _eps_error(setup, weights, module.unet, autocast, len(seeds))
    return run, rel_err


def _eps_error(setup: Setup, weights: dict[str, torch.Tensor], unet: torch.nn.Module,
               autocast: torch.dtype | None, batch: int) -> float:
    """||eps_project - eps_fp32|| / ||eps_fp32|| on one random guided (2B) batch.

    The project UNet sees the sampling batch shape (no recompilation); the fp32 reference
    runs in chunks so it needs little memory.
    """
    device = setup.device
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(2 * batch, *setup.shape, generator=gen).to(device)
    t = torch.randint(0, int(setup.hparams["num_train_timesteps"]), (2 * batch,),
                      generator=gen).to(device)
    null = torch.tensor(setup.spec.null_indices).expand(batch, -1)
    cond = torch.cat([setup.random_cond(batch, gen), null]).to(device)
    reference = setup.unet().to(device).eval()
    reference.load_state_dict(weights)
    with torch.no_grad():
        want = torch.cat([reference(xs, ts, class_labels=cs).float() for xs, ts, cs
                          in zip(x.split(16), t.split(16), cond.split(16), strict=True)])
        ctx = (torch.autocast(device.type, dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
        with ctx:
            got = unet(x, t, class_labels=cond).float()
    return float((got - want).norm() / want.norm())


def sample_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The synthesize stage's rule: ``auto`` is bf16 autocast where training used bf16-mixed."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision.startswith("bf16") else None


def sampling(setup: Setup, args: argparse.Namespace, options: dict[str, bool],
             peak: float | None) -> dict[str, Any]:
    """Plain naive sampler vs ``models.sampling.sample`` with the project's options."""
    device = setup.device
    weights = sampling_weights(setup, args.seed)
    plain_batch = args.plain_sample_batch or setup.d.batch_size
    project_batch = args.sample_batch or setup.cfg.synthesize.batch_size
    n = max(plain_batch, project_batch)
    gen = torch.Generator().manual_seed(args.seed + 1)
    cond = setup.random_cond(n, gen)
    seeds = list(range(9000, 9000 + n))
    steps, repeats = args.sample_steps, args.sample_repeats
    fwd = forward_flops_per_image(setup)
    flops_per_image = 2 * steps * fwd  # conditional + unconditional per step

    def rates(batch: int, seconds: float, peak_gib: float | None) -> dict[str, Any]:
        ips = batch * repeats / seconds
        tf = ips * flops_per_image / 1e12
        return {"batch": batch, "repeats": repeats, "seconds": seconds, "images_per_s": ips,
                "tflops_per_s": tf, "mfu": tf / peak if peak else None, "peak_gib": peak_gib}

    autocast = sample_autocast(setup.cfg.synthesize.precision, device)
    _reset_memory(device)
    plain_run = _plain_sampler(setup, weights, cond[:plain_batch], seeds[:plain_batch])
    project_run, eps_err = _project_sampler(setup, weights, cond[:project_batch],
                                            seeds[:project_batch], options, autocast)
    plain_s = project_s = float("inf")
    plain_gib = project_gib = None
    for _ in range(args.rounds):  # interleaved; the faster round of each is kept
        seconds, plain_images, plain_gib = _time(plain_run, steps, device, repeats)
        plain_s = min(plain_s, seconds)
        with project_flags(options, device):
            seconds, project_images, project_gib = _time(project_run, steps, device, repeats)
        project_s = min(project_s, seconds)
    plain = rates(plain_batch, plain_s, plain_gib)
    project = {**rates(project_batch, project_s, project_gib), "autocast": str(autocast),
               "options": options}
    del plain_run, project_run
    _cleanup()

    k = min(plain_batch, project_batch)
    diff = (project_images[:k].float().cpu() - plain_images[:k].float().cpu()).abs()
    return {"steps": steps, "guidance_scale": GUIDANCE, "forward_flops_per_image": fwd,
            "plain": plain, "project": project,
            "speedup": project["images_per_s"] / plain["images_per_s"],
            "eps_rel_err_vs_fp32": eps_err,
            "max_abs_diff_vs_plain": float(diff.max()),
            "mean_abs_diff_vs_plain": float(diff.mean())}


# --- report ---------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _verdict(value: float | None, target: float, applicable: bool) -> str:
    if not applicable:
        return "target not applicable here"
    if value is None:
        return "unchecked"
    return "OK" if value >= target else "BELOW"


def table(result: dict[str, Any]) -> str:
    """The printed summary."""
    m = result["machine"]
    applicable = result["targets_apply"]
    lines = [f"machine: {m['device_name']} | {m['cpu']}, {m['cpu_cores']} cores | "
             f"torch {m['torch']}, lightning {m['lightning']}, monai {m['monai']} | load "
             f"average {m.get('load_avg_1m_at_start')} at start, "
             f"{m.get('load_avg_1m_at_end')} at end",
             f"network: {result['network']}, images {result['image_shape']}, "
             f"profile {result['profile']}",
             "| section | path | batch | images/s | median-step images/s | TFLOP/s | MFU | "
             "peak GiB | speed-up | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, target_key, mfu_key in (("training", "train_speedup", "train_mfu"),
                                     ("sampling", "sample_speedup", None)):
        sec = result.get(key)
        if sec is None:
            continue
        if "error" in sec:
            lines.append(f"| {key} | | | error: {sec['error']} | | | | | | |")
            continue
        for path in ("plain", "project"):
            r = sec[path]
            speed = _fmt(sec["speedup"], ".2f", " x") if path == "project" else ""
            verdict = ""
            if path == "project":
                verdict = (f"{TARGETS[target_key]} x: "
                           f"{_verdict(sec['speedup'], TARGETS[target_key], applicable)}")
                if mfu_key:
                    verdict += (f"; MFU {TARGETS[mfu_key]:.0%}: "
                                f"{_verdict(r['mfu'], TARGETS[mfu_key], applicable)}")
            batch = str(r["batch"])
            if r.get("micro_batch") not in (None, r["batch"]):
                batch += f" (micro {r['micro_batch']})"
            lines.append(f"| {key} | {path} | {batch} | {r['images_per_s']:.2f} | "
                         f"{_fmt(r.get('images_per_s_median_step'), '.2f')} | "
                         f"{r['tflops_per_s']:.3f} | {_fmt(r['mfu'], '.1%')} | "
                         f"{_fmt(r['peak_gib'], '.2f')} | {speed} | {verdict} |")
    if "sampling" in result and "error" not in result["sampling"]:
        s = result["sampling"]
        lines.append(f"sampling: DDIM-{s['steps']}, guidance {s['guidance_scale']}; noise "
                     f"estimate of the project path vs fp32 eager: relative error "
                     f"{s['eps_rel_err_vs_fp32']:.1e}; final images vs plain on shared seeds: "
                     f"max |diff| {s['max_abs_diff_vs_plain']:.1e} (~0 expected in fp32; with "
                     f"random weights any rounding change grows chaotically over the steps)")
    if "training" in result and "error" not in result["training"]:
        t = result["training"]
        lines.append(f"training: {t['flops_per_step'] / 1e12:.3f} TFLOP per step at batch "
                     f"{t['batch']} (configured {t['configured_batch']}); project options "
                     f"{t['project']['options']}, precision {t['project']['precision']}")
    lines.append(f"peak bf16 used for MFU: {_fmt(result['peak_tflops'], '.1f', ' TFLOP/s')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="parameter override, repeatable")
    p.add_argument("--profile", default=None, help="profile name (profiles/<name>.yaml)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=None,
                   help="training batch (default diffusion.batch_size)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed training steps first")
    p.add_argument("--rounds", type=int, default=1,
                   help="training rounds per path, interleaved; the faster round is kept")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--sample-batch", type=int, default=None,
                   help="project sampler batch (default synthesize.batch_size)")
    p.add_argument("--plain-sample-batch", type=int, default=None,
                   help="plain sampler batch (default diffusion.batch_size)")
    p.add_argument("--sample-repeats", type=int, default=1)
    p.add_argument("--only", choices=("all", "train", "sample"), default="all")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the card, if not known by name")
    for flag in SPEED_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, choices=("auto", "on", "off"),
                       default="auto", help=f"DiffusionModule {flag} (auto: on for CUDA)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's choice); on a shared machine 1 "
                        "avoids OpenMP threads spinning against other jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default benchmarks/results/diffusion-<host>-<date>.json)")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, write the JSON; returns the result."""
    args = parse_args(argv)
    from tasks.config import load_config

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"profile={args.profile}"] if args.profile else [])
    cfg = load_config(args.params, overrides)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    setup = Setup(cfg, device)
    options = speed_options(args, device)
    peak = peak_tflops(device, args.peak_tflops)
    net = cfg.diffusion.network
    machine = machine_info(device)
    is_hopper = any(k in machine["device_name"].lower() for k in ("h100", "h200"))
    result: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None
                                                        else sys.argv[1:])]),
        "machine": machine, "profile": cfg.profile,
        "network": {"channels": net.channels, "attention_levels": net.attention_levels,
                    "num_res_blocks": net.num_res_blocks,
                    "num_head_channels": net.num_head_channels,
                    "norm_num_groups": net.norm_num_groups,
                    "parameters": sum(p.numel() for p in setup.unet().parameters()),
                    "conditions": list(cfg.diffusion.conditions)},
        "image_shape": list(setup.shape), "warmup": args.warmup, "rounds": args.rounds,
        "peak_tflops": peak,
        "targets": TARGETS, "targets_apply": is_hopper and cfg.profile == "gpu",
    }
    batch = args.batch_size or cfg.diffusion.batch_size
    if args.only in ("all", "train"):
        print(f"training: batch {batch}, {args.warmup} + {args.steps} steps ...", flush=True)
        try:
            result["training"] = training(setup, batch, args, options, peak)
        except Exception as exc:  # keep what the other section measures
            result["training"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        _cleanup()
    if args.only in ("all", "sample"):
        print(f"sampling: DDIM-{args.sample_steps} ...", flush=True)
        try:
            result["sampling"] = sampling(setup, args, options, peak)
        except Exception as exc:
            result["sampling"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    if hasattr(os, "getloadavg"):
        machine["load_avg_1m_at_end"] = os.getloadavg()[0]
    out = args.out or (REPO / "benchmarks" / "results" /
                       f"diffusion-{machine['host']}-{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()

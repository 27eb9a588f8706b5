"""Correctness of the diffusion speed options (not their speed: benchmarks/bench_diffusion.py).

Every option must be off by default, must leave the hyper-parameters (and so the resume
check and saved models) untouched, and must compute the same thing up to rounding.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

from models.conditioning import ConditionSpec
from models.diffusion import SPEED_OPTIONS, DiffusionModule, set_flash_attention, to_image_range
from models.sampling import sample
from tests.conftest import diffusion_module

ROWS, COLS = 16, 8
TINY_ATTN = dict(channels=(16, 32), attention_levels=(False, True), num_res_blocks=1,
                 num_head_channels=16, norm_num_groups=8, num_train_timesteps=50)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread (two OpenMP threads crawl when other jobs share the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec() -> ConditionSpec:
    return ConditionSpec.build(["perugini_grade", "metastasis"])


def _module(spec: ConditionSpec, **options: object) -> DiffusionModule:
    """A tiny module with deterministic, non-degenerate weights (MONAI zero-inits some convs)."""
    torch.manual_seed(0)
    module = diffusion_module(spec, **TINY_ATTN, **options)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in sorted(module.unet.named_parameters()):
            if param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return module


def _inputs(spec: ConditionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, ROWS, COLS, generator=gen)
    return x, torch.tensor([3, 20, 41]), torch.tensor([[1, 0], [3, 1], spec.null_indices])


def test_speed_options_are_off_and_not_hyperparameters(spec: ConditionSpec) -> None:
    module = diffusion_module(spec, **TINY_ATTN)
    assert module.speed_options == {"compile": False, "channels_last": False,
                                    "flash_attention": False, "fused_adamw": None,
                                    "tf32": False, "cudnn_benchmark": False}
    assert not set(SPEED_OPTIONS) & set(module.hparams)
    fast = diffusion_module(spec, **TINY_ATTN, compile=True, channels_last=True,
                           flash_attention=True, fused_adamw=True, tf32=True,
                           cudnn_benchmark=True)
    # Same hyper-parameters: a run may resume with the options switched, saved models
    # rebuild without them.
    assert dict(fast.hparams) == dict(module.hparams)
    assert set(SPEED_OPTIONS) == set(fast.speed_options)
    assert fast.state_dict().keys() == module.state_dict().keys()
    rebuilt = DiffusionModule(**dict(fast.hparams))
    rebuilt.load_state_dict(fast.state_dict())


def test_adamw_is_unfused_on_cpu_unless_asked(spec: ConditionSpec) -> None:
    default = diffusion_module(spec, **TINY_ATTN).configure_optimizers()["optimizer"]
    assert not default.defaults.get("fused")
    fused = diffusion_module(spec, **TINY_ATTN, fused_adamw=True).configure_optimizers()
    assert fused["optimizer"].defaults["fused"] is True


def test_compile_is_off_by_default_and_in_place_when_asked(spec: ConditionSpec) -> None:
    plain = diffusion_module(spec, **TINY_ATTN)
    plain.on_fit_start()
    assert plain.unet._compiled_call_impl is None
    compiled = diffusion_module(spec, **TINY_ATTN, compile=True)
    keys = list(compiled.state_dict())
    compiled.on_fit_start()  # torch.compile is lazy: nothing is compiled until a call
    assert compiled.unet._compiled_call_impl is not None
    assert list(compiled.state_dict()) == keys  # no "_orig_mod." prefixes in checkpoints


def test_channels_last_and_flash_attention_compute_the_same(spec: ConditionSpec) -> None:
    base = _module(spec).eval()
    fast = _module(spec, channels_last=True, flash_attention=True).eval()
    fast.load_state_dict(base.state_dict())
    conv = base.unet.conv_in.conv.weight
    assert fast.unet.conv_in.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.is_contiguous()
    x, t, cond = _inputs(spec)
    with torch.no_grad():
        want, got = base(x, t, cond), fast(x, t, cond)
    assert want.abs().mean() > 1e-3  # the comparison is not between zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_set_flash_attention_switches_a_built_unet(spec: ConditionSpec) -> None:
    module = _module(spec).eval()
    x, t, cond = _inputs(spec)
    with torch.no_grad():
        want = module.unet(x, t, class_labels=cond)
        assert set_flash_attention(module.unet) > 0
        got = module.unet(x, t, class_labels=cond)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert set_flash_attention(module.unet, False) > 0


def _reference_ddim(module: DiffusionModule, cond: torch.Tensor, seeds: list[int],
                    steps: int, scale: float) -> torch.Tensor:
    """The guided DDIM loop as sample() ran it before autocast_dtype existed."""
    scheduler = DDIMScheduler(**module.noise_schedule)
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn((2, ROWS, COLS), generator=torch.Generator().manual_seed(s))
                     for s in seeds])
    labels = torch.cat([cond, torch.tensor(module.spec.null_indices).expand(len(seeds), -1)])
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = module.unet(torch.cat([x, x]), torch.full((2 * len(seeds),), int(t)),
                              class_labels=labels)
            eps_c, eps_u = out.chunk(2)
            x = scheduler.step(eps_u + scale * (eps_c - eps_u), int(t), x, eta=0.0)[0]
    return to_image_range(x)


def test_sample_without_autocast_is_bit_identical(spec: ConditionSpec) -> None:
    module = _module(spec)
    cond, seeds = torch.tensor([[1, 0], [3, 1]]), [5, 6]
    kwargs = dict(null_cond=module.spec.null_indices, **module.noise_schedule)
    default = sample(module.unet, "ddim", 3, cond, 3.0, seeds, (2, ROWS, COLS), "cpu", **kwargs)
    explicit = sample(module.unet, "ddim", 3, cond, 3.0, seeds, (2, ROWS, COLS), "cpu",
                      autocast_dtype=None, **kwargs)
    assert torch.equal(default, explicit)
    assert torch.equal(default, _reference_ddim(module, cond, seeds, 3, 3.0))


def test_sample_bf16_autocast_is_close_and_float32(spec: ConditionSpec) -> None:
    module = _module(spec)
    cond, seeds = torch.tensor([[1, 0], [3, 1]]), [5, 6]
    kwargs = dict(null_cond=module.spec.null_indices, **module.noise_schedule)
    fp32 = sample(module.unet, "ddim", 2, cond, 3.0, seeds, (2, ROWS, COLS), "cpu", **kwargs)
    bf16 = sample(module.unet, "ddim", 2, cond, 3.0, seeds, (2, ROWS, COLS), "cpu",
                  autocast_dtype=torch.bfloat16, **kwargs)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().mean() < 0.02


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_diffusion.py"
    spec_ = importlib.util.spec_from_file_location("bench_diffusion", path)
    assert spec_ is not None and spec_.loader is not None
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    return mod


def test_bench_flop_count_and_peak_table(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    from tasks.config import load_config

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    cfg = load_config(params, ["diffusion.image_rows=32", "diffusion.image_cols=16"])
    setup = bench.Setup(cfg, torch.device("cpu"))
    fwd = bench.forward_flops_per_image(setup)
    step = bench.train_flops(setup, 4)
    assert fwd > 0 and 2.5 * 4 * fwd < step < 3.5 * 4 * fwd  # backward ~ 2 x forward
    assert bench.peak_tflops(torch.device("cpu"), None) is None
    assert bench.peak_tflops(torch.device("cpu"), 500.0) == 500.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    assert bench.peak_tflops(torch.device("cuda"), None) == pytest.approx(989.4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert bench.peak_tflops(torch.device("cuda"), None) == pytest.approx(756.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    assert bench.peak_tflops(torch.device("cuda"), None) == pytest.approx(989.4)

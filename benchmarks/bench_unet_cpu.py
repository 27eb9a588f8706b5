"""Throughput of the diffusion UNet on the CPU: fp32 vs bf16 autocast, by batch size.

Why: ``precision: auto`` picks bf16-mixed on CPUs with native bf16 (tasks/common/precision.py)
and ``synthesize.batch_size`` is chosen where sampling is fastest; both rest on these numbers.
The network is built from params.yaml's ``diffusion.network`` (with ``--set`` overrides, e.g.
``--set profile=study`` for the study profile's patch-2 network) at the configured image size,
with random inputs (no data needed). Forward passes are timed in inference mode (sampling: with
guidance, a sampling batch of B is 2B network inputs); training steps with AdamW.

    python benchmarks/bench_unet_cpu.py                  # 2 threads, batches 8..64
    python benchmarks/bench_unet_cpu.py --threads 1 --batches 16 32
    python benchmarks/bench_unet_cpu.py --threads 1 --batches 16 24 --set profile=study
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from pathlib import Path

import torch

from models.conditioning import ConditionSpec
from models.diffusion import build_unet
from tasks.common.precision import cpu_has_native_bf16
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]


SPEC = ConditionSpec.from_dict({"factors": [
    {"name": "perugini_grade", "kind": "int", "values": [0, 1, 2, 3]},
    {"name": "metastasis", "kind": "bool", "values": [False, True]}]})
"""The default condition factors (grade and metastasis), as the project's network embeds them."""


def build(params: Path, overrides: list[str]) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The project's conditional UNet (``models.diffusion.build_unet``) from the parameters."""
    d = load_config(params, overrides).diffusion
    n = d.network
    net = build_unet(n.channels, n.attention_levels, n.num_res_blocks, n.num_head_channels,
                     n.norm_num_groups, SPEC, patch_size=n.patch_size)
    return net, (d.image_rows, d.image_cols)


def images_per_second(net: torch.nn.Module, size: tuple[int, int], batch: int, bf16: bool,
                      train: bool, repeats: int) -> float:
    """Images per second over ``repeats`` timed calls, after two untimed ones (warm-up)."""
    x = torch.randn(batch, 2, *size)
    t = torch.randint(0, 1000, (batch,))
    c = torch.stack([torch.randint(0, k + 1, (batch,)) for k in SPEC.cardinalities], dim=1)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if train:
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> None:
            with cast():
                loss = net(x, t, class_labels=c).float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        net.eval()

        def step() -> None:
            with torch.inference_mode(), cast():
                net(x, t, class_labels=c)
    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 12, 16, 24, 32, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="parameter override, e.g. profile=study")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    net, size = build(args.params, args.overrides)
    parameters = sum(p.numel() for p in net.parameters()) / 1e6
    print(f"# bench_unet_cpu {time.strftime('%Y-%m-%d')} on {platform.node()} "
          f"({args.threads} threads, native bf16: {cpu_has_native_bf16()}), "
          f"image 2 x {size[0]} x {size[1]}, {parameters:.2f} M parameters, "
          f"overrides {args.overrides or 'none'}, torch {torch.__version__}")
    print("| batch | fp32 forward | bf16 forward | fp32 train | bf16 train |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        cells = [images_per_second(net, size, batch, bf16, train, args.repeats)
                 for train in (False, True) for bf16 in (False, True)]
        print(f"| {batch} | " + " | ".join(f"{v:.1f}" for v in cells) + " |")


if __name__ == "__main__":
    main()

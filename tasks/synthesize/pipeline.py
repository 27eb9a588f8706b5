"""The synthesize stage: plan, sample (one share per rank), merge, write, track.

Distributed generation: Lightning Fabric launches one process per device (and node); rank
``r`` of ``W`` generates plan rows ``r, r + W, ...`` and writes them as a shard; rank 0 waits
for every shard, checks that together they cover the plan exactly once, and writes the
dataset. Each rank writes its share in parts of ``PART_BATCHES`` batches
(``work_dir/<run key>/rank-<r>-part-<k>.npz``, atomically); a killed run repeated with the
same model, plan and settings reuses every finished part, so a long generation (the study
profile's ~2,000 images) loses at most one part.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tasks.artifacts.dataset import SYNTHESIS_FILE, read_manifest, write_dataset, write_synthesis
from tasks.artifacts.diffusion_model import ModelRef, load_trained, model_ref
from tasks.common.atomic import atomic_dir, atomic_write_bytes
from tasks.common.montage import write_montage
from tasks.common.precision import auto_precision
from tasks.common.progress import progress
from tasks.config import Config, SynthesizeConfig
from tasks.synthesize.dicom_export import export_dicom
from tasks.synthesize.plan import build_plan, typed_labels
from tasks.synthesize.sampling_run import generate_rows

REPORT_NAME = SYNTHESIS_FILE
PART_BATCHES = 10
"""Batches per saved part of a rank's share: the most work a killed run can lose."""
DICOM_DIR = "dicom"
SPLIT = "synthetic"


@dataclass(frozen=True)
class SynthesizeResult:
    """What a synthesize run produced (rank 0's view)."""

    output: Path
    images: int
    per_group: dict[str, int]
    seconds: float
    images_per_second: float
    world_size: int
    model_version: str
    reused_shards: int
    dicom_files: int = 0
    mlflow_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One short paragraph for the CLI."""
        groups = ", ".join(f"{k} {v}" for k, v in self.per_group.items())
        dicom = (f"\n  DICOM: {self.dicom_files} files in {self.output / DICOM_DIR}"
                 if self.dicom_files else "")
        return (f"synthesize: {self.images} images ({groups}) from model {self.model_version} "
                f"in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s on "
                f"{self.world_size} process(es))\n  dataset: {self.output}{dicom}\n"
                f"  MLflow run: {self.mlflow_run_id}")


def resolve_precision(cfg: SynthesizeConfig) -> str:
    """``auto``: bf16 autocast where training used bf16-mixed (tasks.common.precision)."""
    return auto_precision(cfg.precision, cfg.accelerator)


def _run_key(ref: ModelRef, plan: pd.DataFrame, cfg: SynthesizeConfig, world: int) -> str:
    """A digest of everything that determines the shards' content."""
    settings = {"model": ref.sha256, "sampler": cfg.sampler, "steps": cfg.steps,
                "guidance": cfg.guidance_scale, "eta": cfg.eta, "world": world,
                "precision": resolve_precision(cfg)}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(pd.util.hash_pandas_object(plan[["seed"]].assign(
        cond=plan["cond_index"].map(str)), index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _save_shard(path: Path, indices: np.ndarray, images: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, indices=indices, images=images)
    atomic_write_bytes(path, buffer.getvalue())


def _merge(shard_dir: Path, world: int, plan: pd.DataFrame, size: tuple[int, int]
           ) -> np.ndarray:
    """The plan's images in plan order from every rank's shard; each row exactly once."""
    images = np.zeros((len(plan), 2, *size), dtype=np.float16)
    seen = np.zeros(len(plan), dtype=np.int64)
    for rank in range(world):
        parts = sorted(shard_dir.glob(f"rank-{rank}-part-*.npz"))
        if not parts:
            raise RuntimeError(f"{shard_dir}: rank {rank} wrote no shard; generation incomplete")
        for path in parts:
            with np.load(path) as shard:
                images[shard["indices"]] = shard["images"]
                np.add.at(seen, shard["indices"], 1)
    if not (seen == 1).all():
        raise RuntimeError(f"shards in {shard_dir} cover {int((seen > 0).sum())} of "
                           f"{len(plan)} rows ({int((seen > 1).sum())} twice)")
    return images


def _manifest(plan: pd.DataFrame, cfg: SynthesizeConfig, ref: ModelRef) -> pd.DataFrame:
    manifest = typed_labels(plan).drop(columns=["cond_index"])
    manifest.insert(2, "split", SPLIT)
    manifest["sampler"] = cfg.sampler
    manifest["steps"] = np.int32(cfg.steps)
    manifest["guidance_scale"] = float(cfg.guidance_scale)
    manifest["eta"] = float(cfg.eta)
    manifest["model_version"] = ref.version
    manifest["model_sha256"] = ref.sha256
    manifest["synthetic"] = True
    return manifest


def synthesize(cfg: Config) -> SynthesizeResult | None:
    """Generate the synthetic dataset described by ``cfg.synthesize``.

    Returns:
        The result on global rank 0; None on the other ranks (they only generate).

    Raises:
        FileNotFoundError: no trained model, or no processed dataset for the training labels.
        tasks.synthesize.plan.PlanError: a group this model cannot generate.
    """
    from lightning.fabric import Fabric

    s = cfg.synthesize
    started = time.perf_counter()
    ref = model_ref(Path(s.model or cfg.diffusion.output))
    module, size = load_trained(ref.path)
    manifest = read_manifest(cfg.ingest.output)
    plan = build_plan(s.groups, module.spec, manifest[manifest["split"] == "train"], s.seed)

    # Fabric only launches and connects the ranks; precision is handled inside sample() so
    # that only the network runs in bf16 (guidance and scheduler steps stay fp32).
    fabric = Fabric(accelerator=s.accelerator, devices=s.devices, num_nodes=s.num_nodes,
                    strategy=s.strategy)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    key = _run_key(ref, plan, s, world)
    shard_dir = Path(s.work_dir) / key
    reused = _generate_parts(module, plan.iloc[rank::world], size, s, fabric.device,
                             shard_dir, rank)
    reused = int(fabric.all_reduce(torch.tensor(reused, device=fabric.device),
                                   reduce_op="sum").item()) if world > 1 else reused
    fabric.barrier()
    if rank != 0:
        return None
    images = _merge(shard_dir, world, plan, size)
    seconds = time.perf_counter() - started
    table = _manifest(plan, s, ref)
    per_group = {str(k): int(v) for k, v in table.groupby("group", sort=False).size().items()}
    report = {
        "generator": "synthdx synthesize", "images": len(table), "per_group": per_group,
        "image": {"shape": list(images.shape[1:]), "dtype": "float16",
                  "channels": ["anterior", "posterior"]},
        "model": {"version": ref.version, "sha256": ref.sha256, "path": str(ref.path),
                  "registered_name": ref.registered_name,
                  "registered_version": ref.registered_version,
                  "global_step": ref.global_step, "conditions": module.spec.names},
        "sampler": {"kind": s.sampler, "steps": s.steps, "guidance_scale": s.guidance_scale,
                    "eta": s.eta, "seed": s.seed, "precision": resolve_precision(s)},
        "groups": [g.model_dump(mode="json") for g in s.groups],
        # No timings or resume counts: this file is a DVC-tracked output, and a value that
        # differs between two runs of the same inputs would make every later stage rerun
        # (they go to the console and MLflow instead).
        "world_size": world,
    }
    dicom_files = _write_dataset(Path(s.output), images, table, report,
                                 ref.version if s.dicom.enabled else None)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return SynthesizeResult(
        output=Path(s.output), images=len(table), per_group=per_group, seconds=seconds,
        images_per_second=len(table) / max(seconds, 1e-9), world_size=world,
        model_version=ref.version, reused_shards=reused, dicom_files=dicom_files,
        extra={"report": report})


def _generate_parts(module: Any, mine: pd.DataFrame, size: tuple[int, int],
                    s: SynthesizeConfig, device: torch.device, shard_dir: Path, rank: int
                    ) -> int:
    """Generate this rank's rows part by part, skipping parts a killed run already saved.

    Returns:
        The number of parts reused.
    """
    part_rows = PART_BATCHES * s.batch_size
    starts = range(0, len(mine), part_rows)
    paths = [shard_dir / f"rank-{rank}-part-{k:05d}.npz" for k in range(len(starts))]
    reused = sum(p.is_file() for p in paths)
    todo = sum(min(part_rows, len(mine) - a) for a, p in zip(starts, paths, strict=True)
               if not p.is_file())
    if not todo:
        return reused
    module.to(device)
    bf16 = resolve_precision(s) == "bf16-mixed"
    shard_dir.mkdir(parents=True, exist_ok=True)
    with progress(f"synthesize rank {rank}", todo, "images") as advance:
        for start, path in zip(starts, paths, strict=True):
            if path.is_file():
                continue
            part = mine.iloc[start:start + part_rows]
            images = generate_rows(module, part, size, s, device,
                                   autocast_dtype=torch.bfloat16 if bf16 else None,
                                   progress=_counter(advance))
            _save_shard(path, part["index"].to_numpy(), images)
    return reused


def _counter(advance: Callable[[int], None]) -> Callable[[int, int], None]:
    """Turn generate_rows' (done, total) reports into progress increments."""
    seen = [0]

    def report(done: int, _total: int) -> None:
        advance(done - seen[0])
        seen[0] = done

    return report


def _write_dataset(output: Path, images: np.ndarray, manifest: pd.DataFrame,
                   report: dict[str, Any], dicom_version: str | None) -> int:
    """images.npy + manifest.parquet + synthesis.json + montage.png (+ dicom/), atomically.

    Returns:
        The number of DICOM files written (0 when ``dicom_version`` is None).
    """
    dicom_files = 0
    with atomic_dir(output) as tmp:
        if dicom_version is not None:
            dicom_files = export_dicom(images, manifest, tmp / DICOM_DIR, dicom_version)
            report["dicom"] = {"folder": DICOM_DIR, "files": dicom_files}
        write_dataset(tmp, images, manifest)
        write_montage(images, manifest, tmp / "montage.png", by="group",
                      title="synthetic images per group (anterior | posterior)")
        write_synthesis(tmp, report)
    return dicom_files

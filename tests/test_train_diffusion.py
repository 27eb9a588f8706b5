"""The train_diffusion stage: a real Lightning run on a tiny dataset, then a resume."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from models.sampling import sample
from tasks.artifacts.diffusion_model import MODEL_NAME, SUMMARY_NAME, load_model
from tasks.config import load_config
from tasks.diffusion.train import resolve_precision, train_diffusion
from tests.conftest import PARAMS
from tests.test_diffusion_models import COLS, ROWS, _make_dataset


def _cfg(tmp_path: Path, max_steps: int):
    return load_config(PARAMS, [
        f"diffusion.output={tmp_path / 'model'}", f"diffusion.work_dir={tmp_path / 'work'}",
        f"diffusion.image_rows={ROWS}", f"diffusion.image_cols={COLS}",
        "diffusion.network.channels=[16, 32]", "diffusion.network.attention_levels=[false, false]",
        "diffusion.network.norm_num_groups=8", "diffusion.network.num_head_channels=16",
        "diffusion.num_train_timesteps=50", "diffusion.batch_size=4", "diffusion.warmup_steps=2",
        f"diffusion.max_steps={max_steps}", "diffusion.checkpoint_every_n_steps=3",
        "diffusion.log_every_n_steps=1", "diffusion.accelerator=cpu",
        # DDIM steps must divide the 50 training timesteps (the config refuses 20 of 50).
        "synthesize.steps=10"])


def test_auto_precision_is_bf16_on_gpus_and_on_cpus_that_compute_it(monkeypatch):
    from tasks.common import precision

    cfg = load_config(PARAMS, ["diffusion.accelerator=cpu"])
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision(cfg.diffusion) == "32-true"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(cfg.diffusion) == "bf16-mixed"
    gpu = load_config(PARAMS, ["diffusion.accelerator=gpu"])
    assert resolve_precision(gpu.diffusion) == "bf16-mixed"
    fixed = load_config(PARAMS, ["diffusion.accelerator=cpu", "diffusion.precision=32-true"])
    assert resolve_precision(fixed.diffusion) == "32-true"


def test_native_bf16_probe_matches_torch():
    import torch

    from tasks.common.precision import cpu_has_native_bf16

    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() is bool(expected)


def test_train_then_resume_continues_at_the_right_step(tmp_path, mlflow_uri):
    data = _make_dataset(tmp_path / "processed")
    first = train_diffusion(_cfg(tmp_path, 6), processed=data)
    assert first.global_step == 6 and first.resumed_from is None
    assert (tmp_path / "model" / MODEL_NAME).is_file()
    last = tmp_path / "work" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 6 and state["optimizer_states"]
    assert any("WarmupEMA" in k for k in state["callbacks"])  # EMA state is saved
    assert int(state["averaging_state"]["n_averaged"]) > 0  # the warm-up resumes where it was

    second = train_diffusion(_cfg(tmp_path, 10), processed=data)
    assert second.resumed_from == last
    assert second.global_step == 10
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 10

    runs = mlflow.search_runs(experiment_names=["synthdx"], output_format="list")
    assert len(runs) == 2 and all(r.data.tags["synthdx.stage"] == "train_diffusion"
                                  for r in runs)
    assert all({"train/loss_step", "lr", "train/images_per_second", "train/seconds"}
               <= set(r.data.metrics) for r in runs)
    # The model folder is a DVC output: its summary describes the weights, not the run's speed.
    summary = json.loads((tmp_path / "model" / SUMMARY_NAME).read_text())
    assert summary["global_step"] == 10
    assert not {"seconds", "images_per_second", "resumed_from", "created"} & set(summary)
    assert any(r.data.params.get("cond_dropout") == "0.1" for r in runs)

    grid = tmp_path / "work" / "samples" / "samples_final.png"
    assert grid.is_file() and grid.stat().st_size > 5_000
    client = mlflow.MlflowClient()
    logged = [a.path for r in runs for a in client.list_artifacts(r.info.run_id, "samples")]
    assert "samples/samples_final.png" in logged

    module = load_model(tmp_path / "model")
    images = sample(module.unet, "ddim", 5, torch.tensor([[2, 1]]), 2.0, [7], (2, ROWS, COLS),
                    "cpu", null_cond=module.spec.null_indices, intensity=module.intensity,
                    **module.noise_schedule)
    assert images.shape == (1, 2, ROWS, COLS)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0

    # Throughput (Lightning's ThroughputMonitor) is logged during training.
    assert all("train/device/samples_per_sec" in r.data.metrics for r in runs)

    # Each run registered its EMA model; the latest version samples what the file samples.
    assert second.registered_model is not None
    assert second.registered_model["version"] == "2"
    pyfunc = mlflow.pyfunc.load_model(second.registered_model["model_uri"])
    request = pd.DataFrame({"perugini_grade": [2], "metastasis": [True], "seed": [7]})
    served = pyfunc.predict(request, params={"steps": 5, "guidance_scale": 2.0})
    assert served.shape == (1, 2, ROWS, COLS)
    np.testing.assert_allclose(served, images.numpy(), atol=1e-5)
    # Without params it samples with the project's synthesize settings (its model_config).
    from tasks.diffusion.registry import serving_settings
    assert pyfunc.model_config == serving_settings(_cfg(tmp_path, 10))
    defaults = {p["name"]: p["default"] for p in pyfunc.metadata.get_params_schema().to_dict()}
    assert defaults == serving_settings(_cfg(tmp_path, 10))

    # Resuming a finished run trains nothing and keeps the real loss on record.
    third = train_diffusion(_cfg(tmp_path, 10), processed=data)
    assert third.global_step == 10 and third.final_loss == pytest.approx(second.final_loss)


def test_checkpoint_of_another_model_is_not_resumed(tmp_path, mlflow_uri):
    data = _make_dataset(tmp_path / "processed")
    train_diffusion(_cfg(tmp_path, 3), processed=data)
    other = _cfg(tmp_path, 3).model_copy(deep=True)
    other.diffusion.cond_dropout = 0.3
    summary = train_diffusion(other, processed=data)
    assert summary.resumed_from is None and summary.global_step == 3
    assert (tmp_path / "work" / "checkpoints" / "last.stale-3.ckpt").is_file()


def test_two_process_ddp_on_cpu(tmp_path):
    """`synthdx train-diffusion` with 2 CPU processes (gloo): disjoint data, sound checkpoint."""
    import json
    import os
    import subprocess
    import sys

    data = _make_dataset(tmp_path / "processed")  # 16 training rows: 8 per rank
    sets = [f"ingest.output={data}", "diffusion.devices=2", "diffusion.strategy=ddp",
            "diffusion.max_steps=4", "diffusion.augment=false", "synthesize.steps=10"]
    cfg = _cfg(tmp_path, 4)
    args = [a for s in sets for a in ("--set", s)]
    for key in ("output", "work_dir", "image_rows", "image_cols", "num_train_timesteps",
                "batch_size", "warmup_steps", "checkpoint_every_n_steps", "accelerator"):
        args += ["--set", f"diffusion.{key}={getattr(cfg.diffusion, key)}"]
    net = cfg.diffusion.network
    args += ["--set", f"diffusion.network.channels={net.channels}",
             "--set", "diffusion.network.attention_levels=[false, false]",
             "--set", "diffusion.network.norm_num_groups=8",
             "--set", "diffusion.network.num_head_channels=16"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([str(Path(sys.executable).parent / "synthdx"), "train-diffusion",
                           "--params", str(PARAMS), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ledger = tmp_path / "work" / "ledger"
    ranks = [json.loads((ledger / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["global_step"] == 4 for r in ranks)
    assert ranks[0]["rows"] and ranks[1]["rows"]
    assert ranks[0]["rows"] != ranks[1]["rows"]
    assert set(ranks[0]["rows"][:8]).isdisjoint(ranks[1]["rows"][:8])  # one epoch's shards
    state = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert state["global_step"] == 4
    module = load_model(tmp_path / "model")
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_an_empty_validation_split_trains_without_validation_loss(tmp_path, mlflow_uri):
    """A small internal site can draw no validation patient (hash splits): train anyway."""
    data = _make_dataset(tmp_path / "processed")
    manifest = pd.read_parquet(data / "manifest.parquet")
    manifest["split"] = manifest["split"].replace({"val": "train"})
    manifest.to_parquet(data / "manifest.parquet")
    with pytest.warns(UserWarning, match="split 'val' has no images"):
        result = train_diffusion(_cfg(tmp_path, 3), processed=data)
    assert result.global_step == 3 and (tmp_path / "model" / MODEL_NAME).is_file()

"""What a user reads on the console: help, training progress in a log, no unactionable notices."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from tasks.common.lightning_console import LogProgress, StepRichProgressBar, quiet_lightning
from tests.conftest import PARAMS
from tests.test_diffusion_models import _make_dataset
from tests.test_train_diffusion import _cfg

UNACTIONABLE = ("litlogger", "litmodels", "LeafSpec", "weights_only", "Inferred schema",
                "input example", "does not have many workers", "smaller than the logging interval",
                "Downloading artifacts", "not resumable", "/-2")
"""Console text of notices nobody running synthdx can act on (and the old progress text)."""


@pytest.mark.parametrize("command", ["ingest", "train-diffusion", "synthesize", "run"])
def test_help_shows_flags_as_flags(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()
             if line.strip().startswith("--")}
    assert lines["--help"].split()[1] == "Show"  # the flag, then its help: no value type
    assert "-s, --set KEY=VALUE" in result.output or command == "run"
    flags = {"ingest": "--strict", "train-diffusion": "--resume / --no-resume",
             "synthesize": "--dicom / --no-dicom", "run": "--force"}
    assert re.search(rf"^\s+{re.escape(flags[command])}\s{{2,}}\S", result.output, re.M)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _trainer(step: int, max_steps: int = 100, loss: float = 0.5) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, max_steps=max_steps, current_epoch=step // 10,
                           world_size=1, loggers=[], is_global_zero=True,
                           progress_bar_metrics={"train/loss_step": loss})


def test_log_progress_prints_step_loss_rate_and_eta_at_a_steady_interval():
    clock, lines = _Clock(), []
    bar = LogProgress("train_diffusion", batch_size_fn=len, every_s=30.0, clock=clock,
                      write=lines.append)
    bar.on_train_start(_trainer(0), None)
    for step in range(1, 101):
        clock.now = step * 2.0  # 2 s per step of 4 images
        bar.on_train_batch_end(_trainer(step), None, None, [0] * 4, step - 1)
    # The first step, then every 30 s (15 steps), and the last step.
    steps = [int(re.search(r"step (\d+)/100", line).group(1)) for line in lines]
    assert steps == [1, 16, 31, 46, 61, 76, 91, 100]
    assert lines[1] == ("train_diffusion: step 16/100 (16 %), epoch 1, loss 0.5000, "
                        "2.0 images/s, ETA 2m48s")
    assert lines[-1].endswith("ETA 0s")


def test_log_progress_is_silent_on_other_ranks():
    lines = []
    bar = LogProgress("x", write=lines.append)
    bar.disable()
    bar.on_train_start(_trainer(0), None)
    bar.on_train_batch_end(_trainer(1), None, None, None, 0)
    assert lines == []


def test_rich_bar_of_step_training_has_no_negative_epoch_total():
    bar = StepRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=2000, global_step=120, loggers=[],
                                   progress_bar_metrics={"train/loss_step": 0.1})
    assert bar._get_train_description(7).strip() == "Epoch 7"
    metrics = bar.get_metrics(bar._trainer, None)
    assert metrics["step"] == "120/2000" and "v_num" not in metrics
    bar._trainer.max_epochs = 10
    assert bar._get_train_description(7).strip() == "Epoch 7/9"


def test_quiet_lightning_drops_only_the_listed_notices(caplog):
    quiet_lightning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning,
                      stacklevel=1)
        warnings.warn("The 'train_dataloader' does not have many workers which may be a "
                      "bottleneck.", UserWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning"):
        rank_zero.info("💡 Tip: For seamless cloud logging ...")
        rank_zero.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_classifier_labels_from_a_read_only_array_warn_nothing():
    from models.classifier_data import LabelledImages

    labels = np.array([0, 1, 1])
    labels.setflags(write=False)  # as pandas hands out Arrow-backed columns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = LabelledImages(torch.zeros(3, 2, 8, 4), labels)
    assert data.labels.tolist() == [0.0, 1.0, 1.0]


def test_registered_signature_accepts_left_out_and_missing_conditions(tmp_path):
    from mlflow.models.utils import _enforce_schema

    from models.conditioning import ConditionSpec
    from tasks.config import load_config
    from tasks.diffusion.registry import _signature, serving_settings
    from tests.conftest import PARAMS

    spec = ConditionSpec.build(["perugini_grade", "metastasis"])
    weights = tmp_path / "model.pt"
    torch.save({"hparams": {"spec": spec.to_dict()}, "state_dict": {}, "image_size": [32, 16]},
               weights)  # the model file's layout (models.module_file), without weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        signature = _signature(weights, serving_settings(load_config(PARAMS)))
    assert not [w for w in caught if "Inferred schema" in str(w.message)]
    for request in (pd.DataFrame({"perugini_grade": [2], "metastasis": [True], "seed": [7]}),
                    pd.DataFrame({"perugini_grade": [2, None], "metastasis": [True, None],
                                  "seed": [7, 8]}),
                    pd.DataFrame({"metastasis": [False], "seed": [1]})):
        assert len(_enforce_schema(request, signature.inputs)) == len(request)
    assert signature.outputs.inputs[0].shape == (-1, 2, 32, 16)


def test_piped_training_prints_progress_and_no_unactionable_notices(tmp_path):
    """`synthdx train-diffusion 2>&1 | cat`, as a scheduled run's log records it."""
    data = _make_dataset(tmp_path / "processed")
    cfg = _cfg(tmp_path, 8).diffusion
    net = cfg.network
    sets = [f"ingest.output={data}", "diffusion.max_steps=8", "synthesize.steps=10",
            f"diffusion.network.channels={net.channels}",
            "diffusion.network.attention_levels=[false, false]",
            "diffusion.network.norm_num_groups=8", "diffusion.network.num_head_channels=16",
            *(f"diffusion.{key}={getattr(cfg, key)}" for key in (
                "output", "work_dir", "image_rows", "image_cols", "num_train_timesteps",
                "batch_size", "warmup_steps", "checkpoint_every_n_steps", "accelerator",
                "log_every_n_steps"))]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect"), "COLUMNS": "120"}
    synthdx = str(Path(sys.executable).parent / "synthdx")
    command = (f"set -o pipefail; {synthdx} train-diffusion --params {PARAMS} "
               + " ".join(f"--set '{s}'" for s in sets) + " 2>&1 | cat")
    proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0 and "train_diffusion: 8 steps" in out, out[-4000:]
    # In the flow run, Prefect's log_prints puts its time and flow run name in front.
    progress = [line.split("train_diffusion: ", 1)[1] for line in out.splitlines()
                if "train_diffusion: step " in line]
    assert progress, out
    assert progress[0].startswith("step 1/8 (12 %), epoch 0, loss "), out
    assert progress[-1].startswith("step 8/8 (100 %), epoch 1, loss "), out
    assert all(re.search(r"images/s, ETA \S+$", line) for line in progress), out
    shown = [text for text in UNACTIONABLE if text in out]
    assert not shown, f"{shown} in:\n{out}"
    # Lightning's own messages are printed once, through the stage's log format.
    assert out.count("GPU available: False, used: False") == 1

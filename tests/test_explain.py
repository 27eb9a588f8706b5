"""``synthdx explain``: counterfactual heat maps, their scores against true masks, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from models.conditioning import ConditionSpec
from tasks.artifacts import dataset
from tasks.artifacts.diffusion_model import write_model
from tasks.config import load_config
from tasks.explain.conditions import encode_pair, opposite
from tasks.explain.counterfactual import counterfactuals, ddim_timesteps, make_sampler
from tasks.explain.metrics import score, summarise
from tasks.explain.run import (
    ExplainError,
    evaluate,
    explain_rows,
    explain_study,
    heat_map,
    open_inputs,
)
from tests.conftest import PARAMS, diffusion_module

ROWS, COLS = 32, 16  # processed size; the model works at half of it (area-resized)
N = 6
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only cost


def test_pointing_game_hit_and_miss_on_a_constructed_case() -> None:
    mask = np.zeros((2, 16, 8), bool)
    mask[0, 4:7, 2:5] = True
    heat = np.zeros((2, 16, 8))
    heat[0, 5, 3] = 4.0      # hottest point in the finding
    heat[1, 12, 6] = 1.0     # weaker elsewhere, on the other view
    hit = score(heat, mask)
    assert hit.hit and hit.peak_view == 0 and hit.peak == (5, 3)
    assert hit.energy_fraction == pytest.approx(0.8)
    heat[1, 12, 6] = 6.0     # now the hottest point is outside it
    miss = score(heat, mask)
    assert not miss.hit and miss.peak_view == 1
    assert miss.energy_fraction == pytest.approx(0.4)
    heat[1, 12, 6] = 0.0
    heat[0, 8, 3] = 9.0      # two pixels below the mask: a hit only within the tolerance
    assert not score(heat, mask).hit
    assert score(heat, mask, tolerance=2).hit
    body = np.zeros_like(mask)
    body[:, 2:14, 1:7] = True
    assert score(heat, mask, body).mask_share == pytest.approx(9 / 144)
    total = summarise([hit, miss])
    assert total["n"] == 2 and total["pointing_game"] == 0.5
    assert total["energy_fraction_mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="empty"):
        score(heat, np.zeros_like(mask))


def test_uptake_heat_keeps_what_the_finding_adds() -> None:
    recon = np.zeros((2, 2, 2, 2), np.float32)
    cf = np.zeros_like(recon)
    recon[0, 0, 0, 0] = 0.5   # the finding, removed in the counterfactual
    cf[0, 0, 1, 1] = 0.3      # brighter elsewhere once it is gone (not the finding)
    cf[1, 1, 0, 0] = 0.4      # a finding added to a scan without it
    heat = heat_map(recon, cf, [True, False], "uptake")
    assert heat[0, 0, 0, 0] == pytest.approx(0.5) and heat[0, 0, 1, 1] == 0.0
    assert heat[1, 1, 0, 0] == pytest.approx(0.4) and heat.min() >= 0.0
    assert heat_map(recon, cf, [True, False], "absolute")[0, 0, 1, 1] == pytest.approx(0.3)


def test_opposite_conditions() -> None:
    spec = ConditionSpec.build(["perugini_grade", "metastasis"])
    row = {"perugini_grade": 3, "metastasis": False, "superscan": False}
    assert opposite(row, "amyloid", 3)["perugini_grade"] == 0
    assert opposite({**row, "perugini_grade": 0}, "amyloid", 2)["perugini_grade"] == 2
    assert opposite(row, "metastasis", 3)["metastasis"] is True
    own, other = encode_pair(spec, row, "amyloid", 3)
    assert own == [3, 0] and other == [0, 0]


def _project(root: Path) -> list[str]:
    """A tiny model (random weights), a processed set with masks, and overrides naming them."""
    spec = ConditionSpec.build(["perugini_grade", "metastasis"])
    torch.manual_seed(0)
    module = diffusion_module(spec, channels=[16, 16], attention_levels=[False, False],
                              num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
                              num_train_timesteps=50, prediction_type="v_prediction",
                              intensity_transform="sqrt")
    with torch.no_grad():  # MONAI zeroes the output layer: give every weight a say
        for weight in module.parameters():
            weight.add_(torch.randn_like(weight) * 0.05)
    (root / "model").mkdir(parents=True)
    write_model(root / "model", module, (ROWS // 2, COLS // 2), global_step=0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 0.05, (N, 2, ROWS, COLS)).astype(np.float16)
    amyloid = np.zeros((N, 2, ROWS, COLS), np.float16)
    metastasis = np.zeros_like(amyloid)
    grades, mets = [3, 0, 1, 0, 2, 0], [False, True, False, True, False, False]
    for i in range(N):
        if grades[i]:
            amyloid[i, 0, 8:12, 8:12] = 1.0
        if mets[i]:
            metastasis[i, :, 20:22, 4:6] = 1.0
    manifest = pd.DataFrame({
        "index": np.arange(N), "study_uid": [f"2.25.{1000 + i}" for i in range(N)],
        "split": ["test"] * 5 + ["train"], "site": "aurelia", "perugini_grade": grades,
        "metastasis": mets, "superscan": False})
    (root / "processed").mkdir()
    dataset.write_dataset(root / "processed", images, manifest)
    dataset.write_masks(root / "processed", {"amyloid": amyloid, "metastasis": metastasis})
    return [f"explain.model={root / 'model'}", f"explain.processed={root / 'processed'}",
            f"explain.output={root / 'reports'}", "explain.steps=4", "explain.strength=0.5",
            "explain.batch_size=4", "explain.accelerator=cpu", "explain.precision=32-true",
            "explain.examples=1", "explain.mask_threshold=0.5"]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("explain")
    return root, _project(root)


def test_same_condition_gives_no_heat_and_the_timesteps_reach_the_strength(project) -> None:
    _, sets = project
    inputs = open_inputs(load_config(PARAMS, sets))
    assert ddim_timesteps(50, 0.5, 4) == (6, 12, 18, 24)
    images = torch.rand(2, 2, ROWS // 2, COLS // 2) * 0.1
    cond = torch.tensor([[3, 0], [0, 1]])
    for how in ("ddim_inversion", "noise"):
        sampler = make_sampler(inputs.module.noise_schedule, inputs.module.spec.null_indices,
                               inputs.module.intensity, encode=how, strength=0.5, steps=4,
                               guidance_scale=2.0)
        same = counterfactuals(inputs.module.unet, sampler, images, cond, cond, [1, 2])
        assert same.heat.shape == (2, 2, ROWS // 2, COLS // 2)
        assert np.abs(same.heat).max() == 0.0
        other = counterfactuals(inputs.module.unet, sampler, images, cond,
                                torch.tensor([[0, 0], [0, 0]]), [1, 2])
        assert other.heat.max() > 0.0
        assert other.counterfactual.min() >= 0.0 and other.counterfactual.max() <= 1.0


def test_explain_study_writes_heat_maps_of_both_views(project) -> None:
    root, sets = project
    cfg = load_config(PARAMS, sets)
    inputs = open_inputs(cfg)
    ex = explain_rows(inputs, cfg.explain, [0, 1, 2], "amyloid")
    assert ex.heat.shape == ex.images.shape == (3, 2, ROWS // 2, COLS // 2)
    assert ex.masks is not None and ex.masks.shape == ex.heat.shape
    assert ex.masks[0, 0, 4:6, 4:6].min() == pytest.approx(1.0)  # the mask, resized alike
    result = explain_study(cfg, "2.25.1000", inputs=inputs)
    assert result.figure == root / "reports" / "2.25.1000.png"
    assert result.figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c.split(":")[0] for c in result.captions] == ["amyloid", "metastasis"]
    assert "Perugini 3 -> 0" in result.captions[0] and "none -> metastasis" in result.captions[1]


def test_evaluate_scores_every_positive_study_and_logs_to_mlflow(project, mlflow_uri) -> None:
    root, sets = project
    runner = CliRunner()
    out = runner.invoke(app, ["explain", "--evaluate", "10", *[a for s in sets for a in
                                                                ("--set", s)]])
    assert out.exit_code == 0, out.output
    report = json.loads((root / "reports" / "explain.json").read_text())
    amyloid, metastasis = report["tasks"]["amyloid"], report["tasks"]["metastasis"]
    # Test split only: grades 3, 1, 2 show cardiac uptake; studies 1 and 3 metastases.
    assert amyloid["n"] == 3 and metastasis["n"] == 2
    assert sorted(s["study_uid"] for s in metastasis["studies"]) == ["2.25.1001", "2.25.1003"]
    assert set(amyloid["by_grade"]) == {"1", "2", "3"}
    for t in (amyloid, metastasis):
        assert 0.0 <= t["pointing_game"] <= 1.0 and 0.0 <= t["energy_fraction_mean"] <= 1.0
    html = (root / "reports" / "explain.html").read_text()
    assert "pointing game" in html and html.count("data:image/png;base64,") == 2
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["metrics.amyloid.n"].iloc[0] == 3.0
    assert "metrics.metastasis.pointing_game" in runs.columns


def test_unknown_study_and_missing_masks_are_clear_errors(project, tmp_path) -> None:
    root, sets = project
    args = [a for s in sets for a in ("--set", s)]
    out = CliRunner().invoke(app, ["explain", "--study", "2.25.404", *args])
    assert out.exit_code == 2
    assert "unknown study '2.25.404'" in out.output and "synthdx explain --list" in out.output
    listed = CliRunner().invoke(app, ["explain", "--list", "--split", "train", *args])
    assert listed.exit_code == 0 and "2.25.1005" in listed.output
    assert "2.25.1000" not in listed.output
    bare = tmp_path / "processed"
    bare.mkdir()
    for name in (dataset.IMAGES_FILE, dataset.MANIFEST_FILE):
        (bare / name).write_bytes((root / "processed" / name).read_bytes())
    cfg = load_config(PARAMS, [*sets, f"explain.processed={bare}"])
    with pytest.raises(ExplainError, match="masks"):
        evaluate(cfg, 3)

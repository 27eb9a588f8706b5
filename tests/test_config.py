from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.config import ConfigError, apply_override, dump_config, load_config
from tests.conftest import PARAMS


def test_params_yaml_is_valid_and_round_trips(tmp_path):
    cfg = load_config(PARAMS)
    assert cfg.profile == "demo"
    assert sum(s.role == "internal" for s in cfg.phantom.sites) == 1
    assert len(cfg.phantom.sites) >= 5
    again = tmp_path / "p.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_override_sets_nested_and_list_values():
    cfg = load_config(PARAMS, ["phantom.patients=7", "phantom.sites.1.camera.pixel_mm=3.0",
                               "ingest.split.seed=99"])
    assert cfg.phantom.patients == 7
    assert cfg.phantom.sites[1].camera.pixel_mm == 3.0
    assert cfg.ingest.split.seed == 99


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("phantom.patientz=3", "phantom.patientz: unknown key"),
        ("phantom.patients=-1", "phantom.patients"),
        ("phantom.sites.0.camera.tracer=FDG", "phantom.sites.0.camera.tracer"),
        ("ingest.split.val_fraction=0.6", "ingest.split.val_fraction"),
        ("phantom.sites.9.share=1", "not an index"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_parameters_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, [override])
    assert needle in str(err.value)


def test_two_internal_sites_rejected():
    with pytest.raises(ConfigError, match="exactly one site must have role 'internal'"):
        load_config(PARAMS, ["phantom.sites.1.role=internal"])


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_apply_override_parses_yaml_scalars():
    tree: dict = {}
    apply_override(tree, "a.b=true")
    apply_override(tree, "a.c=[1, 2]")
    assert tree == {"a": {"b": True, "c": [1, 2]}}


def test_cli_reports_bad_key_with_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "config", "--params", str(PARAMS),
                           "--set", "ingest.workerz=2"], capture_output=True, text=True,
                          cwd=PARAMS.parent)
    assert proc.returncode == 2
    assert "ingest.workerz: unknown key" in proc.stderr


def test_cli_config_prints_overridden_tree():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "config", "--params", str(PARAMS),
                           "--set", "phantom.patients=11"], capture_output=True, text=True,
                          cwd=PARAMS.parent, check=True)
    assert "patients: 11" in proc.stdout


def test_gpu_profile_overrides_params_and_set_still_wins():
    cfg = load_config(PARAMS, ["profile=gpu", "diffusion.batch_size=8"])
    assert cfg.profile == "gpu"
    assert (cfg.diffusion.image_rows, cfg.diffusion.image_cols) == (512, 128)
    assert (cfg.ingest.image_rows, cfg.ingest.image_cols) == (512, 128)
    assert cfg.diffusion.batch_size == 8  # the command line beats the profile
    assert cfg.phantom.patients == load_config(PARAMS).phantom.patients  # untouched sections


def test_unknown_profile_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="no file .*nope.yaml for profile 'nope'"):
        load_config(PARAMS, ["profile=nope"])


def test_ddpm_needs_every_training_step():
    with pytest.raises(ConfigError, match="synthesize.steps == diffusion.num_train_timesteps"):
        load_config(PARAMS, ["synthesize.sampler=ddpm", "synthesize.steps=50"])
    cfg = load_config(PARAMS, ["synthesize.sampler=ddpm", "synthesize.steps=1000"])
    assert cfg.synthesize.steps == 1000


def test_ddim_steps_must_divide_the_training_timesteps() -> None:
    with pytest.raises(ConfigError, match="synthesize.steps 12 does not divide"):
        load_config(PARAMS, ["synthesize.steps=12"])
    assert load_config(PARAMS, ["synthesize.steps=25"]).synthesize.steps == 25

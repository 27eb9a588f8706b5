"""params.yaml is the only place defaults live (DESIGN.md, issue 18).

tasks/config.py declares types and bounds; each section model takes its field defaults from its
subtree of params.yaml. These tests fail on any drift: a key of params.yaml (or of a profile)
that the configuration does not know, a field whose default is not params.yaml's value, or a
default written in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter

import tasks.config as config_module
from tasks.config import (
    DEFAULTS_FILE,
    SECTIONS,
    Config,
    ConfigError,
    DiffusionConfig,
    IngestConfig,
    SampleGroup,
    _Strict,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))

#: Defaults written in code, each with its reason. Only list items qualify (they have no place
#: in params.yaml): an omitted condition mapping means "condition on nothing".
CODE_DEFAULTS = {(SampleGroup, "condition")}


def _models() -> list[type[BaseModel]]:
    """Every configuration model of tasks/config.py."""
    found: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [_Strict]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__ == config_module.__name__ and sub not in found:
                found.append(sub)
                todo.append(sub)
    return found


def _subtree(section: str) -> dict[str, Any]:
    node: Any = PARAMS
    for part in [p for p in section.split(".") if p]:
        node = node[part]
    return node


def _as_yaml(model: type[BaseModel], name: str, value: Any) -> Any:
    """A typed field value in the form params.yaml writes it (paths as strings, tuples as lists)."""
    dumped = TypeAdapter(model.model_fields[name].annotation).dump_python(value, mode="json")
    return yaml.safe_load(yaml.safe_dump(dumped))


def _unknown_keys(model: type[BaseModel], tree: dict[str, Any], where: str) -> list[str]:
    """Dotted keys of ``tree`` that ``model`` (and its nested section models) has no field for."""
    unknown = []
    for key, value in tree.items():
        field = model.model_fields.get(key)
        if field is None:
            unknown.append(f"{where}{key}")
            continue
        annotation = field.annotation
        if isinstance(value, dict) and isinstance(annotation, type) and issubclass(
                annotation, BaseModel):
            unknown += _unknown_keys(annotation, value, f"{where}{key}.")
    return unknown


def test_the_defaults_file_is_the_repository_params_yaml() -> None:
    assert DEFAULTS_FILE == REPO / "params.yaml"


def test_every_params_key_is_a_configuration_field() -> None:
    assert _unknown_keys(Config, PARAMS, "") == []


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_profile_key_is_a_configuration_field_and_the_profile_validates(
        profile: Path) -> None:
    overrides = yaml.safe_load(profile.read_text())
    assert _unknown_keys(Config, overrides, "") == []
    assert load_config(REPO / "params.yaml", [f"profile={profile.stem}"]).profile == profile.stem


def test_every_section_has_its_place_in_params_yaml() -> None:
    """A section model names its subtree; the whole tree's mappings are all sections."""
    sections = set(SECTIONS.values())

    def walk(model: type[BaseModel], tree: dict[str, Any], where: str) -> None:
        assert SECTIONS.get(model) == where, f"{model.__name__} should be section {where!r}"
        for key, value in tree.items():
            annotation = model.model_fields[key].annotation
            if isinstance(value, dict) and isinstance(annotation, type) and issubclass(
                    annotation, BaseModel):
                walk(annotation, value, f"{where}.{key}" if where else key)

    walk(Config, PARAMS, "")
    assert len(sections) == len(SECTIONS)


@pytest.mark.parametrize("model", sorted(SECTIONS, key=lambda m: SECTIONS[m]),
                         ids=lambda m: SECTIONS[m] or "(root)")
def test_each_field_default_is_the_params_yaml_value(model: type[BaseModel]) -> None:
    tree = _subtree(SECTIONS[model])
    assert set(model.model_fields) == set(tree), "fields and params.yaml keys differ"
    for name, field in model.model_fields.items():
        assert not field.is_required(), f"{model.__name__}.{name} has no default"
        default = field.get_default(call_default_factory=True)
        assert _as_yaml(model, name, default) == tree[name], f"{SECTIONS[model]}.{name}"


def test_models_without_a_section_carry_no_defaults() -> None:
    """List items (a site, its camera, a sample group) spell out every value in params.yaml."""
    for model in _models():
        if model in SECTIONS:
            continue
        for name, field in model.model_fields.items():
            if (model, name) in CODE_DEFAULTS:
                continue
            assert field.is_required(), f"{model.__name__}.{name} has a default in code"


def test_the_loaded_demo_is_params_yaml_itself() -> None:
    """``Config()`` (every default) and params.yaml loaded are one configuration.

    (Named profile demo on both sides: ``synthdx run --profile`` may have written another
    profile into params.yaml, which loading applies and the defaults do not.)
    """
    assert Config(profile="demo") == load_config(REPO / "params.yaml", ["profile=demo"])


def test_sub_configs_built_in_code_fill_the_rest_from_params_yaml() -> None:
    cfg = IngestConfig(image_rows=48, image_cols=16, workers=2)
    assert cfg.image_rows == 48 and cfg.output == Path(PARAMS["ingest"]["output"])
    partial = DiffusionConfig(network={"channels": [16, 32], "attention_levels": [False, False],
                                       "norm_num_groups": 8})
    assert partial.network.patch_size == PARAMS["diffusion"]["network"]["patch_size"]
    assert partial.lr == PARAMS["diffusion"]["lr"]


def test_a_project_params_file_without_a_section_gets_the_defaults(tmp_path: Path) -> None:
    small = tmp_path / "params.yaml"
    small.write_text(yaml.safe_dump({"phantom": {"patients": 7}}))
    cfg = load_config(small)
    assert cfg.phantom.patients == 7
    assert cfg.diffusion == Config().diffusion


def _declare(defaults: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **body: Any) -> type:
    """Declare a section model ``probe`` against a stand-in for params.yaml."""
    monkeypatch.setattr(config_module, "_DEFAULTS", {"probe": defaults})
    namespace = {"__annotations__": {"steps": "int"}, "__module__": __name__, **body}
    cls = type("Probe", (_Strict,), namespace, section="probe")
    monkeypatch.delitem(SECTIONS, cls)
    return cls


def test_drift_fails_at_import_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _declare({"steps": 3}, monkeypatch)().steps == 3
    with pytest.raises(TypeError, match="probe.extra is no field of Probe"):
        _declare({"steps": 3, "extra": 1}, monkeypatch)
    with pytest.raises(TypeError, match="probe.steps is missing"):
        _declare({}, monkeypatch)
    with pytest.raises(TypeError, match="Probe.steps has a default in code"):
        _declare({"steps": 3}, monkeypatch, steps=4)
    with pytest.raises(TypeError, match="probe.steps: 'many' is not a valid default"):
        _declare({"steps": "many"}, monkeypatch)


def test_a_missing_defaults_section_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module, "_DEFAULTS", {})
    with pytest.raises(ConfigError, match="no section 'probe'"):
        type("Probe", (_Strict,), {"__annotations__": {"steps": "int"}, "__module__": __name__},
             section="probe")


# --- the diffusion model takes what the configuration gives it -----------------------------


def _small_diffusion(**changes: Any) -> DiffusionConfig:
    """The demo's diffusion section with a small network (a fast module to build)."""
    network = {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1,
               "num_head_channels": 8, "norm_num_groups": 4, "patch_size": 1}
    return DiffusionConfig(network=network, **changes)


def test_build_module_passes_every_constructor_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    """No constructor default of DiffusionModule reaches a model the pipeline trains."""
    import inspect

    import tasks.diffusion.train as train
    from models.conditioning import ConditionSpec
    from models.diffusion import DiffusionModule

    passed: dict[str, Any] = {}
    monkeypatch.setattr(train, "DiffusionModule", lambda spec, **kw: passed.update(kw))
    cfg = _small_diffusion()
    train.build_module(cfg, ConditionSpec.build(cfg.conditions))
    wanted = set(inspect.signature(DiffusionModule).parameters) - {"spec"}
    assert sorted(wanted - set(passed)) == []
    assert (passed["schedule"], passed["beta_start"], passed["beta_end"]) == (
        cfg.schedule, cfg.beta_start, cfg.beta_end)


def test_training_and_sampling_build_the_configured_schedule() -> None:
    """One schedule from the config, saved in hparams, rebuilt for sampling by one function."""
    import torch

    from models.conditioning import ConditionSpec
    from models.diffusion import DiffusionModule, make_scheduler
    from tasks.diffusion.train import build_module

    cfg = _small_diffusion(beta_end=0.02)
    module = build_module(cfg, ConditionSpec.build(cfg.conditions))
    assert module.noise_schedule == {
        "num_train_timesteps": cfg.num_train_timesteps, "schedule": cfg.schedule,
        "beta_start": cfg.beta_start, "beta_end": 0.02, "prediction_type": cfg.prediction_type}
    rebuilt = DiffusionModule(**dict(module.hparams))  # what a model file holds
    for kind in ("ddim", "ddpm"):
        sampler = make_scheduler(kind, **rebuilt.noise_schedule)
        assert torch.equal(sampler.betas, module.noise_scheduler.betas)
        assert sampler.prediction_type == cfg.prediction_type
    demo = build_module(_small_diffusion(), ConditionSpec.build(cfg.conditions))
    assert not torch.equal(demo.noise_scheduler.betas, module.noise_scheduler.betas)


def test_a_model_file_without_its_schedule_gets_the_one_every_model_was_trained_with() -> None:
    """Every model file so far stores its schedule; one that did not would get that schedule
    (scaled_linear_beta from 0.0005 to 0.0195), not whatever params.yaml says today."""
    from models.conditioning import ConditionSpec
    from models.diffusion import DiffusionModule
    from tasks.diffusion.train import build_module

    cfg = _small_diffusion(schedule="linear_beta", beta_start=0.0001, beta_end=0.02)
    hparams = dict(build_module(cfg, ConditionSpec.build(cfg.conditions)).hparams)
    for key in ("schedule", "beta_start", "beta_end"):
        del hparams[key]
    schedule = DiffusionModule(**hparams).noise_schedule
    assert (schedule["schedule"], schedule["beta_start"], schedule["beta_end"]) == (
        "scaled_linear_beta", 0.0005, 0.0195)


def test_the_config_refuses_a_schedule_whose_betas_do_not_rise() -> None:
    with pytest.raises(ValueError, match="0 < beta_start < beta_end < 1"):
        _small_diffusion(beta_start=0.02, beta_end=0.01)

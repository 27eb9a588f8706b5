"""One validated configuration tree for every stage.

params.yaml is the serialisation of :class:`Config` and the only place defaults live; every
CLI call loads it, applies ``--set dotted.key=value`` overrides and validates the result, so
a wrong key or value fails before any work starts, with the offending key named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A parameter file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class PopulationConfig(_Strict):
    """Who is scanned at a site: demographics, habitus and disease prevalence."""

    age_mean: Annotated[float, Field(ge=18, le=100)] = 68.0
    age_sd: Annotated[float, Field(ge=0, le=30)] = 11.0
    male_fraction: Fraction = 0.55
    bmi_mean: Annotated[float, Field(ge=15, le=45)] = 26.5
    bmi_sd: Annotated[float, Field(ge=0, le=10)] = 4.5
    metastasis_prevalence: Fraction = 0.25
    superscan_fraction: Fraction = Field(
        0.04, description="Share of metastatic patients whose scan is a superscan."
    )
    amyloid_prevalence: Fraction = Field(
        0.10, description="Share of patients with any cardiac uptake (Perugini 1-3)."
    )
    amyloid_grade_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (0.35, 0.35, 0.30), description="Relative frequency of Perugini grades 1, 2 and 3."
    )


class CameraConfig(_Strict):
    """How a site's gamma camera and protocol turn activity into stored pixel values."""

    manufacturer: str = "Siemens"
    model: str = "Symbia Intevo"
    fwhm_mm_at_10cm: Annotated[float, Field(ge=3, le=25)] = 8.0
    pixel_mm: Annotated[float, Field(ge=1.0, le=6.0)] = 2.4
    counts_millions: Annotated[float, Field(gt=0.01, le=20)] = Field(
        2.0, description="Mean total counts per view (millions) for an average patient."
    )
    scan_speed_cm_min: Annotated[float, Field(gt=1, le=50)] = 14.0
    intensity_scale: Annotated[float, Field(gt=0, le=64)] = Field(
        1.0, description="Stored value per detected count (some consoles rescale on export)."
    )
    background_cps: Annotated[float, Field(ge=0, le=5)] = Field(
        0.15, description="Room / scatter background, mean counts per pixel."
    )
    tracer: Literal["DPD", "HMDP", "MDP"] = "HMDP"
    transfer_syntax: Literal["explicit_le", "implicit_le", "rle", "jpeg_ls", "jpeg2000"] = (
        "explicit_le"
    )


class SiteConfig(_Strict):
    """One imaging site of the phantom."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    role: Literal["internal", "external"]
    share: PositiveFloat = Field(description="Relative share of the phantom's patients.")
    institution: str
    city: str
    camera: CameraConfig = CameraConfig()
    population: PopulationConfig = PopulationConfig()


def _default_sites() -> list[SiteConfig]:
    return []


class PhantomConfig(_Strict):
    """The built-in multi-site bone-scan simulator (the demo data)."""

    output: Path = Path("data/raw")
    patients: Annotated[int, Field(ge=1, le=200_000)] = 1500
    seed: int = 20261123
    rows: Annotated[int, Field(ge=64, le=4096)] = 1024
    cols: Annotated[int, Field(ge=32, le=1024)] = 256
    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        0, description="Worker processes; 0 means one per CPU core."
    )
    confounders: bool = True
    sites: list[SiteConfig] = Field(default_factory=_default_sites)

    @field_validator("sites")
    @classmethod
    def _one_internal_site(cls, sites: list[SiteConfig]) -> list[SiteConfig]:
        if not sites:
            raise ValueError("at least one site is required")
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        internal = [s.name for s in sites if s.role == "internal"]
        if len(internal) != 1:
            raise ValueError(f"exactly one site must have role 'internal', got {internal}")
        return sites


class SplitConfig(_Strict):
    """Patient-level, site-aware split of the internal site."""

    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.15
    test_fraction: Annotated[float, Field(ge=0.0, lt=0.5)] = 0.20
    seed: int = 17


class IngestConfig(_Strict):
    """DICOM archive + labels CSV to a de-identified, normalised dataset."""

    source: Path = Path("data/raw/dicom")
    labels: Path = Path("data/raw/labels.csv")
    output: Path = Path("data/processed")
    quarantine: Path = Field(
        Path("data/quarantine"),
        description="Untouched copies of rejected files; holds identity, so never versioned.",
    )
    image_rows: Annotated[int, Field(ge=16, le=4096)] = 256
    image_cols: Annotated[int, Field(ge=8, le=1024)] = 64
    intensity_percentile: Annotated[float, Field(gt=50, le=100)] = Field(
        99.5,
        description="This percentile of the area-averaged counts (both views) maps to 0.5.",
    )
    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        0, description="Worker processes; 0 means one per CPU core."
    )
    strict: bool = False
    key_env: str = Field(
        "SYNTHDX_PSEUDONYM_KEY",
        description="Environment variable holding the pseudonymisation key (never in the repo).",
    )
    key_file: Path | None = Field(
        None, description="Alternative: a file outside the repository holding the key."
    )
    internal_site: str | None = Field(
        None, description="Internal site name; default: the phantom's internal site."
    )
    split: SplitConfig = SplitConfig()

    @model_validator(mode="after")
    def _fractions(self) -> IngestConfig:
        if self.split.val_fraction + self.split.test_fraction >= 0.8:
            raise ValueError("split.val_fraction + split.test_fraction must be < 0.8")
        return self


class DiffusionNetworkConfig(_Strict):
    """MONAI DiffusionModelUNet shape (2-D, the two views as channels)."""

    channels: list[Annotated[int, Field(ge=4)]] = [32, 64, 64]
    attention_levels: list[bool] = [False, False, True]
    num_res_blocks: Annotated[int, Field(ge=1, le=8)] = 1
    num_head_channels: Annotated[int, Field(ge=4)] = 32
    norm_num_groups: Annotated[int, Field(ge=1)] = 16

    @model_validator(mode="after")
    def _levels(self) -> DiffusionNetworkConfig:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channel count must be a multiple of norm_num_groups")
        return self


class DiffusionConfig(_Strict):
    """Class-conditional diffusion training (stage train_diffusion)."""

    output: Path = Field(Path("data/diffusion"), description="Final model (DVC output).")
    work_dir: Path = Field(Path("data/diffusion_work"),
                           description="Checkpoints kept across killed runs, for resume.")
    image_rows: Annotated[int, Field(ge=16, le=2048)] = 128
    image_cols: Annotated[int, Field(ge=8, le=512)] = 32
    conditions: list[Literal["perugini_grade", "metastasis", "amyloid", "sex", "site"]] = [
        "perugini_grade", "metastasis"]
    cond_dropout: Fraction = 0.1
    network: DiffusionNetworkConfig = DiffusionNetworkConfig()
    num_train_timesteps: Annotated[int, Field(ge=10, le=4000)] = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = "scaled_linear_beta"
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    lr: PositiveFloat = 2e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    max_steps: Annotated[int, Field(ge=1)] = 400
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    gradient_clip_val: Annotated[float, Field(ge=0.0)] = 1.0
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU, 32-true on the CPU.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: Annotated[int, Field(ge=1)] = 1
    strategy: str = "auto"
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    checkpoint_every_n_steps: Annotated[int, Field(ge=1)] = 100
    log_every_n_steps: Annotated[int, Field(ge=1)] = 10
    sample_every_n_epochs: Annotated[int, Field(ge=1)] = Field(
        5, description="A grid of samples per class goes to MLflow this often (and at the end).")
    resume: bool = True
    augment: bool = True
    seed: int = 1234


class MlflowConfig(_Strict):
    """Where runs are tracked; MLFLOW_TRACKING_URI overrides the default SQLite store."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "synthdx"

    def resolved_uri(self) -> str:
        """Return the tracking URI in force: the environment wins over params.

        Why: a team points every stage at its server with one variable, without editing the
        versioned params (which would invalidate every DVC stage).
        """
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


class Config(_Strict):
    """The whole parameter tree (params.yaml)."""

    profile: Literal["demo", "gpu", "tiny", "custom"] = "demo"
    reports_dir: Path = Path("reports")
    mlflow: MlflowConfig = MlflowConfig()
    phantom: PhantomConfig
    ingest: IngestConfig = IngestConfig()
    diffusion: DiffusionConfig = DiffusionConfig()


def _parse_value(raw: str) -> Any:
    """Parse an override value the way YAML would ("3" -> 3, "true" -> True, "[1,2]" -> list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override to a raw parameter tree in place.

    List items are addressed by index (``phantom.sites.0.share=2``). Unknown intermediate keys
    are created so that pydantic, not this function, reports them with the full key path.

    Raises:
        ConfigError: if the assignment has no ``=`` or indexes a list out of range.
    """
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like dotted.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override key {key!r}: {part!r} is not an index of the list")
            if last:
                node[int(part)] = _parse_value(raw)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(raw)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override key {key!r}: {'.'.join(parts[:i])!r} is not a section")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "missing"
                     else f"  {loc}: required key is missing")
    return "\n".join(lines)


def load_config(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Load, override and validate the parameter tree.

    Args:
        path: the YAML parameter file (params.yaml by default).
        overrides: ``dotted.key=value`` strings applied in order after loading.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: with a message naming the file, the key and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameter file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping at the top level")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        source = str(path) + (" with overrides " + " ".join(overrides) if overrides else "")
        raise ConfigError(_format_validation_error(exc, source)) from None


def dump_config(config: Config) -> str:
    """Serialise a configuration back to YAML (the form params.yaml has)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

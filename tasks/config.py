"""One validated configuration tree for every stage.

params.yaml is the serialisation of :class:`Config` and the only place defaults live; every
CLI call loads it, applies ``--set dotted.key=value`` overrides and validates the result, so
a wrong key or value fails before any work starts, with the offending key named.

The models below declare types, bounds and descriptions but no default values: each section
names its place in params.yaml (``class DiffusionConfig(_Strict, section="diffusion")``) and
its fields take their defaults from the repository's params.yaml (``DEFAULTS_FILE``) when the
class is created. A field with a default written in code, a field params.yaml lacks, or a key
of params.yaml no field knows is an error at import, so code and file cannot drift apart
(tests/test_defaults.py states the rule). Models of list items (a site, a sample group) have
no place in params.yaml and so no defaults: every site and group spells out its values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

DEFAULT_PARAMS = Path("params.yaml")
PROFILES_DIR = "profiles"
DEFAULTS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
"""The repository's params.yaml: the defaults of every section (``DEFAULT_PARAMS``, the file a
command reads, is relative to the working directory and may be another project's)."""


class ConfigError(ValueError):
    """A parameter file or override that cannot be used; the message names the key."""


def _read_defaults() -> dict[str, Any]:
    """The parameter tree of ``DEFAULTS_FILE``; without it no section has its defaults."""
    try:
        tree = yaml.safe_load(DEFAULTS_FILE.read_text())
    except OSError as exc:
        raise ConfigError(f"{DEFAULTS_FILE} holds every parameter's default and cannot be "
                          f"read ({exc}); synthdx runs from a checkout of its repository "
                          f"(pip install -e .)") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{DEFAULTS_FILE} must hold a mapping at the top level")
    return tree


_DEFAULTS = _read_defaults()

SECTIONS: dict[type[BaseModel], str] = {}
"""Each section model and its dotted place in params.yaml ("" is the whole tree)."""


def defaults_at(section: str) -> dict[str, Any]:
    """The raw params.yaml subtree of a dotted section path ("" for the root)."""
    node: Any = _DEFAULTS
    for part in [p for p in section.split(".") if p]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            raise ConfigError(f"{DEFAULTS_FILE} has no section {section!r}")
        node = node[part]
    return node


def _has_code_default(value: Any) -> bool:
    """Whether a class attribute gives its field a default (a value or Field(default=...))."""
    if isinstance(value, FieldInfo):
        return value.default is not PydanticUndefined or value.default_factory is not None
    return value is not PydanticUndefined


def _set_section_defaults(cls: type[BaseModel], section: str) -> None:
    """Give every field of ``cls`` its default from params.yaml's ``section`` subtree.

    Runs while pydantic builds the class, before it collects the fields, so each default is
    an ordinary pydantic default (``Model()`` works, ``Model.model_fields[name].default`` is
    the typed value). Each value is validated against the field's type here, so a bad
    default in params.yaml fails at import, naming its key.

    Raises:
        TypeError: on a default written in code, a field params.yaml lacks, a params.yaml key
            no field knows, or a params.yaml value the field's type refuses.
    """
    values = defaults_at(section)
    namespace = vars(sys.modules[cls.__module__])
    own = {name: ann for name, ann in cls.__dict__.get("__annotations__", {}).items()
           if not name.startswith("_") and "ClassVar" not in str(ann)}
    where = f"{DEFAULTS_FILE.name}: {section + '.' if section else ''}"
    unknown = sorted(set(values) - set(own))
    if unknown:
        raise TypeError(f"{where}{unknown[0]} is no field of {cls.__name__}")
    for name, annotation in own.items():
        current = cls.__dict__.get(name, PydanticUndefined)
        if _has_code_default(current):
            raise TypeError(f"{cls.__name__}.{name} has a default in code; defaults live in "
                            f"params.yaml only ({where}{name})")
        if name not in values:
            raise TypeError(f"{where}{name} is missing: every field of {cls.__name__} takes "
                            f"its default from there")
        # Annotations are strings here (``from __future__ import annotations``) and pydantic
        # resolves them only after this hook; the default is typed now, in this module's names.
        hint = eval(annotation, namespace) if isinstance(annotation, str) else annotation
        try:
            default = TypeAdapter(hint).validate_python(values[name])
        except ValidationError as exc:
            raise TypeError(f"{where}{name}: {values[name]!r} is not a valid default: "
                            f"{exc.errors()[0]['msg']}") from None
        setattr(cls, name, FieldInfo.merge_field_infos(current, default=default)
                if isinstance(current, FieldInfo) else default)


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment.

    A subclass declared with ``section="dotted.path"`` takes its defaults from that subtree of
    params.yaml (see ``_set_section_defaults``); one without has none (list items).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def __init_subclass__(cls, section: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if section is not None:
            _set_section_defaults(cls, section)
            SECTIONS[cls] = section


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
ConditionName = Literal["perugini_grade", "metastasis", "amyloid", "sex", "site", "superscan"]


class PopulationConfig(_Strict):
    """Who is scanned at a site: demographics, habitus and disease prevalence."""

    age_mean: Annotated[float, Field(ge=18, le=100)]
    age_sd: Annotated[float, Field(ge=0, le=30)]
    male_fraction: Fraction
    bmi_mean: Annotated[float, Field(ge=15, le=45)]
    bmi_sd: Annotated[float, Field(ge=0, le=10)]
    metastasis_prevalence: Fraction
    superscan_fraction: Fraction = Field(
        description="Share of metastatic patients whose scan is a superscan.")
    amyloid_prevalence: Fraction = Field(
        description="Share of patients with any cardiac uptake (Perugini 1-3).")
    amyloid_grade_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        description="Relative frequency of Perugini grades 1, 2 and 3.")


class CameraConfig(_Strict):
    """How a site's gamma camera and protocol turn activity into stored pixel values."""

    manufacturer: str
    model: str
    fwhm_mm_at_10cm: Annotated[float, Field(ge=3, le=25)]
    pixel_mm: Annotated[float, Field(ge=1.0, le=6.0)]
    counts_millions: Annotated[float, Field(gt=0.01, le=20)] = Field(
        description="Mean total counts per view (millions) for an average patient.")
    scan_speed_cm_min: Annotated[float, Field(gt=1, le=50)]
    intensity_scale: Annotated[float, Field(gt=0, le=64)] = Field(
        description="Stored value per detected count (some consoles rescale on export).")
    background_cps: Annotated[float, Field(ge=0, le=5)] = Field(
        description="Room / scatter background, mean counts per pixel.")
    scatter_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        description="Share of the recorded counts that are Compton scatter accepted by "
                    "the energy window, spread broadly (wider windows and older "
                    "crystals accept more); it lowers the contrast of every finding.")
    tracer: Literal["DPD", "HMDP", "MDP"]
    transfer_syntax: Literal["explicit_le", "implicit_le", "rle", "jpeg_ls", "jpeg2000"]


class SiteConfig(_Strict):
    """One imaging site of the phantom."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")]
    role: Literal["internal", "external"]
    share: PositiveFloat = Field(description="Relative share of the phantom's patients.")
    institution: str
    city: str
    camera: CameraConfig
    population: PopulationConfig


class PhantomConfig(_Strict, section="phantom"):
    """The built-in multi-site bone-scan simulator (the demo data)."""

    output: Path
    patients: Annotated[int, Field(ge=1, le=200_000)]
    seed: int
    rows: Annotated[int, Field(ge=64, le=4096)]
    cols: Annotated[int, Field(ge=32, le=1024)]
    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        description="Worker processes; 0 means one per CPU core.")
    confounders: bool
    truth_folder: str | None = Field(
        description="Folder beside `output` that receives each study's ground-truth finding "
                    "masks (evaluation only, never in the DICOM); null: none.")
    sites: list[SiteConfig]

    @field_validator("truth_folder")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (not name or Path(name).name != name or name in (".", "..")):
            raise ValueError(f"truth_folder must be a plain folder name, got {name!r}")
        return name

    @model_validator(mode="after")
    def _truth_beside_output(self) -> PhantomConfig:
        if self.truth_folder is not None and self.truth_folder == Path(self.output).name:
            raise ValueError(f"truth_folder {self.truth_folder!r} would replace the output "
                             f"folder {self.output}")
        return self

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


class SplitConfig(_Strict, section="ingest.split"):
    """Patient-level, site-aware split of the internal site."""

    val_fraction: Annotated[float, Field(ge=0.0, lt=0.5)]
    test_fraction: Annotated[float, Field(ge=0.0, lt=0.5)]
    seed: int


class IngestConfig(_Strict, section="ingest"):
    """DICOM archive + labels CSV to a de-identified, normalised dataset."""

    source: Path
    labels: Path
    output: Path
    quarantine: Path = Field(
        description="Untouched copies of rejected files; holds identity, so never versioned.")
    image_rows: Annotated[int, Field(ge=16, le=4096)]
    image_cols: Annotated[int, Field(ge=8, le=1024)]
    intensity_percentile: Annotated[float, Field(gt=50, le=100)] = Field(
        description="This percentile of the area-averaged counts (both views) maps to 0.5.")
    workers: Annotated[int, Field(ge=0, le=64)] = Field(
        description="Worker processes; 0 means one per CPU core.")
    strict: bool
    key_env: str = Field(
        description="Environment variable holding the pseudonymisation key (never in the repo).")
    key_file: Path | None = Field(
        description="Alternative: a file outside the repository holding the key.")
    internal_site: str | None = Field(
        description="Internal site name; default: the phantom's internal site.")
    truth: Path | None = Field(
        description="Ground-truth finding masks beside the archive (the phantom's, "
                    "tasks/phantom/truth.py): carried into the dataset as masks.npz for "
                    "evaluation when the folder exists and matches the labels; null for a "
                    "real archive.")
    incremental: bool = Field(
        description="Reuse the cached per-file results of earlier runs for unchanged files.")
    cache: Path | None = Field(
        description="Per-file result cache (incremental ingest); null: cache/ingest beside "
                    "the output folder (data/cache/ingest).")
    pool_min_files: Annotated[int, Field(ge=0)] = Field(
        description="A run with an earlier run's cache and at most this many new or changed "
                    "files processes them in its own process: starting worker processes would "
                    "cost more (0: always worker processes).")
    max_removed_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        description="Refuse a run whose archive lost more than this share of the files the "
                    "last run ingested (an accidental deletion, a half-mounted share).")
    split: SplitConfig

    @model_validator(mode="after")
    def _fractions(self) -> IngestConfig:
        if self.split.val_fraction + self.split.test_fraction >= 0.8:
            raise ValueError("split.val_fraction + split.test_fraction must be < 0.8")
        return self


class DiffusionNetworkConfig(_Strict, section="diffusion.network"):
    """MONAI DiffusionModelUNet shape (2-D, the two views as channels)."""

    channels: list[Annotated[int, Field(ge=4)]]
    attention_levels: list[bool]
    num_res_blocks: Annotated[int, Field(ge=1, le=8)]
    num_head_channels: Annotated[int, Field(ge=4)]
    norm_num_groups: Annotated[int, Field(ge=1)]
    patch_size: Literal[1, 2, 4] = Field(
        description="Pixels per side folded into channels before the UNet (space-to-depth): "
                    "2 gives a quarter of the positions, so a wider network at the same cost.")

    @model_validator(mode="after")
    def _levels(self) -> DiffusionNetworkConfig:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channel count must be a multiple of norm_num_groups")
        return self


class DiffusionSpeedConfig(_Strict, section="diffusion.speed"):
    """Speed options: same model and checkpoints, faster steps (see models/diffusion.py).

    All off in the CPU demo; the GPU profile turns them on (benchmarks/bench_diffusion.py
    measures what each buys).
    """

    compile: bool = Field(description="torch.compile the UNet when fitting starts.")
    channels_last: bool
    flash_attention: bool = Field(description="PyTorch fused SDPA attention.")
    fused_adamw: bool | None = Field(description="null: fused AdamW on CUDA only.")
    tf32: bool
    cudnn_benchmark: bool


class DiffusionConfig(_Strict, section="diffusion"):
    """Class-conditional diffusion training (stage train_diffusion)."""

    output: Path = Field(description="Final model (DVC output).")
    work_dir: Path = Field(description="Checkpoints kept across killed runs, for resume.")
    image_rows: Annotated[int, Field(ge=16, le=2048)]
    image_cols: Annotated[int, Field(ge=8, le=512)]
    conditions: list[ConditionName]
    cond_dropout: Fraction
    network: DiffusionNetworkConfig
    num_train_timesteps: Annotated[int, Field(ge=10, le=4000)]
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = Field(
        description="MONAI noise schedule (models.diffusion.make_scheduler); with beta_start "
                    "and beta_end it is saved with the model, and sampling uses the saved one.")
    beta_start: PositiveFloat = Field(description="The schedule's first beta.")
    beta_end: PositiveFloat = Field(description="The schedule's last beta.")
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        description="What the UNet predicts; velocity trains the high-noise "
                    "end faster, which short runs need.")
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0.0)] = Field(description="AdamW weight decay.")
    min_lr_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="Final learning rate of the cosine decay as a fraction of lr "
                    "(1.0: constant after warm-up).")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        description="min_snr: Min-SNR-gamma timestep weighting (faster convergence).")
    min_snr_gamma: PositiveFloat
    intensity_transform: Literal["linear", "sqrt"] = Field(
        description="sqrt: the model works on the square root of the intensities "
                    "(Poisson variance stabilisation; a dark, clean background).")
    warmup_steps: Annotated[int, Field(ge=0)]
    max_steps: Annotated[int, Field(ge=1)]
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)]
    gradient_clip_val: Annotated[float, Field(ge=0.0)]
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        description="auto: bf16-mixed on a GPU or a CPU with native bf16, else 32-true.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"]
    devices: int | Literal["auto"]
    num_nodes: Annotated[int, Field(ge=1)]
    strategy: str
    num_workers: Annotated[int, Field(ge=0, le=64)]
    checkpoint_every_n_steps: Annotated[int, Field(ge=1)]
    log_every_n_steps: Annotated[int, Field(ge=1)]
    sample_every_n_epochs: Annotated[int, Field(ge=1)] = Field(
        description="A grid of samples per class goes to MLflow this often (and at the end).")
    resume: bool
    augment: bool
    seed: int
    speed: DiffusionSpeedConfig
    registered_model_name: str | None = Field(
        description="MLflow registered model the final EMA model becomes a version of "
                    "(null: log nothing to the registry).")

    @model_validator(mode="after")
    def _divisible(self) -> DiffusionConfig:
        step = self.network.patch_size * 2 ** (len(self.network.channels) - 1)
        if self.image_rows % step or self.image_cols % step:
            raise ValueError(f"image_rows and image_cols must be multiples of {step} "
                             f"(patch_size x 2^(levels - 1)), got {self.image_rows} x "
                             f"{self.image_cols}")
        return self

    @model_validator(mode="after")
    def _betas(self) -> DiffusionConfig:
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"the noise schedule needs 0 < beta_start < beta_end < 1, got "
                             f"beta_start {self.beta_start}, beta_end {self.beta_end}")
        return self


class SampleGroup(_Strict):
    """One block of synthetic images: how many, and the condition values they are asked for.

    Factors of the model that ``condition`` does not name are drawn, per image, from the
    training split's joint label distribution given the named ones, so every synthetic image
    carries a complete, plausible label set (e.g. "enrich site coastal" keeps coastal's own
    disease mix).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    count: Annotated[int, Field(ge=0, le=10_000_000)]
    condition: dict[ConditionName, int | bool | str] = Field(
        default_factory=dict,
        description="Condition values asked for; a factor left out is drawn from the "
                    "training labels (empty: all of them). A list item has no place in "
                    "params.yaml, so this, the meaning of an omitted mapping, is the one "
                    "default written in code (tests/test_defaults.py names it).")


class SynthesizeDicomConfig(_Strict, section="synthesize.dicom"):
    """Optional DICOM export (Multi-frame Grayscale Word SC, SYN) into ``<output>/dicom/``."""

    enabled: bool


class SynthesizeConfig(_Strict, section="synthesize"):
    """Sampling a synthetic dataset from the trained model (stage synthesize)."""

    model: Path | None = Field(description="Trained model folder; default diffusion.output.")
    output: Path
    work_dir: Path = Field(description="Per-rank shards of a distributed run before the merge.")
    sampler: Literal["ddim", "ddpm"]
    steps: Annotated[int, Field(ge=1, le=4000)]
    guidance_scale: Annotated[float, Field(ge=0.0, le=50.0)]
    eta: Annotated[float, Field(ge=0.0, le=1.0)]
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    seed: Annotated[int, Field(ge=0, lt=2**40)] = Field(
        description="Image i of the plan gets seed + i: any image can be regenerated.")
    groups: list[SampleGroup]
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        description="auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"]
    devices: int | Literal["auto"]
    num_nodes: Annotated[int, Field(ge=1)]
    strategy: str
    dicom: SynthesizeDicomConfig

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[SampleGroup]) -> list[SampleGroup]:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        if not groups or sum(g.count for g in groups) == 0:
            raise ValueError("at least one group with count > 0 is required")
        return groups


class AuditEncoderConfig(_Strict, section="audit.encoder"):
    """The in-domain feature encoder trained on the real training split (nothing downloaded)."""

    epochs: Annotated[int, Field(ge=1, le=1000)]
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    lr: PositiveFloat
    feature_dim: Annotated[int, Field(ge=8, le=4096)]
    seed: int


class AuditPrivacyConfig(_Strict, section="audit.privacy"):
    """Nearest-neighbour memorisation check against the training images."""

    quantile: Annotated[float, Field(gt=0.5, le=1.0)] = Field(
        description="Threshold = this quantile of held-out real images' nearest-"
                    "training-image similarity; synthetic images above it are withheld.")
    pairs_shown: Annotated[int, Field(ge=1, le=64)]


class AuditTstrConfig(_Strict, section="audit.tstr"):
    """Train-on-synthetic / test-on-real: the synthetic set's downstream usefulness.

    Per task (amyloidosis, metastasis) one small CNN is trained on the synthetic set and one,
    with the same settings and steps, on as many real training images; both are scored on the
    real validation split. In steps, not epochs, so both get the same training however small
    either set is.
    """

    steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        description="Optimiser steps of each of the four classifiers (0: TSTR off).")
    batch_size: Annotated[int, Field(ge=2, le=4096)] = Field(
        description="Images per step, half positive (balanced sampling).")
    lr: PositiveFloat
    seed: int


class AuditConsistencyConfig(_Strict, section="audit.consistency"):
    """Label consistency: withhold synthetic images whose finding a real-data classifier misses.

    Per task a small CNN is trained on the real training split; a synthetic positive scoring
    below the ``quantile`` of real validation positives, or a negative above ``1 - quantile``
    of real negatives, is withheld from the released set (tasks/audit/consistency.py).
    """

    steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        description="Optimiser steps of each task's classifier (0: check off).")
    batch_size: Annotated[int, Field(ge=2, le=4096)] = Field(
        description="Images per step, half positive (balanced sampling).")
    lr: PositiveFloat
    seed: int
    quantile: Annotated[float, Field(gt=0.0, lt=0.5)] = Field(
        description="Share of real validation images of a class that would fail the check.")
    tasks: list[Literal["amyloidosis", "metastasis"]] = Field(
        description="The tasks whose labels are checked.")


class AuditPromotionConfig(_Strict, section="audit.promotion"):
    """The generator's gate: this audit against the audit of the registry's champion generator.

    The new diffusion model becomes ``@champion`` and its synthetic set is released only when
    no quality or privacy number is worse beyond its tolerance and the FID is lower by more
    than ``margin`` (a share); otherwise it is ``@challenger`` and the champion's released set
    is released again.
    """

    fid_tolerance: Annotated[float, Field(ge=0.0)] = Field(
        description="The FID may rise by at most this share of the champion's.")
    quality_tolerance: Fraction = Field(
        description="Precision and recall may fall, and |two-sample AUC - 0.5| rise, by at "
                    "most this.")
    privacy_tolerance: Fraction = Field(
        description="The withheld share and the median nearest-neighbour NCC may rise by at "
                    "most this.")
    margin: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        description="The FID must fall by more than this share of the champion's.")


class AuditConfig(_Strict, section="audit"):
    """Quality and privacy audit of the synthetic set (stage audit)."""

    synthetic: Path | None = Field(description="Synthetic dataset; default synthesize.output.")
    output: Path = Field(description="audit.json, withheld list, pictures and released/.")
    encoder: AuditEncoderConfig
    privacy: AuditPrivacyConfig
    nearest_k: Annotated[int, Field(ge=1, le=100)] = Field(
        description="k of the k-NN manifolds for precision / recall / coverage.")
    max_real: Annotated[int, Field(ge=10)] = Field(
        description="At most this many real training images enter the quality metrics.")
    msssim_pairs: Annotated[int, Field(ge=2)] = Field(
        description="Random same-class pairs per class for MS-SSIM diversity.")
    two_sample_folds: Annotated[int, Field(ge=2, le=20)]
    pixel_critic_steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        description="Optimiser steps (batches of encoder.batch_size) of the small CNN "
                    "telling real from synthetic pixels, per cross-validation fold; "
                    "0 skips that test (features only).")
    tstr: AuditTstrConfig
    consistency: AuditConsistencyConfig
    seed: int
    promotion: AuditPromotionConfig


TaskName = Literal["amyloidosis", "metastasis"]
RegimeName = Literal["real", "real_limited", "synthetic", "real_limited+synthetic",
                     "real+synthetic"]


class ClassifierNetworkConfig(_Strict, section="classifier.network"):
    """The downstream network: a MONAI 2-D ResNet (widths and depth set here) or DenseNet121."""

    architecture: Literal["resnet", "densenet121"]
    layers: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        description="ResNet basic blocks per stage ([2, 2, 2, 2] is ResNet-18).")
    widths: list[Annotated[int, Field(ge=4, le=2048)]] = Field(
        description="ResNet channels per stage.")
    dropout: Fraction

    @model_validator(mode="after")
    def _stages(self) -> ClassifierNetworkConfig:
        if len(self.layers) != len(self.widths):
            raise ValueError(f"network.layers ({len(self.layers)} stages) and network.widths "
                             f"({len(self.widths)} stages) must have the same length")
        return self


class ClassifierConfig(_Strict, section="classifier"):
    """Downstream classifiers per task and training regime (stage train_classifier)."""

    processed: Path | None = Field(description="Real dataset; default ingest.output.")
    synthetic: Path | None = Field(
        description="Audited synthetic set; default <audit.output>/released.")
    output: Path = Field(description="<output>/<task>/<regime>/seed<k>/ per model.")
    tasks: list[TaskName]
    regimes: list[RegimeName]
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(
        description="One model per seed and regime; differences between regimes are "
                    "judged against the spread between seeds.")
    limited_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="real_limited: this stratified fraction of the internal training "
                    "split (drawn per seed, the same draw in every regime using it).")
    synthetic_per_real: Annotated[float, Field(ge=0.0, le=1000.0)] | None = Field(
        description="The dose of synthetic data: regimes adding synthetic images to "
                    "real ones take round(ratio x n_real) of them (n_real: the regime's "
                    "real images; the limited draw's size for 'synthetic'), drawn per "
                    "seed with the released set's class mix; 0: none; null: the whole "
                    "released set.")
    image_rows: Annotated[int, Field(ge=16, le=2048)] | None = Field(
        description="Input size; default the synthetic set's size (real images are "
                    "area-resized to it, so real and synthetic share one resolution).")
    image_cols: Annotated[int, Field(ge=8, le=512)] | None
    network: ClassifierNetworkConfig
    batch_size: Annotated[int, Field(ge=1, le=4096)]
    max_steps: Annotated[int, Field(ge=1)] = Field(
        description="Optimiser steps per model: the same budget in every regime.")
    val_every_n_steps: Annotated[int, Field(ge=1)] = Field(
        description="Validate (AUC on the internal validation split) every N steps; the "
                    "best weights by that AUC are kept.")
    warmup_steps: Annotated[int, Field(ge=0)]
    lr: PositiveFloat
    weight_decay: Annotated[float, Field(ge=0.0)]
    class_balance: Literal["sampler", "pos_weight", "none"] = Field(
        description="sampler: each batch half positives (rare findings); "
                    "pos_weight: weighted loss.")
    augment: bool
    threshold: Literal["youden", "sensitivity_90", "balanced_accuracy"] = Field(
        description="How the operating threshold is picked on the internal "
                    "validation split (never on test or external data).")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        description="auto: bf16-mixed on a GPU or a CPU with native bf16, else 32-true.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"]
    devices: int | Literal["auto"]
    num_workers: Annotated[int, Field(ge=0, le=64)]
    registered_model_prefix: str | None = Field(
        description="The best model per task (internal validation AUC) "
                    "is registered as <prefix>-<task> with alias "
                    "'champion' by the validate stage (null: no "
                    "registry).")


class PromotionConfig(_Strict, section="validation.promotion"):
    """When a task's best new classifier replaces the registry's ``@champion`` (else challenger).

    Both are scored on the same evaluation cases (internal test split and every external site);
    the per-site and pooled differences are paired DeLong tests.
    """

    tolerance: Fraction = Field(
        description="A site blocks promotion when the new model's AUC there is below the "
                    "champion's by more than this and the drop is significant at alpha.")
    margin: Annotated[float, Field(ge=-1.0, le=1.0)] = Field(
        description="The new model's pooled AUC (every evaluation case) must exceed the "
                    "champion's by more than this.")
    alpha: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="Level of the per-site paired DeLong test (1.0: any drop beyond the "
                    "tolerance blocks, significant or not).")


class CalibrationConfig(_Strict, section="validation.calibration"):
    """How every classifier's scores become probabilities, fitted on internal validation only."""

    method: Literal["platt", "temperature", "isotonic", "none"] = Field(
        description="platt: slope and bias on the logit (undoes the balanced sampler's prior "
                    "shift); temperature: slope only; isotonic: scikit-learn's isotonic "
                    "regression; none: scores as they are.")
    target_ece: Annotated[float, Field(gt=0.0, lt=1.0)] = Field(
        description="Goal for the calibrated ECE on the internal test set (reported, not "
                    "enforced), where it has calibration_bins positives and negatives.")


class AbstentionConfig(_Strict, section="validation.abstention"):
    """Refer uncertain cases to a reader; uncertainty is the seeds' disagreement."""

    coverage: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="Share of internal validation cases accepted; the uncertainty threshold "
                    "is chosen there and applied unchanged everywhere else.")
    min_auc: Annotated[float, Field(ge=0.5, lt=1.0)] = Field(
        description="The check 'accuracy on accepted cases above accuracy on all' applies to "
                    "a regime at a site where its AUC exceeds this.")


class ValidateConfig(_Strict, section="validation"):
    """Every classifier on the internal test split and each external site (stage validate)."""

    classifiers: Path | None = Field(description="Default classifier.output.")
    output: Path = Field(description="validation.json, validation.html, "
                                     "validation_metrics.json, validation/.")
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = Field(
        description="Stratified bootstrap resamples for the AUC confidence interval.")
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)]
    calibration_bins: Annotated[int, Field(ge=2, le=100)]
    age_bands: list[float] = Field(description="Edges of the age bands of the subgroup table.")
    comparisons: list[tuple[RegimeName, RegimeName]] = Field(
        description="(with, without) regime pairs compared case by case (DeLong).")
    seed: int
    promotion: PromotionConfig
    calibration: CalibrationConfig
    abstention: AbstentionConfig

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"age_bands must be at least two increasing edges, got {edges}")
        return edges


class MlflowConfig(_Strict, section="mlflow"):
    """Where runs are tracked; MLFLOW_TRACKING_URI overrides the default SQLite store."""

    tracking_uri: str
    experiment: str

    def resolved_uri(self) -> str:
        """Return the tracking URI in force: the environment wins over params.

        Why: a team points every stage at its server with one variable, without editing the
        versioned params (which would invalidate every DVC stage).
        """
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


class DriftConfig(_Strict, section="drift"):
    """Per-site drift of each ingest against the data the current champion was trained on.

    The new studies of every site (those not in the champion's reference) are compared with the
    reference's studies of that site; a site is flagged when a value moves beyond its threshold,
    and named when it is new or has a new camera or tracer (stage drift).
    """

    output: Path = Field(description="The drift table (JSON); a Markdown copy is logged.")
    min_new_studies: Annotated[int, Field(ge=1)] = Field(
        description="Fewer new studies at a site: its numbers are shown but not judged.")
    smd: PositiveFloat = Field(
        description="Flag when the standardised mean difference of an intensity statistic or "
                    "of the counts exceeds this (in either direction).")
    pixel_mm: PositiveFloat = Field(
        description="Flag when the mean pixel spacing changes by more than this share.")
    prevalence: Fraction = Field(
        description="Flag when a finding's share (metastasis, amyloid) moves by more than this.")
    feature_shift: PositiveFloat = Field(
        description="Flag when the audit encoder's mean embedding moves by more than this "
                    "(root mean square over dimensions, in reference standard deviations).")


StageGroup = Literal["phantom", "ingest", "drift", "train_diffusion", "synthesize", "audit",
                     "train_classifier", "validate"]


class PipelineConfig(_Strict, section="pipeline"):
    """How ``synthdx run`` runs the stages (no stage depends on it: changing it reruns nothing)."""

    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        description="Extra attempts for a stage that fails (a flaky worker, a full disk).")
    retry_delay_seconds: Annotated[float, Field(ge=0, le=3600)]
    max_parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        description="Most stages run at once when the DAG allows (the classifier matrix); "
                    "CPU threads are shared out between them.")
    exclusive: list[StageGroup] = Field(
        description="Stage groups (dvc.yaml keys) that run alone with every CPU core: long "
                    "multi-threaded stages, whose thread budget is fixed when they start.")


class ReaderStudyConfig(_Strict, section="reader_study"):
    """The reader study (visual Turing test): ``synthdx reader-study create|serve|report``."""

    output: Path = Field(description="The study folder: study.json, images.npy, study.db.")
    database: str | None = Field(
        description="SQLAlchemy URL of the answers database (postgresql://... at team scale); "
                    "null: sqlite in the study folder. SYNTHDX_READER_STUDY_DB wins.")
    released: Path | None = Field(description="Default: <audit.output>/released.")
    processed: Path | None = Field(description="Default: ingest.output.")
    real_splits: list[Literal["train", "val", "test", "external"]] = Field(
        min_length=1, description="Splits the real images are drawn from (held-out ones).")
    cases: Annotated[int, Field(ge=2, le=100_000)] = Field(
        description="Cases per study, half real and half synthetic (even).")
    seed: int
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]
    session_minutes: Annotated[float, Field(gt=0, le=7 * 24 * 60)] = Field(
        description="A login expires this long after it was made.")
    report: Path = Field(description="The report's path without suffix (.json and .html).")
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)]

    @field_validator("cases")
    @classmethod
    def _even(cls, cases: int) -> int:
        if cases % 2:
            raise ValueError(f"cases must be even (half real, half synthetic), got {cases}")
        return cases

    def database_url(self) -> str:
        """The answers database in force: SYNTHDX_READER_STUDY_DB, ``database``, or SQLite.

        Why the environment wins: a team's PostgreSQL URL carries a password, which must not
        be written into the versioned params.yaml.
        """
        url = os.environ.get("SYNTHDX_READER_STUDY_DB") or self.database
        return url or f"sqlite:///{Path(self.output).resolve() / 'study.db'}"


class ExplainConfig(_Strict, section="explain"):
    """Counterfactual heat maps from the diffusion model (``synthdx explain``).

    A processed scan is encoded (DDIM inversion, or noising) part of the way into the trained
    noise schedule, then regenerated twice from there: under its own condition and under the
    opposite one (amyloid -> Perugini 0, metastasis -> none, and the reverse); the heat map is
    the difference of the two.
    """

    model: Path | None = Field(description="Trained diffusion model folder; default: "
                                           "diffusion.output.")
    processed: Path | None = Field(description="Processed dataset; default: ingest.output.")
    output: Path = Field(description="Heat-map PNGs, explain.json and explain.html.")
    encode: Literal["ddim_inversion", "noise"] = Field(
        description="ddim_inversion: run DDIM backwards under the scan's own condition "
                    "(deterministic); noise: add seeded Gaussian noise (SDEdit).")
    strength: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="How far into the noise schedule the scan is encoded (fraction of the "
                    "training timesteps): more lets the condition change more.")
    steps: Annotated[int, Field(ge=1, le=1000)] = Field(
        description="DDIM steps of the inversion and of each regeneration.")
    guidance_scale: Annotated[float, Field(ge=0.0, le=20.0)] = Field(
        description="Classifier-free guidance of both regenerations.")
    heat: Literal["uptake", "absolute"] = Field(
        description="uptake: the intensity the finding accounts for (own minus counterfactual "
                    "where it is removed, the reverse where it is added; cold changes are 0); "
                    "absolute: |own - counterfactual|.")
    positive_grade: Annotated[int, Field(ge=1, le=3)] = Field(
        description="Perugini grade asked for when amyloid is added to a negative scan.")
    mask_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        description="Share of a pixel (at the model's size) the true finding must cover for "
                    "the pixel to count as inside it.")
    tolerance: Annotated[int, Field(ge=0, le=16)] = Field(
        description="Pointing game: pixels the hottest point may lie outside the mask.")
    smooth_sigma: Annotated[float, Field(ge=0.0, le=8.0)] = Field(
        description="Gaussian smoothing (pixels) of the heat map before its hottest region "
                    "is taken (0: the single hottest pixel).")
    evaluate_splits: list[Literal["train", "val", "test", "external"]] = Field(
        min_length=1, description="Splits `--evaluate N` draws its studies from.")
    examples: Annotated[int, Field(ge=0, le=50)] = Field(
        description="Studies per task shown in explain.html.")
    batch_size: Annotated[int, Field(ge=1, le=1024)]
    seed: int
    precision: Literal["auto", "32-true", "bf16-mixed"]
    accelerator: Literal["auto", "cpu", "gpu", "cuda"]


class Config(_Strict, section=""):
    """The whole parameter tree (params.yaml)."""

    profile: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = Field(
        description="Overrides from profiles/<profile>.yaml applied over this file "
                    "(demo: none, this file is the demo).")
    reports_dir: Path
    mlflow: MlflowConfig
    phantom: PhantomConfig
    ingest: IngestConfig
    diffusion: DiffusionConfig
    synthesize: SynthesizeConfig
    audit: AuditConfig
    classifier: ClassifierConfig
    validation: ValidateConfig
    pipeline: PipelineConfig
    drift: DriftConfig
    reader_study: ReaderStudyConfig
    explain: ExplainConfig

    @model_validator(mode="after")
    def _sampler_steps(self) -> Config:
        """The sampler's step rules, checked once here (models/sampling.py states why)."""
        s, d = self.synthesize, self.diffusion
        if s.sampler == "ddpm" and s.steps != d.num_train_timesteps:
            raise ValueError(f"synthesize.sampler ddpm needs synthesize.steps == "
                             f"diffusion.num_train_timesteps ({d.num_train_timesteps}), "
                             f"got {s.steps}; use ddim for fewer steps")
        if s.sampler == "ddim" and d.num_train_timesteps % s.steps:
            divisors = [n for n in range(10, 101) if d.num_train_timesteps % n == 0]
            raise ValueError(f"synthesize.steps {s.steps} does not divide "
                             f"diffusion.num_train_timesteps ({d.num_train_timesteps}): MONAI's "
                             f"DDIM strides by T // steps while its timesteps are rounded from a "
                             f"linspace, so they disagree; choose a divisor, e.g. {divisors}")
        return self


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


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file holding a mapping, or a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameter file {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping at the top level")
    return tree


def _profile_path(params: Path, profile: Any) -> Path | None:
    """The overrides file of a profile (``profiles/<name>.yaml`` beside params), if any.

    ``demo`` is params.yaml itself; any other profile must have its file, so a typo in
    ``profile`` fails instead of silently training the demo model.
    """
    if profile in (None, "demo"):
        return None
    if not isinstance(profile, str) or not profile.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"profile: {profile!r} is not a profile name")
    path = params.parent / PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (params.parent / PROFILES_DIR).glob("*.yaml"))
        raise ConfigError(f"profile: no file {path} for profile {profile!r} "
                          f"(known: demo, {', '.join(known) or 'none'})")
    return path


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Load, override and validate the parameter tree.

    Order: params file, ``--set`` overrides, then the profile named by the resulting
    ``profile`` key (``profiles/<name>.yaml``), then the overrides once more so the command
    line wins over the profile too.

    Args:
        path: the YAML parameter file (params.yaml by default).
        overrides: ``dotted.key=value`` strings applied in order after loading.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: with a message naming the file, the key and the reason.
    """
    path = Path(path)
    tree = _read_mapping(path)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    profile = tree.get("profile", "demo")
    profile_file = _profile_path(path, profile)
    if profile_file is not None:
        # Profile first, then the command line again: --set always has the last word.
        tree = deep_merge(tree, _read_mapping(profile_file))
        tree["profile"] = profile
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

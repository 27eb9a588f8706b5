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
PROFILES_DIR = "profiles"


class ConfigError(ValueError):
    """A parameter file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
ConditionName = Literal["perugini_grade", "metastasis", "amyloid", "sex", "site", "superscan"]


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
    scatter_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.2, description="Share of the recorded counts that are Compton scatter accepted by "
                         "the energy window, spread broadly (wider windows and older "
                         "crystals accept more); it lowers the contrast of every finding."
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
    patch_size: Literal[1, 2, 4] = Field(
        1, description="Pixels per side folded into channels before the UNet (space-to-depth): "
                       "2 gives a quarter of the positions, so a wider network at the same cost.")

    @model_validator(mode="after")
    def _levels(self) -> DiffusionNetworkConfig:
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels need one entry per level")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every channel count must be a multiple of norm_num_groups")
        return self


class DiffusionSpeedConfig(_Strict):
    """Speed options: same model and checkpoints, faster steps (see models/diffusion.py).

    All off in the CPU demo; the GPU profile turns them on (benchmarks/bench_diffusion.py
    measures what each buys).
    """

    compile: bool = Field(False, description="torch.compile the UNet when fitting starts.")
    channels_last: bool = False
    flash_attention: bool = Field(False, description="PyTorch fused SDPA attention.")
    fused_adamw: bool | None = Field(None, description="null: fused AdamW on CUDA only.")
    tf32: bool = False
    cudnn_benchmark: bool = False


class DiffusionConfig(_Strict):
    """Class-conditional diffusion training (stage train_diffusion)."""

    output: Path = Field(Path("data/diffusion"), description="Final model (DVC output).")
    work_dir: Path = Field(Path("data/diffusion_work"),
                           description="Checkpoints kept across killed runs, for resume.")
    image_rows: Annotated[int, Field(ge=16, le=2048)] = 128
    image_cols: Annotated[int, Field(ge=8, le=512)] = 32
    conditions: list[ConditionName] = ["perugini_grade", "metastasis"]
    cond_dropout: Fraction = 0.1
    network: DiffusionNetworkConfig = DiffusionNetworkConfig()
    num_train_timesteps: Annotated[int, Field(ge=10, le=4000)] = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta"] = "scaled_linear_beta"
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "v_prediction", description="What the UNet predicts; velocity trains the high-noise "
                                    "end faster, which short runs need.")
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 16
    lr: PositiveFloat = 2e-4
    min_lr_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.05, description="Final learning rate of the cosine decay as a fraction of lr "
                          "(1.0: constant after warm-up).")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform", description="min_snr: Min-SNR-gamma timestep weighting (faster convergence).")
    min_snr_gamma: PositiveFloat = 5.0
    intensity_transform: Literal["linear", "sqrt"] = Field(
        "linear", description="sqrt: the model works on the square root of the intensities "
                              "(Poisson variance stabilisation; a dark, clean background).")
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    max_steps: Annotated[int, Field(ge=1)] = 400
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    gradient_clip_val: Annotated[float, Field(ge=0.0)] = 1.0
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU or a CPU with native bf16, else 32-true.")
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
    speed: DiffusionSpeedConfig = DiffusionSpeedConfig()
    @model_validator(mode="after")
    def _divisible(self) -> DiffusionConfig:
        step = self.network.patch_size * 2 ** (len(self.network.channels) - 1)
        if self.image_rows % step or self.image_cols % step:
            raise ValueError(f"image_rows and image_cols must be multiples of {step} "
                             f"(patch_size x 2^(levels - 1)), got {self.image_rows} x "
                             f"{self.image_cols}")
        return self

    registered_model_name: str | None = Field(
        "synthdx-bone-scan-diffusion",
        description="MLflow registered model the final EMA model becomes a version of "
                    "(null: log nothing to the registry).")



class SampleGroup(_Strict):
    """One block of synthetic images: how many, and the condition values they are asked for.

    Factors of the model that ``condition`` does not name are drawn, per image, from the
    training split's joint label distribution given the named ones, so every synthetic image
    carries a complete, plausible label set (e.g. "enrich site coastal" keeps coastal's own
    disease mix).
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    count: Annotated[int, Field(ge=0, le=10_000_000)]
    condition: dict[ConditionName, int | bool | str] = Field(default_factory=dict)


def _default_groups() -> list[SampleGroup]:
    return [SampleGroup(name="all", count=100)]


class SynthesizeDicomConfig(_Strict):
    """Optional DICOM export (Multi-frame Grayscale Word SC, SYN) into ``<output>/dicom/``."""

    enabled: bool = False


class SynthesizeConfig(_Strict):
    """Sampling a synthetic dataset from the trained model (stage synthesize)."""

    model: Path | None = Field(None, description="Trained model folder; default diffusion.output.")
    output: Path = Path("data/synthetic")
    work_dir: Path = Field(Path("data/synthetic_work"),
                           description="Per-rank shards of a distributed run before the merge.")
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: Annotated[int, Field(ge=1, le=4000)] = 50
    guidance_scale: Annotated[float, Field(ge=0.0, le=50.0)] = 3.0
    eta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    seed: Annotated[int, Field(ge=0, lt=2**40)] = Field(
        7_000_000, description="Image i of the plan gets seed + i: any image can be regenerated.")
    groups: list[SampleGroup] = Field(default_factory=_default_groups)
    precision: Literal["auto", "32-true", "bf16-mixed"] = Field(
        "auto", description="auto: bf16 autocast on a GPU or a CPU with native bf16, else fp32.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = 1
    num_nodes: Annotated[int, Field(ge=1)] = 1
    strategy: str = "auto"
    dicom: SynthesizeDicomConfig = SynthesizeDicomConfig()

    @field_validator("groups")
    @classmethod
    def _unique_groups(cls, groups: list[SampleGroup]) -> list[SampleGroup]:
        names = [g.name for g in groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        if not groups or sum(g.count for g in groups) == 0:
            raise ValueError("at least one group with count > 0 is required")
        return groups


class AuditEncoderConfig(_Strict):
    """The in-domain feature encoder trained on the real training split (nothing downloaded)."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 8
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 64
    lr: PositiveFloat = 1e-3
    feature_dim: Annotated[int, Field(ge=8, le=4096)] = 128
    seed: int = 99


class AuditPrivacyConfig(_Strict):
    """Nearest-neighbour memorisation check against the training images."""

    quantile: Annotated[float, Field(gt=0.5, le=1.0)] = Field(
        0.99, description="Threshold = this quantile of held-out real images' nearest-"
                          "training-image similarity; synthetic images above it are withheld.")
    pairs_shown: Annotated[int, Field(ge=1, le=64)] = 8


class AuditTstrConfig(_Strict):
    """Train-on-synthetic / test-on-real: the synthetic set's downstream usefulness.

    Per task (amyloidosis, metastasis) one small CNN is trained on the synthetic set and one,
    with the same settings and steps, on as many real training images; both are scored on the
    real validation split. In steps, not epochs, so both get the same training however small
    either set is.
    """

    steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        250, description="Optimiser steps of each of the four classifiers (0: TSTR off).")
    batch_size: Annotated[int, Field(ge=2, le=4096)] = Field(
        32, description="Images per step, half positive (balanced sampling).")
    lr: PositiveFloat = 1e-3
    seed: int = 17


class AuditConfig(_Strict):
    """Quality and privacy audit of the synthetic set (stage audit)."""

    synthetic: Path | None = Field(
        None, description="Synthetic dataset; default synthesize.output.")
    output: Path = Field(Path("data/audit"),
                         description="audit.json, withheld list, pictures and released/.")
    encoder: AuditEncoderConfig = AuditEncoderConfig()
    privacy: AuditPrivacyConfig = AuditPrivacyConfig()
    nearest_k: Annotated[int, Field(ge=1, le=100)] = Field(
        5, description="k of the k-NN manifolds for precision / recall / coverage.")
    max_real: Annotated[int, Field(ge=10)] = Field(
        5000, description="At most this many real training images enter the quality metrics.")
    msssim_pairs: Annotated[int, Field(ge=2)] = Field(
        200, description="Random same-class pairs per class for MS-SSIM diversity.")
    two_sample_folds: Annotated[int, Field(ge=2, le=20)] = 5
    pixel_critic_steps: Annotated[int, Field(ge=0, le=100_000)] = Field(
        80, description="Optimiser steps (batches of encoder.batch_size) of the small CNN "
                        "telling real from synthetic pixels, per cross-validation fold; "
                        "0 skips that test (features only).")
    tstr: AuditTstrConfig = AuditTstrConfig()
    seed: int = 4242


TaskName = Literal["amyloidosis", "metastasis"]
RegimeName = Literal["real", "real_limited", "synthetic", "real_limited+synthetic",
                     "real+synthetic"]


class ClassifierNetworkConfig(_Strict):
    """The downstream network: a MONAI 2-D ResNet (widths and depth set here) or DenseNet121."""

    architecture: Literal["resnet", "densenet121"] = "resnet"
    layers: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        [1, 1, 1, 1], description="ResNet basic blocks per stage ([2, 2, 2, 2] is ResNet-18).")
    widths: list[Annotated[int, Field(ge=4, le=2048)]] = Field(
        [16, 32, 64, 128], description="ResNet channels per stage.")
    dropout: Fraction = 0.2

    @model_validator(mode="after")
    def _stages(self) -> ClassifierNetworkConfig:
        if len(self.layers) != len(self.widths):
            raise ValueError(f"network.layers ({len(self.layers)} stages) and network.widths "
                             f"({len(self.widths)} stages) must have the same length")
        return self


class ClassifierConfig(_Strict):
    """Downstream classifiers per task and training regime (stage train_classifier)."""

    processed: Path | None = Field(None, description="Real dataset; default ingest.output.")
    synthetic: Path | None = Field(
        None, description="Audited synthetic set; default <audit.output>/released.")
    output: Path = Field(Path("data/classifiers"),
                         description="<output>/<task>/<regime>/seed<k>/ per model.")
    tasks: list[TaskName] = ["amyloidosis", "metastasis"]
    regimes: list[RegimeName] = ["real", "real_limited", "synthetic", "real_limited+synthetic",
                                 "real+synthetic"]
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(
        [0, 1, 2], description="One model per seed and regime; differences between regimes are "
                               "judged against the spread between seeds.")
    limited_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = Field(
        0.1, description="real_limited: this stratified fraction of the internal training "
                         "split (drawn per seed, the same draw in every regime using it).")
    synthetic_per_real: Annotated[float, Field(ge=0.0, le=1000.0)] | None = Field(
        None, description="The dose of synthetic data: regimes adding synthetic images to "
                          "real ones take round(ratio x n_real) of them (n_real: the regime's "
                          "real images; the limited draw's size for 'synthetic'), drawn per "
                          "seed with the released set's class mix; 0: none; null: the whole "
                          "released set.")
    image_rows: Annotated[int, Field(ge=16, le=2048)] | None = Field(
        None, description="Input size; default the synthetic set's size (real images are "
                          "area-resized to it, so real and synthetic share one resolution).")
    image_cols: Annotated[int, Field(ge=8, le=512)] | None = None
    network: ClassifierNetworkConfig = ClassifierNetworkConfig()
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_steps: Annotated[int, Field(ge=1)] = Field(
        300, description="Optimiser steps per model: the same budget in every regime.")
    val_every_n_steps: Annotated[int, Field(ge=1)] = Field(
        50, description="Validate (AUC on the internal validation split) every N steps; the "
                        "best weights by that AUC are kept.")
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-4
    class_balance: Literal["sampler", "pos_weight", "none"] = Field(
        "sampler", description="sampler: each batch half positives (rare findings); "
                               "pos_weight: weighted loss.")
    augment: bool = True
    threshold: Literal["youden", "sensitivity_90", "balanced_accuracy"] = Field(
        "youden", description="How the operating threshold is picked on the internal "
                              "validation split (never on test or external data).")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto: bf16-mixed on a GPU or a CPU with native bf16, else 32-true.")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = 1
    num_workers: Annotated[int, Field(ge=0, le=64)] = 0
    registered_model_prefix: str | None = Field(
        "synthdx-classifier", description="The best model per task (internal validation AUC) "
                                          "is registered as <prefix>-<task> with alias "
                                          "'champion' by the validate stage (null: no "
                                          "registry).")


class ValidateConfig(_Strict):
    """Every classifier on the internal test split and each external site (stage validate)."""

    classifiers: Path | None = Field(None, description="Default classifier.output.")
    output: Path = Field(Path("reports"), description="validation.json, validation.html, "
                                                      "validation_metrics.json, validation/.")
    bootstrap: Annotated[int, Field(ge=100, le=100_000)] = Field(
        1000, description="Stratified bootstrap resamples for the AUC confidence interval.")
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 10
    age_bands: list[float] = Field(
        [0, 60, 70, 80, 150], description="Edges of the age bands of the subgroup table.")
    comparisons: list[tuple[RegimeName, RegimeName]] = Field(
        [("real_limited+synthetic", "real_limited"), ("real+synthetic", "real"),
         ("synthetic", "real_limited")],
        description="(with, without) regime pairs compared case by case (DeLong).")
    seed: int = 31337

    @field_validator("age_bands")
    @classmethod
    def _increasing(cls, edges: list[float]) -> list[float]:
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError(f"age_bands must be at least two increasing edges, got {edges}")
        return edges


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


class PipelineConfig(_Strict):
    """How ``synthdx run`` runs the stages (no stage depends on it: changing it reruns nothing)."""

    retries: Annotated[int, Field(ge=0, le=10)] = Field(
        1, description="Extra attempts for a stage that fails (a flaky worker, a full disk).")
    retry_delay_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0
    max_parallel: Annotated[int, Field(ge=1, le=64)] = Field(
        2, description="Most stages run at once when the DAG allows (the classifier matrix); "
                       "CPU threads are shared out between them.")


class Config(_Strict):
    """The whole parameter tree (params.yaml)."""

    profile: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = Field(
        "demo", description="Overrides from profiles/<profile>.yaml applied over this file "
                            "(demo: none, this file is the demo).")
    reports_dir: Path = Path("reports")
    mlflow: MlflowConfig = MlflowConfig()
    phantom: PhantomConfig
    ingest: IngestConfig = IngestConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    audit: AuditConfig = AuditConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    validation: ValidateConfig = ValidateConfig()
    pipeline: PipelineConfig = PipelineConfig()

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

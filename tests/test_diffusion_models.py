"""Fast CPU tests of the conditional diffusion building blocks (models/)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from models.conditioning import ConditionEmbedding, ConditionSpec
from models.data import DiffusionDataModule, ProcessedImages
from models.diffusion import DiffusionModule, build_unet, warmup_cosine
from models.sampling import sample
from tests.conftest import diffusion_module

ROWS, COLS = 32, 16
TINY = dict(channels=(16, 32), attention_levels=(False, False), num_res_blocks=1,
            num_head_channels=16, norm_num_groups=8)
TIMESTEPS = 50


def _make_dataset(root: Path, n: int = 24) -> Path:
    """A processed folder whose images get brighter with grade and spottier with metastasis."""
    rng = np.random.default_rng(0)
    grades = np.arange(n) % 4
    mets = (np.arange(n) // 4) % 2 == 1
    images = np.zeros((n, 2, ROWS, COLS), dtype=np.float32)
    for i in range(n):
        body = np.zeros((ROWS, COLS), dtype=np.float32)
        body[2:-2, 5:-5] = 0.2 + 0.15 * grades[i]
        if mets[i]:
            body[8:11, 6:9] = 1.0
        images[i, 0] = body
        images[i, 1] = body[:, ::-1]
    images = np.clip(images + rng.normal(0, 0.02, images.shape), 0, 1).astype(np.float16)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", images)
    split = ["train"] * 16 + ["val"] * 4 + ["test"] * 4
    manifest = pd.DataFrame({
        "index": np.arange(n),
        "split": split,
        "site": ["site_b" if i % 3 else "site_a" for i in range(n)],
        "sex": [["M", "F", "O", None][i % 4] for i in range(n)],
        "perugini_grade": grades.astype(np.int64),
        "metastasis": mets,
        "amyloid": grades >= 2,
    })
    manifest.to_parquet(root / "manifest.parquet")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("processed") / "processed")


@pytest.fixture(scope="module")
def spec() -> ConditionSpec:
    return ConditionSpec.build(["perugini_grade", "metastasis"])


class _LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def _fit(root: Path, spec: ConditionSpec, steps: int, seed: int = 0
         ) -> tuple[DiffusionModule, list[float], dict[str, torch.Tensor]]:
    L.seed_everything(seed, workers=True)
    module = diffusion_module(spec, **TINY, num_train_timesteps=TIMESTEPS, cond_dropout=0.2,
                             lr=2e-3, warmup_steps=3, max_steps=steps)
    data = DiffusionDataModule(root, spec, (ROWS, COLS), batch_size=8, num_workers=0)
    recorder = _LossRecorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True,
                        num_sanity_val_steps=0, limit_val_batches=1, callbacks=[recorder])
    trainer.fit(module, datamodule=data)
    return module, recorder.losses, dict(trainer.callback_metrics)


@pytest.fixture(scope="module")
def trained(dataset: Path, spec: ConditionSpec
            ) -> tuple[DiffusionModule, list[float], dict[str, torch.Tensor]]:
    return _fit(dataset, spec, steps=30)


# --- conditioning -------------------------------------------------------------------------


def test_spec_encodes_rows_with_sorted_sites_and_null_for_unknown_sex() -> None:
    rows = pd.DataFrame({"perugini_grade": [3, 0, 1], "metastasis": [True, False, False],
                         "site": ["zeta", "alpha", "zeta"], "sex": ["M", None, "O"]})
    spec = ConditionSpec.from_manifest(rows, ["perugini_grade", "metastasis", "site", "sex"])
    assert spec.cardinalities == [4, 2, 2, 2]
    assert spec.encode(rows).tolist() == [[3, 1, 1, 1], [0, 0, 0, 2], [1, 0, 1, 2]]
    assert spec.null(3).tolist() == [[4, 2, 2, 2]] * 3
    assert ConditionSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="perugini_grade"):
        spec.encode_row({"perugini_grade": 7, "metastasis": 0, "site": "alpha", "sex": "F"})
    with pytest.raises(ValueError, match="metastasis.*missing"):
        spec.encode_row({"perugini_grade": 1, "metastasis": None, "site": "alpha", "sex": "F"})


def test_condition_embedding_replaces_monai_class_embedding(spec: ConditionSpec) -> None:
    torch.manual_seed(0)
    unet = build_unet(**TINY, spec=spec)
    assert isinstance(unet.class_embedding, ConditionEmbedding)
    assert unet.class_embedding.dim == TINY["channels"][0] * 4
    # MONAI zero-initialises the output conv (and each resblock's last conv), so an untrained
    # UNet outputs zeros whatever the condition; give those layers weights to see through.
    for name, param in unet.named_parameters():
        if param.abs().sum() == 0 and name.endswith("weight"):
            torch.nn.init.normal_(param, std=0.05)
    x = torch.randn(2, 2, ROWS, COLS)
    t = torch.tensor([10, 10])
    real = torch.tensor([[3, 1], [3, 1]])
    unet.eval()
    with torch.no_grad():
        out_real = unet(x, t, class_labels=real)
        out_null = unet(x, t, class_labels=spec.null(2))
        out_other = unet(x, t, class_labels=torch.tensor([[0, 0], [0, 0]]))
    assert out_real.shape == x.shape
    assert not torch.allclose(out_real, out_null)
    assert not torch.allclose(out_real, out_other)
    emb = unet.class_embedding(real)
    expected = unet.class_embedding.tables[0](real[:, 0]) + unet.class_embedding.tables[1](
        real[:, 1])
    torch.testing.assert_close(emb, expected)


# --- data ---------------------------------------------------------------------------------


def test_processed_images_reads_split_and_resizes(dataset: Path, spec: ConditionSpec) -> None:
    full = ProcessedImages(dataset, "val", spec)
    item = full[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (2, ROWS, COLS)
    assert item["index"] == 16 and item["cond"].tolist() == [0, 0]
    small = ProcessedImages(dataset, "val", spec, size=(16, 8))[0]["image"]
    assert small.shape == (2, 16, 8)
    torch.testing.assert_close(small.mean(), item["image"].mean(), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="no images"):
        ProcessedImages(dataset, "external", spec)


def test_datamodule_augments_train_within_range(dataset: Path) -> None:
    L.seed_everything(1)
    names = ["perugini_grade", "metastasis", "site", "sex"]
    spec = ConditionSpec.from_manifest(pd.read_parquet(dataset / "manifest.parquet"), names)
    data = DiffusionDataModule(dataset, spec, (ROWS, COLS), batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (8, 2, ROWS, COLS) and batch["cond"].shape == (8, 4)
    assert type(batch["image"]) is torch.Tensor
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert not any("Flip" in type(t).__name__ for t in data.train_set.transform.transforms)


# --- training -----------------------------------------------------------------------------


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)


def test_velocity_prediction_targets_velocity_and_samples(spec: ConditionSpec) -> None:
    """A v-prediction model regresses sqrt(abar)*eps - sqrt(1-abar)*x0 and samples with it."""
    torch.manual_seed(0)
    module = diffusion_module(spec, channels=(8, 8), attention_levels=(False, False),
                             norm_num_groups=4, num_head_channels=8, num_train_timesteps=50,
                             prediction_type="v_prediction").eval()
    images = torch.rand(3, 2, ROWS, COLS)
    cond = torch.zeros(3, len(spec.names), dtype=torch.long)
    loss = module.diffusion_loss(images, cond, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    x0 = images * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, 50, (3,), generator=gen)
    abar = module.noise_scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    velocity = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    with torch.no_grad():
        pred = module(module.noise_scheduler.add_noise(x0, noise, t), t, cond)
    assert float(loss) == pytest.approx(float(((pred - velocity) ** 2).mean()), rel=1e-5)
    assert module.noise_schedule["prediction_type"] == "v_prediction"
    out = sample(module.unet, "ddim", 5, cond[:1], 2.0, [1], (2, ROWS, COLS), "cpu",
                 null_cond=spec.null_indices, **module.noise_schedule)
    assert out.shape == (1, 2, ROWS, COLS) and bool(torch.isfinite(out).all())
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_module(spec, prediction_type="x0")


def test_training_lowers_loss_and_logs(trained) -> None:  # noqa: ANN001
    module, losses, metrics = trained
    assert len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, losses
    assert {"train/loss_step", "lr", "val/loss"} <= set(metrics)
    assert module.hparams["spec"] == module.spec.to_dict()


def test_training_is_deterministic(dataset: Path, spec: ConditionSpec) -> None:
    _, a, _ = _fit(dataset, spec, steps=3, seed=7)
    _, b, _ = _fit(dataset, spec, steps=3, seed=7)
    assert a == b


# --- sampling -----------------------------------------------------------------------------


def _sample(module: DiffusionModule, kind: str, cond: list[list[int]], seeds: list[int],
            scale: float = 3.0) -> torch.Tensor:
    steps = 10 if kind == "ddim" else TIMESTEPS
    return sample(module.unet, kind, steps, torch.tensor(cond), scale, seeds, (2, ROWS, COLS),
                  "cpu", null_cond=module.spec.null_indices, **module.noise_schedule)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_sampling_is_reproducible_per_seed(trained, kind: str) -> None:  # noqa: ANN001
    module = trained[0]
    pair = _sample(module, kind, [[1, 0], [3, 1]], [11, 22])
    assert pair.shape == (2, 2, ROWS, COLS)
    assert pair.min() >= 0 and pair.max() <= 1
    alone = _sample(module, kind, [[3, 1]], [22])
    moved = _sample(module, kind, [[3, 1], [0, 0], [1, 0]], [22, 5, 11])
    torch.testing.assert_close(alone[0], pair[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[0], pair[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(moved[2], pair[0], atol=1e-5, rtol=0)
    other_seed = _sample(module, kind, [[3, 1]], [23])
    assert (other_seed[0] - pair[1]).abs().mean() > 1e-2


def test_guidance_follows_condition(trained) -> None:  # noqa: ANN001
    module = trained[0]
    out = _sample(module, "ddim", [[0, 0], [3, 1]], [5, 5], scale=3.0)
    assert (out[0] - out[1]).abs().mean() > 1e-3
    unconditional = _sample(module, "ddim", [[0, 0], [3, 1]], [5, 5], scale=0.0)
    torch.testing.assert_close(unconditional[0], unconditional[1], atol=1e-6, rtol=0)


def test_hyperparameters_rebuild_the_model(trained) -> None:  # noqa: ANN001
    module = trained[0]
    rebuilt = DiffusionModule(**dict(module.hparams))
    rebuilt.load_state_dict(module.state_dict())
    assert rebuilt.spec == module.spec and rebuilt.noise_schedule == module.noise_schedule


def test_sampling_rejects_bad_requests(trained) -> None:  # noqa: ANN001
    module = trained[0]
    with pytest.raises(ValueError, match="len\\(seeds\\)"):
        _sample(module, "ddim", [[0, 0]], [1, 2])
    with pytest.raises(ValueError, match="DDPM"):
        sample(module.unet, "ddpm", 5, torch.tensor([[0, 0]]), 1.0, [1], (2, ROWS, COLS), "cpu",
               null_cond=module.spec.null_indices, **module.noise_schedule)


def test_patched_unet_folds_pixels_and_keeps_the_image_shape(spec: ConditionSpec) -> None:
    """patch_size 2: the UNet sees a quarter of the positions, the output is pixel-shaped."""
    module = diffusion_module(spec, **TINY, num_train_timesteps=TIMESTEPS, patch_size=2)
    inner = module.unet.inner
    assert inner.conv_in.conv.in_channels == 8  # 2 views x 2 x 2 pixels
    with torch.no_grad():  # MONAI zero-initialises the output convolution
        for p in inner.out.parameters():
            p.normal_(0, 0.1)
    x = torch.rand(3, 2, ROWS, COLS)
    cond = torch.as_tensor(spec.null_indices).repeat(3, 1)
    out = module(x, torch.tensor([1, 10, 40]), cond)
    assert out.shape == x.shape
    # A pixel's prediction depends on its own patch: the fold is lossless, not a downsampling.
    y = x.clone()
    y[0, :, 0, 0] += 1.0
    assert not torch.equal(module(y, torch.tensor([1, 10, 40]), cond)[0], out[0])
    rebuilt = DiffusionModule(**module.hparams)
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x, torch.tensor([1, 10, 40]), cond), out)


def test_min_snr_weights_clip_the_easy_timesteps(spec: ConditionSpec) -> None:
    """Min-SNR-5: nearly clean timesteps weigh gamma/(SNR+1) << 1 in velocity units."""
    uniform = diffusion_module(spec, **TINY, num_train_timesteps=TIMESTEPS,
                              prediction_type="v_prediction")
    weighted = diffusion_module(spec, **TINY, num_train_timesteps=TIMESTEPS,
                               prediction_type="v_prediction", loss_weighting="min_snr")
    t = torch.tensor([0, TIMESTEPS // 2, TIMESTEPS - 1])
    assert torch.equal(uniform.loss_weights(t, epsilon=False), torch.ones(3))
    w = weighted.loss_weights(t, epsilon=False)
    abar = weighted.noise_scheduler.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    assert torch.allclose(w, snr.clamp(max=5.0) / (snr + 1))
    assert w[0] < 0.01 < w[1]
    with pytest.raises(ValueError, match="loss_weighting"):
        diffusion_module(spec, **TINY, loss_weighting="snr")


def test_warmup_ema_follows_the_trained_weights_early() -> None:
    """A 50-step run: the warm-up EMA is near the trained weights; a plain 0.999 EMA would still
    be ~95 % initialisation (0.999**50), which is what made early snapshots sample pure noise."""
    from models.callbacks import WarmupEMA, ema_warmup_decay

    class Quadratic(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return ((self.w - 1.0) ** 2).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    assert ema_warmup_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_warmup_decay(0.999, 10**6) == 0.999
    ema = WarmupEMA(decay=0.999)
    trainer = L.Trainer(max_steps=50, callbacks=[ema], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Quadratic(), torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1))
    averaged = ema._average_model.module.w.detach()
    assert torch.all(averaged > 0.9), averaged


def test_sqrt_intensity_round_trips_and_darkens_background_residue(spec: ConditionSpec) -> None:
    """The sqrt transform is inverted exactly by sampling's output mapping, and a small residue
    above the background (-1) in model space stays near 0 in stored intensities."""
    from models.diffusion import to_image_range, to_model_range

    x = torch.rand(2, 2, ROWS, COLS) ** 3
    for intensity in ("linear", "sqrt"):
        back = to_image_range(to_model_range(x, intensity), intensity)
        torch.testing.assert_close(back, x, atol=1e-6, rtol=1e-5)
    residue = torch.full((1,), -1.0 + 0.1)  # 0.05 above black in [0, 1] units
    assert to_image_range(residue, "linear").item() == pytest.approx(0.05)
    assert to_image_range(residue, "sqrt").item() == pytest.approx(0.0025)
    module = diffusion_module(spec, **TINY, num_train_timesteps=TIMESTEPS,
                             intensity_transform="sqrt")
    assert module.intensity == "sqrt"
    assert DiffusionModule(**module.hparams).intensity == "sqrt"
    with pytest.raises(ValueError, match="intensity"):
        diffusion_module(spec, **TINY, intensity_transform="log")


def test_the_preview_grid_samples_with_a_step_count_that_divides_the_timesteps() -> None:
    """SampleGrid asks for 20 DDIM steps; over 50 timesteps that would break MONAI's stride."""
    from models.callbacks import ddim_steps_at_most

    assert ddim_steps_at_most(20, 1000) == 20
    assert ddim_steps_at_most(20, 50) == 10
    assert ddim_steps_at_most(20, 7) == 7
    for t in (50, 100, 999, 1000):
        assert t % ddim_steps_at_most(20, t) == 0

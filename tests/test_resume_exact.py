"""A diffusion training killed and resumed ends with the weights of an uninterrupted run.

Why it matters: DVC records the model a stage produced for its parameters; if a kill and a
resume change the data order, the augmentation or the step's noise, the same parameters give
another model. The kill is an exception in the training step (as a killed process, nothing
after it is saved); the resume starts from the last periodic checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from models.data import Draw, ResumableDataLoader, ResumableSampler, mix_seed
from models.diffusion import DiffusionModule
from tasks.artifacts.diffusion_model import MODEL_NAME
from tasks.diffusion.train import train_diffusion
from tests.test_diffusion_models import _make_dataset
from tests.test_train_diffusion import _cfg

MAX_STEPS = 10  # 16 training rows at batch 4: 4 steps per epoch, so 2.5 epochs


class Killed(RuntimeError):
    """Stands for the process being killed mid-step."""


def _weights(tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The written (EMA) model and the raw weights of the final checkpoint."""
    model = torch.load(tmp_path / "model" / MODEL_NAME, map_location="cpu",
                       weights_only=False)["state_dict"]
    ckpt = torch.load(tmp_path / "work" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    return model, ckpt["state_dict"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize(("every", "kill_at"), [(3, 7), (4, 6)],
                         ids=["mid-epoch checkpoint", "end-of-epoch checkpoint"])
def test_killed_and_resumed_run_gives_the_uninterrupted_weights(tmp_path, mlflow_uri,
                                                                monkeypatch, every, kill_at):
    data = _make_dataset(tmp_path / "processed")

    def cfg(run: str):
        c = _cfg(tmp_path / run, MAX_STEPS).model_copy(deep=True)
        c.diffusion.checkpoint_every_n_steps = every
        assert c.diffusion.augment and c.diffusion.cond_dropout > 0  # all randomness in play
        return c

    whole = train_diffusion(cfg("whole"), processed=data)
    assert whole.global_step == MAX_STEPS

    step = DiffusionModule.training_step

    def killed_at(self, batch, batch_idx):
        if self.trainer.global_step == kill_at:
            raise Killed(f"killed at step {kill_at}")
        return step(self, batch, batch_idx)

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionModule, "training_step", killed_at)
        with pytest.raises(Killed):
            train_diffusion(cfg("killed"), processed=data)
    last = tmp_path / "killed" / "work" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["global_step"] == kill_at // every * every
    # Lightning keeps the loader's position in the loop state (not a hand-written field).
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"epoch": (saved["global_step"] - 1) // 4,
                             "samples": ((saved["global_step"] - 1) % 4 + 1) * 4}]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train_diffusion(cfg("killed"), processed=data)
    assert resumed.resumed_from == last and resumed.global_step == MAX_STEPS
    assert not [w for w in caught if "not resumable" in str(w.message)]

    for a, b in zip(_weights(tmp_path / "whole"), _weights(tmp_path / "killed"), strict=True):
        _assert_same(a, b)


def test_loader_state_continues_the_epoch_where_it_stopped():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, draw: Draw) -> tuple[int, int]:
            return draw.item, draw.seed

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(Items(), ResumableSampler(dataset, seed=3), 3, drop_last=True)

    def batches(dl: ResumableDataLoader, epoch: int, n: int | None = None) -> list[list[int]]:
        dl.sampler.set_epoch(epoch)
        out = []
        for items, _ in dl:
            out.append(items.tolist())
            if n is not None and len(out) == n:
                break
        return out

    whole = loader()
    epoch0, epoch1 = batches(whole, 0), batches(whole, 1)
    assert len(epoch0) == 3 and epoch0 != epoch1  # a new order each epoch

    first = loader()
    assert batches(first, 1, n=2) == epoch1[:2]
    state = first.state_dict()
    assert state == {"epoch": 1, "samples": 6}
    again = loader()
    again.load_state_dict(state)
    again.sampler.set_epoch(1)  # what Lightning does before the epoch: keeps the position
    assert [items.tolist() for items, _ in again] == epoch1[2:]
    assert again.state_dict() == {"epoch": 1, "samples": 9}

    done = loader()
    done.load_state_dict({"epoch": 1, "samples": 9})  # saved at the end of epoch 1
    assert done.sampler.epoch == 2 and done.sampler.start == 0


def test_augmentation_seed_depends_on_epoch_and_row_only():
    sampler = ResumableSampler(torch.utils.data.TensorDataset(torch.arange(6)), seed=5)
    sampler.set_epoch(2)
    draws = list(sampler)
    assert sorted(d.item for d in draws) == list(range(6))
    assert all(d.seed == mix_seed(5, 2, d.item, bits=32) for d in draws)
    assert len({d.seed for d in draws}) == 6 and all(0 <= d.seed < 2**32 for d in draws)


def test_augmented_batches_do_not_depend_on_worker_processes(tmp_path):
    from models.conditioning import ConditionSpec
    from models.data import DiffusionDataModule
    from tests.test_diffusion_models import COLS, ROWS

    data = _make_dataset(tmp_path / "processed")
    spec = ConditionSpec.build(["perugini_grade", "metastasis"])

    def epoch(workers: int) -> list[torch.Tensor]:
        module = DiffusionDataModule(data, spec, (ROWS, COLS), batch_size=4,
                                     num_workers=workers, augment=True, seed=11)
        loader = module.train_dataloader()
        loader.sampler.set_epoch(1)
        return [batch["image"] for batch in loader]

    main, workers = epoch(0), epoch(2)
    assert len(main) == 4
    assert all(torch.equal(a, b) for a, b in zip(main, workers, strict=True))
    # ... and augmentation did happen: the same rows differ from the stored images.
    stored = DiffusionDataModule(data, spec, (ROWS, COLS), batch_size=4, augment=False, seed=11)
    loader = stored.train_dataloader()
    loader.sampler.set_epoch(1)
    assert any(not torch.equal(a, b["image"]) for a, b in zip(main, loader, strict=True))

"""Datasets and the DataModule that feed the diffusion model from a processed folder.

A processed folder (written by ingest) holds ``images.npy`` (float16, (N, 2, rows, cols),
anterior and posterior views, intensity in [0, 1]) and ``manifest.parquet`` (one row per image,
``index`` into the array, ``split``, labels; file names in models.dataset_files). The array is
memory-mapped, not loaded: it can be far larger than RAM, and each DataLoader worker opens its
own map.

The training loader is resumable: its sampler draws each epoch's order from the seed and the
epoch number, each image's augmentation from the seed, the epoch and the row, and the loader's
``state_dict`` (the epoch and how far into it training got) travels in Lightning's checkpoint.
A run killed and resumed from a checkpoint therefore sees the same batches, augmented the same
way, as a run that was never interrupted.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    Randomizable,
    RandScaleIntensity,
)
from monai.utils import convert_to_tensor
from torch.utils.data import DistributedSampler

from models.conditioning import ConditionSpec
from models.dataset_files import ImageArray, has_images, images_location, open_images, read_manifest

Transform = Callable[[torch.Tensor], Any]


def mix_seed(*parts: int, bits: int = 63) -> int:
    """A well-spread ``bits``-bit seed from integers (a seed, an epoch, a step, a rank...).

    Why: randomness drawn from a generator seeded by *where* training is (epoch and row, step
    and rank) is the same in a resumed run as in an uninterrupted one, in any worker process
    and on any rank; a global generator's state depends on everything drawn before it and is
    not in the checkpoint. ``SeedSequence`` hashes the parts, so neighbouring steps get
    unrelated streams.
    """
    words = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 32 | int(words[1])) % 2**bits


class Draw(NamedTuple):
    """One item a ``ResumableSampler`` asks the dataset for: its row and augmentation seed."""

    item: int
    seed: int


def resize(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Resize a (C, H, W) image to ``size`` with area interpolation (no-op when equal).

    Area averaging is the right filter for downsampling count images: it preserves mean
    intensity and does not alias the speckle of low-count scans.
    """
    if size is None or tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="area")[0]


class ProcessedImages(torch.utils.data.Dataset):
    """One split of a processed folder as dicts of ``image``, ``cond`` and ``index``.

    Args:
        root: processed dataset folder.
        split: ``train``, ``val``, ``test`` or ``external``.
        spec: condition factors; rows are encoded once here so a bad label fails at start-up,
            not in the middle of an epoch.
        size: target (rows, cols); images of another size are area-resized.
        transform: optional augmentation on the (2, H, W) float32 tensor in [0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        spec: ConditionSpec,
        size: tuple[int, int] | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        self.images_path = images_location(self.root)
        if not has_images(self.root):
            raise FileNotFoundError(f"{self.images_path}: missing image array")
        manifest = read_manifest(self.root)
        rows = manifest[manifest["split"] == split].sort_values("index")
        if rows.empty:
            raise ValueError(f"{self.root}: split {split!r} has no images")
        self.split = split
        self.size = tuple(size) if size is not None else None
        self.transform = transform
        self.indices = rows["index"].to_numpy(dtype=np.int64)
        self.cond = spec.encode(rows)
        self._images: ImageArray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # A memory map must not be pickled into worker processes; each worker reopens it.
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def images(self) -> ImageArray:
        """The memory-mapped images (either layout), opened on first use in this process."""
        if self._images is None:
            self._images = open_images(self.root)
        return self._images

    def __getitem__(self, item: int | Draw) -> dict[str, Any]:
        """The item's image (augmented), condition codes and row ``index`` in the array.

        A ``Draw`` (what ``ResumableSampler`` yields) also fixes the augmentation's random
        state, so the same draw gives the same image in any process and after a resume.
        """
        if isinstance(item, Draw):
            item, seed = item
            if isinstance(self.transform, Randomizable):
                self.transform.set_random_state(seed=seed)
        index = int(self.indices[item])
        image = torch.from_numpy(np.asarray(self.images[index], dtype=np.float32))
        image = resize(image, self.size)
        if self.transform is not None:
            # MONAI transforms return MetaTensors; plain tensors keep batches cheap and uniform.
            image = convert_to_tensor(self.transform(image), track_meta=False).clamp_(0.0, 1.0)
        return {"image": image.float().contiguous(), "cond": self.cond[item], "index": index}


def scan_augmentation(size: tuple[int, int]) -> Compose:
    """Mild, label-preserving augmentation for whole-body bone scans.

    Small rigid/scale jitter mimics patient positioning; intensity and gamma jitter mimic
    differences in injected activity and display. No flips: anterior and posterior views
    mirror each other, and a left-right flip would turn a view into the other's orientation.
    """
    rows, cols = size
    return Compose([
        RandAffine(
            prob=0.3,
            rotate_range=(0.05,),
            scale_range=(0.05, 0.05),
            translate_range=(0.02 * rows, 0.02 * cols),
            padding_mode="zeros",
            mode="bilinear",
        ),
        RandScaleIntensity(factors=0.1, prob=0.3),
        RandAdjustContrast(prob=0.3, gamma=(0.85, 1.2)),
    ])


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch shuffle, yielding ``Draw`` items.

    A ``DistributedSampler`` (Lightning keeps it as it is under DDP instead of wrapping it), so
    the order is a function of ``seed`` and the epoch Lightning sets: no global random state.
    ``start`` skips this rank's first items of the next pass, which is how a resumed loader
    continues an epoch where the checkpoint left it.

    Args:
        dataset: the dataset (only its length is used).
        seed: seed of the shuffle and of the per-item augmentation seeds.
        num_replicas: ranks sharing the data.
        rank: this rank.
        shuffle: shuffle each epoch (else dataset order).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int, num_replicas: int = 1,
                 rank: int = 0, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (a new epoch starts at its beginning; the same one keeps ``start``)."""
        if epoch != self.epoch:
            self.start = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[Draw]:  # type: ignore[override]
        start, self.start = self.start, 0
        for item in islice(super().__iter__(), start, None):
            yield Draw(int(item), mix_seed(self.seed, self.epoch, int(item), bits=32))


class ResumableDataLoader(DataLoader):
    """MONAI's DataLoader over a ``ResumableSampler``, with ``state_dict`` / ``load_state_dict``.

    Why: Lightning saves the state of every training loader that has these two methods in the
    checkpoint (``loops.fit_loop.state_dict.combined_loader``) and hands it back on resume
    before the first batch; without them a run resumed mid-epoch starts the epoch over in
    another order ("your dataloader is not resumable") and ends with other weights.

    The state counts the batches *handed out* in the current epoch (worker processes read
    ahead of that), as samples over all ranks, so a resume with the same batch size and world
    size continues exactly; another world size continues at the nearest batch.
    """

    sampler: ResumableSampler

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: ResumableSampler,
                 batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self.served = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        assert self.batch_size is not None
        self.served = self.sampler.start // self.batch_size
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The epoch and the samples of it all ranks have trained on so far."""
        assert self.batch_size is not None
        return {"epoch": int(self.sampler.epoch),
                "samples": self.served * self.batch_size * self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved position: the next pass starts after the trained batches."""
        assert self.batch_size is not None
        per_rank_batches = int(state["samples"]) // (self.batch_size * self.sampler.num_replicas)
        epoch = int(state["epoch"])
        if per_rank_batches >= len(self):  # saved at the end of an epoch: the next one starts
            epoch, per_rank_batches = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.start = per_rank_batches * self.batch_size


class DiffusionDataModule(L.LightningDataModule):
    """Train / val loaders over a processed folder, augmentation on train only.

    The training loader is a ``ResumableDataLoader``: order and augmentation follow from
    ``seed`` and the epoch alone, and its position is saved in Lightning's checkpoints. Under
    DDP it takes the trainer's world size and rank itself (Lightning leaves a
    ``DistributedSampler`` in place).

    Args:
        root: processed dataset folder.
        spec: condition factors.
        size: (rows, cols) the model trains at.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        augment: whether to augment the training split.
        train_split: split name to train on.
        val_split: split name to validate on (None: no validation loader).
        seed: seed of the training order and augmentation.
    """

    def __init__(
        self,
        root: str | Path,
        spec: ConditionSpec,
        size: Sequence[int],
        batch_size: int = 16,
        num_workers: int = 0,
        augment: bool = True,
        train_split: str = "train",
        val_split: str | None = "val",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.spec = spec
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.train_split = train_split
        self.val_split = val_split
        self.seed = seed
        self.train_set: ProcessedImages | None = None
        self.val_set: ProcessedImages | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the splits (cheap: only the manifest is read)."""
        transform = scan_augmentation(self.size) if self.augment else None
        self.train_set = ProcessedImages(self.root, self.train_split, self.spec, self.size,
                                         transform)
        if self.val_split is not None:
            manifest = read_manifest(self.root)
            if not (manifest["split"] == self.val_split).any():
                # A small internal site can leave the (hash-drawn) validation split empty:
                # the validation loss is a diagnostic only, so train without it.
                warnings.warn(f"{self.root}: split {self.val_split!r} has no images; "
                              "training without a validation loss", stacklevel=2)
                self.val_split = None
                return
            self.val_set = ProcessedImages(self.root, self.val_split, self.spec, self.size)

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled training batches with augmentation, resumable from a checkpoint."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        sampler = ResumableSampler(self.train_set, self.seed, replicas, rank)
        return ResumableDataLoader(
            self.train_set, sampler, self.batch_size,
            drop_last=len(sampler) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches in manifest order (no loader when ``val_split`` is None)."""
        if self.val_split is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

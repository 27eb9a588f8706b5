"""In-memory image sets and the class-balanced DataModule of the downstream classifiers.

A classifier's training set is small (hundreds to a few thousand scans at the training
resolution, a few tens of MB), and may mix real and synthetic images of different stored
sizes; loading the chosen rows once, area-resized to one size, is simpler and faster than
memory-mapping several arrays per item.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset, WeightedRandomSampler

from models.data import scan_augmentation
from models.dataset_files import images_location, open_images


def load_images(root: str | Path, indices: Sequence[int] | np.ndarray, size: tuple[int, int],
                chunk: int = 512) -> torch.Tensor:
    """Rows ``indices`` of a dataset folder's images as float32 (N, 2, rows, cols) in [0, 1].

    Images of another size are area-resized (the right filter for count images: it keeps the
    mean intensity and does not alias noise). Read in chunks from a memory map, so only the
    chosen rows are ever in memory.

    Raises:
        FileNotFoundError: no image array in ``root``.
        IndexError: an index outside the array.
    """
    path = images_location(root)
    array = open_images(root)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(array)):
        raise IndexError(f"{path}: row index out of range 0..{len(array) - 1}")
    out = torch.empty((len(idx), array.shape[1], *size), dtype=torch.float32)
    for start in range(0, len(idx), chunk):
        part = torch.from_numpy(np.asarray(array[idx[start:start + chunk]], dtype=np.float32))
        if tuple(part.shape[-2:]) != tuple(size):
            part = F.interpolate(part, size=tuple(size), mode="area")
        out[start:start + len(part)] = part
    return out.clamp_(0.0, 1.0)


class LabelledImages(Dataset):
    """Images (N, 2, H, W) with 0/1 labels, optionally augmented per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray,
                 augment: bool = False) -> None:
        # A copy: labels often come from a read-only Arrow-backed array, which torch would
        # share (and warn about) rather than copy.
        labels = torch.tensor(np.array(labels, dtype=np.float32))
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = scan_augmentation(tuple(images.shape[-2:])) if augment else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        image = self.images[item]
        if self.transform is not None:
            image = convert_to_tensor(self.transform(image), track_meta=False).clamp(0.0, 1.0)
        return {"image": image.float().contiguous(), "label": self.labels[item]}


def balanced_sampler(labels: torch.Tensor | np.ndarray, num_samples: int, seed: int,
                     balance: bool = True) -> WeightedRandomSampler:
    """Draw ``num_samples`` items with replacement, positives and negatives equally likely.

    Why: findings are rare (a few percent of a small training set); balanced batches let a
    fixed step budget see enough positives. With ``balance=False`` every item is equally
    likely (the natural prevalence).
    """
    y = np.asarray(labels).astype(np.int64)
    weights = np.ones(len(y), dtype=np.float64)
    if balance:
        for value in (0, 1):
            n = int((y == value).sum())
            if n:
                weights[y == value] = 0.5 / n
    generator = torch.Generator().manual_seed(int(seed))
    return WeightedRandomSampler(torch.as_tensor(weights), num_samples=num_samples,
                                 replacement=True, generator=generator)


class ClassifierDataModule(L.LightningDataModule):
    """One training "epoch" of exactly ``max_steps`` balanced batches, plus validation.

    Args:
        train: training images and labels.
        val: internal validation images and labels (None: no validation).
        batch_size: images per batch.
        max_steps: batches in the training epoch (the whole run).
        seed: seed of the sampler.
        balance: class-balanced sampling (see :func:`balanced_sampler`).
        num_workers: DataLoader worker processes.
    """

    def __init__(self, train: LabelledImages, val: LabelledImages | None, batch_size: int,
                 max_steps: int, seed: int, balance: bool = True, num_workers: int = 0) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.max_steps, self.seed = batch_size, max_steps, seed
        self.balance, self.num_workers = balance, num_workers

    def train_dataloader(self) -> DataLoader:
        """``max_steps`` batches drawn by the balanced sampler."""
        sampler = balanced_sampler(self.train_set.labels, self.max_steps * self.batch_size,
                                   self.seed, self.balance)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=True,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """The validation split in order (no loader when there is none)."""
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 128), shuffle=False,
                          num_workers=0)

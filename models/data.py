"""Datasets and the DataModule that feed the diffusion model from a processed folder.

A processed folder (written by ingest) holds ``images.npy`` (float16, (N, 2, rows, cols),
anterior and posterior views, intensity in [0, 1]) and ``manifest.parquet`` (one row per image,
``index`` into the array, ``split``, labels). The array is memory-mapped, not loaded: it can be
far larger than RAM, and each DataLoader worker opens its own map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.data import DataLoader
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandScaleIntensity
from monai.utils import convert_to_tensor

from models.conditioning import ConditionSpec

IMAGES_FILE = "images.npy"
MANIFEST_FILE = "manifest.parquet"

Transform = Callable[[torch.Tensor], Any]


def read_manifest(root: str | Path) -> pd.DataFrame:
    """The manifest of a processed folder, with a clear error when it is not one."""
    path = Path(root) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {root} a processed dataset folder?")
    return pd.read_parquet(path)


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
        self.images_path = self.root / IMAGES_FILE
        if not self.images_path.is_file():
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
        self._images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict[str, Any]:
        # A memory map must not be pickled into worker processes; each worker reopens it.
        state = self.__dict__.copy()
        state["_images"] = None
        return state

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped image array, opened on first use in this process."""
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getitem__(self, item: int) -> dict[str, Any]:
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


class DiffusionDataModule(L.LightningDataModule):
    """Train / val loaders over a processed folder, augmentation on train only.

    Uses MONAI's DataLoader: it seeds MONAI's random transforms from torch's RNG in the main
    process and per worker, so ``lightning.seed_everything`` makes augmentation reproducible.

    Args:
        root: processed dataset folder.
        spec: condition factors.
        size: (rows, cols) the model trains at.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        augment: whether to augment the training split.
        train_split: split name to train on.
        val_split: split name to validate on (None: no validation loader).
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
        self.train_set: ProcessedImages | None = None
        self.val_set: ProcessedImages | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the splits (cheap: only the manifest is read)."""
        transform = scan_augmentation(self.size) if self.augment else None
        self.train_set = ProcessedImages(self.root, self.train_split, self.spec, self.size,
                                         transform)
        if self.val_split is not None:
            self.val_set = ProcessedImages(self.root, self.val_split, self.spec, self.size)

    def _loader(self, dataset: ProcessedImages, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches with augmentation."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches in manifest order (no loader when ``val_split`` is None)."""
        if self.val_split is None:
            return []
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, shuffle=False)

"""Lightning callbacks of the project."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class DataLedger(L.Callback):
    """Record which dataset rows each rank trained on, one JSON file per rank.

    Why: lineage (which images shaped the model) and a check that DDP gives every rank its
    own share of the data rather than the same batches twice.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.seen: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Remember the batch's row indices."""
        self.seen.extend(int(i) for i in batch["index"])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``rank<k>.json`` with the rows this rank saw."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"rank": trainer.global_rank,
                                    "world_size": trainer.world_size,
                                    "global_step": trainer.global_step,
                                    "rows": self.seen}))

"""The trained-module file (``model.pt``): weights, constructor arguments and input size.

Both trained networks (the diffusion model and each classifier) are handed on as one torch
file holding ``hparams`` (the LightningModule's constructor arguments), ``state_dict`` (the
weights, on the CPU) and ``image_size`` ((rows, cols) the network was trained at), plus any
extra keys the writer adds (the diffusion model's ``global_step``).

Why here, at the lowest layer, and not in ``tasks.artifacts``: the registered MLflow models
(``tasks/diffusion/pyfunc_model.py``, ``tasks/validate/champion_pyfunc.py``) are loaded without
this repository, with only the ``models`` package as a code path; they read the same file
through this module, so there is one reader for the file kind. ``tasks.artifacts`` re-exports
it for the stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

CORE_KEYS = ("hparams", "state_dict", "image_size")


@dataclass(frozen=True)
class ModuleFile:
    """The contents of one ``model.pt``.

    Attributes:
        hparams: keyword arguments that rebuild the module.
        state_dict: its weights.
        image_size: (rows, cols) of the images it was trained on.
        extra: any further keys the writer stored (e.g. ``global_step``).
    """

    hparams: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    image_size: tuple[int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, cls: type[M]) -> M:
        """The module ``cls(**hparams)`` with the stored weights, in eval mode."""
        module = cls(**self.hparams)
        module.load_state_dict(self.state_dict)
        return module.eval()


def save_module_file(path: Path, module: nn.Module, hparams: dict[str, Any],
                     image_size: tuple[int, int] | list[int], **extra: Any) -> None:
    """Write ``module``'s weights (copied to the CPU) with what rebuilds it.

    Args:
        path: the file to write (callers write inside an atomic folder).
        module: the trained network.
        hparams: its constructor arguments (``dict(module.hparams)`` for a LightningModule).
        image_size: (rows, cols) it was trained at.
        **extra: further keys to store beside the core ones.
    """
    clash = set(extra) & set(CORE_KEYS)
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite the model file's own")
    rows, cols = image_size
    torch.save({"hparams": dict(hparams),
                "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
                "image_size": [int(rows), int(cols)], **extra}, Path(path))


def read_module_file(path: Path, mmap: bool = False) -> ModuleFile:
    """Read a ``model.pt`` onto the CPU.

    Args:
        path: the file.
        mmap: map the tensors instead of reading them (cheap when only the hyper-parameters
            or the size are wanted).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file lacks one of ``hparams``, ``state_dict``, ``image_size``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model file")
    # weights_only=False: hparams hold plain Python containers written by this module.
    payload = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    missing = [k for k in CORE_KEYS if k not in payload]
    if missing:
        raise ValueError(f"{path}: not a trained model file (missing {', '.join(missing)})")
    rows, cols = payload["image_size"]
    return ModuleFile(hparams=dict(payload["hparams"]), state_dict=payload["state_dict"],
                      image_size=(int(rows), int(cols)),
                      extra={k: v for k, v in payload.items() if k not in CORE_KEYS})

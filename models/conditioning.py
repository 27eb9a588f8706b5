"""Multi-factor conditioning for the diffusion UNet.

MONAI's DiffusionModelUNet embeds ``class_labels`` with one ``nn.Embedding`` and adds the result
to the time embedding (``emb = time_embed(t) + class_embedding(class_labels)``). One embedding
table can only hold one factor, but a bone scan is described by several (cardiac uptake grade,
metastases, optionally superscan, site and sex). ``ConditionEmbedding`` is a drop-in
replacement for that module: it takes one index per factor and sums per-factor embeddings,
which keeps MONAI's forward untouched while letting any combination of factors be requested
at sampling time.

Every factor has one extra "null" index (= its number of values) meaning "unconditioned". It is
what condition dropout trains and what classifier-free guidance asks for as the unconditional
branch; it also stands in for values that are genuinely unknown (e.g. missing sex).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

FactorKind = Literal["int", "bool", "str"]
Value = int | bool | str


@dataclass(frozen=True)
class Factor:
    """One condition factor: a manifest column and its ordered list of values.

    Attributes:
        name: manifest column the factor is read from.
        kind: how cells are coerced before lookup, so ``1``, ``1.0`` and ``np.int64(1)`` match.
        values: the values in index order; index ``len(values)`` is the null index.
        allow_missing: whether a missing cell maps to the null index instead of raising. Unknown
            is a legitimate state for some factors (sex), but not for the labels the model is
            meant to control.
        null_values: values that also map to the null index (e.g. sex "O": too rare to learn,
            and "unconditioned" is the honest description of it).
    """

    name: str
    kind: FactorKind
    values: tuple[Value, ...]
    allow_missing: bool = False
    null_values: tuple[Value, ...] = ()

    @property
    def cardinality(self) -> int:
        """Number of real values (the null index equals this)."""
        return len(self.values)

    @property
    def null_index(self) -> int:
        """Index meaning "unconditioned" for this factor."""
        return len(self.values)

    def coerce(self, value: Any) -> Value:
        """Bring a manifest cell to the factor's canonical Python type."""
        if self.kind == "int":
            return int(value)
        if self.kind == "bool":
            return bool(value)
        return str(value)

    def index_of(self, value: Any) -> int:
        """Index of one manifest cell.

        Raises:
            ValueError: the value is missing (and not allowed) or not one of ``values``; the
                message names the factor so a bad manifest is easy to trace.
        """
        if _is_missing(value):
            if self.allow_missing:
                return self.null_index
            raise ValueError(f"condition factor {self.name!r}: missing value")
        key = self.coerce(value)
        if key in self.null_values:
            return self.null_index
        try:
            return self.values.index(key)
        except ValueError:
            raise ValueError(
                f"condition factor {self.name!r}: value {value!r} is not one of {self.values}"
            ) from None


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


#: Factors whose values do not depend on the data. Sex "O" and missing map to the null index:
#: they are too rare to learn and "unconditioned" is the honest description of them.
_FIXED_FACTORS: dict[str, Factor] = {
    "perugini_grade": Factor("perugini_grade", "int", (0, 1, 2, 3)),
    "metastasis": Factor("metastasis", "bool", (False, True)),
    "amyloid": Factor("amyloid", "bool", (False, True)),
    "sex": Factor("sex", "str", ("F", "M"), allow_missing=True, null_values=("O",)),
    # A superscan (diffuse skeletal metastases) is rare, so a profile enriches it through a
    # synthesize group. Archives often leave the column empty when it was not assessed: a
    # missing cell is "unconditioned", as for sex, rather than a reason to refuse the archive.
    "superscan": Factor("superscan", "bool", (False, True), allow_missing=True),
}


@dataclass(frozen=True)
class ConditionSpec:
    """The condition factors a model was trained with, in order.

    The spec is part of a trained model's identity (it fixes which index means which value), so
    it round-trips through plain dicts for ``save_hyperparameters`` and checkpoints.
    """

    factors: tuple[Factor, ...]

    @classmethod
    def build(cls, names: Sequence[str], sites: Sequence[str] = ()) -> ConditionSpec:
        """Spec for the named factors.

        Args:
            names: factor names, in order; any of ``perugini_grade``, ``metastasis``,
                ``amyloid``, ``sex``, ``superscan``, ``site``.
            sites: site names, required when ``site`` is a factor; stored sorted so the mapping
                does not depend on the order sites happen to appear in a manifest.
        """
        factors: list[Factor] = []
        for name in names:
            if name == "site":
                if not sites:
                    raise ValueError("condition factor 'site' needs the list of site names")
                factors.append(Factor("site", "str", tuple(sorted({str(s) for s in sites}))))
            elif name in _FIXED_FACTORS:
                factors.append(_FIXED_FACTORS[name])
            else:
                known = sorted([*_FIXED_FACTORS, "site"])
                raise ValueError(f"unknown condition factor {name!r}; known: {known}")
        if len({f.name for f in factors}) != len(factors):
            raise ValueError(f"duplicate condition factors in {list(names)}")
        if not factors:
            raise ValueError("a condition spec needs at least one factor")
        return cls(tuple(factors))

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame, names: Sequence[str]) -> ConditionSpec:
        """Spec for ``names``, taking the site list from the manifest's ``site`` column."""
        sites = manifest["site"].dropna().astype(str).unique().tolist() if "site" in names else []
        return cls.build(names, sites)

    @property
    def names(self) -> list[str]:
        """Factor names in order."""
        return [f.name for f in self.factors]

    @property
    def cardinalities(self) -> list[int]:
        """Number of real values per factor."""
        return [f.cardinality for f in self.factors]

    @property
    def null_indices(self) -> list[int]:
        """The null index per factor."""
        return [f.null_index for f in self.factors]

    def encode_row(self, row: Mapping[str, Any]) -> list[int]:
        """Factor indices for one manifest row (or any mapping of factor name to value)."""
        return [f.index_of(row.get(f.name)) for f in self.factors]

    def encode(self, rows: pd.DataFrame) -> torch.Tensor:
        """Factor indices for every row, as a LongTensor (N, F)."""
        missing = [n for n in self.names if n not in rows.columns]
        if missing:
            raise ValueError(f"manifest lacks condition columns {missing}")
        encoded = [self.encode_row(r) for r in rows[self.names].to_dict("records")]
        return torch.tensor(encoded, dtype=torch.long).reshape(len(rows), len(self.factors))

    def null(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A (batch, F) LongTensor of null indices: the unconditional request."""
        nulls = torch.tensor(self.null_indices, dtype=torch.long, device=device)
        return nulls.expand(batch, -1).clone()

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for hyperparameters and checkpoints."""
        return {"factors": [
            {"name": f.name, "kind": f.kind, "values": list(f.values),
             "allow_missing": f.allow_missing, "null_values": list(f.null_values)}
            for f in self.factors
        ]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConditionSpec:
        """Inverse of ``to_dict``."""
        return cls(tuple(
            Factor(d["name"], d["kind"], tuple(d["values"]), bool(d.get("allow_missing", False)),
                   tuple(d.get("null_values", ())))
            for d in data["factors"]
        ))


class ConditionEmbedding(nn.Module):
    """Sum of per-factor embeddings; a replacement for DiffusionModelUNet.class_embedding.

    Args:
        cardinalities: number of real values per factor; each table gets one extra row for
            the null index.
        dim: embedding size; must equal the UNet's time embedding size (``channels[0] * 4``)
            because MONAI adds the two.
    """

    def __init__(self, cardinalities: Sequence[int], dim: int) -> None:
        super().__init__()
        if not cardinalities or any(c < 1 for c in cardinalities):
            raise ValueError(f"cardinalities must be positive, got {list(cardinalities)}")
        self.cardinalities = [int(c) for c in cardinalities]
        self.dim = dim
        self.tables = nn.ModuleList(nn.Embedding(c + 1, dim) for c in self.cardinalities)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Embed a (B, F) LongTensor of factor indices into (B, dim)."""
        if labels.ndim != 2 or labels.shape[1] != len(self.tables):
            raise ValueError(
                f"expected condition indices of shape (B, {len(self.tables)}), "
                f"got {tuple(labels.shape)}"
            )
        out = self.tables[0](labels[:, 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](labels[:, i])
        return out

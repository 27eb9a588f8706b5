"""The evaluation sets: the internal site's test split and each external site, separately.

Why separately: a model that is good on average can fail at one site (another camera, another
population); pooling sites would hide exactly what external validation is for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from tasks.validate.inputs import ValidationInputError


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set; ``key`` (the site name) keys it everywhere in the outputs."""

    key: str
    site: str
    internal: bool
    label: str
    split: str

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (for JSON)."""
        return asdict(self)

    def mask(self, cases: pd.DataFrame) -> np.ndarray:
        """Boolean row mask of this set's cases in an aligned case table."""
        return ((cases["split"] == self.split) & (cases["site"] == self.site)).to_numpy()


def eval_sets(cases: pd.DataFrame) -> list[EvalSet]:
    """Internal test set(s) first, then external sites, each sorted by name.

    Rows with ``split == "test"`` are the internal site's test split; rows with
    ``split == "external"`` are grouped by site. A site with rows in both cannot be keyed by its
    name alone and is refused.
    """
    internal = sorted(cases.loc[cases["split"] == "test", "site"].unique())
    external = sorted(cases.loc[cases["split"] == "external", "site"].unique())
    both = sorted(set(internal) & set(external))
    if both:
        raise ValidationInputError(f"site(s) {both} have both internal test and external rows; "
                                   "a site is either the internal site or an external one")
    sets = [EvalSet(key=s, site=s, internal=True, label=f"{s} (internal test)", split="test")
            for s in internal]
    sets += [EvalSet(key=s, site=s, internal=False, label=f"{s} (external)", split="external")
             for s in external]
    return sets
